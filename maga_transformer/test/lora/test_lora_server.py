"""LoRA through the real server (uvicorn on loopback, the engine core in its own process): native
adapter_name (a string, or a list aligned with prompt_batch), the OpenAI `model` field with the
official client, /v1/models, hot updates over HTTP while a stream runs, and refusals.

Oracle: PEFT's merged model of each adapter (transformers greedy generate), as in
test_engine_parity.py; the served ids come back with return_output_ids / the server's tokenizer.
"""
from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest

from maga_transformer.test.lora.engine_util import lora_engine_model
from maga_transformer.test.lora.peft_cases import (build_case, other_shaped_adapter, reference_greedy,
                                                   reference_greedy_through_eos, save_adapter)
from maga_transformer.test.server.live_server import LiveServer, metrics, wait_idle

PROMPTS = ["w5 w9 w17 w33 w65", "w42 w43", "w7 w7 w7 w120 w3", "w20 w21 w22"]
NEW = 8


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return build_case("llama", str(tmp_path_factory.mktemp("lora_server")))


@pytest.fixture(scope="module")
def served(case):
    """a_qv and b_all from LORA_INFO; c_mlp is loaded over HTTP by the tests."""
    model = lora_engine_model(case.base_dir, {n: case.adapter_dirs[n] for n in ("a_qv", "b_all")},
                              engine_process=True)
    server = LiveServer(model, concurrency_limit=32)
    yield model, server
    server.stop()
    model.stop()


def _ids(model, text):
    return model.tokenizer.encode(text, add_special_tokens=False)


def _oracle(case, name):
    return case.base if name is None else case.merged[name]


def _native(server, prompt_field, prompts, adapter_name, **config):
    body = {prompt_field: prompts, "generate_config": {"top_k": 1, "max_new_tokens": NEW, "return_output_ids": True,
                                                        "adapter_name": adapter_name, **config}}
    return httpx.post(server.url + "/", json=body, timeout=60)


def _set(server, adapters):
    return httpx.post(server.url + "/update", json={"peft_info": {"lora_info": adapters}}, timeout=60)


def test_native_adapter_name_list_matches_peft(case, served):
    model, server = served
    names = [None, "a_qv", "b_all", "a_qv"]
    reply = _native(server, "prompt_batch", PROMPTS, names)
    assert reply.status_code == 200, reply.text
    for prompt, name, body in zip(PROMPTS, names, reply.json()["response_batch"]):
        assert body["output_ids"] == reference_greedy(_oracle(case, name), _ids(model, prompt), NEW), (name, prompt)
    single = _native(server, "prompt", PROMPTS[0], "b_all")
    assert single.json()["output_ids"] == reference_greedy(case.merged["b_all"], _ids(model, PROMPTS[0]), NEW)


def test_openai_model_field_and_models_list(case, served):
    model, server = served
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    listed = {m.id for m in client.models.list().data}
    assert {"smollm2", "a_qv", "b_all"} <= listed
    for name in ("a_qv", "b_all", None):
        out = client.completions.create(model=name or "smollm2", prompt=PROMPTS[2], max_tokens=NEW, temperature=0)
        ref = reference_greedy(_oracle(case, name), _ids(model, PROMPTS[2]), NEW)
        assert out.choices[0].text == model.tokenizer.decode(ref, skip_special_tokens=True), name
        assert out.model == (name or "smollm2")
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="no-such-adapter", prompt=PROMPTS[0], max_tokens=2)


def _stream(server, prompt, adapter, events):
    body = {"prompt": prompt, "generate_config": {"top_k": 1, "max_new_tokens": 100, "ignore_eos": True,
                                                  "return_output_ids": True, "adapter_name": adapter},
            "yield_generator": True}
    with httpx.stream("POST", server.url + "/", json=body, timeout=120) as reply:
        for line in reply.iter_lines():
            if line.startswith("data:"):
                events.append(line[5:])


