"""MPT parity with transformers' MptForCausalLM, through the engine (batched, paged).

Oracle: tiny random-weight models built with MptConfig: ALiBi with the default alibi_bias_max and
with 6 heads (MPT's own slope order for a non-power-of-two head count) and clip_qkv, bias-free
LayerNorms and linears. fp32 logits and per-position NLL within 1e-4
absolute, and 32 greedy tokens equal to transformers' generate.

transformers' MptModel ignores attn_config.alibi_bias_max (it always builds slopes with 8) while
MPT's own code honours it, as we do; a non-default value is therefore checked against
transformers' build_mpt_alibi_tensor function called with that value, not through the model.
"""
from __future__ import annotations

import pytest
import torch
from transformers import MptConfig, MptForCausalLM
from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

from maga_transformer.models.mpt import mpt_alibi_slopes
from maga_transformer.models.mpt import MptModel
from maga_transformer.models.registry import resolve_model_class
from maga_transformer.test.fixtures import perturb_vector_parameters, tiny_parity_case
from maga_transformer.test.model_test.parity_tests import (  # noqa: F401  (collected here, on `case`)
    test_greedy_tokens_match_generate, test_prompt_logits_match)

BASE = dict(n_layers=2, vocab_size=128, max_seq_len=128, eos_token_id=2, bos_token_id=1)
CASES = {
    "four_heads": dict(d_model=64, n_heads=4),
    "six_heads_clip_qkv": dict(d_model=96, n_heads=6, attn_config=dict(clip_qkv=0.05)),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    torch.manual_seed(1234)
    hf_model = MptForCausalLM(MptConfig(**{**BASE, **CASES[request.param]})).eval()
    perturb_vector_parameters(hf_model)
    return request.param, hf_model, tiny_parity_case(hf_model, str(tmp_path_factory.mktemp(request.param)))


@pytest.mark.parametrize("num_heads,alibi_bias_max", [(4, 8), (6, 8), (6, 4), (12, 16)])
def test_alibi_slopes_match_transformers(num_heads, alibi_bias_max):
    bias = build_mpt_alibi_tensor(num_heads, 5, alibi_bias_max)  # [heads, 1, 5]: slope * (key - last)
    assert torch.allclose(bias[:, 0, 0] / -4, mpt_alibi_slopes(num_heads, alibi_bias_max))


@pytest.mark.parametrize("model_type", ['mpt'])
def test_model_type_aliases_resolve(model_type):
    assert resolve_model_class(model_type, {}) is MptModel
    assert resolve_model_class("", {"model_type": model_type}) is MptModel


@pytest.mark.parametrize("architecture", ['MptForCausalLM'])
def test_architectures_resolve(architecture):
    assert resolve_model_class("", {"architectures": [architecture]}) is MptModel
