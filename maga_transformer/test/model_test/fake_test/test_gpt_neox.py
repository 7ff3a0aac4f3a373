"""GPT-NeoX parity with transformers' GPTNeoXForCausalLM, through the engine (batched, paged).

Oracle: tiny random-weight models built with GPTNeoXConfig (parallel and sequential residual,
partial rotary 0.25 and 0.5). fp32 logits and per-position NLL within 1e-4 absolute, and 32 greedy
tokens equal to transformers' generate. Any wrong layout of the per-head fused q/k/v, rotary slice
or residual order moves logits by >1e-2; summation-order noise is ~1e-6.
"""
from __future__ import annotations

import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from maga_transformer.models.gpt_neox import GptNeoXModel
from maga_transformer.models.registry import resolve_model_class
from maga_transformer.test.fixtures import perturb_vector_parameters, tiny_parity_case
from maga_transformer.test.model_test.parity_tests import (  # noqa: F401  (collected here, on `case`)
    test_greedy_tokens_match_generate, test_prompt_logits_match)

BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
            max_position_embeddings=128, eos_token_id=2, bos_token_id=1)
CASES = {
    "parallel_residual": dict(use_parallel_residual=True, rotary_pct=0.25),
    "sequential_residual": dict(use_parallel_residual=False, rotary_pct=0.5, hidden_act="gelu_new"),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    torch.manual_seed(1234)
    hf_model = GPTNeoXForCausalLM(GPTNeoXConfig(**{**BASE, **CASES[request.param]})).eval()
    perturb_vector_parameters(hf_model)
    return request.param, hf_model, tiny_parity_case(hf_model, str(tmp_path_factory.mktemp(request.param)))


@pytest.mark.parametrize("model_type", ['gpt_neox', 'GPTNeoX', 'pythia'])
def test_model_type_aliases_resolve(model_type):
    assert resolve_model_class(model_type, {}) is GptNeoXModel
    assert resolve_model_class("", {"model_type": model_type}) is GptNeoXModel


@pytest.mark.parametrize("architecture", ['GPTNeoXForCausalLM'])
def test_architectures_resolve(architecture):
    assert resolve_model_class("", {"architectures": [architecture]}) is GptNeoXModel


def test_original_neox_config_keys():
    """Pre-transformers-5 configs say rotary_pct / rotary_emb_base instead of rope_parameters."""
    arch = GptNeoXModel.arch_from_hf_config(dict(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                                 num_attention_heads=4, intermediate_size=128, rotary_pct=0.25,
                                                 rotary_emb_base=5000))
    assert (arch.rope.rotary_dim, arch.rope.theta) == (4, 5000.0)
