"""Fuzzing every route from the server's own OpenAPI schema (schemathesis): no 5xx, and the server
is healthy and leak-free afterwards. A tiny random model keeps each generated request cheap."""
from __future__ import annotations

import json
import os

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from maga_transformer.config import EngineConfig, ModelConfig
from maga_transformer.model_factory import ModelFactory
from maga_transformer.test.fixtures import tiny_llama
from maga_transformer.test.server.live_server import LiveServer

TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    _, directory = tiny_llama(str(tmp_path_factory.mktemp("fuzz")), seed=5, vocab_size=64,
                              max_position_embeddings=64)
    config_path = os.path.join(directory, "tokenizer_config.json")
    with open(config_path) as f:
        tokenizer_config = json.load(f)
    tokenizer_config["chat_template"] = TEMPLATE
    with open(config_path, "w") as f:
        json.dump(tokenizer_config, f)
    model = ModelFactory.from_huggingface(directory, ModelConfig(seq_size_per_block=4),
                                          engine_config=EngineConfig(num_kv_blocks=256))
    server = LiveServer(model, concurrency_limit=8)
    yield server, model
    server.stop()
    model.stop()


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    server, _ = fuzz_server
    return schemathesis.openapi.from_url(server.url + "/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case, fuzz_server):
    response = case.call(timeout=30)
    assert response.status_code < 500, (case.method, case.path, case.body, response.text[:300])


def test_healthy_and_leak_free_after_fuzzing(fuzz_server):
    server, model = fuzz_server
    assert httpx.get(server.url + "/health", timeout=10).text == "ok"
    body = httpx.post(server.url, json={"prompt": "w5 w6", "generate_config": {"max_new_tokens": 3, "top_k": 1}},
                      timeout=30).json()
    assert body["finished"]
    assert model.engine.num_running == 0 and model.engine.pool.usage == 0.0
