"""Which requests run this step, how many tokens each, and which KV blocks they use.

One rule (as in vLLM v1): no separate prefill and decode phases. Every sequence has
`num_computed_tokens` chasing its token count; a step gives each scheduled request a number of
tokens under a token budget. Chunked prefill, prefix reuse and preemption by recompute follow.
The sequences of one request (samples, beams) always have equal lengths and are scheduled together.
Pure Python: tested on CPU with fake block counts.
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Deque, Dict, List

from maga_transformer.engine.block_pool import BlockPool
from maga_transformer.engine.kv_cache_manager import BlockCopy, KVCacheManager
from maga_transformer.engine.request import Request, RequestStatus, Sequence

logger = logging.getLogger(__name__)


@dataclass
class ScheduledRequest:
    request: Request
    num_tokens: int  # new tokens computed for EACH of its live sequences this step


@dataclass
class SchedulerOutput:
    scheduled: List[ScheduledRequest] = field(default_factory=list)
    block_copies: List[BlockCopy] = field(default_factory=list)
    preempted: List[Request] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, pool: BlockPool, block_size: int, max_num_batched_tokens: int, max_num_seqs: int,
                 enable_chunked_prefill: bool = True) -> None:
        self.pool = pool
        self.kv = KVCacheManager(pool, block_size)
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: Deque[Request] = deque()
        self.running: List[Request] = []
        self.requests: Dict[str, Request] = {}

    # ---- queue management ------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request_id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish_request(self, request: Request) -> None:
        """Release every block of the request and forget it (finish or abort)."""
        for seq in request.seqs:
            self.kv.free(seq)
        request.status = RequestStatus.FINISHED
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.requests.pop(request.request_id, None)

    def free_sequence(self, seq: Sequence) -> None:
        self.kv.free(seq)

    # ---- the step plan ---------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        budget = self._schedule_running(out, budget)
        if not out.preempted:
            self._schedule_waiting(out, budget)
        return out

    def _tokens_for(self, request: Request, budget: int) -> int:
        seqs = request.live_seqs
        remaining = seqs[0].num_uncomputed_tokens
        assert all(s.num_uncomputed_tokens == remaining for s in seqs), "sequences of a request diverged"
        return min(remaining, budget // len(seqs))

    def _blocks_needed(self, request: Request, num_tokens: int) -> int:
        return sum(self.kv.blocks_needed(seq, num_tokens) for seq in request.live_seqs)

    def _allocate(self, out: SchedulerOutput, request: Request, num_tokens: int) -> None:
        for seq in request.live_seqs:
            out.block_copies.extend(self.kv.allocate(seq, num_tokens))
        out.scheduled.append(ScheduledRequest(request, num_tokens))

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        index = 0
        while index < len(self.running):
            request = self.running[index]
            num_tokens = self._tokens_for(request, budget)
            if num_tokens == 0:
                break
            while self._blocks_needed(request, num_tokens) > self.pool.num_free_blocks:
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is request:
                    break
            if request.status != RequestStatus.RUNNING:
                break
            self._allocate(out, request, num_tokens)
            budget -= num_tokens * len(request.live_seqs)
            index += 1
        return budget

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        """Preemption by recompute: drop the KV, requeue at the front; the prefix cache may save work."""
        logger.info("preempting request %s (KV cache full)", request.request_id)
        for seq in request.live_seqs:
            self.kv.free(seq)
        self.running.remove(request)
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.waiting.appendleft(request)
        out.preempted.append(request)

    def _num_running_seqs(self) -> int:
        return sum(len(r.live_seqs) for r in self.running)

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0:
            request = self.waiting[0]
            if self._num_running_seqs() + len(request.live_seqs) > self.max_num_seqs:
                break
            self._match_prefix(request)
            num_tokens = self._tokens_for(request, budget)
            too_long = self._split_too_early(request, num_tokens)
            if num_tokens == 0 or too_long or self._blocks_needed(request, num_tokens) > self.pool.num_free_blocks:
                if not self.running and not out.scheduled and self._blocks_needed(request, 1) > self.pool.num_blocks:
                    raise RuntimeError("KV cache too small for a single request")  # guarded at admission
                for seq in request.live_seqs:
                    self.kv.free(seq)  # do not sit on cached blocks while waiting
                break
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            self._allocate(out, request, num_tokens)
            budget -= num_tokens * len(request.live_seqs)

    def _split_too_early(self, request: Request, num_tokens: int) -> bool:
        """A first chunk must hold the whole prompt without chunked prefill, and GLM's bidirectional
        prefix always (admission guarantees either fits one step's budget)."""
        seq = request.live_seqs[0]
        unsplit = request.unsplit_prefix_len if self.enable_chunked_prefill else request.prompt_len
        return seq.num_computed_tokens + num_tokens < min(unsplit, len(seq.token_ids))

    def _match_prefix(self, request: Request) -> None:
        """Reuse cached full blocks; all sequences of the request keep the same number of tokens."""
        seqs = request.live_seqs
        if seqs[0].block_table or request.config.calculate_loss:
            return  # loss needs the logits of every prompt token, so nothing may be skipped
        matched = [self.kv.match_prefix(seq) for seq in seqs]
        common = min(matched)
        for seq in seqs:
            self.kv.truncate_computed(seq, common)
        if request.num_steps == 0:
            request.reuse_len = common
