"""The CUDA kernels (src/kernels/cuda/) against their torch references, on fresh random inputs.

GPU tests carry the `gpu` marker and skip cleanly without CUDA; the source-list check runs
everywhere, so this file always collects tests. Tolerances (elementwise, vs the reference in the
same dtype): bf16 atol = rtol = 1.6e-2 (about two bf16 ulps), fp16 2e-3, fp32 1e-5; attention is
also checked against an fp64 oracle by relative norm error: bf16 < 1e-2, fp16 < 2e-3, fp32 < 1e-5.
"""
from __future__ import annotations

import math
import os
import random
import re
from typing import List

import pytest
import torch

from maga_transformer import ops
from maga_transformer.ops.activation import gelu_and_mul_reference, silu_and_mul_reference
from maga_transformer.ops.attention import build_attention_metadata, paged_attention_reference
from maga_transformer.ops.kv_cache import write_kv_cache_reference
from maga_transformer.ops.norm import fused_add_rms_norm_reference, rms_norm_reference
from maga_transformer.ops.rotary import apply_rotary_qk_reference, apply_rotary_reference



def gpu_test(fn):
    """A test of the CUDA kernels: the `gpu` marker, and a clean skip without a CUDA GPU."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(fn))


TOL = {torch.bfloat16: (1.6e-2, 1.6e-2), torch.float16: (2e-3, 2e-3), torch.float32: (1e-5, 1e-5)}
ORACLE_REL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}
HALF_DTYPES = [torch.bfloat16, torch.float16]

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def test_cuda_sources_match_bazel():
    """sources.txt's [cuda] sources, src/BUILD's CUDA_SRCS and the .cu files on disk agree."""
    from maga_transformer.ops._compiled import read_source_lists
    lists = read_source_lists(os.path.join(_ROOT, "src", "sources.txt"))
    assert lists is not None, "a source listed in src/sources.txt is missing"
    # the lists hold real paths (under Bazel, outside the runfiles tree): compare from src/ on
    listed = sorted(p.rsplit(os.sep + "src" + os.sep, 1)[1].replace(os.sep, "/") for p in lists.cuda)
    with open(os.path.join(_ROOT, "src", "BUILD")) as f:
        in_build = sorted(set(re.findall(r'"((?:kernels/cuda|bindings)/\w+\.cu)"', f.read())))
    on_disk = sorted([f"kernels/cuda/{n}" for n in os.listdir(os.path.join(_ROOT, "src", "kernels", "cuda"))
                      if n.endswith(".cu")] +
                     [f"bindings/{n}" for n in os.listdir(os.path.join(_ROOT, "src", "bindings")) if n.endswith(".cu")])
    assert listed == in_build == on_disk
    assert not any(p.endswith(".cu") for p in lists.cpu), "the CPU library must not list CUDA sources"


@pytest.fixture(scope="module")
def kernels():
    from maga_transformer.ops._compiled import cuda_kernels
    module = cuda_kernels()
    assert module is not None, "no CUDA kernels: neither a bundled library fits nor the build from sources worked"
    return module


def _assert_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    atol, rtol = TOL[ref.dtype]
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)


def _rel_error(out: torch.Tensor, oracle: torch.Tensor) -> float:
    return float((out.double() - oracle).norm() / oracle.norm())


# ---- KV-cache write ---------------------------------------------------------------------------

@gpu_test
@pytest.mark.parametrize("dtype", HALF_DTYPES + [torch.float32])
@pytest.mark.parametrize("tokens,kv_heads,head_dim,block_size", [(1, 8, 128, 16), (37, 2, 64, 32), (300, 1, 80, 8),
                                                                 (5, 4, 6, 16)])
def test_write_kv_cache(kernels, dtype, tokens, kv_heads, head_dim, block_size):
    gen = torch.Generator().manual_seed(tokens * 7 + head_dim)
    blocks = 3 * (tokens // block_size + 2)
    # k and v as strided views of one fused projection, as the decoder hands them over
    qkv = torch.randn(tokens, (2 + 2 * kv_heads) * head_dim, generator=gen).to("cuda", dtype)
    k = qkv[:, 2 * head_dim:(2 + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    v = qkv[:, (2 + kv_heads) * head_dim:].view(tokens, kv_heads, head_dim)
    slots = torch.randperm(blocks * block_size, generator=gen)[:tokens].cuda()  # scattered over blocks
    shape = (blocks, block_size, kv_heads, head_dim)
    k_cache, v_cache = (torch.randn(shape, generator=gen).to("cuda", dtype) for _ in range(2))
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    ops.write_kv_cache(k, v, k_cache, v_cache, slots)
    write_kv_cache_reference(k, v, k_ref, v_ref, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


@gpu_test
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_write_kv_cache_skips_negative_slots(kernels, dtype):
    k, v = torch.randn(4, 2, 64, device="cuda", dtype=dtype), torch.randn(4, 2, 64, device="cuda", dtype=dtype)
    k_cache = torch.zeros(4, 16, 2, 64, device="cuda", dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    ops.write_kv_cache(k, v, k_cache, v_cache, torch.tensor([5, -1, 40, -1], device="cuda"))
    flat_k = k_cache.view(-1, 2, 64)
    assert torch.equal(flat_k[5], k[0]) and torch.equal(flat_k[40], k[2])
    assert int((flat_k.abs().sum(dim=(1, 2)) != 0).sum()) == 2


# ---- paged decode attention -------------------------------------------------------------------

def _random_paged_batch(context_lens: List[int], heads: int, kv_heads: int, head_dim: int, block_size: int,
                        dtype: torch.dtype, seed: int):
    """q, caches and block tables whose blocks are scattered over a pool with holes between them."""
    gen = torch.Generator().manual_seed(seed)
    needed = [math.ceil((c + 1) / block_size) for c in context_lens]
    pool = 2 * sum(needed) + 3
    order = torch.randperm(pool, generator=gen).tolist()
    tables, at = [], 0
    for n in needed:
        spare = random.Random(seed + n).randint(0, 2)  # tables may be longer than the sequence needs
        tables.append(order[at:at + n] + order[:spare])
        at += n
    shape = (pool, block_size, kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to("cuda", dtype)
    v_cache = torch.randn(shape, generator=gen).to("cuda", dtype)
    q = torch.randn(len(context_lens), heads, head_dim, generator=gen).to("cuda", dtype)
    return q, k_cache, v_cache, tables


def _decode_oracle(q, k_cache, v_cache, meta, scale) -> torch.Tensor:
    return paged_attention_reference(q.double(), k_cache.double(), v_cache.double(), meta, scale)


DECODE_CASES = [
    # context lens,              heads, kv, dim, block, window
    ([0, 16, 255, 256, 511, 600], 8, 8, 128, 16, None),     # MHA, edges of 64- and 256-token partitions
    ([8191, 20000, 5], 32, 8, 128, 16, None),               # GQA 4, long: multi-block split
    ([9000, 31], 16, 1, 64, 32, None),                      # MQA
    ([3000, 700, 1], 28, 4, 128, 16, None),                 # GQA 7 (Qwen2.5-7B shape)
    ([1500, 64], 12, 2, 80, 16, None),                      # head_dim 80
    ([2100, 3], 8, 4, 256, 8, None),                        # head_dim 256
    ([9000, 100, 4000, 1023], 32, 8, 128, 16, 1024),        # sliding window, long
    ([700, 512, 513], 8, 2, 64, 16, 512),                   # window at partition edges
    ([300, 77, 130], 8, 2, 128, 12, None),                  # block size not a power of two (division)
    ([70, 3], 8, 8, 64, 1, None),                           # one-token blocks: 65 blocks a partition
    ([131071], 32, 8, 128, 16, None),                       # batch 1 at 128k keys: spans of 4 partitions
    ([301, 0, 4095] * 86, 32, 8, 128, 16, None),            # batch 258: one split per sequence
    ([1000, 300], 8, 2, 64, 1, None),                       # one-token blocks: 257 blocks a span
]


@gpu_test
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: f"h{c[1]}kv{c[2]}d{c[3]}ctx{max(c[0])}w{c[5]}")
def test_paged_decode_attention(kernels, dtype, case):
    context_lens, heads, kv_heads, head_dim, block_size, window = case
    q, k_cache, v_cache, tables = _random_paged_batch(context_lens, heads, kv_heads, head_dim, block_size, dtype,
                                                      seed=sum(context_lens) + heads)
    meta = build_attention_metadata([1] * len(context_lens), context_lens, tables, block_size, q.device, window)
    scale = head_dim ** -0.5
    out = ops.paged_attention(q, k_cache, v_cache, meta, scale)
    assert meta.decode is not None, "an all-decode CUDA step must take the kernel"
    if max(context_lens) + 1 > kernels.decode_partition_size:
        assert meta.decode.max_partitions > 1
    ref = paged_attention_reference(q, k_cache, v_cache, meta, scale)
    _assert_close(out, ref)
    assert _rel_error(out, _decode_oracle(q, k_cache, v_cache, meta, scale)) < ORACLE_REL[dtype]


@pytest.mark.xfail(strict=True, reason="the opt-in stream decode kernel failed 10 decode cases on the H200 on "
                   "2026-12-04 (h32kv8d128 at 4k-128k keys, a CUDA error that poisons the process); issue 15")
@gpu_test
def test_the_stream_decode_kernel_passes_the_decode_tests():
    """MAGA_DECODE_KERNEL=stream (src/kernels/cuda/paged_decode_stream.cu, read once per process):
    the decode and mixed-step tests of this file again, in a process that chose it."""
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                           "(paged_decode or mixed or graph) and not stream"],
                          env={**os.environ, "MAGA_DECODE_KERNEL": "stream"}, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:]
    assert " passed" in done.stdout.splitlines()[-1]


@gpu_test
@pytest.mark.parametrize("num_splits", [1, 2, 3, 7, 40, 400])
def test_paged_decode_attention_any_split_count(kernels, num_splits):
    """Fewer CTAs than partitions (each merges several, online softmax), as many, or more (the extra
    ones find no keys): all give the same attention; windows and short sequences included."""
    context_lens, window = [3000, 700, 1, 64, 2500], 1024
    q, k_cache, v_cache, tables = _random_paged_batch(context_lens, 16, 4, 128, 16, torch.bfloat16, seed=num_splits)
    meta = build_attention_metadata([1] * len(context_lens), context_lens, tables, 16, q.device, window)
    decode = ops.attention._decode_tensors(kernels, meta, q.device)
    out = torch.full_like(q, float("nan"))
    ops.paged_decode_attention(q, k_cache, v_cache, decode.block_tables, decode.seq_lens, 0.08, decode.max_partitions,
                               window, out=out, num_splits=num_splits)
    assert torch.isfinite(out).all()
    _assert_close(out, paged_attention_reference(q, k_cache, v_cache, meta, 0.08))
    assert _rel_error(out, _decode_oracle(q, k_cache, v_cache, meta, 0.08)) < ORACLE_REL[torch.bfloat16]


@gpu_test
def test_decode_splits_fill_the_gpu_without_idle_ctas(kernels):
    q = torch.empty(1, 32, 128, device="cuda")
    assert ops.attention.decode_splits(q, 8, 64) == 64  # batch 1: every partition its own CTA
    assert ops.attention.decode_splits(torch.empty(256, 32, 128, device="cuda"), 8, 64) == 1  # 2,048 CTAs already


@gpu_test
def test_paged_decode_attention_fp32_and_poisoned_output(kernels):
    context_lens = [4000, 77]
    q, k_cache, v_cache, tables = _random_paged_batch(context_lens, 8, 2, 128, 16, torch.float32, seed=3)
    meta = build_attention_metadata([1, 1], context_lens, tables, 16, q.device)
    decode = ops.attention._decode_tensors(kernels, meta, q.device)
    out = torch.full_like(q, float("nan"))  # every element must be written
    ops.paged_decode_attention(q, k_cache, v_cache, decode.block_tables, decode.seq_lens, 0.1,
                               decode.max_partitions + 3, out=out)  # a larger bound, as a CUDA graph would pass
    assert torch.isfinite(out).all()
    assert _rel_error(out, _decode_oracle(q, k_cache, v_cache, meta, 0.1)) < ORACLE_REL[torch.float32]


@gpu_test
def test_paged_decode_attention_strided_q(kernels):
    """q as a view of a fused [q | k] tensor, as the decoder passes it."""
    context_lens = [1200, 9]
    q, k_cache, v_cache, tables = _random_paged_batch(context_lens, 16, 4, 64, 16, torch.bfloat16, seed=5)
    qk = torch.cat([q, torch.randn(2, 4, 64, device="cuda", dtype=q.dtype)], dim=1)
    meta = build_attention_metadata([1, 1], context_lens, tables, 16, q.device)
    out = ops.paged_attention(qk[:, :16], k_cache, v_cache, meta, 0.125)
    _assert_close(out, paged_attention_reference(q, k_cache, v_cache, meta, 0.125))


@gpu_test
def test_mixed_step_decode_rows_take_the_kernel_and_disabled_kernels_use_the_reference(kernels, monkeypatch):
    context_lens = [40, 0]
    q, k_cache, v_cache, tables = _random_paged_batch(context_lens, 8, 2, 64, 16, torch.bfloat16, seed=9)
    q = torch.cat([q[:1], torch.randn(5, 8, 64, device="cuda", dtype=q.dtype)])  # one decode row, one prefill of 5
    meta = build_attention_metadata([1, 5], context_lens, tables, 16, q.device)
    out = ops.paged_attention(q, k_cache, v_cache, meta, 0.125)
    assert meta.mixed is not None and meta.decode is None
    _assert_close(out, paged_attention_reference(q, k_cache, v_cache, meta, 0.125))
    monkeypatch.setenv("MAGA_DISABLE_CUDA_KERNELS", "1")
    decode_meta = build_attention_metadata([1, 1], context_lens, tables, 16, q.device)
    out = ops.paged_attention(q[:2], k_cache, v_cache, decode_meta, 0.125)
    assert decode_meta.decode is None
    assert torch.equal(out, paged_attention_reference(q[:2], k_cache, v_cache, decode_meta, 0.125))


@gpu_test
@pytest.mark.parametrize("window", [None, 700])
def test_mixed_step_matches_the_oracle_without_syncing(kernels, window):
    """Long decodes interleaved with prompt chunks (fresh, and after cached tokens): the decode rows
    go to the kernel, the prompts to SDPA, each row lands where it belongs, and nothing in the
    attention waits for the device (a boolean-mask scatter did, in every layer)."""
    query_lens = [1, 37, 1, 1, 12, 1]
    context_lens = [3000, 0, 17, 900, 50, 0]
    keys = [c + n - 1 for c, n in zip(context_lens, query_lens)]  # _random_paged_batch sizes tables for ctx + 1
    _, k_cache, v_cache, tables = _random_paged_batch(keys, 16, 4, 128, 16, torch.bfloat16, seed=31)
    q = torch.randn(sum(query_lens), 16, 128, device="cuda", dtype=torch.bfloat16)
    meta = build_attention_metadata(query_lens, context_lens, tables, 16, q.device, window)
    ops.paged_attention(q, k_cache, v_cache, meta, 0.09)  # the first layer builds the step's index tensors
    assert meta.mixed is not None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any later layer that waits for the device raises
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            out = ops.paged_attention(q, k_cache, v_cache, meta, 0.09)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    names = {event.name for event in prof.events()}
    assert not names & {"aten::nonzero", "aten::item", "aten::_local_scalar_dense", "cudaStreamSynchronize"}
    _assert_close(out, paged_attention_reference(q, k_cache, v_cache, meta, 0.09))
    assert _rel_error(out, _decode_oracle(q, k_cache, v_cache, meta, 0.09)) < ORACLE_REL[torch.bfloat16]


@gpu_test
def test_paged_decode_attention_rejects_bad_input(kernels):
    q = torch.randn(2, 8, 64, device="cuda", dtype=torch.bfloat16)
    cache = torch.randn(4, 16, 2, 64, device="cuda", dtype=torch.bfloat16)
    tables = torch.zeros(2, 3, dtype=torch.int32, device="cuda")
    lens = torch.ones(2, dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="block_tables"):
        ops.paged_decode_attention(q, cache, cache, tables.long(), lens, 1.0, 1)
    with pytest.raises(ValueError, match="seq_lens"):
        ops.paged_decode_attention(q, cache, cache, tables, lens[:1], 1.0, 1)
    with pytest.raises(ValueError, match="head_dim"):
        ops.paged_decode_attention(q[..., :48], cache[..., :48].contiguous(), cache[..., :48].contiguous(), tables,
                                   lens, 1.0, 1)


# ---- RMSNorm ----------------------------------------------------------------------------------

NORM_SHAPES = [(1, 4096), (7, 5120), (33, 896), (3, 2, 64), (2, 1000)]


@gpu_test
@pytest.mark.parametrize("dtype", HALF_DTYPES + [torch.float32])
@pytest.mark.parametrize("shape", NORM_SHAPES)
def test_fused_add_rms_norm(kernels, dtype, shape):
    gen = torch.Generator().manual_seed(shape[-1] + len(shape))
    x, residual = (torch.randn(shape, generator=gen).to("cuda", dtype) for _ in range(2))
    weight = (1 + 0.1 * torch.randn(shape[-1], generator=gen)).to("cuda", dtype)
    normed, summed = ops.fused_add_rms_norm(x, residual, weight, 1e-6)
    ref_normed, ref_summed = fused_add_rms_norm_reference(x, residual, weight, 1e-6)
    assert torch.equal(summed, ref_summed)  # one rounding of x + residual, like torch's add
    _assert_close(normed, ref_normed)
    _assert_close(ops.rms_norm(x, weight, 1e-5), rms_norm_reference(x, weight, 1e-5))


@gpu_test
def test_rms_norm_strided_rows(kernels):
    x = torch.randn(6, 2 * 576, device="cuda", dtype=torch.bfloat16)[:, :576]  # rows with a stride
    weight = torch.randn(576, device="cuda", dtype=torch.bfloat16)
    _assert_close(ops.rms_norm(x, weight, 1e-6), rms_norm_reference(x, weight, 1e-6))


# ---- rotary -----------------------------------------------------------------------------------

ROTARY_CASES = [(1, 32, 8, 128, 128), (17, 16, 4, 128, 64), (5, 8, 8, 80, 32), (40, 14, 2, 64, 64), (3, 4, 1, 96, 24)]


def _cos_sin_table(positions: int, rotary_dim: int, theta: float = 10000.0):
    inv_freq = 1.0 / theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim)
    freqs = torch.arange(positions, dtype=torch.float32).unsqueeze(1) * inv_freq
    return freqs.cos().cuda(), freqs.sin().cuda()


@gpu_test
@pytest.mark.parametrize("dtype", HALF_DTYPES + [torch.float32])
@pytest.mark.parametrize("tokens,q_heads,kv_heads,head_dim,rotary_dim", ROTARY_CASES)
def test_apply_rotary(kernels, dtype, tokens, q_heads, kv_heads, head_dim, rotary_dim):
    gen = torch.Generator().manual_seed(tokens + head_dim + rotary_dim)
    heads = q_heads + kv_heads
    qkv = torch.randn(tokens, (heads + kv_heads) * head_dim, generator=gen).to("cuda", dtype)
    qk = qkv[:, :heads * head_dim].view(tokens, heads, head_dim)  # strided, as in the decoder
    cos_table, sin_table = _cos_sin_table(4096, rotary_dim)
    positions = torch.randint(0, 4096, (tokens,), generator=gen).cuda()
    cos, sin = cos_table[positions].unsqueeze(1), sin_table[positions].unsqueeze(1)
    _assert_close(ops.apply_rotary(qk, cos, sin, rotary_dim), apply_rotary_reference(qk, cos, sin, rotary_dim))

    q, k = qk[:, :q_heads], qk[:, q_heads:]  # in place, one launch for both
    q_ref, k_ref, v_before = q.clone(), k.clone(), qkv[:, heads * head_dim:].clone()
    ops.apply_rotary_qk_(q, k, positions, cos_table, sin_table, rotary_dim)
    apply_rotary_qk_reference(q_ref, k_ref, positions, cos_table, sin_table, rotary_dim)
    _assert_close(q, q_ref)
    _assert_close(k, k_ref)
    assert torch.equal(qkv[:, heads * head_dim:], v_before)  # the rest of the row is untouched


@gpu_test
@pytest.mark.parametrize("dtype", HALF_DTYPES + [torch.float32])
@pytest.mark.parametrize("tokens,q_heads,kv_heads,head_dim,rotary_dim", ROTARY_CASES)
def test_rotate_and_write_kv(kernels, dtype, tokens, q_heads, kv_heads, head_dim, rotary_dim):
    """Rotary and the KV-cache write in one kernel: the queries as apply_rotary's reference gives
    them, the caches as write_kv_cache's reference leaves them (rotated keys, values as they are) at
    scattered slots; a padding slot (-1) writes nothing and the projection is not modified."""
    from maga_transformer.ops.rotary import rotate_and_write_kv
    gen = torch.Generator().manual_seed(tokens * 5 + head_dim + rotary_dim)
    heads, block_size = q_heads + kv_heads, 16
    qkv = torch.randn(tokens, (heads + kv_heads) * head_dim, generator=gen).to("cuda", dtype)
    qk = qkv[:, :heads * head_dim].view(tokens, heads, head_dim)
    v = qkv[:, heads * head_dim:].view(tokens, kv_heads, head_dim)
    cos_table, sin_table = _cos_sin_table(4096, rotary_dim)
    positions = torch.randint(0, 4096, (tokens,), generator=gen).cuda()
    cos, sin = cos_table[positions].unsqueeze(1), sin_table[positions].unsqueeze(1)
    blocks = 2 * (tokens // block_size + 2)
    slots = torch.randperm(blocks * block_size, generator=gen)[:tokens].cuda()
    slots[tokens // 2] = -1
    shape = (blocks, block_size, kv_heads, head_dim)
    k_cache, v_cache = (torch.randn(shape, generator=gen).to("cuda", dtype) for _ in range(2))
    k_ref, v_ref, qkv_before = k_cache.clone(), v_cache.clone(), qkv.clone()

    q = rotate_and_write_kv(qk, v, cos, sin, rotary_dim, q_heads, k_cache, v_cache, slots)
    rotated = apply_rotary_reference(qk, cos, sin, rotary_dim)
    kept = slots >= 0
    write_kv_cache_reference(rotated[kept, q_heads:], v[kept], k_ref, v_ref, slots[kept])
    _assert_close(q, rotated[:, :q_heads])
    _assert_close(k_cache, k_ref)
    assert torch.equal(v_cache, v_ref) and torch.equal(qkv, qkv_before)


# ---- gated activations ------------------------------------------------------------------------

# widths of whole 16-byte chunks take the vectorized kernel, 999 the one-element one
ACT_SHAPES = [(1, 2 * 14336), (5, 2 * 1000), (2, 3, 2 * 64), (64, 2 * 4864), (3, 2 * 999)]


@gpu_test
@pytest.mark.parametrize("dtype", HALF_DTYPES + [torch.float32])
@pytest.mark.parametrize("shape", ACT_SHAPES)
@pytest.mark.parametrize("kind", ["silu", "gelu", "gelu_tanh"])
def test_gated_activation(kernels, dtype, shape, kind):
    gen = torch.Generator().manual_seed(shape[-1] + len(kind))
    gate_up = (3 * torch.randn(shape, generator=gen)).to("cuda", dtype)
    if kind == "silu":
        out, ref = ops.silu_and_mul(gate_up), silu_and_mul_reference(gate_up)
    else:
        approximate = "tanh" if kind == "gelu_tanh" else "none"
        out, ref = ops.gelu_and_mul(gate_up, approximate), gelu_and_mul_reference(gate_up, approximate)
    _assert_close(out, ref)


@gpu_test
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_gated_activation_of_a_strided_view(kernels, dtype):
    """Rows 2 * 512 + 3 elements apart (not whole 16-byte chunks): the one-element kernel, right."""
    wide = (3 * torch.randn(6, 2 * 512 + 3, generator=torch.Generator().manual_seed(5))).to("cuda", dtype)
    gate_up = wide[:, 1:1 + 2 * 512]
    _assert_close(ops.silu_and_mul(gate_up), silu_and_mul_reference(gate_up))


# ---- GEMV (one row) ---------------------------------------------------------------------------

# (300, 3000): the second tile prefetched into shared memory is a partial one
GEMV_SHAPES = [(6144, 4096), (4096, 14336), (4097, 4096), (100, 64), (7, 8), (1000, 16384), (300, 3000)]


@gpu_test
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("shape", GEMV_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_gemv_matches_the_float64_product(kernels, dtype, shape):
    """One row against [out, in] weights (narrow and wide outputs take 1, 2 or 4 rows a warp; 4097
    leaves a partial last warp): within bf16 / fp16 rounding of the float64 product, like cuBLAS."""
    out_features, in_features = shape
    gen = torch.Generator().manual_seed(out_features + in_features)
    x = torch.randn(1, in_features, generator=gen).to("cuda", dtype)
    weight = (torch.randn(out_features, in_features, generator=gen) / in_features ** 0.5).to("cuda", dtype)
    out = torch.empty(1, out_features, dtype=dtype, device="cuda")
    assert kernels.gemv(out, x, weight) == 0
    exact = x.double() @ weight.double().T
    cublas = torch.nn.functional.linear(x, weight)
    assert _rel_error(out, exact) <= 1.5 * _rel_error(cublas, exact) + 1e-3


@gpu_test
def test_linear_takes_the_gemv_for_one_row_only(kernels):
    from maga_transformer.ops.linear import prepare_linear
    w = prepare_linear(torch.randn(512, 256, device="cuda", dtype=torch.bfloat16))

    def kernel_names(x):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            ops.linear(x, w)
            torch.cuda.synchronize()
        return " ".join(e.key for e in prof.key_averages())

    assert "gemv_kernel" in kernel_names(torch.randn(1, 256, device="cuda", dtype=torch.bfloat16))
    assert "gemv_kernel" not in kernel_names(torch.randn(2, 256, device="cuda", dtype=torch.bfloat16))
    bias = torch.randn(512, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1, 256, device="cuda", dtype=torch.bfloat16)
    _assert_close(ops.linear(x, w, bias), torch.nn.functional.linear(x, w.weight, bias))  # cuBLAS with a bias


# ---- sampling row statistics ------------------------------------------------------------------

@gpu_test
@pytest.mark.parametrize("rows,vocab,pad", [(1, 128256, 0), (7, 1001, 3), (300, 4096, 0), (5, 4096, 4)])
def test_row_argmax_logsumexp_matches_torch(kernels, rows, vocab, pad):
    """First argmax and logsumexp per row: ties (the first index wins, as torch.argmax), masked -inf
    entries, a fully masked row, a vocabulary not a multiple of 4, rows of a wider tensor (pad)."""
    from maga_transformer.ops.sampling import row_argmax_logsumexp, row_argmax_logsumexp_reference
    gen = torch.Generator().manual_seed(rows + vocab)
    logits = (torch.randn(rows, vocab + pad, generator=gen) * 4).cuda()[:, :vocab]
    logits[0, vocab // 3] = logits[0, vocab // 2] = logits[0].max() + 1  # a tie for the max
    if rows > 1:
        logits[1, ::2] = float("-inf")
        logits[-1] = float("-inf")
    argmax, lse = row_argmax_logsumexp(logits)
    ref_argmax, ref_lse = row_argmax_logsumexp_reference(logits)
    assert argmax.tolist() == ref_argmax.tolist()
    assert int(argmax[0]) == vocab // 3
    torch.testing.assert_close(lse, ref_lse, rtol=1e-6, atol=1e-5)


# ---- CUDA graphs ------------------------------------------------------------------------------

@gpu_test
def test_kernels_replay_in_a_cuda_graph(kernels):
    """A decode step's kernels capture into a CUDA graph (no host sync, no data-dependent
    allocation) and a replay on new inputs gives what eager calls give."""
    context_lens = [3000, 17, 600]
    q, k_cache, v_cache, tables = _random_paged_batch(context_lens, 16, 4, 128, 16, torch.bfloat16, seed=11)
    meta = build_attention_metadata([1] * 3, context_lens, tables, 16, q.device)
    decode = ops.attention._decode_tensors(kernels, meta, q.device)
    slots = torch.tensor([tables[i][c // 16] * 16 + c % 16 for i, c in enumerate(context_lens)], device="cuda")
    k_new, v_new = (torch.randn(3, 4, 128, device="cuda", dtype=q.dtype) for _ in range(2))
    x, residual = torch.randn(3, 2048, device="cuda", dtype=q.dtype), torch.randn(3, 2048, device="cuda", dtype=q.dtype)
    weight = torch.randn(2048, device="cuda", dtype=q.dtype)
    projection = ops.prepare_linear(torch.randn(512, 2048, device="cuda", dtype=q.dtype) / 50)

    def step():
        ops.write_kv_cache(k_new, v_new, k_cache, v_cache, slots)
        attn = ops.paged_decode_attention(q, k_cache, v_cache, decode.block_tables, decode.seq_lens, 0.09,
                                          max_partitions=decode.max_partitions)
        normed = ops.fused_add_rms_norm(x, residual, weight, 1e-6)[0]
        return attn, normed, ops.linear(normed[:1], projection)  # the GEMV reads the norm's output

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside the capture, as torch.cuda.graph asks
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        attn_out, norm_out, projected = step()
    for t in (q, k_new, v_new, x, residual):
        t.copy_(torch.randn_like(t))
    graph.replay()
    torch.cuda.synchronize()
    eager_attn, eager_norm, eager_projected = step()
    assert torch.equal(attn_out, eager_attn) and torch.equal(norm_out, eager_norm)
    assert torch.equal(projected, eager_projected)
    _assert_close(attn_out, paged_attention_reference(q, k_cache, v_cache, meta, 0.09))


@gpu_test
@pytest.mark.parametrize("query_lens,context_lens", [([40, 7], [0, 30]), ([33, 33], [0, 0])],
                         ids=["masked", "plain_causal"])
def test_prefill_attention_avoids_cudnn_plan_builds(kernels, query_lens, context_lens):
    """cuDNN's SDPA builds a plan for every new shape (tenths of a second each), so prefill attention
    must run flash / memory-efficient kernels instead, under a mask (a prompt after cached tokens,
    padded rows) or plain causal (fresh prompts of one length); both match the float64 oracle."""
    tables_for = [q + c - 1 for q, c in zip(query_lens, context_lens)]  # tables sized for every key
    _, k_cache, v_cache, tables = _random_paged_batch(tables_for, 16, 4, 128, 16, torch.bfloat16, seed=21)
    q = torch.randn(sum(query_lens), 16, 128, device="cuda", dtype=torch.bfloat16)
    meta = build_attention_metadata(query_lens, context_lens, tables, 16, q.device)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                            torch.profiler.ProfilerActivity.CPU]) as prof:
        out = ops.paged_attention(q, k_cache, v_cache, meta, 0.09)
        torch.cuda.synchronize()
    names = [event.name for event in prof.events()]
    assert not [n for n in names if "cudnn" in n.lower()], "prefill attention went to cuDNN"
    assert meta.flash is not None and meta.flash[0] is not None, "prompt rows did not take flash varlen"
    assert _rel_error(out, _decode_oracle(q, k_cache, v_cache, meta, 0.09)) < ORACLE_REL[torch.bfloat16]


# ---- prompt rows through flash varlen (ops/flash_prefill.py) ----------------------------------

PREFILL_CASES = [
    # query lens,        context lens,     heads, kv, dim, block, window
    ([300, 1, 57], [0, 40, 1000], 32, 8, 128, 16, None),  # fresh prompt, a decode row, a chunk after cache
    ([2048], [32000], 32, 8, 128, 16, None),               # a chunk after 32k cached keys
    ([200, 130], [5000, 0], 16, 1, 64, 32, None),          # MQA, head_dim 64
    ([90, 33], [700, 12], 28, 4, 128, 16, None),           # GQA 7
    ([64, 64], [100, 0], 12, 2, 80, 16, None),             # head_dim 80
    ([40, 9], [300, 0], 8, 8, 96, 16, None),               # head_dim 96
    ([100, 7], [200, 31], 8, 4, 256, 8, None),             # head_dim 256
    ([500, 300], [3000, 0], 32, 8, 128, 16, 1024),         # sliding window reaching into the cache
    ([77, 13], [130, 5], 8, 2, 128, 12, None),             # block size not a power of two
]


@gpu_test
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("case", PREFILL_CASES, ids=lambda c: f"q{max(c[0])}ctx{max(c[1])}h{c[2]}kv{c[3]}d{c[4]}w{c[6]}")
def test_prompt_rows_take_flash_varlen_and_match_the_oracle(case, dtype):
    """Chunks after cached tokens (block tables with holes), fresh prompts and decode rows in one
    step: flash's varlen kernel against the float64 reference; no padded group is built."""
    query_lens, context_lens, heads, kv_heads, head_dim, block, window = case
    keys = [q + c - 1 for q, c in zip(query_lens, context_lens)]
    _, k_cache, v_cache, tables = _random_paged_batch(keys, heads, kv_heads, head_dim, block, dtype, seed=sum(keys))
    q = torch.randn(sum(query_lens), heads, head_dim, device="cuda", dtype=dtype)
    meta = build_attention_metadata(query_lens, context_lens, tables, block, q.device, sliding_window=window)
    out = ops.paged_attention(q, k_cache, v_cache, meta, head_dim ** -0.5)
    assert meta.flash is not None and meta.flash[0] is not None and meta.groups is None
    oracle = _decode_oracle(q, k_cache, v_cache, build_attention_metadata(
        query_lens, context_lens, tables, block, q.device, sliding_window=window), head_dim ** -0.5)
    assert _rel_error(out, oracle) < ORACLE_REL[dtype]


