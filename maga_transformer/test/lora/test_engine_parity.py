"""Each adapter, served unmerged beside the others and the base model in one batch, equals PEFT's
merged model (merge_and_unload) in fp32: greedy tokens and every prompt position's log-prob.

Oracle: PEFT itself (get_peft_model on a transformers model, save_pretrained, merge_and_unload), for
tiny random LLaMA, Qwen2 and Qwen2-MoE; three adapters of ranks 4, 16 (rsLoRA) and 8 with different
target modules (q/v only; every projection; o + up/down only, so gate/up is half adapted).
"""
from __future__ import annotations

import pytest
import torch

from maga_transformer.config import GenerateConfig
from maga_transformer.test.lora.engine_util import lora_engine_model
from maga_transformer.test.lora.peft_cases import (ADAPTERS, PROMPTS, build_case, reference_greedy,
                                                   reference_prompt_logprobs)

NEW_TOKENS = 12
NAMES = [None] + sorted(ADAPTERS)


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen2_moe"])
def served(request, tmp_path_factory):
    case = build_case(request.param, str(tmp_path_factory.mktemp(f"lora_{request.param}")))
    model = lora_engine_model(case.base_dir, case.adapter_dirs)
    yield case, model.engine
    model.stop()


def _oracle(case, name):
    return case.base if name is None else case.merged[name]


def test_mixed_batch_greedy_matches_peft_merged(served):
    case, engine = served
    handles = [(name, prompt, engine.add_request(prompt, GenerateConfig(max_new_tokens=NEW_TOKENS, top_k=1,
                                                                         adapter_name=name)))
               for prompt in PROMPTS for name in NAMES]
    engine.run_until_idle()
    ours = {}
    for name, prompt, handle in handles:
        tokens = handle.result().outputs[0].token_ids
        assert tokens == reference_greedy(_oracle(case, name), prompt, NEW_TOKENS), (case.family, name, prompt)
        ours[(name, tuple(prompt))] = tokens
    # the test can fail: every adapter changes what the base model says on some prompt
    for name in ADAPTERS:
        assert any(ours[(name, tuple(p))] != ours[(None, tuple(p))] for p in PROMPTS), name
    engine.pool.check_idle()


def test_mixed_batch_prompt_logprobs_match_peft_merged(served):
    case, engine = served
    cfg = lambda name: GenerateConfig(max_new_tokens=1, top_k=1, calculate_loss=2, adapter_name=name)  # noqa: E731
    handles = [(name, prompt, engine.add_request(prompt, cfg(name))) for prompt in PROMPTS for name in NAMES]
    engine.run_until_idle()
    for name, prompt, handle in handles:
        ours = -torch.tensor(handle.result().loss, dtype=torch.float64)
        ref = reference_prompt_logprobs(_oracle(case, name), prompt)
        assert torch.allclose(ours, ref, atol=2e-4), (case.family, name, (ours - ref).abs().max())
        if name is not None:  # an adapter that left the log-probs alone would prove nothing
            base = reference_prompt_logprobs(case.base, prompt)
            assert (ref - base).abs().max() > 1e-2, name
    engine.pool.check_idle()
