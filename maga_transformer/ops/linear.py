"""Linear layers with weights prepared once for the device.

On CPU, fp32/bf16 weights are re-laid out once into oneDNN's blocked format: decode GEMMs are thin
(a few rows against a large weight) and bandwidth-bound, and the packed layout streams weights at
roughly twice the rate of torch's default path on our 2-core machine (see docs/benchmarks.md).
Elsewhere, or if oneDNN is unavailable, the plain [out, in] weight and F.linear are used.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

_PACK_BATCH_HINT = 16  # oneDNN picks its blocking for this many rows; measured best for 1..64 rows


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
    weight: Optional[torch.Tensor] = None  # plain layout (kept when not packed)
    packed: Optional[torch.Tensor] = None  # oneDNN blocked layout (CPU)

    def plain(self) -> torch.Tensor:
        if self.weight is None:
            raise RuntimeError("this weight was packed for oneDNN; the plain copy was released")
        return self.weight


def prepare_linear(weight: torch.Tensor) -> LinearWeight:
    out_features, in_features = weight.shape
    if _ONEDNN and weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16):
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), _PACK_BATCH_HINT)
            return LinearWeight(out_features, in_features, packed=packed)
        except RuntimeError as err:  # an unusual build: fall back, loudly once
            logger.warning("oneDNN weight packing failed (%s); using torch's default linear", err)
    return LinearWeight(out_features, in_features, weight=weight.contiguous())


def linear(x: torch.Tensor, w: LinearWeight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    if w.packed is not None:
        return torch.ops.mkldnn._linear_pointwise(x, w.packed, bias, "none", [], "")
    return F.linear(x, w.weight, bias)
