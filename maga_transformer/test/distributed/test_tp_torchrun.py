"""`torchrun --nproc-per-node 2 -m maga_transformer.start_server`: torchrun starts both ranks, rank 0
serves HTTP (its engine core joins as rank 0), rank 1 runs a worker in its own process. The answer
equals TP = 1's; SIGTERM to torchrun stops every process."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx

from maga_transformer.config import EngineConfig
from maga_transformer.model_factory import ModelFactory
from maga_transformer.test.distributed.procs import alive, children
from maga_transformer.test.fixtures import tiny_llama
from maga_transformer.test.server.live_server import free_port

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
PROMPT = "w3 w14 w15 w9"


def _wait_healthy(url: str, proc: subprocess.Popen, within_s: float = 120) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"torchrun exited with {proc.returncode}"
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("the server never became healthy")


def test_torchrun_two_ranks(tmp_path):
    _, directory = tiny_llama(str(tmp_path), seed=4, vocab_size=64, max_position_embeddings=256)
    single = ModelFactory.from_huggingface(directory, engine_config=EngineConfig(num_kv_blocks=64), device="cpu")
    try:
        reference = httpx_free_completion(single)
    finally:
        single.stop()
    port = free_port()
    env = {**os.environ, "PYTHONPATH": REPO, "CHECKPOINT_PATH": directory, "MAGA_DEVICE": "cpu", "START_PORT": str(port),
           "HOST": "127.0.0.1", "FT_SERVER_TEST": "1", "KV_CACHE_MEM_MB": "8", "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / "torchrun.log", "w")  # a file, not a pipe nobody reads (a full pipe blocks the ranks)
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                             "--master-port", str(free_port()), "-m", "maga_transformer.start_server"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc)
        body = {"prompt": PROMPT, "max_tokens": 16, "temperature": 0}
        answer = httpx.post(url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
        assert answer == reference
        ranks = children(proc.pid)
        assert len(ranks) == 2
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        deadline = time.monotonic() + 30
        while any(alive(pid) for pid in ranks) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(pid) for pid in ranks), "a rank outlived torchrun"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def httpx_free_completion(model) -> str:
    """TP = 1's greedy text for PROMPT, from the engine (the same request the server makes)."""
    from maga_transformer.config.generate_config import GenerateConfig
    ids = model.tokenizer.encode(PROMPT)
    handle = model.engine.add_request(ids, GenerateConfig(max_new_tokens=16, top_k=1))
    model.engine.run_until_idle()
    return model.tokenizer.decode(handle.result().outputs[0].token_ids, skip_special_tokens=True)
