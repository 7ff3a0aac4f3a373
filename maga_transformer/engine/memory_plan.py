"""How many KV blocks the cache gets: KV_CACHE_MEM_MB when given, else a share of free memory.

On CPU the default is a share of available host memory. On CUDA the plan follows vLLM's: with the
weights loaded, one profiling forward pass of the largest step the scheduler may build
(max_num_batched_tokens tokens) measures the activation peak; the KV cache gets what is left of
`gpu_memory_utilization` of the card after weights, that peak, memory outside torch, and a reserve
for the CUDA-graph pool. The number of tokens that fit is logged at start-up.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch

from maga_transformer.config.engine_config import EngineConfig
from maga_transformer.models.decoder import DecoderModel

logger = logging.getLogger(__name__)

DEFAULT_CPU_KV_SHARE = 0.10  # of available host memory, when KV_CACHE_MEM_MB is not given
DEFAULT_CPU_KV_CAP_MB = 4096
GPU_MEMORY_UTILIZATION = 0.90  # share of the card the engine may take in all
CUDA_GRAPH_RESERVE_MB = 1024  # graph pool: static outputs ([batch, vocab] fp32 logits) per bucket


def kv_bytes_per_block(model: DecoderModel, block_size: int) -> int:
    arch = model.arch
    element = torch.tensor([], dtype=model.dtype).element_size()
    return 2 * arch.num_layers * block_size * arch.num_kv_heads * arch.head_dim * element


def _available_host_mb() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 8192


def _cuda_budget_mb(device: torch.device, profile: Callable[[], None], graph_reserve_mb: int) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    profile()
    torch.cuda.synchronize(device)
    activation_peak = torch.cuda.max_memory_allocated(device) - before
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    used = total - free  # weights, the CUDA context, other processes
    budget = total * GPU_MEMORY_UTILIZATION - used - activation_peak - graph_reserve_mb * (1 << 20)
    logger.info("GPU memory: %.1f GiB in all, %.1f GiB used (weights, context), activation peak %.2f GiB",
                total / 2**30, used / 2**30, activation_peak / 2**30)
    return int(budget // (1 << 20))


def plan_num_blocks(model: DecoderModel, block_size: int, cfg: EngineConfig,
                    profile: Callable[[], None] = lambda: None, graph_reserve_mb: int = 0) -> int:
    """`profile` runs the largest forward step (CUDA only); its activation peak is kept free."""
    if cfg.num_kv_blocks is not None:
        return cfg.num_kv_blocks
    if cfg.kv_cache_mem_mb is not None:
        budget_mb = cfg.kv_cache_mem_mb
    elif model.device.type == "cuda":
        budget_mb = _cuda_budget_mb(model.device, profile, graph_reserve_mb)
    else:
        budget_mb = min(int(_available_host_mb() * DEFAULT_CPU_KV_SHARE), DEFAULT_CPU_KV_CAP_MB)
    num_blocks = budget_mb * (1 << 20) // kv_bytes_per_block(model, block_size)
    if num_blocks < 2:
        raise ValueError(f"KV_CACHE_MEM_MB={budget_mb} holds fewer than 2 KV blocks of {block_size} tokens")
    return int(num_blocks)
