"""RMSNorm (LLaMA family), computed in fp32 like transformers does, then cast back."""
from typing import Tuple

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns (normed(x + residual), x + residual): the new residual stream and its normed view."""
    summed = x + residual
    return rms_norm(summed, weight, eps), summed
