"""Mixtral: Mistral's attention with a sparse mixture-of-experts MLP (models/moe.py).

Checkpoint names: model.layers.N.block_sparse_moe.gate.weight (the router) and
block_sparse_moe.experts.E.{w1,w3,w2}.weight = gate, up and down of expert E.
"""
from __future__ import annotations

import re
from dataclasses import replace
from typing import Optional

from maga_transformer.models.arch import ModelArch
from maga_transformer.models.decoder import WeightName
from maga_transformer.models.llama import LlamaModel
from maga_transformer.models.moe import SparseMoeMixin
from maga_transformer.models.registry import register_model

_MOE_NAME = re.compile(r"^(?:model\.)?layers\.(\d+)\.block_sparse_moe\.(.+)\.weight$")
_EXPERT_NAME = re.compile(r"^experts\.(\d+)\.(w[123])$")
_EXPERT_ROLE = {"w1": "gate", "w3": "up", "w2": "down"}


class MixtralModel(SparseMoeMixin, LlamaModel):
    @classmethod
    def arch_from_hf_config(cls, hf: dict) -> ModelArch:
        arch = super().arch_from_hf_config(hf)
        try:
            num_experts, top_k = int(hf["num_local_experts"]), int(hf["num_experts_per_tok"])
        except KeyError as err:
            raise ValueError(f"config.json is missing {err.args[0]!r}") from None
        if arch.hidden_act != "silu":
            raise ValueError(f"Mixtral experts with hidden_act {arch.hidden_act!r} are not supported; only silu")
        if not 0 < top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok ({top_k}) must be in [1, num_local_experts ({num_experts})]")
        return replace(arch, num_experts=num_experts, num_experts_per_token=top_k)

    @classmethod
    def map_weight_name(cls, name: str) -> Optional[WeightName]:
        match = _MOE_NAME.match(name)
        if not match:
            return super().map_weight_name(name)
        layer, rest = int(match.group(1)), match.group(2)
        if rest == "gate":
            return layer, "router"
        expert = _EXPERT_NAME.match(rest)
        if expert:
            return layer, f"expert.{expert.group(1)}.{_EXPERT_ROLE[expert.group(2)]}"
        return None


register_model(["mixtral"], MixtralModel, architectures=["MixtralForCausalLM"])
