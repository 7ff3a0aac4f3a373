"""Prompt rows of a step through flash attention's variable-length kernel (CUDA, fp16 / bf16).

The padded reference (ops/attention.py) pads every prompt of a step to the longest one and, for a
chunk after cached tokens, builds a [queries, keys] mask and runs SDPA's memory-efficient kernel
under it: at 32k keys that mask alone is 64 MB per group and the kernel reads it in every layer.
Flash attention's varlen entry (torch.ops.aten._flash_attention_forward, the same FlashAttention-2
kernels SDPA calls) takes the prompts packed end to end with cumulative lengths and aligns its
causal mask bottom-right: query i of a sequence with q queries and k keys sees keys j <= i + k - q,
which is exactly a chunk after k - q cached tokens. It takes fewer KV heads than query heads (GQA /
MQA), a left window (sliding window attention) and per-head ALiBi slopes (slope * (key - query),
the bias the reference adds), so no mask tensor exists at all.

Keys and values are gathered from the paged cache into one packed copy per layer (one index_select;
int8 / fp8 caches are dequantized by the same read). At a 32k context that copy is ~1-2 % of the
chunk's attention time; reading the pages in place needs our own kernel (issue 15, not here yet).
GLM's bidirectional prompt keeps the reference (flash has no mask input).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch

from maga_transformer.ops.kv_cache import QuantizedKV, read_kv

logger = logging.getLogger(__name__)

_FLASH_DTYPES = (torch.float16, torch.bfloat16)
# learned per feature set (window, ALiBi) on its first call: a torch without flash, or one whose
# flash lacks a feature, refuses it once and that kind of step then takes the reference
_flash_works: Dict[Tuple[bool, bool], bool] = {}


@dataclass
class FlashPrefillPlan:
    """The prompt rows of one step in the varlen kernel's form, built once and shared by layers
    (ops/attention.py build_flash_prefill_plan, from the step's metadata)."""

    rows: Optional[torch.Tensor]  # [queries] flat token index of each prompt row; None: every row, in order
    key_slots: torch.Tensor  # [keys] KV slot of every key of every member, packed member after member
    cu_q: torch.Tensor  # [members + 1] int32 cumulative query counts
    cu_k: torch.Tensor  # [members + 1] int32 cumulative key counts
    max_q: int
    max_k: int


def flash_prefill_applies(q: torch.Tensor, k_cache, bidirectional_lens: Optional[Sequence[int]]) -> bool:
    """CUDA fp16 / bf16 queries, a head size flash takes, no bidirectional prompt, flash available."""
    if not q.is_cuda or q.dtype not in _FLASH_DTYPES or q.dim() != 3:
        return False
    if torch.cuda.is_current_stream_capturing():
        return False  # prompt steps run eagerly; a capture replays decode shapes only
    data = k_cache.data if isinstance(k_cache, QuantizedKV) else k_cache
    head_dim = q.shape[2]
    if head_dim % 8 or head_dim > 256 or data.shape[-1] != head_dim or q.shape[1] % data.shape[-2]:
        return False
    return not bidirectional_lens or max(bidirectional_lens) <= 1


def flash_prefill(q: torch.Tensor, k_cache, v_cache, plan: FlashPrefillPlan, scale: float,
                  sliding_window: Optional[int] = None,
                  alibi_slopes: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """Attention of the plan's prompt rows ([queries, heads, head_dim], in plan order), or None when
    this torch's flash kernel refuses the call (remembered: later steps go straight to the reference)."""
    features = (sliding_window is not None, alibi_slopes is not None)
    if _flash_works.get(features) is False:
        return None
    rows = q if plan.rows is None else q.index_select(0, plan.rows)
    k = read_kv(k_cache, plan.key_slots, q.dtype)
    v = read_kv(v_cache, plan.key_slots, q.dtype)
    extra = {}
    if sliding_window is not None:
        # ours: a query sees keys less than `sliding_window` positions back, itself included
        extra.update(window_size_left=sliding_window - 1, window_size_right=0)
    if alibi_slopes is not None:
        extra["alibi_slopes"] = alibi_slopes.float().contiguous()
    try:
        out = torch.ops.aten._flash_attention_forward(
            rows.contiguous(), k, v, plan.cu_q, plan.cu_k, plan.max_q, plan.max_k, 0.0, True, False,
            scale=scale, **extra)[0]
    except (RuntimeError, TypeError) as err:
        if features not in _flash_works:  # a refusal on the first call: the kernel lacks this
            logger.info("flash varlen attention unavailable for window=%s alibi=%s (%s): such prompts take "
                        "the padded reference", *features, err)
            _flash_works[features] = False
            return None
        raise  # it worked before: a real failure (out of memory, bad input), not a missing feature
    _flash_works[features] = True
    return out
