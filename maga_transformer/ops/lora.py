"""Unmerged LoRA: the low-rank term x @ A.T @ B.T of each row's own adapter, added to a projection.

Every projection that some loaded adapter targets carries, per adapter slot, one `LoraPair`:
A [rank, in] and B [out, rank] with the adapter's scale already folded into B, in the model's dtype.
Fused projections (q/k/v, gate/up) hold one pair per adapter whose A stacks the parts' A rows and
whose B is block-diagonal over the parts' output rows, so one pair of GEMMs covers the fused matrix.

Which adapter each token row uses comes from the step (`LoraRows`: one slot per row, -1 for the
base model). Two torch paths compute the same sum:
- grouped (prefill-sized steps, or one adapter): rows grouped by adapter, one gather, two thin GEMMs
  and one scatter-add per adapter present in the step, whatever the number of requests. Rows of one
  request are contiguous in the flat batch, so a group is often a slice and needs no gather.
- stacked (decode-sized steps with several adapters): every loaded adapter's A stacked into one
  [sum of ranks, in] matrix and B into one [out, sum of ranks], so each row computes every adapter's
  rank columns, masked to its own adapter's, in two GEMMs whatever the number of adapters. The waste
  (the other adapters' columns) is small beside the base GEMM for a few rows, and it replaces 4 ops
  per adapter with 5 in all.
- kernel (CUDA, up to KERNEL_MAX_ROWS rows, and always inside CUDA graphs): one fused launch per
  projection (src/kernels/cuda/lora.cu) finds each row's adapter in the projection's device table
  (slot ids, A and B addresses, ranks; rewritten by attach / detach between steps, at a fixed
  address, so a captured graph serves whatever adapters are loaded when it replays) and adds
  B_s (A_s x) to the row. Graph steps carry `LoraRows.static`: the kernel runs for every projection
  a graph could need, adapters or not.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

RowIndex = Union[slice, torch.Tensor]


@dataclass
class LoraPair:
    """One adapter's low-rank factors for one projection: delta(x) = (x @ a.T) @ b.T."""

    a: torch.Tensor  # [rank, in]
    b: torch.Tensor  # [out, rank], scale folded in


STACKED_MAX_ROWS = 48  # measured: at 8 rows x 4 adapters 3.5x faster than grouped, even at 64 rows x 8
KERNEL_MAX_ROWS = 64  # eager CUDA steps of up to this many rows take the kernel; more: the GEMM paths
TABLE_CAPACITY = 64  # adapters one projection's device table holds (served + draining)
MAX_TABLE_RANK = 768  # src/kernels/cuda/lora.h kLoraMaxTableRank (fused q/k/v of rank-256 adapters)
_overflowed_tables = 0  # projections whose adapters outgrew their table: graphs must not run LoRA rows


def kernel_tables_usable() -> bool:
    """False once some projection holds more adapters than its device table: its LoRA rows then
    run eagerly through the torch paths (graph replays would miss the extra adapters)."""
    return _overflowed_tables == 0


@dataclass
class LoraStack:
    """Every adapter of one projection side by side (the stacked path); rebuilt after a change."""

    a: torch.Tensor  # [sum of ranks, in]
    b: torch.Tensor  # [out, sum of ranks]
    column_slots: torch.Tensor  # [sum of ranks] the adapter slot of each rank column


