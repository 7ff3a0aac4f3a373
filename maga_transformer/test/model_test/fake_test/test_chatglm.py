"""ChatGLM2 / ChatGLM3 parity with transformers' GlmForCausalLM on the same weights.

Oracle: a tiny random GlmForCausalLM (GLM-4 in transformers: RMSNorm, biased q/k/v, multi-query
groups, fused [gate; up], rotary on half of each head in interleaved pairs, the same math as
ChatGLM2's modeling code). Its weights are written in ChatGLM2's original layout
(transformer.embedding.word_embeddings, transformer.encoder.layers.N.self_attention.query_key_value =
[q; k; v] with bias, .dense, .mlp.dense_h_to_4h / dense_4h_to_h, transformer.encoder.final_layernorm,
transformer.output_layer) with a ChatGLM2 config.json (rope_ratio scales the rotary base as in
ChatGLM3), then loaded through our engine (batched, paged). fp32 prompt logits and NLL within 1e-4
and 32 greedy tokens equal to transformers' generate.
"""
from __future__ import annotations

import pytest
import torch
from transformers import GlmConfig, GlmForCausalLM

from maga_transformer.models.chatglm import ChatGLMModel, interleaved_to_halves
from maga_transformer.models.glm import GlmV1Model
from maga_transformer.models.registry import resolve_model_class
from maga_transformer.test.fixtures import load_engine_model, save_original_checkpoint
from maga_transformer.test.model_test.original_layouts import chatglm_config, chatglm_tensors
from maga_transformer.test.model_test.parity_tests import (  # noqa: F401  (collected here, on `case`)
    test_greedy_tokens_match_generate, test_prompt_logits_match)

CASES = {  # name: (kv groups, head_dim, rope_ratio, model_type)
    "chatglm2_two_groups": (2, 16, 1.0, "chatglm"),
    "chatglm3_one_group_rope_ratio": (1, 32, 3.0, "chatglm3"),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    groups, head_dim, rope_ratio, model_type = CASES[request.param]
    torch.manual_seed(1234)
    glm = GlmForCausalLM(GlmConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=groups, head_dim=head_dim, vocab_size=128, max_position_embeddings=128,
        rms_norm_eps=1e-5, attention_bias=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0 * rope_ratio,
                         "partial_rotary_factor": 0.5})).eval()
    with torch.no_grad():  # transformers initialises biases to zero; random ones make the test see them
        for name, param in glm.named_parameters():
            if name.endswith(".bias"):
                param.uniform_(-0.5, 0.5)
    directory = save_original_checkpoint(str(tmp_path_factory.mktemp(request.param)),
                                         chatglm_config(groups, head_dim, rope_ratio, model_type),
                                         chatglm_tensors(glm), 128)
    return request.param, glm, load_engine_model(directory, max_seq_len=128)


def test_registry_names():
    for model_type in ("chatglm", "chat_glm", "chatglm2", "chat_glm_2", "chatglm3", "chat_glm_3"):
        assert resolve_model_class(model_type, {}) is ChatGLMModel
    for architecture in ("ChatGLMModel", "ChatGLMForConditionalGeneration"):
        assert resolve_model_class("", {"architectures": [architecture]}) is ChatGLMModel


def test_chatglm_v1_config_goes_to_the_glm_v1_family():
    v1 = dict(model_type="chatglm", hidden_size=64, num_attention_heads=4, num_layers=2, vocab_size=128,
              inner_hidden_size=256, position_encoding_2d=True)
    assert resolve_model_class("chatglm", v1) is GlmV1Model
    assert resolve_model_class("", {**v1, "architectures": ["ChatGLMModel"]}) is GlmV1Model


def test_interleaved_to_halves_keeps_the_unrotated_channels():
    rows = torch.arange(2 * 8).float().unsqueeze(-1)  # 2 heads of 8 channels, 4 rotated
    out = interleaved_to_halves(rows, head_dim=8, rotary_dim=4).squeeze(-1).tolist()
    assert out == [0, 2, 1, 3, 4, 5, 6, 7, 8, 10, 9, 11, 12, 13, 14, 15]
