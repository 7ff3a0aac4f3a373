"""Paged attention over a flat variable-length batch.

The batch is the form the GPU kernels take: queries of all sequences concatenated ([tokens, heads,
head_dim]), each sequence's keys/values living in KV blocks named by its block table. The torch
reference gathers each sequence's keys into a padded tensor and runs SDPA with a causal + length
mask. Decode rows (one query) and prefill rows are padded separately so that one long prompt does
not inflate the work of every decode in the same step.

On CUDA, a step whose every sequence decodes (one query each) runs the paged decode kernel
(src/kernels/cuda/paged_decode_attention.cu, flash-decoding over 64-token partitions). In a step
that mixes decodes and prompt chunks, the decode rows take the same kernel and the prompt rows
flash attention's varlen kernel (ops/flash_prefill.py: no padding, no mask tensor), or the torch
reference (padded groups through SDPA) where flash does not apply (GLM's bidirectional prompt, fp32).

ALiBi (Bloom, MPT, Falcon-alibi, Baichuan-13B) adds slope[h] * (key_pos - query_pos) to the
scores; only the torch reference implements it, so paged_attention never dispatches to the decode
kernel when slopes are given.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from maga_transformer.ops._cpu import cpu_kernels_for
from maga_transformer.ops._cuda import KERNEL_DTYPES, aligned, check_status, kernels_for, same_device
from maga_transformer.ops.flash_prefill import FlashPrefillPlan, flash_prefill, flash_prefill_applies
from maga_transformer.ops.kv_cache import QuantizedKV, read_kv


@dataclass
class _PaddedGroup:
    """Sequences padded together: gather indices built once per step (the mask when first needed)."""

    query_index: torch.Tensor  # [G, Lq] flat token index of each padded query (0 where padding)
    query_valid: torch.Tensor  # [G, Lq] bool
    key_slots: torch.Tensor  # [G, Lk] KV slot of each padded key (0 where padding)
    query_pos: torch.Tensor  # [G, Lq] position of each padded query in its sequence (ALiBi distances)
    key_len: torch.Tensor  # [G, 1] keys of each sequence (cached + this step's)
    both_ways: torch.Tensor  # [G, 1, 1] keys every query of the row sees (GLM v1's prompt), else 0
    in_order: bool  # no padding and the batch's own token order: the output needs no scatter
    # where each real query's output goes (flat batch index) and where it is in the padded [G * Lq]
    # output: index tensors built on the host with the group, so the scatter needs no boolean mask
    # (whose nonzero() syncs the device in every layer and stalls the launch queue)
    scatter_dst: Optional[torch.Tensor] = None
    scatter_src: Optional[torch.Tensor] = None
    # fresh prompts of one length, no window in reach: the mask is plain causal, and SDPA's is_causal
    # (flash attention, no mask tensor to read) computes the same
    plain_causal: bool = False
    sliding_window: Optional[int] = None
    mask: Optional[torch.Tensor] = None  # [G, 1, Lq, Lk] bool, True = attend: see attention_mask()
    alibi: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # (slopes, float mask): every layer reuses it

    def attention_mask(self) -> torch.Tensor:
        """Built on the group's device from its [G, Lq] positions, once per step, and only for groups
        that need it: a host-built mask cost 1.7 ms for one 1,024-token prompt and 26 ms at 4,096
        (plus its copy), for a plain causal prefill that reads no mask at all."""
        if self.mask is None:
            key_pos = torch.arange(self.key_slots.shape[1], device=self.key_slots.device).view(1, 1, -1)
            query_pos = self.query_pos.unsqueeze(-1)
            mask = ((key_pos <= query_pos) | (key_pos < self.both_ways)) & (key_pos < self.key_len.unsqueeze(-1))
            if self.sliding_window is not None:
                mask &= (query_pos - key_pos) < self.sliding_window
            mask &= self.query_valid.unsqueeze(-1)
            # A fully masked padding row would give NaN from softmax; let it see key 0 (result discarded).
            mask[..., 0] |= ~self.query_valid
            self.mask = mask.unsqueeze(1)
        return self.mask


@dataclass
class AttentionMetadata:
    """Per-step description of the flat batch, shared by every layer."""

    query_lens: List[int]
    context_lens: List[int]  # tokens already in the cache before this step, per sequence
    block_tables: List[List[int]]
    block_size: int
    num_tokens: int
    device: torch.device = torch.device("cpu")
    sliding_window: Optional[int] = None
    # GLM v1 (models/glm.py): per sequence, the first n tokens attend to each other in both
    # directions (the prompt before <sop>); None or 0 = plain causal
    bidirectional_lens: Optional[List[int]] = None
    # Built on first use: the padded groups for the reference, the block tables for the kernel.
    groups: Optional[List[_PaddedGroup]] = None
    decode: Optional["DecodeTensors"] = None
    mixed: Optional["MixedTensors"] = None
    # (plan, decode rows apart on the decode kernel); plan None: flash refused this step
    flash: Optional[Tuple[Optional[FlashPrefillPlan], bool]] = None


@dataclass
class DecodeTensors:
    """An all-decode step in the decode kernel's form, built once per step and shared by layers."""

    block_tables: torch.Tensor  # [seqs, max_blocks] int32 on the device, zero padded
    seq_lens: torch.Tensor  # [seqs] int32: cached tokens + this step's token
    max_partitions: int


