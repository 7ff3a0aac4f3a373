"""What every model family class shares, whatever its layer layout: the family hooks a registry entry
must fill in, the model's arch / dtype / device, and turning checkpoint tensors into device weights.
DecoderModel (LLaMA-shaped families) and GptDecoderModel (GPT-style families) build on it."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from maga_transformer import ops
from maga_transformer.models.arch import ModelArch, PromptLayout

WeightName = Tuple[Optional[int], str]  # (layer index or None for global weights, canonical name)


class FamilyModel:
    # True when prompt_layout() may return a layout: such models run without the prefix cache and
    # without CUDA graphs (their positions are not the token indices)
    USES_PROMPT_LAYOUT = False

    def __init__(self, arch: ModelArch, dtype: torch.dtype, device: torch.device) -> None:
        self.arch = arch
        self.dtype = dtype
        self.device = device
        self.scale = arch.head_dim ** -0.5

    # ---- family hooks -------------------------------------------------------------------------
    @classmethod
    def arch_from_hf_config(cls, hf: dict) -> ModelArch:
        raise NotImplementedError

    @classmethod
    def map_weight_name(cls, name: str) -> Optional[WeightName]:
        """Canonical (layer, name) of a checkpoint tensor, or None for tensors the model ignores."""
        raise NotImplementedError

    @classmethod
    def layout_for(cls, arch: ModelArch, prompt_token_ids: List[int]) -> Optional[PromptLayout]:
        """Positions / attention that depend on the prompt (GLM v1), or None: plain causal. A class
        method of the arch alone, so a front end without the weights can validate prompts."""
        return None

    def prompt_layout(self, prompt_token_ids: List[int]) -> Optional[PromptLayout]:
        return type(self).layout_for(self.arch, prompt_token_ids)

    # ---- loading helpers ------------------------------------------------------------------------
    def _cast(self, tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if tensor is None else tensor.to(device=self.device, dtype=self.dtype).contiguous()

    def _linear(self, tensor: torch.Tensor) -> ops.LinearWeight:
        return ops.prepare_linear(self._cast(tensor))
