"""Qwen2 / Qwen2.5 and Qwen3: LLaMA math under transformers' LLaMA weight names.

Qwen2 always biases q/k/v (never o). Qwen3 drops those biases (unless attention_bias) and RMS-normalizes
each query and key head before rotary (self_attn.q_norm / k_norm). Both only slide the attention
window when use_sliding_window is set; config.json keeps a `sliding_window` value either way.
"""
from __future__ import annotations

import re
from dataclasses import replace
from typing import Optional

from maga_transformer.models.arch import ModelArch
from maga_transformer.models.decoder import WeightName
from maga_transformer.models.llama import LlamaModel
from maga_transformer.models.registry import register_model

_LAYER_NAME = re.compile(r"^(?:model\.)?layers\.(\d+)\.self_attn\.([qk])_norm\.weight$")


def qwen_sliding_window(hf: dict) -> Optional[int]:
    """The one window every layer slides, or None. Layers below max_window_layers attend fully in
    transformers; a mix of windowed and full layers is refused: the engine keeps one window per model."""
    if not hf.get("use_sliding_window", False) or not hf.get("sliding_window"):
        return None
    num_layers = int(hf["num_hidden_layers"])
    layer_types = hf.get("layer_types") or [
        "sliding_attention" if i >= int(hf.get("max_window_layers", num_layers)) else "full_attention"
        for i in range(num_layers)]
    kinds = set(layer_types)
    if kinds == {"full_attention"}:
        return None
    if kinds != {"sliding_attention"}:
        raise ValueError("use_sliding_window with some full-attention layers (max_window_layers > 0 or mixed "
                         "layer_types) is not supported yet: the engine applies one window to every layer")
    return int(hf["sliding_window"])


class Qwen2Model(LlamaModel):
    @classmethod
    def arch_from_hf_config(cls, hf: dict) -> ModelArch:
        arch = super().arch_from_hf_config(hf)
        return replace(arch, qkv_bias=True, o_bias=False, sliding_window=qwen_sliding_window(hf))


class Qwen3Model(LlamaModel):
    @classmethod
    def arch_from_hf_config(cls, hf: dict) -> ModelArch:
        arch = super().arch_from_hf_config(hf)
        return replace(arch, qk_norm=True, sliding_window=qwen_sliding_window(hf))

    @classmethod
    def map_weight_name(cls, name: str) -> Optional[WeightName]:
        match = _LAYER_NAME.match(name)
        if match:
            return int(match.group(1)), f"{match.group(2)}_norm"
        return super().map_weight_name(name)


register_model(["qwen2", "qwen2.5", "qwen2_5"], Qwen2Model, architectures=["Qwen2ForCausalLM"])
register_model(["qwen3"], Qwen3Model, architectures=["Qwen3ForCausalLM"])
