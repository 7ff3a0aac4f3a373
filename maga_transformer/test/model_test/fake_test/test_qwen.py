"""Qwen2 / Qwen2.5 and Qwen3 parity with transformers' Qwen2ForCausalLM and Qwen3ForCausalLM.

Oracle: tiny random-weight models built with Qwen2Config / Qwen3Config, saved by transformers, loaded
through our engine (batched, paged). fp32 prompt logits and NLL within 1e-4 (the bound
test_llama_family.py explains), and 32 greedy tokens equal to transformers' generate. The cases cover
Qwen2's q/k/v bias, its sliding window when use_sliding_window is set (and ignored when not), tied
embeddings, and Qwen3's per-head q/k RMSNorm with an explicit head_dim.
"""
from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from maga_transformer.models.qwen import qwen_sliding_window
from maga_transformer.models.registry import resolve_model_class
from maga_transformer.test.fixtures import load_engine_model, save_tiny_checkpoint
from maga_transformer.test.model_test.parity_tests import (  # noqa: F401  (collected here, on `case`)
    test_greedy_tokens_match_generate, test_prompt_logits_match)

BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, vocab_size=128,
            max_position_embeddings=128, eos_token_id=2, bos_token_id=1, num_attention_heads=4)

CASES = {
    "qwen2_gqa": (Qwen2Config, Qwen2ForCausalLM, dict(num_key_value_heads=2)),
    "qwen2_tied_window_off": (Qwen2Config, Qwen2ForCausalLM,
                              dict(num_key_value_heads=1, tie_word_embeddings=True, use_sliding_window=False,
                                   sliding_window=4)),
    "qwen2_sliding": (Qwen2Config, Qwen2ForCausalLM,
                      dict(num_key_value_heads=2, use_sliding_window=True, sliding_window=8, max_window_layers=0)),
    "qwen3_qk_norm": (Qwen3Config, Qwen3ForCausalLM, dict(num_key_value_heads=2, head_dim=32)),
    "qwen3_tied_bias": (Qwen3Config, Qwen3ForCausalLM,
                        dict(num_key_value_heads=4, head_dim=16, tie_word_embeddings=True, attention_bias=True)),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    config_cls, model_cls, extra = CASES[request.param]
    torch.manual_seed(1234)
    hf_model = model_cls(config_cls(**{**BASE, **extra})).eval()
    # transformers initialises the q/k norms to ones; random weights make the test see them
    with torch.no_grad():
        for name, param in hf_model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight", "_proj.bias")):
                param.uniform_(0.5, 1.5)
    directory = save_tiny_checkpoint(hf_model, str(tmp_path_factory.mktemp(request.param)))
    return request.param, hf_model, load_engine_model(directory, max_seq_len=128)


def test_registry_names():
    for model_type in ("qwen2", "qwen2.5", "qwen3"):
        assert resolve_model_class(model_type, {}).__name__.startswith("Qwen")
    assert resolve_model_class("", {"architectures": ["Qwen2ForCausalLM"]}).__name__ == "Qwen2Model"
    assert resolve_model_class("", {"architectures": ["Qwen3ForCausalLM"]}).__name__ == "Qwen3Model"


def test_mixed_window_layers_are_refused():
    hf = dict(use_sliding_window=True, sliding_window=8, num_hidden_layers=4, max_window_layers=2)
    with pytest.raises(ValueError, match="not supported yet"):
        qwen_sliding_window(hf)
    assert qwen_sliding_window({**hf, "use_sliding_window": False}) is None
