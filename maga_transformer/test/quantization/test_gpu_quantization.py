"""Quantized weights and KV cache on the GPU (the `gpu` marker; skipped without CUDA).

Kernels against float64 references on fresh random inputs: our int8 GEMV (one row, widths that are
no multiple of its tile), the int8 prefill path (many rows), FP8 W8A8 (1..4 rows and many). Engine:
int8 weights against the same engine on the dequantized weights (bf16), FP8 weights close to bf16,
and the quantized KV cache against transformers with the same rounding, on the GPU."""
from __future__ import annotations

import pytest
import torch

from maga_transformer import ops
from maga_transformer.config import EngineConfig, ModelConfig
from maga_transformer.model_factory import ModelFactory
from maga_transformer.ops.linear import fp8_linear_reference, fp8_supported
from maga_transformer.test.fixtures import PARITY_PROMPTS, run_greedy, tiny_llama

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
pytestmark = [pytest.mark.gpu, cuda]


def _fp8_or_skip():
    reason = fp8_supported(torch.device("cuda"))
    if reason is not None:
        pytest.skip(reason)


def _int8_reference(x, w):
    return x.double() @ w.dequantized(torch.float64).T


@pytest.mark.parametrize("rows", [1, 2, 4, 300])
@pytest.mark.parametrize("out_features, in_features", [(4096, 4096), (1000, 1040), (77, 4112), (14336, 16384)])
def test_int8_linear_on_the_gpu(rows, out_features, in_features):
    torch.manual_seed(rows + in_features)
    w = ops.prepare_int8_linear(torch.randn(out_features, in_features, device="cuda"))
    x = torch.randn(rows, in_features, device="cuda", dtype=torch.bfloat16)
    out = ops.linear(x, w)
    ref = _int8_reference(x, w)
    assert out.dtype == torch.bfloat16
    assert (out.double() - ref).abs().max() <= 0.01 * ref.abs().max() + 1e-2, (rows, out_features, in_features)


@pytest.mark.parametrize("kind", ["int8", "fp8"])
@pytest.mark.parametrize("out_features, in_features", [(512, 1024), (1000, 1040), (77, 4112), (6144, 16384)])
def test_the_cuda_byte_weight_gemv_serves_one_row(kind, out_features, in_features):
    from maga_transformer.ops._cuda import kernels_for
    if kind == "fp8":
        _fp8_or_skip()
    torch.manual_seed(out_features + in_features)
    x = torch.randn(1, in_features, device="cuda", dtype=torch.bfloat16)
    prepare = ops.prepare_int8_linear if kind == "int8" else ops.prepare_fp8_linear
    w = prepare(torch.randn(out_features - out_features % 16, in_features, device="cuda"))
    kernels = kernels_for(x)
    assert kernels is not None and hasattr(kernels, "gemv_byte_weight")
    out = torch.empty(1, w.out_features, device="cuda", dtype=torch.bfloat16)
    assert kernels.gemv_byte_weight(out, x, w.qweight, w.scale) == 0
    ref = _int8_reference(x, w)  # x unrounded times the dequantized weight, for either byte kind
    assert (out.double() - ref).abs().max() <= 0.01 * ref.abs().max()


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 64, 1024])
@pytest.mark.parametrize("out_features, in_features", [(4096, 4096), (1008, 4112)])
def test_fp8_linear_matches_its_float64_reference(rows, out_features, in_features):
    _fp8_or_skip()
    torch.manual_seed(rows)
    w = ops.prepare_fp8_linear(torch.randn(out_features, in_features, device="cuda"))
    x = torch.randn(rows, in_features, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(out_features, device="cuda", dtype=torch.bfloat16)
    out = ops.linear(x, w, bias)
    ref = fp8_linear_reference(x, w, bias, weight_only=rows == 1)  # one row: the byte-weight GEMV
    assert (out.double() - ref).abs().max() <= 0.01 * ref.abs().max(), rows


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    _, directory = tiny_llama(str(tmp_path_factory.mktemp("llama")), seed=5, vocab_size=128,
                              max_position_embeddings=128)
    return directory


def _gpu_model(directory, weight_type="bf16", **engine):
    return ModelFactory.from_huggingface(
        directory, ModelConfig(seq_size_per_block=4, max_seq_len=128, act_type="bf16", weight_type=weight_type),
        engine_config=EngineConfig(num_kv_blocks=128, engine_process=False, **engine), device="cuda")


def test_int8_engine_equals_the_dequantized_engine_on_the_gpu(checkpoint):
    import dataclasses
    quantized, oracle = _gpu_model(checkpoint, "int8"), _gpu_model(checkpoint)
    try:
        for q_layer, o_layer in zip(quantized.model.layers, oracle.model.layers):
            for field in dataclasses.fields(q_layer):
                value = getattr(q_layer, field.name)
                if isinstance(value, ops.LinearWeight) and value.qweight is not None:
                    setattr(o_layer, field.name, ops.prepare_linear(value.dequantized(torch.bfloat16)))
        assert "with int8 weights" in quantized.engine.info.description
        ours = run_greedy(quantized.engine, PARITY_PROMPTS, 16)
        assert ours == run_greedy(oracle.engine, PARITY_PROMPTS, 16)
    finally:
        quantized.stop()
        oracle.stop()


def test_fp8_engine_runs_close_to_bf16(checkpoint):
    _fp8_or_skip()
    fp8, bf16 = _gpu_model(checkpoint, "fp8"), _gpu_model(checkpoint)
    try:
        assert "with fp8 weights" in fp8.engine.info.description
        ours, base = run_greedy(fp8.engine, PARITY_PROMPTS, 16), run_greedy(bf16.engine, PARITY_PROMPTS, 16)
        assert all(len(o) > 0 for o in ours)
        agree = sum(a == b for o, r in zip(ours, base) for a, b in zip(o, r)) / sum(len(r) for r in base)
        assert agree >= 0.5, (ours, base)
    finally:
        fp8.stop()
        bf16.stop()


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_quantized_kv_cache_on_the_gpu_equals_transformers(kind, tmp_path):
    from maga_transformer.test.quantization.test_kv_cache_quantization import FakeQuantizedCache
    import transformers as tf
    from maga_transformer.test.fixtures import save_tiny_checkpoint
    torch.manual_seed(8)
    hf = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                            vocab_size=128, num_attention_heads=2, num_key_value_heads=1,
                                            max_position_embeddings=256, eos_token_id=2, bos_token_id=1)).eval()
    directory = save_tiny_checkpoint(hf, str(tmp_path))
    model = ModelFactory.from_huggingface(
        directory, ModelConfig(seq_size_per_block=8, max_seq_len=256, act_type="fp32"),
        engine_config=EngineConfig(num_kv_blocks=64, engine_process=False, kv_cache_dtype=kind,
                                   max_num_batched_tokens=16), device="cuda")
    try:
        ours = run_greedy(model.engine, PARITY_PROMPTS, 24, ignore_eos=True)
    finally:
        model.stop()
    with torch.no_grad():
        want = [hf.generate(torch.tensor([p]), past_key_values=FakeQuantizedCache(kind), max_new_tokens=24,
                            do_sample=False, pad_token_id=0, eos_token_id=None)[0, len(p):].tolist()
                for p in PARITY_PROMPTS]
    assert ours == want