@dataclass
class MixedTensors:
    """A step with decode and prefill rows, split for a decode kernel (CUDA or CPU): the decode rows
    go to the kernel (no padded gather of their whole contexts), the prompt rows to the padded groups."""

    decode_rows: torch.Tensor  # [decodes] long: flat token index of each decode row
    decode: DecodeTensors
    prefill_groups: List[_PaddedGroup]


def build_attention_metadata(query_lens: Sequence[int], context_lens: Sequence[int],
                             block_tables: Sequence[Sequence[int]], block_size: int,
                             device: torch.device, sliding_window: Optional[int] = None,
                             bidirectional_lens: Optional[Sequence[int]] = None) -> AttentionMetadata:
    return AttentionMetadata(list(query_lens), list(context_lens), [list(b) for b in block_tables], block_size,
                             int(sum(query_lens)), torch.device(device), sliding_window,
                             list(bidirectional_lens) if bidirectional_lens is not None else None)


def _starts(query_lens: Sequence[int]) -> List[int]:
    starts = [0]
    for q in query_lens:
        starts.append(starts[-1] + q)
    return starts


def _decode_and_prefill_members(meta: AttentionMetadata) -> Tuple[List[int], List[int]]:
    decode = [i for i, q in enumerate(meta.query_lens) if q == 1]
    return decode, [i for i, q in enumerate(meta.query_lens) if q > 1]


def _padded_groups(meta: AttentionMetadata) -> List[_PaddedGroup]:
    if meta.groups is None:
        starts = _starts(meta.query_lens)
        meta.groups = [_build_group(meta, members, starts, meta.device, meta.sliding_window)
                       for members in _decode_and_prefill_members(meta) if members]
    return meta.groups


def _build_group(meta: AttentionMetadata, members: List[int], starts: List[int], device: torch.device,
                 sliding_window: Optional[int]) -> _PaddedGroup:
    max_q = max(meta.query_lens[i] for i in members)
    max_k = max(meta.context_lens[i] + meta.query_lens[i] for i in members)
    query_index = torch.zeros(len(members), max_q, dtype=torch.long)
    query_valid = torch.zeros(len(members), max_q, dtype=torch.bool)
    key_slots = torch.zeros(len(members), max_k, dtype=torch.long)
    key_len = torch.zeros(len(members), 1, dtype=torch.long)
    query_pos = torch.zeros(len(members), max_q, dtype=torch.long)
    both_ways = torch.zeros(len(members), 1, 1, dtype=torch.long)  # keys every query of the row sees
    for row, i in enumerate(members):
        q_len, ctx = meta.query_lens[i], meta.context_lens[i]
        query_index[row, :q_len] = torch.arange(starts[i], starts[i] + q_len)
        query_valid[row, :q_len] = True
        query_pos[row, :q_len] = torch.arange(ctx, ctx + q_len)
        key_slots[row, :ctx + q_len] = _slots(meta.block_tables[i], meta.block_size, ctx + q_len)
        key_len[row] = ctx + q_len
        if meta.bidirectional_lens:
            both_ways[row] = meta.bidirectional_lens[i]
    in_order = bool(query_valid.all()) and len(members) * max_q == meta.num_tokens and bool(
        (query_index.flatten() == torch.arange(meta.num_tokens)).all())
    plain_causal = (all(meta.context_lens[i] == 0 and meta.query_lens[i] == max_q for i in members)
                    and (sliding_window is None or sliding_window >= max_q) and int(both_ways.max()) <= 1)
    flat_valid = query_valid.flatten()
    scatter_src = torch.arange(flat_valid.numel())[flat_valid]
    scatter_dst = query_index.flatten()[flat_valid]
    return _PaddedGroup(query_index.to(device), query_valid.to(device), key_slots.to(device), query_pos.to(device),
                        key_len.to(device), both_ways.to(device), in_order, scatter_dst.to(device),
                        scatter_src.to(device), plain_causal, sliding_window)


