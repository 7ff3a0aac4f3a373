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
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from maga_transformer.ops._compiled import cpu_kernels
from maga_transformer.ops._cuda import aligned, check_status, kernels_for

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
    # weight-only int8 (WEIGHT_TYPE=INT8): int8 [out, in] and one fp32 scale per output row
    qweight: Optional[torch.Tensor] = None
    scale: Optional[torch.Tensor] = None

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight the int8 one stands for, [out, in] in dtype (the quantization's oracle)."""
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


def prepare_int8_linear(weight: torch.Tensor) -> LinearWeight:
    """A weight-only int8 linear from a full-precision weight (on its device; the full weight is dropped)."""
    out_features, in_features = weight.shape
    q, scale = quantize_int8(weight)
    return LinearWeight(out_features, in_features, qweight=q, scale=scale)


def _int8_linear(x: torch.Tensor, w: LinearWeight, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Few fp32 rows on the CPU: our int8 GEMV (a quarter of the bytes streamed). Otherwise the
    reference: dequantize in x's dtype, then one GEMM (prefill, large batches, the GPU for now)."""
    kernels = cpu_kernels() if not x.is_cuda else None
    if (kernels is not None and x.dim() == 2 and x.dtype == torch.float32
            and x.shape[0] <= kernels.max_gemv_rows):
        return kernels.gemv_i8(x, w.qweight, w.scale, bias)
    return F.linear(x, w.dequantized(x.dtype), bias)


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


def linear(x: torch.Tensor, w: LinearWeight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    if w.qweight is not None:
        return _int8_linear(x, w, bias)
    if bias is None and x.is_cuda:
        out = _cuda_gemv(x, w)
        if out is not None:
            return out
    if w.gemv and x.dim() == 2 and x.shape[0] <= _GEMV_MAX_ROWS and x.dtype == torch.float32:
        return cpu_kernels().gemv_f32(x, w.weight, bias)
    if w.packed is not None:
        return torch.ops.mkldnn._linear_pointwise(x, w.packed, bias, "none", [], "")
    return F.linear(x, w.weight, bias)
