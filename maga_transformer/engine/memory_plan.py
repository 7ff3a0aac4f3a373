"""How many KV blocks the cache gets: KV_CACHE_MEM_MB when given, else a share of free memory.

On CPU the default is a share of available host memory. On CUDA the plan follows vLLM's: with the
weights loaded, one profiling forward pass of the largest step the scheduler may build
(max_num_batched_tokens tokens) measures the activation peak; the KV cache gets what is left of
`gpu_memory_utilization` of the card after weights, that peak, memory outside torch, and a reserve
for the CUDA-graph pool. The number of tokens that fit is logged at start-up.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch

from maga_transformer.config.engine_config import EngineConfig
from maga_transformer.models.decoder import DecoderModel
from maga_transformer.ops.kv_cache import kv_element_bytes

logger = logging.getLogger(__name__)

DEFAULT_CPU_KV_SHARE = 0.10  # of available host memory, when KV_CACHE_MEM_MB is not given
DEFAULT_CPU_KV_CAP_MB = 4096
GPU_MEMORY_UTILIZATION = 0.90  # share of the card the engine may take in all
CUDA_GRAPH_RESERVE_MB = 1024  # graph pool: static outputs ([batch, vocab] fp32 logits) per bucket
MIN_KV_BLOCKS = 2  # the floor EngineConfig.num_kv_blocks keeps too
MIB = 1 << 20


def kv_bytes_per_block(model: DecoderModel, block_size: int, kv_cache_dtype: str = "auto") -> int:
    arch = model.arch
    per_head = kv_element_bytes(model.dtype, kv_cache_dtype, arch.head_dim)
    return int(2 * arch.num_layers * block_size * arch.num_kv_heads * per_head)


def _available_host_mb() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 8192


@dataclass(frozen=True)
class GpuBudget:
    """The KV cache's share of a GPU, with every term that went into it (for the log and the error)."""

    total_mb: float  # the card
    used_mb: float  # in use after loading: weights, the CUDA context, other processes
    activation_peak_mb: float  # the profiled largest step
    graph_reserve_mb: float  # CUDA-graph pool
    utilization: float  # share of the card the engine may take in all

    @property
    def kv_mb(self) -> int:
        """What is left for the KV cache; negative when the other terms already exceed the share."""
        usable = self.total_mb * self.utilization
        return math.floor(usable - self.used_mb - self.activation_peak_mb - self.graph_reserve_mb)

    def describe(self) -> str:
        return (f"GPU total {self.total_mb / 1024:.1f} GiB, of which the engine may use {self.utilization:.0%} "
                f"({self.total_mb * self.utilization / 1024:.1f} GiB); in use by weights, the CUDA context and "
                f"other processes {self.used_mb / 1024:.2f} GiB; activation peak of the largest step "
                f"{self.activation_peak_mb / 1024:.2f} GiB; CUDA-graph reserve {self.graph_reserve_mb / 1024:.2f} GiB; "
                f"left for the KV cache {self.kv_mb} MiB")


def gpu_budget(total_bytes: int, free_bytes: int, activation_peak_bytes: int, graph_reserve_mb: int,
               utilization: float = GPU_MEMORY_UTILIZATION) -> GpuBudget:
    """The KV budget from what torch.cuda.mem_get_info and the profiling pass measured (pure, so testable).

    `free_bytes` is read after the profile pass with torch's cache emptied, so total - free is what
    stays resident: weights, the CUDA context, and whatever other processes hold on the card.
    """
    return GpuBudget(total_mb=total_bytes / MIB, used_mb=(total_bytes - free_bytes) / MIB,
                     activation_peak_mb=activation_peak_bytes / MIB, graph_reserve_mb=float(graph_reserve_mb),
                     utilization=utilization)


def _measure_cuda_budget(device: torch.device, profile: Callable[[], None], graph_reserve_mb: int) -> GpuBudget:
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    profile()
    torch.cuda.synchronize(device)
    activation_peak = torch.cuda.max_memory_allocated(device) - before
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    budget = gpu_budget(total, free, activation_peak, graph_reserve_mb)
    logger.info("KV cache plan: %s", budget.describe())
    return budget


