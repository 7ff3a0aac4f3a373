"""The CUDA multi-LoRA kernel (src/kernels/cuda/lora.cu) against a float64 per-row loop, and the
decode CUDA graphs that carry each row's adapter slot.

Kernel cases: many adapters in one batch with ranks 8..256 (and 768, a fused q/k/v of rank 256),
odd ranks and in_features off the 16-byte grid (the scalar paths), strided inputs, rows with no
adapter, adapters with no rows (empty segments) and slots missing from the projection's table.
Tolerance: |ours - reference| <= tol * max|reference delta| + tol, tol = 2e-2 (bf16), 4e-3 (fp16),
1e-5 (fp32): the kernel rounds once, into out's dtype.
Graphs: captured before any adapter exists, then served adapters attached and detached between
replays (the device tables); engine: greedy tokens of mixed adapter / base decode through the
LoRA graphs equal PEFT's merged models (fp32 on the GPU), and the LoRA graphs did replay.
"""
from __future__ import annotations

import pytest
import torch

from maga_transformer import ops
from maga_transformer.config import GenerateConfig

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-5}


def _naive_delta(x, adapters: ops.LoraSet, slots, out_features):
    delta = torch.zeros(x.shape[0], out_features, dtype=torch.float64, device=x.device)
    for row, slot in enumerate(slots):
        pair = adapters.get(slot)
        if slot >= 0 and pair is not None:
            delta[row] = pair.b.double() @ (pair.a.double() @ x[row].double())
    return delta


def _adapters(ranks, in_features, out_features, dtype, first_slot=0):
    adapters = ops.LoraSet()
    for i, rank in enumerate(ranks):
        a = torch.randn(rank, in_features, device="cuda") / in_features ** 0.5
        b = torch.randn(out_features, rank, device="cuda") / rank ** 0.5
        adapters[first_slot + i] = ops.LoraPair(a.to(dtype), b.to(dtype))
    return adapters


def _check(out, base, x, adapters, slots, dtype):
    want = _naive_delta(x, adapters, slots, out.shape[1])
    got = out.double() - base.double()
    tol = TOL[dtype]
    assert (got - want).abs().max().item() <= tol * want.abs().max().item() + tol
    return want


CASES = [  # rows, in_features, out_features, ranks, slots of the rows (-1: base; 99: not in the table)
    (1, 4096, 6144, [16], [0]),
    (7, 1024, 2048, [8, 12, 16, 64, 256, 33, 768], [0, 1, 2, 3, 4, 5, 6]),
    (64, 512, 1000, [16, 8, 256, 4], [i % 6 - 1 if i % 7 else 99 for i in range(64)]),
    (5, 1000, 96, [12, 16], [1, -1, 0, 1, 1]),  # in_features % 8 != 0 and an odd rank: the scalar paths
    (40, 256, 4096, [16] * 10, [3] * 40),  # ten adapters loaded, one used: nine empty segments
]


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows, in_features, out_features, ranks, slots", CASES)
def test_the_kernel_adds_each_rows_adapter(dtype, rows, in_features, out_features, ranks, slots):
    torch.manual_seed(rows * 31 + in_features)
    adapters = _adapters(ranks, in_features, out_features, dtype)
    x = torch.randn(rows, in_features, device="cuda").to(dtype)
    base = torch.randn(rows, out_features, device="cuda").to(dtype)
    lora_rows = ops.LoraRows.from_slots(slots, x.device)
    out = base.clone()
    assert ops.lora.add_lora_kernel(out, x, adapters, lora_rows)
    want = _check(out, base, x, adapters, slots, dtype)
    if any(s in adapters.pairs for s in slots):
        assert want.abs().max() > 0  # the case exercises an adapter
    dispatched = ops.add_lora(base.clone(), x, adapters, lora_rows)  # the dispatch picks the kernel here
    assert torch.equal(dispatched, out)


@gpu
@needs_cuda
def test_strided_rows_and_the_torch_paths_agree():
    torch.manual_seed(3)
    dtype = torch.bfloat16
    adapters = _adapters([8, 16, 32], 256, 384, dtype)
    wide = torch.randn(9, 256 + 64, device="cuda").to(dtype)
    x = wide[:, 32:32 + 256]  # a row stride larger than the row, 64-byte offset
    slots = [2, 0, -1, 1, 1, 2, 0, -1, 2]
    base = torch.randn(9, 384, device="cuda").to(dtype)
    rows = ops.LoraRows.from_slots(slots, x.device)
    out = base.clone()
    assert ops.lora.add_lora_kernel(out, x, adapters, rows)
    _check(out, base, x, adapters, slots, dtype)
    grouped = ops.lora.add_lora_reference(base.clone().float(), x.float(), {s: ops.LoraPair(p.a.float(), p.b.float())
                                                                            for s, p in adapters.pairs.items()}, rows)
    assert torch.allclose(out.float(), grouped, atol=5e-2, rtol=2e-2)


