"""Falcon (transformers' FalconForCausalLM and the original RWForCausalLM checkpoints).

Falcon-7B style: multi-query, attention and MLP in parallel off one LayerNorm. The new decoder
architecture (Falcon-40B/180B): grouped K/V heads (num_kv_heads) and two LayerNorms (ln_attn,
ln_mlp). Rotary positions, or ALiBi when alibi=true (Falcon-RW), fused query_key_value grouped
per K/V head, optional linear biases (bias=true), lm_head tied to the embedding.
"""
from __future__ import annotations

import re
from typing import Optional

import torch

from maga_transformer import ops
from maga_transformer.models.arch import ModelArch
from maga_transformer.models.decoder import WeightName, eos_ids, map_with_tables
from maga_transformer.models.gpt_decoder import GptDecoderModel, check_activation, first_present, with_bias_keys
from maga_transformer.models.registry import register_model
from maga_transformer.models.rotary_embedding import rope_config_from_hf

_LAYER_NAME = re.compile(r"^(?:transformer\.)?h\.(\d+)\.(.+)$")
_LAYER_KEYS = with_bias_keys({
    "input_layernorm.weight": "attn_norm", "ln_attn.weight": "attn_norm",
    "ln_mlp.weight": "mlp_norm", "post_attention_layernorm.weight": "mlp_norm",
    "self_attention.query_key_value.weight": "qkv", "self_attention.dense.weight": "o",
    "mlp.dense_h_to_4h.weight": "up", "mlp.dense_4h_to_h.weight": "down",
})
_GLOBAL_KEYS = with_bias_keys({
    "transformer.word_embeddings.weight": "embed", "transformer.ln_f.weight": "final_norm",
    "lm_head.weight": "lm_head",
})


def _layout(hf: dict, num_heads: int) -> dict:
    """K/V heads and how the norms feed the branches, as FalconDecoderLayer wires them."""
    # RW-40B configs predate the flag; they are the ones that name n_head_kv.
    new_arch = bool(hf.get("new_decoder_architecture", "n_head_kv" in hf))
    if new_arch:
        two_norms = int(hf.get("num_ln_in_parallel_attn") or 2) == 2
        kv_heads = int(first_present(hf, "num_kv_heads", "n_head_kv"))
        return dict(num_kv_heads=kv_heads, parallel_residual=True, shared_block_norm=not two_norms)
    parallel = bool(hf.get("parallel_attn", True))
    kv_heads = 1 if hf.get("multi_query", True) else num_heads
    return dict(num_kv_heads=kv_heads, parallel_residual=parallel, shared_block_norm=parallel)


class FalconModel(GptDecoderModel):
    # new architecture: [group: q heads, k, v]; MHA: [heads, 3, head_dim]; multi-query: [q | k | v]
    QKV_GROUPED_BY_KV_HEAD = True

    @classmethod
    def arch_from_hf_config(cls, hf: dict) -> ModelArch:
        hidden = int(first_present(hf, "hidden_size", "n_embed"))
        heads = int(first_present(hf, "num_attention_heads", "n_head"))
        head_dim = hidden // heads
        alibi = bool(hf.get("alibi", False))
        return ModelArch(
            vocab_size=int(first_present(hf, "vocab_size")), hidden_size=hidden,
            num_layers=int(first_present(hf, "num_hidden_layers", "n_layer")), num_heads=heads, head_dim=head_dim,
            intermediate_size=int(hf.get("ffn_hidden_size") or 4 * hidden),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
            rope=rope_config_from_hf(hf, head_dim), position_encoding="alibi" if alibi else "rope",
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
            hidden_act=check_activation(str(hf.get("activation", "gelu"))), **_layout(hf, heads),
            bos_token_id=hf.get("bos_token_id"), eos_token_ids=eos_ids(hf.get("eos_token_id", 11)))

    @classmethod
    def map_weight_name(cls, name: str) -> Optional[WeightName]:
        return map_with_tables(name, _LAYER_NAME, _LAYER_KEYS, _GLOBAL_KEYS)

    def alibi_slopes(self) -> torch.Tensor:
        # Falcon adds ALiBi to the raw q.k scores and scales both together by 1/sqrt(head_dim).
        return ops.alibi_slopes(self.full_arch.num_heads) * self.scale


register_model(["falcon", "refinedweb", "refinedwebmodel", "rw"], FalconModel,
               architectures=["FalconForCausalLM", "RWForCausalLM"])
