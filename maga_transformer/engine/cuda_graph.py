"""CUDA graphs of the decode step, one per batch-size bucket, captured at start-up.

A decode step (one new token per sequence) launches a few hundred small kernels; launched one by
one from Python, the host is the bottleneck (transformers reaches 7 % of the H100's bandwidth floor
at batch 1). Replaying a captured graph launches them all at once. Everything a graph reads lives
in static buffers that each step overwrites: token ids, positions, KV slots, block tables and
sequence lengths; a batch is padded up to its bucket with rows that write no KV (slot -1) and
attend to one key. The decode attention kernel's partition count is fixed at its maximum for
max_seq_len, so the launch shape does not depend on the step.

With LoRA adapters servable (LORA_INFO / MAX_LORA_MODEL_SIZE, unmerged), a second graph per bucket
carries each row's adapter slot as one more static input, and every projection runs the CUDA LoRA
kernel, which finds the adapters through tables the engine core rewrites between steps
(ops/lora.py): steps with adapter rows replay those graphs, steps without them the plain ones.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from maga_transformer import ops
from maga_transformer.models.arch import ForwardBatch
from maga_transformer.models.decoder import DecoderModel, KVCache
from maga_transformer.ops.attention import DecodeTensors, decode_partitions
from maga_transformer.ops._compiled import cuda_kernels
from maga_transformer.ops.lora import sorted_rows

logger = logging.getLogger(__name__)

# up to max_num_seqs (64 by default); offline batches of up to 1,024 sequences decode in graphs too
_BUCKETS = [1, 2, 4, 8] + list(range(16, 257, 16)) + list(range(288, 513, 32)) + list(range(576, 1025, 64))


@dataclass
class DecodeRow:
    """One sequence of a decode step, as the graph takes it."""
    token: int
    position: int
    slot: int
    block_table: Sequence[int]


def lora_graphs_supported(model: DecoderModel) -> Optional[str]:
    """None if decode steps with LoRA rows can be captured too, else why not."""
    if model.arch.num_experts:
        return "MoE experts' adapters run on each step's routed tokens, chosen on the host"
    kernels = cuda_kernels()
    if kernels is None or not hasattr(kernels, "lora_apply"):
        return "the CUDA LoRA kernel is not built"
    return None


def graphs_supported(model: DecoderModel, kv_cache_dtype: str = "auto") -> Optional[str]:
    """None if decode steps of this model can be captured, else the reason they cannot."""
    if model.device.type != "cuda":
        return "not on a CUDA device"
    if os.environ.get("MAGA_DISABLE_CUDA_GRAPHS") == "1":
        return "MAGA_DISABLE_CUDA_GRAPHS=1"
    kernels = cuda_kernels()
    if kernels is None:
        return "the CUDA kernels are not built"
    if kv_cache_dtype != "auto" and (model.dtype == torch.float32 or not hasattr(kernels, "write_kv_cache_quantized")):
        return (f"a {kv_cache_dtype} KV cache in {model.dtype} is read by the torch reference attention, which reads "
                "each step's lengths on the host (the decode kernel reads quantized caches for fp16 / bf16)")
    if not kernels.paged_decode_supports_head_dim(model.arch.head_dim):
        return f"no decode kernel for head_dim {model.arch.head_dim}"
    if getattr(model.arch, "position_encoding", "rope") == "alibi":
        return "ALiBi attention runs the torch reference, which reads each step's lengths on the host"
    if model.USES_PROMPT_LAYOUT:
        return "positions depend on each prompt's layout (GLM v1), which the graphs do not carry"
    if model.arch.rope.rope_type == "dynamic":
        return "dynamic NTK rope depends on each step's lengths on the host"
    return None


def max_decode_partitions(max_seq_len: int, partition_size: int, sliding_window: Optional[int]) -> int:
    """The most partitions the decode kernel gives any sequence of up to max_seq_len keys. Without a
    window that is the longest sequence's count; with one, a window of W keys that straddles
    partition edges touches up to ceil(W / P) + 1 partitions, whatever the sequence's length."""
    longest = decode_partitions(max_seq_len, partition_size, None)
    if not sliding_window:
        return longest
    return min(longest, math.ceil(sliding_window / partition_size) + 1)


