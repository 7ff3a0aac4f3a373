"""The real embedded model (SmolLM2-135M-Instruct, de-quantized from its GGUF): our engine's greedy
tokens equal transformers' greedy tokens for chat prompts, all submitted as one batch."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from maga_transformer.config import EngineConfig, GenerateConfig
from maga_transformer.model_factory import ModelFactory
from maga_transformer.pipeline import Pipeline
from maga_transformer.test.fixtures import hf_greedy

QUESTIONS = [
    "What is the capital of France? Answer briefly.",
    "Write a short poem about autumn leaves.",
    "Explain what a hash table is in two sentences.",
    "List three uses of copper.",
    "Translate 'good morning' into Spanish and German.",
    "What is 12 plus 30?",
]
NEW_TOKENS = 48


@pytest.fixture(scope="module")
def models(smollm2_dir):
    ours = ModelFactory.from_huggingface(smollm2_dir, engine_config=EngineConfig(kv_cache_mem_mb=256))
    hf_model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return ours, hf_model


def _chat_ids(tokenizer, question):
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=True,
                                         add_generation_prompt=True, return_dict=False)


def test_greedy_equals_transformers(models):
    ours, hf_model = models
    prompts = [list(_chat_ids(ours.tokenizer, q)) for q in QUESTIONS]
    cfg = GenerateConfig(max_new_tokens=NEW_TOKENS, top_k=1)
    handles = [ours.engine.add_request(p, cfg) for p in prompts]
    ours.engine.run_until_idle()
    for prompt, handle in zip(prompts, handles):
        assert handle.result().outputs[0].token_ids == hf_greedy(hf_model, prompt, NEW_TOKENS)
    ours.engine.pool.check_idle()


def test_pipeline_answers_paris(models):
    ours, _ = models
    pipeline = Pipeline(ours, ours.tokenizer)
    prompt = pipeline.chat_prompt([{"role": "user", "content": QUESTIONS[0]}])
    responses = list(pipeline([prompt], max_new_tokens=20, top_k=1))
    assert len(responses) > 1  # streamed
    assert responses[-1].finished
    assert "Paris" in responses[-1].batch_response[0]
    assert all(r.batch_response[0].startswith(responses[0].batch_response[0]) for r in responses)
