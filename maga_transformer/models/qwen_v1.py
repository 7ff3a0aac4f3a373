"""Qwen v1 (QWenLMHeadModel: Qwen-1.8B/7B/14B/72B) under its original checkpoint names.

The math is Qwen2's (RMSNorm, rotary, biased fused q/k/v, SiLU-gated MLP); only names and config keys
differ. Its MLP is c_proj(w1(x) * silu(w2(x))): w2 is the gate and w1 the up projection, and
config.json's intermediate_size is twice the width of each. c_attn always has a bias; c_proj and the
MLP have biases only when no_bias is false.

use_dynamic_ntk and use_logn_attn only change anything once a sequence is longer than seq_length (the
trained context). They are not implemented; a checkpoint that enables them is served with its
context capped at seq_length, where it computes exactly what the original code does.
"""
from __future__ import annotations

import logging
import re
from typing import Optional

from maga_transformer.models.arch import ModelArch, RopeConfig
from maga_transformer.models.decoder import DecoderModel, WeightName, eos_ids, map_with_tables
from maga_transformer.models.registry import register_model

logger = logging.getLogger(__name__)

_LAYER_NAME = re.compile(r"^transformer\.h\.(\d+)\.(.+)$")
_LAYER_KEYS = {
    "ln_1.weight": "input_norm", "ln_2.weight": "post_norm",
    "attn.c_attn.weight": "qkv", "attn.c_attn.bias": "qkv_bias",
    "attn.c_proj.weight": "o", "attn.c_proj.bias": "o_bias",
    "mlp.w2.weight": "gate", "mlp.w1.weight": "up", "mlp.c_proj.weight": "down",
    "mlp.w2.bias": "gate_bias", "mlp.w1.bias": "up_bias", "mlp.c_proj.bias": "down_bias",
}
_GLOBAL_KEYS = {"transformer.wte.weight": "embed", "transformer.ln_f.weight": "final_norm", "lm_head.weight": "lm_head"}



def _context_length(hf: dict) -> int:
    seq_length = int(hf.get("seq_length", 2048))
    if hf.get("use_dynamic_ntk") or hf.get("use_logn_attn"):
        logger.warning("Qwen v1: use_dynamic_ntk / use_logn_attn are not supported; the context is capped at "
                       "seq_length=%d, within which they have no effect", seq_length)
        return seq_length
    return int(hf.get("max_position_embeddings") or seq_length)


class QWenModel(DecoderModel):
    @classmethod
    def specialize(cls, hf: dict) -> type:
        """A Qwen-VL checkpoint says model_type qwen too; its config.json has a `visual` section."""
        return QWenVLModel if hf.get("visual") else cls

    @classmethod
    def arch_from_hf_config(cls, hf: dict) -> ModelArch:
        try:
            hidden, num_heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
            sizes = dict(vocab_size=int(hf["vocab_size"]), hidden_size=hidden,
                         num_layers=int(hf["num_hidden_layers"]), num_heads=num_heads, num_kv_heads=num_heads,
                         intermediate_size=int(hf["intermediate_size"]) // 2)
        except KeyError as err:
            raise ValueError(f"config.json is missing {err.args[0]!r}") from None
        head_dim = int(hf.get("kv_channels") or hidden // num_heads)
        biased = not hf.get("no_bias", True)
        rope = RopeConfig(theta=float(hf.get("rotary_emb_base", 10000.0)),
                          rotary_dim=int(head_dim * float(hf.get("rotary_pct", 1.0))))
        return ModelArch(
            **sizes, head_dim=head_dim, max_position_embeddings=_context_length(hf),
            norm_eps=float(hf.get("layer_norm_epsilon", 1e-6)), rope=rope,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=True, o_bias=biased, mlp_bias=biased, hidden_act="silu",
            bos_token_id=hf.get("bos_token_id"), eos_token_ids=eos_ids(hf.get("eos_token_id")))

    @classmethod
    def map_weight_name(cls, name: str) -> Optional[WeightName]:
        return map_with_tables(name, _LAYER_NAME, _LAYER_KEYS, _GLOBAL_KEYS)


class QWenVLModel(QWenModel):
    """Qwen-VL (model_type qwen_vl): a Qwen v1 language model plus a vision transformer
    (transformer.visual.*, config.json's `visual`). Images need that tower (roadmap: multimodal), so
    until then it is not loaded and requests with images are refused; text runs as on Qwen v1."""

    @classmethod
    def arch_from_hf_config(cls, hf: dict) -> ModelArch:
        logger.warning("Qwen-VL: serving the language model only; the vision transformer is not loaded and "
                       "requests with images are refused (multimodal is a later feature)")
        return super().arch_from_hf_config(hf)


register_model(["qwen", "qwen_7b", "qwen_13b", "qwen_1b8"], QWenModel, architectures=["QWenLMHeadModel"])
register_model(["qwen_vl"], QWenVLModel)