class DecodeGraphs:
    def __init__(self, model: DecoderModel, kv_caches: List[KVCache], block_size: int, max_seq_len: int,
                 max_batch: int, with_lora: bool = False) -> None:
        """with_lora: also capture the graphs of steps with LoRA rows (lora_graphs_supported)."""
        self.model, self.kv_caches, self.block_size = model, kv_caches, block_size
        self.buckets = [b for b in _BUCKETS if b <= max_batch] or [1]
        device, biggest = model.device, self.buckets[-1]
        self.max_blocks = math.ceil(max_seq_len / block_size)
        kernels = cuda_kernels()
        self.partitions = max_decode_partitions(max_seq_len, kernels.decode_partition_size, model.arch.sliding_window)
        long = dict(dtype=torch.long, device=device)
        self.input_ids = torch.zeros(biggest, **long)
        self.positions = torch.zeros(biggest, **long)
        self.slots = torch.full((biggest,), -1, **long)
        self.rope_lens = torch.ones(biggest, **long)
        self.block_tables = torch.zeros(biggest, self.max_blocks, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(biggest, dtype=torch.int32, device=device)
        self.lora_slots = torch.full((biggest,), -1, **long) if with_lora else None
        self.lora_order = torch.arange(biggest, **long) if with_lora else None  # rows sorted by slot
        self.graphs: Dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: Dict[int, torch.Tensor] = {}
        self.lora_graphs: Dict[int, torch.cuda.CUDAGraph] = {}
        self.lora_logits: Dict[int, torch.Tensor] = {}
        self._capture_all()

    @property
    def with_lora(self) -> bool:
        return self.lora_slots is not None

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def _batch(self, size: int, lora: bool = False) -> ForwardBatch:
        meta = ops.AttentionMetadata(query_lens=[1] * size, context_lens=[0] * size, block_tables=[[0]] * size,
                                     block_size=self.block_size, num_tokens=size, device=self.model.device,
                                     sliding_window=self.model.arch.sliding_window)
        meta.decode = DecodeTensors(self.block_tables[:size], self.seq_lens[:size], self.partitions)
        batch = ForwardBatch(self.input_ids[:size], self.positions[:size], self.slots[:size], self.rope_lens[:size],
                             meta)
        if lora:
            batch.lora = ops.LoraRows.for_graph(self.lora_slots[:size], self.lora_order[:size])
        return batch

    def _forward(self, batch: ForwardBatch) -> torch.Tensor:
        return self.model.compute_logits(self.model.forward(batch, self.kv_caches))

    @torch.inference_mode()
    def _capture_all(self) -> None:
        start = time.monotonic()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.model.device)
        stream.wait_stream(torch.cuda.current_stream(self.model.device))
        with torch.cuda.stream(stream):
            for size in reversed(self.buckets):  # the biggest first: smaller graphs reuse its pool memory
                self.graphs[size], self.logits[size] = self._capture(self._batch(size), pool, stream)
                if self.with_lora:
                    self.lora_graphs[size], self.lora_logits[size] = self._capture(self._batch(size, True), pool,
                                                                                   stream)
        torch.cuda.current_stream(self.model.device).wait_stream(stream)
        torch.cuda.synchronize(self.model.device)
        logger.info("captured %d decode CUDA graphs (batch %d..%d%s) in %.1f s",
                    len(self.graphs) + len(self.lora_graphs), self.buckets[0], self.buckets[-1],
                    ", with and without LoRA rows" if self.with_lora else "", time.monotonic() - start)

    def _capture(self, batch: ForwardBatch, pool, stream):
        self._forward(batch)  # warm-up outside the graph: lazy init, autotuning
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=stream):
            logits = self._forward(batch)
        return graph, logits

    def bucket(self, size: int) -> int:
        return next(b for b in self.buckets if b >= size)

    @torch.inference_mode()
    def run(self, rows: Sequence[DecodeRow], pending_tokens: Optional[torch.Tensor] = None,
            lora_slots: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Logits [len(rows), vocab] fp32 (a view of the graph's output: valid until the next run).
        pending_tokens: the rows' input ids on the device (overlap scheduling), instead of row.token.
        lora_slots: each row's LoRA adapter slot (-1: none), for a step with adapter rows."""
        n = len(rows)
        size = self.bucket(n)
        width = max(len(r.block_table) for r in rows)
        if width > self.max_blocks:
            raise ValueError(f"a sequence holds {width} blocks, more than max_seq_len allows ({self.max_blocks})")
        device = self.model.device
        columns = [[r.token for r in rows], [r.position for r in rows], [r.slot for r in rows]]
        if lora_slots is not None:  # padding rows: no adapter, sorted last
            columns.append(list(lora_slots))
            columns.append(sorted_rows(list(lora_slots)))
        scalars = torch.tensor(columns, dtype=torch.long)
        tables = torch.tensor([list(r.block_table) + [0] * (width - len(r.block_table)) for r in rows],
                              dtype=torch.int32)
        scalars = scalars.pin_memory().to(device, non_blocking=True)
        self.input_ids[:n].copy_(scalars[0] if pending_tokens is None else pending_tokens[:n])
        self.positions[:n].copy_(scalars[1])
        self.slots[:n].copy_(scalars[2])
        self.rope_lens[:n].copy_(scalars[1] + 1)
        self.seq_lens[:n].copy_(scalars[1] + 1)
        self.block_tables[:n, :width].copy_(tables.pin_memory().to(device, non_blocking=True))
        if size > n:  # padding rows: no KV write, one key each (stale table entries are valid block ids)
            self.slots[n:size].fill_(-1)
            self.seq_lens[n:size].fill_(1)
            self.positions[n:size].fill_(0)
        if lora_slots is None:
            self.graphs[size].replay()
            return self.logits[size][:n]
        self.lora_slots[:n].copy_(scalars[3])
        self.lora_order[:n].copy_(scalars[4])
        if size > n:
            self.lora_slots[n:size].fill_(-1)
            self.lora_order[n:size].copy_(torch.arange(n, size))
        self.lora_graphs[size].replay()
        return self.lora_logits[size][:n]
