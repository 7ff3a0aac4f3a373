"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B) and Qwen3-MoE: Qwen attention with sparse MoE MLPs.

Checkpoint names under model.layers.N.mlp: gate (the router), experts.E.{gate,up,down}_proj, and for
Qwen2-MoE shared_expert.{gate,up,down}_proj plus shared_expert_gate. Layers listed in mlp_only_layers
(or skipped by decoder_sparse_step) hold a dense gate_proj/up_proj/down_proj MLP instead; the
checkpoint says which by having a router or not. Unlike Mixtral, the top-k router probabilities are
renormalized only when norm_topk_prob is set.
"""
from __future__ import annotations

import re
from dataclasses import replace
from typing import Optional

from maga_transformer.models.arch import ModelArch
from maga_transformer.models.decoder import WeightName
from maga_transformer.models.moe import SparseMoeMixin
from maga_transformer.models.qwen import Qwen2Model, Qwen3Model
from maga_transformer.models.registry import register_model

_MOE_NAME = re.compile(r"^(?:model\.)?layers\.(\d+)\.mlp\.(gate|shared_expert_gate|experts\.\d+\.\w+_proj|"
                       r"shared_expert\.\w+_proj)\.weight$")
_EXPERT_NAME = re.compile(r"^(experts\.(\d+)|shared_expert)\.(gate|up|down)_proj$")
_ROUTER_NAMES = {"gate": "router", "shared_expert_gate": "shared_gate"}


def map_moe_weight_name(name: str) -> Optional[WeightName]:
    """Canonical name of a router / expert tensor, or None for anything else."""
    match = _MOE_NAME.match(name)
    if not match:
        return None
    layer, rest = int(match.group(1)), match.group(2)
    if rest in _ROUTER_NAMES:
        return layer, _ROUTER_NAMES[rest]
    expert = _EXPERT_NAME.match(rest)
    owner = f"expert.{expert.group(2)}" if expert.group(2) is not None else "shared"
    return layer, f"{owner}.{expert.group(3)}"


def moe_arch(arch: ModelArch, hf: dict) -> ModelArch:
    # hub configs say num_experts; transformers 5 saves Qwen3-MoE's as num_local_experts
    num_experts = int(hf.get("num_experts") or hf.get("num_local_experts") or 0)
    if not num_experts or "num_experts_per_tok" not in hf:
        raise ValueError("config.json needs num_experts (or num_local_experts) and num_experts_per_tok")
    top_k = int(hf["num_experts_per_tok"])
    if arch.hidden_act != "silu":
        raise ValueError(f"MoE experts with hidden_act {arch.hidden_act!r} are not supported; only silu")
    if not 0 < top_k <= num_experts:
        raise ValueError(f"num_experts_per_tok ({top_k}) must be in [1, num_experts ({num_experts})]")
    return replace(arch, num_experts=num_experts, num_experts_per_token=top_k,
                   normalize_expert_weights=bool(hf.get("norm_topk_prob", False)))


class Qwen2MoeModel(SparseMoeMixin, Qwen2Model):
    @classmethod
    def arch_from_hf_config(cls, hf: dict) -> ModelArch:
        arch = moe_arch(super().arch_from_hf_config(hf), hf)
        return replace(arch, qkv_bias=bool(hf.get("qkv_bias", True)))

    @classmethod
    def map_weight_name(cls, name: str) -> Optional[WeightName]:
        return map_moe_weight_name(name) or super().map_weight_name(name)


class Qwen3MoeModel(SparseMoeMixin, Qwen3Model):
    @classmethod
    def arch_from_hf_config(cls, hf: dict) -> ModelArch:
        return moe_arch(super().arch_from_hf_config(hf), hf)

    @classmethod
    def map_weight_name(cls, name: str) -> Optional[WeightName]:
        return map_moe_weight_name(name) or super().map_weight_name(name)


register_model(["qwen2_moe", "qwen_2_moe"], Qwen2MoeModel, architectures=["Qwen2MoeForCausalLM"])
register_model(["qwen3_moe"], Qwen3MoeModel, architectures=["Qwen3MoeForCausalLM"])
