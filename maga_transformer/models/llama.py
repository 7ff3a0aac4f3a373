"""The LLaMA family: LLaMA 1/2/3, Mistral, Yi, Vicuna, Aquila, XVERSE, InternLM (biased q/k/v/o), SmolLM2.

All share transformers' LLaMA weight names (old Yi checkpoints name their norms ln1/ln2) and differ
only in config.json: GQA, rope scaling, biases, tied embeddings, Mistral's sliding window.
"""
from __future__ import annotations

import re
from typing import Optional

from maga_transformer.models.arch import ModelArch
from maga_transformer.models.decoder import DecoderModel, WeightName, eos_ids, map_with_tables
from maga_transformer.models.registry import register_model
from maga_transformer.models.rotary_embedding import rope_config_from_hf

_LAYER_NAME = re.compile(r"^(?:model\.)?layers\.(\d+)\.(.+)$")
_LAYER_KEYS = {
    "input_layernorm.weight": "input_norm",
    "ln1.weight": "input_norm",
    "post_attention_layernorm.weight": "post_norm",
    "ln2.weight": "post_norm",
    "self_attn.q_proj.weight": "q", "self_attn.k_proj.weight": "k", "self_attn.v_proj.weight": "v",
    "self_attn.o_proj.weight": "o",
    "self_attn.q_proj.bias": "q_bias", "self_attn.k_proj.bias": "k_bias", "self_attn.v_proj.bias": "v_bias",
    "self_attn.o_proj.bias": "o_bias",
    "mlp.gate_proj.weight": "gate", "mlp.up_proj.weight": "up", "mlp.down_proj.weight": "down",
    "mlp.gate_proj.bias": "gate_bias", "mlp.up_proj.bias": "up_bias", "mlp.down_proj.bias": "down_bias",
}
_GLOBAL_KEYS = {
    "model.embed_tokens.weight": "embed",
    "model.norm.weight": "final_norm",
    "lm_head.weight": "lm_head",
}
_SUPPORTED_ACTS = ("silu", "gelu", "gelu_pytorch_tanh", "gelu_new")



class LlamaModel(DecoderModel):
    @classmethod
    def arch_from_hf_config(cls, hf: dict) -> ModelArch:
        try:
            hidden = int(hf["hidden_size"])
            num_heads = int(hf["num_attention_heads"])
            arch_kwargs = dict(
                vocab_size=int(hf["vocab_size"]), hidden_size=hidden,
                num_layers=int(hf["num_hidden_layers"]), num_heads=num_heads,
                intermediate_size=int(hf["intermediate_size"]))
        except KeyError as err:
            raise ValueError(f"config.json is missing {err.args[0]!r}") from None
        head_dim = int(hf.get("head_dim") or hidden // num_heads)
        hidden_act = str(hf.get("hidden_act", "silu"))
        if hidden_act not in _SUPPORTED_ACTS:
            raise ValueError(f"hidden_act {hidden_act!r} is not supported; supported: {_SUPPORTED_ACTS}")
        # InternLM v1 says `bias: true` for q/k/v/o; LLaMA's `attention_bias` covers the same four.
        attn_bias = bool(hf.get("attention_bias", hf.get("bias", False)))
        return ModelArch(
            **arch_kwargs, head_dim=head_dim,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope=rope_config_from_hf(hf, head_dim),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=attn_bias, o_bias=attn_bias, mlp_bias=bool(hf.get("mlp_bias", False)),
            hidden_act=hidden_act,
            sliding_window=hf.get("sliding_window") if hf.get("use_sliding_window", True) else None,
            bos_token_id=hf.get("bos_token_id"), eos_token_ids=eos_ids(hf.get("eos_token_id")))

    @classmethod
    def map_weight_name(cls, name: str) -> Optional[WeightName]:
        return map_with_tables(name, _LAYER_NAME, _LAYER_KEYS, _GLOBAL_KEYS)


register_model(
    ["llama", "mistral", "yi", "vicuna", "aquila", "aquila2", "xverse", "internlm", "smollm", "smollm2"],
    LlamaModel,
    architectures=["LlamaForCausalLM", "MistralForCausalLM", "YiForCausalLM", "AquilaForCausalLM",
                   "AquilaModel", "XverseForCausalLM", "InternLMForCausalLM"],
)
