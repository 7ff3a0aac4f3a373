"""Tiny checkpoints of every family, for the tensor-parallel tests: each builder writes one into a
directory and returns the model_type to load it with ("" = from config.json). Sizes are chosen so
that TP = 2 splits them (4 or 6 query heads, even MLP widths) and so the awkward cases appear: KV
heads fewer than the ranks (MQA, ChatGLM's groups), a vocabulary the ranks do not divide, ALiBi
slopes past a power of two, partial rotary, parallel residual, MoE with a shared expert, GeGLU."""
from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import torch
import transformers as tf

from maga_transformer.test.fixtures import PARITY_PROMPTS, perturb_vector_parameters, save_original_checkpoint, \
    save_tiny_checkpoint
from maga_transformer.test.model_test.original_layouts import (GLM_GMASK, GLM_MASK, GLM_SOP, baichuan_config,
                                                               baichuan_tensors, chatglm_config, chatglm_tensors,
                                                               glm_v1_config, glm_v1_tensors)

LLAMA_BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, vocab_size=128,
                  max_position_embeddings=128, eos_token_id=2, bos_token_id=1, num_attention_heads=4)
GLM_PROMPTS = [[5, 9, 17, 33, 65, 7, 3, 11, 13, 99, 100, GLM_GMASK, GLM_SOP], [12, 40, 41, GLM_MASK, 50, GLM_SOP],
               [7, 7, 120, 3, 64, 64, 9, 10, 12]]


def _hf(config_cls, model_cls, perturb: bool = True, **config) -> Callable[[str], str]:
    def build(directory: str) -> str:
        torch.manual_seed(1234)
        model = model_cls(config_cls(**config)).eval()
        with torch.no_grad():  # MoE routers start at zero in transformers: sharp random ones make routing matter
            for name, param in model.named_parameters():
                if name.endswith(("mlp.gate.weight", "shared_expert_gate.weight", "block_sparse_moe.gate.weight")):
                    param.normal_(0, 1.0)
        if perturb:
            perturb_vector_parameters(model)
        save_tiny_checkpoint(model, directory)
        return ""
    return build


def _baichuan2_13b(directory: str) -> str:
    torch.manual_seed(1234)
    sizes = dict(hidden_size=96, num_attention_heads=6, intermediate_size=128, num_hidden_layers=2, vocab_size=128)
    llama = tf.LlamaForCausalLM(tf.LlamaConfig(**sizes, rms_norm_eps=1e-6)).eval()
    perturb_vector_parameters(llama)
    save_original_checkpoint(directory, baichuan_config("BaichuanForCausalLM", sizes), baichuan_tensors(llama), 128)
    return "baichuan2_13b"


def _chatglm2(directory: str) -> str:
    torch.manual_seed(1234)
    glm = tf.GlmForCausalLM(tf.GlmConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
        head_dim=16, vocab_size=128, max_position_embeddings=128, rms_norm_eps=1e-5, attention_bias=True,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})).eval()
    perturb_vector_parameters(glm)
    save_original_checkpoint(directory, chatglm_config(1, 16, 1.0, "chatglm"), chatglm_tensors(glm), 128)
    return ""


def _glm_v1(two_d: bool) -> Callable[[str], str]:
    def build(directory: str) -> str:
        state = glm_v1_tensors(64, 4, 96, 128, 2, geglu=not two_d, tied=not two_d)
        save_original_checkpoint(directory, glm_v1_config(two_d), state, 128)
        return "" if two_d else "glm_130b"
    return build


