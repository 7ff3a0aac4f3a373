"""The prefix cache keyed by adapter: a prompt cached under one adapter (or the base model) is never
served to another, and is reused within the same adapter. Outputs stay PEFT's either way."""
from __future__ import annotations

import pytest

from maga_transformer.config import GenerateConfig
from maga_transformer.test.lora.engine_util import lora_engine_model
from maga_transformer.test.lora.peft_cases import reference_greedy

PROMPT = list(range(3, 23))  # 20 tokens: four full 4-token blocks can be reused
NEW = 6


@pytest.fixture(scope="module")
def engine(llama_case):
    model = lora_engine_model(llama_case.base_dir, llama_case.adapter_dirs)
    yield model.engine
    model.stop()


def _run(engine, name):
    handle = engine.add_request(PROMPT, GenerateConfig(max_new_tokens=NEW, top_k=1, adapter_name=name))
    engine.run_until_idle()
    result = handle.result()
    return result.aux_info.reuse_len, result.outputs[0].token_ids


def test_no_reuse_across_adapters_reuse_within_one(engine, llama_case):
    order = [None, "a_qv", "b_all", "c_mlp"]
    for name in order:  # the first time under each: nothing cached for this adapter yet
        reuse, tokens = _run(engine, name)
        assert reuse == 0, name
        oracle = llama_case.base if name is None else llama_case.merged[name]
        assert tokens == reference_greedy(oracle, PROMPT, NEW), name
    for name in order:  # again: its own blocks come back, and the answer is unchanged
        reuse, tokens = _run(engine, name)
        assert reuse == 16, name
        oracle = llama_case.base if name is None else llama_case.merged[name]
        assert tokens == reference_greedy(oracle, PROMPT, NEW), name
    engine.pool.check_idle()


def test_reloaded_adapter_does_not_see_its_old_blocks(engine, llama_case):
    """A name unloaded and loaded again (perhaps from new files) gets a new slot and a new salt."""
    _run(engine, "a_qv")
    assert engine.update_lora("unload", {"a_qv": ""}).ok
    assert engine.update_lora("load", {"a_qv": llama_case.adapter_dirs["a_qv"]}).ok
    reuse, tokens = _run(engine, "a_qv")
    assert reuse == 0 and tokens == reference_greedy(llama_case.merged["a_qv"], PROMPT, NEW)
