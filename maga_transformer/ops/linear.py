"""Linear layers with weights prepared once for the device.

Decode GEMMs on CPU are thin (a few rows against a large weight) and bandwidth-bound. Up to 3
fp32 rows go to our GEMV kernel (src/kernels/cpu/gemv.cc), which streams the weight at close to the
machine's memory bandwidth (about 2x oneDNN at one row). From 4 rows on, oneDNN's GEMM on weights
re-laid out once into its blocked format wins (it reuses each weight load across rows); it also
streams about twice as fast as torch's default path. So on CPU fp32 both layouts are kept: twice
the weight memory, the price of fast batch-1 and fast batched decode (docs/benchmarks.md).
On CUDA, fp16 / bf16 batches of up to 4 rows (decode at a small batch) go to our GEMV kernel
(src/kernels/cuda/gemv.cu), which streams the weight faster than cuBLAS's split-K kernels for these
shapes (docs/benchmarks.md); everything else uses F.linear (cuBLAS).
Other dtypes and devices use oneDNN or F.linear.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from maga_transformer.ops._compiled import cpu_kernels, cuda_kernels
from maga_transformer.ops._cuda import aligned, check_status

logger = logging.getLogger(__name__)

_PACK_BATCH_HINT = 16  # oneDNN picks its blocking for this many rows; measured on 1..64 rows
_GEMV_MAX_ROWS = 3  # measured crossover with oneDNN on the 2-core build machine (SmolLM2 shapes)
_CUDA_GEMV_MAX_ROWS = 4  # = kGemvMaxRows in src/kernels/cuda/gemv.h


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
    cuda_gemv: bool = False  # our CUDA GEMV serves fp16 / bf16 batches of up to gemv_max_rows rows


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
    return LinearWeight(out_features, in_features, weight=weight if keep_plain else None, packed=packed, gemv=gemv,
                        cuda_gemv=_cuda_gemv_fits(weight))


def _cuda_gemv_fits(weight: torch.Tensor) -> bool:
    return (weight.is_cuda and weight.dtype in (torch.float16, torch.bfloat16) and weight.shape[1] % 8 == 0
            and aligned(weight) and cuda_kernels() is not None and os.environ.get("MAGA_DISABLE_CUDA_GEMV") != "1")


def gemv_cuda(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x @ w.T (+ bias) on our CUDA kernel: x [rows <= gemv_max_rows, in] and w [out, in], fp16 / bf16,
    in % 8 == 0. Checked here (see gemv_f32 on why not in C++)."""
    kernels = cuda_kernels()
    if kernels is None:
        raise RuntimeError("the CUDA kernels are not available")
    tensors = [x, w] + ([bias] if bias is not None else [])
    if any(not t.is_cuda or t.dtype != x.dtype or t.device != x.device for t in tensors) or \
            x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError("gemv_cuda: fp16 / bf16 tensors of one dtype on one CUDA device")
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1] or w.shape[1] % 8 != 0:
        raise ValueError(f"gemv_cuda: shapes [rows, in] x [out, in] with in % 8 == 0, got {tuple(x.shape)} "
                         f"and {tuple(w.shape)}")
    if not 1 <= x.shape[0] <= kernels.gemv_max_rows:
        raise ValueError(f"gemv_cuda: 1 to {kernels.gemv_max_rows} rows, got {x.shape[0]}")
    if bias is not None and (bias.shape != (w.shape[0],) or not bias.is_contiguous()):
        raise ValueError(f"gemv_cuda: bias must be contiguous with shape ({w.shape[0]},)")
    x, w = x.contiguous(), w.contiguous()
    if not (aligned(x) and aligned(w)):
        raise ValueError("gemv_cuda: x and w must be 16-byte aligned")
    return _run_cuda_gemv(kernels, x, w, bias)


def _run_cuda_gemv(kernels, x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    out = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device)
    check_status(kernels, kernels.gemv(out, x, w, bias), "gemv")
    return out


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


def linear(x: torch.Tensor, w: LinearWeight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    if w.cuda_gemv and x.dim() == 2 and x.shape[0] <= _CUDA_GEMV_MAX_ROWS and x.dtype == w.weight.dtype:
        x = x.contiguous()
        if aligned(x):
            return _run_cuda_gemv(cuda_kernels(), x, w.weight, bias)
    if w.gemv and x.dim() == 2 and x.shape[0] <= _GEMV_MAX_ROWS and x.dtype == torch.float32:
        return cpu_kernels().gemv_f32(x, w.weight, bias)
    if w.packed is not None:
        return torch.ops.mkldnn._linear_pointwise(x, w.packed, bias, "none", [], "")
    return F.linear(x, w.weight, bias)