# ---- the quantized KV cache's CUDA kernels ----------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_quantized_cache_write_kernel_equals_the_torch_reference(kind, dtype):
    from maga_transformer.ops.kv_cache import write_kv_cache_reference
    torch.manual_seed(3)
    shape = (16, 8, 4, 128)
    k = torch.randn(40, 4, 128, device="cuda", dtype=dtype) * torch.logspace(-2, 2, 40, device="cuda")[:, None, None].to(dtype)
    v = torch.randn(40, 4, 128, device="cuda", dtype=dtype)
    k[5] = 0
    slots = torch.randperm(128, device="cuda")[:40]
    slots[7] = -1  # a padding row: skipped by the kernel
    caches = [ops.allocate_kv(shape, dtype, torch.device("cuda"), kind) for _ in range(4)]
    ops.write_kv_cache(k, v, caches[0], caches[1], slots)
    keep = slots >= 0
    write_kv_cache_reference(k[keep], v[keep], caches[2], caches[3], slots[keep])
    for ours, ref in ((caches[0], caches[2]), (caches[1], caches[3])):
        assert torch.equal(ours.data.view(torch.uint8), ref.data.view(torch.uint8))
        assert torch.equal(ours.scale, ref.scale)
    assert bool((caches[0].scale.view(-1, 4)[slots[keep]] > 0).all())


def _float64_decode(q, k, v, scale, window=None):
    """q [H, D] against keys / values [L, KVH, D], float64."""
    group = q.shape[0] // k.shape[1]
    kk = k.double().repeat_interleave(group, dim=1)
    vv = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("hd,lhd->hl", q.double(), kk) * scale
    if window:
        scores[:, :max(0, k.shape[0] - window)] = -float("inf")
    return torch.einsum("hl,lhd->hd", scores.softmax(-1), vv)


