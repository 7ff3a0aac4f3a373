"""Two "machines" on loopback: every launcher runs with the same environment but its WORLD_RANK,
one process each (LOCAL_WORLD_SIZE = 1). The second is `start_server` itself, which on a machine
whose ranks do not start at 0 runs only its workers; the first is the front end. Their answers equal
TP = 2 on one launcher, and stopping the first stops the second."""
from __future__ import annotations

import os
import subprocess
import sys

from maga_transformer.model_factory import ModelFactory
from maga_transformer.test.fixtures import PARITY_PROMPTS, run_greedy, tiny_llama
from maga_transformer.test.server.live_server import free_port

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def test_two_launchers_equal_one(tmp_path):
    _, directory = tiny_llama(str(tmp_path), seed=3, vocab_size=128, max_position_embeddings=256)
    common = {"CHECKPOINT_PATH": directory, "MAGA_DEVICE": "cpu", "TP_SIZE": "2", "KV_CACHE_MEM_MB": "8",
              "SEQ_SIZE_PER_BLOCK": "4"}
    one = ModelFactory.create_from_env(common)
    try:
        expected = run_greedy(one.engine, PARITY_PROMPTS, 24)
    finally:
        one.stop()

    machines = {**common, "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(free_port())}
    log_path = tmp_path / "second.log"
    with open(log_path, "w") as log:  # a file, not a pipe nobody reads while the test runs
        second = subprocess.Popen([sys.executable, "-m", "maga_transformer.start_server"],
                                  env={**os.environ, **machines, "WORLD_RANK": "1", "PYTHONPATH": REPO,
                                       "FT_SERVER_TEST": "1"}, stdout=log, stderr=subprocess.STDOUT)
    try:
        first = ModelFactory.create_from_env({**machines, "WORLD_RANK": "0"})
        try:
            assert "tensor parallel over 2 ranks" in first.engine.info.description
            assert run_greedy(first.engine, PARITY_PROMPTS, 24) == expected
        finally:
            first.stop()
        assert second.wait(timeout=60) == 0, log_path.read_text()[-3000:]
    finally:
        if second.poll() is None:
            second.kill()
            second.wait()
