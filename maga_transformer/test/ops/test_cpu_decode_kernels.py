"""The CPU decode kernels (src/kernels/cpu/decode_ops.cc) against float64 formulas written here and
the torch references, on fresh random inputs: RMSNorm with and without the residual add, SiLU-and-mul,
NeoX rotary with the KV-cache write (partial rotary, padding slots), and paged decode attention
(GQA, block tables with holes, sliding windows, long contexts, batch invariance). The ops must
really take the kernels on fp32 CPU tensors, and keep their references elsewhere."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from maga_transformer import ops
from maga_transformer.ops._compiled import cpu_kernels
from maga_transformer.ops.attention import build_attention_metadata, paged_attention_reference
from maga_transformer.ops.kv_cache import write_kv_cache_reference
from maga_transformer.ops.rotary import apply_rotary_reference


@pytest.fixture(scope="module")
def kernels():
    module = cpu_kernels()
    assert module is not None and hasattr(module, "paged_decode_attention_f32"), "the C++ runtime did not build"
    return module


def _rms64(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.double()


@pytest.mark.parametrize("rows,hidden", [(1, 576), (5, 4096), (64, 65), (3, 7)])
def test_rms_norm_matches_float64(kernels, rows, hidden):
    torch.manual_seed(rows * hidden)
    x, residual, weight = torch.randn(rows, hidden), torch.randn(rows, hidden), torch.randn(hidden)
    out = ops.rms_norm(x, weight, 1e-6)
    torch.testing.assert_close(out.double(), _rms64(x, weight, 1e-6), atol=1e-5, rtol=1e-5)
    normed, summed = ops.fused_add_rms_norm(x, residual, weight, 1e-5)
    assert torch.equal(summed, x + residual)
    torch.testing.assert_close(normed.double(), _rms64(x + residual, weight, 1e-5), atol=1e-5, rtol=1e-5)
    wide = torch.randn(rows, hidden + 9)[:, :hidden]  # rows with a stride, as a view of a wider tensor
    torch.testing.assert_close(ops.rms_norm(wide, weight, 1e-6).double(), _rms64(wide, weight, 1e-6),
                               atol=1e-5, rtol=1e-5)


def test_silu_and_mul_matches_float64(kernels):
    torch.manual_seed(2)
    for rows, width in [(1, 1536), (9, 33), (128, 2048)]:
        gate_up = torch.randn(rows, 2 * width) * 4
        gate, up = gate_up.double().chunk(2, dim=-1)
        torch.testing.assert_close(ops.gated_activation(gate_up, "silu").double(), gate * torch.sigmoid(gate) * up,
                                   atol=1e-5, rtol=1e-5)


def _rotary_tables(tokens: int, half: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    angles = torch.rand(tokens, half, generator=g) * 50
    return torch.cos(angles).unsqueeze(1), torch.sin(angles).unsqueeze(1)  # [tokens, 1, half], as the decoders pass


@pytest.mark.parametrize("head_dim,rotary_dim", [(64, 64), (128, 64), (80, 32)])
def test_rotary_and_cache_write_match_the_references(kernels, head_dim, rotary_dim):
    torch.manual_seed(head_dim + rotary_dim)
    tokens, q_heads, kv_heads, blocks, block_size = 6, 8, 2, 5, 4
    qkv = torch.randn(tokens, (q_heads + 2 * kv_heads) * head_dim)  # a fused projection: qk and v are views
    qk = qkv[:, :(q_heads + kv_heads) * head_dim].view(tokens, q_heads + kv_heads, head_dim)
    v = qkv[:, (q_heads + kv_heads) * head_dim:].view(tokens, kv_heads, head_dim)
    cos, sin = _rotary_tables(tokens, rotary_dim // 2, seed=head_dim)
    slots = torch.tensor([3, 17, 0, 9, 12, 5])
    k_cache, v_cache = torch.zeros(blocks, block_size, kv_heads, head_dim), torch.zeros(blocks, block_size, kv_heads, head_dim)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    q = ops.rotate_and_write_kv(qk, v, cos, sin, rotary_dim, q_heads, k_cache, v_cache, slots)
    rotated = apply_rotary_reference(qk, cos, sin, rotary_dim)
    write_kv_cache_reference(rotated[:, q_heads:], v, k_ref, v_ref, slots)
    torch.testing.assert_close(q, rotated[:, :q_heads], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(k_cache, k_ref, atol=1e-6, rtol=1e-6)
    assert torch.equal(v_cache, v_ref)


def test_rotary_cache_write_skips_padding_slots(kernels):
    qk, v = torch.randn(2, 3, 16), torch.randn(2, 1, 16)
    cos, sin = _rotary_tables(2, 8, seed=4)
    k_cache, v_cache = torch.zeros(2, 4, 1, 16), torch.zeros(2, 4, 1, 16)
    ops.rotate_and_write_kv(qk, v, cos, sin, 16, 2, k_cache, v_cache, torch.tensor([-1, 6]))
    assert torch.equal(v_cache.view(-1, 16)[6], v[1, 0])
    assert int((v_cache.view(-1, 16).abs().sum(-1) > 0).sum()) == 1


def _paged_batch(context_lens, heads, kv_heads, head_dim, block_size, seed):
    """Caches with shuffled, non-contiguous block ids (holes between sequences), q for one token each."""
    g = torch.Generator().manual_seed(seed)
    needed = [math.ceil((c + 1) / block_size) for c in context_lens]
    order = torch.randperm(sum(needed) * 2, generator=g).tolist()  # twice the blocks: unused ones in between
    tables, used = [], 0
    for n in needed:
        tables.append(order[used:used + n])
        used += n
    blocks = sum(needed) * 2
    k_cache = torch.randn(blocks, block_size, kv_heads, head_dim, generator=g)
    v_cache = torch.randn(blocks, block_size, kv_heads, head_dim, generator=g)
    q = torch.randn(len(context_lens), heads, head_dim, generator=g)
    return q, k_cache, v_cache, tables


def _decode_oracle(q, k_cache, v_cache, tables, context_lens, scale, window):
    """Float64 softmax attention of each sequence's one query over its keys, gathered slot by slot."""
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q.shape[1] // kv_heads
    out = torch.empty(q.shape, dtype=torch.float64)
    for s, (table, ctx) in enumerate(zip(tables, context_lens)):
        keys = ctx + 1
        first = keys - window if window and keys > window else 0
        slots = [table[p // block_size] * block_size + p % block_size for p in range(first, keys)]
        k = k_cache.view(-1, kv_heads, k_cache.shape[3])[slots].double()
        v = v_cache.view(-1, kv_heads, v_cache.shape[3])[slots].double()
        for h in range(q.shape[1]):
            scores = (k[:, h // group] @ q[s, h].double()) * scale
            out[s, h] = torch.softmax(scores, 0) @ v[:, h // group]
    return out


@pytest.mark.parametrize("context_lens,heads,kv_heads,head_dim,window", [
    ([40], 9, 3, 64, None),               # SmolLM2's shape, batch 1
    ([0, 5, 300, 2999], 8, 2, 128, None),  # a fresh prompt's first decode beside long contexts
    ([100, 3000, 17], 4, 4, 64, 64),       # multi-head, a window shorter than most contexts
    ([9000], 16, 1, 32, 1000),             # MQA, a long context
])
def test_paged_decode_attention_matches_float64(kernels, context_lens, heads, kv_heads, head_dim, window):
    block_size = 16
    q, k_cache, v_cache, tables = _paged_batch(context_lens, heads, kv_heads, head_dim, block_size, seed=len(context_lens))
    meta = build_attention_metadata([1] * len(context_lens), context_lens, tables, block_size, torch.device("cpu"), window)
    out = ops.paged_attention(q, k_cache, v_cache, meta, 0.11)
    assert meta.decode is not None and meta.groups is None  # the kernel ran, not the padded reference
    torch.testing.assert_close(out.double(), _decode_oracle(q, k_cache, v_cache, tables, context_lens, 0.11, window),
                               atol=2e-5, rtol=1e-4)
    reference = paged_attention_reference(q, k_cache, v_cache, build_attention_metadata(
        [1] * len(context_lens), context_lens, tables, block_size, torch.device("cpu"), window), 0.11)
    torch.testing.assert_close(out, reference, atol=2e-5, rtol=1e-4)


def test_paged_decode_attention_is_batch_invariant(kernels):
    context_lens = [70, 3, 511]
    q, k_cache, v_cache, tables = _paged_batch(context_lens, 6, 2, 64, 8, seed=7)
    batched = ops.paged_attention(q, k_cache, v_cache, build_attention_metadata(
        [1, 1, 1], context_lens, tables, 8, torch.device("cpu")), 0.125)
    for s in range(3):
        alone = ops.paged_attention(q[s:s + 1], k_cache, v_cache, build_attention_metadata(
            [1], [context_lens[s]], [tables[s]], 8, torch.device("cpu")), 0.125)
        assert torch.equal(alone[0], batched[s])


@pytest.mark.parametrize("window", [None, 40])
def test_mixed_step_decode_rows_take_the_kernel(kernels, window):
    """Decode rows beside prompt chunks (fresh, and after cached tokens): the decode rows go to the
    kernel, the prompts to the padded groups, every row lands where it belongs."""
    query_lens, context_lens = [1, 37, 1, 12, 1], [300, 0, 17, 50, 0]
    keys = [c + n - 1 for c, n in zip(context_lens, query_lens)]  # _paged_batch sizes tables for ctx + 1
    _, k_cache, v_cache, tables = _paged_batch(keys, 8, 2, 64, 16, seed=11)
    q = torch.randn(sum(query_lens), 8, 64)
    meta = build_attention_metadata(query_lens, context_lens, tables, 16, torch.device("cpu"), window)
    out = ops.paged_attention(q, k_cache, v_cache, meta, 0.09)
    assert meta.mixed is not None and meta.groups is None
    reference = paged_attention_reference(q, k_cache, v_cache, build_attention_metadata(
        query_lens, context_lens, tables, 16, torch.device("cpu"), window), 0.09)
    torch.testing.assert_close(out, reference, atol=2e-5, rtol=1e-4)
    decode_rows = [0, 38, 51]  # the flat rows of the three one-token sequences
    oracle = _decode_oracle(q[decode_rows], k_cache, v_cache, [tables[i] for i in (0, 2, 4)], [300, 17, 0], 0.09, window)
    torch.testing.assert_close(out[decode_rows].double(), oracle, atol=2e-5, rtol=1e-4)


def test_other_inputs_keep_the_references(kernels, monkeypatch):
    """Prompt-only steps, a non-fp32 cache and MAGA_DISABLE_CPU_KERNELS=1 take the padded reference."""
    q, k_cache, v_cache, tables = _paged_batch([30, 0], 4, 2, 64, 16, seed=3)
    prefill = torch.randn(10, 4, 64)
    meta = build_attention_metadata([5, 5], [26, 0], tables, 16, torch.device("cpu"))
    ops.paged_attention(prefill, k_cache, v_cache, meta, 0.125)
    assert meta.decode is None and meta.mixed is None and meta.groups is not None
    meta = build_attention_metadata([1, 1], [30, 0], tables, 16, torch.device("cpu"))
    ops.paged_attention(q.bfloat16(), k_cache.bfloat16(), v_cache.bfloat16(), meta, 0.125)
    assert meta.decode is None and meta.groups is not None
    monkeypatch.setenv("MAGA_DISABLE_CPU_KERNELS", "1")
    meta = build_attention_metadata([1, 1], [30, 0], tables, 16, torch.device("cpu"))
    out = ops.paged_attention(q, k_cache, v_cache, meta, 0.125)
    assert meta.decode is None and torch.equal(out, paged_attention_reference(q, k_cache, v_cache, meta, 0.125))
    x, w = torch.randn(2, 32), torch.randn(32)
    assert torch.equal(ops.rms_norm(x, w, 1e-6), F.rms_norm(x, (32,), w, 1e-6))
