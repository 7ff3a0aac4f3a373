"""The engine core in its own process (the default) against the in-process mode (the oracle, itself
checked against transformers in test_engine_batching.py): the same outputs for a mixed batch, aborts
free every block, a killed or hung core fails every live request at once, and start-up errors in the
core reach the caller with their message."""
from __future__ import annotations

import os
import signal
import time

import pytest
from safetensors.torch import load_file, save_file

from maga_transformer.config import EngineConfig, GenerateConfig, ModelConfig
from maga_transformer.engine.core_client import EngineProcessClient, EngineUnavailable
from maga_transformer.model_factory import ModelFactory
from maga_transformer.test.fixtures import hf_greedy, tiny_llama

MIXED = [
    (GenerateConfig(max_new_tokens=12, top_k=1), True),
    (GenerateConfig(max_new_tokens=12, top_k=1), False),  # not streamed: tokens sent once, at the end
    (GenerateConfig(max_new_tokens=10, top_k=20, random_seed=3, num_return_sequences=3), True),
    (GenerateConfig(max_new_tokens=8, num_beams=3, num_return_sequences=2), True),
    (GenerateConfig(max_new_tokens=12, top_k=1, stop_words_str=["w5"], stop_words_list=[[40]]), True),
    (GenerateConfig(max_new_tokens=12, top_k=1, stop_words_str=["w9"]), False),
    (GenerateConfig(max_new_tokens=10, temperature=0.7, top_p=0.9, random_seed=11, top_logprobs=3), True),
    (GenerateConfig(max_new_tokens=6, top_k=1, calculate_loss=2, return_logits=True, return_input_ids=True), True),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_llama(str(tmp_path_factory.mktemp("proc")), seed=21, vocab_size=96, max_position_embeddings=128)


def _model(directory: str, process: bool, **engine):
    return ModelFactory.from_huggingface(
        directory, ModelConfig(seq_size_per_block=4),
        engine_config=EngineConfig(num_kv_blocks=engine.pop("num_kv_blocks", 256), engine_process=process, **engine))


@pytest.fixture(scope="module")
def process_model(tiny):
    model = _model(tiny[1], process=True)
    assert isinstance(model.engine, EngineProcessClient) and model.model is None  # the weights live there
    yield model
    model.stop()


def _prompts(n: int):
    return [[1] + [(7 * i + 5 * j) % 90 + 3 for j in range(3 + i % 9)] for i in range(n)]


def _summary(output):
    seqs = [(o.text, o.token_ids, o.finish_reason, [[t for t, _ in r] for r in (o.top_logprobs or [])])
            for o in output.outputs]
    return seqs, output.beam_responses, output.prompt_token_ids, output.error


def _run_mixed(engine, prompts):
    handles = []
    for i, prompt in enumerate(prompts):
        config, stream = MIXED[i % len(MIXED)]
        handles.append(engine.add_request(prompt, config, stream=stream))
    return [h.result() for h in handles]


def test_mixed_batch_equals_in_process_mode(tiny, process_model):
    prompts = _prompts(24)
    in_process = _model(tiny[1], process=False)
    in_process.engine.start()
    try:
        expected = _run_mixed(in_process.engine, prompts)
    finally:
        in_process.stop()
    got = _run_mixed(process_model.engine, prompts)
    for mine, theirs in zip(got, expected):
        assert _summary(mine) == _summary(theirs)
        for a, b in zip(mine.outputs, theirs.outputs):
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
            assert a.cum_logprob == pytest.approx(b.cum_logprob, abs=1e-4)
        assert (mine.loss is None) == (theirs.loss is None)
        if mine.loss is not None:
            assert mine.loss == pytest.approx(theirs.loss, abs=1e-4)
            assert mine.outputs[0].logits == pytest.approx(theirs.outputs[0].logits, abs=1e-4)
    # the oracle really ran what we think: greedy rows equal transformers' generate
    hf_model, _ = tiny
    assert got[0].outputs[0].token_ids == hf_greedy(hf_model, prompts[0], 12)
    assert {o.outputs[0].finish_reason.value for o in got} >= {"stop", "length"}
    _wait_free(process_model.engine)


def _wait_free(engine, within_s: float = 1.0) -> None:
    deadline = time.monotonic() + within_s
    while (engine.pool.usage > 0 or engine.num_running) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.pool.usage == 0.0 and engine.num_running == 0 and engine.num_live_requests == 0


def test_abort_frees_every_block_within_a_second(process_model):
    engine = process_model.engine
    cfg = GenerateConfig(max_new_tokens=100, top_k=1, ignore_eos=True)
    handles = [engine.add_request(p, cfg) for p in _prompts(6)]
    first = next(iter(handles[0]))  # really running
    assert not first.finished and engine.pool.usage > 0
    engine.abort_requests([h.request_id for h in handles])
    assert all(h.result().outputs[0].finish_reason.value == "abort" for h in handles)
    _wait_free(engine)


def test_pipeline_gets_at_most_one_update_per_engine_step(tiny, process_model):
    from maga_transformer.pipeline import Pipeline
    pipeline = Pipeline(process_model)
    prompts = [" ".join(f"w{(5 * i + 3 * j) % 90 + 3}" for j in range(2 + i % 7)) for i in range(64)]
    before = process_model.engine.stats.num_steps
    responses = list(pipeline(prompts, max_new_tokens=10, top_k=1))
    steps = process_model.engine.stats.num_steps - before
    assert responses[-1].finished and len(responses) <= steps
    assert sum(len(r.changed) for r in responses) > len(responses)  # updates really carry several prompts
    offline = pipeline.generate(prompts, max_new_tokens=10, top_k=1)
    assert offline.batch_response == responses[-1].batch_response
    hf_model, _ = tiny
    for i in (0, 17, 63):
        expected = pipeline.tokenizer.decode(hf_greedy(hf_model, pipeline.encode(prompts[i]), 10),
                                             skip_special_tokens=True)
        assert responses[-1].batch_response[i] == expected


def _kill_mid_stream(model, how) -> float:
    """Start streams, break the core with `how(pid)`; seconds until every stream ended in an error."""
    engine = model.engine
    cfg = GenerateConfig(max_new_tokens=100, top_k=1, ignore_eos=True)
    handles = [engine.add_request(p, cfg) for p in _prompts(3)]
    iterators = [iter(h) for h in handles]
    assert all(not next(it).finished for it in iterators)
    start = time.monotonic()
    how(engine.pid)
    finals = [h.result() for h in handles]
    elapsed = time.monotonic() - start
    assert all(f.finished and f.error and "engine core" in f.error for f in finals)
    assert not engine.healthy
    with pytest.raises(EngineUnavailable, match="engine core is not running"):
        engine.add_request([1, 2, 3], cfg)
    return elapsed


def test_killed_core_fails_every_live_request_at_once(tiny):
    model = _model(tiny[1], process=True)
    try:
        elapsed = _kill_mid_stream(model, lambda pid: os.kill(pid, signal.SIGKILL))
        assert elapsed < 3.0
        assert "SIGKILL" in model.engine.failure
    finally:
        model.stop()


def test_hung_core_is_stopped_after_the_step_timeout(tiny):
    model = _model(tiny[1], process=True, step_timeout_s=1.0)
    try:
        elapsed = _kill_mid_stream(model, lambda pid: os.kill(pid, signal.SIGSTOP))
        assert 0.9 < elapsed < 4.0
        assert "sent nothing for 1 s" in model.engine.failure
    finally:
        model.stop()


def test_startup_failure_in_the_core_reaches_the_caller(tiny, tmp_path):
    _, directory = tiny
    for name in os.listdir(directory):
        with open(os.path.join(directory, name), "rb") as src, open(tmp_path / name, "wb") as dst:
            dst.write(src.read())
    weights = load_file(str(tmp_path / "model.safetensors"))
    del weights[next(n for n in weights if "layers.1.self_attn.q_proj" in n)]  # a checkpoint short of a weight
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="engine core start-up failed: checkpoint is missing weight 'q' of layer 1"):
        _model(str(tmp_path), process=True)


@pytest.mark.parametrize("device, env, expected", [("cuda", None, 1), ("cuda", "3", 3), ("cpu", None, None),
                                                   ("cpu", "2", 2), ("cuda", "0", None)])
def test_core_host_threads(monkeypatch, device, env, expected):
    """A GPU core keeps one host thread (torch's per-core pool spun beside the front end and
    doubled a loaded server's prefill steps); a CPU core keeps torch's pool; the env var decides."""
    import torch

    from maga_transformer.engine.core_main import HOST_THREADS_ENV, _limit_host_threads
    before = torch.get_num_threads()
    if env is None:
        monkeypatch.delenv(HOST_THREADS_ENV, raising=False)
    else:
        monkeypatch.setenv(HOST_THREADS_ENV, env)
    try:
        _limit_host_threads(torch.device(device))
        assert torch.get_num_threads() == (before if expected is None else expected)
    finally:
        torch.set_num_threads(before)
