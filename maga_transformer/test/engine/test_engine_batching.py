"""Batching is invisible: the same greedy tokens alone, batched, mid-flight, with the prefix cache
on or off, with chunked prefill and under a KV budget that forces preemption; and afterwards every
KV block is free or only held by the prefix cache."""
from __future__ import annotations

import random

import pytest

from maga_transformer.config import GenerateConfig
from maga_transformer.test.fixtures import hf_greedy, load_engine_model, run_greedy, tiny_llama

NEW = 24


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_llama(str(tmp_path_factory.mktemp("tiny")), seed=7, vocab_size=128, max_position_embeddings=256)


def _prompts(n: int, seed: int = 0, shared_prefix: int = 0):
    rng = random.Random(seed)
    prefix = [rng.randrange(3, 128) for _ in range(shared_prefix)]
    return [prefix + [rng.randrange(3, 128) for _ in range(rng.randrange(1, 40))] for _ in range(n)]


@pytest.fixture(scope="module")
def reference(tiny):
    """Greedy tokens of each prompt run alone through transformers."""
    hf_model, _ = tiny
    prompts = _prompts(8) + _prompts(4, seed=1, shared_prefix=21)
    return prompts, [hf_greedy(hf_model, p, NEW) for p in prompts]


def _engine(directory, **kwargs):
    model = load_engine_model(directory, block_size=4, num_kv_blocks=kwargs.pop("num_kv_blocks", 512), **kwargs)
    return model.engine


def test_alone_equals_batch(tiny, reference):
    prompts, expected = reference
    engine = _engine(tiny[1])
    for prompt, exp in zip(prompts, expected):
        assert run_greedy(engine, [prompt], NEW)[0] == exp
    assert run_greedy(engine, prompts, NEW) == expected
    engine.pool.check_idle()


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_arrivals_mid_generation(tiny, reference, prefix_cache):
    prompts, expected = reference
    engine = _engine(tiny[1], enable_prefix_cache=prefix_cache)
    cfg = GenerateConfig(max_new_tokens=NEW, top_k=1)
    handles = []
    for prompt in prompts:  # a new request every 3 steps, while earlier ones decode
        handles.append(engine.add_request(prompt, cfg))
        for _ in range(3):
            engine.step()
    engine.run_until_idle()
    assert [h.result().outputs[0].token_ids for h in handles] == expected
    engine.pool.check_idle()


