"""Rotary position embedding applied to flat [tokens, heads, head_dim] queries and keys."""
from typing import Tuple

import torch


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 rotary_dim: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """NeoX-style (rotate halves) rotary on the first `rotary_dim` channels of each head.

    cos/sin: [tokens, rotary_dim // 2] in fp32. Returns new tensors in the inputs' dtype.
    """
    return _rotate(q, cos, sin, rotary_dim), _rotate(k, cos, sin, rotary_dim)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    half = rotary_dim // 2
    rot = x[..., :rotary_dim].float()
    x1, x2 = rot[..., :half], rot[..., half:]
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    out = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)
    if rotary_dim == x.shape[-1]:
        return out
    return torch.cat((out, x[..., rotary_dim:]), dim=-1)
