"""Sparse mixture-of-experts MLP (Mixtral-style): a linear router, softmax, top-k experts per token,
each expert a gated SiLU MLP; the token's output is the routing-weighted sum of its experts' outputs.

Routing follows transformers: softmax in fp32 over all experts, top-k, optionally renormalized so the
k weights sum to 1. Experts run grouped: each expert sees the tokens routed to it in one GEMM. Those
groups have data-dependent sizes, which a CUDA graph cannot capture, so while a graph is being
captured every expert runs on every token and unrouted tokens get weight 0 (same result).

Qwen2-MoE adds a shared expert every token passes through, scaled by sigmoid(shared_expert_gate(x)).
`SparseMoeMixin` gives a decoder family the MoE MLP on every layer whose checkpoint has a router
(canonical names "router", "expert.E.gate/up/down", optionally "shared.gate/up/down" and
"shared_gate"); layers without one keep the dense MLP (Qwen2-MoE's mlp_only_layers).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from maga_transformer import ops
from maga_transformer.models.base import LoraTarget
from maga_transformer.models.decoder import gated_mlp_lora_targets, require_weight


@dataclass
class MoeWeights:
    router: ops.LinearWeight  # [experts, hidden]
    gate_up: List[ops.LinearWeight]  # per expert [2 * intermediate, hidden]: gate rows, then up rows
    down: List[ops.LinearWeight]  # per expert [hidden, intermediate]
    top_k: int
    normalize: bool
    shared_gate_up: Optional[ops.LinearWeight] = None  # the shared expert (Qwen2-MoE)
    shared_down: Optional[ops.LinearWeight] = None
    shared_gate: Optional[ops.LinearWeight] = None  # [1, hidden]: the shared expert's sigmoid gate


def route(x: torch.Tensor, moe: MoeWeights) -> Tuple[torch.Tensor, torch.Tensor]:
    """fp32 weights [tokens, k] and expert ids [tokens, k] of each token's top-k experts."""
    probs = torch.softmax(ops.linear(x, moe.router).float(), dim=-1)
    weights, experts = torch.topk(probs, moe.top_k, dim=-1)
    if moe.normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


def _gated_mlp(x: torch.Tensor, gate_up: ops.LinearWeight, down: ops.LinearWeight,
               lora: Optional[ops.LoraRows] = None) -> torch.Tensor:
    return ops.linear(ops.silu_and_mul(ops.linear(x, gate_up, None, lora)), down, None, lora)


def _expert(x: torch.Tensor, moe: MoeWeights, index: int, lora: Optional[ops.LoraRows] = None) -> torch.Tensor:
    return _gated_mlp(x, moe.gate_up[index], moe.down[index], lora)


def moe_mlp(x: torch.Tensor, moe: MoeWeights, lora: Optional[ops.LoraRows] = None) -> torch.Tensor:
    """x: [tokens, hidden] -> [tokens, hidden]. lora: the step's adapter rows (experts and the shared
    expert may carry LoRA factors; the router never does)."""
    weights, experts = route(x, moe)
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        out = moe_mlp_dense(x, moe, weights, experts)
    else:
        out = _moe_grouped(x, moe, weights, experts, lora)
    if moe.shared_gate_up is not None:
        shared_weight = torch.sigmoid(ops.linear(x, moe.shared_gate).float())
        shared = _gated_mlp(x, moe.shared_gate_up, moe.shared_down, lora)
        out = out + (shared.float() * shared_weight).to(x.dtype)
    return out


def _moe_grouped(x: torch.Tensor, moe: MoeWeights, weights: torch.Tensor, experts: torch.Tensor,
                 lora: Optional[ops.LoraRows] = None) -> torch.Tensor:
    """Each routed expert runs once, on exactly the tokens routed to it."""
    out = torch.zeros_like(x)
    for index in torch.unique(experts).tolist():
        token_ids, slot = torch.where(experts == index)
        has_lora = lora is not None and (moe.gate_up[index].lora or moe.down[index].lora)
        rows = lora.subset(token_ids) if has_lora else None
        contribution = _expert(x[token_ids], moe, index, rows).float() * weights[token_ids, slot, None]
        out.index_add_(0, token_ids, contribution.to(x.dtype))
    return out


def moe_mlp_dense(x: torch.Tensor, moe: MoeWeights, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, weighted by its routing weight (0 where not routed): fixed shapes.
    The routed experts only; moe_mlp adds the shared expert."""
    out = torch.zeros_like(x)
    for index in range(len(moe.gate_up)):
        weight = (weights * (experts == index)).sum(dim=-1, keepdim=True)
        out += (_expert(x, moe, index).float() * weight).to(x.dtype)
    return out


_FUSED_EXPERTS = re.compile(r"^(?:model\.)?layers\.(\d+)\.mlp\.experts$")


class SparseMoeMixin:
    """Put before a DecoderModel subclass in the bases: MoE on the layers whose checkpoint has a router."""

    def _assemble_mlp(self, layer, w: Dict[str, torch.Tensor], index: int) -> None:
        if "router" not in w:
            super()._assemble_mlp(layer, w, index)  # a dense layer
            return
        get = lambda key: require_weight(w, key, index)  # noqa: E731
        # tensor parallelism splits inside every expert (each rank a slice of each expert's width), so
        # routing is the same on every rank and one all-reduce sums the MoE output
        experts = [self._gated_mlp_weights(w, index, f"expert.{e}.") for e in range(self.arch.num_experts)]
        shared = self._gated_mlp_weights(w, index, "shared.") if "shared.gate" in w else (None, None)
        layer.mlp = MoeWeights(
            router=self._linear(get("router")),
            gate_up=[gate_up for gate_up, _ in experts], down=[down for _, down in experts],
            top_k=self.arch.num_experts_per_token, normalize=self.arch.normalize_expert_weights,
            shared_gate_up=shared[0], shared_down=shared[1],
            shared_gate=self._linear(get("shared_gate")) if shared[0] is not None else None)

    def lora_target(self, layer: int, canonical: str) -> Optional[LoraTarget]:
        """Also each expert's and the shared expert's gate / up / down (canonical "expert.E.gate", ...)."""
        target = super().lora_target(layer, canonical)
        if target is not None or not 0 <= layer < len(self.layers) or self.layers[layer].mlp is None:
            return target
        moe = self.layers[layer].mlp
        targets = gated_mlp_lora_targets("shared.", moe.shared_gate_up, moe.shared_down)
        for index, (gate_up, down) in enumerate(zip(moe.gate_up, moe.down)):
            targets.update(gated_mlp_lora_targets(f"expert.{index}.", gate_up, down))
        found = targets.get(canonical)
        return LoraTarget(*found) if found is not None else None

    def lora_fused_experts(self, module: str) -> Optional[Tuple[int, int]]:
        """transformers 5 keeps the routed experts of Mixtral and Qwen-MoE as one module holding
        3-D gate_up_proj [E, 2I, H] and down_proj [E, H, I] (our gate/up and down of each expert,
        in the same row order); PEFT names it model.layers.N.mlp.experts."""
        match = _FUSED_EXPERTS.match(module)
        if match is None:
            return None
        layer = int(match.group(1))
        if not 0 <= layer < len(self.layers) or self.layers[layer].mlp is None:
            return None
        return layer, len(self.layers[layer].mlp.gate_up)

    def _mlp(self, layer, x: torch.Tensor, lora: Optional[ops.LoraRows] = None) -> torch.Tensor:
        if layer.mlp is None:
            return super()._mlp(layer, x, lora)
        return self.tp.all_reduce(moe_mlp(x, layer.mlp, lora))
