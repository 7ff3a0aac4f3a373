"""The original-layout families (checkpoints in their own tensor names and config.json keys) in bf16
on the GPU, through the engine's CUDA kernels and (head_dim 64, rotary) CUDA-graph decode, against the
same oracle as their fp32 CPU test, logprob-aware (test/gpu_parity.py):
- Baichuan-7B: transformers' Llama in bf16, q/k/v packed into W_pack;
- Qwen v1: transformers' Qwen2 in bf16, q/k/v fused into c_attn, MLP renamed;
- ChatGLM2: transformers' GLM in bf16 (two multi-query groups, half-head interleaved rotary);
- Baichuan2-13B: the independent float64 transcription of its modeling code (ALiBi, NormHead;
  decodes without graphs, as every ALiBi family);
- ChatGLM-6B v1 and GLM-130B: the float64 GLM v1 transcription (bidirectional context, 2D / 1D
  positions, DeepNorm; decode without graphs, their positions follow each prompt's layout).
Skipped without CUDA; MAGA_GPU_TEST_DEVICE=cpu runs the same comparison on the CPU."""
from __future__ import annotations

import copy
import os

import pytest
import torch
from transformers import GlmConfig, GlmForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from maga_transformer.config import EngineConfig, ModelConfig
from maga_transformer.config.model_config import ACT_TYPE
from maga_transformer.model_factory import ModelFactory
from maga_transformer.test.fixtures import perturb_vector_parameters, save_original_checkpoint
from maga_transformer.test.gpu_parity import assert_bf16_error_like_oracle, assert_logprob_aware_match
from maga_transformer.test.model_test.original_layouts import (GLM_GMASK, GLM_SOP, BaichuanReference,
                                                               GlmV1Reference, baichuan_config, baichuan_tensors,
                                                               chatglm_config, chatglm_tensors, glm_v1_config,
                                                               glm_v1_tensors, qwen_v1_config, qwen_v1_tensors)

DEVICE = os.environ.get("MAGA_GPU_TEST_DEVICE", "cuda")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                                  reason="needs a CUDA GPU")]
NEW_TOKENS = 24
HIDDEN, HEADS, INTER, VOCAB, CONTEXT = 256, 4, 512, 512, 512
SIZES = dict(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=2, num_attention_heads=HEADS,
             vocab_size=VOCAB, max_position_embeddings=CONTEXT, eos_token_id=None)
PROMPTS = [[1, 5, 9, 17, 33, 65, 7, 3, 11, 13, 99, 100, 4, 8, 21, 34, 55, 89, 44, 23] * 3,
           [1, 42, 43], [1, 7, 7, 7, 120, 3, 64, 64, 9, 10, 12]]


def _perturbed(model):
    perturb_vector_parameters(model)  # biases and norm weights must be mapped right to matter
    return model.eval()


def baichuan_7b():
    llama = _perturbed(LlamaForCausalLM(LlamaConfig(**SIZES, num_key_value_heads=HEADS, rms_norm_eps=1e-6)))
    config = baichuan_config("BaiChuanForCausalLM", SIZES, CONTEXT)
    return llama, config, baichuan_tensors(llama), True


def qwen_v1():
    qwen2 = _perturbed(Qwen2ForCausalLM(Qwen2Config(**SIZES, num_key_value_heads=HEADS, rms_norm_eps=1e-6)))
    config = qwen_v1_config(no_bias=True, hidden=HIDDEN, heads=HEADS, vocab=VOCAB, mlp_width=INTER, context=CONTEXT)
    return qwen2, config, qwen_v1_tensors(qwen2), True


def chatglm2():
    glm = _perturbed(GlmForCausalLM(GlmConfig(
        **SIZES, num_key_value_heads=2, head_dim=HIDDEN // HEADS, rms_norm_eps=1e-5, attention_bias=True, pad_token_id=0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})))
    config = chatglm_config(2, HIDDEN // HEADS, 1.0, "chatglm2", hidden=HIDDEN, ffn=INTER, vocab=VOCAB, context=CONTEXT)
    return glm, config, chatglm_tensors(glm), True


def baichuan2_13b():
    llama = _perturbed(LlamaForCausalLM(LlamaConfig(**SIZES, rms_norm_eps=1e-6)))
    tensors = baichuan_tensors(llama)
    tensors["lm_head.weight"] = tensors["lm_head.weight"] * torch.empty(VOCAB, 1).uniform_(0.2, 5)
    config = {**baichuan_config("BaichuanForCausalLM", SIZES, CONTEXT), "model_type": "baichuan2_13b"}
    return BaichuanReference(tensors, HEADS, 2, norm_head=True), config, tensors, False


def glm_v1(two_d: bool):
    # untied: a tied head makes this random model repeat its input token with logits near 30, where
    # bf16's rounding alone moves the NLL by ~0.1 (the CPU test covers the tied head in fp32)
    tensors = glm_v1_tensors(hidden=HIDDEN, heads=HEADS, inner=INTER, vocab=VOCAB, layers=2, geglu=not two_d,
                             tied=False)
    config = glm_v1_config(two_d, HIDDEN, HEADS, INTER, VOCAB, 2, CONTEXT)
    return GlmV1Reference(tensors, HEADS, 2, two_d=two_d, geglu=not two_d), config, tensors, False


CASES = {"baichuan_7b": baichuan_7b, "qwen_v1": qwen_v1, "chatglm2": chatglm2, "baichuan2_13b": baichuan2_13b,
         "chatglm_6b": lambda: glm_v1(True), "glm_130b": lambda: glm_v1(False)}
# GLM prompts end as GLM's tokenizers end them ([gMASK] <sop>): the reference reads the layout from them
GLM_PROMPTS = [p + [GLM_GMASK, GLM_SOP] for p in PROMPTS]


@pytest.mark.parametrize("name", sorted(CASES))
def test_original_layout_bf16_matches_oracle_logprob_aware(name, tmp_path):
    torch.manual_seed(97)
    oracle, config, tensors, graphs_expected = CASES[name]()
    directory = save_original_checkpoint(str(tmp_path / name), config, tensors, VOCAB)
    ours = ModelFactory.from_huggingface(directory, ModelConfig(seq_size_per_block=16, max_seq_len=CONTEXT,
                                                                act_type=ACT_TYPE.BF16),
                                         engine_config=EngineConfig(num_kv_blocks=128, max_num_seqs=8, engine_process=False),
                                         device=DEVICE)
    if DEVICE == "cuda":
        assert (ours.engine.runner.graphs is not None) == graphs_expected, name
    prompts = GLM_PROMPTS if isinstance(oracle, GlmV1Reference) else PROMPTS
    if isinstance(oracle, torch.nn.Module):
        truth = copy.deepcopy(oracle).to(device=DEVICE)
        oracle = oracle.to(device=DEVICE, dtype=torch.bfloat16)
        sequences = assert_logprob_aware_match(name, oracle, ours, prompts, NEW_TOKENS, DEVICE)
        assert_bf16_error_like_oracle(name, ours, truth, oracle, sequences, DEVICE)
    else:  # the float64 transcription, on the CPU: it is the truth and has no bf16 run
        sequences = assert_logprob_aware_match(name, oracle, ours, prompts, NEW_TOKENS, DEVICE)
        assert_bf16_error_like_oracle(name, ours, lambda ids: oracle(ids.cpu()), None, sequences, DEVICE)
    ours.stop()
    ours.engine.pool.check_idle()