@pytest.mark.parametrize("kind", ["int8", "fp8"])
@pytest.mark.parametrize("head_dim, heads, kv_heads", [(128, 32, 8), (64, 8, 1), (96, 4, 4), (256, 8, 2)])
@pytest.mark.parametrize("window", [None, 300])
def test_decode_kernel_reads_quantized_caches(kind, head_dim, heads, kv_heads, window):
    """Block tables with holes and blocks out of order, contexts from 1 to 5,000 keys, a shared
    prefix: the kernel against float64 attention over the dequantized cache."""
    from maga_transformer.ops.kv_cache import read_kv
    torch.manual_seed(head_dim + heads)
    block = 16
    lengths = [1, 77, 5000, 640]
    num_blocks = sum((n + block - 1) // block for n in lengths) + 40
    k_cache, v_cache = (ops.allocate_kv((num_blocks, block, kv_heads, head_dim), torch.bfloat16,
                                        torch.device("cuda"), kind) for _ in range(2))
    free = torch.randperm(num_blocks).tolist()
    tables = []
    for n in lengths:
        tables.append([free.pop() for _ in range((n + block - 1) // block)])
    tables[3][:4] = tables[2][:4]  # the last sequence shares the long one's first 64 tokens
    for table, n in zip(tables, lengths):
        slots = torch.tensor([table[i // block] * block + i % block for i in range(n)], device="cuda")
        k = torch.randn(n, kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(n, kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)
        if table is tables[3]:
            k, v, slots = k[64:], v[64:], slots[64:]
        ops.write_kv_cache(k, v, k_cache, v_cache, slots)
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device="cuda")
    seq_lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    q = torch.randn(len(lengths), heads, head_dim, device="cuda", dtype=torch.bfloat16)
    scale = head_dim ** -0.5
    out = ops.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, max_partitions=100,
                                     sliding_window=window)
    for i, (table, n) in enumerate(zip(tables, lengths)):
        slots = torch.tensor([table[j // block] * block + j % block for j in range(n)], device="cuda")
        want = _float64_decode(q[i], read_kv(k_cache, slots, torch.float64), read_kv(v_cache, slots, torch.float64),
                               scale, window)
        assert (out[i].double() - want).abs().max() <= 0.02 * want.abs().max() + 2e-3, (kind, i, n)


@pytest.fixture(scope="module")
def checkpoint_head64(tmp_path_factory):
    """A tiny LLaMA whose head_dim (64) the decode kernel serves."""
    import transformers as tf
    from maga_transformer.test.fixtures import save_tiny_checkpoint
    torch.manual_seed(9)
    hf = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                            vocab_size=128, num_attention_heads=4, num_key_value_heads=2,
                                            max_position_embeddings=256, eos_token_id=2, bos_token_id=1))
    return save_tiny_checkpoint(hf, str(tmp_path_factory.mktemp("llama64")))


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_quantized_kv_engine_with_cuda_graphs(checkpoint_head64, kind):
    """bf16 engine, quantized cache: decode captured in CUDA graphs (the quantizing write and the
    decode kernel inside them) against the same engine without graphs; the kernel itself is checked
    against float64 above."""
    import os
    graphs = _gpu_model(checkpoint_head64, kv_cache_dtype=kind)
    os.environ["MAGA_DISABLE_CUDA_GRAPHS"] = "1"
    try:
        reference = _gpu_model(checkpoint_head64, kv_cache_dtype=kind)
        reference.engine  # built on first use: while graphs are off
    finally:
        del os.environ["MAGA_DISABLE_CUDA_GRAPHS"]
    try:
        assert graphs.engine.core.runner.graphs is not None and reference.engine.core.runner.graphs is None
        ours = run_greedy(graphs.engine, PARITY_PROMPTS, 24, ignore_eos=True)
        want = run_greedy(reference.engine, PARITY_PROMPTS, 24, ignore_eos=True)
        agree = sum(a == b for o, r in zip(ours, want) for a, b in zip(o, r)) / sum(len(r) for r in want)
        assert agree >= 0.9, (ours, want)
    finally:
        graphs.stop()
        reference.stop()


@pytest.mark.parametrize("rows, cols", [(1, 4096), (3, 1000), (1024, 14336)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fp8_activation_kernel_equals_the_torch_reference(rows, cols, dtype):
    from maga_transformer.ops.linear import _quantize_activation_rows, quantize_fp8_rows
    from maga_transformer.ops._cuda import kernels_for
    x = torch.randn(rows, cols, device="cuda", dtype=dtype) * 3
    x[0, :7] = 0
    if rows > 2:
        x[2] = 0  # an all-zero row: scale 1
    assert hasattr(kernels_for(x), "quantize_rows_fp8")
    q, scale = _quantize_activation_rows(x)
    q_ref, scale_ref = quantize_fp8_rows(x)
    assert torch.equal(scale, scale_ref) and torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
