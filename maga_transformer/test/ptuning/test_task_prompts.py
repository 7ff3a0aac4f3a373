"""MULTI_TASK_PROMPT: a request's task_id puts its task's system prompt first, and the prompt's full
KV blocks stay resident once computed: later requests of the task reuse them even after a flood of
other prompts evicted everything else. Oracle: transformers' greedy generate on task prompt + prompt."""
from __future__ import annotations

import json

import pytest

from maga_transformer.config import EngineConfig, GenerateConfig, ModelConfig
from maga_transformer.model_factory import ModelFactory
from maga_transformer.test.fixtures import hf_greedy, tiny_llama

TASKS = [{"task_id": "poet", "prompt": " ".join(f"w{i}" for i in range(10, 20))},  # 10 tokens: 2 full blocks
         {"task_id": 7, "prompt": "w30 w31 w32 w33 w34"}]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    hf_model, directory = tiny_llama(str(tmp_path_factory.mktemp("tasks")), seed=3, vocab_size=64,
                                     max_position_embeddings=128)
    mp = pytest.MonkeyPatch()
    mp.setenv("MULTI_TASK_PROMPT_STR", json.dumps(TASKS))
    model = ModelFactory.from_huggingface(directory, ModelConfig(seq_size_per_block=4, max_seq_len=128, act_type="fp32"),
                                          engine_config=EngineConfig(num_kv_blocks=16, engine_process=False))
    engine = model.engine  # reads the tasks
    mp.undo()
    yield hf_model, model, engine
    model.stop()


def _run(engine, prompt, **config):
    handle = engine.add_request(prompt, GenerateConfig(max_new_tokens=6, top_k=1, **config))
    engine.run_until_idle()
    return handle.result()


def test_task_prompt_first_and_resident(served):
    hf_model, model, engine = served
    poet = model.tokenizer.encode(TASKS[0]["prompt"])
    assert poet == list(range(10, 20))
    first = _run(engine, [40, 41, 42], task_id="poet")
    assert first.outputs[0].token_ids == hf_greedy(hf_model, poet + [40, 41, 42], 6)
    for i in range(12):  # other prompts fill the 16 blocks many times over: the LRU evicts all but the pinned
        _run(engine, [50 + i % 10, 3 + i, 4 + i, 5 + i, 6 + i, 7 + i, 8 + i, 9 + i, 60 - i])
    again = _run(engine, [43, 44], task_id="poet")
    assert again.aux_info.reuse_len == 8  # the task prompt's two full blocks, still resident
    assert again.outputs[0].token_ids == hf_greedy(hf_model, poet + [43, 44], 6)
    seven = _run(engine, [45], task_id=7)  # an integer task_id names the task too
    assert seven.outputs[0].token_ids == hf_greedy(hf_model, [30, 31, 32, 33, 34, 45], 6)
    with pytest.raises(ValueError, match="task_id: no MULTI_TASK_PROMPT task 'nope'"):
        engine.add_request([1, 2], GenerateConfig(task_id="nope"))
    engine.pool.check_idle()
