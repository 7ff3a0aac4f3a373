"""Phi (phi-1.5 / phi-2 shape) parity with transformers' PhiForCausalLM, through the engine (batched, paged).

Oracle: tiny random-weight models built with PhiConfig: MHA and GQA, partial rotary 0.5 and 0.25,
gelu_new, biased lm_head. fp32 logits and per-position NLL within 1e-4 absolute, and 32 greedy
tokens equal to transformers' generate.
"""
from __future__ import annotations

import pytest
import torch
from transformers import PhiConfig, PhiForCausalLM

from maga_transformer.models.phi import PhiModel
from maga_transformer.models.registry import resolve_model_class
from maga_transformer.test.fixtures import perturb_vector_parameters, tiny_parity_case
from maga_transformer.test.model_test.parity_tests import (  # noqa: F401  (collected here, on `case`)
    test_greedy_tokens_match_generate, test_prompt_logits_match)

BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
            max_position_embeddings=128, eos_token_id=2, bos_token_id=1)
CASES = {
    "phi2_mha": dict(partial_rotary_factor=0.5),
    "gqa_quarter_rotary": dict(num_key_value_heads=2, partial_rotary_factor=0.25),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    torch.manual_seed(1234)
    hf_model = PhiForCausalLM(PhiConfig(**{**BASE, **CASES[request.param]})).eval()
    perturb_vector_parameters(hf_model)
    return request.param, hf_model, tiny_parity_case(hf_model, str(tmp_path_factory.mktemp(request.param)))


@pytest.mark.parametrize("model_type", ['phi', 'phi-2', 'phi-1.5'])
def test_model_type_aliases_resolve(model_type):
    assert resolve_model_class(model_type, {}) is PhiModel
    assert resolve_model_class("", {"model_type": model_type}) is PhiModel


@pytest.mark.parametrize("architecture", ['PhiForCausalLM'])
def test_architectures_resolve(architecture):
    assert resolve_model_class("", {"architectures": [architecture]}) is PhiModel
