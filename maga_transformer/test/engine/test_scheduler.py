"""Scheduler decisions with fake block counts and no model: budgets, caps, chunking, preemption."""
from __future__ import annotations

from maga_transformer.config import GenerateConfig
from maga_transformer.engine.block_pool import BlockPool
from maga_transformer.engine.request import Request, RequestStatus, Sequence
from maga_transformer.engine.scheduler import Scheduler


def _request(rid: str, prompt_len: int) -> Request:
    prompt = list(range(1, prompt_len + 1))
    req = Request(request_id=rid, prompt_token_ids=prompt, config=GenerateConfig(max_new_tokens=100),
                  max_new_tokens=100)
    req.seqs = [Sequence(token_ids=list(prompt), prompt_len=prompt_len)]
    return req


def _advance(plan) -> None:
    """Pretend the model ran: tokens computed, and each finished prompt gets one new token."""
    for item in plan.scheduled:
        for seq in item.request.live_seqs:
            seq.num_computed_tokens += item.num_tokens
            if seq.num_computed_tokens == len(seq.token_ids):
                seq.token_ids.append(7)


def test_token_budget_chunks_prefill_and_keeps_decodes_first():
    sched = Scheduler(BlockPool(100), block_size=4, max_num_batched_tokens=10, max_num_seqs=8)
    a, b = _request("a", 3), _request("b", 25)
    sched.add_request(a)
    sched.add_request(b)
    plan = sched.schedule()
    assert [(i.request.request_id, i.num_tokens) for i in plan.scheduled] == [("a", 3), ("b", 7)]
    _advance(plan)
    plan = sched.schedule()  # a decodes (1 token), b continues its prompt with the rest of the budget
    assert [(i.request.request_id, i.num_tokens) for i in plan.scheduled] == [("a", 1), ("b", 9)]


def test_max_num_seqs_caps_running():
    sched = Scheduler(BlockPool(100), block_size=4, max_num_batched_tokens=1000, max_num_seqs=2)
    for i in range(3):
        sched.add_request(_request(f"r{i}", 5))
    plan = sched.schedule()
    assert len(plan.scheduled) == 2 and len(sched.waiting) == 1


def test_preemption_requeues_latest_request_first_in_line():
    sched = Scheduler(BlockPool(4), block_size=4, max_num_batched_tokens=1000, max_num_seqs=8)
    a, b = _request("a", 8), _request("b", 7)  # a: 2 blocks, b: 2 blocks -> pool full
    sched.add_request(a)
    sched.add_request(b)
    _advance(sched.schedule())
    plan = sched.schedule()  # a's new token needs a third block: b is preempted
    assert [r.request_id for r in plan.preempted] == ["b"]
    assert b.status == RequestStatus.WAITING and sched.waiting[0] is b
    assert b.seqs[0].num_computed_tokens == 0 and not b.seqs[0].block_table
    assert [i.request.request_id for i in plan.scheduled] == ["a"]
