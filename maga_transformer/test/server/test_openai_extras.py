"""OpenAI API beyond the basics, against independent oracles: top log-probs against transformers'
own forward pass over the same tokens, penalties, streamed /v1/completions against the plain
response, access-log lines, and aborts of merged streams. A real uvicorn server on loopback."""
from __future__ import annotations

import json
import logging
import time

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM

from maga_transformer.test.fixtures import hf_greedy
from maga_transformer.test.server.live_server import metrics

QUESTION = "What is the capital of France? Answer briefly."


def test_chat_top_logprobs_match_transformers(client, model, smollm2_dir):
    out = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": QUESTION}],
                                         temperature=0, max_tokens=8, logprobs=True, top_logprobs=4)
    content = out.choices[0].logprobs.content
    prompt = model.tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=True,
                                                 add_generation_prompt=True, return_dict=False)
    hf_model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    generated = hf_greedy(hf_model, list(prompt), 8)  # transformers' own greedy tokens
    with torch.no_grad():
        logits = hf_model(torch.tensor([list(prompt) + generated])).logits[0, len(prompt) - 1:-1]
    reference = torch.log_softmax(logits.float(), dim=-1).topk(4)
    assert len(content) == out.usage.completion_tokens == 8
    for position, entry in enumerate(content):
        tops = entry.top_logprobs
        assert [t.token for t in tops] == [model.tokenizer.decode([i]) for i in reference.indices[position].tolist()]
        torch.testing.assert_close(torch.tensor([t.logprob for t in tops]), reference.values[position],
                                   rtol=0, atol=2e-3)
        assert entry.token == model.tokenizer.decode([generated[position]])
        assert entry.token == tops[0].token and abs(entry.logprob - tops[0].logprob) < 1e-6  # greedy
        assert bytes(entry.bytes).decode("utf-8") == entry.token


def test_chat_streaming_logprobs_and_penalties(client):
    messages = [{"role": "user", "content": "Repeat the word 'yes' ten times."}]
    plain = client.chat.completions.create(model="smollm2", messages=messages, temperature=0, max_tokens=24,
                                           logprobs=True)
    chunks = list(client.chat.completions.create(model="smollm2", messages=messages, temperature=0, max_tokens=24,
                                                 logprobs=True, stream=True))
    streamed = [lp for c in chunks if c.choices and c.choices[0].logprobs for lp in c.choices[0].logprobs.content]
    assert [lp.token for lp in streamed] == [lp.token for lp in plain.choices[0].logprobs.content]
    penalised = client.chat.completions.create(model="smollm2", messages=messages, temperature=0, max_tokens=24,
                                               frequency_penalty=2.0, presence_penalty=1.0)
    assert penalised.choices[0].message.content != plain.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model="smollm2", messages=messages, max_tokens=2, top_logprobs=2)
    with pytest.raises(openai.BadRequestError, match="presence_penalty"):
        client.chat.completions.create(model="smollm2", messages=messages, max_tokens=2, presence_penalty=3)


def test_completions_stream_equals_plain_with_logprobs(client):
    prompts = ["The capital of France is", "One, two, three,"]
    plain = client.completions.create(model="smollm2", prompt=prompts, max_tokens=12, temperature=0, logprobs=2)
    chunks = list(client.completions.create(model="smollm2", prompt=prompts, max_tokens=12, temperature=0,
                                            logprobs=2, stream=True, stream_options={"include_usage": True}))
    texts, tokens, reasons = {0: "", 1: ""}, {0: [], 1: []}, {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            tokens[choice.index] += choice.logprobs.tokens
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    for choice in plain.choices:
        assert texts[choice.index] == choice.text and reasons[choice.index] == choice.finish_reason
        assert tokens[choice.index] == choice.logprobs.tokens
        assert "".join(choice.logprobs.tokens) == choice.text
        offsets = choice.logprobs.text_offset
        assert offsets[0] == 0 and all(b - a == len(t) for a, b, t in zip(offsets, offsets[1:],
                                                                          choice.logprobs.tokens))
        for token, logprob, top in zip(choice.logprobs.tokens, choice.logprobs.token_logprobs,
                                       choice.logprobs.top_logprobs):
            assert len(top) <= 2 and logprob <= 0 and max(top.values()) == pytest.approx(logprob, abs=1e-6)
    with pytest.raises(openai.BadRequestError, match="echo"):
        client.completions.create(model="smollm2", prompt="hi", max_tokens=2, echo=True, logprobs=1)


def test_completions_stream_with_echo_and_n(client):
    chunks = list(client.completions.create(model="smollm2", prompt="Once upon a time", max_tokens=6, n=2,
                                            seed=3, echo=True, stream=True))
    texts = {0: "", 1: ""}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert all(t.startswith("Once upon a time") and len(t) > len("Once upon a time") for t in texts.values())


def test_dropped_completion_stream_aborts_every_prompt(model, server):
    body = {"model": "smollm2", "prompt": ["Tell me a story.", "Tell me a poem."], "max_tokens": 400,
            "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as resp:
        for i, _ in enumerate(resp.iter_lines()):
            if i > 6:
                break
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline and metrics(server)["vllm:num_requests_running"] > 0:
        time.sleep(0.05)
    state = metrics(server)
    assert state["vllm:num_requests_running"] == 0 and state["vllm:kv_cache_usage_perc"] == 0.0


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(record.getMessage()))


def test_access_log_lines(server):
    # Lines are matched by request id: a line of an earlier test's request may still arrive after
    # the handler is attached, so counting lines is not enough.
    capture = _Capture()
    access = logging.getLogger("maga_transformer.access")
    access.addHandler(capture)
    old_level = access.level
    access.setLevel(logging.INFO)
    try:
        plain = httpx.post(server.url, json={"prompt": "hi", "generate_config": {"max_new_tokens": 3}},
                           headers={"X-Request-Id": "my-id-1"}, timeout=60)
        bad = httpx.post(server.url + "/v1/completions", json={"prompt": ""}, timeout=60)
        with httpx.stream("POST", server.url, json={"prompt": "Tell me a long story.", "yield_generator": True,
                                                    "generate_config": {"max_new_tokens": 300, "ignore_eos": True}},
                          headers={"X-Request-Id": "my-id-dropped"}, timeout=60) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i > 4:
                    break
        wanted = {"my-id-1", bad.headers["x-request-id"], "my-id-dropped"}
        deadline = time.monotonic() + 5
        while not wanted <= {line["request_id"] for line in capture.lines} and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        access.removeHandler(capture)
        access.setLevel(old_level)
    assert plain.headers["x-request-id"] == "my-id-1" and bad.headers["x-request-id"]
    by_id = {line["request_id"]: line for line in capture.lines}
    first = by_id["my-id-1"]
    assert first["method"] == "POST" and first["path"] == "/" and first["status"] == 200
    assert first["outcome"] == "complete" and first["bytes"] == len(plain.content) and first["duration_ms"] > 0
    assert first["client"].startswith("127.0.0.1:")
    assert by_id[bad.headers["x-request-id"]]["status"] == 400
    dropped = by_id["my-id-dropped"]
    assert dropped["outcome"] == "disconnected" and dropped["status"] == 200 and dropped["path"] == "/"