@gpu_test
def test_prompt_rows_with_alibi_match_the_oracle(caplog):
    """ALiBi prompt rows: flash's varlen kernel with the slopes where this torch's flash build takes
    them, else (torch builds flash with ALiBi compiled out) the padded reference, which says so once."""
    from maga_transformer.ops import flash_prefill
    from maga_transformer.ops.attention import alibi_slopes
    query_lens, context_lens = [120, 1, 33], [0, 50, 400]
    keys = [q + c - 1 for q, c in zip(query_lens, context_lens)]
    _, k_cache, v_cache, tables = _random_paged_batch(keys, 16, 16, 64, 16, torch.bfloat16, seed=5)
    q = torch.randn(sum(query_lens), 16, 64, device="cuda", dtype=torch.bfloat16)
    slopes = alibi_slopes(16).cuda()
    meta = build_attention_metadata(query_lens, context_lens, tables, 16, q.device)
    flash_prefill._flash_works.pop((False, True), None)  # learn afresh, so the log line appears here
    with caplog.at_level("INFO", logger="maga_transformer.ops.flash_prefill"):
        out = ops.paged_attention(q, k_cache, v_cache, meta, 0.125, alibi_slopes=slopes)
    oracle = paged_attention_reference(q.double(), k_cache.double(), v_cache.double(),
                                       build_attention_metadata(query_lens, context_lens, tables, 16, q.device),
                                       0.125, alibi_slopes=slopes.double())
    assert _rel_error(out, oracle) < ORACLE_REL[torch.bfloat16]
    took_flash = meta.flash is not None and meta.flash[0] is not None
    assert took_flash or "unavailable for window=False alibi=True" in caplog.text


