"""`python3 -m maga_transformer.start_server` as a user runs it: a real process, configured by
environment variables, logging to ./logs, and shutting down gracefully on SIGTERM."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from safetensors.torch import load_file, save_file

from maga_transformer.test.fixtures import tiny_llama
from maga_transformer.test.server.live_server import free_port

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _start(env_extra: dict, cwd: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("FT_SERVER_TEST", "PY_LOG_LEVEL")}
    env.update(PYTHONPATH=REPO_ROOT + os.pathsep + env.get("PYTHONPATH", ""), **env_extra)
    return subprocess.Popen([sys.executable, "-m", "maga_transformer.start_server"], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("name,value", [("START_PORT", "abc"), ("PY_LOG_LEVEL", "LOUD"),
                                        ("CONCURRENCY_LIMIT", "0"), ("USE_BLOCK_CACHE", "maybe"),
                                        ("ASYNC_MODE", "sometimes"), ("MAX_SEQ_LEN", "long")])
def test_bad_variable_stops_startup_naming_it(tmp_path, name, value):
    proc = _start({name: value, "CHECKPOINT_PATH": str(tmp_path / "none")}, str(tmp_path))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and name in err, err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    _, directory = tiny_llama(str(tmp_path_factory.mktemp("srv")), seed=2, vocab_size=64,
                              max_position_embeddings=4096)
    return directory


def test_sigterm_finishes_in_flight_request_then_exits(checkpoint, tmp_path):
    port = free_port()
    proc = _start({"CHECKPOINT_PATH": checkpoint, "START_PORT": str(port), "HOST": "127.0.0.1",
                   "KV_CACHE_MEM_MB": "64", "PY_LOG_LEVEL": "info"}, str(tmp_path))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                if httpx.get(url + "/health", timeout=2).text == "ok":
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        result = {}

        def long_request() -> None:
            resp = httpx.post(url, json={"prompt": "w5 w7 w9", "generate_config": {
                "max_new_tokens": 1500, "ignore_eos": True, "top_k": 1}}, timeout=120)
            result["status"], result["body"] = resp.status_code, resp.json()

        worker = threading.Thread(target=long_request)
        worker.start()
        while "vllm:num_requests_running 1.0" not in httpx.get(url + "/metrics", timeout=5).text:
            assert worker.is_alive(), result
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        worker.join(timeout=120)
        assert result["status"] == 200 and result["body"]["aux_info"]["output_len"] == 1500
        # uvicorn re-raises the signal once shutdown is complete: the conventional "ended by SIGTERM" status
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
    _, err = proc.communicate()
    assert "serving" in err and "http://127.0.0.1:%d" % port in err
    with pytest.raises(httpx.TransportError):
        httpx.get(url + "/health", timeout=2)
    access = [json.loads(line) for line in (tmp_path / "logs" / "access.log").read_text().splitlines()]
    assert any(a["path"] == "/" and a["status"] == 200 and a["outcome"] == "complete" for a in access)
    main_log = (tmp_path / "logs" / "main.log").read_text()
    assert "server shutting down" in main_log and "engine stopped" in main_log
    # the start-up line names device, dtype, KV tokens and the process layout; the core went with the server
    found = re.search(r"\(cpu float32, KV cache [\d,]+ tokens .*; engine core in process (\d+), front end in process "
                      + str(proc.pid), err)
    assert found, err
    assert not os.path.exists(f"/proc/{found.group(1)}"), "the engine core outlived the server"


def test_engine_core_startup_failure_reaches_the_terminal(checkpoint, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    weights = load_file(str(broken / "model.safetensors"))
    del weights[next(n for n in weights if "layers.0.mlp.down_proj" in n)]
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    proc = _start({"CHECKPOINT_PATH": str(broken), "KV_CACHE_MEM_MB": "64"}, str(tmp_path))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "cannot start: engine core start-up failed: checkpoint is missing weight 'down' of layer 0" in err, err
