"""LLaVA v1.5 (original layout) served as its language model: parity with transformers' LlamaForCausalLM.

Oracle: a tiny random LlamaForCausalLM. Its tensors are written under LLaVA's original names (the
LLaMA names, plus model.mm_projector.* and model.vision_tower.* that text generation must not touch)
with a LLaVA config.json (model_type llava, LlavaLlamaForCausalLM, mm_* keys), then loaded through our
engine (batched, paged). fp32 prompt logits and NLL within 1e-4 and 32 greedy tokens equal to
transformers' generate: the projector and vision tensors change nothing.
"""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from maga_transformer.models.llava import LlavaModel
from maga_transformer.models.registry import resolve_model_class
from maga_transformer.test.fixtures import load_engine_model, perturb_vector_parameters, save_original_checkpoint
from maga_transformer.test.model_test.parity_tests import (  # noqa: F401  (collected here, on `case`)
    test_greedy_tokens_match_generate, test_prompt_logits_match)

SIZES = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4,
             num_hidden_layers=2, vocab_size=128, max_position_embeddings=128, rms_norm_eps=1e-5)


def llava_config() -> dict:
    return dict(architectures=["LlavaLlamaForCausalLM"], model_type="llava", **SIZES, hidden_act="silu",
                bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False, torch_dtype="float32",
                mm_hidden_size=32, mm_projector_type="mlp2x_gelu", mm_vision_tower="openai/clip-vit-large-patch14-336",
                mm_vision_select_layer=-2, mm_use_im_start_end=False, image_aspect_ratio="pad")


def llava_tensors(llama: LlamaForCausalLM) -> dict:
    state = {k: v.clone() for k, v in llama.state_dict().items()}
    hidden = SIZES["hidden_size"]
    state.update({"model.mm_projector.0.weight": torch.randn(hidden, 32), "model.mm_projector.0.bias": torch.randn(hidden),
                  "model.mm_projector.2.weight": torch.randn(hidden, hidden),
                  "model.mm_projector.2.bias": torch.randn(hidden),
                  "model.vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight":
                      torch.randn(32, 3, 14, 14)})
    return state


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    torch.manual_seed(1234)
    llama = LlamaForCausalLM(LlamaConfig(**SIZES, bos_token_id=1, eos_token_id=2)).eval()
    perturb_vector_parameters(llama)
    directory = save_original_checkpoint(str(tmp_path_factory.mktemp("llava")), llava_config(),
                                         llava_tensors(llama), SIZES["vocab_size"])
    return "llava", llama, load_engine_model(directory, max_seq_len=128)


def test_registry_names():
    assert resolve_model_class("llava", {}) is LlavaModel
    assert resolve_model_class("", {"architectures": ["LlavaLlamaForCausalLM"]}) is LlavaModel


def test_converted_layout_is_refused_by_name():
    with pytest.raises(ValueError, match="text_config"):
        LlavaModel.arch_from_hf_config({"model_type": "llava", "text_config": {"vocab_size": 32064}})
