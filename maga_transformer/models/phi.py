"""Phi-1 / Phi-1.5 / Phi-2 (transformers' PhiForCausalLM): one LayerNorm feeds attention and MLP in
parallel, partial rotary (partial_rotary_factor), biased q/k/v/dense and fc1/fc2, gelu_new, a
biased lm_head."""
from __future__ import annotations

import re
from typing import Optional

from maga_transformer.models.arch import ModelArch
from maga_transformer.models.decoder import WeightName, eos_ids, map_with_tables
from maga_transformer.models.gpt_decoder import GptDecoderModel, check_activation, require_keys, with_bias_keys
from maga_transformer.models.registry import register_model
from maga_transformer.models.rotary_embedding import rope_config_from_hf

_LAYER_NAME = re.compile(r"^(?:model\.)?layers\.(\d+)\.(.+)$")
_LAYER_KEYS = with_bias_keys({
    "input_layernorm.weight": "attn_norm",
    "self_attn.q_proj.weight": "q", "self_attn.k_proj.weight": "k", "self_attn.v_proj.weight": "v",
    "self_attn.dense.weight": "o", "mlp.fc1.weight": "up", "mlp.fc2.weight": "down",
})
_GLOBAL_KEYS = with_bias_keys({
    "model.embed_tokens.weight": "embed", "model.final_layernorm.weight": "final_norm",
    "lm_head.weight": "lm_head",
})


class PhiModel(GptDecoderModel):
    @classmethod
    def arch_from_hf_config(cls, hf: dict) -> ModelArch:
        vocab, hidden, layers, heads, inter = require_keys(
            hf, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
        if hf.get("qk_layernorm"):
            raise ValueError("Phi with qk_layernorm=true is not supported")
        head_dim = int(hidden) // int(heads)
        return ModelArch(
            vocab_size=int(vocab), hidden_size=int(hidden), num_layers=int(layers), num_heads=int(heads),
            num_kv_heads=int(hf.get("num_key_value_heads") or heads), head_dim=head_dim,
            intermediate_size=int(inter), max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            norm_eps=float(hf.get("layer_norm_eps", 1e-5)),
            rope=rope_config_from_hf({"partial_rotary_factor": 0.5, **hf}, head_dim),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            hidden_act=check_activation(str(hf.get("hidden_act", "gelu_new"))),
            parallel_residual=True, shared_block_norm=True,
            bos_token_id=hf.get("bos_token_id"), eos_token_ids=eos_ids(hf.get("eos_token_id")))

    @classmethod
    def map_weight_name(cls, name: str) -> Optional[WeightName]:
        return map_with_tables(name, _LAYER_NAME, _LAYER_KEYS, _GLOBAL_KEYS)


register_model(["phi", "phi-1", "phi-1.5", "phi-2"], PhiModel, architectures=["PhiForCausalLM"])
