"""BLOOM parity with transformers' BloomForCausalLM, through the engine (batched, paged).

Oracle: tiny random-weight models built with BloomConfig: ALiBi with a power-of-two head count and
with 6 heads (the slopes' interleaved tail), word_embeddings_layernorm, per-head fused
query_key_value. fp32 logits and per-position NLL within 1e-4 absolute, and 32 greedy tokens equal
to transformers' generate.
"""
from __future__ import annotations

import pytest
import torch
from transformers import BloomConfig, BloomForCausalLM

from maga_transformer.models.bloom import BloomModel
from maga_transformer.models.registry import resolve_model_class
from maga_transformer.test.fixtures import perturb_vector_parameters, tiny_parity_case
from maga_transformer.test.model_test.parity_tests import (  # noqa: F401  (collected here, on `case`)
    test_greedy_tokens_match_generate, test_prompt_logits_match)

BASE = dict(n_layer=2, vocab_size=128, eos_token_id=2, bos_token_id=1)
CASES = {
    "four_heads": dict(hidden_size=64, n_head=4),
    "six_heads": dict(hidden_size=96, n_head=6),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    torch.manual_seed(1234)
    hf_model = BloomForCausalLM(BloomConfig(**{**BASE, **CASES[request.param]})).eval()
    perturb_vector_parameters(hf_model)
    return request.param, hf_model, tiny_parity_case(hf_model, str(tmp_path_factory.mktemp(request.param)))


@pytest.mark.parametrize("model_type", ['bloom', 'sgpt_bloom', 'sgpt_bloom_vector'])
def test_model_type_aliases_resolve(model_type):
    assert resolve_model_class(model_type, {}) is BloomModel
    assert resolve_model_class("", {"model_type": model_type}) is BloomModel


@pytest.mark.parametrize("architecture", ['BloomForCausalLM'])
def test_architectures_resolve(architecture):
    assert resolve_model_class("", {"architectures": [architecture]}) is BloomModel
