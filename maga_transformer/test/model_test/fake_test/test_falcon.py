"""Falcon parity with transformers' FalconForCausalLM, through the engine (batched, paged).

Oracle: tiny random-weight models built with FalconConfig: the 7B layout (multi-query, parallel
attention off one LayerNorm), the new decoder architecture (grouped K/V heads, ln_attn + ln_mlp),
MHA with sequential residual and linear biases, and ALiBi instead of rotary. fp32 logits and
per-position NLL within 1e-4 absolute, and 32 greedy tokens equal to transformers' generate.
"""
from __future__ import annotations

import pytest
import torch
from transformers import FalconConfig, FalconForCausalLM

from maga_transformer.models.falcon import FalconModel
from maga_transformer.models.registry import resolve_model_class
from maga_transformer.test.fixtures import perturb_vector_parameters, tiny_parity_case
from maga_transformer.test.model_test.parity_tests import (  # noqa: F401  (collected here, on `case`)
    test_greedy_tokens_match_generate, test_prompt_logits_match)

BASE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
            max_position_embeddings=128, eos_token_id=2, bos_token_id=1, ffn_hidden_size=128)
CASES = {
    "falcon7b_multi_query": dict(multi_query=True, parallel_attn=True, new_decoder_architecture=False),
    "new_decoder_architecture": dict(new_decoder_architecture=True, num_kv_heads=2),
    "mha_sequential_bias": dict(multi_query=False, parallel_attn=False, bias=True),
    "alibi": dict(alibi=True, multi_query=False, parallel_attn=True, bias=True),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    torch.manual_seed(1234)
    hf_model = FalconForCausalLM(FalconConfig(**{**BASE, **CASES[request.param]})).eval()
    perturb_vector_parameters(hf_model)
    return request.param, hf_model, tiny_parity_case(hf_model, str(tmp_path_factory.mktemp(request.param)))


@pytest.mark.parametrize("model_type", ['falcon', 'RefinedWebModel', 'RefinedWeb'])
def test_model_type_aliases_resolve(model_type):
    assert resolve_model_class(model_type, {}) is FalconModel
    assert resolve_model_class("", {"model_type": model_type}) is FalconModel


@pytest.mark.parametrize("architecture", ['FalconForCausalLM', 'RWForCausalLM'])
def test_architectures_resolve(architecture):
    assert resolve_model_class("", {"architectures": [architecture]}) is FalconModel


def test_original_rw_configs():
    """RW checkpoints' config.json (before transformers' FalconConfig): n_head / n_layer / n_head_kv."""
    rw_7b = dict(model_type="RefinedWebModel", hidden_size=4544, n_head=71, n_layer=32, vocab_size=65024,
                 multi_query=True, parallel_attn=True, bias=False, alibi=False, layer_norm_epsilon=1e-5)
    arch = FalconModel.arch_from_hf_config(rw_7b)
    assert (arch.num_heads, arch.num_kv_heads, arch.num_layers, arch.head_dim) == (71, 1, 32, 64)
    assert arch.parallel_residual and arch.shared_block_norm and arch.position_encoding == "rope"
    rw_40b = dict(model_type="RefinedWeb", hidden_size=8192, n_head=128, n_head_kv=8, n_layer=60, vocab_size=65024,
                  parallel_attn=True, bias=False, alibi=False)
    arch = FalconModel.arch_from_hf_config(rw_40b)
    assert (arch.num_heads, arch.num_kv_heads) == (128, 8)
    assert arch.parallel_residual and not arch.shared_block_norm
