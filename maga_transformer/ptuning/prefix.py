"""The P-tuning prefix as KV blocks: computed once at start-up, written into the first blocks of the
pool, held by the engine for its whole life (never freed, never evicted), and placed at the head of
every request's block table (engine/kv_cache_manager.py attaches it wherever a sequence gets its
blocks). The prefix does not count toward a request's length: its tokens stand in the sequence as
placeholders (already computed), and positions start at 0 after it (ChatGLM2: the prefix keys are
not rotated, the prompt's positions are 0, 1, ...).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch

from maga_transformer import ops

PLACEHOLDER = 0  # token id standing for a prefix position; never computed, never sampled from


@dataclass(frozen=True)
class FixedPrefix:
    length: int  # pre_seq_len
    blocks: List[int]  # the pool's blocks holding it, in order


def prefix_blocks(length: int, block_size: int) -> List[int]:
    """Blocks 0..n-1 of a fresh pool (every rank of a tensor-parallel group writes the same ones)."""
    if length % block_size:
        raise ValueError(f"P-tuning: pre_seq_len ({length}) must be a multiple of SEQ_SIZE_PER_BLOCK "
                         f"({block_size}); its blocks are shared by every request")
    return list(range(length // block_size))


def write_prefix(model, kv_caches, past: torch.Tensor, blocks: List[int], block_size: int) -> None:
    """The family's per-layer prefix keys and values (its own layout, this rank's heads) into blocks."""
    layers = model.ptuning_kv(past)
    length = past.shape[0]
    slots = torch.tensor([b * block_size + o for b in blocks for o in range(block_size)][:length],
                         dtype=torch.long, device=model.device)
    for (k, v), (k_cache, v_cache) in zip(layers, kv_caches):
        ops.write_kv_cache(k.to(device=model.device, dtype=model.dtype).contiguous(),
                           v.to(device=model.device, dtype=model.dtype).contiguous(), k_cache, v_cache, slots)