def _slots(block_table: Sequence[int], block_size: int, length: int) -> torch.Tensor:
    blocks = torch.tensor(block_table[: (length + block_size - 1) // block_size], dtype=torch.long)
    slots = (blocks.unsqueeze(1) * block_size + torch.arange(block_size)).flatten()
    return slots[:length]


def build_flash_prefill_plan(query_lens: Sequence[int], context_lens: Sequence[int],
                             block_tables: Sequence[Sequence[int]], block_size: int, members: List[int],
                             device: torch.device) -> FlashPrefillPlan:
    """`members` (indices into the step's sequences) in flash's varlen form: host-built index
    tensors (their rows, every key's slot, cumulative lengths), copied to the device once."""
    starts = _starts(query_lens)
    rows = [torch.arange(starts[i], starts[i] + query_lens[i]) for i in members]
    key_lens = [context_lens[i] + query_lens[i] for i in members]
    slots = [_slots(block_tables[i], block_size, k) for i, k in zip(members, key_lens)]
    in_order = list(members) == list(range(len(query_lens)))
    return FlashPrefillPlan(
        rows=None if in_order else torch.cat(rows).to(device),
        key_slots=torch.cat(slots).to(device),
        cu_q=torch.tensor(_starts([query_lens[i] for i in members]), dtype=torch.int32).to(device),
        cu_k=torch.tensor(_starts(key_lens), dtype=torch.int32).to(device),
        max_q=max(query_lens[i] for i in members),
        max_k=max(key_lens))


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """The ALiBi paper's per-head slopes (Bloom's build_alibi_tensor): a geometric series over the
    closest power of two of heads, the remaining heads taking every other slope of the next power."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = [base ** power for power in range(1, closest + 1)]
    if closest != num_heads:
        extra_base = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        slopes += [extra_base ** power for power in range(1, 2 * (num_heads - closest), 2)]
    return torch.tensor(slopes, dtype=torch.float32)


def _alibi_mask(group: _PaddedGroup, slopes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Float mask [G, H, Lq, Lk]: slope * (key_pos - query_pos) where attended, -inf elsewhere. Softmax is
    shift-invariant per row, so this equals Bloom's slope * key_pos and MPT's slope * (key_pos - last)."""
    if group.alibi is not None and group.alibi[0] is slopes and group.alibi[1].dtype == dtype:
        return group.alibi[1]
    max_k = group.key_slots.shape[1]
    key_pos = torch.arange(max_k, device=slopes.device).view(1, 1, max_k)
    distance = (key_pos - group.query_pos.unsqueeze(-1)).float()  # [G, Lq, Lk]
    bias = slopes.float().view(1, -1, 1, 1) * distance.unsqueeze(1)
    group.alibi = (slopes, bias.masked_fill(~group.attention_mask(), float("-inf")).to(dtype))
    return group.alibi[1]


# cuDNN's attention (which SDPA tries first on Hopper) builds an execution plan for every new shape:
# 0.1-0.4 s each time a step brings a new (group, query, key) size, which made a first token take
# up to seconds on the H100. Flash (no mask) and the memory-efficient kernel (masks) need no plan.
_CUDA_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


_flash_takes_gqa: Optional[bool] = None  # learned on the first GQA causal prefill


def _flash_gqa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> Optional[torch.Tensor]:
    """Causal GQA attention in flash attention itself, without expanding K/V per query head (the
    expansion was ~4 % of an 8,192-token prefill step on the H100); None where flash refuses it."""
    global _flash_takes_gqa
    if _flash_takes_gqa is False:
        return None
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            out = F.scaled_dot_product_attention(q, k, v, scale=scale, is_causal=True, enable_gqa=True)
    except RuntimeError:
        _flash_takes_gqa = False
        return None
    _flash_takes_gqa = True
    return out


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], scale: float,
          causal: bool = False) -> torch.Tensor:
    """Attention of [G, H, Lq, D] queries over [G, KVH, Lk, D] keys and values (GQA when KVH < H):
    under `mask`, or causal (mask None) when Lq == Lk."""
    gqa = k.shape[1] != q.shape[1]
    if not q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, is_causal=causal, enable_gqa=gqa)
    if gqa and causal and mask is None:
        out = _flash_gqa_causal(q, k, v, scale)
        if out is not None:
            return out
    if gqa:  # the memory-efficient kernel takes no GQA flag: give every query head its keys
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    with sdpa_kernel(_CUDA_SDPA_BACKENDS):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, is_causal=causal)


