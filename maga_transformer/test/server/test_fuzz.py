"""Fuzzing every route from the server's own OpenAPI schema (schemathesis), then the shapes a schema
never generates (hypothesis and parametrized cases): nesting depth, huge arrays, extreme numbers and
NaN literals, batch sizes, message content shapes. Each over the real server: no 5xx, the server is
healthy, the same keep-alive connection keeps serving, and no request or KV block stays held.
A tiny random model keeps each request cheap."""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterator, Union

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings, strategies as st

from maga_transformer.config import EngineConfig, ModelConfig
from maga_transformer.model_factory import ModelFactory
from maga_transformer.server.body_limits import MAX_JSON_DEPTH
from maga_transformer.test.fixtures import tiny_llama
from maga_transformer.test.server.live_server import LiveServer, wait_idle

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


# ---- shapes the schema never generates ------------------------------------------------------------

LIMIT = 8  # the fuzz server's CONCURRENCY_LIMIT
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
ROUTES = ["/", CHAT, COMPLETIONS]
BASE: Dict[str, Dict[str, Any]] = {  # a valid, cheap request per route
    "/": {"prompt": "w5 w6", "generate_config": {"max_new_tokens": 2}},
    CHAT: {"messages": [{"role": "user", "content": "w5 w6"}], "max_tokens": 2},
    COMPLETIONS: {"prompt": "w5 w6", "max_tokens": 2},
}
NON_FINITE = "body: not valid JSON (NaN and Infinity are not JSON numbers)"


@pytest.fixture(scope="module")
def conn(fuzz_server) -> Iterator[httpx.Client]:
    """One keep-alive connection for every hand-made case: a case that made the server drop it fails."""
    server, _ = fuzz_server
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def local_port(response: httpx.Response) -> int:
    return response.extensions["network_stream"].get_extra_info("client_addr")[1]


def send(conn: httpx.Client, path: str, body: Union[str, bytes, Dict[str, Any]]) -> httpx.Response:
    """POST a body as given: text is sent verbatim, so NaN literals and 400-digit numbers stay in it."""
    content = json.dumps(body) if isinstance(body, dict) else body
    return conn.post(path, content=content, headers={"content-type": "application/json"})


def assert_survived(server: LiveServer, conn: httpx.Client, response: httpx.Response) -> None:
    """No 5xx; afterwards the same connection serves, nothing runs, no slot or KV block is held."""
    assert response.status_code < 500, response.text[:300]
    health = conn.get("/health")
    assert health.text == "ok" and local_port(health) == local_port(response), "keep-alive connection dropped"
    state = wait_idle(server)
    assert state["vllm:num_requests_running"] == 0 and state["vllm:kv_cache_usage_perc"] == 0.0
    assert conn.get("/worker_status").json()["concurrency"]["in_use"] == 0


def error_message(path: str, response: httpx.Response) -> str:
    body = response.json()
    return body["error"]["message"] if path.startswith("/v1/") else body["message"]


def with_value(path: str, field: str, placeholder: str = "__VALUE__") -> str:
    """The route's base request as JSON text with `field` set to a placeholder string."""
    body = json.loads(json.dumps(BASE[path]))
    target = body["generate_config"] if path == "/" else body
    target[field] = placeholder
    return json.dumps(body)


def nested(depth: int, shape: str) -> str:
    return "[" * depth + "]" * depth if shape == "list" else '{"a":' * depth + "1" + "}" * depth


@pytest.mark.parametrize("depth", [1, 2, MAX_JSON_DEPTH - 1, MAX_JSON_DEPTH, MAX_JSON_DEPTH + 1, 1000, 100000])
@pytest.mark.parametrize("path", ROUTES)
@pytest.mark.parametrize("where", ["whole-body-list", "whole-body-object", "in-a-field"])
def test_nesting_depth(fuzz_server, conn, depth, path, where):
    server, _ = fuzz_server
    if where == "in-a-field":  # the nested value where a real field is, inside the body (and generate_config)
        field = {"/": "stop_words_list", CHAT: "stop", COMPLETIONS: "prompt"}[path]
        body = with_value(path, field).replace('"__VALUE__"', nested(depth, "list"))
        total = depth + (2 if path == "/" else 1)
    else:
        body, total = nested(depth, where.rsplit("-", 1)[1]), depth
    response = send(conn, path, body)
    if total > MAX_JSON_DEPTH:
        assert response.status_code == 400
        assert error_message(path, response) == (f"body: JSON nested {total} levels deep, more than the "
                                                 f"{MAX_JSON_DEPTH} allowed")
    else:
        assert response.status_code in (200, 400)
    assert_survived(server, conn, response)


