"""A real uvicorn server on loopback over the embedded SmolLM2, driven by the official openai client
and by plain HTTP for rtp-llm's native API."""
from __future__ import annotations

import concurrent.futures
import json
import socket
import time

import httpx
import openai
import pytest

from maga_transformer.config import GenerateConfig
from maga_transformer.test.server.live_server import LiveServer, metrics, wait_idle

QUESTION = "What is the capital of France? Answer briefly."


def test_chat_plain_and_streaming_agree(client):
    messages = [{"role": "user", "content": QUESTION}]
    plain = client.chat.completions.create(model="smollm2", messages=messages, temperature=0, max_tokens=20)
    text = plain.choices[0].message.content
    assert "Paris" in text and plain.choices[0].finish_reason in ("stop", "length")
    assert plain.usage.completion_tokens > 0 and plain.usage.total_tokens == (
        plain.usage.prompt_tokens + plain.usage.completion_tokens)
    chunks = list(client.chat.completions.create(model="smollm2", messages=messages, temperature=0, max_tokens=20,
                                                 stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_n_seed_stop_and_logprobs(client):
    messages = [{"role": "user", "content": "Write one sentence about the sea."}]
    first = client.chat.completions.create(model="smollm2", messages=messages, n=2, seed=7, max_tokens=16)
    again = client.chat.completions.create(model="smollm2", messages=messages, n=2, seed=7, max_tokens=16)
    assert len(first.choices) == 2
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    greedy = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": QUESTION}],
                                            temperature=0, max_tokens=20, logprobs=True)
    content = greedy.choices[0].message.content
    stop_word = "Paris"
    stopped = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": QUESTION}],
                                             temperature=0, max_tokens=20, stop=[stop_word])
    assert stopped.choices[0].message.content == content[:content.index(stop_word)]
    assert stopped.choices[0].finish_reason == "stop"
    logprobs = greedy.choices[0].logprobs.content
    assert len(logprobs) == greedy.usage.completion_tokens and all(lp.logprob <= 0 for lp in logprobs)


def test_completions_list_prompt_and_echo(client):
    out = client.completions.create(model="smollm2", prompt=["The capital of France is", "One, two,"],
                                    max_tokens=5, temperature=0, echo=True)
    assert len(out.choices) == 2
    assert out.choices[0].text.startswith("The capital of France is")
    assert out.choices[1].text.startswith("One, two,")


def test_models_and_errors(client, server):
    assert [m.id for m in client.models.list().data] == ["smollm2"]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi"}], top_p=3)
    assert "top_p" in str(err.value)
    resp = httpx.post(server.url + "/v1/chat/completions", content=b"{not json", timeout=10)
    assert resp.status_code == 400 and "error" in resp.json()


def test_native_api_matches_engine_greedy(model, server):
    config = {"max_new_tokens": 12, "top_k": 1}
    prompt = "hello, what is your name"
    ids = model.tokenizer.encode(prompt)
    handle = model.engine.add_request(ids, GenerateConfig(**config))
    expected = handle.result().outputs[0].text
    single = httpx.post(server.url, json={"prompt": prompt, "generate_config": config}, timeout=60).json()
    assert single["response"] == expected and single["finished"]
    assert single["aux_info"]["input_len"] == len(ids) and single["aux_info"]["output_len"] == 12
    batch = httpx.post(server.url, json={"prompt_batch": [prompt, "1 2 3"], "generate_config": config},
                       timeout=60).json()
    assert batch["response_batch"][0]["response"] == expected
    with httpx.stream("POST", server.url, json={"prompt": prompt, "generate_config": config,
                                                "yield_generator": True}, timeout=60) as resp:
        events = [line[len("data:"):] for line in resp.iter_lines() if line.startswith("data:")]
    assert events[-1] == "[done]"
    assert json.loads(events[-2])["response"] == expected


