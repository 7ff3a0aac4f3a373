"""A TP = 2 server on CPU (gloo), driven by the official openai client on loopback: the same answers
as a TP = 1 server; then one rank killed mid-stream: every stream in flight ends with an error
naming the lost rank within the bound, /health and new requests answer 503, nothing hangs. The
group goes with it: the engine core exits, and so does the other worker."""
from __future__ import annotations

import os
import signal
import threading
import time
from typing import List

import httpx
import openai
import pytest

from maga_transformer.config import EngineConfig
from maga_transformer.distributed.parallel_config import ParallelConfig
from maga_transformer.model_factory import ModelFactory
from maga_transformer.test.distributed.procs import alive, children
from maga_transformer.test.fixtures import tiny_llama
from maga_transformer.test.server.live_server import LiveServer, metrics, wait_running

FAILURE_BOUND_S = 5.0  # the core's watchdog polls its workers every 0.2 s


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    _, directory = tiny_llama(str(tmp_path_factory.mktemp("tp_server")), seed=5, vocab_size=96,
                              max_position_embeddings=512)
    return directory


def serve(directory: str, tp: int, collective_timeout_s: float = 60.0):
    parallel = (ParallelConfig(tp_size=tp, world_size=tp, local_world_size=tp, collective_timeout_s=collective_timeout_s)
                if tp > 1 else None)
    model = ModelFactory.from_huggingface(directory, engine_config=EngineConfig(num_kv_blocks=512), device="cpu",
                                          parallel=parallel)
    return model, LiveServer(model, concurrency_limit=8)


def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def test_tp2_server_answers_as_tp1(checkpoint):
    answers = []
    for tp in (1, 2):
        model, server = serve(checkpoint, tp)
        try:
            api = client(server)
            one = api.completions.create(model="m", prompt=["w1 w2 w3", "w9"], max_tokens=24, temperature=0)
            streamed = "".join(chunk.choices[0].text for chunk in api.completions.create(
                model="m", prompt="w4 w5", max_tokens=24, temperature=0, stream=True))
            answers.append(([choice.text for choice in one.choices], streamed))
        finally:
            server.stop()
            model.stop()
    assert answers[0] == answers[1] and all(answers[0][0]) and answers[0][1]


def _stream(url: str, out: dict) -> None:
    try:
        stream = client_for(url).completions.create(model="m", prompt="w7 w8", max_tokens=400, temperature=0,
                                                    stream=True, extra_body={"ignore_eos": True})
        out["text"] = "".join(chunk.choices[0].text for chunk in stream)
    except openai.APIError as err:
        out["error"] = err


def client_for(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)


def _streams_then(server: LiveServer, fault, bound_s: float) -> List[dict]:
    """Two long streams running together, `fault()`, then each stream's outcome (all ended within bound_s)."""
    results = [{}, {}]
    streams = [threading.Thread(target=_stream, args=(server.url, out)) for out in results]
    for thread in streams:
        thread.start()
    wait_running(server, 2)
    fault_at = time.monotonic()
    fault()
    for thread in streams:
        thread.join(timeout=bound_s + 5)
    assert not any(thread.is_alive() for thread in streams), "a stream hung"
    assert time.monotonic() - fault_at < bound_s
    assert all("error" in out for out in results), "a stream ended without an error"
    return results


def _assert_unhealthy(server: LiveServer) -> None:
    health = httpx.get(server.url + "/health", timeout=5)
    assert health.status_code == 503
    again = httpx.post(server.url + "/v1/completions", json={"prompt": "w5", "max_tokens": 2}, timeout=5)
    assert again.status_code == 503 and again.json()["error"]["type"] == "service_unavailable"
    assert metrics(server)["maga:engine_core_healthy"] == 0.0


def test_killing_a_rank_mid_stream_fails_everything_and_reports_unhealthy(checkpoint):
    model, server = serve(checkpoint, 2)
    try:
        core_pid = model.engine.pid
        (worker_pid,) = children(core_pid)
        results = _streams_then(server, lambda: os.kill(worker_pid, signal.SIGKILL), FAILURE_BOUND_S)
        for out in results:
            assert "tensor-parallel rank 1" in str(out["error"]) and "SIGKILL" in str(out["error"])
        _assert_unhealthy(server)
        deadline = time.monotonic() + 10
        while alive(core_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(core_pid), "the engine core outlived its group"
    finally:
        server.stop()
        model.stop()


def test_a_hung_rank_fails_everything_within_the_collective_timeout(checkpoint):
    """A rank that stops answering (SIGSTOP) without exiting: TP_COLLECTIVE_TIMEOUT_S bounds the wait."""
    model, server = serve(checkpoint, 2, collective_timeout_s=3.0)
    (worker_pid,) = children(model.engine.pid)
    try:
        results = _streams_then(server, lambda: os.kill(worker_pid, signal.SIGSTOP), 3.0 + FAILURE_BOUND_S)
        for out in results:
            assert "tensor-parallel group failed" in str(out["error"]), out["error"]
        _assert_unhealthy(server)
    finally:
        os.kill(worker_pid, signal.SIGKILL)
        server.stop()
        model.stop()


def test_a_rank_hung_between_steps_fails_the_next_request_within_the_timeout(checkpoint):
    """SIGSTOP while the group is idle: rank 0's next message (a heartbeat or a step) would wait
    for a receive the stopped rank never posts; TP_COLLECTIVE_TIMEOUT_S bounds that send too."""
    model, server = serve(checkpoint, 2, collective_timeout_s=3.0)
    (worker_pid,) = children(model.engine.pid)
    try:
        os.kill(worker_pid, signal.SIGSTOP)
        sent_at = time.monotonic()
        response = httpx.post(server.url + "/v1/completions", json={"prompt": "w5 w6", "max_tokens": 4}, timeout=60)
        assert time.monotonic() - sent_at < 3.0 + FAILURE_BOUND_S
        assert response.status_code in (500, 503), response.text
        assert "tensor-parallel group failed" in response.text, response.text
        _assert_unhealthy(server)
    finally:
        os.kill(worker_pid, signal.SIGKILL)
        server.stop()
        model.stop()
