"""Overlap scheduling: the host prepares and launches decode step N+1 while the GPU still runs step N.

Without it the GPU idles while the host reads step N's tokens back, appends them, checks stops,
detokenizes and plans the next step (tens of microseconds per sequence: at batch 256 the host work
is as long as the GPU work). With it, step N+1 is launched *before* step N's tokens are read: its
input ids are step N's drawn tokens, still on the device, and its KV slots are the next positions
of the same sequences. Then the host reads step N back while N+1 runs.

Step N+1 assumes every sequence of step N continues. A sequence that step N finishes (EOS, a stop
word or string) wastes its row of N+1, which is dropped: its KV write lands in a block it just
freed, before any later step can reuse that block (one stream orders them). The guard below keeps
everything else exact, so overlapped outputs equal the plain loop's:
- only pure decode steps overlap, and only requests whose sampling needs nothing step N produces
  (no repetition / presence / frequency penalty, beam search, logits, hidden states or loss);
- no look-ahead while requests wait (they are admitted first), when a sequence would reach its
  length limit in step N, or when the free blocks cannot give every sequence its next slot.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

from maga_transformer.engine.kv_cache_manager import KVCacheManager
from maga_transformer.engine.request import Request, RequestStatus
from maga_transformer.engine.scheduler import ScheduledRequest, Scheduler, SchedulerOutput
from maga_transformer.engine.step_processor import PendingDraw, Ready


@dataclass
class InflightStep:
    """A launched step whose tokens have not been read back yet."""
    plan: SchedulerOutput
    ready: Ready
    draw: PendingDraw


def _request_overlaps(request: Request) -> bool:
    cfg = request.config
    return not (request.is_beam_search or cfg.repetition_penalty != 1.0 or cfg.presence_penalty
                or cfg.frequency_penalty or cfg.return_logits or cfg.return_hidden_states or cfg.calculate_loss)


def step_can_overlap(plan: SchedulerOutput) -> bool:
    """A pure decode step (one token per sequence, each past its first output) of requests whose
    sampling depends on nothing the step itself draws."""
    if plan.is_empty or plan.preempted:
        return False
    for item in plan.scheduled:
        if item.num_tokens != 1 or not _request_overlaps(item.request):
            return False
        for seq in item.request.live_seqs:
            if seq.num_output_tokens < 1 or seq.num_computed_tokens + 1 != len(seq.token_ids):
                return False
    return True


def can_look_ahead(step: InflightStep, scheduler: Scheduler) -> bool:
    """Whether step N+1 may be launched before step `step` (N) is read back (see the module doc)."""
    if scheduler.waiting or len(step.ready) != len(scheduler.running):
        return False  # admit waiting requests, and let no running request starve, before looking ahead
    if not _same_sequences(step):
        return False  # a stop string finished a sequence after the draw was launched
    blocks = 0
    for request, _ in step.ready:
        if request.status != RequestStatus.RUNNING:
            return False  # aborted or timed out since the launch
        for seq in request.live_seqs:
            # the token step N appends is output number num_output_tokens + 1
            if seq.num_output_tokens + 1 >= request.max_new_tokens:
                return False
            blocks += scheduler.kv.blocks_needed(seq, 1)
    return blocks <= scheduler.pool.num_free_blocks


def look_ahead_plan(step: InflightStep, kv: KVCacheManager) -> SchedulerOutput:
    """Step N+1 for the sequences of step N, in the same row order as step N's draw (whose tokens
    are its input), each given the slot of its next position."""
    plan = SchedulerOutput()
    for request, _ in step.ready:
        for seq in request.live_seqs:
            plan.block_copies.extend(kv.allocate(seq, 1))
        plan.scheduled.append(ScheduledRequest(request, 1))
    return plan


def _same_sequences(step: InflightStep) -> bool:
    """Step N+1's rows (the live sequences, in order) must be the rows of step N's draw: its tokens
    are their input ids."""
    seqs: List = [seq for request, _ in step.ready for seq in request.live_seqs]
    return len(seqs) == len(step.draw.pairs) and all(a is b for a, (_, b) in zip(seqs, step.draw.pairs))
