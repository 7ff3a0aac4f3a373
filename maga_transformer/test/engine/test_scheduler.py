"""Scheduler decisions with fake block counts and no model: budgets, caps, chunking, preemption."""
from __future__ import annotations

from maga_transformer.config import GenerateConfig
from maga_transformer.engine.block_pool import BlockPool
from maga_transformer.engine.request import Request, RequestStatus, Sequence
from maga_transformer.engine.scheduler import PrefillPolicy, Scheduler


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



def _planned(plan) -> dict:
    return {item.request.request_id: item.num_tokens for item in plan.scheduled}


def _policy_scheduler(threshold: int, partial: int = 1, budget: int = 2048) -> Scheduler:
    return Scheduler(BlockPool(20000), block_size=16, max_num_batched_tokens=budget, max_num_seqs=64,
                     policy=PrefillPolicy(max_num_partial_prefills=partial, long_prefill_token_threshold=threshold))


def _start_decodes(sched: Scheduler, count: int, prefix: str = "d") -> list:
    decodes = [_request(f"{prefix}{i}", 20) for i in range(count)]
    for request in decodes:
        sched.add_request(request)
    _advance(sched.schedule())
    return decodes


def test_decodes_run_every_step_while_a_long_prompt_prefills():
    """Decodes admitted after a long prompt were starved behind it before (planned in admission order)."""
    sched = _policy_scheduler(threshold=256)
    decoders = _start_decodes(sched, 4, "early")
    long_prompt = _request("long", 32000)
    sched.add_request(long_prompt)
    _advance(sched.schedule())  # the long prompt takes its first chunk next to the 4 decodes
    decoders += _start_decodes(sched, 3, "late")
    steps = 0
    while long_prompt.seqs[0].num_computed_tokens < 32000:
        plan = sched.schedule()
        planned = _planned(plan)
        assert all(planned.get(r.request_id) == 1 for r in decoders), planned  # every decode, every step
        assert planned["long"] <= 256
        _advance(plan)
        steps += 1
    assert steps >= (32000 - 2 * 256) // 256


def test_a_long_prompt_alone_takes_the_whole_budget():
    sched = _policy_scheduler(threshold=256)
    sched.add_request(_request("long", 32000))
    assert _planned(sched.schedule()) == {"long": 2048}


def test_a_second_long_prompt_waits_and_short_ones_pass_it():
    sched = _policy_scheduler(threshold=600, partial=1, budget=1000)
    decoding = _start_decodes(sched, 1)  # decodes make a long prompt's chunk capped
    for rid, length in (("long1", 5000), ("long2", 5000), ("short", 100)):
        sched.add_request(_request(rid, length))
    planned = _planned(sched.schedule())
    # long2 would be a second partial prefill: it waits; the short prompt fits whole and passes it
    assert planned == {decoding[0].request_id: 1, "long1": 600, "short": 100}
    assert [r.request_id for r in sched.waiting] == ["long2"]


def test_two_partial_prefills_when_allowed():
    sched = _policy_scheduler(threshold=300, partial=2, budget=1000)
    _start_decodes(sched, 1)
    for rid in ("long1", "long2"):
        sched.add_request(_request(rid, 5000))
    planned = _planned(sched.schedule())
    assert planned["long1"] == 300 and planned["long2"] == 300