HUGE = 10000
HUGE_ARRAYS = [  # (route, body, status): bodies of 10k-item arrays
    ("/", {"prompt_batch": ["w5"] * HUGE}, 409),
    ("/", {"prompt_batch": [""] * HUGE}, 400),  # the prompts' shape is checked first: error 510
    ("/", {"prompt": "w5", "generate_config": {"max_new_tokens": 2,
                                               "stop_words_str": ["w%d" % i for i in range(HUGE)]}}, 200),
    ("/", {"prompt": "w5", "generate_config": {"max_new_tokens": 2, "stop_words_list": [[5, 6]] * HUGE}}, 200),
    ("/", {"prompt": "w5", "generate_config": {"max_new_tokens": 2,
                                               "bad_words_list": [[i % 64] for i in range(HUGE)]}}, 200),
    (CHAT, {"messages": [{"role": "user", "content": "w5"}] * HUGE, "max_tokens": 2}, 400),  # prompt too long
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": "w5"}] * HUGE}], "max_tokens": 2}, 400),
    (CHAT, {"messages": [{"role": "user", "content": "w5"}], "max_tokens": 2, "stop": ["w%d" % i for i in range(HUGE)]},
     200),
    (COMPLETIONS, {"prompt": ["w5"] * HUGE, "max_tokens": 2}, 429),
    (COMPLETIONS, {"prompt": "w5", "max_tokens": 2, "stop": ["x"] * HUGE}, 200),
]


@pytest.mark.parametrize("path,body,status", HUGE_ARRAYS)
def test_huge_arrays(fuzz_server, conn, path, body, status):
    server, _ = fuzz_server
    response = send(conn, path, body)
    assert response.status_code == status, response.text[:300]
    assert_survived(server, conn, response)


NUMBERS = ["0", "1", "2", "-1", "0.5", "1e308", "-1e308", "1e-308", "1e999", "-1e999", str(2 ** 31), str(2 ** 63),
           str(-2 ** 63), str(2 ** 64), "1" + "0" * 400, "NaN", "Infinity", "-Infinity"]
NUMERIC_FIELDS = {
    "/": ["max_new_tokens", "min_new_tokens", "top_k", "top_p", "temperature", "repetition_penalty", "presence_penalty",
          "frequency_penalty", "num_beams", "num_return_sequences", "length_penalty", "random_seed", "top_logprobs",
          "calculate_loss", "eos_token_id"],  # not timeout_ms: a deadline the request then misses is a 500 today
    CHAT: ["max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "seed", "presence_penalty",
           "frequency_penalty", "min_tokens", "top_logprobs"],
    COMPLETIONS: ["max_tokens", "temperature", "top_p", "n", "seed", "presence_penalty", "frequency_penalty",
                  "min_tokens", "logprobs"],
}
# the GenerateConfig name an OpenAI field's error may carry instead of its own
CONFIG_NAMES = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens", "n": "num_return_sequences",
                "seed": "random_seed", "min_tokens": "min_new_tokens"}


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_extreme_numbers(fuzz_server, conn, data):
    server, _ = fuzz_server
    path = data.draw(st.sampled_from(ROUTES), label="route")
    field = data.draw(st.sampled_from(NUMERIC_FIELDS[path]), label="field")
    literal = data.draw(st.sampled_from(NUMBERS), label="literal")
    response = send(conn, path, with_value(path, field).replace('"__VALUE__"', literal))
    if literal.lstrip("-") in ("NaN", "Infinity"):
        assert response.status_code == 400 and error_message(path, response) == NON_FINITE
    elif response.status_code == 400:  # refused: the message names the field
        message = error_message(path, response)
        assert field in message or CONFIG_NAMES.get(field, field) in message, message
    else:
        assert response.status_code == 200, response.text[:300]
    assert_survived(server, conn, response)


