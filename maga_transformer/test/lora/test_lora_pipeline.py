"""The Pipeline API with LoRA: adapter_name a string for every prompt, or a list with one name (or
None) per prompt, over the engine core in its own process. Oracle: PEFT's merged models."""
from __future__ import annotations

import pytest

from maga_transformer.pipeline.pipeline import Pipeline
from maga_transformer.test.lora.engine_util import lora_engine_model
from maga_transformer.test.lora.peft_cases import reference_greedy

PROMPTS = ["w5 w9 w17 w33", "w42 w43", "w7 w7 w120"]
NEW = 6


@pytest.fixture(scope="module")
def pipeline(llama_case):
    model = lora_engine_model(llama_case.base_dir, llama_case.adapter_dirs, engine_process=True)
    yield model, Pipeline(model, model.tokenizer)
    model.stop()


def test_adapter_list_aligned_with_prompts(llama_case, pipeline):
    model, pipe = pipeline
    names = ["c_mlp", None, "a_qv"]
    result = pipe.generate(PROMPTS, max_new_tokens=NEW, top_k=1, adapter_name=names)
    for prompt, name, output in zip(PROMPTS, names, result.outputs):
        oracle = llama_case.base if name is None else llama_case.merged[name]
        ids = model.tokenizer.encode(prompt, add_special_tokens=False)
        assert output.outputs[0].token_ids == reference_greedy(oracle, ids, NEW), name
    streamed = list(pipe(PROMPTS, max_new_tokens=NEW, top_k=1, adapter_name="b_all"))[-1]
    for prompt, output in zip(PROMPTS, streamed.outputs):
        ids = model.tokenizer.encode(prompt, add_special_tokens=False)
        assert output.outputs[0].token_ids == reference_greedy(llama_case.merged["b_all"], ids, NEW)


def test_misaligned_or_unknown_adapters_refused(pipeline):
    _, pipe = pipeline
    with pytest.raises(ValueError, match="adapter_name: a list of 1"):
        pipe.generate(PROMPTS, adapter_name=["a_qv"])
    with pytest.raises(ValueError, match="no LoRA adapter named 'zzz'"):
        pipe.generate(PROMPTS, adapter_name=["a_qv", None, "zzz"])
