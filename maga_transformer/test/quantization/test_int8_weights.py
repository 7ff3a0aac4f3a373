"""WEIGHT_TYPE=INT8 (weight-only, per output channel, quantized while loading).

Kernel: our CPU int8 GEMV and the dequantizing reference against a float64 dequantize-then-matmul
on fresh random inputs (1..4 and 16 rows, widths that are no multiple of the vector width, bias or
not). Engine: for tiny models of several families (dense GQA, MQA, MoE, ALiBi, GPT-style MQA), the
int8 engine against the same engine whose projections hold the dequantized int8 weights in fp32:
the quantization is the only difference, so prompt log-probs agree within fp32 rounding and the
greedy tokens are equal; and the int8 weights really differ from the checkpoint's."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers as tf

from maga_transformer import ops
from maga_transformer.config import EngineConfig, ModelConfig
from maga_transformer.config.generate_config import GenerateConfig
from maga_transformer.config.model_config import WEIGHT_TYPE
from maga_transformer.model_factory import ModelFactory
from maga_transformer.ops._compiled import cpu_kernels
from maga_transformer.test.fixtures import PARITY_PROMPTS, perturb_vector_parameters, run_greedy, save_tiny_checkpoint

LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, vocab_size=128, max_position_embeddings=128,
             eos_token_id=2, bos_token_id=1, num_attention_heads=4)
CASES = {
    "llama_gqa": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(LLAMA, num_key_value_heads=2)),
    "llama_mqa_biased": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(LLAMA, num_key_value_heads=1, attention_bias=True)),
    "mixtral": (tf.MixtralConfig, tf.MixtralForCausalLM, dict(LLAMA, intermediate_size=96, num_key_value_heads=2,
                                                              num_local_experts=4, num_experts_per_tok=2)),
    "bloom_alibi": (tf.BloomConfig, tf.BloomForCausalLM, dict(n_layer=2, vocab_size=128, hidden_size=64, n_head=4,
                                                              eos_token_id=2, bos_token_id=1)),
    "gpt_bigcode_mqa": (tf.GPTBigCodeConfig, tf.GPTBigCodeForCausalLM,
                        dict(n_embd=64, n_inner=128, n_layer=2, n_head=4, vocab_size=128, n_positions=128,
                             eos_token_id=2, bos_token_id=1, multi_query=True)),
}


def _reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias) -> torch.Tensor:
    out = x.double() @ (q.double() * scale.double()[:, None]).T
    return out if bias is None else out + bias.double()


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 16, 40])
@pytest.mark.parametrize("out_features, in_features", [(96, 64), (130, 577), (17, 1000)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_int8_linear_matches_float64_dequantized(rows, out_features, in_features, with_bias):
    generator = torch.Generator().manual_seed(rows * 1000 + in_features)
    weight = torch.randn(out_features, in_features, generator=generator)
    x = torch.randn(rows, in_features, generator=generator)
    bias = torch.randn(out_features, generator=generator) if with_bias else None
    w = ops.prepare_int8_linear(weight)
    assert w.qweight.dtype == torch.int8 and w.weight is None and int(w.qweight.abs().max()) == 127
    out = ops.linear(x, w, bias)
    assert (out.double() - _reference(x, w.qweight, w.scale, bias)).abs().max() <= _kernel_error_bound(x, w)
    # and the quantization error itself is what per-channel int8 allows: half a step per weight
    assert (w.dequantized(torch.float32) - weight).abs().max() <= w.scale.max() / 2 + 1e-6


def _kernel_error_bound(x: torch.Tensor, w: ops.LinearWeight) -> float:
    """The CPU kernel rounds each activation row to int16 with scale absmax / 32767: an error of half
    a step per element, times the weights' magnitudes, plus fp32 rounding."""
    half_step = x.abs().amax().double() / 32767 / 2
    return float(w.dequantized(torch.float64).abs().sum(dim=1).max() * half_step) + 1e-4


def test_the_cpu_int8_gemv_serves_few_rows():
    assert cpu_kernels() is not None and hasattr(cpu_kernels(), "gemv_i8")
    w = ops.prepare_int8_linear(torch.randn(8, 33))
    x = torch.randn(2, 33)
    out = cpu_kernels().gemv_i8(x, w.qweight, w.scale).double()
    assert (out - _reference(x, w.qweight, w.scale, None)).abs().max() <= _kernel_error_bound(x, w)


def test_zero_rows_dequantize_to_zero():
    q, scale = ops.quantize_int8(torch.zeros(3, 8))
    assert torch.equal(q, torch.zeros(3, 8, dtype=torch.int8)) and torch.equal(scale, torch.ones(3))


def _dequantize_projections(obj) -> int:
    """Replace every int8 LinearWeight reachable from obj by a full-precision one holding the values
    the int8 one stands for; returns how many were replaced."""
    count = 0
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        if isinstance(value, ops.LinearWeight) and value.qweight is not None:
            setattr(obj, field.name, ops.prepare_linear(value.dequantized(torch.float32)))
            count += 1
        elif isinstance(value, list) and value and isinstance(value[0], ops.LinearWeight):
            setattr(obj, field.name, [ops.prepare_linear(v.dequantized(torch.float32)) for v in value])
            count += len(value)
        elif dataclasses.is_dataclass(value):
            count += _dequantize_projections(value)
    return count


