"""Baichuan-13B / Baichuan2-13B (ALiBi) parity with an independent torch reference.

There is no transformers class for these models, so the oracle is a direct float64 transcription of
Baichuan-13B's original modeling_baichuan.py forward: RMSNorm, W_pack split into q/k/v, scores
q.k / sqrt(head_dim) plus the ALiBi mask built from Baichuan's own _get_interleave slopes times the
key position (future keys at -inf), SiLU-gated MLP, and for Baichuan2 the NormHead (L2-normalized
lm_head rows). It shares nothing with our ops: no paging, no ops.alibi_slopes. Weights are random
(a tiny LlamaForCausalLM's init, perturbed norms), written under Baichuan's original names with a
Baichuan config.json, and loaded through our engine (batched, paged) with an explicit model_type.
fp32 prompt logits and NLL within 1e-4 and 32 greedy tokens equal to the reference's greedy decode.
"""
from __future__ import annotations

from typing import Dict

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from maga_transformer.models.baichuan_13b import Baichuan2_13BModel, Baichuan13BModel
from maga_transformer.models.registry import resolve_model_class
from maga_transformer.test.fixtures import (PARITY_PROMPTS, assert_prompt_logits_match, load_engine_model_as,
                                            perturb_vector_parameters, run_greedy, save_original_checkpoint)
from maga_transformer.test.model_test.original_layouts import BAICHUAN_EOS as EOS
from maga_transformer.test.model_test.original_layouts import BaichuanReference

ATOL = 1e-4
NEW_TOKENS = 32
CASES = {  # model_type -> sizes (6 heads exercise the slopes' non-power-of-two tail)
    "baichuan_13b": dict(hidden_size=64, num_attention_heads=4),
    "baichuan2_13b": dict(hidden_size=96, num_attention_heads=6),
}
COMMON = dict(intermediate_size=128, num_hidden_layers=2, vocab_size=128)


def baichuan_state(model_type: str) -> Dict[str, torch.Tensor]:
    """Random weights under Baichuan's original names (q/k/v stacked into W_pack)."""
    torch.manual_seed(1234)
    llama = LlamaForCausalLM(LlamaConfig(**COMMON, **CASES[model_type], rms_norm_eps=1e-6)).eval()
    perturb_vector_parameters(llama)
    state = {k: v.detach().clone() for k, v in llama.state_dict().items()}
    for i in range(COMMON["num_hidden_layers"]):
        prefix = f"model.layers.{i}.self_attn."
        state[prefix + "W_pack.weight"] = torch.cat([state.pop(prefix + f"{p}_proj.weight") for p in "qkv"])
    # raw NormHead rows of varied length: only Baichuan2 normalizes them
    state["lm_head.weight"] = state["lm_head.weight"] * torch.empty(COMMON["vocab_size"], 1).uniform_(0.2, 5)
    return state


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    model_type = request.param
    state = baichuan_state(model_type)
    config = dict(architectures=["BaichuanForCausalLM"], model_type="baichuan", **COMMON, **CASES[model_type],
                  model_max_length=128, rms_norm_eps=1e-6, hidden_act="silu", bos_token_id=1, eos_token_id=EOS,
                  pad_token_id=0, tie_word_embeddings=False, torch_dtype="float32")
    directory = save_original_checkpoint(str(tmp_path_factory.mktemp(model_type)), config, state,
                                         COMMON["vocab_size"])
    reference = BaichuanReference(state, CASES[model_type]["num_attention_heads"], COMMON["num_hidden_layers"],
                                  norm_head=model_type == "baichuan2_13b")
    return model_type, reference, load_engine_model_as(directory, model_type, max_seq_len=128)


def test_prompt_logits_match(case):
    name, reference, model = case
    assert_prompt_logits_match(model.engine, reference, PARITY_PROMPTS, ATOL, name)


def test_greedy_tokens_match_reference(case):
    name, reference, model = case
    ours = run_greedy(model.engine, PARITY_PROMPTS, NEW_TOKENS)
    for prompt, tokens in zip(PARITY_PROMPTS, ours):
        assert tokens == reference.greedy(prompt, NEW_TOKENS), (name, prompt)
    model.engine.pool.check_idle()


def test_model_types_resolve():
    assert resolve_model_class("baichuan_13b", {}) is Baichuan13BModel
    assert resolve_model_class("baichuan2_13b", {"model_type": "baichuan"}) is Baichuan2_13BModel


@pytest.mark.parametrize("vocab,expected", [(64000, Baichuan13BModel), (125696, Baichuan2_13BModel)])
def test_forty_layer_baichuan_config_resolves_to_the_alibi_class(vocab, expected):
    """Real 13B checkpoints say model_type "baichuan" (as the 7B ones do); 40 layers mean ALiBi."""
    from maga_transformer.models import resolve_model_class
    config = dict(model_type="baichuan", architectures=["BaichuanForCausalLM"], num_hidden_layers=40,
                  vocab_size=vocab)
    assert resolve_model_class("", config) is expected
    assert resolve_model_class("baichuan", config) is expected
    config["num_hidden_layers"] = 32
    assert resolve_model_class("", config).__name__ == "BaichuanModel"  # the rotary 7B (NormHead by vocab)
