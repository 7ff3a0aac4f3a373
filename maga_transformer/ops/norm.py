"""RMSNorm (LLaMA family) with transformers' numerics: normalize in fp32, cast back, then scale.

On CUDA a fused kernel (src/kernels/cuda/rms_norm.cu) with the same rounding steps serves inputs
whose weight has x's dtype; on the CPU fp32 rows go to src/kernels/cpu/decode_ops.cc (one call in
place of torch's five to seven); anything else runs the torch reference.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from maga_transformer.ops._cpu import cpu_kernels_for
from maga_transformer.ops._cuda import KERNEL_DTYPES, check_status, kernels_for, same_device


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)  # one fused kernel
    return weight * F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)


def fused_add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                                 eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    summed = x + residual
    return rms_norm_reference(summed, weight, eps), summed


def _norm_kernel(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor, eps: float):
    """(normed, summed or None) from the CUDA or the CPU kernel, or None when neither applies."""
    tensors = (x, weight) if residual is None else (x, residual, weight)
    if x.is_cpu:
        return _cpu_norm(x, residual, weight, eps, cpu_kernels_for(*tensors))
    kernels = kernels_for(*tensors)
    if kernels is None or not same_device(x, residual, weight) or x.dim() < 1 or x.numel() == 0:
        return None
    hidden = x.shape[-1]
    if x.dtype not in KERNEL_DTYPES or weight.dtype != x.dtype or weight.shape != (hidden,):
        return None
    if residual is not None and (residual.dtype != x.dtype or residual.shape != x.shape):
        return None
    x2 = x.reshape(-1, hidden)
    res2 = residual.reshape(-1, hidden) if residual is not None else None
    if x2.stride(-1) != 1 or (res2 is not None and res2.stride(-1) != 1) or not weight.is_contiguous():
        return None
    if x2.shape[0] >= 2 ** 31 or hidden >= 2 ** 31:
        return None
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    summed = torch.empty_like(out) if residual is not None else None
    check_status(kernels, kernels.rms_norm(out, summed, x2, res2, weight, float(eps)), "rms_norm")
    return out.view(x.shape), (summed.view(x.shape) if summed is not None else None)


def _cpu_norm(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor, eps: float, kernels):
    """Python work kept to a few attribute reads: at batch 1 this wrapper, not the kernel (1.5 us),
    is most of the op's time."""
    if kernels is None or x.dim() != 2 or x.numel() == 0 or x.stride(1) != 1:
        return None  # [tokens, hidden] rows are what the decoders pass; others take the reference
    if weight.shape != (x.shape[1],) or not weight.is_contiguous():
        return None
    if residual is not None and (residual.shape != x.shape or residual.stride(1) != 1):
        return None
    out = torch.empty(x.shape, dtype=x.dtype)
    summed = torch.empty(x.shape, dtype=x.dtype) if residual is not None else None
    kernels.rms_norm_f32(out, summed, x, residual, weight, float(eps))
    return out, summed


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    result = _norm_kernel(x, None, weight, eps)
    return result[0] if result is not None else rms_norm_reference(x, weight, eps)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns (normed(x + residual), x + residual): the new residual stream and its normed view."""
    result = _norm_kernel(x, residual, weight, eps)
    return result if result is not None else fused_add_rms_norm_reference(x, residual, weight, eps)


def layer_norm_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """LayerNorm (GPT-style families); bias may be None (MPT). No CUDA kernel yet: torch's own is fused."""
    return layer_norm_reference(x, weight, bias, eps)
