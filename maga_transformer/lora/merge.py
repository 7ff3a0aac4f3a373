"""LORA_MERGE=1: one adapter added into the checkpoint's weights while they load, W + scale * B @ A.

The merged model is the adapter's model for every request (no base model, no hot update) and runs
at exactly the base model's speed; it is an option, not the default (docs/LoRA-Tutorial.md). The
merge happens on the checkpoint's own tensors, before the family fuses or quantizes them, so it
needs no knowledge of the fused layouts.
"""
from __future__ import annotations

import logging
from typing import Iterable, Iterator, Tuple

import torch

from maga_transformer.lora.peft_reader import PeftAdapter, refuse

logger = logging.getLogger(__name__)


def merged_tensors(tensors: Iterable[Tuple[str, torch.Tensor]], adapter: PeftAdapter) -> Iterator[Tuple[str, torch.Tensor]]:
    """The checkpoint's tensors with the adapter's deltas added to the weights it targets; raises
    (naming the adapter) for a module the checkpoint lacks or whose shape differs."""
    if adapter.expert_factors:
        raise refuse(adapter.name, "LORA_MERGE=1 cannot merge target_parameters (fused MoE expert tensors); "
                                   "serve it unmerged")
    wanted = {module + ".weight": module for module in adapter.factors}
    seen = set()
    for name, tensor in tensors:
        module = wanted.get(name)
        if module is not None:
            tensor = _merge_one(adapter, module, tensor)
            seen.add(name)
        yield name, tensor
    missing = sorted(set(wanted) - seen)
    if missing:
        raise refuse(adapter.name, f"target module {wanted[missing[0]]} is not in the base checkpoint "
                                   f"({len(missing)} module(s) missing)")
    logger.info("LoRA adapter %r merged into %d weights", adapter.name, len(seen))


def _merge_one(adapter: PeftAdapter, module: str, weight: torch.Tensor) -> torch.Tensor:
    a, b = adapter.factors[module]
    if tuple(weight.shape) != (b.shape[0], a.shape[1]):
        raise refuse(adapter.name, f"module {module}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not "
                                   f"fit the base weight {tuple(weight.shape)}")
    delta = (b.double() @ a.double()) * adapter.scales[module]
    return (weight.double() + delta).to(weight.dtype)
