"""Unmerged LoRA: the low-rank term x @ A.T @ B.T of each row's own adapter, added to a projection.

Every projection that some loaded adapter targets carries, per adapter slot, one `LoraPair`:
A [rank, in] and B [out, rank] with the adapter's scale already folded into B, in the model's dtype.
Fused projections (q/k/v, gate/up) hold one pair per adapter whose A stacks the parts' A rows and
whose B is block-diagonal over the parts' output rows, so one pair of GEMMs covers the fused matrix.

Which adapter each token row uses comes from the step (`LoraRows`: one slot per row, -1 for the
base model). The reference groups rows by adapter: one gather, two thin GEMMs and one scatter-add
per adapter present in the step, whatever the number of requests. Rows of one request are contiguous
in the flat batch, so most groups are a single slice and need no gather at all. A CUDA kernel
(segmented / gathered low-rank GEMMs over the same `LoraRows`) can replace `add_lora_reference`
behind `add_lora` without touching the models.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

RowIndex = Union[slice, torch.Tensor]


@dataclass
class LoraPair:
    """One adapter's low-rank factors for one projection: delta(x) = (x @ a.T) @ b.T."""

    a: torch.Tensor  # [rank, in]
    b: torch.Tensor  # [out, rank], scale folded in


@dataclass
class LoraRows:
    """The adapter slot of every token row of a step, grouped once per step for every projection."""

    slots: torch.Tensor  # [tokens] long on the model's device, -1 = no adapter
    groups: List[Tuple[int, RowIndex]]  # (slot, rows of that slot): a slice when contiguous

    @staticmethod
    def from_slots(slots: Sequence[int], device: torch.device) -> Optional["LoraRows"]:
        """None when no row uses an adapter (the step runs as the base model, at its speed)."""
        if all(s < 0 for s in slots):
            return None
        positions: Dict[int, List[int]] = {}
        for row, slot in enumerate(slots):
            if slot >= 0:
                positions.setdefault(slot, []).append(row)
        groups = [(slot, _as_index(rows, device)) for slot, rows in positions.items()]
        return LoraRows(torch.tensor(list(slots), dtype=torch.long, device=device), groups)

    def subset(self, rows: torch.Tensor) -> Optional["LoraRows"]:
        """The rows `rows` of this step, renumbered (an MoE expert sees only its routed tokens)."""
        slots = self.slots[rows]
        groups = []
        for slot in torch.unique(slots).tolist():
            if slot >= 0:
                groups.append((slot, torch.nonzero(slots == slot).squeeze(1)))
        return LoraRows(slots, groups) if groups else None


def _as_index(rows: List[int], device: torch.device) -> RowIndex:
    if rows[-1] - rows[0] + 1 == len(rows):
        return slice(rows[0], rows[-1] + 1)
    return torch.tensor(rows, dtype=torch.long, device=device)


def add_lora_reference(out: torch.Tensor, x: torch.Tensor, adapters: Dict[int, LoraPair], rows: LoraRows) -> torch.Tensor:
    """out[r] += B_s (A_s x[r]) for every row r whose slot s has factors here; in place, returns out."""
    for slot, index in rows.groups:
        pair = adapters.get(slot)
        if pair is None:  # this adapter does not target this projection
            continue
        delta = (x[index] @ pair.a.T) @ pair.b.T
        if isinstance(index, slice):
            out[index] += delta
        else:
            out.index_add_(0, index, delta)
    return out


def add_lora(out: torch.Tensor, x: torch.Tensor, adapters: Dict[int, LoraPair], rows: Optional[LoraRows]) -> torch.Tensor:
    """The dispatch point for the low-rank term (a CUDA kernel would take CUDA tensors here)."""
    if rows is None or not adapters:
        return out
    return add_lora_reference(out, x, adapters, rows)
