"""Mixtral (sparse MoE) parity with transformers' MixtralForCausalLM.

Oracle: tiny random-weight models built with MixtralConfig, saved by transformers (original
block_sparse_moe.experts.E.w1/w2/w3 names), loaded through our engine (batched, paged). fp32 prompt
logits and NLL within 1e-4 and 32 greedy tokens equal to transformers' generate. Also: the
fixed-shape path CUDA graph capture uses gives the grouped path's result.
"""
from __future__ import annotations

import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM

from maga_transformer import ops
from maga_transformer.models.moe import MoeWeights, moe_mlp, moe_mlp_dense, route
from maga_transformer.test.fixtures import load_engine_model, save_tiny_checkpoint
from maga_transformer.test.model_test.parity_tests import (  # noqa: F401  (collected here, on `case`)
    test_greedy_tokens_match_generate, test_prompt_logits_match)

BASE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, vocab_size=128, max_position_embeddings=128,
            eos_token_id=2, bos_token_id=1, num_attention_heads=4, num_key_value_heads=2)

CASES = {
    "top2_of_4": dict(num_local_experts=4, num_experts_per_tok=2),
    "top1_of_3_sliding": dict(num_local_experts=3, num_experts_per_tok=1, sliding_window=8),
    "top3_of_5_tied": dict(num_local_experts=5, num_experts_per_tok=3, tie_word_embeddings=True),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    torch.manual_seed(1234)
    hf_model = MixtralForCausalLM(MixtralConfig(**{**BASE, **CASES[request.param]})).eval()
    with torch.no_grad():  # a sharper router than the init's, so routing differs token to token
        for layer in hf_model.model.layers:
            layer.mlp.gate.weight.mul_(20.0)
    directory = save_tiny_checkpoint(hf_model, str(tmp_path_factory.mktemp(request.param)))
    return request.param, hf_model, load_engine_model(directory, max_seq_len=128)


def test_dense_path_equals_grouped_path():
    torch.manual_seed(0)
    experts, hidden, inter = 4, 16, 24
    lin = lambda *shape: ops.prepare_linear(torch.randn(*shape))  # noqa: E731
    moe = MoeWeights(router=lin(experts, hidden), gate_up=[lin(2 * inter, hidden) for _ in range(experts)],
                     down=[lin(hidden, inter) for _ in range(experts)], top_k=2, normalize=True)
    x = torch.randn(10, hidden)
    weights, chosen = route(x, moe)
    assert torch.allclose(weights.sum(-1), torch.ones(10))
    assert torch.allclose(moe_mlp(x, moe), moe_mlp_dense(x, moe, weights, chosen), atol=1e-4)
