"""Rotary position embedding applied to flat [tokens, heads, head_dim] tensors."""
import torch


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """NeoX-style (rotate halves) rotary on the first `rotary_dim` channels of every head.

    x: [tokens, heads, head_dim] (queries and keys may be stacked along heads: one call for both);
    cos/sin: [tokens, 1, rotary_dim // 2] in fp32. Returns a new tensor in x's dtype.
    """
    half = rotary_dim // 2
    rot = x[..., :rotary_dim].float()
    x1, x2 = rot[..., :half], rot[..., half:]
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
    if rotary_dim == x.shape[-1]:
        return out
    return torch.cat((out, x[..., rotary_dim:]), dim=-1)
