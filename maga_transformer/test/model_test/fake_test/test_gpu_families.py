"""Every family with a transformers class, in bf16 on the GPU, against that class in bf16 on the
same GPU (logprob-aware, test/gpu_parity.py), through the engine with its CUDA kernels and, for the
rotary and learned-position families with head_dim 64, CUDA-graph decode. Skipped without CUDA;
MAGA_GPU_TEST_DEVICE=cpu runs the same comparison on the CPU (bf16 torch references) to check the
configs themselves. The original-layout families (Baichuan, Qwen v1, ChatGLM) are in
test_gpu_original_families.py."""
from __future__ import annotations

import copy
import os

import pytest
import torch
import transformers as tf

from maga_transformer.config import EngineConfig, ModelConfig
from maga_transformer.config.model_config import ACT_TYPE
from maga_transformer.model_factory import ModelFactory
from maga_transformer.test.fixtures import perturb_vector_parameters, save_tiny_checkpoint
from maga_transformer.test.gpu_parity import assert_bf16_error_like_oracle, assert_logprob_aware_match

DEVICE = os.environ.get("MAGA_GPU_TEST_DEVICE", "cuda")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                                  reason="needs a CUDA GPU")]
NEW_TOKENS = 24
LLAMA_LIKE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, max_position_embeddings=512, eos_token_id=None)
FAMILIES = {  # name -> (config class, model class, config kwargs, CUDA graphs expected)
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", LLAMA_LIKE, True),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**LLAMA_LIKE, "head_dim": 64}, True),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {**LLAMA_LIKE, "num_local_experts": 4,
                                                         "num_experts_per_tok": 2}, True),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(
        hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, vocab_size=512,
        max_position_embeddings=512, rotary_pct=0.5, use_parallel_residual=True, eos_token_id=None), True),
    "phi": ("PhiConfig", "PhiForCausalLM", dict(
        hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, vocab_size=512,
        max_position_embeddings=512, partial_rotary_factor=0.5, eos_token_id=None), True),
    "gpt_bigcode": ("GPTBigCodeConfig", "GPTBigCodeForCausalLM", dict(
        n_embd=256, n_inner=512, n_layer=2, n_head=4, vocab_size=512, n_positions=512, multi_query=True,
        eos_token_id=None), True),
    "falcon": ("FalconConfig", "FalconForCausalLM", dict(
        hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2, vocab_size=512,
        new_decoder_architecture=True, eos_token_id=None), True),
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(
        hidden_size=256, n_layer=2, n_head=4, vocab_size=512, eos_token_id=None), False),
    "mpt": ("MptConfig", "MptForCausalLM", dict(
        d_model=256, n_heads=4, n_layers=2, vocab_size=512, max_seq_len=512, eos_token_id=None), False),
}
PROMPTS = [[1, 5, 9, 17, 33, 65, 7, 3, 11, 13, 99, 100, 4, 8, 21, 34, 55, 89, 44, 23] * 3,
           [1, 42, 43], [1, 7, 7, 7, 120, 3, 64, 64, 9, 10, 12]]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_bf16_matches_transformers_logprob_aware(name, tmp_path):
    config_name, model_name, kwargs, graphs_expected = FAMILIES[name]
    torch.manual_seed(97)
    hf_model = getattr(tf, model_name)(getattr(tf, config_name)(**kwargs)).eval()
    perturb_vector_parameters(hf_model)  # biases and norm weights must be mapped right to matter
    directory = save_tiny_checkpoint(hf_model, str(tmp_path / name))
    ours = ModelFactory.from_huggingface(directory, ModelConfig(seq_size_per_block=16, max_seq_len=512,
                                                                act_type=ACT_TYPE.BF16),
                                         engine_config=EngineConfig(num_kv_blocks=128, max_num_seqs=8, engine_process=False),
                                         device=DEVICE)
    if DEVICE == "cuda":
        # ALiBi families decode eagerly, the others in graphs: say which is which, so a regression shows
        assert (ours.engine.runner.graphs is not None) == graphs_expected, name
    truth = copy.deepcopy(hf_model).to(device=DEVICE)
    hf_model = hf_model.to(device=DEVICE, dtype=torch.bfloat16)
    sequences = assert_logprob_aware_match(name, hf_model, ours, PROMPTS, NEW_TOKENS, DEVICE)
    assert_bf16_error_like_oracle(name, ours, truth, hf_model, sequences, DEVICE)
    ours.stop()
    ours.engine.pool.check_idle()
