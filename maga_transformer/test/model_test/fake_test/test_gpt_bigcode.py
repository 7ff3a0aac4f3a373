"""GPT-BigCode / StarCoder / WizardCoder parity with transformers' GPTBigCodeForCausalLM, through the
engine (batched, paged).

Oracle: tiny random-weight models built with GPTBigCodeConfig, multi-query (one K/V head) and MHA
(c_attn per head), learned positions, gelu_pytorch_tanh, tied lm_head. fp32 logits and
per-position NLL within 1e-4 absolute, and 32 greedy tokens equal to transformers' generate.
"""
from __future__ import annotations

import pytest
import torch
from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

from maga_transformer.models.gpt_bigcode import GptBigCodeModel
from maga_transformer.models.registry import resolve_model_class
from maga_transformer.test.fixtures import perturb_vector_parameters, tiny_parity_case
from maga_transformer.test.model_test.parity_tests import (  # noqa: F401  (collected here, on `case`)
    test_greedy_tokens_match_generate, test_prompt_logits_match)

BASE = dict(n_embd=64, n_inner=128, n_layer=2, n_head=4, vocab_size=128, n_positions=128,
            eos_token_id=2, bos_token_id=1)
CASES = {
    "multi_query": dict(multi_query=True),
    "mha": dict(multi_query=False, activation_function="gelu"),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    torch.manual_seed(1234)
    hf_model = GPTBigCodeForCausalLM(GPTBigCodeConfig(**{**BASE, **CASES[request.param]})).eval()
    perturb_vector_parameters(hf_model)
    return request.param, hf_model, tiny_parity_case(hf_model, str(tmp_path_factory.mktemp(request.param)))


@pytest.mark.parametrize("model_type", ['gpt_bigcode', 'starcoder', 'wizardcoder'])
def test_model_type_aliases_resolve(model_type):
    assert resolve_model_class(model_type, {}) is GptBigCodeModel
    assert resolve_model_class("", {"model_type": model_type}) is GptBigCodeModel


@pytest.mark.parametrize("architecture", ['GPTBigCodeForCausalLM'])
def test_architectures_resolve(architecture):
    assert resolve_model_class("", {"architectures": [architecture]}) is GptBigCodeModel
