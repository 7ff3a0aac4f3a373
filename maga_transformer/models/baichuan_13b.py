"""Baichuan-13B and Baichuan2-13B: Baichuan's LLaMA math and original names (W_pack, NormHead for
Baichuan2), with ALiBi position biases instead of rotary.

Their config.json says model_type "baichuan" and BaichuanForCausalLM like the 7B models, which
models/baichuan.py owns; these classes are reached through
the model_types "baichuan_13b" and "baichuan2_13b", and from a checkpoint's own model_type
"baichuan" when it has 40 layers (BaichuanModel.specialize).
"""
from __future__ import annotations

import dataclasses

import torch

from maga_transformer import ops
from maga_transformer.models.arch import ForwardBatch, ModelArch
from maga_transformer.models.baichuan import BaichuanModel
from maga_transformer.models.decoder import LayerWeights
from maga_transformer.models.llama import LlamaModel
from maga_transformer.models.registry import register_model


class Baichuan13BModel(BaichuanModel):
    def __init__(self, arch: ModelArch, dtype: torch.dtype, device: torch.device, tp=None) -> None:
        super().__init__(arch, dtype, device, tp)
        # Baichuan's _get_interleave is the ALiBi paper's schedule, added to the scaled scores
        self.alibi = self.tp.query_heads(ops.alibi_slopes(arch.num_heads), arch, dim=0).to(device)

    @classmethod
    def specialize(cls, hf: dict) -> type:
        return cls  # already the ALiBi class (BaichuanModel.specialize sends 40-layer configs here)

    @classmethod
    def arch_from_hf_config(cls, hf: dict) -> ModelArch:
        # the 13B configs name the context model_max_length only
        hf = {**hf, "max_position_embeddings": hf.get("max_position_embeddings", hf.get("model_max_length", 4096))}
        return dataclasses.replace(LlamaModel.arch_from_hf_config(hf), position_encoding="alibi")

    def _attention(self, layer: LayerWeights, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   batch: ForwardBatch, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """DecoderModel's attention without the rotary (cos/sin are unused), with the ALiBi slopes."""
        arch = self.arch
        qkv = ops.linear(x, layer.qkv, layer.qkv_bias, batch.lora)
        tokens = qkv.shape[0]
        q_width, k_width = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
        q = qkv[:, :q_width].view(tokens, arch.num_heads, arch.head_dim)
        k = qkv[:, q_width:q_width + k_width].view(tokens, arch.num_kv_heads, arch.head_dim)
        v = qkv[:, q_width + k_width:].view(tokens, arch.num_kv_heads, arch.head_dim)
        ops.write_kv_cache(k, v, k_cache, v_cache, batch.slot_mapping)
        out = ops.paged_attention(q, k_cache, v_cache, batch.attn, self.scale, self.alibi)
        return self.tp.row_linear(out.reshape(tokens, -1), layer.o, layer.o_bias, batch.lora)


class Baichuan2_13BModel(Baichuan13BModel):
    force_norm_head = True  # NormHead: lm_head rows L2-normalized


register_model(["baichuan_13b"], Baichuan13BModel)
register_model(["baichuan2_13b"], Baichuan2_13BModel)