def test_prefix_cache_reuses_blocks(tiny, reference):
    prompts, expected = reference
    shared = prompts[8:]
    engine = _engine(tiny[1])
    assert run_greedy(engine, shared[:1], NEW) == expected[8:9]
    hits_before = engine.pool.stats.hits
    cfg = GenerateConfig(max_new_tokens=NEW, top_k=1)
    handles = [engine.add_request(p, cfg) for p in shared[1:]]
    engine.run_until_idle()
    assert [h.result().outputs[0].token_ids for h in handles] == expected[9:]
    assert engine.pool.stats.hits - hits_before >= 3 * (21 // 4)  # the 21-token shared prefix: 5 blocks each
    assert all(h.result().aux_info.reuse_len >= 20 for h in handles)
    # multi-turn: the first conversation continued reuses its prompt and answer
    turn2 = shared[0] + expected[8] + [5, 6, 7]
    handle = engine.add_request(turn2, cfg)
    engine.run_until_idle()
    assert handle.result().aux_info.reuse_len >= len(shared[0]) + len(expected[8]) - 4
    engine.pool.check_idle()


def test_chunked_prefill(tiny, reference):
    prompts, expected = reference
    engine = _engine(tiny[1], max_num_batched_tokens=7)  # every prompt over 7 tokens is split
    assert run_greedy(engine, prompts, NEW) == expected
    engine.pool.check_idle()


def test_without_chunked_prefill_prompts_run_whole_and_longer_ones_are_refused(tiny, reference):
    """Chunked prefill off: every prompt is computed in one step; a prompt no step can hold is refused
    at admission (before, it waited forever), and the engine keeps serving the others."""
    prompts, expected = reference
    budget = 30
    engine = _engine(tiny[1], max_num_batched_tokens=budget, enable_chunked_prefill=False)
    fitting = [(p, e) for p, e in zip(prompts, expected) if len(p) <= budget]
    too_long = [p for p in prompts if len(p) > budget]
    assert fitting and too_long
    for prompt in too_long:
        with pytest.raises(ValueError, match=f"prompt: {len(prompt)} tokens .*chunked prefill is off"):
            engine.add_request(prompt, GenerateConfig(max_new_tokens=NEW))
    assert run_greedy(engine, [p for p, _ in fitting], NEW) == [e for _, e in fitting]
    engine.pool.check_idle()


def test_preemption_under_small_kv_budget(tiny, reference):
    prompts, expected = reference
    # 40 blocks of 4 tokens: one request fits (<= 64 tokens = 16 blocks), twelve do not
    engine = _engine(tiny[1], num_kv_blocks=40, enable_prefix_cache=False)
    cfg = GenerateConfig(max_new_tokens=NEW, top_k=1)
    handles = [engine.add_request(p, cfg) for p in prompts]
    engine.run_until_idle()
    outs = [h.result() for h in handles]
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert sum(o.aux_info.num_preemptions for o in outs) > 0
    engine.pool.check_idle()


def test_abort_frees_blocks_at_once(tiny):
    engine = _engine(tiny[1])
    cfg = GenerateConfig(max_new_tokens=200, top_k=1)
    handles = [engine.add_request(p, cfg) for p in _prompts(4, seed=3)]
    for _ in range(5):
        engine.step()
    assert engine.pool.usage > 0
    for h in handles:
        h.abort()
    engine.step()
    assert not engine.scheduler.has_unfinished()
    assert all(h.result().outputs[0].finish_reason.value == "abort" for h in handles)
    engine.pool.check_idle()


def test_parallel_samples_share_prompt_blocks(tiny):
    engine = _engine(tiny[1], enable_prefix_cache=False)
    prompt = _prompts(1, seed=5, shared_prefix=32)[0]
    cfg = GenerateConfig(max_new_tokens=8, num_return_sequences=4, top_k=0, top_p=1.0, random_seed=11,
                         ignore_eos=True)
    handle = engine.add_request(prompt, cfg)
    while not engine.scheduler.running or len(engine.scheduler.running[0].seqs) < 4:
        engine.step()
    seqs = engine.scheduler.running[0].seqs
    full_prompt_blocks = len(prompt) // 4
    shared = set(seqs[0].block_table[:full_prompt_blocks])
    for seq in seqs[1:]:
        assert set(seq.block_table[:full_prompt_blocks]) == shared  # the prompt's blocks, not copies
    assert all(engine.pool.ref_counts[b] == 4 for b in shared)
    engine.run_until_idle()
    out = handle.result()
    assert len(out.outputs) == 4 and all(len(o.token_ids) == 8 for o in out.outputs)
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1  # independent samples
    engine.pool.check_idle()


def test_seeded_sampling_is_batch_invariant(tiny):
    engine = _engine(tiny[1])
    prompt = [1, 9, 8, 7, 6]
    cfg = GenerateConfig(max_new_tokens=16, top_k=0, top_p=0.9, temperature=1.3, random_seed=2024)
    alone = engine.add_request(prompt, cfg)
    engine.run_until_idle()
    others = GenerateConfig(max_new_tokens=16, top_k=0, top_p=1.0)
    handles = [engine.add_request(p, others) for p in _prompts(5, seed=9)]
    engine.step()
    again = engine.add_request(prompt, cfg)
    engine.run_until_idle()
    assert again.result().outputs[0].token_ids == alone.result().outputs[0].token_ids
    assert all(h.result().finished for h in handles)
