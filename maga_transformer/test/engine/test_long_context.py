"""A long prompt prefilled in chunks next to running decodes (issue 15's scheduling): the same greedy
tokens as transformers and as one unchunked prefill, and the decodes advance every step meanwhile."""
from __future__ import annotations

import random

import pytest

from maga_transformer.config import GenerateConfig
from maga_transformer.test.fixtures import hf_greedy, load_engine_model, run_greedy, tiny_llama

LONG, NEW = 2500, 12


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_llama(str(tmp_path_factory.mktemp("tiny_long")), seed=11, vocab_size=128,
                      max_position_embeddings=4096)


@pytest.fixture(scope="module")
def long_case(tiny):
    rng = random.Random(5)
    long_prompt = [rng.randrange(3, 128) for _ in range(LONG)]
    short = [[rng.randrange(3, 128) for _ in range(n)] for n in (9, 14)]
    late_rng = random.Random(120)  # a prompt whose 40 greedy tokens hold no EOS (the decode must last)
    short.append([late_rng.randrange(3, 128) for _ in range(20)])
    hf_model = tiny[0]
    return long_prompt, short, hf_greedy(hf_model, long_prompt, NEW), [hf_greedy(hf_model, p, 40) for p in short]


def _engine(directory, **kwargs):
    return load_engine_model(directory, num_kv_blocks=1200, block_size=4, **kwargs).engine


def test_one_unchunked_prefill_equals_transformers(tiny, long_case):
    long_prompt, _, expected, _ = long_case
    engine = _engine(tiny[1], max_num_batched_tokens=4096)
    assert run_greedy(engine, [long_prompt], NEW) == [expected]
    engine.pool.check_idle()


def test_chunks_next_to_decodes_equal_transformers_and_the_decodes_never_stall(tiny, long_case):
    long_prompt, short, expected, short_expected = long_case
    threshold = 128
    engine = _engine(tiny[1], max_num_batched_tokens=512, long_prefill_token_threshold=threshold)
    greedy = GenerateConfig(max_new_tokens=40, top_k=1)
    decoders = [engine.add_request(p, greedy) for p in short[:2]]
    engine.step()  # both short prompts prefilled: they decode from now on
    long_handle = engine.add_request(long_prompt, GenerateConfig(max_new_tokens=NEW, top_k=1))
    engine.step()  # the long prompt's first chunk
    # a prompt arriving mid-prefill is admitted beside the long chunk at once and then decodes every
    # step (before, requests behind a long prompt waited for its whole prefill)
    decoders.append(engine.add_request(short[2], greedy))
    engine.step()
    scheduler = engine.scheduler
    steps_while_prefilling = 0
    while True:
        before = {h.request_id: scheduler.requests[h.request_id].seqs[0].num_output_tokens for h in decoders}
        long_request = scheduler.requests.get(long_handle.request_id)
        computed = long_request.seqs[0].num_computed_tokens if long_request else 0
        if computed >= LONG:
            break
        engine.step()
        steps_while_prefilling += 1
        after = {rid: scheduler.requests[rid].seqs[0].num_output_tokens for rid in before}
        assert all(after[rid] == before[rid] + 1 for rid in before), "a decode stalled behind the long prompt"
        assert scheduler.requests[long_handle.request_id].seqs[0].num_computed_tokens - computed <= threshold
    assert steps_while_prefilling >= (LONG - 2 * threshold) // threshold  # two chunks ran before the loop
    engine.run_until_idle()
    assert long_handle.result().outputs[0].token_ids == expected
    assert [h.result().outputs[0].token_ids for h in decoders] == short_expected
    engine.pool.check_idle()


def test_the_memory_plan_says_how_many_full_length_sequences_fit(tiny):
    """1,200 blocks of 4 tokens hold 4,800 tokens: one sequence of the model's 4,096 positions
    (1,024 blocks), and 18 of 256 tokens."""
    assert "1 sequence of 4,096 tokens at once" in _engine(tiny[1]).info.description
    short = load_engine_model(tiny[1], num_kv_blocks=1200, block_size=4, max_seq_len=256).engine
    assert "18 sequences of 256 tokens at once" in short.info.description
