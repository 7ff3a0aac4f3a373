"""Linear layers with weights prepared once for the device.

Decode GEMMs on CPU are thin (a few rows against a large weight) and bandwidth-bound. Up to 3
fp32 rows go to our GEMV kernel (src/kernels/cpu/gemv.cc), which streams the weight at close to the
machine's memory bandwidth (about 2x oneDNN at one row). From 4 rows on, oneDNN's GEMM on weights
re-laid out once into its blocked format wins (it reuses each weight load across rows); it also
streams about twice as fast as torch's default path. So on CPU fp32 both layouts are kept: twice
the weight memory, the price of fast batch-1 and fast batched decode (docs/benchmarks.md).
Other dtypes and devices use oneDNN or F.linear, except one fp16 / bf16 row on the GPU without bias
(batch-1 decode): our CUDA GEMV (src/kernels/cuda/gemv.cu), measured against cuBLAS in
docs/benchmarks.md.
Quantized weights (WEIGHT_TYPE=INT8 / FP8, docs/Quantization.md) keep int8 or e4m3 values and one
scale per output channel: int8 decode rows go to the int8 GEMVs (CPU and CUDA), other int8 rows to
a widen-then-GEMM path; FP8 quantizes each activation row and runs torch._scaled_mm, except one row
on CUDA (batch-1 decode), which goes to the same byte-weight GEMV as int8 with e4m3 widened in the
kernel and the activation left unrounded (W8A16: what the row costs is the weight's bytes).
"""
from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from maga_transformer.ops._compiled import cpu_kernels
from maga_transformer.ops._cuda import aligned, check_status, kernels_for, same_device
from maga_transformer.ops.lora import LoraRows, LoraSet, add_lora

logger = logging.getLogger(__name__)

_PACK_BATCH_HINT = 16  # oneDNN picks its blocking for this many rows; measured on 1..64 rows
_GEMV_MAX_ROWS = 3  # measured crossover with oneDNN on the 2-core build machine (SmolLM2 shapes)
_CUDA_GEMV_OFF = os.environ.get("MAGA_DISABLE_CUDA_GEMV") == "1"


def _onednn_linear_available() -> bool:
    if os.environ.get("MAGA_DISABLE_ONEDNN_LINEAR") == "1":
        return False
    try:
        return (torch.backends.mkldnn.is_available()
                and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
                and hasattr(torch.ops.mkldnn, "_linear_pointwise"))
    except (AttributeError, RuntimeError):
        return False


_ONEDNN = _onednn_linear_available()


@dataclass
class LinearWeight:
    """A weight of shape [out, in] as the forward pass consumes it."""

    out_features: int
    in_features: int
    weight: Optional[torch.Tensor] = None  # plain [out, in] layout (released when only oneDNN needs it)
    packed: Optional[torch.Tensor] = None  # oneDNN blocked layout (CPU)
    gemv: bool = False  # our CPU GEMV serves batches of up to _GEMV_MAX_ROWS rows
    # quantized (WEIGHT_TYPE=INT8 / FP8): int8 or float8_e4m3fn [out, in] and one fp32 scale per
    # output row
    qweight: Optional[torch.Tensor] = None
    scale: Optional[torch.Tensor] = None
    # unmerged LoRA (maga_transformer/lora/): adapter slot -> its low-rank factors for this projection;
    # filled and emptied by the engine core between steps as adapters load and unload
    lora: LoraSet = field(default_factory=LoraSet)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight the quantized one stands for, [out, in] in dtype (the quantization's oracle)."""
        return (self.qweight.to(torch.float32) * self.scale[:, None]).to(dtype)


def _pack_onednn(weight: torch.Tensor) -> Optional[torch.Tensor]:
    if not (_ONEDNN and weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16)):
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight, _PACK_BATCH_HINT)
    except RuntimeError as err:  # an unusual build: fall back to torch's default path
        logger.warning("oneDNN weight packing failed (%s); using torch's default linear", err)
        return None


