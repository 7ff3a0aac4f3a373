"""Turns a scheduler plan into one flat variable-length batch, runs the model, returns logits.

Owns the device side of the KV cache (one key and one value tensor per layer, shaped
[blocks, block_size, kv_heads, head_dim]) and is, with the model code and ops/, the only place that
creates device tensors.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from maga_transformer import ops
from maga_transformer.engine.cuda_graph import DecodeGraphs, DecodeRow, graphs_supported, lora_graphs_supported
from maga_transformer.engine.memory_plan import kv_bytes_per_block
from maga_transformer.engine.request import Sequence
from maga_transformer.engine.sampler import SamplingRow, sample
from maga_transformer.engine.scheduler import SchedulerOutput
from maga_transformer.engine.transfer import to_device
from maga_transformer.models.arch import ForwardBatch, PromptLayout
from maga_transformer.models.decoder import DecoderModel, KVCache

logger = logging.getLogger(__name__)

@dataclass
class BatchInputs:
    """An eager step's flat batch as plain lists (what ForwardBatch is built from on every rank)."""
    input_ids: List[int]
    positions: List[int]
    slots: List[int]
    rope_lens: List[int]
    query_lens: List[int]
    context_lens: List[int]
    tables: List[List[int]]
    bidirectional_lens: Optional[List[int]] = None
    block_positions: Optional[List[int]] = None
    lora_slots: Optional[List[int]] = None  # per token, its request's LoRA adapter slot (-1: none)


@dataclass
class LossSpan:
    """Prompt positions [start, stop) of one sequence computed this step, at token offset `offset`
    of the batch, and the tokens that follow them (calculate_loss)."""
    seq_id: int
    offset: int
    start: int
    targets: List[int]


@dataclass
class StepInputs:
    """Everything one model step computes from, with no engine objects in it: rank 0 derives it from
    the scheduler's plan, and under tensor parallelism every other rank runs the same step from it
    (DESIGN.md, "Processes"), so every rank calls the same collectives in the same order."""
    block_copies: List[Tuple[int, int]] = field(default_factory=list)
    graph_rows: Optional[List[DecodeRow]] = None  # a decode step for the CUDA graphs
    graph_lora_slots: Optional[List[int]] = None  # its rows' LoRA adapter slots, when any row has one
    batch: Optional[BatchInputs] = None  # an eager step
    logit_rows: List[int] = field(default_factory=list)  # batch token index of each sampled row
    row_of_seq: Dict[int, int] = field(default_factory=dict)
    loss_spans: List[LossSpan] = field(default_factory=list)
    want_hidden: bool = False
    num_pending: int = 0  # overlap scheduling: input tokens still on the device, one per row
    # tensor parallelism: LoRA changes since the last step, for the other ranks (lora/mirror.py)
    lora_ops: List[tuple] = field(default_factory=list)


@dataclass
class StepResult:
    """Model outputs the engine needs, keyed by sequence id."""

    logits: torch.Tensor  # [rows, vocab] fp32: one row per sequence that reached its last token
    row_of_seq: Dict[int, int] = field(default_factory=dict)
    hidden: Optional[torch.Tensor] = None  # [rows, hidden] when a request asked for hidden states
    # seq id -> (first prompt position, log-probs of the next prompt tokens), for calculate_loss
    prompt_logprobs: Dict[int, Tuple[int, torch.Tensor]] = field(default_factory=dict)


def _allocate_kv(model: DecoderModel, block_size: int, num_blocks: int, kv_cache_dtype: str) -> List[KVCache]:
    arch = model.arch
    shape = (num_blocks, block_size, arch.num_kv_heads, arch.head_dim)
    return [(ops.allocate_kv(shape, model.dtype, model.device, kv_cache_dtype),
             ops.allocate_kv(shape, model.dtype, model.device, kv_cache_dtype)) for _ in range(arch.num_layers)]