# name: (builder, prompts, tp size)
CASES: Dict[str, Tuple[Callable[[str], str], List[List[int]], int]] = {
    # one KV head for two ranks (replicated), and 125 tokens over 2 ranks (the LM head padded)
    "llama_mqa_odd_vocab": (_hf(tf.LlamaConfig, tf.LlamaForCausalLM, **{**LLAMA_BASE, "num_key_value_heads": 1,
                                                                        "vocab_size": 125}), PARITY_PROMPTS, 2),
    # biased o and down: the row-parallel bias is added once
    "llama_biased_tied": (_hf(tf.LlamaConfig, tf.LlamaForCausalLM, **LLAMA_BASE, num_key_value_heads=2,
                              attention_bias=True, mlp_bias=True, tie_word_embeddings=True), PARITY_PROMPTS, 2),
    "qwen2": (_hf(tf.Qwen2Config, tf.Qwen2ForCausalLM, **LLAMA_BASE, num_key_value_heads=2), PARITY_PROMPTS, 2),
    "qwen3_qk_norm": (_hf(tf.Qwen3Config, tf.Qwen3ForCausalLM, **LLAMA_BASE, num_key_value_heads=2, head_dim=32),
                      PARITY_PROMPTS, 2),
    "mixtral": (_hf(tf.MixtralConfig, tf.MixtralForCausalLM, **{**LLAMA_BASE, "intermediate_size": 96},
                    num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2), PARITY_PROMPTS, 2),
    "qwen2_moe_shared": (_hf(tf.Qwen2MoeConfig, tf.Qwen2MoeForCausalLM, **{**LLAMA_BASE, "intermediate_size": 96},
                             num_key_value_heads=2, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                             num_experts=4, num_experts_per_tok=2, mlp_only_layers=[0]), PARITY_PROMPTS, 2),
    "bloom_alibi": (_hf(tf.BloomConfig, tf.BloomForCausalLM, n_layer=2, vocab_size=128, hidden_size=96, n_head=6,
                        eos_token_id=2, bos_token_id=1), PARITY_PROMPTS, 2),
    "mpt_alibi_clip": (_hf(tf.MptConfig, tf.MptForCausalLM, n_layers=2, vocab_size=128, max_seq_len=128,
                           d_model=96, n_heads=6, attn_config=dict(clip_qkv=0.05), eos_token_id=2, bos_token_id=1),
                       PARITY_PROMPTS, 2),
    "gpt_neox_partial_rotary": (_hf(tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM, **LLAMA_BASE,
                                    use_parallel_residual=True, rotary_pct=0.25), PARITY_PROMPTS, 2),
    "phi_parallel": (_hf(tf.PhiConfig, tf.PhiForCausalLM, **LLAMA_BASE, partial_rotary_factor=0.5),
                     PARITY_PROMPTS, 2),
    "falcon_multi_query": (_hf(tf.FalconConfig, tf.FalconForCausalLM, hidden_size=64, num_hidden_layers=2,
                               num_attention_heads=4, vocab_size=128, eos_token_id=2, bos_token_id=1,
                               multi_query=True, parallel_attn=True, new_decoder_architecture=False),
                           PARITY_PROMPTS, 2),
    "falcon_new_decoder": (_hf(tf.FalconConfig, tf.FalconForCausalLM, hidden_size=64, num_hidden_layers=2,
                               num_attention_heads=4, vocab_size=128, eos_token_id=2, bos_token_id=1,
                               new_decoder_architecture=True, num_kv_heads=2), PARITY_PROMPTS, 2),
    "gpt_bigcode_mqa": (_hf(tf.GPTBigCodeConfig, tf.GPTBigCodeForCausalLM, n_embd=64, n_inner=128, n_layer=2,
                            n_head=4, vocab_size=128, n_positions=128, eos_token_id=2, bos_token_id=1,
                            multi_query=True), PARITY_PROMPTS, 2),
    "baichuan2_13b_alibi": (_baichuan2_13b, PARITY_PROMPTS, 2),
    "chatglm2_one_group": (_chatglm2, PARITY_PROMPTS, 2),
    "glm_v1_2d": (_glm_v1(True), GLM_PROMPTS, 2),
    "glm_130b_geglu": (_glm_v1(False), GLM_PROMPTS, 2),
    # GQA with fewer KV heads than ranks: 2 KV heads over 4 ranks, each kept by two of them
    "llama_gqa_tp4": (_hf(tf.LlamaConfig, tf.LlamaForCausalLM, **{**LLAMA_BASE, "num_attention_heads": 8},
                          num_key_value_heads=2), PARITY_PROMPTS, 4),
}
