"""Qwen v1 (QWenLMHeadModel) parity with transformers' Qwen2ForCausalLM on the same weights.

Oracle: a tiny random Qwen2ForCausalLM (multi-head, biased q/k/v, no o bias, as Qwen v1 with
no_bias=true). Its weights are written in Qwen v1's original layout (transformer.wte, transformer.h.N.
ln_1 / attn.c_attn = [q; k; v] with bias / attn.c_proj / ln_2 / mlp.w2 = gate / mlp.w1 = up /
mlp.c_proj = down, transformer.ln_f) with a Qwen v1 config.json (kv_channels, seq_length,
intermediate_size twice the MLP width), then loaded through our engine (batched, paged). The
no_bias=false case maps transformers' LlamaForCausalLM with attention_bias and mlp_bias instead.
fp32 prompt logits and NLL within 1e-4 and 32 greedy tokens equal to transformers' generate.
"""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from maga_transformer.models.qwen_v1 import QWenModel, QWenVLModel
from maga_transformer.models.registry import resolve_model_class
from maga_transformer.test.fixtures import load_engine_model, save_original_checkpoint
from maga_transformer.test.model_test.original_layouts import qwen_v1_config, qwen_v1_tensors
from maga_transformer.test.model_test.parity_tests import (  # noqa: F401  (collected here, on `case`)
    test_greedy_tokens_match_generate, test_prompt_logits_match)

SIZES = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=2, vocab_size=128,
             max_position_embeddings=128, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)
MLP_WIDTH = 96
VISUAL = {"image_size": 448, "patch_size": 14, "width": 32, "layers": 1, "heads": 2, "output_dim": 64}


def qwen_vl_extras(config: dict, tensors: dict) -> None:
    """Qwen-VL's checkpoint: the same language model plus a vision transformer text must not touch."""
    config["visual"] = VISUAL
    tensors.update({"transformer.visual.conv1.weight": torch.randn(32, 3, 14, 14),
                    "transformer.visual.proj": torch.randn(32, 64),
                    "transformer.visual.transformer.resblocks.0.attn.in_proj_weight": torch.randn(96, 32)})


@pytest.fixture(scope="module", params=["no_bias", "biased", "qwen_vl"])
def case(request, tmp_path_factory):
    torch.manual_seed(1234)
    if request.param != "biased":
        hf_model = Qwen2ForCausalLM(Qwen2Config(**SIZES, intermediate_size=MLP_WIDTH)).eval()
    else:
        hf_model = LlamaForCausalLM(LlamaConfig(**SIZES, intermediate_size=MLP_WIDTH, attention_bias=True,
                                                mlp_bias=True)).eval()
    with torch.no_grad():  # transformers initialises biases to zero; random ones make the test see them
        for name, param in hf_model.named_parameters():
            if name.endswith(".bias"):
                param.uniform_(-0.5, 0.5)
    config, tensors = qwen_v1_config(no_bias=request.param != "biased"), qwen_v1_tensors(hf_model)
    if request.param == "qwen_vl":
        qwen_vl_extras(config, tensors)
    directory = save_original_checkpoint(str(tmp_path_factory.mktemp(request.param)), config, tensors,
                                         SIZES["vocab_size"])
    return request.param, hf_model, load_engine_model(directory, max_seq_len=128)


def test_registry_names():
    for model_type in ("qwen", "qwen_7b", "qwen_13b", "qwen_1b8"):
        assert resolve_model_class(model_type, {}) is QWenModel
    assert resolve_model_class("", {"architectures": ["QWenLMHeadModel"]}) is QWenModel
    assert resolve_model_class("qwen_vl", {}) is QWenVLModel
    assert resolve_model_class("", {"model_type": "qwen", "visual": VISUAL}) is QWenVLModel


def test_long_context_features_cap_the_context():
    """Dynamic NTK and logn scaling act only past seq_length, so the default context stops there."""
    hf = {**qwen_v1_config(True), "max_position_embeddings": 32768}
    assert QWenModel.arch_from_hf_config(hf).context_length == 32768
    hf.update(use_dynamic_ntk=True, use_logn_attn=True)
    assert QWenModel.arch_from_hf_config(hf).context_length == 128
