"""GLM-130B's SwissArmyTransformer release (4 model-parallel shards) under TP = 2: each rank reads
only the shards' parts its slice overlaps (about half of the bytes), and the engine's greedy tokens
equal TP = 1's on the merged model."""
from __future__ import annotations

import pytest
import torch

from maga_transformer.config import EngineConfig, ModelConfig
from maga_transformer.distributed.parallel_config import ParallelConfig
from maga_transformer.distributed.tensor_parallel import TensorParallel
from maga_transformer.model_factory import ModelFactory, load_model_weights
from maga_transformer.model_loader.lazy_tensor import LazyCat
from maga_transformer.test.distributed.tp_cases import GLM_PROMPTS
from maga_transformer.test.fixtures import run_greedy, save_original_checkpoint
from maga_transformer.test.model_test.original_layouts import glm_v1_config, glm_v1_tensors, save_sat_shards

SIZES = dict(hidden=64, heads=4, inner=96, vocab=128, layers=2)


@pytest.fixture(scope="module")
def sat_dir(tmp_path_factory):
    state = glm_v1_tensors(**SIZES, geglu=True, tied=True)
    config = glm_v1_config(False, SIZES["hidden"], SIZES["heads"], SIZES["inner"], SIZES["vocab"], SIZES["layers"])
    directory = save_original_checkpoint(str(tmp_path_factory.mktemp("sat")), config, {}, SIZES["vocab"])
    save_sat_shards(directory, state, ranks=4)
    return directory, sum(t.numel() * t.element_size() for t in state.values())


def test_each_rank_reads_half_of_the_shards(sat_dir, monkeypatch):
    directory, total = sat_dir
    read = []
    original = LazyCat.materialize
    monkeypatch.setattr(LazyCat, "materialize", lambda self: read.append(original(self)) or read[-1])
    for rank in range(2):
        read.clear()
        load_model_weights(directory, "glm_130b", torch.float32, torch.device("cpu"), TensorParallel(rank, 2))
        split_bytes = sum(t.numel() * t.element_size() for t in read)  # what the split tensors read
        assert total * 0.45 <= split_bytes <= total * 0.5, (rank, split_bytes / total)


def test_tp2_greedy_equals_tp1(sat_dir):
    directory, _ = sat_dir
    models = []
    for tp in (1, 2):
        parallel = ParallelConfig(tp_size=tp, world_size=tp, local_world_size=tp) if tp > 1 else None
        models.append(ModelFactory.from_huggingface(
            directory, ModelConfig(model_type="glm_130b", seq_size_per_block=4, max_seq_len=128, act_type="fp32"),
            engine_config=EngineConfig(num_kv_blocks=128, engine_process=tp > 1), device="cpu", parallel=parallel))
    try:
        single, split = (run_greedy(model.engine, GLM_PROMPTS, 16) for model in models)
        assert split == single and all(single)
    finally:
        for model in models:
            model.stop()
