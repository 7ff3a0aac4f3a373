"""ChatGLM2 / ChatGLM3 (and GLM-4's chatglm-code checkpoints) under their original names.

LLaMA-shaped math: RMSNorm, biased fused q/k/v (query_key_value = [q; k; v]) with multi-query
groups, SiLU-gated MLP (dense_h_to_4h = [gate; up]), no other biases. Rotary differs: it covers only
the first half of each head (kv_channels // 2 channels) and rotates interleaved pairs (2i, 2i+1)
GPT-J style, with base 10000 * rope_ratio. Attention scores only see q and k through their dot
product, so permuting the same channels of both changes nothing; at load the rotated channels of
every q and k head are reordered evens-then-odds, which turns interleaved pairs into the
rotate-halves layout our rotary op implements.

ChatGLM-6B v1 (2D positions, LayerNorm, GeLU) shares model_type "chatglm"; its config.json (with
position_encoding_2d, without ffn_hidden_size) is sent to models/glm.py.
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Tuple

import torch

from maga_transformer.models.arch import ModelArch, RopeConfig
from maga_transformer.models.decoder import DecoderModel, LayerWeights, WeightName, eos_ids, map_with_tables
from maga_transformer.models.glm import GlmV1Model
from maga_transformer.models.registry import register_model

_LAYER_NAME = re.compile(r"^transformer\.encoder\.layers\.(\d+)\.(.+)$")
_LAYER_KEYS = {
    "input_layernorm.weight": "input_norm", "post_attention_layernorm.weight": "post_norm",
    "self_attention.query_key_value.weight": "qkv", "self_attention.query_key_value.bias": "qkv_bias",
    "self_attention.dense.weight": "o",
    "mlp.dense_h_to_4h.weight": "gate_up", "mlp.dense_4h_to_h.weight": "down",
}
_GLOBAL_KEYS = {
    "transformer.embedding.word_embeddings.weight": "embed",
    "transformer.encoder.final_layernorm.weight": "final_norm",
    "transformer.output_layer.weight": "lm_head",
}
# config flags every supported checkpoint has at these values: other values change the math
_REQUIRED_FLAGS = {"rmsnorm": True, "post_layer_norm": True, "add_bias_linear": False,
                   "apply_residual_connection_post_layernorm": False}



def is_glm_v1(hf: dict) -> bool:
    """ChatGLM-6B's config.json: 2D positions and inner_hidden_size where ChatGLM2 says ffn_hidden_size."""
    return "position_encoding_2d" in hf or ("inner_hidden_size" in hf and "ffn_hidden_size" not in hf)


def _check_supported(hf: dict) -> None:
    for key, value in _REQUIRED_FLAGS.items():
        if bool(hf.get(key, value)) != value:
            raise ValueError(f"ChatGLM checkpoints with {key}={hf[key]!r} are not supported yet")


def interleaved_to_halves(heads: torch.Tensor, head_dim: int, rotary_dim: int) -> torch.Tensor:
    """Rows of a q or k projection (weight or bias), per head: the rotated channels evens first, then odds."""
    order = torch.cat([torch.arange(0, rotary_dim, 2), torch.arange(1, rotary_dim, 2),
                       torch.arange(rotary_dim, head_dim)])
    shaped = heads.reshape(-1, head_dim, *heads.shape[1:])
    return shaped[:, order].reshape(heads.shape)


