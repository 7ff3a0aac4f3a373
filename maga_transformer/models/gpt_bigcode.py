"""GPT-BigCode (StarCoder, SantaCoder-MQA, WizardCoder): learned absolute positions, LayerNorm,
multi-query (multi_query=true: one K/V head) or MHA attention through a fused c_attn, biases,
gelu_pytorch_tanh, lm_head tied to wte."""
from __future__ import annotations

import re
from typing import Optional

from maga_transformer.models.arch import ModelArch
from maga_transformer.models.decoder import WeightName, eos_ids, map_with_tables
from maga_transformer.models.gpt_decoder import GptDecoderModel, check_activation, require_keys, with_bias_keys
from maga_transformer.models.registry import register_model

_LAYER_NAME = re.compile(r"^(?:transformer\.)?h\.(\d+)\.(.+)$")
_LAYER_KEYS = with_bias_keys({
    "ln_1.weight": "attn_norm", "ln_2.weight": "mlp_norm",
    "attn.c_attn.weight": "qkv", "attn.c_proj.weight": "o",
    "mlp.c_fc.weight": "up", "mlp.c_proj.weight": "down",
})
_GLOBAL_KEYS = with_bias_keys({
    "transformer.wte.weight": "embed", "transformer.wpe.weight": "pos_embed",
    "transformer.ln_f.weight": "final_norm", "lm_head.weight": "lm_head",
})


class GptBigCodeModel(GptDecoderModel):
    # MHA c_attn is [heads, 3, head_dim]; multi-query is [q | k | v], the one-group case of the same.
    QKV_GROUPED_BY_KV_HEAD = True

    @classmethod
    def arch_from_hf_config(cls, hf: dict) -> ModelArch:
        vocab, hidden, layers, heads = require_keys(hf, "vocab_size", "n_embd", "n_layer", "n_head")
        if not hf.get("scale_attn_weights", True):
            raise ValueError("GPT-BigCode with scale_attn_weights=false is not supported")
        return ModelArch(
            vocab_size=int(vocab), hidden_size=int(hidden), num_layers=int(layers), num_heads=int(heads),
            num_kv_heads=1 if hf.get("multi_query", True) else int(heads), head_dim=int(hidden) // int(heads),
            intermediate_size=int(hf.get("n_inner") or 4 * int(hidden)),
            max_position_embeddings=int(hf.get("n_positions", 2048)),
            norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), position_encoding="learned",
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
            hidden_act=check_activation(str(hf.get("activation_function", "gelu_pytorch_tanh"))),
            bos_token_id=hf.get("bos_token_id"), eos_token_ids=eos_ids(hf.get("eos_token_id")))

    @classmethod
    def map_weight_name(cls, name: str) -> Optional[WeightName]:
        return map_with_tables(name, _LAYER_NAME, _LAYER_KEYS, _GLOBAL_KEYS)


register_model(["gpt_bigcode", "starcoder", "wizardcoder", "santacoder"], GptBigCodeModel,
               architectures=["GPTBigCodeForCausalLM"])
