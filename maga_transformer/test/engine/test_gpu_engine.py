"""The engine on a CUDA GPU (skipped without one): bf16 parity with transformers on the same GPU,
CUDA-graph decode against eager decode, and the KV pool planned from free GPU memory.

bf16 parity is logprob-aware (test/gpu_parity.py): a real bug (wrong rotary, mask, KV slot)
picks tokens far outside the other side's 5 most likely, a near-tie does not.
"""
from __future__ import annotations

import copy
import os
from typing import List

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from maga_transformer.config import EngineConfig, GenerateConfig, ModelConfig
from maga_transformer.config.model_config import ACT_TYPE
from maga_transformer.model_factory import ModelFactory
from maga_transformer.test.fixtures import save_tiny_checkpoint
from maga_transformer.test.gpu_parity import assert_bf16_error_like_oracle, assert_logprob_aware_match, engine_greedy

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

NEW_TOKENS = 32
BASE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, vocab_size=512,
            max_position_embeddings=512, eos_token_id=None, bos_token_id=1)  # no EOS: both run 32 tokens
CASES = {
    "llama_gqa_hd64": (LlamaConfig, LlamaForCausalLM, dict(num_attention_heads=4, num_key_value_heads=2)),
    "llama_mqa_hd128": (LlamaConfig, LlamaForCausalLM, dict(num_attention_heads=4, num_key_value_heads=1,
                                                            head_dim=128)),
    "llama3_rope_bias": (LlamaConfig, LlamaForCausalLM, dict(
        num_attention_heads=8, num_key_value_heads=8, head_dim=64, attention_bias=True, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64})),
    "mistral_sliding": (MistralConfig, MistralForCausalLM, dict(num_attention_heads=4, num_key_value_heads=2,
                                                                sliding_window=16)),
}
PROMPTS = [[1, 5, 9, 17, 33, 65, 7, 3, 11, 13, 99, 100, 4, 8, 21, 34, 55, 89, 44, 23] * 3,
           [1, 42, 43], [1, 7, 7, 7, 120, 3, 64, 64, 9, 10, 12]]


def _build(name: str, tmp_path_factory, dtype: ACT_TYPE, graphs: bool):
    config_cls, model_cls, extra = CASES[name]
    torch.manual_seed(4321)
    hf_model = model_cls(config_cls(**{**BASE, **extra})).eval()
    directory = save_tiny_checkpoint(hf_model, str(tmp_path_factory.mktemp(name)))
    previous = os.environ.get("MAGA_DISABLE_CUDA_GRAPHS")
    os.environ["MAGA_DISABLE_CUDA_GRAPHS"] = "0" if graphs else "1"
    try:
        ours = ModelFactory.from_huggingface(directory, ModelConfig(seq_size_per_block=16, max_seq_len=512,
                                                                    act_type=dtype),
                                             engine_config=EngineConfig(num_kv_blocks=256, max_num_seqs=16, engine_process=False),
                                             device="cuda")
        ours.engine  # the runner (and its graphs) is built with the engine
    finally:
        if previous is None:
            del os.environ["MAGA_DISABLE_CUDA_GRAPHS"]
        else:
            os.environ["MAGA_DISABLE_CUDA_GRAPHS"] = previous
    return hf_model, ours


def _run(model, prompts: List[List[int]]):
    return engine_greedy(model, prompts, NEW_TOKENS)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bf16_greedy_matches_transformers_logprob_aware(name, tmp_path_factory):
    hf_model, ours = _build(name, tmp_path_factory, ACT_TYPE.BF16, graphs=True)
    assert ours.engine.runner.graphs is not None, "decode should run in CUDA graphs"
    truth = copy.deepcopy(hf_model).to(device="cuda")
    hf_model = hf_model.to(device="cuda", dtype=torch.bfloat16)
    sequences = assert_logprob_aware_match(name, hf_model, ours, PROMPTS, NEW_TOKENS, "cuda")
    assert_bf16_error_like_oracle(name, ours, truth, hf_model, sequences, "cuda")
    ours.stop()
    ours.engine.pool.check_idle()


@pytest.mark.parametrize("name", ["llama_gqa_hd64", "mistral_sliding"])
def test_graph_decode_equals_eager_decode(name, tmp_path_factory):
    """fp32: the graphs replay the same kernels as the eager path, so tokens and log-probs agree."""
    _, graphed = _build(name, tmp_path_factory, ACT_TYPE.FP32, graphs=True)
    _, eager = _build(name, tmp_path_factory, ACT_TYPE.FP32, graphs=False)
    assert graphed.engine.runner.graphs is not None and eager.engine.runner.graphs is None
    prompts = PROMPTS + [[1, 3, 5, 7, 9] * k for k in range(1, 19)]  # 21 sequences: a padded bucket (32)
    for a, b in zip(_run(graphed, prompts), _run(eager, prompts)):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=0, atol=1e-4)
    graphed.stop()
    eager.stop()


def test_kv_pool_planned_from_free_gpu_memory(tmp_path_factory, caplog):
    config_cls, model_cls, extra = CASES["llama_gqa_hd64"]
    directory = save_tiny_checkpoint(model_cls(config_cls(**{**BASE, **extra})),
                                     str(tmp_path_factory.mktemp("plan")))
    caplog.set_level("INFO")
    model = ModelFactory.from_huggingface(directory, ModelConfig(act_type=ACT_TYPE.BF16, max_seq_len=512),
                                          engine_config=EngineConfig(engine_process=False), device="cuda")
    engine = model.engine
    free, total = torch.cuda.mem_get_info()
    assert engine.pool.num_blocks * engine.block_size > 100_000  # a tiny model: most of the card is KV
    assert total - free <= 0.93 * total  # within GPU_MEMORY_UTILIZATION (and the reserve) of the card
    assert any("KV cache:" in r.getMessage() and "tokens" in r.getMessage() for r in caplog.records)
    out = _run(model, PROMPTS[:1])[0]
    assert len(out.token_ids) == NEW_TOKENS
    model.stop()
    del engine, model
    torch.cuda.empty_cache()


def test_overlap_scheduling_changes_nothing_on_the_gpu(tmp_path_factory):
    """bf16 with graphs: the same requests with overlap scheduling on (the CUDA default) and off give
    the same tokens and log-probs (same batches, same kernels), and the overlapped run really looked
    ahead; seeded sampling included. The EOS-free config runs every request to its length."""
    _, ours = _build("llama_gqa_hd64", tmp_path_factory, ACT_TYPE.BF16, graphs=True)
    engine = ours.engine
    assert engine.overlap, "overlap scheduling is on by default on CUDA"
    prompts = PROMPTS + [[1, 3, 5, 7, 9] * k for k in range(1, 10)]
    configs = [GenerateConfig(max_new_tokens=NEW_TOKENS, top_k=1),
               GenerateConfig(max_new_tokens=NEW_TOKENS - 5, temperature=0.7, top_p=0.9, random_seed=3)]
    results = []
    for overlap in (True, False):
        engine.overlap = overlap
        before = engine.num_look_ahead_steps
        handles = [engine.add_request(p, configs[i % 2]) for i, p in enumerate(prompts)]
        engine.run_until_idle()
        results.append([(o.token_ids, o.logprobs) for h in handles for o in h.result().outputs])
        assert (engine.num_look_ahead_steps > before) == overlap
    assert results[0] == results[1]
    ours.stop()
    engine.pool.check_idle()
