"""The server against an unfriendly client, over a real uvicorn server on the embedded SmolLM2: bodies
nested too deep or too large, NaN literals, batches that must count against CONCURRENCY_LIMIT,
OpenAI content parts, and tool calling / structured output refused rather than silently ignored.

Each refusal is checked exactly (status and error fields), and the keep-alive connection that
carried it must still serve the next request: httpx.Client reuses one connection, and the client
port of each response tells whether it was the same one."""
from __future__ import annotations

import contextlib
import json
import time
from typing import Any, Dict, Iterator

import httpx
import openai
import pytest
from hypothesis import given, settings, strategies as st

from maga_transformer.server.body_limits import MAX_BODY_BYTES, MAX_JSON_DEPTH, json_body_problem
from maga_transformer.test.server.live_server import LiveServer, wait_idle

QUESTION = "What is the capital of France? Answer briefly."
HI = {"prompt": "hi", "generate_config": {"max_new_tokens": 2, "top_k": 1}}
JSON = {"content-type": "application/json"}


def local_port(response: httpx.Response) -> int:
    """The client-side port of the connection that carried `response`."""
    return response.extensions["network_stream"].get_extra_info("client_addr")[1]


def native_error(code: int, message: str) -> Dict[str, Any]:
    return {"error_code": code, "message": message}


def openai_error(message: str, code: int, param: Any = "body", err_type: str = "invalid_request_error"):
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


def nested_list(depth: int) -> str:
    return "[" * depth + "]" * depth