@torch.inference_mode()
def profile_forward(model: DecoderModel, block_size: int, num_tokens: int, num_rows: int) -> None:
    """The largest step the scheduler may build: one sequence of num_tokens prompt tokens, the logits
    of num_rows rows and their sampling, over a KV cache just big enough (memory planning measures
    its peak)."""
    blocks = math.ceil(num_tokens / block_size)
    kv = _allocate_kv(model, block_size, blocks, "auto")  # the largest the pool may be
    table = list(range(blocks))
    attn = ops.build_attention_metadata([num_tokens], [0], [table], block_size, model.device,
                                        model.arch.sliding_window)
    positions = torch.arange(num_tokens, device=model.device)
    batch = ForwardBatch(torch.zeros(num_tokens, dtype=torch.long, device=model.device), positions, positions.clone(),
                         torch.full((num_tokens,), num_tokens, dtype=torch.long, device=model.device), attn)
    hidden = model.forward(batch, kv)
    logits = model.compute_logits(hidden[:num_rows])
    # the sampler's worst case for as many rows: fp32 copies, top-p's sort and its int64 indices
    # (~5 GB for 1,024 rows of a 128k vocabulary; leaving it out of the plan ran such batches out of memory)
    worst = SamplingRow(temperature=0.7, top_k=50, top_p=0.9, repetition_penalty=1.1, history_token_ids=(0,),
                        top_logprobs=20)
    sample(logits, [worst] * num_rows)


class _LayoutColumns:
    """The per-sequence attention spans and per-token second positions of a step's prompt layouts
    (GLM v1); both stay None while no sequence of the step has a layout."""

    def __init__(self) -> None:
        self.bidirectional_lens: Optional[List[int]] = None
        self.block_positions: Optional[List[int]] = None
        self._rows = 0
        self._tokens = 0

    def add(self, layout: Optional[PromptLayout], start: int, end: int) -> None:
        if layout is not None and self.bidirectional_lens is None:
            self.bidirectional_lens = [0] * self._rows
        if self.bidirectional_lens is not None:
            self.bidirectional_lens.append(layout.bidirectional_len if layout is not None else 0)
        second = layout.block_positions(start, end) if layout is not None else None
        if second is not None and self.block_positions is None:
            self.block_positions = [0] * self._tokens
        if self.block_positions is not None:
            self.block_positions.extend(second if second is not None else [0] * (end - start))
        self._rows += 1
        self._tokens += end - start


