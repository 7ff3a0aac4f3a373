"""Fixtures of the server tests: the embedded SmolLM2 behind a real uvicorn server on loopback, and
the official openai client pointed at it (one model and server per test module)."""
from __future__ import annotations

import openai
import pytest

from maga_transformer.config import EngineConfig
from maga_transformer.model_factory import ModelFactory
from maga_transformer.test.server.live_server import LiveServer


@pytest.fixture(scope="module")
def model(smollm2_dir):
    m = ModelFactory.from_huggingface(smollm2_dir, engine_config=EngineConfig(kv_cache_mem_mb=256))
    yield m
    m.stop()


@pytest.fixture(scope="module")
def server(model):
    s = LiveServer(model, concurrency_limit=32)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
