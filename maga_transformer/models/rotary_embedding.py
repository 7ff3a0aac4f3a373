"""cos/sin tables for rotary embeddings, with linear, dynamic-NTK and llama3 frequency scaling.

Dynamic NTK follows transformers: the frequencies depend on the sequence's current length once it
exceeds max_position_embeddings, so each token gets the frequencies of its own sequence's length.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch

from maga_transformer.models.arch import RopeConfig

_SUPPORTED = ("default", "linear", "dynamic", "llama3")


def rope_config_from_hf(hf: dict, head_dim: int) -> RopeConfig:
    """Read transformers 5 `rope_parameters` or the older `rope_theta` + `rope_scaling` keys."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or {}
    params.update({k: v for k, v in scaling.items() if k not in params})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = str(params.get("rope_type", params.get("type", "default")))
    if rope_type not in _SUPPORTED:
        raise ValueError(f"rope_scaling: rope type {rope_type!r} is not supported; supported: {_SUPPORTED}")
    partial = float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)))
    return RopeConfig(
        theta=theta, rope_type=rope_type, factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings", 0)),
        rotary_dim=int(head_dim * partial))


class RotaryEmbedding:
    def __init__(self, cfg: RopeConfig, max_position_embeddings: int, device: torch.device) -> None:
        self.cfg = cfg
        self.max_position_embeddings = max_position_embeddings
        self.exponents = torch.arange(0, cfg.rotary_dim, 2, dtype=torch.int64).float().to(device) / cfg.rotary_dim
        self.inv_freq = self._static_inv_freq(device)

    def _static_inv_freq(self, device: torch.device) -> torch.Tensor:
        inv_freq = 1.0 / (self.cfg.theta ** self.exponents)
        if self.cfg.rope_type == "linear":
            inv_freq = inv_freq / self.cfg.factor
        elif self.cfg.rope_type == "llama3":
            inv_freq = _llama3_scale(inv_freq, self.cfg)
        return inv_freq.to(device)

    def cos_sin(self, positions: torch.Tensor, seq_lens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """positions, seq_lens: [tokens]. Returns fp32 cos, sin of shape [tokens, 1, rotary_dim // 2]."""
        if self.cfg.rope_type == "dynamic" and int(seq_lens.max()) > self.max_position_embeddings:
            inv_freq = self._dynamic_inv_freq(seq_lens)
        else:
            inv_freq = self.inv_freq.unsqueeze(0)
        freqs = (positions.float().unsqueeze(-1) * inv_freq).unsqueeze(1)
        return freqs.cos(), freqs.sin()

    def _dynamic_inv_freq(self, seq_lens: torch.Tensor) -> torch.Tensor:
        dim = self.cfg.rotary_dim
        orig = self.max_position_embeddings
        lens = torch.clamp(seq_lens, min=orig).float()
        base = self.cfg.theta * ((self.cfg.factor * lens / orig) - (self.cfg.factor - 1)) ** (dim / (dim - 2))
        return 1.0 / (base.unsqueeze(-1) ** self.exponents.unsqueeze(0))


def _llama3_scale(inv_freq: torch.Tensor, cfg: RopeConfig) -> torch.Tensor:
    old_len = cfg.original_max_position_embeddings
    low_wavelen = old_len / cfg.low_freq_factor
    high_wavelen = old_len / cfg.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / cfg.factor, inv_freq)
    smooth = (old_len / wavelen - cfg.low_freq_factor) / (cfg.high_freq_factor - cfg.low_freq_factor)
    smoothed = (1 - smooth) * scaled / cfg.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)
