"""RMSNorm (LLaMA family) with transformers' numerics: normalize in fp32, cast back, then scale."""
from typing import Tuple

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)  # one fused kernel
    return weight * F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns (normed(x + residual), x + residual): the new residual stream and its normed view."""
    summed = x + residual
    return rms_norm(summed, weight, eps), summed
