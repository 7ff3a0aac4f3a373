"""Baichuan-7B / Baichuan2-7B parity with transformers' LlamaForCausalLM on the same weights.

Oracle: a tiny random LlamaForCausalLM. Its weights are written in Baichuan's original layout
(config.json with Baichuan keys; self_attn.W_pack = [q; k; v]) and loaded through our engine (batched,
paged). For Baichuan2 the checkpoint's lm_head rows get random scales, and the oracle holds the
L2-normalized rows (what Baichuan2's NormHead computes). fp32 prompt logits and NLL within 1e-4 and 32
greedy tokens equal to transformers' generate.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from maga_transformer.models.baichuan import BaichuanModel
from maga_transformer.models.registry import resolve_model_class
from maga_transformer.test.fixtures import load_engine_model, load_engine_model_as, save_original_checkpoint
from maga_transformer.test.model_test.original_layouts import baichuan_config, baichuan_tensors
from maga_transformer.test.model_test.parity_tests import (  # noqa: F401  (collected here, on `case`)
    test_greedy_tokens_match_generate, test_prompt_logits_match)

SIZES = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2, vocab_size=128)


def build(name: str, directory: str):
    torch.manual_seed(1234)
    llama = LlamaForCausalLM(LlamaConfig(**SIZES, num_key_value_heads=4, max_position_embeddings=128,
                                         rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)).eval()
    architecture = "BaiChuanForCausalLM" if name == "baichuan_7b" else "BaichuanForCausalLM"
    tensors = baichuan_tensors(llama)
    if name == "baichuan2_7b":
        # raw NormHead rows of varied length; the oracle sees them normalized
        tensors["lm_head.weight"] = tensors["lm_head.weight"] * torch.empty(SIZES["vocab_size"], 1).uniform_(0.2, 5)
        with torch.no_grad():
            llama.lm_head.weight.copy_(F.normalize(tensors["lm_head.weight"], dim=-1))
    save_original_checkpoint(directory, baichuan_config(architecture, SIZES), tensors, SIZES["vocab_size"])
    if name == "baichuan2_7b":
        return llama, load_engine_model_as(directory, "baichuan2", max_seq_len=128)
    return llama, load_engine_model(directory, max_seq_len=128)


@pytest.fixture(scope="module", params=["baichuan_7b", "baichuan2_7b"])
def case(request, tmp_path_factory):
    hf_model, model = build(request.param, str(tmp_path_factory.mktemp(request.param)))
    return request.param, hf_model, model


def test_registry_and_variants():
    assert resolve_model_class("", {"architectures": ["BaiChuanForCausalLM"]}) is BaichuanModel
    assert resolve_model_class("", {"model_type": "baichuan"}) is BaichuanModel
    assert resolve_model_class("baichuan2", {}).force_norm_head
    # Baichuan2's vocabulary marks a Baichuan2 checkpoint that says model_type "baichuan"
    arch = BaichuanModel.arch_from_hf_config({**baichuan_config("BaichuanForCausalLM", SIZES), "vocab_size": 125696})
    assert BaichuanModel(arch, torch.float32, torch.device("cpu")).normalizes_lm_head()
    with pytest.raises(ValueError, match="ALiBi"):
        BaichuanModel.arch_from_hf_config({**baichuan_config("BaichuanForCausalLM", SIZES), "num_hidden_layers": 40})