@gpu
@needs_cuda
def test_a_graph_captured_without_adapters_serves_those_attached_later():
    torch.manual_seed(5)
    dtype = torch.bfloat16
    weight = ops.prepare_linear((torch.randn(512, 256, device="cuda") / 16).to(dtype))
    x = torch.randn(4, 256, device="cuda").to(dtype)
    slots = torch.full((4,), -1, dtype=torch.long, device="cuda")
    order = torch.arange(4, device="cuda")
    rows = ops.LoraRows.for_graph(slots, order)
    ops.linear(x, weight, None, rows)  # warm-up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.linear(x, weight, None, rows)
    graph.replay()
    base = out.clone()  # no adapter yet: the base projection
    assert torch.allclose(base.float(), (x.float() @ weight.weight.float().T), atol=3e-2, rtol=2e-2)
    for slot, pair in _adapters([16, 8], 256, 512, dtype, first_slot=7).pairs.items():
        weight.lora[slot] = pair
    slots.copy_(torch.tensor([7, -1, 8, 7]))
    order.copy_(torch.tensor(ops.lora.sorted_rows([7, -1, 8, 7])))
    graph.replay()
    _check(out, base, x, weight.lora, [7, -1, 8, 7], dtype)
    weight.lora.pop(7)  # detached: its rows get the base projection again
    graph.replay()
    want = _check(out, base, x, weight.lora, [7, -1, 8, 7], dtype)
    assert want[0].abs().max() == 0 and want[2].abs().max() > 0


@gpu
@needs_cuda
def test_decode_graphs_carry_adapter_rows_and_match_peft(tmp_path, monkeypatch):
    from maga_transformer.engine import cuda_graph
    from maga_transformer.test.lora.engine_util import lora_engine_model
    from maga_transformer.test.lora.peft_cases import ADAPTERS, PROMPTS, build_case, reference_greedy
    llama_case = build_case("llama_hd64", str(tmp_path))
    replays = []
    run = cuda_graph.DecodeGraphs.run

    def counted(self, rows, pending_tokens=None, lora_slots=None):
        replays.append(lora_slots is not None)
        return run(self, rows, pending_tokens, lora_slots)

    monkeypatch.setattr(cuda_graph.DecodeGraphs, "run", counted)
    model = lora_engine_model(llama_case.base_dir, llama_case.adapter_dirs)
    try:
        engine = model.engine
        graphs = engine.core.runner.graphs if hasattr(engine, "core") else None
        assert graphs is not None and graphs.with_lora, "LoRA graphs were not captured"
        names = [None] + sorted(ADAPTERS)
        handles = [(name, prompt, engine.add_request(prompt, GenerateConfig(max_new_tokens=10, top_k=1,
                                                                             adapter_name=name)))
                   for prompt in PROMPTS for name in names]
        engine.run_until_idle()
        for name, prompt, handle in handles:
            oracle = llama_case.base if name is None else llama_case.merged[name]
            assert handle.result().outputs[0].token_ids == reference_greedy(oracle, prompt, 10), (name, prompt)
        assert any(replays), "no decode step with adapter rows replayed a graph"
        engine.pool.check_idle()
    finally:
        model.stop()


def test_graph_rows_without_the_kernel_are_refused_on_the_cpu():
    """On the CPU (or without the CUDA library) a graph-style step has no kernel to run: a clear error."""
    x = torch.randn(2, 8)
    adapters = ops.LoraSet()
    adapters[0] = ops.LoraPair(torch.randn(4, 8), torch.randn(6, 4))
    with pytest.raises(RuntimeError, match="CUDA LoRA kernel"):
        ops.add_lora(torch.zeros(2, 6), x, adapters, ops.LoraRows.for_graph(torch.tensor([0, -1]), torch.tensor([0, 1])))


def test_rows_are_ordered_by_adapter_for_the_kernel():
    """The kernel's CTAs take consecutive rows of this order: one adapter's rows together, base rows last."""
    slots = [3, -1, 0, 3, 5, -1, 0, 3]
    order = ops.lora.sorted_rows(slots)
    assert [slots[r] for r in order] == [0, 0, 3, 3, 3, 5, -1, -1] and sorted(order) == list(range(8))
    assert ops.lora.row_order_by_slot(torch.tensor(slots)).tolist() == order
    assert ops.LoraRows.from_slots(slots, torch.device("cpu")).row_order().tolist() == order
    assert ops.lora.shrink_splits(1, 4096, 132) == 8 and ops.lora.shrink_splits(64, 14336, 132) == 5
    assert ops.lora.shrink_splits(1024, 14336, 132) == 1 and ops.lora.shrink_splits(5, 100, 132) == 1
