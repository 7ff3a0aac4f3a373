"""Overlap scheduling (engine/overlap.py) changes when the host works, never what comes out: every
output (tokens, log-probs, top log-probs, text, finish reasons) equals the plain loop's, with greedy,
seeded sampling, n > 1, EOS / stop words / stop strings / length stops, min_new_tokens, arrivals and
aborts mid-flight, and the prefix cache; afterwards every KV block is free again. The oracle is the
same engine with overlap off (itself checked against transformers in test_engine_batching.py) and,
for greedy, transformers' generate. On the CPU each step still runs to its end, so these tests check
the bookkeeping; the GPU benchmark measures the gain."""
from __future__ import annotations

import random

import pytest

from maga_transformer.config import GenerateConfig
from maga_transformer.test.fixtures import hf_greedy, load_engine_model, tiny_llama

NEW = 20


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_llama(str(tmp_path_factory.mktemp("tiny")), seed=11, vocab_size=128, max_position_embeddings=256)


def _engine(directory, overlap: bool, **kwargs):
    model = load_engine_model(directory, block_size=4, num_kv_blocks=kwargs.pop("num_kv_blocks", 512),
                              overlap_scheduling=overlap, **kwargs)
    return model.engine


def _prompts(n: int, seed: int):
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, 128) for _ in range(rng.randrange(1, 30))] for _ in range(n)]


CONFIGS = [
    GenerateConfig(max_new_tokens=NEW, top_k=1),
    GenerateConfig(max_new_tokens=7, top_k=1, ignore_eos=True),
    GenerateConfig(max_new_tokens=NEW, temperature=0.8, top_p=0.9, random_seed=5, top_logprobs=3),
    GenerateConfig(max_new_tokens=NEW, top_k=20, random_seed=9, num_return_sequences=2),
    GenerateConfig(max_new_tokens=NEW, top_k=1, min_new_tokens=12),
    GenerateConfig(max_new_tokens=NEW, top_k=1, stop_words_list=[[40]], stop_words_str=["a"]),
]
# its sampling reads every earlier token, so a step that holds it is never overlapped
PENALIZED = GenerateConfig(max_new_tokens=8, top_k=1, repetition_penalty=1.3)


def _summary(output):
    return [(o.token_ids, [[t for t, _ in row] for row in (o.top_logprobs or [])], o.text, o.finish_reason,
             o.logprobs + [v for row in (o.top_logprobs or []) for _, v in row]) for o in output.outputs]


def _assert_same(overlapped, plain):
    """Exact tokens, top ids, text and finish reasons; log-probs to 1e-4 (a different batch
    composition moves the CPU GEMMs' rounding by ~1e-6)."""
    assert len(overlapped) == len(plain)
    for mine, theirs in zip(overlapped, plain):
        assert [s[:4] for s in mine] == [s[:4] for s in theirs]
        for a, b in zip(mine, theirs):
            assert a[4] == pytest.approx(b[4], abs=1e-4)


def _run(engine, prompts, arrivals_every: int = 0, configs=CONFIGS):
    handles = []
    for i, prompt in enumerate(prompts):
        handles.append(engine.add_request(prompt, configs[i % len(configs)]))
        for _ in range(arrivals_every):
            engine.step()
    engine.run_until_idle()
    return [_summary(h.result()) for h in handles]


@pytest.mark.parametrize("arrivals_every", [0, 3])
def test_overlapped_outputs_equal_the_plain_loop(tiny, arrivals_every):
    prompts = _prompts(21, seed=arrivals_every)
    plain = _run(_engine(tiny[1], overlap=False), prompts, arrivals_every)
    engine = _engine(tiny[1], overlap=True)
    _assert_same(_run(engine, prompts, arrivals_every), plain)
    assert engine.num_look_ahead_steps > NEW // 2  # it really overlapped
    engine.pool.check_idle()