def nested_object(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


@pytest.fixture
def conn(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def assert_connection_still_serves(conn: httpx.Client, port: int) -> None:
    """The next request on the same keep-alive connection works: a real generation, same client port."""
    after = conn.post("/", json=HI)
    assert after.status_code == 200 and after.json()["finished"]
    assert local_port(after) == port, "the server closed the keep-alive connection"


# ---- 1. nesting depth and body size -------------------------------------------------------------

DEEP_BODIES = [
    ("[" * 100000, 100000),
    (nested_object(10000), 10000),
    ('{"prompt": "hi", "generate_config": {"stop_words_list": ' + nested_list(5000) + "}}", 5002),
    ('{"messages": [{"role": "user", "content": ' + nested_list(3000) + "}]}", 3003),
]


@pytest.mark.parametrize("path", ["/", "/v1/chat/completions", "/v1/completions", "/tokenizer/encode"])
@pytest.mark.parametrize("body,depth", DEEP_BODIES, ids=["list", "object", "in-a-field", "in-content"])
def test_deep_nesting_is_a_400_naming_the_body_and_keeps_the_connection(conn, path, body, depth):
    message = f"body: JSON nested {depth} levels deep, more than the {MAX_JSON_DEPTH} allowed"
    resp = conn.post(path, content=body, headers=JSON)
    assert resp.status_code == 400
    if path.startswith("/v1/"):
        assert resp.json() == openai_error(message, 400)
    else:
        assert resp.json() == native_error(507, message)
    assert_connection_still_serves(conn, local_port(resp))


def test_depth_limit_is_exact(conn):
    at_limit = conn.post("/", content=nested_list(MAX_JSON_DEPTH), headers=JSON)
    assert at_limit.status_code == 400  # parsed: it is just not an object
    assert at_limit.json() == native_error(507, "request body must be a JSON object")
    over = conn.post("/", content=nested_list(MAX_JSON_DEPTH + 1), headers=JSON)
    assert over.json() == native_error(
        507, f"body: JSON nested {MAX_JSON_DEPTH + 1} levels deep, more than the {MAX_JSON_DEPTH} allowed")
    # brackets inside strings are text, not nesting: a prompt full of them is served
    text = conn.post("/", json={"prompt": "[{" * 200 + " what is this?", "generate_config": {"max_new_tokens": 2}})
    assert text.status_code == 200 and text.json()["finished"]


@pytest.mark.parametrize("path", ["/", "/v1/chat/completions"])
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_oversized_body_is_a_413_and_keeps_the_connection(conn, path, chunked):
    payload = b" " * (MAX_BODY_BYTES + 1)
    content = (payload[i:i + (1 << 20)] for i in range(0, len(payload), 1 << 20)) if chunked else payload
    resp = conn.post(path, content=content, headers=JSON)
    assert resp.status_code == 413
    message = f"body: larger than the {MAX_BODY_BYTES} bytes allowed"
    assert resp.json() == (openai_error(message, 413) if path.startswith("/v1/") else native_error(507, message))
    assert_connection_still_serves(conn, local_port(resp))


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_literals_are_refused(conn, literal):
    message = "body: not valid JSON (NaN and Infinity are not JSON numbers)"
    native = conn.post("/", content='{"prompt": "hi", "generate_config": {"temperature": %s}}' % literal,
                       headers=JSON)
    assert native.status_code == 400 and native.json() == native_error(507, message)
    chat = conn.post("/v1/chat/completions", headers=JSON,
                     content='{"messages": [{"role": "user", "content": "hi", "x": %s}]}' % literal)
    assert chat.status_code == 400 and chat.json() == openai_error(message, 400)
    # the same words inside strings are text
    quoted = conn.post("/", json={"prompt": f"is {literal} a number?", "generate_config": {"max_new_tokens": 2}})
    assert quoted.status_code == 200
    assert_connection_still_serves(conn, local_port(chat))


def test_unparsable_bodies_on_openai_routes_get_openai_errors(conn):
    truncated = conn.post("/v1/chat/completions", content=b'{"messages": [', headers=JSON)
    assert truncated.status_code == 400
    assert truncated.json() == openai_error("body: not valid JSON (Expecting value at offset 14)", 400)
    not_utf8 = conn.post("/v1/completions", content=b'{"prompt": "\xff\xfe"}', headers=JSON)
    assert not_utf8.status_code == 400
    assert not_utf8.json() == openai_error("body: not valid JSON (There was an error parsing the body)", 400)
    native = conn.post("/", content=b'{"prompt": "\xff\xfe"}', headers=JSON)
    assert native.status_code == 400 and native.json() == native_error(507, "body: not valid JSON")
    unknown = conn.get("/v1/no-such-route")
    assert unknown.status_code == 404 and unknown.json() == openai_error("Not Found", 404, param=None)
    assert_connection_still_serves(conn, local_port(unknown))


@settings(max_examples=300, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(st.sampled_from('[]{}"\\aN/ ')),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
                    max_leaves=30),
       st.integers(0, 6))
def test_depth_check_agrees_with_the_parser(value, limit):
    """The pre-parse scan sees exactly the nesting json.loads would see, whatever the strings hold."""
    def depth(v) -> int:
        children = v if isinstance(v, list) else list(v.values()) if isinstance(v, dict) else None
        return 0 if children is None else 1 + max(map(depth, children), default=0)

    body = json.dumps(value).encode()
    problem = json_body_problem(body, limit)
    if depth(value) > limit:
        assert problem == f"body: JSON nested {depth(value)} levels deep, more than the {limit} allowed"
    else:
        assert problem is None


# ---- 2. batches count against CONCURRENCY_LIMIT -----------------------------------------------

LIMIT = 4


@pytest.fixture(scope="module")
def small_server(model):
    s = LiveServer(model, concurrency_limit=LIMIT)
    yield s
    s.stop()


def in_use(server: LiveServer) -> int:
    return httpx.get(server.url + "/worker_status", timeout=10).json()["concurrency"]["in_use"]


@contextlib.contextmanager
def one_slot_held(server: LiveServer) -> Iterator[None]:
    """A long streamed request that has started (one slot taken) while the block runs; leaving the
    block closes the stream, which aborts the request."""
    with httpx.stream("POST", server.url, timeout=60, json={
            "prompt": "Tell me a long story.", "yield_generator": True,
            "generate_config": {"max_new_tokens": 2000, "ignore_eos": True}}) as response:
        assert response.status_code == 200
        lines = response.iter_lines()  # kept referenced: a dropped iterator closes the response
        assert next(lines).startswith("data:")  # the first event: the request runs
        yield


def test_native_batch_takes_one_slot_per_prompt(small_server):
    def batch(size: int, **config) -> httpx.Response:
        return httpx.post(small_server.url, timeout=120, json={
            "prompt_batch": ["1 2 3"] * size, "generate_config": {"max_new_tokens": 2, "top_k": 1, **config}})

    full = batch(LIMIT)  # exactly the limit fits
    assert full.status_code == 200 and len(full.json()["response_batch"]) == LIMIT
    assert in_use(small_server) == 0  # every slot came back
    with one_slot_held(small_server):
        assert in_use(small_server) == 1
        over = batch(LIMIT)
        assert over.status_code == 409
        assert over.json() == native_error(
            513, f"over CONCURRENCY_LIMIT={LIMIT}: {LIMIT} prompt(s) x 1 sequence(s) need {LIMIT} slots, 3 free")
        sequences = batch(2, num_return_sequences=2)  # 2 prompts x 2 sequences = 4 > 3 free
        assert sequences.status_code == 409 and sequences.json()["error_code"] == 513
        fits = batch(LIMIT - 1)
        assert fits.status_code == 200 and len(fits.json()["response_batch"]) == LIMIT - 1
        assert in_use(small_server) == 1  # the batch released exactly what it took
    assert wait_idle(small_server)["vllm:kv_cache_usage_perc"] == 0.0
    assert in_use(small_server) == 0


def test_batch_larger_than_the_limit_is_refused_at_once(small_server):
    started = time.monotonic()
    resp = httpx.post(small_server.url, timeout=60, json={"prompt_batch": ["tell me a story"] * 5000,
                                                          "generate_config": {"max_new_tokens": 500}})
    assert resp.status_code == 409
    assert resp.json() == native_error(513, f"prompt_batch: 5000 prompt(s) x 1 sequence(s) need 5000 slots, more "
                                            f"than CONCURRENCY_LIMIT={LIMIT} allows; send smaller batches")
    assert time.monotonic() - started < 5  # refused before tokenizing 5,000 prompts, nothing generated
    assert in_use(small_server) == 0
    assert wait_idle(small_server)["vllm:num_requests_running"] == 0


def test_openai_completions_count_prompts_times_n(small_server):
    client = openai.OpenAI(base_url=small_server.url + "/v1", api_key="unused", max_retries=0)
    with one_slot_held(small_server):
        with pytest.raises(openai.RateLimitError) as err:
            client.completions.create(model="smollm2", prompt=["One, two,", "A, B,"], n=2, max_tokens=2)
        assert err.value.status_code == 429 and err.value.type == "rate_limit_error"
        assert err.value.body["message"] == (f"over the concurrency limit ({LIMIT}): 2 prompt(s) x n=2 need 4 slots, "
                                             f"3 free")
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi"}], n=LIMIT,
                                           max_tokens=2)
        ok = client.completions.create(model="smollm2", prompt=["One, two,", "A, B,", "X"], max_tokens=2)
        assert len(ok.choices) == 3
        with pytest.raises(openai.RateLimitError) as err:
            client.completions.create(model="smollm2", prompt=["x"] * 10000, max_tokens=2)
        assert "10000 prompt(s) x n=1 need 10000 slots" in err.value.body["message"]
        assert in_use(small_server) == 1
    assert wait_idle(small_server)["vllm:kv_cache_usage_perc"] == 0.0
    assert in_use(small_server) == 0


