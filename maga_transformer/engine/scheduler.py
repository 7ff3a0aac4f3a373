"""Which requests run this step, how many tokens each, and which KV blocks they use.

One rule (as in vLLM v1): no separate prefill and decode phases. Every sequence has
`num_computed_tokens` chasing its token count; a step gives each scheduled request a number of
tokens under a token budget. Chunked prefill, prefix reuse and preemption by recompute follow.
Decodes are planned before any prompt work, so a long prompt never takes their place; while they
run, a long prompt's chunk is capped (`long_prefill_token_threshold`) so their steps stay short,
and at most `max_num_partial_prefills` prompts are mid-prefill at once (shorter prompts that fit
whole may pass a long one waiting for its turn).
The sequences of one request (samples, beams) always have equal lengths and are scheduled together.
Pure Python: tested on CPU with fake block counts.
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Deque, Dict, List, Optional

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


@dataclass
class PrefillPolicy:
    """How prompt work shares a step with decodes (EngineConfig's MAX_NUM_PARTIAL_PREFILLS and
    LONG_PREFILL_TOKEN_THRESHOLD)."""

    max_num_partial_prefills: int = 1  # prompts whose prefill spans steps, at once
    long_prefill_token_threshold: int = 0  # chunk cap of a prompt next to decodes; 0: no cap


class Scheduler:
    def __init__(self, pool: BlockPool, block_size: int, max_num_batched_tokens: int, max_num_seqs: int,
                 enable_chunked_prefill: bool = True, policy: Optional[PrefillPolicy] = None) -> None:
        self.pool = pool
        self.kv = KVCacheManager(pool, block_size)
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.enable_chunked_prefill = enable_chunked_prefill
        self.policy = policy or PrefillPolicy()
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
        decoding = [r for r in self.running if not _is_prefilling(r)]
        budget = self._schedule_running(out, decoding, budget)
        decodes_scheduled = bool(out.scheduled)
        if not out.preempted:
            prefilling = [r for r in self.running if _is_prefilling(r)]
            budget = self._schedule_running(out, prefilling, budget, decodes_scheduled)
        if not out.preempted:
            self._schedule_waiting(out, budget, decodes_scheduled)
        return out

    def _tokens_for(self, request: Request, budget: int, next_to_decodes: bool = False) -> int:
        seqs = request.live_seqs
        remaining = seqs[0].num_uncomputed_tokens
        assert all(s.num_uncomputed_tokens == remaining for s in seqs), "sequences of a request diverged"
        tokens = min(remaining, budget // len(seqs))
        cap = self.policy.long_prefill_token_threshold
        if next_to_decodes and cap and remaining > cap and self.enable_chunked_prefill:
            # a long prompt's chunk next to decodes sets their inter-token latency: keep it short
            # (but never below a prefix that must not be split, such as GLM's bidirectional one)
            unsplit = request.unsplit_prefix_len - seqs[0].num_computed_tokens
            tokens = min(tokens, max(cap, unsplit))
        return tokens

    def _blocks_needed(self, request: Request, num_tokens: int) -> int:
        return sum(self.kv.blocks_needed(seq, num_tokens) for seq in request.live_seqs)

    def _allocate(self, out: SchedulerOutput, request: Request, num_tokens: int) -> None:
        for seq in request.live_seqs:
            out.block_copies.extend(self.kv.allocate(seq, num_tokens))
        out.scheduled.append(ScheduledRequest(request, num_tokens))

    def _schedule_running(self, out: SchedulerOutput, group: List[Request], budget: int,
                          next_to_decodes: bool = False) -> int:
        for request in group:
            if request.status != RequestStatus.RUNNING:
                continue  # preempted for an earlier request of this step
            num_tokens = self._tokens_for(request, budget, next_to_decodes)
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

    def _num_partial_prefills(self, out: SchedulerOutput) -> int:
        """Running prompts that are still mid-prefill after this step's plan."""
        planned = {id(item.request): item.num_tokens for item in out.scheduled}
        return sum(1 for request in self.running
                   if request.live_seqs[0].num_uncomputed_tokens > max(1, planned.get(id(request), 0)))

    def _schedule_waiting(self, out: SchedulerOutput, budget: int, next_to_decodes: bool = False) -> None:
        index = 0
        while index < len(self.waiting) and budget > 0:
            request = self.waiting[index]
            if self._num_running_seqs() + len(request.live_seqs) > self.max_num_seqs:
                break
            self._match_prefix(request)
            num_tokens = self._tokens_for(request, budget, next_to_decodes)
            too_long = self._split_too_early(request, num_tokens)
            if num_tokens == 0 or too_long or self._blocks_needed(request, num_tokens) > self.pool.num_free_blocks:
                if not self.running and not out.scheduled and self._blocks_needed(request, 1) > self.pool.num_blocks:
                    raise RuntimeError("KV cache too small for a single request")  # guarded at admission
                self._release_cached(request)
                break
            partial = request.live_seqs[0].num_uncomputed_tokens > num_tokens
            if partial and self._num_partial_prefills(out) >= self.policy.max_num_partial_prefills:
                self._release_cached(request)
                index += 1  # it waits for a free prefill slot; a prompt behind it that fits whole may go
                continue
            del self.waiting[index]
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            self._allocate(out, request, num_tokens)
            budget -= num_tokens * len(request.live_seqs)

    def _release_cached(self, request: Request) -> None:
        for seq in request.live_seqs:
            self.kv.free(seq)  # do not sit on cached blocks while waiting

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


def _is_prefilling(request: Request) -> bool:
    """More than one token to compute: a prompt (or a recompute after preemption), not a decode."""
    return request.live_seqs[0].num_uncomputed_tokens > 1
