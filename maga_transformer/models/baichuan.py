"""Baichuan-7B and Baichuan2-7B: LLaMA math under Baichuan's original checkpoint names.

The only renamed weight is self_attn.W_pack, q, k and v stacked in one matrix, which is the decoder's
fused qkv as it stands. Baichuan2's NormHead L2-normalizes each lm_head row before use; that is done
once at load. Baichuan2 checkpoints say model_type "baichuan" like Baichuan-7B, so (like vLLM) the
125696-token vocabulary marks them; model_type "baichuan2" forces the normalization.

The 13B models (40 layers) use ALiBi instead of rotary: models/baichuan_13b.py, by explicit model_type.
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from maga_transformer.models.arch import ModelArch
from maga_transformer.models.decoder import WeightName
from maga_transformer.models.llama import LlamaModel
from maga_transformer.models.registry import model_class, register_model

_W_PACK = re.compile(r"^(?:model\.)?layers\.(\d+)\.self_attn\.W_pack\.weight$")
BAICHUAN2_VOCAB_SIZE = 125696
ALIBI_NUM_LAYERS = 40  # Baichuan-13B and Baichuan2-13B; the 7B models have 32 rotary layers


def baichuan_uses_alibi(hf: dict) -> bool:
    return int(hf.get("num_hidden_layers", 0)) == ALIBI_NUM_LAYERS


class BaichuanModel(LlamaModel):
    force_norm_head = False  # Baichuan2Model sets it; otherwise the vocabulary size decides

    @classmethod
    def specialize(cls, hf: dict) -> type:
        """A 40-layer config (model_type "baichuan" in the checkpoint) is Baichuan-13B or
        Baichuan2-13B: ALiBi instead of rotary, models/baichuan_13b.py."""
        if not baichuan_uses_alibi(hf):
            return cls
        baichuan2 = cls.force_norm_head or int(hf.get("vocab_size", 0)) == BAICHUAN2_VOCAB_SIZE
        return model_class("baichuan2_13b" if baichuan2 else "baichuan_13b")

    @classmethod
    def arch_from_hf_config(cls, hf: dict) -> ModelArch:
        if baichuan_uses_alibi(hf):
            raise ValueError("Baichuan 13B checkpoints (40 layers) use ALiBi position biases, not rotary: load them "
                             "with model_type baichuan_13b (Baichuan-13B) or baichuan2_13b (Baichuan2-13B)")
        # Baichuan-13B style configs name the context model_max_length only
        hf = {**hf, "max_position_embeddings": hf.get("max_position_embeddings", hf.get("model_max_length", 4096))}
        return super().arch_from_hf_config(hf)

    @classmethod
    def map_weight_name(cls, name: str) -> Optional[WeightName]:
        match = _W_PACK.match(name)
        if match:
            return int(match.group(1)), "qkv"
        return super().map_weight_name(name)

    def normalizes_lm_head(self) -> bool:
        return self.force_norm_head or self.arch.vocab_size == BAICHUAN2_VOCAB_SIZE

    def _assemble(self, globals_: Dict[str, torch.Tensor], per_layer: List[Dict[str, torch.Tensor]]) -> None:
        if self.normalizes_lm_head() and "lm_head" in globals_:
            head = globals_["lm_head"]
            globals_ = {**globals_, "lm_head": F.normalize(head.float(), dim=-1).to(head.dtype)}
        super()._assemble(globals_, per_layer)


class Baichuan2Model(BaichuanModel):
    force_norm_head = True


register_model(["baichuan", "baichuan_7b"], BaichuanModel,
               architectures=["BaichuanForCausalLM", "BaiChuanForCausalLM"])
register_model(["baichuan2", "baichuan2_7b"], Baichuan2Model)