class LoraSet:
    """A projection's adapters: slot -> LoraPair, and their stacked form, built on first use after
    the set changed (the engine core attaches and detaches between steps, on the step's thread)."""

    def __init__(self) -> None:
        self.pairs: Dict[int, LoraPair] = {}
        self._stack: Optional[LoraStack] = None
        self.table: Optional[torch.Tensor] = None  # CUDA: [4, TABLE_CAPACITY] the kernel's view (made on use)
        self._overflowed = False

    def __bool__(self) -> bool:
        return bool(self.pairs)

    def __iter__(self):
        return iter(self.pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def __setitem__(self, slot: int, pair: LoraPair) -> None:
        if pair.a.is_cuda:  # the kernel reads the factors by address: contiguous, in place for good
            pair = LoraPair(pair.a.contiguous(), pair.b.contiguous())
        self.pairs[slot] = pair
        self._stack = None
        self._refresh_table()

    def pop(self, slot: int, default=None) -> Optional[LoraPair]:
        self._stack = None
        pair = self.pairs.pop(slot, default)
        self._refresh_table()
        return pair

    def device_table(self, device: torch.device) -> Optional[torch.Tensor]:
        """The kernel's table on `device` (allocated once: graphs keep its address), or None when
        the adapters do not fit it."""
        if self.table is None:
            self.table = torch.full((4, TABLE_CAPACITY), -1, dtype=torch.long, device=device)
            self._refresh_table()
        return None if self._overflowed else self.table

    def _refresh_table(self) -> None:
        """Rewrites the device table from `pairs` (between steps, on the current stream: a replay
        queued after it reads the new entries)."""
        global _overflowed_tables
        if self.table is None:
            return
        pairs = [(s, p) for s, p in self.pairs.items() if p.a.is_cuda]
        fits = len(pairs) <= TABLE_CAPACITY and all(p.a.shape[0] <= MAX_TABLE_RANK for _, p in pairs)
        if fits == self._overflowed:
            _overflowed_tables += 1 if not fits else -1
            self._overflowed = not fits
        host = torch.full((4, TABLE_CAPACITY), -1, dtype=torch.long)
        host[3] = 0
        for entry, (slot, pair) in enumerate(pairs[:TABLE_CAPACITY] if fits else []):
            host[:, entry] = torch.tensor([slot, pair.a.data_ptr(), pair.b.data_ptr(), pair.a.shape[0]])
        with torch.inference_mode():  # the table may have been made inside it (a graph's warm-up)
            self.table.copy_(host)

    def get(self, slot: int) -> Optional[LoraPair]:
        return self.pairs.get(slot)

    def values(self):
        return self.pairs.values()

    def stack(self) -> LoraStack:
        if self._stack is None:
            slots = list(self.pairs)
            pairs = [self.pairs[s] for s in slots]
            ranks = [p.a.shape[0] for p in pairs]
            columns = torch.repeat_interleave(torch.tensor(slots), torch.tensor(ranks))
            self._stack = LoraStack(torch.cat([p.a for p in pairs]).contiguous(),
                                    torch.cat([p.b for p in pairs], dim=1).contiguous(),
                                    columns.to(pairs[0].a.device))
        return self._stack


@dataclass
class LoraRows:
    """The adapter slot of every token row of a step, grouped once per step for every projection."""

    slots: torch.Tensor  # [tokens] long on the model's device, -1 = no adapter
    groups: List[Tuple[int, RowIndex]]  # (slot, rows of that slot): a slice when contiguous
    # the rows sorted by slot, adapter rows first (long, on the device): the CUDA kernel's CTAs take
    # the rows in this order, so one adapter's rows run side by side and share its factors in L2
    # (src/kernels/cuda/lora.h kLoraGroupRows says why a CTA takes one row); None: made on use
    order: Optional[torch.Tensor] = None
    # a CUDA-graph step: `slots` is the graph's input buffer, `groups` unknown at capture; every
    # projection runs the kernel (adapters attached later are found in its table)
    static: bool = False

    @staticmethod
    def for_graph(slots: torch.Tensor, order: torch.Tensor) -> "LoraRows":
        return LoraRows(slots, [], order=order, static=True)

    def row_order(self) -> torch.Tensor:
        if self.order is None:
            self.order = row_order_by_slot(self.slots)
        return self.order

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


def sorted_rows(slots: Sequence[int]) -> List[int]:
    """Row indices grouped by adapter slot (ascending), rows without one (-1) last."""
    return sorted(range(len(slots)), key=lambda row: (slots[row] < 0, slots[row]))


def row_order_by_slot(slots: torch.Tensor) -> torch.Tensor:
    """sorted_rows on the device: a stable sort, base rows (-1) moved past every adapter slot."""
    keys = torch.where(slots < 0, torch.full_like(slots, torch.iinfo(torch.long).max), slots)
    return torch.sort(keys, stable=True).indices


def _as_index(rows: List[int], device: torch.device) -> RowIndex:
    if rows[-1] - rows[0] + 1 == len(rows):
        return slice(rows[0], rows[-1] + 1)
    return torch.tensor(rows, dtype=torch.long, device=device)


def add_lora_stacked(out: torch.Tensor, x: torch.Tensor, adapters: LoraSet, rows: LoraRows) -> torch.Tensor:
    """The same sum as add_lora_reference, through every adapter's stacked factors at once."""
    stack = adapters.stack()
    low = x @ stack.a.T  # [rows, sum of ranks]: every adapter's A applied to every row
    low = low * (stack.column_slots[None, :] == rows.slots[:, None]).to(low.dtype)  # keep each row's own
    return out.add_(low @ stack.b.T)


def add_lora_reference(out: torch.Tensor, x: torch.Tensor, adapters, rows: LoraRows) -> torch.Tensor:
    """out[r] += B_s (A_s x[r]) for every row r whose slot s has factors here, rows grouped by
    adapter; in place, returns out. adapters: a LoraSet or a dict slot -> LoraPair."""
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


def _kernel_applies(out: torch.Tensor, x: torch.Tensor, adapters: LoraSet) -> bool:
    return (out.is_cuda and x.dim() == 2 and out.dim() == 2 and x.stride(1) == 1 and out.stride(1) == 1
            and x.dtype == out.dtype and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and all(p.a.dtype == x.dtype and p.a.device == x.device for p in adapters.values()))


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


GROUP_ROWS = 1  # src/kernels/cuda/lora.h kLoraGroupRows: rows one CTA of the kernel takes (measured)


def shrink_splits(rows: int, in_features: int, sms: int) -> int:
    """in_features ranges per row group in the kernel's shrink: ranges of 512 or more elements, at
    most 32, and only as many as two CTAs per SM over the batch need (a batch-1 step reads each
    adapter's A through many SMs; a big batch has row groups enough)."""
    groups = -(-max(rows, 1) // GROUP_ROWS)
    return max(1, min(-(-in_features // 512), 32, -(-2 * sms // groups)))


def add_lora_kernel(out: torch.Tensor, x: torch.Tensor, adapters: LoraSet, rows: LoraRows) -> bool:
    """The kernel path, in place; False where it does not apply (no CUDA kernels, a full table)."""
    from maga_transformer.ops._cuda import check_status, kernels_for
    kernels = kernels_for(x)
    if kernels is None or not hasattr(kernels, "lora_apply") or not _kernel_applies(out, x, adapters):
        return False
    table = adapters.device_table(x.device)
    if table is None:
        return False
    splits = shrink_splits(x.shape[0], x.shape[1], _sm_count(x.device.index or 0))
    partial = torch.empty(x.shape[0] * splits * kernels.lora_max_table_rank, dtype=torch.float32, device=x.device)
    check_status(kernels, kernels.lora_apply(out, x, rows.slots, rows.row_order(), table, partial, splits),
                 "lora_apply")
    return True


def add_lora(out: torch.Tensor, x: torch.Tensor, adapters: LoraSet, rows: Optional[LoraRows]) -> torch.Tensor:
    """The dispatch point for the low-rank term: the CUDA kernel for graph steps and small eager
    ones, the torch paths otherwise (and on the CPU)."""
    if rows is None:
        return out
    if rows.static:
        if not add_lora_kernel(out, x, adapters, rows):
            raise RuntimeError("a CUDA-graph step with LoRA rows needs the CUDA LoRA kernel")
        return out
    if not adapters:
        return out
    if out.is_cuda and x.shape[0] <= KERNEL_MAX_ROWS and add_lora_kernel(out, x, adapters, rows):
        return out
    if len(rows.groups) > 1 and x.shape[0] <= STACKED_MAX_ROWS and len(adapters) > 1:
        return add_lora_stacked(out, x, adapters, rows)
    return add_lora_reference(out, x, adapters, rows)