# ---- 3. content parts ---------------------------------------------------------------------------

def test_text_parts_are_joined_like_a_string(client, model):
    parts = [{"type": "text", "text": "What is the capital of France?"}, {"type": "text", "text": "Answer briefly."}]
    joined = "What is the capital of France?\nAnswer briefly."
    from_parts = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": parts}],
                                                temperature=0, max_tokens=12)
    from_string = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": joined}],
                                                 temperature=0, max_tokens=12)
    assert from_parts.choices[0].message.content == from_string.choices[0].message.content
    assert "Paris" in from_parts.choices[0].message.content
    expected = model.tokenizer.apply_chat_template([{"role": "user", "content": joined}], tokenize=True,
                                                   add_generation_prompt=True, return_dict=False)
    assert from_parts.usage.prompt_tokens == len(expected)
    streamed = client.chat.completions.create(
        model="smollm2", temperature=0, max_tokens=12, stream=True,
        messages=[{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                  {"role": "user", "content": parts}])
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)


@pytest.mark.parametrize("part,kind", [
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}, "image_url"),
    ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}, "input_audio"),
    ({"type": "video", "video": "x"}, "video"),
    ({"text": "no type"}, None),
])
def test_non_text_parts_are_refused_naming_the_message(client, part, kind):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "What is this?"}, part]}]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="smollm2", messages=messages, max_tokens=2)
    assert err.value.status_code == 400 and err.value.param == "messages[1].content"
    if kind is None:
        expected = "messages[1].content[1]: a part needs a 'type' (only 'text' parts are accepted)"
    else:
        expected = (f"messages[1].content[1]: a part of type {kind!r} is not supported: this model is not "
                    f"multimodal (only 'text' parts are accepted)")
    assert err.value.body["message"] == expected


