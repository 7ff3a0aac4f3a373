"""Qwen2-MoE and Qwen3-MoE parity with transformers' Qwen2MoeForCausalLM and Qwen3MoeForCausalLM.

Oracle: tiny random-weight models built with Qwen2MoeConfig / Qwen3MoeConfig, saved by transformers,
loaded through our engine (batched, paged). fp32 prompt logits and NLL within 1e-4 and 32 greedy
tokens equal to transformers' generate. Cases cover the shared expert and its sigmoid gate, a dense
layer among sparse ones (mlp_only_layers), top-k weights with and without renormalization, and
Qwen3-MoE's q/k norms.
"""
from __future__ import annotations

import pytest
import torch
from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from maga_transformer.models.registry import resolve_model_class
from maga_transformer.test.fixtures import load_engine_model, save_tiny_checkpoint
from maga_transformer.test.model_test.parity_tests import (  # noqa: F401  (collected here, on `case`)
    test_greedy_tokens_match_generate, test_prompt_logits_match)

BASE = dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2, vocab_size=128,
            max_position_embeddings=128, eos_token_id=2, bos_token_id=1, num_attention_heads=4,
            num_key_value_heads=2, num_experts=4, num_experts_per_tok=2)

CASES = {
    "qwen2_moe_dense_first": (Qwen2MoeConfig, Qwen2MoeForCausalLM,
                              dict(shared_expert_intermediate_size=48, mlp_only_layers=[0], norm_topk_prob=False)),
    "qwen2_moe_normalized": (Qwen2MoeConfig, Qwen2MoeForCausalLM,
                             dict(shared_expert_intermediate_size=48, norm_topk_prob=True)),
    "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM, dict(head_dim=16, norm_topk_prob=True)),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    config_cls, model_cls, extra = CASES[request.param]
    torch.manual_seed(1234)
    hf_model = model_cls(config_cls(**{**BASE, **extra})).eval()
    with torch.no_grad():  # routers init to zero in transformers: random, sharp ones make routing matter
        for name, param in hf_model.named_parameters():
            if name.endswith(("mlp.gate.weight", "shared_expert_gate.weight")):
                param.normal_(0, 1.0)
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                param.uniform_(0.5, 1.5)
    directory = save_tiny_checkpoint(hf_model, str(tmp_path_factory.mktemp(request.param)))
    return request.param, hf_model, load_engine_model(directory, max_seq_len=128)


def test_registry_names():
    assert resolve_model_class("", {"architectures": ["Qwen2MoeForCausalLM"]}).__name__ == "Qwen2MoeModel"
    assert resolve_model_class("qwen3_moe", {}).__name__ == "Qwen3MoeModel"
