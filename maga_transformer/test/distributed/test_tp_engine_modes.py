"""The engine's modes under TP = 2 (CPU, gloo) against TP = 1 with the same settings: overlap
scheduling (the step's input tokens still on the device: rank 0 broadcasts them), chunked prefill
in small steps, prefix-cache hits, beam search and parallel samples (block copies on every rank),
seeded sampling (drawn once, on rank 0), and several requests at once."""
from __future__ import annotations

import pytest

from maga_transformer.config import EngineConfig, ModelConfig
from maga_transformer.config.generate_config import GenerateConfig
from maga_transformer.distributed.parallel_config import ParallelConfig
from maga_transformer.model_factory import ModelFactory
from maga_transformer.test.fixtures import tiny_llama

SETTINGS = dict(num_kv_blocks=128, max_num_batched_tokens=8, overlap_scheduling=True, enable_prefix_cache=True)
SHARED = [1, 5, 9, 17, 33, 45, 7, 3, 11, 13, 19, 20, 4, 8, 21, 34]  # 4 blocks of 4: the second request hits them
REQUESTS = [
    (SHARED + [40, 41], GenerateConfig(max_new_tokens=20, top_k=1)),
    (SHARED + [50], GenerateConfig(max_new_tokens=20, top_k=1)),
    ([1, 42, 43], GenerateConfig(max_new_tokens=12, num_beams=3, num_return_sequences=2)),
    ([1, 7, 7, 7], GenerateConfig(max_new_tokens=12, top_k=20, temperature=0.9, num_return_sequences=3,
                                  random_seed=1234)),
]


def _load(directory: str, tp: int):
    parallel = ParallelConfig(tp_size=tp, world_size=tp, local_world_size=tp) if tp > 1 else None
    return ModelFactory.from_huggingface(
        directory, ModelConfig(seq_size_per_block=4, max_seq_len=128, act_type="fp32"),
        engine_config=EngineConfig(engine_process=tp > 1, **SETTINGS), device="cpu", parallel=parallel)


def _outputs(model):
    engine = model.engine
    first = engine.add_request(*REQUESTS[0])
    engine.run_until_idle()  # its blocks are cached before the second request arrives
    handles = [first] + [engine.add_request(prompt, cfg) for prompt, cfg in REQUESTS[1:]]
    engine.run_until_idle()
    return [[output.token_ids for output in handle.result().outputs] for handle in handles]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    _, directory = tiny_llama(str(tmp_path_factory.mktemp("modes")), seed=11, vocab_size=64,
                              max_position_embeddings=256)
    single, split = _load(directory, 1), _load(directory, 2)
    yield single, split
    split.stop()
    single.stop()


def test_modes_match_tp1(models):
    single, split = models
    assert split.engine.info.num_blocks == single.engine.info.num_blocks
    ours = _outputs(split)
    assert ours == _outputs(single)
    assert [len(outputs) for outputs in ours] == [1, 1, 2, 3]
    core = single.engine.core  # the same schedule ran on both: it did look ahead and hit the prefix cache
    assert core.num_look_ahead_steps > 0 and core.pool.stats.hits > 0
    split.engine.pool.check_idle()