def test_text_part_without_text_is_refused(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="smollm2", max_tokens=2,
                                       messages=[{"role": "user", "content": [{"type": "text", "text": 5}]}])
    assert err.value.param == "messages[0].content"
    assert err.value.body["message"] == "messages[0].content[0].text: expected a string"


# ---- 4. tools and structured output are refused -------------------------------------------------

WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
NO_TOOLS = "tool calling is not supported yet (nothing would parse or enforce tool calls)"
NO_SCHEMA = "structured output is not supported yet (nothing would enforce it)"


@pytest.mark.parametrize("kwargs,param,message", [
    ({"tools": [WEATHER_TOOL]}, "tools", f"tools: {NO_TOOLS}"),
    ({"tools": [WEATHER_TOOL], "tool_choice": "none"}, "tools", f"tools: {NO_TOOLS}"),
    ({"tool_choice": "auto"}, "tool_choice", f'tool_choice: {NO_TOOLS}; only "none" is accepted'),
    ({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tool_choice",
     f'tool_choice: {NO_TOOLS}; only "none" is accepted'),
    ({"extra_body": {"functions": [WEATHER_TOOL["function"]]}}, "functions", f"functions: {NO_TOOLS}"),
    ({"extra_body": {"function_call": "auto"}}, "function_call", f'function_call: {NO_TOOLS}; only "none" is accepted'),
    ({"response_format": {"type": "json_object"}}, "response_format",
     f'response_format: json_object: {NO_SCHEMA}; only {{"type": "text"}} is accepted'),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "city", "schema": {"type": "object"}}}},
     "response_format", f'response_format: json_schema: {NO_SCHEMA}; only {{"type": "text"}} is accepted'),
    ({"extra_body": {"guided_json": {"type": "object"}}}, "guided_json", f"guided_json: {NO_SCHEMA}"),
])
def test_tools_and_structured_output_are_refused(client, kwargs, param, message):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": QUESTION}],
                                       max_tokens=2, **kwargs)
    assert err.value.status_code == 400 and err.value.param == param and err.value.body["message"] == message


@pytest.mark.parametrize("kwargs", [{"tools": [], "tool_choice": "none"}, {"response_format": {"type": "text"}}])
def test_harmless_values_of_those_fields_are_served(client, kwargs):
    out = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": QUESTION}],
                                         temperature=0, max_tokens=8, **kwargs)
    assert "Paris" in out.choices[0].message.content


def test_completions_refuse_structured_output_too(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=2,
                                  extra_body={"response_format": {"type": "json_object"}})
    assert err.value.param == "response_format"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=2,
                                  extra_body={"guided_regex": "[a-z]+"})
    assert err.value.param == "guided_regex"
