"""What crosses between the front end and the engine core: token ids and numbers, never text.

The front end (server or Pipeline: tokenize, validate, detokenize, stop strings) sends requests,
aborts and stops; the core sends back ONE `CoreStepOutput` per engine step, whatever the number of
requests in it. The hot part of that message, one `SeqDelta` per sequence that moved, is a plain
tuple: pickling a tuple of ints is several times cheaper than pickling a dataclass, and at a batch
of 256 it is sent every few milliseconds. Everything else is rare (one per request) and typed.
Large outputs (logits, hidden states) travel as numpy arrays: pickle copies their buffers whole,
with no per-element Python work.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from maga_transformer.config.generate_config import GenerateConfig
from maga_transformer.lora.messages import LoraUpdateResult

# (request_id, sequence index, new token ids, their log-probs, their top log-probs [[(id, logprob)]]
#  or None, finish reason value or None, beam score or None). A beam delta (score not None) carries
# the beam's whole output so far: beams are re-chosen every step, so they do not extend.
SeqDelta = Tuple[str, int, List[int], List[float], Optional[list], Optional[str], Optional[float]]


@dataclass
class EngineRequest:
    """A validated request as the core receives it. stream=False: the core sends its tokens only
    when it finishes, unless stop strings need the text of every step."""
    request_id: str
    prompt_token_ids: List[int]
    config: GenerateConfig
    stream: bool = True

    @property
    def emits_every_step(self) -> bool:
        return self.stream or bool(self.config.stop_words_str)


@dataclass
class RequestFinal:
    """What only the core knows about a finished request (the tokens came as deltas)."""
    request_id: str
    cost_time_ms: float
    iter_count: int
    reuse_len: int
    num_preemptions: int
    first_token_time_ms: Optional[float]
    loss: Any = None  # float (calculate_loss=1) or a numpy array of per-token NLLs (2)
    logits: Dict[int, Any] = field(default_factory=dict)  # sequence index -> numpy row of the last step
    hidden: Dict[int, Any] = field(default_factory=dict)
    beams: Optional[List[Tuple[List[int], float]]] = None  # finished hypotheses, best first
    error: Optional[str] = None


@dataclass
class EngineStats:
    """The gauges /metrics and /worker_status read, as of the end of the step."""
    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    num_free_blocks: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_steps: int = 0  # steps run so far (a step that only applied aborts counts too)
    num_resident_blocks: int = 0  # task prompts' blocks (MULTI_TASK_PROMPT), held by the engine for good


@dataclass
class CoreStepOutput:
    deltas: List[SeqDelta] = field(default_factory=list)
    finals: List[RequestFinal] = field(default_factory=list)
    started: List[Tuple[str, int]] = field(default_factory=list)  # (request id, reuse_len) at first output
    stats: Optional[EngineStats] = None
    lora_results: List[LoraUpdateResult] = field(default_factory=list)  # LoRA commands that completed

    @property
    def is_empty(self) -> bool:
        return not (self.deltas or self.finals or self.lora_results)


@dataclass
class EngineInfo:
    """The engine's limits, sent once at start-up: what the front end validates requests against."""
    vocab_size: int
    max_seq_len: int
    block_size: int
    num_blocks: int
    max_num_batched_tokens: int
    enable_chunked_prefill: bool
    eos_token_ids: List[int]
    description: str = ""  # device, dtype, KV tokens: the start-up log line
    adapters: Dict[str, str] = field(default_factory=dict)  # LoRA adapters served at start-up: name -> path
    lora_merged: bool = False  # LORA_MERGE=1: the one adapter is in the weights
    ptuning_prefix_len: int = 0  # P-tuning: the prefix positions every request starts with