def _block_mb(bytes_per_block: int) -> str:
    # small models' blocks are a few KiB, which "0.00 MiB" would hide
    if bytes_per_block < MIB:
        return f"{bytes_per_block / 1024:.1f} KiB"
    return f"{bytes_per_block / MIB:.2f} MiB"


def blocks_for_user_budget(kv_cache_mem_mb: int, bytes_per_block: int, block_size: int) -> int:
    """KV blocks in a user-given KV_CACHE_MEM_MB; raises ValueError naming it when fewer than 2 fit."""
    num_blocks = kv_cache_mem_mb * MIB // bytes_per_block
    if num_blocks < MIN_KV_BLOCKS:
        needed_mb = math.ceil(MIN_KV_BLOCKS * bytes_per_block / MIB)
        raise ValueError(f"KV_CACHE_MEM_MB={kv_cache_mem_mb} holds {num_blocks} KV block(s) of {block_size} tokens "
                         f"({_block_mb(bytes_per_block)} each for this model); at least {MIN_KV_BLOCKS} are needed: "
                         f"set KV_CACHE_MEM_MB to {needed_mb} or more")
    return int(num_blocks)


def blocks_for_gpu_budget(budget: GpuBudget, bytes_per_block: int, block_size: int, cfg: EngineConfig) -> int:
    """KV blocks in a computed GPU budget; when fewer than 2 fit, says where the memory went and what to set.

    `cfg` only names the current MAX_NUM_BATCHED_TOKENS / MAX_NUM_SEQS, which size the activation peak.
    """
    num_blocks = max(budget.kv_mb, 0) * MIB // bytes_per_block
    if num_blocks < MIN_KV_BLOCKS:
        raise ValueError(f"cannot plan the KV cache: too little free GPU memory. {budget.describe()}, fewer than "
                         f"{MIN_KV_BLOCKS} KV blocks of {block_size} tokens ({_block_mb(bytes_per_block)} each). "
                         f"Set KV_CACHE_MEM_MB (MiB for the KV cache, bypassing this plan), lower "
                         f"MAX_NUM_BATCHED_TOKENS (now {cfg.max_num_batched_tokens}) or MAX_NUM_SEQS "
                         f"(now {cfg.max_num_seqs}) for a smaller activation peak, or free the GPU "
                         f"(memory other processes hold counts as in use)")
    return int(num_blocks)


def blocks_for_host_budget(budget_mb: int, available_mb: int, bytes_per_block: int, block_size: int) -> int:
    """KV blocks in the default share of host memory; when fewer than 2 fit, names KV_CACHE_MEM_MB."""
    num_blocks = budget_mb * MIB // bytes_per_block
    if num_blocks < MIN_KV_BLOCKS:
        raise ValueError(f"cannot plan the KV cache: {DEFAULT_CPU_KV_SHARE:.0%} of the {available_mb} MiB of "
                         f"available host memory is {budget_mb} MiB, fewer than {MIN_KV_BLOCKS} KV blocks of "
                         f"{block_size} tokens ({_block_mb(bytes_per_block)} each). Set KV_CACHE_MEM_MB, or free "
                         f"host memory")
    return int(num_blocks)


def plan_num_blocks(model: DecoderModel, block_size: int, cfg: EngineConfig,
                    profile: Callable[[], None] = lambda: None, graph_reserve_mb: int = 0) -> int:
    """`profile` runs the largest forward step (CUDA only); its activation peak is kept free."""
    if cfg.num_kv_blocks is not None:
        return cfg.num_kv_blocks
    bytes_per_block = kv_bytes_per_block(model, block_size, cfg.kv_cache_dtype)
    if cfg.kv_cache_mem_mb is not None:
        return blocks_for_user_budget(cfg.kv_cache_mem_mb, bytes_per_block, block_size)
    if model.device.type == "cuda":
        budget = _measure_cuda_budget(model.device, profile, graph_reserve_mb)
        return blocks_for_gpu_budget(budget, bytes_per_block, block_size, cfg)
    available_mb = _available_host_mb()
    budget_mb = min(int(available_mb * DEFAULT_CPU_KV_SHARE), DEFAULT_CPU_KV_CAP_MB)
    return blocks_for_host_budget(budget_mb, available_mb, bytes_per_block, block_size)
