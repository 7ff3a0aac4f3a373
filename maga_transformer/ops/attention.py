"""Paged attention over a flat variable-length batch.

The batch is the form the GPU kernels take: queries of all sequences concatenated ([tokens, heads,
head_dim]), each sequence's keys/values living in KV blocks named by its block table. The torch
reference gathers each sequence's keys into a padded tensor and runs SDPA with a causal + length
mask. Decode rows (one query) and prefill rows are padded separately so that one long prompt does
not inflate the work of every decode in the same step.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F


@dataclass
class _PaddedGroup:
    """Sequences padded together: gather indices and the mask, built once per step."""

    query_index: torch.Tensor  # [G, Lq] flat token index of each padded query (0 where padding)
    query_valid: torch.Tensor  # [G, Lq] bool
    key_slots: torch.Tensor  # [G, Lk] KV slot of each padded key (0 where padding)
    mask: torch.Tensor  # [G, 1, Lq, Lk] bool, True = attend
    in_order: bool  # no padding and the batch's own token order: the output needs no scatter


@dataclass
class AttentionMetadata:
    """Per-step description of the flat batch, shared by every layer."""

    query_lens: List[int]
    context_lens: List[int]  # tokens already in the cache before this step, per sequence
    block_tables: List[List[int]]
    block_size: int
    num_tokens: int
    groups: List[_PaddedGroup] = field(default_factory=list)


def build_attention_metadata(query_lens: Sequence[int], context_lens: Sequence[int],
                             block_tables: Sequence[Sequence[int]], block_size: int,
                             device: torch.device, sliding_window: Optional[int] = None) -> AttentionMetadata:
    meta = AttentionMetadata(list(query_lens), list(context_lens), [list(b) for b in block_tables],
                             block_size, int(sum(query_lens)))
    starts = [0]
    for q in query_lens:
        starts.append(starts[-1] + q)
    decode = [i for i, q in enumerate(query_lens) if q == 1]
    prefill = [i for i, q in enumerate(query_lens) if q > 1]
    for members in (decode, prefill):
        if members:
            meta.groups.append(_build_group(meta, members, starts, device, sliding_window))
    return meta


def _build_group(meta: AttentionMetadata, members: List[int], starts: List[int], device: torch.device,
                 sliding_window: Optional[int]) -> _PaddedGroup:
    max_q = max(meta.query_lens[i] for i in members)
    max_k = max(meta.context_lens[i] + meta.query_lens[i] for i in members)
    query_index = torch.zeros(len(members), max_q, dtype=torch.long)
    query_valid = torch.zeros(len(members), max_q, dtype=torch.bool)
    key_slots = torch.zeros(len(members), max_k, dtype=torch.long)
    key_len = torch.zeros(len(members), 1, dtype=torch.long)
    query_pos = torch.zeros(len(members), max_q, dtype=torch.long)
    for row, i in enumerate(members):
        q_len, ctx = meta.query_lens[i], meta.context_lens[i]
        query_index[row, :q_len] = torch.arange(starts[i], starts[i] + q_len)
        query_valid[row, :q_len] = True
        query_pos[row, :q_len] = torch.arange(ctx, ctx + q_len)
        key_slots[row, :ctx + q_len] = _slots(meta.block_tables[i], meta.block_size, ctx + q_len)
        key_len[row] = ctx + q_len
    key_pos = torch.arange(max_k).view(1, 1, max_k)
    mask = (key_pos <= query_pos.unsqueeze(-1)) & (key_pos < key_len.unsqueeze(-1))
    if sliding_window is not None:
        mask &= (query_pos.unsqueeze(-1) - key_pos) < sliding_window
    mask &= query_valid.unsqueeze(-1)
    # A fully masked padding row would give NaN from softmax; let it see key 0 (result discarded).
    mask[..., 0] |= ~query_valid
    in_order = bool(query_valid.all()) and len(members) * max_q == meta.num_tokens and bool(
        (query_index.flatten() == torch.arange(meta.num_tokens)).all())
    return _PaddedGroup(query_index.to(device), query_valid.to(device), key_slots.to(device),
                        mask.unsqueeze(1).to(device), in_order)


def _slots(block_table: Sequence[int], block_size: int, length: int) -> torch.Tensor:
    blocks = torch.tensor(block_table[: (length + block_size - 1) // block_size], dtype=torch.long)
    slots = (blocks.unsqueeze(1) * block_size + torch.arange(block_size)).flatten()
    return slots[:length]


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                    scale: float) -> torch.Tensor:
    """q: [tokens, heads, head_dim] (the step's keys/values are already written to the cache).

    Returns [tokens, heads, head_dim]. Causal within each sequence, over all its cached tokens.
    """
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    flat_k = k_cache.view(-1, num_kv_heads, head_dim)
    flat_v = v_cache.view(-1, num_kv_heads, head_dim)
    out = None
    for group in meta.groups:
        if group.in_order:  # row-major [G, Lq] already: a view, no gather
            qg = q.view(*group.query_index.shape, num_heads, head_dim).transpose(1, 2)  # [G, H, Lq, D]
        else:
            qg = q[group.query_index].transpose(1, 2)
        kg = flat_k[group.key_slots].transpose(1, 2).to(q.dtype)  # [G, KVH, Lk, D]
        vg = flat_v[group.key_slots].transpose(1, 2).to(q.dtype)
        og = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=group.mask, scale=scale,
                                            enable_gqa=num_kv_heads != num_heads).transpose(1, 2)
        if group.in_order:
            return og.reshape(q.shape)  # the only group, already in the batch's layout
        if out is None:
            out = torch.empty_like(q)
        out[group.query_index[group.query_valid]] = og[group.query_valid]
    return out
