"""GPT-NeoX (Pythia, GPT-NeoX-20B, StableLM-alpha): LayerNorm, partial rotary (rotary_pct), parallel
or sequential residual, q/k/v fused per head ([heads, 3, head_dim]), biases, an untied embed_out."""
from __future__ import annotations

import re
from typing import Optional

from maga_transformer.models.arch import ModelArch
from maga_transformer.models.decoder import WeightName, eos_ids, map_with_tables
from maga_transformer.models.gpt_decoder import GptDecoderModel, check_activation, require_keys, with_bias_keys
from maga_transformer.models.registry import register_model
from maga_transformer.models.rotary_embedding import rope_config_from_hf

_LAYER_NAME = re.compile(r"^(?:gpt_neox\.)?layers\.(\d+)\.(.+)$")
_LAYER_KEYS = with_bias_keys({
    "input_layernorm.weight": "attn_norm", "post_attention_layernorm.weight": "mlp_norm",
    "attention.query_key_value.weight": "qkv", "attention.dense.weight": "o",
    "mlp.dense_h_to_4h.weight": "up", "mlp.dense_4h_to_h.weight": "down",
})
_GLOBAL_KEYS = with_bias_keys({
    "gpt_neox.embed_in.weight": "embed", "gpt_neox.final_layer_norm.weight": "final_norm",
    "embed_out.weight": "lm_head",
})


def _rope_keys(hf: dict) -> dict:
    """Old configs say rotary_pct / rotary_emb_base; transformers 5 says rope_parameters."""
    hf = dict(hf)
    if "rotary_pct" in hf:
        hf.setdefault("partial_rotary_factor", hf["rotary_pct"])
    if "rotary_emb_base" in hf:
        hf.setdefault("rope_theta", hf["rotary_emb_base"])
    return hf


class GptNeoXModel(GptDecoderModel):
    QKV_GROUPED_BY_KV_HEAD = True

    @classmethod
    def arch_from_hf_config(cls, hf: dict) -> ModelArch:
        vocab, hidden, layers, heads, inter = require_keys(
            hf, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
        head_dim = int(hidden) // int(heads)
        return ModelArch(
            vocab_size=int(vocab), hidden_size=int(hidden), num_layers=int(layers), num_heads=int(heads),
            num_kv_heads=int(heads), head_dim=head_dim, intermediate_size=int(inter),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            norm_eps=float(hf.get("layer_norm_eps", 1e-5)),
            rope=rope_config_from_hf(_rope_keys(hf), head_dim),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            hidden_act=check_activation(str(hf.get("hidden_act", "gelu"))),
            parallel_residual=bool(hf.get("use_parallel_residual", True)),
            bos_token_id=hf.get("bos_token_id"), eos_token_ids=eos_ids(hf.get("eos_token_id")))

    @classmethod
    def map_weight_name(cls, name: str) -> Optional[WeightName]:
        return map_with_tables(name, _LAYER_NAME, _LAYER_KEYS, _GLOBAL_KEYS)


register_model(["gpt_neox", "gptneox", "pythia"], GptNeoXModel, architectures=["GPTNeoXForCausalLM"])
