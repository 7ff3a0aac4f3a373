"""A server whose engine core process dies mid-stream: every request in flight ends at once with an
error naming the cause (native and OpenAI, streamed or not), /health and new requests answer 503,
and /metrics says so. The oracle is the contract itself: each status and error body is exact."""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest

from maga_transformer.config import EngineConfig
from maga_transformer.model_factory import ModelFactory
from maga_transformer.test.fixtures import tiny_llama
from maga_transformer.test.server.live_server import LiveServer, metrics, wait_running

LONG = {"max_new_tokens": 400, "top_k": 1, "ignore_eos": True}


@pytest.fixture()
def doomed(tmp_path):
    _, directory = tiny_llama(str(tmp_path), seed=8, vocab_size=64, max_position_embeddings=512)
    model = ModelFactory.from_huggingface(directory, engine_config=EngineConfig(num_kv_blocks=512))
    server = LiveServer(model, concurrency_limit=8)
    yield model, server
    server.stop()
    model.stop()


def _native_stream(url: str, out: dict) -> None:
    with httpx.stream("POST", url, json={"prompt": "w5 w6", "generate_config": LONG, "yield_generator": True},
                      timeout=30) as resp:
        out["events"] = [line[len("data:"):] for line in resp.iter_lines() if line.startswith("data:")]


def _openai_stream(url: str, out: dict) -> None:
    body = {"prompt": "w7 w8", "max_tokens": 400, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as resp:
        out["events"] = [line[len("data: "):] for line in resp.iter_lines() if line.startswith("data: ")]


def _native_plain(url: str, out: dict) -> None:
    resp = httpx.post(url, json={"prompt": "w9 w10", "generate_config": LONG}, timeout=30)
    out["status"], out["body"] = resp.status_code, resp.json()


def test_core_killed_mid_stream_fails_everything_at_once(doomed):
    model, server = doomed
    results = [{}, {}, {}]
    workers = [threading.Thread(target=fn, args=(server.url, out))
               for fn, out in zip((_native_stream, _openai_stream, _native_plain), results)]
    for worker in workers:
        worker.start()
    wait_running(server, 3)
    killed_at = time.monotonic()
    os.kill(model.engine.pid, signal.SIGKILL)
    for worker in workers:
        worker.join(timeout=10)
    assert time.monotonic() - killed_at < 5.0 and not any(w.is_alive() for w in workers)

    native, openai_events, plain = results
    assert native["events"][-1] == "[done]"
    error = json.loads(native["events"][-2])
    assert error["error_code"] == 514 and "engine core failed" in error["message"] and "SIGKILL" in error["message"]
    assert openai_events["events"][-1] == "[DONE]"
    failure = json.loads(openai_events["events"][-2])["error"]
    assert failure["code"] == 503 and failure["type"] == "service_unavailable" and "SIGKILL" in failure["message"]
    assert plain["status"] == 503 and plain["body"]["error_code"] == 514 and "SIGKILL" in plain["body"]["message"]

    health = httpx.get(server.url + "/health", timeout=5)
    assert health.status_code == 503 and "engine core is not running" in health.text
    again = httpx.post(server.url, json={"prompt": "w5", "generate_config": {"max_new_tokens": 2}}, timeout=5)
    assert again.status_code == 503 and "engine core is not running" in again.json()["message"]
    openai_again = httpx.post(server.url + "/v1/completions", json={"prompt": "w5", "max_tokens": 2}, timeout=5)
    assert openai_again.status_code == 503 and openai_again.json()["error"]["type"] == "service_unavailable"
    assert metrics(server)["maga:engine_core_healthy"] == 0.0
