"""A PEFT adapter laid onto a loaded model's projections, ready to attach (unmerged serving).

PEFT names modules as the base checkpoint names its weights (`model.layers.3.self_attn.q_proj`), so
the family's own `map_weight_name` says which canonical weight a module adapts, and the family's
`lora_target` says which (possibly fused) projection holds it and at which output rows. The modules
that share a fused projection (q, k and v; gate and up) become one `LoraPair`: their A matrices
stacked, their B matrices placed block-diagonally at their rows, the scale folded into B.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from maga_transformer import ops
from maga_transformer.lora.peft_reader import PeftAdapter, refuse
from maga_transformer.models.base import FamilyModel, LoraTarget

_Part = Tuple[LoraTarget, torch.Tensor, torch.Tensor]  # (target, A, scaled B)


@dataclass
class PreparedAdapter:
    """An adapter's factors per projection, on the model's device and in its dtype."""

    name: str
    path: str
    rank: int
    pairs: List[Tuple[ops.LinearWeight, ops.LoraPair]] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(p.a.numel() * p.a.element_size() + p.b.numel() * p.b.element_size() for _, p in self.pairs)

    def attach(self, slot: int) -> None:
        """Serve this adapter under `slot` (between steps, in the engine core's thread)."""
        for linear, pair in self.pairs:
            linear.lora[slot] = pair

    def detach(self, slot: int) -> None:
        for linear, _ in self.pairs:
            linear.lora.pop(slot, None)


def check_model_supports_lora(model, name: str) -> None:
    if type(model).lora_target is FamilyModel.lora_target:  # the family never said where adapters go
        raise refuse(name, f"the {type(model).__name__} family does not apply LoRA adapters")


def prepare_adapter(model, adapter: PeftAdapter) -> PreparedAdapter:
    """Map every module onto the model, check shapes, build the fused pairs. ValueError names the
    adapter and the module at fault (unknown module, wrong base shapes)."""
    check_model_supports_lora(model, adapter.name)
    parts: Dict[int, List[_Part]] = {}
    for module, (a, b) in sorted(adapter.factors.items()):
        canonical, target = _target_of(model, adapter.name, module)
        a, b = _local_share(model, adapter.name, module, canonical, a.float(), model.lora_b_rows(canonical, b.float()))
        if a.shape[1] != target.linear.in_features or b.shape[0] != target.rows:
            raise refuse(adapter.name, f"module {module}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do "
                                       f"not fit the base model's projection of {target.rows} x "
                                       f"{target.linear.in_features} (an adapter of another base model?)")
        parts.setdefault(id(target.linear), []).append((target, a, b * adapter.scales[module]))
    for module, pairs in sorted(adapter.expert_factors.items()):
        for target, a, b in _expert_parts(model, adapter, module, pairs):
            parts.setdefault(id(target.linear), []).append((target, a, b))
    prepared = PreparedAdapter(adapter.name, adapter.path, adapter.max_rank)
    for group in parts.values():
        linear = group[0][0].linear
        prepared.pairs.append((linear, _fused_pair(group, model.dtype, model.device)))
    return prepared


def _expert_parts(model, adapter: PeftAdapter, module: str,
                  pairs: List[Tuple[torch.Tensor, torch.Tensor]]) -> List[_Part]:
    """PEFT's LoRA on a module's 3-D expert tensors (target_parameters): A [rank * E, in] holds the
    experts' A matrices expert-major, B [out, rank * E] their B matrices expert-minor, so expert e
    adds B[:, :, e] @ A[e] (after reshaping) to its weight. Which tensor a pair adapts (the fused
    gate/up or down) follows from its shapes, which differ between the two."""
    found = model.lora_fused_experts(module)
    if found is None:
        raise refuse(adapter.name, f"target_parameters module {module} is not an MoE expert block of "
                                   f"{type(model).__name__}")
    layer, num_experts = found
    parts: List[_Part] = []
    for a, b in pairs:
        role = _expert_role(model, layer, a, b)
        if role is None or a.shape[0] % num_experts:
            raise refuse(adapter.name, f"module {module}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} fit "
                                       f"neither the experts' gate/up nor their down projection")
        rank = a.shape[0] // num_experts
        a_experts = a.float().reshape(num_experts, rank, a.shape[1])
        b_experts = b.float().reshape(b.shape[0], rank, num_experts)
        for expert in range(num_experts):
            canonical = f"expert.{expert}.{role}"
            a_e, b_e = _local_share(model, adapter.name, module, canonical, a_experts[expert], b_experts[:, :, expert])
            parts.append((model.lora_target(layer, canonical), a_e, b_e * adapter.parameter_scale))
    return parts


def _expert_role(model, layer: int, a: torch.Tensor, b: torch.Tensor) -> Optional[str]:
    """gate_up [2I, H] or down [H, I] by the whole (unsplit) shapes: under tensor parallelism each
    rank holds 1 / TP_SIZE of gate_up's rows and of down's columns."""
    ranks = model.tp.size
    for role, in_scale, row_scale in (("gate_up", 1, ranks), ("down", ranks, 1)):
        target = model.lora_target(layer, f"expert.0.{role}")
        if (target is not None and a.shape[1] == target.linear.in_features * in_scale
                and b.shape[0] == target.rows * row_scale):
            return role
    return None


def _local_share(model, name: str, module: str, canonical: str, a: torch.Tensor,
                 b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """This rank's (A, B), cut as its base weight is; shapes that cannot be cut are the adapter's fault."""
    if model.tp.size == 1:
        return a, b
    try:
        return model.lora_shard(canonical, a, b)
    except (ValueError, RuntimeError) as err:
        raise refuse(name, f"module {module}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit the "
                           f"base model's projection ({err})") from None


def _target_of(model, name: str, module: str) -> Tuple[str, LoraTarget]:
    """(canonical weight name, target) of a PEFT module path."""
    mapped = model.map_weight_name(module + ".weight")
    if mapped is None or mapped[0] is None:
        raise refuse(name, f"target module {module} is not a projection of a layer of this model (LoRA applies "
                           "to the layers' attention and MLP projections)")
    target = model.lora_target(*mapped)
    if target is None:
        raise refuse(name, f"target module {module} ({mapped[1]} of layer {mapped[0]}) is not a projection "
                           f"{type(model).__name__} applies LoRA to")
    return mapped[1], target


def _fused_pair(group: List[_Part], dtype: torch.dtype, device: torch.device) -> ops.LoraPair:
    """The modules sharing one projection as one pair: stacked A, block-diagonal B."""
    linear = group[0][0].linear
    total_rank = sum(a.shape[0] for _, a, _ in group)
    a_all = torch.cat([a.float() for _, a, _ in group])
    b_all = torch.zeros(linear.out_features, total_rank)
    column = 0
    for target, a, b in group:
        rank = a.shape[0]
        b_all[target.row_offset:target.row_offset + target.rows, column:column + rank] = b
        column += rank
    return ops.LoraPair(a_all.to(device=device, dtype=dtype).contiguous(),
                        b_all.to(device=device, dtype=dtype).contiguous())
