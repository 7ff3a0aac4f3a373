"""The pure-torch ops against independent naive implementations (the oracle for later kernels)."""
from __future__ import annotations

import math
import random

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from maga_transformer import ops


def _naive_attention(q, k, v, scale, window=None):
    """q: [Lq, H, D] at the last Lq positions of k/v: [Lk, KVH, D]; causal."""
    lq, heads, _ = q.shape
    lk, kv_heads, _ = k.shape
    k = k.repeat_interleave(heads // kv_heads, dim=1)
    v = v.repeat_interleave(heads // kv_heads, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * scale
    q_pos = torch.arange(lk - lq, lk).unsqueeze(1)
    k_pos = torch.arange(lk).unsqueeze(0)
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= (q_pos - k_pos) < window
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.double()).float()


@pytest.mark.parametrize("heads,kv_heads,window", [(4, 4, None), (8, 2, None), (4, 1, 5)])
def test_paged_attention_matches_naive(heads, kv_heads, window):
    torch.manual_seed(0)
    rng = random.Random(0)
    block_size, num_blocks, dim = 4, 64, 16
    k_cache = torch.randn(num_blocks, block_size, kv_heads, dim)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, dim)
    free = list(range(num_blocks))
    rng.shuffle(free)  # block tables with holes and out-of-order blocks
    cases = [(0, 7), (5, 1), (13, 1), (9, 6), (30, 1), (0, 1)]  # (context, new tokens): prefill, decode, prefix hit
    tables, q_parts = [], []
    for context, new in cases:
        length = context + new
        table = [free.pop() for _ in range(math.ceil(length / block_size))]
        tables.append(table)
        q_parts.append(torch.randn(new, heads, dim))
    q = torch.cat(q_parts)
    meta = ops.build_attention_metadata([n for _, n in cases], [c for c, _ in cases], tables, block_size,
                                        torch.device("cpu"), sliding_window=window)
    out = ops.paged_attention(q, k_cache, v_cache, meta, scale=dim ** -0.5)
    offset = 0
    for (context, new), table, q_part in zip(cases, tables, q_parts):
        slots = torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(context + new)])
        k = k_cache.view(-1, kv_heads, dim)[slots]
        v = v_cache.view(-1, kv_heads, dim)[slots]
        expected = _naive_attention(q_part, k, v, dim ** -0.5, window)
        assert torch.allclose(out[offset:offset + new], expected, atol=1e-5)
        offset += new


def test_write_kv_cache_and_block_copy():
    k_cache = torch.zeros(8, 4, 2, 3)
    v_cache = torch.zeros(8, 4, 2, 3)
    k, v = torch.randn(5, 2, 3), torch.randn(5, 2, 3)
    slots = torch.tensor([0, 1, 13, 14, 31])
    ops.write_kv_cache(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache[3, 1], k[2]) and torch.equal(v_cache[7, 3], v[4])
    ops.copy_kv_blocks(k_cache, v_cache, torch.tensor([3]), torch.tensor([5]))
    assert torch.equal(k_cache[5], k_cache[3]) and torch.equal(v_cache[5], v_cache[3])


def test_rms_norm_matches_transformers():
    torch.manual_seed(1)
    norm = LlamaRMSNorm(32, eps=1e-5)
    norm.weight.data = torch.randn(32)
    x, residual = torch.randn(6, 32), torch.randn(6, 32)
    assert torch.allclose(ops.rms_norm(x, norm.weight.data, 1e-5), norm(x), atol=1e-6)
    normed, summed = ops.fused_add_rms_norm(x, residual, norm.weight.data, 1e-5)
    assert torch.equal(summed, x + residual)
    assert torch.allclose(normed, norm(x + residual), atol=1e-6)


@pytest.mark.parametrize("rotary_dim", [16, 8])
def test_rotary_matches_transformers(rotary_dim):
    torch.manual_seed(2)
    tokens, heads, dim = 7, 3, 16
    q, k = torch.randn(tokens, heads, dim), torch.randn(tokens, 1, dim)
    positions = torch.tensor([0, 1, 2, 9, 10, 33, 34])
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    freqs = positions.float().unsqueeze(1) * inv_freq
    ours = ops.apply_rotary(torch.cat([q, k], dim=1), freqs.cos().unsqueeze(1), freqs.sin().unsqueeze(1), rotary_dim)
    ours_q, ours_k = ours[:, :heads], ours[:, heads:]
    emb = torch.cat([freqs, freqs], dim=-1)
    ref_q, ref_k = apply_rotary_pos_emb(q[..., :rotary_dim].transpose(0, 1).unsqueeze(0),
                                        k[..., :rotary_dim].transpose(0, 1).unsqueeze(0),
                                        emb.cos().unsqueeze(0), emb.sin().unsqueeze(0))
    assert torch.allclose(ours_q[..., :rotary_dim], ref_q[0].transpose(0, 1), atol=1e-6)
    assert torch.allclose(ours_k[..., :rotary_dim], ref_k[0].transpose(0, 1), atol=1e-6)
    assert torch.equal(ours_q[..., rotary_dim:], q[..., rotary_dim:])  # partial rotary leaves the rest


