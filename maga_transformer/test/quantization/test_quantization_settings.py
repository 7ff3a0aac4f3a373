"""Start-up refusals of quantization settings that cannot run, each naming the setting; and FP8's
numerics on the CPU (its GEMM needs a GPU, its rounding does not)."""
from __future__ import annotations

import pytest
import torch

from maga_transformer import ops
from maga_transformer.config import EngineConfig, ModelConfig
from maga_transformer.config.model_config import WEIGHT_TYPE
from maga_transformer.model_factory import ModelFactory
from maga_transformer.ops.linear import fp8_linear_reference, fp8_supported, quantize_fp8_rows
from maga_transformer.test.fixtures import tiny_llama


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    _, directory = tiny_llama(str(tmp_path_factory.mktemp("llama")), seed=3, vocab_size=128,
                              max_position_embeddings=128)
    return directory


def test_weight_type_names():
    assert WEIGHT_TYPE.from_str("FP8") is WEIGHT_TYPE.FP8 and WEIGHT_TYPE.FP8.quantization == "fp8"
    assert WEIGHT_TYPE.INT8.quantization == "int8" and WEIGHT_TYPE.BF16.quantization == ""
    with pytest.raises(ValueError, match="weight_type"):
        WEIGHT_TYPE.from_str("int4")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without an FP8 GPU")
def test_fp8_weights_without_an_fp8_gpu_are_refused_at_start_up(checkpoint):
    with pytest.raises(ValueError, match="WEIGHT_TYPE=FP8.*compute capability 8.9"):
        ModelFactory.from_huggingface(checkpoint, ModelConfig(weight_type="fp8", seq_size_per_block=4),
                                      engine_config=EngineConfig(num_kv_blocks=16, engine_process=False),
                                      device="cpu")


def test_fp8_weights_from_the_environment_are_refused_the_same_way(checkpoint, monkeypatch):
    if fp8_supported(torch.device("cpu")) is None:
        pytest.fail("the CPU cannot run FP8 GEMMs")
    monkeypatch.setenv("MAGA_DEVICE", "cpu")  # read from the process environment, as start_server does
    env = {"CHECKPOINT_PATH": checkpoint, "MAGA_DEVICE": "cpu", "WEIGHT_TYPE": "FP8", "KV_CACHE_MEM_MB": "8"}
    with pytest.raises(ValueError, match="WEIGHT_TYPE=FP8"):
        ModelFactory.create_from_env(env)


def test_fp8_rejects_projection_sizes_its_gemm_cannot_take():
    with pytest.raises(ValueError, match="WEIGHT_TYPE=FP8.*multiples of 16.*40 x 24"):
        ops.prepare_fp8_linear(torch.randn(40, 24))


@pytest.mark.parametrize("rows", [1, 3, 33])
def test_fp8_rounding_per_row(rows):
    """Each row's largest value maps to 448 and the row round-trips within e4m3's relative spacing."""
    x = torch.randn(rows, 64) * torch.logspace(-2, 2, rows)[:, None]
    q, scale = quantize_fp8_rows(x)
    assert q.dtype == torch.float8_e4m3fn and torch.equal(q.float().abs().amax(dim=1), torch.full((rows,), 448.0))
    back = q.float() * scale[:, None]
    assert bool(((back - x).abs() <= x.abs() / 16 + scale[:, None] * 2 ** -9).all())
    w = ops.prepare_fp8_linear(torch.randn(32, 64))
    ref = fp8_linear_reference(x, w, None)
    assert ref.shape == (rows, 32) and (ref - x.double() @ w.dequantized(torch.float64).T).abs().max() > 0


def test_fp8_emulation_runs_where_fp8_gemms_do_not(checkpoint, monkeypatch):
    """MAGA_FP8_EMULATION=1 (documented, for quality checks): FP8's rounding with a float GEMM."""
    monkeypatch.setenv("MAGA_FP8_EMULATION", "1")
    model = ModelFactory.from_huggingface(checkpoint, ModelConfig(weight_type="fp8", seq_size_per_block=4,
                                                                  act_type="fp32"),
                                          engine_config=EngineConfig(num_kv_blocks=64, engine_process=False),
                                          device="cpu")
    try:
        assert "with fp8 weights" in model.engine.info.description
        layer = model.model.layers[0]
        assert layer.qkv.qweight.dtype == torch.float8_e4m3fn
        x = torch.randn(5, layer.qkv.in_features)
        want = fp8_linear_reference(x, layer.qkv, None)
        assert (ops.linear(x, layer.qkv).double() - want).abs().max() <= 1e-4 * want.abs().max()
    finally:
        model.stop()