def test_hot_update_while_streaming(case, served):
    """/update unloads the adapter a running stream uses and loads another: the stream completes with
    its adapter (PEFT's tokens), new requests for it are refused, the new one serves, blocks all free."""
    model, server = served
    events = []
    stream = threading.Thread(target=_stream, args=(server, PROMPTS[1], "a_qv", events))
    stream.start()
    deadline = time.monotonic() + 60
    while not events:
        assert time.monotonic() < deadline and stream.is_alive(), "the stream never started"
        time.sleep(0.001)
    reply = _set(server, {"b_all": case.adapter_dirs["b_all"], "c_mlp": case.adapter_dirs["c_mlp"]})
    assert reply.status_code == 200, reply.text
    assert reply.json()["loaded"] == ["c_mlp"] and reply.json()["unloaded"] == ["a_qv"]
    running_during_update = metrics(server)["vllm:num_requests_running"] >= 1
    stream.join(timeout=120)
    assert events[-1] == "[done]"
    final = json.loads(events[-2])
    assert final["finished"]
    assert final["output_ids"] == reference_greedy_through_eos(case.merged["a_qv"], _ids(model, PROMPTS[1]), 100)
    refused = _native(server, "prompt", PROMPTS[0], "a_qv")
    assert refused.status_code == 400 and "a_qv" in refused.json()["message"]
    fresh = _native(server, "prompt", PROMPTS[0], "c_mlp")
    assert fresh.json()["output_ids"] == reference_greedy(case.merged["c_mlp"], _ids(model, PROMPTS[0]), NEW)
    # vLLM's routes: load a_qv back, unload c_mlp
    load = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "a_qv",
                                                                   "lora_path": case.adapter_dirs["a_qv"]})
    assert load.status_code == 200, load.text
    assert httpx.post(server.url + "/v1/unload_lora_adapter", json={"lora_name": "c_mlp"}).status_code == 200
    again = _native(server, "prompt", PROMPTS[0], "a_qv")
    assert again.json()["output_ids"] == reference_greedy(case.merged["a_qv"], _ids(model, PROMPTS[0]), NEW)
    wait_idle(server, within_s=10)
    model.engine.pool.check_idle()
    assert running_during_update  # the update really overlapped the stream
    _set(server, {n: case.adapter_dirs[n] for n in ("a_qv", "b_all")})  # as the other tests expect


def test_bad_adapters_refused_and_serving_goes_on(case, served, tmp_path):
    model, server = served
    base = case.base
    bad = {
        "dora": (save_adapter(base, str(tmp_path / "dora"), use_dora=True), "DoRA"),
        "saves": (save_adapter(base, str(tmp_path / "saves"), modules_to_save=["lm_head"]), "modules_to_save"),
        "shapes": (other_shaped_adapter(str(tmp_path / "shapes")), "do not fit"),
        "missing": (str(tmp_path / "nowhere"), "not a directory"),
        "lm_head": (save_adapter(base, str(tmp_path / "head"), target_modules=["lm_head"]), "lm_head"),
    }
    listed = lambda: [(m["id"], m["root"]) for m in httpx.get(server.url + "/v1/models").json()["data"]]  # noqa: E731
    served_before = listed()
    for name, (path, reason) in bad.items():
        reply = _set(server, {"a_qv": case.adapter_dirs["a_qv"], "b_all": case.adapter_dirs["b_all"], name: path})
        assert reply.status_code == 400, (name, reply.text)
        assert reply.json()["error_code"] == 507 and name in reply.json()["message"] and reason in reply.json()["message"]
        vllm = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})
        assert vllm.status_code == 400 and reason in vllm.json()["error"]["message"], name
    changed = _set(server, {"a_qv": case.adapter_dirs["b_all"], "b_all": case.adapter_dirs["b_all"]})
    assert changed.status_code == 400 and "new path for a known name" in changed.json()["message"]
    assert listed() == served_before
    # bad requests
    misaligned = _native(server, "prompt_batch", PROMPTS[:2], ["a_qv"])
    assert misaligned.status_code == 400 and misaligned.json()["error_code"] == 507
    unknown = _native(server, "prompt", PROMPTS[0], "nope")
    assert unknown.status_code == 400 and "nope" in unknown.json()["message"]
    assert httpx.post(server.url + "/update", json={"peft_info": {}}).status_code == 400
    assert httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "x"}).status_code == 400
    # still serving, adapters and base alike
    reply = _native(server, "prompt_batch", PROMPTS[:2], ["b_all", None])
    assert reply.status_code == 200
    assert reply.json()["response_batch"][0]["output_ids"] == reference_greedy(
        case.merged["b_all"], _ids(model, PROMPTS[0]), NEW)