@pytest.mark.parametrize("config,field", [
    ('{"num_beams": 2, "length_penalty": -1e308}', "length_penalty"),  # len ** -1e308 == 0: a division by zero
    ('{"num_beams": 2, "length_penalty": 1e999}', "length_penalty"),
    ('{"temperature": 1e999}', "temperature"),  # reads as inf
    ('{"top_p": -1e999}', "top_p"),
    ('{"bad_words_list": [[%d]]}' % 2 ** 63, "bad_words_list"),  # no int64 tensor holds it
    ('{"stop_words_list": [[%d]]}' % 2 ** 64, "stop_words_list"),
    ('{"eos_token_id": %d}' % 2 ** 64, "eos_token_id"),
    ('{"length_penalty": 1%s}' % ("0" * 400), "length_penalty"),  # float() overflowed: an unhandled 500
])
def test_out_of_range_numbers_are_refused_up_front(fuzz_server, conn, config, field):
    """Values that were a 500 (the engine failing, or float() overflowing) or silently taken as
    infinite / beyond any token id: refused before the engine sees them, naming the field."""
    server, _ = fuzz_server
    response = send(conn, "/", '{"prompt": "w5", "generate_config": %s}' % config)
    assert response.status_code == 400 and response.json()["error_code"] in (512, 516)
    assert response.json()["message"].startswith(field + ":")
    assert_survived(server, conn, response)


@pytest.mark.parametrize("size", [1, LIMIT - 1, LIMIT, LIMIT + 1, 5000])
@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("path", ["/", COMPLETIONS])
def test_batch_sizes(fuzz_server, conn, path, size, n):
    """Each prompt x n takes a slot: up to the limit a batch is served whole, past it refused whole."""
    server, _ = fuzz_server
    if path == "/":
        body = {"prompt_batch": ["w5 w6"] * size, "generate_config": {"max_new_tokens": 2, "num_return_sequences": n}}
    else:
        body = {"prompt": ["w5 w6"] * size, "max_tokens": 2, "n": n}
    response = send(conn, path, body)
    if size * n > LIMIT:
        assert response.status_code == (409 if path == "/" else 429)
        assert f"need {size * n} slots" in error_message(path, response)
    else:
        assert response.status_code == 200
        served = response.json()["response_batch"] if path == "/" else response.json()["choices"]
        assert len(served) == (size if path == "/" else size * n)
    assert_survived(server, conn, response)


TEXT = {"type": "text", "text": "w5"}
CONTENT_SHAPES = [  # (content, status, param of the 400)
    ("w5 w6", 200, None), ("", 200, None), (None, 200, None), ([], 200, None), ([TEXT], 200, None),
    ([TEXT, {"type": "text", "text": "w6"}], 200, None), ([dict(TEXT, extra=1)], 200, None),
    (5, 400, "messages"), (5.5, 400, "messages"), (True, 400, "messages"), (TEXT, 400, "messages"),
    (["w5"], 400, "messages"), ([None], 400, "messages"), ([5], 400, "messages"), ([[["w5"]]], 400, "messages"),
    ([{"type": "image_url", "image_url": {"url": "data:,"}}], 400, "messages[0].content"),
    ([TEXT, {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}], 400, "messages[0].content"),
    ([{"type": "text"}], 400, "messages[0].content"), ([{"type": "text", "text": None}], 400, "messages[0].content"),
    ([{"type": 5, "text": "w5"}], 400, "messages[0].content"), ([{"text": "w5"}], 400, "messages[0].content"),
]


@pytest.mark.parametrize("content,status,param", CONTENT_SHAPES)
def test_content_shapes(fuzz_server, conn, content, status, param):
    server, _ = fuzz_server
    response = send(conn, CHAT, {"messages": [{"role": "user", "content": content}], "max_tokens": 2})
    assert response.status_code == status, response.text[:300]
    if status == 400:
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"].startswith(param), error
        if param == "messages[0].content":  # ours, not pydantic's: exactly the content
            assert error["param"] == param
    assert_survived(server, conn, response)
