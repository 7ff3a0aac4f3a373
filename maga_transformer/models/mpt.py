"""MPT (MosaicML, transformers' MptForCausalLM): ALiBi with MPT's slope schedule (alibi_bias_max),
no linear biases, LayerNorms without bias, Wqkv as [q | k | v] optionally clamped (clip_qkv),
exact GELU, lm_head tied to wte."""
from __future__ import annotations

import math
import re
from typing import Optional

import torch

from maga_transformer.models.arch import ModelArch
from maga_transformer.models.decoder import WeightName, eos_ids, map_with_tables
from maga_transformer.models.gpt_decoder import GptDecoderModel, require_keys
from maga_transformer.models.registry import register_model

_LAYER_NAME = re.compile(r"^(?:transformer\.)?blocks\.(\d+)\.(.+)$")
_LAYER_KEYS = {
    "norm_1.weight": "attn_norm", "norm_2.weight": "mlp_norm",
    "attn.Wqkv.weight": "qkv", "attn.out_proj.weight": "o",
    "ffn.up_proj.weight": "up", "ffn.down_proj.weight": "down",
}
_GLOBAL_KEYS = {"transformer.wte.weight": "embed", "transformer.norm_f.weight": "final_norm",
                "lm_head.weight": "lm_head"}


def mpt_alibi_slopes(num_heads: int, alibi_bias_max: float) -> torch.Tensor:
    """MPT's slopes (build_mpt_alibi_tensor): 2^-(i * bias_max / n) over the next power of two n of the
    heads; with fewer heads, the odd-indexed slopes first, then the even ones, cut to num_heads."""
    padded = 2 ** math.ceil(math.log2(num_heads))
    exponents = torch.arange(1, padded + 1, dtype=torch.float32) * (alibi_bias_max / padded)
    slopes = 1.0 / torch.pow(2, exponents)
    if padded != num_heads:
        slopes = torch.cat([slopes[1::2], slopes[::2]])[:num_heads]
    return slopes


class MptModel(GptDecoderModel):
    @classmethod
    def arch_from_hf_config(cls, hf: dict) -> ModelArch:
        vocab, hidden, layers, heads = require_keys(hf, "vocab_size", "d_model", "n_layers", "n_heads")
        attn = dict(hf.get("attn_config") or {})
        for unsupported in ("qk_ln", "prefix_lm", "softmax_scale"):
            if attn.get(unsupported):
                raise ValueError(f"MPT with attn_config.{unsupported} is not supported")
        if not attn.get("alibi", True):
            raise ValueError("MPT without ALiBi (learned positions) is not supported")
        return ModelArch(
            vocab_size=int(vocab), hidden_size=int(hidden), num_layers=int(layers), num_heads=int(heads),
            num_kv_heads=int(heads), head_dim=int(hidden) // int(heads),
            intermediate_size=int(float(hf.get("expansion_ratio", 4)) * int(hidden)),
            max_position_embeddings=int(hf.get("max_seq_len", 2048)),
            norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), position_encoding="alibi",
            alibi_bias_max=float(attn.get("alibi_bias_max", 8)), clip_qkv=attn.get("clip_qkv"),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)), hidden_act="gelu",
            bos_token_id=hf.get("bos_token_id"), eos_token_ids=eos_ids(hf.get("eos_token_id")))

    @classmethod
    def map_weight_name(cls, name: str) -> Optional[WeightName]:
        return map_with_tables(name, _LAYER_NAME, _LAYER_KEYS, _GLOBAL_KEYS)

    def alibi_slopes(self) -> torch.Tensor:
        return mpt_alibi_slopes(self.full_arch.num_heads, self.arch.alibi_bias_max)


register_model(["mpt"], MptModel, architectures=["MptForCausalLM", "MPTForCausalLM"])