class ChatGLMModel(DecoderModel):
    @classmethod
    def specialize(cls, hf: dict) -> type:
        return GlmV1Model if is_glm_v1(hf) else cls

    @classmethod
    def arch_from_hf_config(cls, hf: dict) -> ModelArch:
        _check_supported(hf)
        try:
            hidden, num_heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
            sizes = dict(vocab_size=int(hf.get("padded_vocab_size") or hf["vocab_size"]), hidden_size=hidden,
                         num_layers=int(hf["num_layers"]), num_heads=num_heads,
                         intermediate_size=int(hf["ffn_hidden_size"]))
        except KeyError as err:
            raise ValueError(f"config.json is missing {err.args[0]!r}") from None
        head_dim = int(hf.get("kv_channels") or hidden // num_heads)
        num_kv_heads = int(hf["multi_query_group_num"]) if hf.get("multi_query_attention") else num_heads
        rope = RopeConfig(theta=10000.0 * float(hf.get("rope_ratio", 1.0)), rotary_dim=head_dim // 2)
        return ModelArch(
            **sizes, num_kv_heads=num_kv_heads, head_dim=head_dim,
            max_position_embeddings=int(hf.get("seq_length", 2048)),
            norm_eps=float(hf.get("layernorm_epsilon", 1e-5)), rope=rope,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=bool(hf.get("add_qkv_bias", False)), hidden_act="silu",
            bos_token_id=hf.get("bos_token_id"), eos_token_ids=eos_ids(hf.get("eos_token_id")))

    @classmethod
    def map_weight_name(cls, name: str) -> Optional[WeightName]:
        return map_with_tables(name, _LAYER_NAME, _LAYER_KEYS, _GLOBAL_KEYS)

    def _assemble_layer(self, index: int, w: Dict[str, torch.Tensor]) -> LayerWeights:
        w = dict(w)
        for key in ("qkv", "qkv_bias"):
            if key in w:
                w[key] = self._qk_rows_to_halves(w[key])
        return super()._assemble_layer(index, w)

    def ptuning_kv(self, past: torch.Tensor) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """ChatGLM2's prefix encoder output viewed as [pre_seq_len, layers * 2, kv groups, kv_channels]:
        layer l's keys at 2l, values at 2l + 1. The keys take the same channel order as the loaded
        q/k weights (rotated channels evens first), since scores only see q . k; they are not rotated
        (ChatGLM2 concatenates them as past keys, after rotary)."""
        full = self.full_arch
        width = full.num_layers * 2 * full.num_kv_heads * full.head_dim
        if past.dim() != 2 or past.shape[1] != width:
            raise ValueError(f"P-tuning: the prefix encoder gives {tuple(past.shape)}, this model needs "
                             f"[pre_seq_len, {width}] (layers x 2 x kv groups x kv_channels)")
        kv = past.view(past.shape[0], full.num_layers * 2, full.num_kv_heads, full.head_dim)
        first, count = self.tp.kv_head_span(full.num_heads, full.num_kv_heads)
        rotary_dim = full.rope.rotary_dim
        order = torch.cat([torch.arange(0, rotary_dim, 2), torch.arange(1, rotary_dim, 2),
                           torch.arange(rotary_dim, full.head_dim)])
        return [(kv[:, 2 * layer, first:first + count][..., order], kv[:, 2 * layer + 1, first:first + count])
                for layer in range(full.num_layers)]

    def lora_b_rows(self, canonical: str, lora_b: torch.Tensor) -> torch.Tensor:
        """An adapter of query_key_value outputs its rows in the checkpoint's order: permute them too."""
        return self._qk_rows_to_halves(lora_b) if canonical == "qkv" else lora_b

    def _qk_rows_to_halves(self, qkv: torch.Tensor) -> torch.Tensor:
        arch = self.full_arch  # the checkpoint's whole projection, before this rank takes its heads
        q_rows, k_rows = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
        q, k, v = qkv.split([q_rows, k_rows, qkv.shape[0] - q_rows - k_rows])
        rotary_dim = arch.rope.rotary_dim
        return torch.cat([interleaved_to_halves(q, arch.head_dim, rotary_dim),
                          interleaved_to_halves(k, arch.head_dim, rotary_dim), v])


register_model(["chatglm", "chat_glm", "chatglm2", "chat_glm_2", "chatglm3", "chat_glm_3"], ChatGLMModel,
               architectures=["ChatGLMModel", "ChatGLMForConditionalGeneration"])
