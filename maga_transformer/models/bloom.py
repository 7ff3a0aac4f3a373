"""BLOOM (and the SGPT-BLOOM embedding checkpoints): ALiBi instead of positions, a LayerNorm on the
word embeddings, query_key_value fused per head ([heads, 3, head_dim]), biases, tanh-GELU, lm_head
tied to the embedding. Original bigscience checkpoints drop the "transformer." prefix."""
from __future__ import annotations

import re
from typing import Optional

from maga_transformer.models.arch import ModelArch
from maga_transformer.models.decoder import WeightName, eos_ids, map_with_tables
from maga_transformer.models.gpt_decoder import GptDecoderModel, first_present, with_bias_keys
from maga_transformer.models.registry import register_model

_LAYER_NAME = re.compile(r"^(?:transformer\.)?h\.(\d+)\.(.+)$")
_LAYER_KEYS = with_bias_keys({
    "input_layernorm.weight": "attn_norm", "post_attention_layernorm.weight": "mlp_norm",
    "self_attention.query_key_value.weight": "qkv", "self_attention.dense.weight": "o",
    "mlp.dense_h_to_4h.weight": "up", "mlp.dense_4h_to_h.weight": "down",
})
_GLOBAL_KEYS = with_bias_keys({
    "word_embeddings.weight": "embed", "word_embeddings_layernorm.weight": "embed_norm",
    "ln_f.weight": "final_norm",
})
_GLOBAL_KEYS.update({"transformer." + name: key for name, key in _GLOBAL_KEYS.items()})
_GLOBAL_KEYS["lm_head.weight"] = "lm_head"


class BloomModel(GptDecoderModel):
    QKV_GROUPED_BY_KV_HEAD = True

    @classmethod
    def arch_from_hf_config(cls, hf: dict) -> ModelArch:
        if hf.get("apply_residual_connection_post_layernorm"):
            raise ValueError("BLOOM with apply_residual_connection_post_layernorm=true is not supported")
        hidden = int(first_present(hf, "hidden_size", "n_embed"))
        heads = int(first_present(hf, "num_attention_heads", "n_head"))
        return ModelArch(
            vocab_size=int(first_present(hf, "vocab_size")), hidden_size=hidden,
            num_layers=int(first_present(hf, "num_hidden_layers", "n_layer")), num_heads=heads, num_kv_heads=heads,
            head_dim=hidden // heads, intermediate_size=4 * hidden,
            # ALiBi has no position table; BLOOM was trained on 2048-token sequences
            max_position_embeddings=int(hf.get("seq_length") or 2048),
            norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), position_encoding="alibi", embedding_norm=True,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)), hidden_act="bloom_gelu",
            bos_token_id=hf.get("bos_token_id"), eos_token_ids=eos_ids(hf.get("eos_token_id")))

    @classmethod
    def map_weight_name(cls, name: str) -> Optional[WeightName]:
        return map_with_tables(name, _LAYER_NAME, _LAYER_KEYS, _GLOBAL_KEYS)


register_model(["bloom", "sgpt_bloom", "sgpt_bloom_vector"], BloomModel,
               architectures=["BloomForCausalLM", "BloomModel"])
