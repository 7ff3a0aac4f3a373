"""The flash varlen plan (ops/attention.py build_flash_prefill_plan, for ops/flash_prefill.py) on the CPU: a pure-torch varlen attention that reads
the plan exactly as flash does (packed queries, packed keys from the slots, bottom-right causal,
left window) must equal the padded reference. The kernel call itself is CUDA-only: its tests are in
test_cuda_kernels.py."""
from __future__ import annotations

import pytest
import torch

from maga_transformer.ops.attention import (build_attention_metadata, build_flash_prefill_plan,
                                            paged_attention_reference)
from maga_transformer.ops.flash_prefill import flash_prefill_applies
from maga_transformer.ops.kv_cache import read_kv


def _varlen_attention(q, k_cache, v_cache, plan, scale, window=None) -> torch.Tensor:
    rows = q if plan.rows is None else q[plan.rows]
    k, v = read_kv(k_cache, plan.key_slots, q.dtype), read_kv(v_cache, plan.key_slots, q.dtype)
    outs = []
    for m in range(len(plan.cu_q) - 1):
        qm = rows[plan.cu_q[m]:plan.cu_q[m + 1]].transpose(0, 1)  # [H, q, D]
        km, vm = (t[plan.cu_k[m]:plan.cu_k[m + 1]].transpose(0, 1) for t in (k, v))
        group = qm.shape[0] // km.shape[0]
        km, vm = km.repeat_interleave(group, 0), vm.repeat_interleave(group, 0)
        n_q, n_k = qm.shape[1], km.shape[1]
        query_pos = torch.arange(n_q).unsqueeze(1) + (n_k - n_q)  # bottom-right alignment
        key_pos = torch.arange(n_k).unsqueeze(0)
        allowed = key_pos <= query_pos
        if window is not None:
            allowed &= query_pos - key_pos <= window - 1
        scores = (qm @ km.transpose(1, 2)) * scale
        outs.append((scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ vm).transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("window", [None, 50])
def test_plan_packs_every_member_like_the_reference(window):
    gen = torch.Generator().manual_seed(3)
    query_lens, context_lens, block = [30, 1, 7, 12], [0, 45, 70, 3], 8
    pool = 64
    order = torch.randperm(pool, generator=gen).tolist()
    tables, at = [], 0
    for q_len, ctx in zip(query_lens, context_lens):
        n = -(-(q_len + ctx) // block)
        tables.append(order[at:at + n] + [order[-1]])  # a spare block past the end, as tables may have
        at += n
    k_cache = torch.randn(pool, block, 2, 16, generator=gen, dtype=torch.float64)
    v_cache = torch.randn(pool, block, 2, 16, generator=gen, dtype=torch.float64)
    q = torch.randn(sum(query_lens), 4, 16, generator=gen, dtype=torch.float64)
    meta = build_attention_metadata(query_lens, context_lens, tables, block, q.device, sliding_window=window)
    ref = paged_attention_reference(q, k_cache, v_cache, meta, 0.25)
    everyone = build_flash_prefill_plan(query_lens, context_lens, tables, block, [0, 1, 2, 3], q.device)
    assert everyone.rows is None and everyone.max_q == 30 and everyone.max_k == 77
    torch.testing.assert_close(_varlen_attention(q, k_cache, v_cache, everyone, 0.25, window), ref)
    prompts = build_flash_prefill_plan(query_lens, context_lens, tables, block, [0, 2, 3], q.device)
    starts = [0, 30, 31, 38]
    expected_rows = torch.cat([torch.arange(starts[i], starts[i] + query_lens[i]) for i in (0, 2, 3)])
    assert torch.equal(prompts.rows, expected_rows)
    torch.testing.assert_close(_varlen_attention(q, k_cache, v_cache, prompts, 0.25, window), ref[expected_rows])


def test_flash_applies_only_to_cuda_half_precision_without_a_bidirectional_prompt():
    q = torch.zeros(4, 8, 64, dtype=torch.bfloat16)
    cache = torch.zeros(2, 16, 2, 64, dtype=torch.bfloat16)
    assert not flash_prefill_applies(q, cache, None)  # a CPU tensor
    if torch.cuda.is_available():
        assert flash_prefill_applies(q.cuda(), cache.cuda(), None)
        assert not flash_prefill_applies(q.cuda(), cache.cuda(), [5])  # GLM's bidirectional prompt
        assert not flash_prefill_applies(q.cuda().float(), cache.cuda().float(), None)