def _load(directory: str, int8: bool, engine_process: bool = False):
    return ModelFactory.from_huggingface(
        directory, ModelConfig(seq_size_per_block=4, max_seq_len=128, act_type="fp32",
                               weight_type=WEIGHT_TYPE.INT8 if int8 else WEIGHT_TYPE.FP32),
        engine_config=EngineConfig(num_kv_blocks=256, engine_process=engine_process), device="cpu")


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    config_cls, model_cls, config = CASES[request.param]
    torch.manual_seed(1234)
    hf_model = model_cls(config_cls(**config)).eval()
    with torch.no_grad():
        for name, param in hf_model.named_parameters():
            if name.endswith("block_sparse_moe.gate.weight"):
                param.normal_(0, 1.0)
    perturb_vector_parameters(hf_model)
    directory = save_tiny_checkpoint(hf_model, str(tmp_path_factory.mktemp(request.param)))
    quantized = _load(directory, int8=True)
    oracle = _load(directory, int8=False)
    full = _load(directory, int8=False)
    replaced = sum(_dequantize_projections_of_layer(q, o) for q, o in zip(quantized.model.layers, oracle.model.layers))
    assert replaced >= 4 * len(oracle.model.layers)
    yield request.param, quantized, oracle, full
    for model in (quantized, oracle, full):
        model.stop()


def _dequantize_projections_of_layer(quantized_layer, oracle_layer) -> int:
    """The oracle's layer gets the int8 layer's projections, dequantized (its own were full precision)."""
    for field in dataclasses.fields(oracle_layer):
        setattr(oracle_layer, field.name, getattr(quantized_layer, field.name))
    return _dequantize_projections(oracle_layer)


def _scores(engine):
    cfg = GenerateConfig(max_new_tokens=1, top_k=1, calculate_loss=2, return_logits=True)
    handles = [engine.add_request(p, cfg) for p in PARITY_PROMPTS]
    engine.run_until_idle()
    return [(torch.tensor(h.result().loss), torch.tensor(h.result().outputs[0].logits)) for h in handles]


def test_quantization_is_the_only_difference(case):
    name, quantized, oracle, full = case
    for (loss_q, last_q), (loss_o, last_o) in zip(_scores(quantized.engine), _scores(oracle.engine)):
        assert torch.allclose(loss_q, loss_o, atol=1e-4), (name, (loss_q - loss_o).abs().max())
        assert torch.allclose(last_q, last_o, atol=1e-4), (name, (last_q - last_o).abs().max())
    # int8 really changed the weights: the oracle's projections are not the checkpoint's
    ours, checkpoint = quantized.model.layers[0].qkv, full.model.layers[0].qkv.weight
    assert 0 < (ours.dequantized(torch.float32) - checkpoint).abs().max() <= ours.scale.max() / 2 + 1e-6, name
    assert run_greedy(quantized.engine, PARITY_PROMPTS, 32) == run_greedy(oracle.engine, PARITY_PROMPTS, 32), name


def test_weight_type_int8_through_the_engine_process(tmp_path, monkeypatch):
    """WEIGHT_TYPE=INT8 from the environment reaches the engine-core process (the product path)."""
    monkeypatch.setenv("MAGA_DEVICE", "cpu")  # the placement reads the process environment
    from maga_transformer.test.fixtures import tiny_llama
    _, directory = tiny_llama(str(tmp_path), seed=2, vocab_size=128, max_position_embeddings=128)
    env = {"CHECKPOINT_PATH": directory, "MAGA_DEVICE": "cpu", "WEIGHT_TYPE": "INT8", "KV_CACHE_MEM_MB": "8",
           "SEQ_SIZE_PER_BLOCK": "4", "MAX_SEQ_LEN": "128"}
    product = ModelFactory.create_from_env(env)
    in_process = _load(directory, int8=True)
    try:
        assert "with int8 weights" in product.engine.info.description
        assert "with int8 weights" not in _load(directory, int8=False).engine.info.description
        # the same weights in both processes: the same prompt log-probs (greedy tokens of a random tiny
        # model can flip on a GEMM's thread count)
        for (loss_p, _), (loss_i, _) in zip(_scores(product.engine), _scores(in_process.engine)):
            assert torch.allclose(loss_p, loss_i, atol=1e-4)
    finally:
        product.stop()
        in_process.stop()


def test_the_torch_fallback_rounds_activations_as_the_cpu_kernel_does():
    """Without the compiled module the few-row path computes what the kernel does (int16 activations),
    so an engine's greedy tokens never depend on whether the kernel loaded in its process."""
    from maga_transformer.ops.linear import _round_rows_to_int16
    generator = torch.Generator().manual_seed(5)
    w = ops.prepare_int8_linear(torch.randn(300, 577, generator=generator))
    x = torch.randn(3, 577, generator=generator) * 10
    kernel = cpu_kernels().gemv_i8(x, w.qweight, w.scale).double()
    fallback = (_round_rows_to_int16(x).double() @ w.qweight.double().T) * w.scale.double()
    unrounded = _reference(x, w.qweight, w.scale, None)
    assert (kernel - fallback).abs().max() <= 1e-5 * unrounded.abs().max()
    assert (kernel - unrounded).abs().max() > 10 * (kernel - fallback).abs().max()  # the rounding is seen