def test_gated_activations():
    x = torch.randn(5, 8)
    gate, up = x[:, :4], x[:, 4:]
    assert torch.allclose(ops.silu_and_mul(x), torch.nn.functional.silu(gate) * up)
    assert torch.allclose(ops.gelu_and_mul(x, "tanh"), torch.nn.functional.gelu(gate, approximate="tanh") * up)


@pytest.mark.parametrize("num_heads", [4, 6, 12])
def test_alibi_slopes_match_bloom(num_heads):
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor
    bias = build_alibi_tensor(torch.ones(1, 3, dtype=torch.long), num_heads, torch.float32)  # [H, 1, 3]: slope * pos
    assert torch.allclose(bias[:, 0, 1], ops.alibi_slopes(num_heads))


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)])
def test_paged_attention_alibi_matches_naive(heads, kv_heads):
    """ALiBi in the paged reference vs Bloom's form (slope * key position added to the scaled scores),
    in float64, over prefill, decode and prefix-hit rows with scattered blocks."""
    torch.manual_seed(0)
    block_size, dim = 4, 16
    k_cache = torch.randn(32, block_size, kv_heads, dim)
    v_cache = torch.randn(32, block_size, kv_heads, dim)
    slopes = ops.alibi_slopes(heads) * 4  # steeper than usual, so a wrong sign or offset shows
    cases = [(0, 7), (5, 1), (9, 6), (0, 1)]
    tables = [[31, 2, 17], [8, 3], [30, 1, 25, 4], [12]]
    q = torch.randn(sum(n for _, n in cases), heads, dim)
    meta = ops.build_attention_metadata([n for _, n in cases], [c for c, _ in cases], tables, block_size,
                                        torch.device("cpu"))
    out = ops.paged_attention(q, k_cache, v_cache, meta, scale=dim ** -0.5, alibi_slopes=slopes)
    offset = 0
    for (context, new), table in zip(cases, tables):
        length = context + new
        slots = torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(length)])
        k = k_cache.view(-1, kv_heads, dim)[slots].repeat_interleave(heads // kv_heads, dim=1).double()
        v = v_cache.view(-1, kv_heads, dim)[slots].repeat_interleave(heads // kv_heads, dim=1).double()
        scores = torch.einsum("qhd,khd->hqk", q[offset:offset + new].double(), k) * dim ** -0.5
        scores = scores + slopes.double().view(-1, 1, 1) * torch.arange(length).double().view(1, 1, -1)
        causal = torch.arange(length).view(1, -1) <= torch.arange(context, length).view(-1, 1)
        expected = torch.einsum("hqk,khd->qhd", scores.masked_fill(~causal, float("-inf")).softmax(-1), v)
        assert torch.allclose(out[offset:offset + new].double(), expected, atol=1e-5)
        offset += new


def test_layer_norm_matches_torch_module():
    torch.manual_seed(0)
    x = torch.randn(5, 32)
    norm = torch.nn.LayerNorm(32, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
        assert torch.allclose(ops.layer_norm(x, norm.weight, norm.bias, 1e-5), norm(x), atol=1e-6)
        assert torch.allclose(ops.layer_norm(x, norm.weight, None, 1e-5), norm(x) - norm.bias, atol=1e-6)


def test_alibi_never_dispatches_to_the_decode_kernel(monkeypatch):
    """The decode kernel has no ALiBi term, so paged_attention must not even look for it."""
    from maga_transformer.ops import attention

    def no_kernels(*tensors):
        raise AssertionError("paged_attention looked up the CUDA kernels for an ALiBi step")
    monkeypatch.setattr(attention, "kernels_for", no_kernels)
    k_cache = torch.randn(2, 4, 2, 8)
    meta = ops.build_attention_metadata([1], [3], [[1]], 4, torch.device("cpu"))
    out = ops.paged_attention(torch.randn(1, 2, 8), k_cache, k_cache, meta, 8 ** -0.5, alibi_slopes=ops.alibi_slopes(2))
    assert out.shape == (1, 2, 8)
