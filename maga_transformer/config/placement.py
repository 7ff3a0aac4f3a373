"""Where a model runs and in which compute dtype, decided once at load time (vLLM's defaults).

A user who sets nothing on a machine with a GPU expects the GPU, in the checkpoint's own half-precision
dtype: that is what vLLM does, and fp32 on a GPU would double memory and halve speed for no gain.
On the CPU the engine keeps fp32, whose kernels (oneDNN GEMMs, the reference attention) are its
accurate and fast path there. Whatever the user names explicitly (MAGA_DEVICE / `device`, ACT_TYPE /
`act_type`) wins over these defaults.

This module is pure: the caller reads the environment, CUDA and config.json, so every rule is
testable on a machine without a GPU.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Tuple, Union

import torch

from maga_transformer.config.model_config import ACT_TYPE

# What a user may name: the engine runs on one device, so no "cuda:0,1" or other backends.
_DEVICE_PATTERN = re.compile(r"^(cpu|cuda(:\d+)?)$")

# config.json dtype names to what the engine runs; transformers writes "bfloat16", older tools "bf16",
# and some exports "torch.bfloat16".
_CHECKPOINT_DTYPES = {
    "float32": ACT_TYPE.FP32, "fp32": ACT_TYPE.FP32, "float": ACT_TYPE.FP32,
    "float16": ACT_TYPE.FP16, "fp16": ACT_TYPE.FP16, "half": ACT_TYPE.FP16,
    "bfloat16": ACT_TYPE.BF16, "bf16": ACT_TYPE.BF16,
}

DeviceLike = Union[str, torch.device, None]


@dataclass(frozen=True)
class Placement:
    """The device and compute dtype a model is built with, and why (one line for the start-up log)."""

    device: torch.device
    dtype: torch.dtype
    reason: str


def checkpoint_dtype(hf_config: Optional[Mapping[str, Any]]) -> Tuple[Optional[ACT_TYPE], str]:
    """The checkpoint's own dtype from config.json and its raw spelling ("" when it names none).

    transformers 5 writes `dtype`, earlier versions `torch_dtype`; `dtype` wins when both are present
    since it is the newer writer's. Multimodal configs keep the language model's under `text_config`.
    """
    config = hf_config or {}
    raw = config.get("dtype") or config.get("torch_dtype")
    text_config = config.get("text_config")
    if raw is None and isinstance(text_config, Mapping):
        raw = text_config.get("dtype") or text_config.get("torch_dtype")
    if raw is None:
        return None, ""
    spelled = str(raw).strip()
    key = spelled.lower().removeprefix("torch.")
    return _CHECKPOINT_DTYPES.get(key), spelled


def _parse_device(value: Union[str, torch.device], source: str) -> torch.device:
    """A torch.device for "cpu", "cuda" or "cuda:N"; `source` names the setting in the error."""
    text = str(value).strip().lower()
    if not _DEVICE_PATTERN.match(text):
        raise ValueError(f"{source}={value!r}: expected 'cpu', 'cuda' or 'cuda:N' (N a GPU index)")
    return torch.device(text)


def _choose_device(device: DeviceLike, maga_device: Optional[str], cuda_available: bool) -> Tuple[torch.device, str]:
    # An explicit argument beats the environment, as a function argument beats a global everywhere else.
    # An empty MAGA_DEVICE counts as unset: `MAGA_DEVICE= cmd` is how a shell clears it for one command.
    if device is not None and str(device).strip():
        source, value = "device", device
    elif maga_device is not None and maga_device.strip():
        source, value = "MAGA_DEVICE", maga_device
    else:
        if cuda_available:
            return torch.device("cuda"), "cuda (GPU visible)"
        return torch.device("cpu"), "cpu (no GPU visible)"
    chosen = _parse_device(value, source)
    if chosen.type == "cuda" and not cuda_available:
        # Failing here beats a CUDA error deep in the first weight copy, and names what to change.
        raise ValueError(f"{source}={value!r} but CUDA is not available (no GPU visible, or a CPU-only torch); "
                         f"set {source} to 'cpu' or leave it unset")
    return chosen, f"{chosen} ({source}={chosen} given)"


def _choose_dtype(device: torch.device, act_type: Union[ACT_TYPE, str, None],
                  hf_config: Optional[Mapping[str, Any]], bf16_supported: bool) -> Tuple[ACT_TYPE, str]:
    if act_type is not None and act_type != "":  # "" is how an unset ACT_TYPE arrives from a shell
        chosen = act_type if isinstance(act_type, ACT_TYPE) else ACT_TYPE.from_str(act_type)
        return chosen, f"{chosen.value} (ACT_TYPE / act_type={chosen.value} given)"
    if device.type == "cpu":
        return ACT_TYPE.FP32, "fp32 (CPU keeps fp32)"
    own, spelled = checkpoint_dtype(hf_config)
    if own in (ACT_TYPE.FP16, ACT_TYPE.BF16):
        chosen, why = own, "the checkpoint's dtype"
    elif own == ACT_TYPE.FP32:
        # vLLM's rule: an fp32 checkpoint runs in half precision on a GPU; bf16 keeps fp32's range.
        chosen, why = ACT_TYPE.BF16, "the checkpoint is float32; GPUs run it in half precision"
    elif spelled:
        chosen, why = ACT_TYPE.BF16, f"the checkpoint's dtype {spelled!r} is none the engine runs"
    else:
        chosen, why = ACT_TYPE.BF16, "the checkpoint names no dtype"
    if chosen == ACT_TYPE.BF16 and not bf16_supported:
        # Pre-Ampere GPUs (V100, T4) have no bf16 tensor cores; fp16 is their half precision.
        return ACT_TYPE.FP16, f"fp16 ({why}; this GPU has no bf16)"
    return chosen, f"{chosen.value} ({why})"


def choose_placement(*, cuda_available: bool, hf_config: Optional[Mapping[str, Any]] = None,
                     device: DeviceLike = None, maga_device: Optional[str] = None,
                     act_type: Union[ACT_TYPE, str, None] = None, bf16_supported: bool = True) -> Placement:
    """Device and compute dtype of a model.

    cuda_available: torch.cuda.is_available() (passed in so the rules run without a GPU).
    hf_config: the checkpoint's config.json as a dict (its `dtype` / `torch_dtype`; may be empty).
    device: an explicit device argument (e.g. ModelFactory.from_huggingface's); None when not given.
    maga_device: the MAGA_DEVICE environment variable; None (or "") when not set.
    act_type: ACT_TYPE / ModelConfig.act_type; None when not given.
    bf16_supported: torch.cuda.is_bf16_supported() on the chosen GPU; only read when the default is bf16.
    """
    chosen_device, device_reason = _choose_device(device, maga_device, cuda_available)
    chosen_dtype, dtype_reason = _choose_dtype(chosen_device, act_type, hf_config, bf16_supported)
    return Placement(chosen_device, chosen_dtype.torch_dtype, f"{device_reason}, {dtype_reason}")