def test_a_request_that_cannot_overlap_keeps_its_batch_exact(tiny):
    prompts = _prompts(8, seed=4)
    configs = [PENALIZED] + CONFIGS
    plain = _run(_engine(tiny[1], overlap=False), prompts, configs=configs)
    engine = _engine(tiny[1], overlap=True)
    _assert_same(_run(engine, prompts, configs=configs), plain)
    assert engine.num_look_ahead_steps > 0  # once the penalized request is done
    engine.pool.check_idle()


def test_overlapped_greedy_equals_transformers(tiny):
    hf_model, directory = tiny
    prompts = _prompts(6, seed=3)
    engine = _engine(directory, overlap=True)
    cfg = GenerateConfig(max_new_tokens=NEW, top_k=1)
    handles = [engine.add_request(p, cfg) for p in prompts]
    engine.run_until_idle()
    for prompt, handle in zip(prompts, handles):
        assert handle.result().outputs[0].token_ids == hf_greedy(hf_model, prompt, NEW)
    assert engine.num_look_ahead_steps > 0
    engine.pool.check_idle()


def test_abort_while_a_step_is_in_flight_frees_everything(tiny):
    engine = _engine(tiny[1], overlap=True)
    cfg = GenerateConfig(max_new_tokens=200, top_k=1, ignore_eos=True)
    keep, drop = engine.add_request([1, 5, 6, 7], cfg), engine.add_request([1, 9, 9], cfg)
    for _ in range(6):
        engine.step()
    assert engine.core._inflight is not None
    drop.abort()
    engine.run_until_idle()
    assert drop.result().outputs[0].finish_reason.value == "abort"
    assert len(keep.result().outputs[0].token_ids) == 200
    engine.pool.check_idle()


def test_prefix_cache_blocks_filled_under_overlap_are_reused(tiny):
    """Blocks that the pending tokens filled are offered to the cache once those tokens are known,
    so a follow-up prompt (prompt + answer) reuses them and still decodes as the plain loop does."""
    first = [1, 17, 18, 19, 20, 21]
    cfg = GenerateConfig(max_new_tokens=NEW, top_k=1, ignore_eos=True)
    results = []
    for overlap in (False, True):
        engine = _engine(tiny[1], overlap=overlap)
        handle = engine.add_request(first, cfg)
        engine.run_until_idle()
        answer = handle.result().outputs[0].token_ids
        handle = engine.add_request(first + answer, cfg)
        engine.run_until_idle()
        follow = handle.result()
        results.append((answer, follow.outputs[0].token_ids, follow.aux_info.reuse_len))
        engine.pool.check_idle()
    assert results[0] == results[1]
    assert results[1][2] >= (len(first) + NEW - 1) // 4 * 4  # every full block of prompt + answer


@pytest.mark.parametrize("overlap", [False, True])
def test_non_streaming_requests_get_one_final_output_equal_to_the_streamed_one(tiny, overlap):
    """stream=False (offline batches) skips the per-step outputs and detokenization, not any result:
    stop strings still stop, beams and samples still finish the same."""
    prompts = _prompts(10, seed=8)
    configs = CONFIGS + [GenerateConfig(max_new_tokens=8, num_beams=2, num_return_sequences=2)]
    finals = []
    for stream in (True, False):
        engine = _engine(tiny[1], overlap=overlap)
        handles = [engine.add_request(p, configs[i % len(configs)], stream=stream) for i, p in enumerate(prompts)]
        engine.run_until_idle()
        outputs = [list(iter(lambda h=h: h.queue.get() if not h.queue.empty() else None, None)) for h in handles]
        assert all(outs[-1].finished for outs in outputs)
        if not stream:
            assert all(len(outs) == 1 for outs in outputs)
        finals.append([(_summary(outs[-1]), outs[-1].beam_responses) for outs in outputs])
        engine.pool.check_idle()
    for streamed, final in zip(*finals):
        _assert_same([final[0]], [streamed[0]])
        assert final[1] == streamed[1]