@gpu_test
def test_flash_prompt_rows_read_a_quantized_cache(kernels):
    from maga_transformer.ops.kv_cache import allocate_kv
    query_lens, context_lens = [64, 1], [500, 90]
    keys = [q + c for q, c in zip(query_lens, context_lens)]
    _, k_src, v_src, tables = _random_paged_batch(keys, 16, 4, 128, 16, torch.bfloat16, seed=9)
    k_cache, v_cache = (allocate_kv(k_src.shape, torch.bfloat16, torch.device("cuda"), "int8") for _ in range(2))
    slots = torch.arange(k_src.shape[0] * 16, device="cuda")
    write_kv_cache_reference(k_src.view(-1, 4, 128), v_src.view(-1, 4, 128), k_cache, v_cache, slots)
    q = torch.randn(sum(query_lens), 16, 128, device="cuda", dtype=torch.bfloat16)
    meta = build_attention_metadata(query_lens, context_lens, tables, 16, q.device)
    out = ops.paged_attention(q, k_cache, v_cache, meta, 0.09)
    ref = paged_attention_reference(q, k_cache, v_cache, build_attention_metadata(
        query_lens, context_lens, tables, 16, q.device), 0.09)
    assert meta.flash is not None and meta.flash[0] is not None
    assert _rel_error(out, ref.double()) < ORACLE_REL[torch.bfloat16]