def test_native_loss_logits_and_hidden_states_travel_whole(model, server):
    """What the engine core sends as numpy rows reaches the JSON body as the engine computed it."""
    config = {"max_new_tokens": 3, "top_k": 1, "calculate_loss": 2, "return_logits": True,
              "return_hidden_states": True, "return_output_ids": True}
    prompt = "The quick brown fox"
    expected = model.engine.add_request(model.tokenizer.encode(prompt), GenerateConfig(**config)).result()
    body = httpx.post(server.url, json={"prompt": prompt, "generate_config": config}, timeout=60).json()
    assert body["output_ids"] == expected.outputs[0].token_ids
    assert len(body["logits"]) == model.arch.vocab_size and len(body["hidden_states"]) == model.arch.hidden_size
    assert body["logits"] == pytest.approx(expected.outputs[0].logits.tolist(), abs=1e-4)
    assert body["hidden_states"] == pytest.approx(expected.outputs[0].hidden_states.tolist(), abs=1e-4)
    assert body["loss"] == pytest.approx(expected.loss, abs=1e-4)
    assert len(body["loss"]) == len(model.tokenizer.encode(prompt)) - 1  # per-token NLL of the prompt


@pytest.mark.parametrize("body,code", [
    ({}, 509), ({"prompt": ""}, 510), ({"prompt": "hi", "generate_config": {"top_p": 2}}, 516),
    ({"prompt": "hi", "generate_config": {"bogus": 1}}, 516), ({"prompt": "hi", "surprise": 1}, 507),
    ({"prompt": "hi " * 9000}, 511),
    ({"prompt_batch": ["a", "b"], "yield_generator": True}, 515),
])
def test_native_errors(server, body, code):
    resp = httpx.post(server.url, json=body, timeout=30)
    assert resp.status_code == 400 and resp.json()["error_code"] == code


def test_disconnect_mid_stream_frees_everything(model, server):
    engine = model.engine
    with httpx.stream("POST", server.url, json={"prompt": "Tell me a long story.", "yield_generator": True,
                                                "generate_config": {"max_new_tokens": 500, "ignore_eos": True}},
                      timeout=60) as resp:
        for i, _ in enumerate(resp.iter_lines()):
            if i > 6:
                break  # the client walks away half-way
    state = wait_idle(server)  # as an operator sees it, within one second
    assert state["vllm:num_requests_running"] == 0 and state["vllm:num_requests_waiting"] == 0
    assert state["vllm:kv_cache_usage_perc"] == 0.0
    assert engine.num_running == 0 and engine.pool.usage == 0.0


@pytest.mark.parametrize("path,body", [
    ("/", {"prompt": "Tell me a long story.", "yield_generator": True,
           "generate_config": {"max_new_tokens": 500, "ignore_eos": True}}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Tell me a long story."}],
                              "max_tokens": 500, "ignore_eos": True, "n": 2, "stream": True}),
    ("/v1/completions", {"prompt": ["Once upon a time", "Long ago"], "max_tokens": 500, "ignore_eos": True,
                         "stream": True}),
])
def test_a_stream_dropped_before_its_first_byte_frees_everything(model, server, path, body):
    """Streaming routes send the request to the engine before their response starts: a client that
    closes the connection right after sending must still have it aborted, its KV blocks and its
    concurrency slots freed."""
    payload = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    state = wait_idle(server)
    assert state["vllm:num_requests_running"] == 0 and state["vllm:num_requests_waiting"] == 0
    assert state["vllm:kv_cache_usage_perc"] == 0.0 and model.engine.pool.usage == 0.0
    assert httpx.get(server.url + "/worker_status", timeout=10).json()["concurrency"]["in_use"] == 0


@pytest.mark.parametrize("path,body", [
    ("/", {"prompt": "Tell me a long story.", "generate_config": {"max_new_tokens": 500, "ignore_eos": True}}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Tell me a long story."}],
                              "max_tokens": 500, "ignore_eos": True, "n": 2}),
    ("/v1/completions", {"prompt": ["Once upon a time", "Long ago"], "max_tokens": 500, "ignore_eos": True}),
])
def test_disconnect_without_streaming_frees_everything_behind_api_key(model, path, body):
    """A client that gives up on a plain request (a timeout) aborts it too; the API-key check in front
    of the routes must not hide the disconnect from them."""
    server = LiveServer(model, concurrency_limit=4, api_key="sekret")
    try:
        assert httpx.post(server.url + path, json=body, timeout=10).status_code == 401
        headers = {"Authorization": "Bearer sekret"}
        with pytest.raises(httpx.TimeoutException):
            httpx.post(server.url + path, json=body, headers=headers, timeout=0.5)
        state = wait_idle(server)
        assert state["vllm:num_requests_running"] == 0 and state["vllm:kv_cache_usage_perc"] == 0.0
        assert httpx.get(server.url + "/worker_status", headers=headers, timeout=10).json()["concurrency"][
            "in_use"] == 0
        assert httpx.get(server.url + "/health", timeout=10).text == "ok"  # open without the key
    finally:
        server.stop()


