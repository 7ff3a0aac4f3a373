"""The per-row low-rank term (ops/lora.py) against a plain per-row loop: rows of several adapters
interleaved (gathered groups) and contiguous (slices), rows with no adapter, adapters that do not
target the projection, and the subset an MoE expert sees."""
from __future__ import annotations

import torch

from maga_transformer import ops
from maga_transformer.ops.lora import add_lora_reference, add_lora_stacked


def _naive(x, adapters, slots):
    out = torch.zeros(x.shape[0], next(iter(adapters.values())).b.shape[0], dtype=torch.float64)
    for row, slot in enumerate(slots):
        pair = adapters.get(slot)
        if slot >= 0 and pair is not None:
            out[row] = pair.b.double() @ (pair.a.double() @ x[row].double())
    return out


def test_grouped_rows_equal_per_row_loop():
    torch.manual_seed(0)
    x = torch.randn(11, 24)
    adapters = ops.LoraSet()
    for slot, rank in ((0, 4), (3, 256), (7, 8)):
        adapters[slot] = ops.LoraPair(torch.randn(rank, 24), torch.randn(40, rank))
    slots = [3, 3, -1, 0, 3, 7, 7, 7, -1, 0, 5]  # slot 5: loaded, but not on this projection
    rows = ops.LoraRows.from_slots(slots, x.device)
    assert any(isinstance(index, slice) for _, index in rows.groups)  # 7's rows are one slice
    assert any(isinstance(index, torch.Tensor) for _, index in rows.groups)  # 3's are gathered
    base = torch.randn(11, 40)
    expected = _naive(x, adapters, slots)
    for path in (add_lora_reference, add_lora_stacked, ops.add_lora):  # grouped, stacked, dispatch
        out = path(base.clone(), x, adapters, rows)
        assert torch.allclose(out.double() - base.double(), expected, atol=1e-3), path.__name__
    adapters.pop(3)  # the stacked form follows the set
    out = add_lora_stacked(base.clone(), x, adapters, rows)
    assert torch.allclose(out.double() - base.double(), _naive(x, adapters, slots), atol=1e-3)
    adapters[3] = ops.LoraPair(torch.randn(256, 24), torch.randn(40, 256))
    subset = torch.tensor([10, 4, 2, 6])
    sub_rows = rows.subset(subset)
    sub_out = ops.add_lora(torch.zeros(4, 40), x[subset], adapters, sub_rows)
    assert torch.allclose(sub_out.double(), _naive(x[subset], adapters, [slots[i] for i in subset]), atol=1e-3)


def test_base_only_steps_carry_no_rows():
    assert ops.LoraRows.from_slots([-1, -1, -1], torch.device("cpu")) is None
    x = torch.randn(3, 8)
    weight = ops.prepare_linear(torch.randn(5, 8))
    assert torch.allclose(ops.linear(x, weight), x @ weight.weight.T if weight.weight is not None
                          else ops.linear(x, weight), atol=1e-5)