def prepare_linear(weight: torch.Tensor) -> LinearWeight:
    out_features, in_features = weight.shape
    weight = weight.contiguous()
    gemv = weight.device.type == "cpu" and weight.dtype == torch.float32 and cpu_kernels() is not None
    packed = _pack_onednn(weight)
    keep_plain = gemv or packed is None
    return LinearWeight(out_features, in_features, weight=weight if keep_plain else None, packed=packed, gemv=gemv)


def quantize_int8(weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: scale = absmax(row) / 127, q = round(w / scale) in [-127, 127]
    (rtp-llm's scheme). An all-zero row gets scale 1, so it dequantizes to zeros."""
    w = weight.float()
    scale = w.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


FP8_MAX = 448.0  # float8_e4m3fn's largest finite value


def absmax_scales(xf: torch.Tensor, limit: float) -> torch.Tensor:
    """Per row of the last dimension: absmax / limit, 1 for an all-zero row. A product with 1 /
    limit, as torch computes a tensor over a Python number on CUDA, so that our CUDA kernels (which
    multiply too) produce the same bits on every device."""
    scale = xf.abs().amax(dim=-1) * (1.0 / limit)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def quantize_fp8_rows(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-row e4m3: scale = absmax(row) / 448 (1 for an all-zero row), values clamped into range.
    The weights' per-output-channel scheme, the activations' per-token one and the FP8 KV cache's
    per token and head."""
    xf = x.float()
    scale = absmax_scales(xf, FP8_MAX)
    q = (xf / scale[..., None]).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.contiguous(), scale.contiguous()


def _quantize_activation_rows(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """quantize_fp8_rows for a [rows, cols] activation: our one-kernel version on CUDA (the same
    values), torch elsewhere."""
    kernels = kernels_for(x)
    if (kernels is None or not hasattr(kernels, "quantize_rows_fp8") or x.dim() != 2 or x.stride(-1) != 1
            or x.dtype not in (torch.float32, torch.float16, torch.bfloat16)):
        return quantize_fp8_rows(x)
    out = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    check_status(kernels, kernels.quantize_rows_fp8(out, scale, x), "quantize_rows_fp8")
    return out, scale


def prepare_fp8_linear(weight: torch.Tensor) -> LinearWeight:
    """An FP8 linear (WEIGHT_TYPE=FP8) from a full-precision weight: e4m3 per output channel."""
    out_features, in_features = weight.shape
    if out_features % 16 or in_features % 16:
        raise ValueError(f"WEIGHT_TYPE=FP8: FP8 GEMMs take sizes that are multiples of 16; this model has a "
                         f"{out_features} x {in_features} projection (use WEIGHT_TYPE=INT8)")
    q, scale = quantize_fp8_rows(weight)
    return LinearWeight(out_features, in_features, qweight=q, scale=scale)


def fp8_supported(device: torch.device) -> Optional[str]:
    """None where FP8 GEMMs run (CUDA compute capability 8.9+: Ada, Hopper), else why not."""
    if device.type != "cuda":
        return f"FP8 GEMMs need a CUDA GPU of compute capability 8.9 or newer; the model runs on {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return f"FP8 GEMMs need compute capability 8.9 or newer; {torch.cuda.get_device_name(device)} is {major}.{minor}"
    if not hasattr(torch, "_scaled_mm"):
        return "this torch has no torch._scaled_mm"
    return None


def fp8_emulated() -> bool:
    """MAGA_FP8_EMULATION=1: WEIGHT_TYPE=FP8 where no FP8 GEMM runs (the CPU, pre-Ada GPUs), with
    the same rounding of weights and activations and a float GEMM on the dequantized values: slow,
    for measuring FP8's quality (python3 -m maga_transformer.perplexity) on any machine."""
    return os.environ.get("MAGA_FP8_EMULATION") == "1"


@functools.lru_cache(maxsize=None)
def _fp8_gemm_runs_on(device_index: int) -> bool:
    return fp8_supported(torch.device("cuda", device_index)) is None


def _fp8_linear_emulated(x: torch.Tensor, w: LinearWeight, bias: Optional[torch.Tensor]) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    xq, x_scale = quantize_fp8_rows(rows)
    out = F.linear((xq.float() * x_scale[:, None]).to(x.dtype), w.dequantized(x.dtype), bias)
    return out.reshape(*x.shape[:-1], w.out_features)


def _fp8_linear(x: torch.Tensor, w: LinearWeight, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """W8A8 e4m3: each activation row quantized on the fly with its own scale, one FP8 tensor-core
    GEMM with the row and channel scales applied to its fp32 accumulators (torch._scaled_mm)."""
    if not x.is_cuda or x.dtype != torch.bfloat16 or not _fp8_gemm_runs_on(x.device.index or 0):
        return _fp8_linear_emulated(x, w, bias)  # start-up allows this only under MAGA_FP8_EMULATION=1
    out = _cuda_gemv_bytes(x, w)
    if out is not None:  # one row: weight-only, through the GEMV (fp8_linear_reference's weight_only)
        return out if bias is None else out + bias
    rows = x.reshape(-1, x.shape[-1])
    xq, x_scale = _quantize_activation_rows(rows)
    out = torch._scaled_mm(xq, w.qweight.t(), scale_a=x_scale[:, None], scale_b=w.scale[None, :],
                           out_dtype=x.dtype)
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], w.out_features)


def fp8_linear_reference(x: torch.Tensor, w: LinearWeight, bias: Optional[torch.Tensor],
                         weight_only: bool = False) -> torch.Tensor:
    """What _fp8_linear computes, in float64: both operands rounded to e4m3 with their scales, or
    (weight_only: one row through the CUDA GEMV) only the weight."""
    rows = x.reshape(-1, x.shape[-1])
    if weight_only:
        out = rows.double() @ w.dequantized(torch.float64).T
    else:
        xq, x_scale = quantize_fp8_rows(rows)
        out = (xq.double() * x_scale.double()[:, None]) @ w.dequantized(torch.float64).T
    if bias is not None:
        out = out + bias.double()
    return out.reshape(*x.shape[:-1], w.out_features)


def prepare_int8_linear(weight: torch.Tensor) -> LinearWeight:
    """A weight-only int8 linear from a full-precision weight (on its device; the full weight is dropped)."""
    out_features, in_features = weight.shape
    q, scale = quantize_int8(weight)
    return LinearWeight(out_features, in_features, qweight=q, scale=scale)


def _cuda_gemv_bytes(x: torch.Tensor, w: LinearWeight) -> Optional[torch.Tensor]:
    """One fp16 / bf16 row against int8 or e4m3 weights through our CUDA GEMV (half of bf16's bytes
    streamed), or None where it does not apply."""
    if _CUDA_GEMV_OFF or x.dim() != 2 or x.shape[0] != 1 or x.dtype not in (torch.float16, torch.bfloat16):
        return None
    kernels = kernels_for(x, w.qweight, w.scale)
    if (kernels is None or not hasattr(kernels, "gemv_byte_weight") or w.in_features % 16
            or w.in_features > kernels.gemv_max_in_features or x.shape[1] != w.in_features
            or not x.is_contiguous() or not aligned(x) or not aligned(w.qweight) or not same_device(x, w.qweight)):
        return None
    out = torch.empty(1, w.out_features, dtype=x.dtype, device=x.device)
    check_status(kernels, kernels.gemv_byte_weight(out, x, w.qweight, w.scale), "gemv_byte_weight")
    return out


_CPU_INT8_GEMV_ROWS = 16  # kMaxGemvRows in src/kernels/cpu/gemv.h


def _round_rows_to_int16(x: torch.Tensor) -> torch.Tensor:
    """Each row rounded as the CPU int8 GEMV takes it: int16 steps of absmax / 32767."""
    scale = x.abs().amax(dim=1, keepdim=True) / 32767
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(x * (1.0 / scale)) * scale  # x times the inverse, as the kernel rounds


def _int8_linear(x: torch.Tensor, w: LinearWeight, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Decode rows go to a GEMV that reads the int8 bytes (ours on CPU for up to 16 fp32 rows, ours on
    CUDA for one fp16 / bf16 row). Otherwise (prefill, large batches) the int8 values, exact in any
    float type, are widened to x's dtype for one GEMM, and its outputs take the per-channel scale:
    scale[o] * (x . q[o]) is the dequantized product without materialising the scaled weight."""
    if x.is_cuda:
        out = _cuda_gemv_bytes(x, w)
        if out is not None:
            return out if bias is None else out + bias
    elif x.dim() == 2 and x.dtype == torch.float32 and x.shape[0] <= _CPU_INT8_GEMV_ROWS:
        kernels = cpu_kernels()
        if kernels is not None:
            return kernels.gemv_i8(x, w.qweight, w.scale, bias)
        x = _round_rows_to_int16(x)  # what the kernel computes, so results never depend on its presence
    out = F.linear(x, w.qweight.to(x.dtype)) * w.scale.to(x.dtype)
    return out if bias is None else out + bias


def gemv_f32(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x @ w.T (+ bias) on our CPU kernel, inputs checked here.

    The checks live in Python because a C++ exception thrown out of an extension built against one
    pybind11 and caught by another can crash the process (seen on the GPU machine's torch 2.11).
    """
    kernels = cpu_kernels()
    if kernels is None:
        raise RuntimeError("the C++ runtime is not available")
    tensors = [x, w] + ([bias] if bias is not None else [])
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        raise ValueError("gemv_f32: CPU fp32 tensors only")
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"gemv_f32: shapes [rows, in] x [out, in], got {tuple(x.shape)} and {tuple(w.shape)}")
    if x.shape[0] > kernels.max_gemv_rows:
        raise ValueError(f"gemv_f32: at most {kernels.max_gemv_rows} rows, got {x.shape[0]}")
    if bias is not None and bias.shape != (w.shape[0],):
        raise ValueError(f"gemv_f32: bias must have shape ({w.shape[0]},)")
    return kernels.gemv_f32(x, w, bias)


def _cuda_gemv(x: torch.Tensor, w: LinearWeight) -> Optional[torch.Tensor]:
    """One fp16 / bf16 row on the GPU through our GEMV kernel (src/kernels/cuda/gemv.cu), or None
    where it does not apply. MAGA_DISABLE_CUDA_GEMV=1 keeps cuBLAS (for A/B measurements)."""
    weight = w.weight
    if weight is None or not x.is_cuda or _CUDA_GEMV_OFF or x.dim() != 2 or x.shape[0] != 1:
        return None
    kernels = kernels_for(x, weight)
    if (kernels is None or weight.dtype not in (torch.float16, torch.bfloat16) or x.dtype != weight.dtype
            or x.device != weight.device or not x.is_contiguous() or not weight.is_contiguous()
            or w.in_features % 8 or w.in_features > kernels.gemv_max_in_features or x.shape[1] != w.in_features
            or not aligned(x) or not aligned(weight)):
        return None
    out = torch.empty(1, w.out_features, dtype=x.dtype, device=x.device)
    check_status(kernels, kernels.gemv(out, x, weight), "gemv")
    return out


def linear(x: torch.Tensor, w: LinearWeight, bias: Optional[torch.Tensor] = None,
           lora: Optional[LoraRows] = None) -> torch.Tensor:
    """x @ W.T (+ bias), plus each row's LoRA term when the step has adapter rows (ops/lora.py)."""
    out = _base_linear(x, w, bias)
    if lora is not None and (w.lora or lora.static):
        out = add_lora(out, x, w.lora, lora)
    return out


def _base_linear(x: torch.Tensor, w: LinearWeight, bias: Optional[torch.Tensor]) -> torch.Tensor:
    if w.qweight is not None:
        return _int8_linear(x, w, bias) if w.qweight.dtype == torch.int8 else _fp8_linear(x, w, bias)
    if bias is None and x.is_cuda:
        out = _cuda_gemv(x, w)
        if out is not None:
            return out
    if w.gemv and x.dim() == 2 and x.shape[0] <= _GEMV_MAX_ROWS and x.dtype == torch.float32:
        return cpu_kernels().gemv_f32(x, w.weight, bias)
    if w.packed is not None:
        return torch.ops.mkldnn._linear_pointwise(x, w.packed, bias, "none", [], "")
    return F.linear(x, w.weight, bias)
