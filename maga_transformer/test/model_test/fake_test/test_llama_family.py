"""LLaMA family parity with transformers' own classes, through the engine (batched, paged).

Oracle: tiny random-weight models built with transformers' config classes (LlamaConfig,
MistralConfig). Tolerance for fp32 logits: 1e-4 absolute. Our attention pads and masks sequences
and fuses q/k/v and gate/up into single GEMMs, so summation order differs from transformers;
with logits of magnitude ~1 the fp32 rounding error of that is ~1e-6, two orders below the bound,
while any real mistake (a wrong rotary, mask or bias) moves logits by >1e-2.
"""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from maga_transformer.config import GenerateConfig
from maga_transformer.test.fixtures import hf_greedy, load_engine_model, run_greedy, save_tiny_checkpoint

ATOL = 1e-4
NEW_TOKENS = 32
BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, vocab_size=128,
            max_position_embeddings=128, eos_token_id=2, bos_token_id=1)

CASES = {
    "llama_gqa": (LlamaConfig, LlamaForCausalLM, dict(num_attention_heads=4, num_key_value_heads=2)),
    "llama_mha_tied": (LlamaConfig, LlamaForCausalLM,
                       dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)),
    "llama_mqa_head_dim": (LlamaConfig, LlamaForCausalLM,
                           dict(num_attention_heads=4, num_key_value_heads=1, head_dim=32)),
    "rope_linear": (LlamaConfig, LlamaForCausalLM, dict(num_attention_heads=4, num_key_value_heads=2,
                                                        rope_scaling={"rope_type": "linear", "factor": 4.0})),
    # prompt + generation run past max_position_embeddings, so the NTK base really changes per step
    "rope_dynamic": (LlamaConfig, LlamaForCausalLM,
                     dict(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=24,
                          rope_scaling={"rope_type": "dynamic", "factor": 2.0})),
    "rope_llama3": (LlamaConfig, LlamaForCausalLM,
                    dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "bias_internlm": (LlamaConfig, LlamaForCausalLM,
                      dict(num_attention_heads=4, num_key_value_heads=4, attention_bias=True, mlp_bias=True)),
    "mistral_sliding": (MistralConfig, MistralForCausalLM,
                        dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=8)),
}

PROMPTS = [[1, 5, 9, 17, 33, 65, 7, 3, 11, 13, 99, 100, 4, 8, 21, 34, 55, 89, 44, 23],
           [1, 42, 43],
           [1, 7, 7, 7, 120, 3, 64, 64, 9, 10, 2 + 10]]


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    config_cls, model_cls, extra = CASES[request.param]
    torch.manual_seed(1234)
    hf_config = config_cls(**{**BASE, **extra})
    hf_model = model_cls(hf_config).eval()
    directory = save_tiny_checkpoint(hf_model, str(tmp_path_factory.mktemp(request.param)))
    return request.param, hf_model, load_engine_model(directory, max_seq_len=128)


def test_prompt_logits_match(case):
    """Every prompt position: NLL of the next token (calculate_loss=2) and last-position logits."""
    name, hf_model, model = case
    engine = model.engine
    cfg = GenerateConfig(max_new_tokens=1, top_k=1, calculate_loss=2, return_logits=True)
    handles = [engine.add_request(p, cfg) for p in PROMPTS]
    engine.run_until_idle()
    for prompt, handle in zip(PROMPTS, handles):
        out = handle.result()
        with torch.no_grad():
            ref_logits = hf_model(torch.tensor([prompt])).logits[0].float()
        ref_nll = torch.nn.functional.cross_entropy(ref_logits[:-1], torch.tensor(prompt[1:]), reduction="none")
        assert torch.allclose(torch.tensor(out.loss, dtype=torch.float64), ref_nll.double(), atol=ATOL), name
        ours_last = torch.tensor(out.outputs[0].logits)
        assert torch.allclose(ours_last, ref_logits[-1], atol=ATOL), (name, (ours_last - ref_logits[-1]).abs().max())


def test_greedy_tokens_match_generate(case):
    name, hf_model, model = case
    ours = run_greedy(model.engine, PROMPTS, NEW_TOKENS)
    for prompt, tokens in zip(PROMPTS, ours):
        assert tokens == hf_greedy(hf_model, prompt, NEW_TOKENS), name
    model.engine.pool.check_idle()


@pytest.mark.parametrize("hidden_act", ["silu", "gelu", "gelu_pytorch_tanh", "gelu_new"])
def test_gated_mlp_activation_is_transformers_one(hidden_act):
    """Each hidden_act the LLaMA family accepts computes what transformers' ACT2FN does, on inputs
    where the exact and tanh GELUs differ by up to 5e-4 (the tiny parity models never reach them:
    gelu_new once ran as the exact GELU there unnoticed)."""
    from transformers.activations import ACT2FN
    from maga_transformer import ops
    gate_up = torch.linspace(-4, 4, 2 * 512).reshape(1, -1)
    gate, up = gate_up.chunk(2, dim=-1)
    ours = ops.gated_activation(gate_up, ops.gate_kind(hidden_act))
    torch.testing.assert_close(ours, ACT2FN[hidden_act](gate) * up, rtol=0, atol=1e-6)
