"""LoRA under tensor parallelism (TP = 2 on CPU, gloo): every rank holds its share of each adapter,
cut as its base weights are (q/k/v and gate/up rows, o and down columns, each expert alike). Mixed
batches equal PEFT's merged models, from LORA_INFO and after hot loads / unloads, which reach the
worker rank with the step inputs."""
from __future__ import annotations

import pytest

from maga_transformer.config import EngineConfig, GenerateConfig, ModelConfig
from maga_transformer.distributed.parallel_config import ParallelConfig
from maga_transformer.model_factory import ModelFactory
from maga_transformer.test.lora.peft_cases import (ADAPTERS, EXPERT_ADAPTERS, PROMPTS, build_case,
                                                   reference_greedy)

CASES = {"llama": ADAPTERS, "qwen2_moe": {**ADAPTERS, **EXPERT_ADAPTERS}}
NEW = 8


@pytest.fixture(scope="module", params=sorted(CASES))
def split(request, tmp_path_factory):
    case = build_case(request.param, str(tmp_path_factory.mktemp(f"tp_{request.param}")), CASES[request.param])
    first = sorted(case.adapter_dirs)[:2]
    model = ModelFactory.from_huggingface(
        case.base_dir, ModelConfig(seq_size_per_block=4, max_seq_len=128, act_type="fp32",
                                   lora_infos={n: case.adapter_dirs[n] for n in first}),
        engine_config=EngineConfig(engine_process=True, num_kv_blocks=256), device="cpu",
        parallel=ParallelConfig(tp_size=2, world_size=2, local_world_size=2))
    yield case, model.engine
    model.stop()


def _check_mixed(case, engine, names):
    handles = [(n, p, engine.add_request(p, GenerateConfig(max_new_tokens=NEW, top_k=1, adapter_name=n)))
               for p in PROMPTS for n in names]
    engine.run_until_idle()
    for name, prompt, handle in handles:
        oracle = case.base if name is None else case.merged[name]
        assert handle.result().outputs[0].token_ids == reference_greedy(oracle, prompt, NEW), (case.family, name)


def test_tp2_mixed_adapters_and_hot_updates(split):
    case, engine = split
    names = sorted(case.adapter_dirs)
    _check_mixed(case, engine, [None] + names[:2])
    rest = {n: case.adapter_dirs[n] for n in names[2:]}
    result = engine.update_lora("set", {names[1]: case.adapter_dirs[names[1]], **rest})
    assert result.ok and result.unloaded == [names[0]], result.error
    _check_mixed(case, engine, [None] + names[1:])
    engine.pool.check_idle()
