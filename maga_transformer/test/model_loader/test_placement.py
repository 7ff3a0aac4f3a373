"""choose_placement: GPU-first defaults (vLLM's), CPU keeps fp32, explicit settings win; no GPU needed."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from maga_transformer.config.model_config import ACT_TYPE
from maga_transformer.config.placement import Placement, checkpoint_dtype, choose_placement

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


# ---- the checkpoint's dtype, as config.json spells it -----------------------------------------------
@pytest.mark.parametrize("hf_config, expected", [
    ({"torch_dtype": "float32"}, ACT_TYPE.FP32),
    ({"torch_dtype": "float16"}, ACT_TYPE.FP16),
    ({"torch_dtype": "bfloat16"}, ACT_TYPE.BF16),
    ({"dtype": "bfloat16"}, ACT_TYPE.BF16),  # transformers 5's key
    ({"dtype": "float16", "torch_dtype": "float32"}, ACT_TYPE.FP16),  # the newer key wins
    ({"torch_dtype": "torch.float16"}, ACT_TYPE.FP16),
    ({"text_config": {"dtype": "bfloat16"}}, ACT_TYPE.BF16),
    ({}, None),
    ({"torch_dtype": None}, None),
    ({"torch_dtype": "float64"}, None),
])
def test_checkpoint_dtype(hf_config, expected):
    assert checkpoint_dtype(hf_config)[0] == expected


def test_checkpoint_dtype_of_no_config_is_none():
    assert checkpoint_dtype(None) == (None, "")


# ---- defaults: nothing given ---------------------------------------------------------------------
@pytest.mark.parametrize("hf_config, dtype, why", [
    ({"torch_dtype": "bfloat16"}, torch.bfloat16, "bf16 (the checkpoint's dtype)"),
    ({"torch_dtype": "float16"}, torch.float16, "fp16 (the checkpoint's dtype)"),
    ({"dtype": "float16"}, torch.float16, "fp16 (the checkpoint's dtype)"),
    ({"dtype": "bfloat16"}, torch.bfloat16, "bf16 (the checkpoint's dtype)"),
    ({"torch_dtype": "float32"}, torch.bfloat16, "bf16 (the checkpoint is float32; GPUs run it in half precision)"),
    ({"dtype": "float32"}, torch.bfloat16, "bf16 (the checkpoint is float32; GPUs run it in half precision)"),
    ({}, torch.bfloat16, "bf16 (the checkpoint names no dtype)"),
    ({"torch_dtype": "float64"}, torch.bfloat16, "bf16 (the checkpoint's dtype 'float64' is none the engine runs)"),
])
def test_gpu_visible_runs_on_cuda_in_the_checkpoint_dtype(hf_config, dtype, why):
    placement = choose_placement(cuda_available=True, hf_config=hf_config)
    assert placement == Placement(CUDA, dtype, f"cuda (GPU visible), {why}")


@pytest.mark.parametrize("hf_config", [{"torch_dtype": "bfloat16"}, {"torch_dtype": "float16"}, {"dtype": "bfloat16"},
                                       {"torch_dtype": "float32"}, {}, None])
def test_no_gpu_runs_on_cpu_in_fp32_whatever_the_checkpoint(hf_config):
    placement = choose_placement(cuda_available=False, hf_config=hf_config)
    assert placement == Placement(CPU, torch.float32, "cpu (no GPU visible), fp32 (CPU keeps fp32)")


@pytest.mark.parametrize("hf_config, dtype", [({"torch_dtype": "bfloat16"}, torch.float16),
                                              ({"torch_dtype": "float32"}, torch.float16),
                                              ({"torch_dtype": "float16"}, torch.float16)])
def test_gpu_without_bf16_takes_fp16_instead(hf_config, dtype):
    placement = choose_placement(cuda_available=True, hf_config=hf_config, bf16_supported=False)
    assert (placement.device, placement.dtype) == (CUDA, dtype)


def test_gpu_without_bf16_says_why():
    placement = choose_placement(cuda_available=True, hf_config={"dtype": "bfloat16"}, bf16_supported=False)
    assert placement.reason == "cuda (GPU visible), fp16 (the checkpoint's dtype; this GPU has no bf16)"


# ---- MAGA_DEVICE / device ------------------------------------------------------------------------
@pytest.mark.parametrize("cuda_available", [True, False])
def test_maga_device_cpu_wins_over_a_visible_gpu(cuda_available):
    placement = choose_placement(cuda_available=cuda_available, hf_config={"torch_dtype": "bfloat16"},
                                 maga_device="cpu")
    assert placement == Placement(CPU, torch.float32, "cpu (MAGA_DEVICE=cpu given), fp32 (CPU keeps fp32)")


@pytest.mark.parametrize("value, expected", [("cuda", torch.device("cuda")), ("cuda:1", torch.device("cuda", 1)),
                                             (" CUDA:1 ", torch.device("cuda", 1))])
def test_maga_device_cuda(value, expected):
    placement = choose_placement(cuda_available=True, hf_config={"torch_dtype": "float16"}, maga_device=value)
    assert placement == Placement(expected, torch.float16,
                                  f"{expected} (MAGA_DEVICE={expected} given), fp16 (the checkpoint's dtype)")


def test_empty_maga_device_is_unset():
    assert choose_placement(cuda_available=True, maga_device="").device == CUDA
    assert choose_placement(cuda_available=False, maga_device="").device == CPU


@pytest.mark.parametrize("value", ["gpu", "cuda:", "cuda:x", "mps", "cpu:0", "cuda:0,1", "tpu"])
def test_bad_maga_device_names_it(value):
    with pytest.raises(ValueError, match=r"^MAGA_DEVICE=.*expected 'cpu', 'cuda' or 'cuda:N'"):
        choose_placement(cuda_available=True, maga_device=value)


@pytest.mark.parametrize("value", ["cuda", "cuda:1"])
def test_maga_device_cuda_without_cuda_names_it(value):
    with pytest.raises(ValueError, match=rf"^MAGA_DEVICE='{value}' but CUDA is not available"):
        choose_placement(cuda_available=False, maga_device=value)


def test_device_argument_wins_over_maga_device():
    placement = choose_placement(cuda_available=True, device="cpu", maga_device="cuda", hf_config={"dtype": "bfloat16"})
    assert placement == Placement(CPU, torch.float32, "cpu (device=cpu given), fp32 (CPU keeps fp32)")
    placement = choose_placement(cuda_available=True, device=torch.device("cuda", 1), maga_device="cpu")
    assert (placement.device, placement.dtype) == (torch.device("cuda", 1), torch.bfloat16)


def test_bad_device_argument_names_device_not_maga_device():
    with pytest.raises(ValueError, match=r"^device='gpu'"):
        choose_placement(cuda_available=True, device="gpu", maga_device="cpu")
    with pytest.raises(ValueError, match=r"^device='cuda' but CUDA is not available"):
        choose_placement(cuda_available=False, device="cuda")


# ---- ACT_TYPE / act_type -------------------------------------------------------------------------
@pytest.mark.parametrize("act_type, dtype", [(ACT_TYPE.FP32, torch.float32), (ACT_TYPE.FP16, torch.float16),
                                             (ACT_TYPE.BF16, torch.bfloat16), ("fp16", torch.float16),
                                             ("bfloat16", torch.bfloat16)])
@pytest.mark.parametrize("cuda_available", [True, False])
@pytest.mark.parametrize("hf_config", [{"torch_dtype": "float32"}, {"torch_dtype": "bfloat16"},
                                       {"dtype": "float16"}, {}])
def test_act_type_wins_on_either_device(act_type, dtype, cuda_available, hf_config):
    placement = choose_placement(cuda_available=cuda_available, hf_config=hf_config, act_type=act_type)
    assert placement.device == (CUDA if cuda_available else CPU)
    assert placement.dtype == dtype


def test_act_type_reason():
    placement = choose_placement(cuda_available=True, hf_config={"dtype": "bfloat16"}, act_type=ACT_TYPE.FP32)
    assert placement.reason == "cuda (GPU visible), fp32 (ACT_TYPE / act_type=fp32 given)"


def test_explicit_bf16_wins_over_a_gpu_without_bf16():
    placement = choose_placement(cuda_available=True, act_type=ACT_TYPE.BF16, bf16_supported=False)
    assert placement.dtype == torch.bfloat16  # explicit wins: the user asked for bf16


def test_empty_act_type_is_unset():
    assert choose_placement(cuda_available=True, hf_config={"dtype": "float16"}, act_type="").dtype == torch.float16
    assert choose_placement(cuda_available=False, act_type="").dtype == torch.float32


def test_bad_act_type_names_it():
    with pytest.raises(ValueError, match="act_type"):
        choose_placement(cuda_available=True, act_type="int4")


def test_both_overrides_together():
    placement = choose_placement(cuda_available=True, hf_config={"torch_dtype": "float32"}, maga_device="cuda:1",
                                 act_type=ACT_TYPE.FP16)
    assert placement == Placement(torch.device("cuda", 1), torch.float16,
                                  "cuda:1 (MAGA_DEVICE=cuda:1 given), fp16 (ACT_TYPE / act_type=fp16 given)")


def test_placement_is_frozen():
    placement = choose_placement(cuda_available=False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        placement.device = CUDA  # type: ignore[misc]