class ModelRunner:
    def __init__(self, model: DecoderModel, block_size: int, num_blocks: int, max_seq_len: int = 0,
                 max_batch: int = 0, ranks=None, kv_cache_dtype: str = "auto", lora_graphs: bool = False) -> None:
        """ranks: the tensor-parallel group's step channel on rank 0 (distributed/ranks.py), which
        hands each step's inputs to the other ranks before this one runs it; None alone.
        kv_cache_dtype: "auto" (the model's dtype), "int8" or "fp8" (ops/kv_cache.py).
        lora_graphs: adapters may be served unmerged: capture decode graphs for steps with LoRA rows too."""
        self.model = model
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.device = model.device
        self.ranks = ranks
        self.kv_caches = _allocate_kv(model, block_size, num_blocks, kv_cache_dtype)
        per_block = kv_bytes_per_block(model, block_size, kv_cache_dtype)
        logger.info("KV cache: %d blocks x %d tokens = %d tokens (%.1f MiB, %s%s)", num_blocks, block_size,
                    num_blocks * block_size, num_blocks * per_block / 2**20, kv_cache_dtype,
                    "" if kv_cache_dtype == "auto" else
                    f": {kv_bytes_per_block(model, block_size) / per_block:.2f}x the tokens of {model.dtype}")
        self.graphs: Optional[DecodeGraphs] = None
        self.lora_ops: List[tuple] = []  # rank 0: LoRA changes the next step's inputs carry
        self.lora_mirror = None  # other ranks: a lora.mirror.LoraMirror that replays them
        self.last_ran_graph = False  # whether the last step replayed a graph (engine/step_trace.py)
        reason = graphs_supported(model, kv_cache_dtype)
        if reason is None and max_seq_len and max_batch:
            with_lora = lora_graphs and lora_graphs_supported(model) is None
            if lora_graphs and not with_lora:
                logger.info("decode steps with LoRA rows run without CUDA graphs: %s", lora_graphs_supported(model))
            self.graphs = DecodeGraphs(model, self.kv_caches, block_size, max_seq_len, max_batch, with_lora)
        elif model.device.type == "cuda":
            logger.info("decode runs without CUDA graphs: %s", reason or "no max_seq_len / batch given")

    def execute(self, plan: SchedulerOutput, pending_tokens: Optional[torch.Tensor] = None) -> StepResult:
        """Run one step. pending_tokens (overlap scheduling): a decode step whose input tokens are
        still on the device, one per row in plan order, drawn by the step before and not yet appended
        to the sequences; without it every input token is in seq.token_ids."""
        inputs = self.prepare(plan, pending_tokens is not None)
        if self.ranks is not None:
            self.ranks.send_step(inputs, pending_tokens)
        return self.run(inputs, pending_tokens)

    # ---- rank 0: the plan as inputs -------------------------------------------------------------
    def prepare(self, plan: SchedulerOutput, pending: bool = False) -> StepInputs:
        inputs = StepInputs(block_copies=list(plan.block_copies))
        inputs.lora_ops, self.lora_ops = self.lora_ops, []
        rows = self._graph_rows(plan, pending)
        if rows is not None:
            inputs.graph_rows = [row for _, row in rows]
            if any(item.request.lora_slot >= 0 for item in plan.scheduled):
                inputs.graph_lora_slots = self._row_lora_slots(plan)
            inputs.row_of_seq = {seq.seq_id: i for i, (seq, _) in enumerate(rows)}
            inputs.num_pending = len(rows) if pending else 0
            return inputs
        inputs.batch, seqs, loss_seqs = self._build_batch(plan, pending)
        self._plan_outputs(inputs, seqs, loss_seqs, pending)
        inputs.want_hidden = any(item.request.config.return_hidden_states for item in plan.scheduled)
        inputs.num_pending = len(seqs) if pending else 0
        return inputs

    def _graph_rows(self, plan: SchedulerOutput, pending: bool) -> Optional[List[Tuple[Sequence, DecodeRow]]]:
        """The step as graph rows, or None when it must run eagerly (a prefill chunk, a request that
        wants hidden states or the prompt loss, or more sequences than the biggest graph)."""
        if self.graphs is None:
            return None
        rows: List[Tuple[Sequence, DecodeRow]] = []
        for item in plan.scheduled:
            cfg = item.request.config
            if (item.num_tokens != 1 or cfg.return_hidden_states or cfg.calculate_loss
                    or (item.request.lora_slot >= 0 and not self._lora_rows_in_graphs())
                    or item.request.prefix_len):  # P-tuning: positions start after the prefix
                return None
            for seq in item.request.live_seqs:
                position = seq.num_computed_tokens
                if position + (0 if pending else 1) != len(seq.token_ids):
                    return None
                table = seq.block_table
                slot = table[position // self.block_size] * self.block_size + position % self.block_size
                rows.append((seq, DecodeRow(0 if pending else seq.token_ids[-1], position, slot, table)))
        if not rows or len(rows) > self.graphs.max_batch:
            return None
        return rows

    def _lora_rows_in_graphs(self) -> bool:
        return self.graphs.with_lora and ops.lora_kernel_tables_usable()

    @staticmethod
    def _row_lora_slots(plan: SchedulerOutput) -> List[int]:
        """Each graph row's adapter slot, in the rows' order (a request's live sequences in turn)."""
        return [item.request.lora_slot for item in plan.scheduled for _ in item.request.live_seqs]

    def _build_batch(self, plan: SchedulerOutput, pending: bool = False):
        batch = BatchInputs([], [], [], [], [], [], [])
        seqs: List[Sequence] = []
        loss_seqs: List[Sequence] = []
        layouts = _LayoutColumns()
        lora_slots: List[int] = []
        with_lora = any(item.request.lora_slot >= 0 for item in plan.scheduled)
        for item in plan.scheduled:
            layout = item.request.prompt_layout
            for seq in item.request.live_seqs:
                if with_lora:
                    lora_slots.extend([item.request.lora_slot] * item.num_tokens)
                start, end = seq.num_computed_tokens, seq.num_computed_tokens + item.num_tokens
                batch.input_ids.extend(seq.token_ids[start:end] if not pending else [0])  # pending: filled on the device
                shift = item.request.prefix_len  # P-tuning: the prompt's positions start at 0 after the prefix
                batch.positions.extend(range(start - shift, end - shift) if layout is None
                                       else layout.positions(start, end))
                layouts.add(layout, start, end)
                table = seq.block_table
                batch.slots.extend(table[p // self.block_size] * self.block_size + p % self.block_size
                                   for p in range(start, end))
                batch.rope_lens.extend([end - shift] * item.num_tokens)
                batch.query_lens.append(item.num_tokens)
                batch.context_lens.append(start)
                batch.tables.append(table)
                seqs.append(seq)
                if item.request.config.calculate_loss:
                    loss_seqs.append(seq)
        batch.bidirectional_lens, batch.block_positions = layouts.bidirectional_lens, layouts.block_positions
        batch.lora_slots = lora_slots if with_lora else None
        return batch, seqs, loss_seqs

    def _plan_outputs(self, inputs: StepInputs, seqs: List[Sequence], loss_seqs: List[Sequence],
                      pending: bool) -> None:
        """Which batch rows are sampled (sequences that reached their last token) and which prompt
        spans get their log-probs."""
        offset = 0
        for seq, q_len in zip(seqs, inputs.batch.query_lens):
            if seq.num_computed_tokens + q_len == len(seq.token_ids) + (1 if pending else 0):
                inputs.row_of_seq[seq.seq_id] = len(inputs.logit_rows)
                inputs.logit_rows.append(offset + q_len - 1)
            if seq in loss_seqs:
                start = seq.num_computed_tokens
                stop = min(start + q_len, seq.prompt_len - 1)
                inputs.loss_spans.append(LossSpan(seq.seq_id, offset, start, seq.token_ids[start + 1:stop + 1]))
            offset += q_len

    # ---- every rank: the step from its inputs ---------------------------------------------------
    @torch.inference_mode()
    def run(self, inputs: StepInputs, pending_tokens: Optional[torch.Tensor] = None) -> StepResult:
        if inputs.lora_ops and self.lora_mirror is not None:
            self.lora_mirror.apply(inputs.lora_ops)
        if inputs.block_copies:
            src = to_device([s for s, _ in inputs.block_copies], torch.long, self.device)
            dst = to_device([d for _, d in inputs.block_copies], torch.long, self.device)
            for k_cache, v_cache in self.kv_caches:
                ops.copy_kv_blocks(k_cache, v_cache, src, dst)
        self.last_ran_graph = inputs.graph_rows is not None  # read by the step trace
        if inputs.graph_rows is not None:
            logits = self.graphs.run(inputs.graph_rows, pending_tokens, inputs.graph_lora_slots)
            return StepResult(logits=logits, row_of_seq=inputs.row_of_seq)
        batch = self._forward_batch(inputs.batch)
        if pending_tokens is not None:
            batch.input_ids = pending_tokens
        hidden = self.model.forward(batch, self.kv_caches)
        result = StepResult(logits=torch.empty(0), row_of_seq=inputs.row_of_seq)
        for span in inputs.loss_spans:
            result.prompt_logprobs[span.seq_id] = self._prompt_logprobs(hidden, span)
        rows = hidden[to_device(inputs.logit_rows, torch.long, self.device)]
        result.logits = self.model.compute_logits(rows)
        if inputs.want_hidden:
            result.hidden = rows.float()
        return result

    def _forward_batch(self, b: BatchInputs) -> ForwardBatch:
        as_tensor = lambda values: to_device(values, torch.long, self.device)  # noqa: E731
        attn = ops.build_attention_metadata(b.query_lens, b.context_lens, b.tables, self.block_size, self.device,
                                            self.model.arch.sliding_window, b.bidirectional_lens)
        batch = ForwardBatch(as_tensor(b.input_ids), as_tensor(b.positions), as_tensor(b.slots),
                             as_tensor(b.rope_lens), attn)
        if b.block_positions is not None:
            batch.block_positions = as_tensor(b.block_positions)
        if b.lora_slots is not None:
            batch.lora = ops.LoraRows.from_slots(b.lora_slots, self.device)
        return batch

    def _prompt_logprobs(self, hidden: torch.Tensor, span: LossSpan) -> Tuple[int, torch.Tensor]:
        """log p(prompt[p + 1] | prompt[..p]) for the prompt positions p computed this step."""
        if not span.targets:
            return span.start, torch.empty(0)
        logits = self.model.compute_logits(hidden[span.offset:span.offset + len(span.targets)])
        targets = torch.tensor(span.targets, dtype=torch.long, device=logits.device)
        return span.start, torch.log_softmax(logits, dim=-1).gather(1, targets.unsqueeze(1)).squeeze(1).cpu()
