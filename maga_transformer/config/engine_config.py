"""Engine (scheduler + KV cache) settings, read once at the edge."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Optional

KV_CACHE_DTYPES = ("auto", "int8", "fp8")  # the quantized ones are ops/kv_cache.py's


def env_int(env: Mapping[str, str], name: str, default: Optional[int]) -> Optional[int]:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name}: expected an integer, got {raw!r}") from None


def env_bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    if raw.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if raw.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name}: expected 0/1 or true/false, got {raw!r}")


@dataclass
class EngineConfig:
    """How much work a step may carry and how much memory the KV cache gets."""

    max_num_batched_tokens: int = 2048  # token budget of one step (prefill chunks + decodes)
    max_num_seqs: int = 64  # cap on running sequences
    kv_cache_mem_mb: Optional[int] = None  # None: a default share of free memory
    num_kv_blocks: Optional[int] = None  # explicit block count (tests); overrides kv_cache_mem_mb
    enable_prefix_cache: bool = True  # USE_BLOCK_CACHE
    enable_chunked_prefill: bool = True
    # MAX_NUM_PARTIAL_PREFILLS: prompts whose prefill spans several steps, at once; a prompt that
    # would be the next one waits, and shorter prompts that fit a step whole pass it
    max_num_partial_prefills: int = 1
    # LONG_PREFILL_TOKEN_THRESHOLD: next to running decodes, a prompt with more tokens left than this
    # is prefilled in chunks of this many per step, so the decodes' inter-token latency stays nearer a
    # plain decode step's; a prompt running alone takes the whole budget. 0 (the default, as vLLM's):
    # no cap. On the H200, 256 held 32 streams' ITL p99 to 6x their own during a 32k prefill, but it
    # also slows long prompts that arrive together (each waits its turn at 256 tokens a step while
    # the earlier ones decode): docs/benchmarks.md, long contexts
    long_prefill_token_threshold: int = 0
    concurrency_limit: int = 32
    # launch decode step N+1 before reading step N back (engine/overlap.py); None: on CUDA devices
    overlap_scheduling: Optional[bool] = None
    # ENGINE_PROCESS: the engine core in its own process (the product path); False runs it on a
    # thread of the caller's process (debugging, tests that drive or inspect the core)
    engine_process: bool = True
    # ENGINE_STEP_TIMEOUT_S: with requests live, a core that sends nothing for this long is hung
    step_timeout_s: float = 120.0
    # KV_CACHE_DTYPE: "auto" (the model's dtype), "int8" (INT8_KV_CACHE=1) or "fp8" (e4m3), each
    # quantized per token and KV head as it is written (ops/kv_cache.py, docs/Quantization.md)
    kv_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"KV_CACHE_DTYPE: expected one of {list(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.long_prefill_token_threshold < 0:
            raise ValueError(f"LONG_PREFILL_TOKEN_THRESHOLD must be >= 0, got {self.long_prefill_token_threshold}")
        for name in ("max_num_batched_tokens", "max_num_seqs", "concurrency_limit", "max_num_partial_prefills"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.kv_cache_mem_mb is not None and self.kv_cache_mem_mb <= 0:
            raise ValueError(f"KV_CACHE_MEM_MB must be positive, got {self.kv_cache_mem_mb}")
        if self.step_timeout_s <= 0:
            raise ValueError(f"ENGINE_STEP_TIMEOUT_S must be positive, got {self.step_timeout_s}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 2:
            raise ValueError(f"num_kv_blocks must be >= 2, got {self.num_kv_blocks}")

    @classmethod
    def from_env(cls, env: Optional[Mapping[str, str]] = None) -> "EngineConfig":
        env = os.environ if env is None else env
        return cls(
            max_num_batched_tokens=env_int(env, "MAX_NUM_BATCHED_TOKENS", 2048),
            max_num_seqs=env_int(env, "MAX_NUM_SEQS", 64),
            kv_cache_mem_mb=env_int(env, "KV_CACHE_MEM_MB", None),
            enable_prefix_cache=env_bool(env, "USE_BLOCK_CACHE", True),
            enable_chunked_prefill=env_bool(env, "ENABLE_CHUNKED_PREFILL", True),
            max_num_partial_prefills=env_int(env, "MAX_NUM_PARTIAL_PREFILLS", 1),
            long_prefill_token_threshold=env_int(env, "LONG_PREFILL_TOKEN_THRESHOLD", 0),
            concurrency_limit=env_int(env, "CONCURRENCY_LIMIT", 32),
            overlap_scheduling=env_bool(env, "OVERLAP_SCHEDULING", True) if env.get("OVERLAP_SCHEDULING") else None,
            engine_process=env_bool(env, "ENGINE_PROCESS", True),
            step_timeout_s=float(env_int(env, "ENGINE_STEP_TIMEOUT_S", 120)),
            kv_cache_dtype=_kv_cache_dtype_from_env(env),
        )


def _kv_cache_dtype_from_env(env: Mapping[str, str]) -> str:
    """KV_CACHE_DTYPE, or rtp-llm's INT8_KV_CACHE=1 for "int8"; the two must not disagree."""
    chosen = (env.get("KV_CACHE_DTYPE") or "auto").strip().lower()
    if env_bool(env, "INT8_KV_CACHE", False):
        if chosen not in ("auto", "int8"):
            raise ValueError(f"INT8_KV_CACHE=1 and KV_CACHE_DTYPE={chosen} disagree: set one of them")
        return "int8"
    return chosen