def paged_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              meta: AttentionMetadata, scale: float,
                              alibi_slopes: Optional[torch.Tensor] = None) -> torch.Tensor:
    return _attend_groups(q, k_cache, v_cache, _padded_groups(meta), scale, alibi_slopes, None)


def _attend_groups(q: torch.Tensor, k_cache, v_cache, groups: List[_PaddedGroup], scale: float,
                   alibi_slopes: Optional[torch.Tensor], out: Optional[torch.Tensor]) -> torch.Tensor:
    """Each padded group through SDPA, its rows written into `out` (made when None)."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    for group in groups:
        if group.in_order:  # row-major [G, Lq] already: a view, no gather
            qg = q.view(*group.query_index.shape, num_heads, head_dim).transpose(1, 2)  # [G, H, Lq, D]
        else:
            qg = q[group.query_index].transpose(1, 2)
        kg = read_kv(k_cache, group.key_slots, q.dtype).transpose(1, 2)  # [G, KVH, Lk, D]
        vg = read_kv(v_cache, group.key_slots, q.dtype).transpose(1, 2)
        if alibi_slopes is None and group.plain_causal:
            og = _sdpa(qg, kg, vg, None, scale, causal=True).transpose(1, 2)
        else:
            mask = group.attention_mask() if alibi_slopes is None else _alibi_mask(group, alibi_slopes, q.dtype)
            og = _sdpa(qg, kg, vg, mask, scale).transpose(1, 2)
        if group.in_order:
            return og.reshape(q.shape)  # the only group, already in the batch's layout
        if out is None:
            out = torch.empty_like(q)
        padded = og.reshape(-1, num_heads, head_dim)
        out.index_copy_(0, group.scatter_dst, padded.index_select(0, group.scatter_src))
    return out


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                    scale: float, alibi_slopes: Optional[torch.Tensor] = None) -> torch.Tensor:
    """q: [tokens, heads, head_dim] (the step's keys/values are already written to the cache).

    Returns [tokens, heads, head_dim]. Causal within each sequence, over all its cached tokens.
    alibi_slopes: optional [heads] fp32 on q's device; the bias is added to the scaled scores.
    """
    # The CUDA decode kernel has no ALiBi term: steps with slopes always take the reference.
    kernels = kernels_for(q, _data(k_cache), _data(v_cache)) if alibi_slopes is None else None
    if alibi_slopes is not None and q.is_cuda and torch.cuda.is_current_stream_capturing():
        # the reference reads this step's lengths on the host: a captured graph would replay stale ones
        raise RuntimeError("paged_attention with ALiBi cannot run inside a CUDA graph capture")
    if kernels is not None and _decode_kernel_applies(kernels, q, k_cache, v_cache, meta):
        decode = _decode_tensors(kernels, meta, q.device)
        return paged_decode_attention(q, k_cache, v_cache, decode.block_tables, decode.seq_lens, scale,
                                      decode.max_partitions, meta.sliding_window)
    flash = _flash_prefill_step(kernels, q, k_cache, v_cache, meta, scale, alibi_slopes)
    if flash is not None:
        return flash
    if kernels is not None and _mixed_split_applies(kernels, q, k_cache, v_cache, meta):
        return _mixed_attention(kernels, q, k_cache, v_cache, meta, scale)
    if alibi_slopes is None:
        out = _cpu_decode_attention(q, k_cache, v_cache, meta, scale)
        if out is not None:
            return out
    return paged_attention_reference(q, k_cache, v_cache, meta, scale, alibi_slopes)


def _flash_prefill_step(kernels, q: torch.Tensor, k_cache, v_cache, meta: AttentionMetadata, scale: float,
                        alibi_slopes: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A CUDA step with prompt rows: the prompts through flash's varlen kernel (ops/flash_prefill.py),
    the decode rows beside them through the decode kernel when it applies, else through flash too.
    None when flash does not apply (the padded reference runs)."""
    if meta.flash is not None and meta.flash[0] is None:
        return None  # refused by an earlier layer of this step
    if meta.flash is None:
        if not any(n > 1 for n in meta.query_lens) or not flash_prefill_applies(q, k_cache, meta.bidirectional_lens):
            return None
        decode, prefill = _decode_and_prefill_members(meta)
        split = kernels is not None and bool(decode) and _mixed_split_applies(kernels, q, k_cache, v_cache, meta)
        members = prefill if split else list(range(len(meta.query_lens)))
        plan = build_flash_prefill_plan(meta.query_lens, meta.context_lens, meta.block_tables, meta.block_size,
                                        members, q.device)
        meta.flash = (plan, split)
    plan, split = meta.flash
    prompt_out = flash_prefill(q, k_cache, v_cache, plan, scale, meta.sliding_window, alibi_slopes)
    if prompt_out is None:
        meta.flash = (None, False)
        return None
    if plan.rows is None:
        return prompt_out  # every row, in the batch's order
    out = torch.empty_like(q)
    out.index_copy_(0, plan.rows, prompt_out)
    if split:
        mixed = _split_step(meta, q.device, lambda tables, lens: _build_decode_tensors(
            kernels, tables, lens, meta.sliding_window, q.device), with_groups=False)
        decode = mixed.decode
        out.index_copy_(0, mixed.decode_rows, paged_decode_attention(
            q.index_select(0, mixed.decode_rows), k_cache, v_cache, decode.block_tables, decode.seq_lens, scale,
            decode.max_partitions, meta.sliding_window))
    return out


def _cpu_decode_attention(q: torch.Tensor, k_cache, v_cache, meta: AttentionMetadata,
                          scale: float) -> Optional[torch.Tensor]:
    """The decode rows of a step of fp32 CPU tensors in one call of src/kernels/cpu/decode_ops.cc,
    which reads the keys where they lie in the pages (the reference gathers every sequence's keys
    and values into a padded copy in every layer); prompt rows beside them take the padded groups.
    None when the kernel does not apply."""
    if not q.is_cpu or isinstance(k_cache, QuantizedKV) or isinstance(v_cache, QuantizedKV):
        return None
    kernels = cpu_kernels_for(q, k_cache, v_cache)
    if kernels is None or q.dim() != 3 or k_cache.dim() != 4 or q.shape[0] != meta.num_tokens:
        return None
    head_dim = q.shape[2]
    if not (q.stride(2) == 1 and q.stride(1) == head_dim and k_cache.is_contiguous() and v_cache.is_contiguous()
            and v_cache.shape == k_cache.shape and k_cache.shape[3] == head_dim and q.shape[1] % k_cache.shape[2] == 0):
        return None
    if meta.mixed is None and all(n == 1 for n in meta.query_lens):
        decode = _cpu_decode_tensors(meta)
        return None if decode is None else _cpu_decode_rows(kernels, q, k_cache, v_cache, decode, meta, scale)
    if meta.mixed is None:
        decode, prefill = _decode_and_prefill_members(meta)
        if not decode or not prefill or not _covered(meta, decode):
            return None
    mixed = _split_step(meta, q.device, _host_tables)
    return _attend_split(q, k_cache, v_cache, mixed, scale,
                         lambda rows, tables: _cpu_decode_rows(kernels, rows, k_cache, v_cache, tables, meta, scale))


def _cpu_decode_rows(kernels, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, decode: DecodeTensors,
                     meta: AttentionMetadata, scale: float) -> torch.Tensor:
    out = torch.empty(q.shape, dtype=q.dtype)
    kernels.paged_decode_attention_f32(out, q, k_cache, v_cache, decode.block_tables, decode.seq_lens,
                                       float(scale), int(meta.sliding_window or 0))
    return out


def _host_tables(block_tables: Sequence[List[int]], context_lens: Sequence[int]) -> DecodeTensors:
    """Block tables (zero padded) and key counts (cached + this step's token) as int32 host tensors."""
    width = max(1, max(len(t) for t in block_tables))
    tables = torch.tensor([t + [0] * (width - len(t)) for t in block_tables], dtype=torch.int32)
    return DecodeTensors(tables, torch.tensor([c + 1 for c in context_lens], dtype=torch.int32), 0)


def _cpu_decode_tensors(meta: AttentionMetadata) -> Optional[DecodeTensors]:
    """An all-decode step's tables, built by the first layer; None unless every table covers its keys."""
    if meta.decode is not None and not meta.decode.block_tables.is_cuda:
        return meta.decode
    if not meta.query_lens or not _covered(meta, range(len(meta.query_lens))):
        return None
    meta.decode = _host_tables(meta.block_tables, meta.context_lens)
    return meta.decode


def _covered(meta: AttentionMetadata, members: Sequence[int]) -> bool:
    """Every member's block table holds its keys (the kernel reads only what the tables name)."""
    return all(len(meta.block_tables[i]) * meta.block_size >= meta.context_lens[i] + meta.query_lens[i]
               for i in members)


def _mixed_split_applies(kernels, q: torch.Tensor, k_cache, v_cache, meta: AttentionMetadata) -> bool:
    """Decode rows beside prompt rows (a loaded server's step when requests arrive): the decode rows
    take the kernel, so long decode contexts are not gathered into a padded copy every layer."""
    if q.dim() != 3 or q.shape[0] != meta.num_tokens or torch.cuda.is_current_stream_capturing():
        return False
    decode, prefill = _decode_and_prefill_members(meta)
    return bool(decode and prefill) and _covered(meta, decode) and _kernel_inputs_ok(kernels, q, k_cache, v_cache)


def _split_step(meta: AttentionMetadata, device: torch.device, decode_tables, with_groups: bool = True) -> MixedTensors:
    """A step of decode and prompt rows split once for every layer: the decode rows' flat indices
    and kernel tables (`decode_tables(block_tables, context_lens)`), the prompts' padded group
    (unless the prompts take flash: ops/flash_prefill.py)."""
    if meta.mixed is None:
        starts = _starts(meta.query_lens)
        decode, prefill = _decode_and_prefill_members(meta)
        tables = decode_tables([meta.block_tables[i] for i in decode], [meta.context_lens[i] for i in decode])
        rows = torch.tensor([starts[i] for i in decode], dtype=torch.long).to(device)
        groups = [_build_group(meta, prefill, starts, device, meta.sliding_window)] if with_groups else []
        meta.mixed = MixedTensors(rows, tables, groups)
    return meta.mixed


def _attend_split(q: torch.Tensor, k_cache, v_cache, mixed: MixedTensors, scale: float, attend_decode) -> torch.Tensor:
    """Decode rows through `attend_decode(rows, tables)` (a decode kernel), prompt rows through SDPA."""
    out = torch.empty_like(q)
    out.index_copy_(0, mixed.decode_rows, attend_decode(q.index_select(0, mixed.decode_rows), mixed.decode))
    return _attend_groups(q, k_cache, v_cache, mixed.prefill_groups, scale, None, out)


def _mixed_attention(kernels, q: torch.Tensor, k_cache, v_cache, meta: AttentionMetadata,
                     scale: float) -> torch.Tensor:
    mixed = _split_step(meta, q.device, lambda tables, lens: _build_decode_tensors(
        kernels, tables, lens, meta.sliding_window, q.device))
    return _attend_split(q, k_cache, v_cache, mixed, scale, lambda rows, decode: paged_decode_attention(
        rows, k_cache, v_cache, decode.block_tables, decode.seq_lens, scale, decode.max_partitions,
        meta.sliding_window))


def _decode_kernel_applies(kernels, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           meta: AttentionMetadata) -> bool:
    """All-decode steps whose block tables cover every key; prefill rows keep the reference."""
    all_decode = bool(meta.query_lens) and all(n == 1 for n in meta.query_lens)
    if not all_decode or q.dim() != 3 or q.shape[0] != len(meta.query_lens):
        return False
    return _covered(meta, range(len(meta.query_lens))) and _kernel_inputs_ok(kernels, q, k_cache, v_cache)


def _data(cache) -> torch.Tensor:
    return cache.data if isinstance(cache, QuantizedKV) else cache


def _scales_ok(kernels, q: torch.Tensor, k_cache, v_cache) -> bool:
    """A quantized cache (int8 / e4m3 with scales) is read by the kernel for fp16 / bf16 queries."""
    if not (isinstance(k_cache, QuantizedKV) and isinstance(v_cache, QuantizedKV)):
        return False
    if not hasattr(kernels, "write_kv_cache_quantized") or q.dtype == torch.float32:
        return False
    data_ok = k_cache.data.dtype in (torch.int8, torch.float8_e4m3fn) and v_cache.data.dtype == k_cache.data.dtype
    scales = (k_cache.scale, v_cache.scale)
    return data_ok and all(s.is_contiguous() and s.shape == k_cache.data.shape[:3] and s.device == q.device
                           for s in scales)


def _kernel_inputs_ok(kernels, q: torch.Tensor, k_cache, v_cache) -> bool:
    quantized = isinstance(k_cache, QuantizedKV) or isinstance(v_cache, QuantizedKV)
    if quantized and not _scales_ok(kernels, q, k_cache, v_cache):
        return False
    k_cache, v_cache = _data(k_cache), _data(v_cache)
    if not same_device(q, k_cache, v_cache) or q.dtype not in KERNEL_DTYPES:
        return False
    same_dtype = quantized or (k_cache.dtype == q.dtype and v_cache.dtype == q.dtype)
    if not same_dtype or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        return False
    if not (k_cache.is_contiguous() and v_cache.is_contiguous() and aligned(k_cache) and aligned(v_cache)):
        return False
    head_dim, kv_heads = k_cache.shape[3], k_cache.shape[2]
    return (q.dim() == 3 and q.shape[2] == head_dim and q.stride(-1) == 1 and q.shape[1] % kv_heads == 0
            and kernels.paged_decode_supports_head_dim(head_dim))


def decode_partitions(seq_len: int, partition_size: int, sliding_window: Optional[int]) -> int:
    """Partitions the decode kernel gives a sequence of seq_len keys (mirrors decode_partitions in
    src/kernels/cuda/paged_decode_attention.h)."""
    start = seq_len - sliding_window if sliding_window and seq_len > sliding_window else 0
    return math.ceil(seq_len / partition_size) - start // partition_size


def _decode_tensors(kernels, meta: AttentionMetadata, device: torch.device) -> DecodeTensors:
    if meta.decode is None or meta.decode.block_tables.device != device:
        meta.decode = _build_decode_tensors(kernels, meta.block_tables, meta.context_lens, meta.sliding_window, device)
    return meta.decode


def _build_decode_tensors(kernels, block_tables: Sequence[List[int]], context_lens: Sequence[int],
                          sliding_window: Optional[int], device: torch.device) -> DecodeTensors:
    host = _host_tables(block_tables, context_lens)
    parts = max(decode_partitions(ctx + 1, kernels.decode_partition_size, sliding_window) for ctx in context_lens)
    return DecodeTensors(host.block_tables.to(device), host.seq_lens.to(device), parts)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def decode_splits(q: torch.Tensor, num_kv_heads: int, max_partitions: int) -> int:
    """CTAs per (sequence, KV head) for the decode kernel: enough for about 8 per SM in all, never
    more than the partitions. A big batch then gets one CTA per sequence and head however long the
    longest possible context (a CUDA graph's max_partitions), instead of CTAs that find no keys."""
    ctas = q.shape[0] * num_kv_heads
    return max(1, min(max_partitions, math.ceil(8 * _sm_count(q.device.index or 0) / max(ctas, 1))))


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float, max_partitions: int,
                           sliding_window: Optional[int] = None, out: Optional[torch.Tensor] = None,
                           num_splits: Optional[int] = None) -> torch.Tensor:
    """The CUDA decode kernel alone (no fallback): q [seqs, heads, head_dim], one query per sequence.

    block_tables: [seqs, max_blocks] int32, seq_lens: [seqs] int32 (keys per sequence), both on q's
    device; max_partitions: at least decode_partitions() of every sequence (a fixed upper bound
    keeps the launch shape stable for CUDA graphs). num_splits: CTAs sharing a sequence's
    partitions (default decode_splits; any value from 1 is correct). Block ids and lengths are not
    checked here (that would need a host sync): the caller guarantees they are in range.
    """
    kernels = kernels_for(q, _data(k_cache), _data(v_cache), block_tables, seq_lens)
    if kernels is None:
        raise RuntimeError("paged_decode_attention: the CUDA kernels are not available for these tensors")
    if not _kernel_inputs_ok(kernels, q, k_cache, v_cache) or not same_device(q, block_tables, seq_lens):
        raise ValueError("paged_decode_attention: q [seqs, heads, head_dim] and contiguous caches [blocks, "
                         "block_size, kv_heads, head_dim] of q's dtype (fp32/fp16/bf16) or quantized (int8 / e4m3 "
                         "with scales, fp16 / bf16 q), a supported head_dim, heads % kv_heads == 0")
    seqs = q.shape[0]
    if (block_tables.dtype != torch.int32 or block_tables.dim() != 2 or block_tables.shape[0] != seqs
            or block_tables.shape[1] == 0 or not block_tables.is_contiguous()):
        raise ValueError("paged_decode_attention: block_tables must be contiguous int32 [seqs, max_blocks >= 1]")
    if seq_lens.dtype != torch.int32 or seq_lens.shape != (seqs,) or not seq_lens.is_contiguous():
        raise ValueError("paged_decode_attention: seq_lens must be contiguous int32 [seqs]")
    if not 1 <= max_partitions <= 12288 or (sliding_window is not None and sliding_window < 1):
        raise ValueError(f"paged_decode_attention: max_partitions in [1, 12288] and sliding_window >= 1, got "
                         f"{max_partitions} and {sliding_window}")
    splits = num_splits if num_splits is not None else decode_splits(q, k_cache.shape[2], max_partitions)
    if not 1 <= splits <= 12288:
        raise ValueError(f"paged_decode_attention: num_splits in [1, 12288], got {splits}")
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or not out.is_contiguous():
        raise ValueError("paged_decode_attention: out must be contiguous, with q's shape, dtype and device")
    if seqs == 0:
        return out
    partials = [None, None, None]
    if splits > 1:  # flash-decoding workspace (the caching allocator makes this cheap)
        heads, head_dim = q.shape[1], q.shape[2]
        f32 = dict(dtype=torch.float32, device=q.device)
        partials = [torch.empty(seqs, heads, splits, head_dim, **f32),
                    torch.empty(seqs, heads, splits, **f32), torch.empty(seqs, heads, splits, **f32)]
    scales = ((k_cache.scale, v_cache.scale) if isinstance(k_cache, QuantizedKV) else (None, None))
    status = kernels.paged_decode_attention(out, q, _data(k_cache), _data(v_cache), block_tables, seq_lens, *partials,
                                            splits, float(scale), int(sliding_window or 0), *scales)
    check_status(kernels, status, "paged_decode_attention")
    return out