def test_metrics_count_requests_and_tokens(server):
    before = metrics(server)
    body = httpx.post(server.url, json={"prompt": "hi", "generate_config": {"max_new_tokens": 5, "top_k": 1,
                                                                           "ignore_eos": True}}, timeout=60).json()
    after = metrics(server)
    assert after["vllm:generation_tokens_total"] - before.get("vllm:generation_tokens_total", 0) == 5
    assert after["vllm:prompt_tokens_total"] - before.get("vllm:prompt_tokens_total", 0) == body["aux_info"]["input_len"]
    assert after["vllm:time_to_first_token_seconds_count"] > before.get("vllm:time_to_first_token_seconds_count", 0)
    assert "vllm:prefix_cache_hits_total" in after and "vllm:e2e_request_latency_seconds_sum" in after


def test_overload_rejects_exactly_the_surplus(model):
    server = LiveServer(model, concurrency_limit=2)
    try:
        def native(_):
            return httpx.post(server.url, json={"prompt": "Count to fifty.", "generate_config": {
                "max_new_tokens": 48, "ignore_eos": True, "top_k": 1}}, timeout=120).status_code

        def chat(_):
            try:
                openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0).chat.completions.create(
                    model="smollm2", messages=[{"role": "user", "content": "Count to fifty."}], max_tokens=48)
                return 200
            except openai.RateLimitError:
                return 429

        with concurrent.futures.ThreadPoolExecutor(10) as pool:
            codes = list(pool.map(native, range(10)))
        assert sorted(codes) == [200] * 2 + [409] * 8
        with concurrent.futures.ThreadPoolExecutor(10) as pool:
            codes = list(pool.map(chat, range(10)))
        assert sorted(codes) == [200] * 2 + [429] * 8
    finally:
        server.stop()


def test_worker_status_tokenizer_and_update_routes(model, server):
    status = httpx.get(server.url + "/worker_status", timeout=10).json()
    assert status["alive"] and status["concurrency"]["limit"] == 32 and status["max_seq_len"] == model.max_seq_len
    encoded = httpx.post(server.url + "/tokenizer/encode", json={"prompt": "hello world"}, timeout=10).json()
    assert encoded["token_ids"] == model.tokenizer.encode("hello world")
    assert len(encoded["tokens"]) == len(encoded["token_ids"])
    bad = httpx.post(server.url + "/tokenizer/encode", json={"prompt": 3}, timeout=10)
    assert bad.status_code == 400 and "prompt" in bad.json()["message"]
    update = httpx.post(server.url + "/update", json={}, timeout=10)
    # a body that is not rtp-llm's {"peft_info": {"lora_info": ...}} (LoRA updates: test/lora/)
    assert update.status_code == 400 and update.json()["error_code"] == 507 and "peft_info" in update.json()["message"]


def test_concurrent_streams_equal_plain_requests_and_give_back_their_slots(client, server):
    """Many streams at once (their outputs are built only when each stream's task reads them, so a
    busy loop coalesces steps): every streamed text equals the plain request's, and once they and a
    dropped stream are done, no concurrency slot, request or KV block is held."""
    prompts = [f"Count from {i} to {i + 9}:" for i in range(12)]

    def plain(prompt: str) -> str:
        return client.completions.create(model="smollm2", prompt=prompt, temperature=0, max_tokens=24).choices[0].text

    def streamed(prompt: str) -> str:
        chunks = client.completions.create(model="smollm2", prompt=prompt, temperature=0, max_tokens=24, stream=True)
        return "".join(c.choices[0].text for c in chunks if c.choices)
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        expected = list(pool.map(plain, prompts))
        got = list(pool.map(streamed, prompts))
    assert got == expected and all(expected)
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                      json={"prompt": "Tell me a long story.", "max_tokens": 400, "ignore_eos": True,
                            "stream": True}) as resp:
        for i, _ in enumerate(resp.iter_lines()):
            if i > 4:
                break  # walks away mid-stream
    state = wait_idle(server)
    assert state["vllm:num_requests_running"] == 0 and state["vllm:kv_cache_usage_perc"] == 0.0
    deadline = time.monotonic() + 2.0
    while httpx.get(server.url + "/worker_status", timeout=10).json()["concurrency"]["in_use"] and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    assert httpx.get(server.url + "/worker_status", timeout=10).json()["concurrency"]["in_use"] == 0
