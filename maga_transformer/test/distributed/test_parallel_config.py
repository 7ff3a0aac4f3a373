"""TP_SIZE / WORLD_SIZE / WORLD_RANK / LOCAL_WORLD_SIZE: what runs, and what is refused before
anything loads, with the variable to change named. start_server refuses the same way (exit 2)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from maga_transformer.config import EngineConfig
from maga_transformer.distributed.parallel_config import ParallelConfig
from maga_transformer.model_factory import ModelFactory
from maga_transformer.test.fixtures import tiny_llama

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def test_defaults_are_one_rank():
    config = ParallelConfig.from_env({})
    assert (config.tp_size, config.world_size, config.local_world_size, config.enabled) == (1, 1, 1, False)
    assert config.split_embeddings and config.load_threads == 1


def test_tp_size_alone_means_one_machine():
    config = ParallelConfig.from_env({"TP_SIZE": "4"})
    assert (config.world_size, config.local_world_size, config.machines, config.serves_http) == (4, 4, 1, True)


def test_two_machines():
    env = {"TP_SIZE": "4", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "WORLD_RANK": "2", "MASTER_ADDR": "10.0.0.1",
           "MASTER_PORT": "29500", "TP_SPLIT_EMB_AND_LMHEAD": "0", "LOAD_CKPT_NUM_PROCESS": "3"}
    config = ParallelConfig.from_env(env)
    assert (config.machines, config.serves_http, config.master_addr, config.master_port) == (2, False, "10.0.0.1", 29500)
    assert not config.split_embeddings and config.load_threads == 3


def test_torchrun_makes_every_process_one_rank():
    env = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "h",
           "MASTER_PORT": "1234", "TORCHELASTIC_RUN_ID": "x"}
    config = ParallelConfig.from_env(env)
    assert config.torchrun and (config.world_rank, config.tp_size, config.serves_http) == (3, 4, False)


@pytest.mark.parametrize("env, variable", [
    ({"TP_SIZE": "2", "WORLD_SIZE": "3"}, "WORLD_SIZE (3) must be a multiple of TP_SIZE (2)"),
    ({"TP_SIZE": "2", "WORLD_SIZE": "4"}, "WORLD_SIZE (4) is more than TP_SIZE (2)"),
    ({"TP_SIZE": "0"}, "TP_SIZE must be at least 1"),
    ({"TP_SIZE": "two"}, "TP_SIZE: expected an integer"),
    ({"TP_SIZE": "4", "LOCAL_WORLD_SIZE": "3"}, "LOCAL_WORLD_SIZE (3) must divide WORLD_SIZE (4)"),
    ({"TP_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "WORLD_RANK": "1", "MASTER_PORT": "1"}, "WORLD_RANK (1) must be a multiple"),
    ({"TP_SIZE": "2", "WORLD_RANK": "2"}, "WORLD_RANK (2) must be in [0, WORLD_SIZE = 2)"),
    ({"TP_SIZE": "2", "LOCAL_WORLD_SIZE": "1", "WORLD_RANK": "1"}, "MASTER_PORT must be set"),
    ({"DISTRIBUTE_CONFIG_FILE": "/x.json"}, "DISTRIBUTE_CONFIG_FILE is not supported yet"),
    ({"TP_SPLIT_EMB_AND_LMHEAD": "maybe"}, "TP_SPLIT_EMB_AND_LMHEAD: expected 0/1"),
])
def test_bad_combinations_name_the_variable(env, variable):
    with pytest.raises(ValueError, match=variable.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        ParallelConfig.from_env(env)


def test_more_ranks_than_gpus():
    with pytest.raises(ValueError, match=r"LOCAL_WORLD_SIZE \(2\) asks for more ranks on this machine than it has GPUs \(1\)"):
        ParallelConfig(tp_size=2, world_size=2, local_world_size=2).check(num_gpus=1)


@pytest.mark.parametrize("heads, kv_heads, tp, message", [
    (4, 4, 3, r"TP_SIZE \(3\) must divide the model's 4 query heads"),
    (12, 3, 2, r"TP_SIZE \(2\) and the model's 3 KV heads: one must divide the other"),
])
def test_shapes_the_split_cannot_take(heads, kv_heads, tp, message):
    with pytest.raises(ValueError, match=message):
        ParallelConfig(tp_size=tp, world_size=tp, local_world_size=tp).check_model(heads, kv_heads)


def test_model_factory_refuses_before_loading(tmp_path):
    _, directory = tiny_llama(str(tmp_path), seed=1, vocab_size=64, max_position_embeddings=64)  # 4 query heads
    with pytest.raises(ValueError, match=r"TP_SIZE \(3\) must divide the model's 4 query heads"):
        ModelFactory.from_huggingface(directory, engine_config=EngineConfig(num_kv_blocks=16), device="cpu",
                                      parallel=ParallelConfig(tp_size=3, world_size=3, local_world_size=3))
    with pytest.raises(ValueError, match="needs the engine core in its own process"):
        ModelFactory.from_huggingface(directory, engine_config=EngineConfig(num_kv_blocks=16, engine_process=False),
                                      device="cpu", parallel=ParallelConfig(tp_size=2, world_size=2, local_world_size=2))


def test_start_server_refuses_with_exit_2(tmp_path):
    _, directory = tiny_llama(str(tmp_path), seed=1, vocab_size=64, max_position_embeddings=64)
    env = {**os.environ, "CHECKPOINT_PATH": directory, "TP_SIZE": "3", "MAGA_DEVICE": "cpu", "FT_SERVER_TEST": "1",
           "PYTHONPATH": REPO, "START_PORT": "1"}
    proc = subprocess.run([sys.executable, "-m", "maga_transformer.start_server"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "TP_SIZE (3) must divide the model's 4 query heads" in proc.stderr
    env.update(TP_SIZE="2", WORLD_SIZE="3")
    proc = subprocess.run([sys.executable, "-m", "maga_transformer.start_server"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "WORLD_SIZE (3) must be a multiple of TP_SIZE (2)" in proc.stderr
