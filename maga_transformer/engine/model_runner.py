"""Turns a scheduler plan into one flat variable-length batch, runs the model, returns logits.

Owns the device side of the KV cache (one key and one value tensor per layer, shaped
[blocks, block_size, kv_heads, head_dim]) and is, with the model code and ops/, the only place that
creates device tensors.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from maga_transformer import ops
from maga_transformer.config.engine_config import EngineConfig
from maga_transformer.engine.request import Sequence
from maga_transformer.engine.scheduler import SchedulerOutput
from maga_transformer.models.arch import ForwardBatch
from maga_transformer.models.decoder import DecoderModel

logger = logging.getLogger(__name__)

DEFAULT_CPU_KV_SHARE = 0.10  # of available host memory, when KV_CACHE_MEM_MB is not given
DEFAULT_CPU_KV_CAP_MB = 4096


@dataclass
class StepResult:
    """Model outputs the engine needs, keyed by sequence id."""

    logits: torch.Tensor  # [rows, vocab] fp32: one row per sequence that reached its last token
    row_of_seq: Dict[int, int] = field(default_factory=dict)
    hidden: Optional[torch.Tensor] = None  # [rows, hidden] when a request asked for hidden states
    # seq id -> (first prompt position, log-probs of the next prompt tokens), for calculate_loss
    prompt_logprobs: Dict[int, Tuple[int, torch.Tensor]] = field(default_factory=dict)


def kv_bytes_per_block(model: DecoderModel, block_size: int) -> int:
    arch = model.arch
    element = torch.tensor([], dtype=model.dtype).element_size()
    return 2 * arch.num_layers * block_size * arch.num_kv_heads * arch.head_dim * element


def _available_host_mb() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 8192


def plan_num_blocks(model: DecoderModel, block_size: int, cfg: EngineConfig) -> int:
    if cfg.num_kv_blocks is not None:
        return cfg.num_kv_blocks
    if cfg.kv_cache_mem_mb is not None:
        budget_mb = cfg.kv_cache_mem_mb
    else:
        budget_mb = min(int(_available_host_mb() * DEFAULT_CPU_KV_SHARE), DEFAULT_CPU_KV_CAP_MB)
    num_blocks = budget_mb * (1 << 20) // kv_bytes_per_block(model, block_size)
    if num_blocks < 2:
        raise ValueError(f"KV_CACHE_MEM_MB={budget_mb} holds fewer than 2 KV blocks of {block_size} tokens")
    return int(num_blocks)


class ModelRunner:
    def __init__(self, model: DecoderModel, block_size: int, num_blocks: int) -> None:
        self.model = model
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.device = model.device
        arch = model.arch
        shape = (num_blocks, block_size, arch.num_kv_heads, arch.head_dim)
        # zeros, not empty: padded attention reads unused slots with weight 0, and 0 * NaN is NaN
        self.kv_caches = [(torch.zeros(shape, dtype=model.dtype, device=self.device),
                           torch.zeros(shape, dtype=model.dtype, device=self.device))
                          for _ in range(arch.num_layers)]
        logger.info("KV cache: %d blocks x %d tokens = %d tokens (%.1f MiB)", num_blocks, block_size,
                    num_blocks * block_size, num_blocks * kv_bytes_per_block(model, block_size) / 2**20)

    @torch.inference_mode()
    def execute(self, plan: SchedulerOutput) -> StepResult:
        if plan.block_copies:
            src = torch.tensor([s for s, _ in plan.block_copies], dtype=torch.long, device=self.device)
            dst = torch.tensor([d for _, d in plan.block_copies], dtype=torch.long, device=self.device)
            for k_cache, v_cache in self.kv_caches:
                ops.copy_kv_blocks(k_cache, v_cache, src, dst)
        batch, seqs, loss_seqs = self._build_batch(plan)
        hidden = self.model.forward(batch, self.kv_caches)
        return self._gather_outputs(hidden, batch, seqs, loss_seqs, plan)

    def _build_batch(self, plan: SchedulerOutput):
        input_ids: List[int] = []
        positions: List[int] = []
        slots: List[int] = []
        rope_lens: List[int] = []
        query_lens: List[int] = []
        context_lens: List[int] = []
        tables: List[List[int]] = []
        seqs: List[Sequence] = []
        loss_seqs: List[Sequence] = []
        for item in plan.scheduled:
            for seq in item.request.live_seqs:
                start, end = seq.num_computed_tokens, seq.num_computed_tokens + item.num_tokens
                input_ids.extend(seq.token_ids[start:end])
                positions.extend(range(start, end))
                table = seq.block_table
                slots.extend(table[p // self.block_size] * self.block_size + p % self.block_size
                             for p in range(start, end))
                rope_lens.extend([end] * item.num_tokens)
                query_lens.append(item.num_tokens)
                context_lens.append(start)
                tables.append(table)
                seqs.append(seq)
                if item.request.config.calculate_loss:
                    loss_seqs.append(seq)
        as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=self.device)  # noqa: E731
        attn = ops.build_attention_metadata(query_lens, context_lens, tables, self.block_size, self.device,
                                            self.model.arch.sliding_window)
        batch = ForwardBatch(as_tensor(input_ids), as_tensor(positions), as_tensor(slots), as_tensor(rope_lens),
                             attn)
        return batch, seqs, loss_seqs

    def _gather_outputs(self, hidden: torch.Tensor, batch: ForwardBatch, seqs: List[Sequence],
                        loss_seqs: List[Sequence], plan: SchedulerOutput) -> StepResult:
        ends: List[int] = []
        result = StepResult(logits=torch.empty(0))
        offset = 0
        for seq, q_len in zip(seqs, batch.attn.query_lens):
            if seq.num_computed_tokens + q_len == len(seq.token_ids):
                result.row_of_seq[seq.seq_id] = len(ends)
                ends.append(offset + q_len - 1)
            if seq in loss_seqs:
                result.prompt_logprobs[seq.seq_id] = self._prompt_logprobs(hidden, seq, offset, q_len)
            offset += q_len
        rows = hidden[torch.tensor(ends, dtype=torch.long, device=self.device)]
        result.logits = self.model.compute_logits(rows)
        if any(item.request.config.return_hidden_states for item in plan.scheduled):
            result.hidden = rows.float()
        return result

    def _prompt_logprobs(self, hidden: torch.Tensor, seq: Sequence, offset: int,
                         q_len: int) -> Tuple[int, torch.Tensor]:
        """log p(prompt[p + 1] | prompt[..p]) for the prompt positions p computed this step."""
        start = seq.num_computed_tokens
        stop = min(start + q_len, seq.prompt_len - 1)
        if stop <= start:
            return start, torch.empty(0)
        logits = self.model.compute_logits(hidden[offset:offset + stop - start])
        targets = torch.tensor(seq.token_ids[start + 1:stop + 1], dtype=torch.long, device=logits.device)
        return start, torch.log_softmax(logits, dim=-1).gather(1, targets.unsqueeze(1)).squeeze(1).cpu()
