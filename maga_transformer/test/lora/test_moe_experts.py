"""LoRA on MoE experts where transformers 5 keeps them as 3-D tensors (PEFT's target_parameters),
for Mixtral and Qwen2-MoE: each adapter, mixed with the other and the base model in one batch,
equals PEFT's merged model in fp32 (greedy tokens and prompt log-probs)."""
from __future__ import annotations

import pytest
import torch

from maga_transformer.config import GenerateConfig
from maga_transformer.test.lora.engine_util import lora_engine_model
from maga_transformer.test.lora.peft_cases import (EXPERT_ADAPTERS, PROMPTS, build_case, reference_greedy,
                                                   reference_prompt_logprobs)

NAMES = [None] + sorted(EXPERT_ADAPTERS)


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe"])
def served(request, tmp_path_factory):
    case = build_case(request.param, str(tmp_path_factory.mktemp(f"experts_{request.param}")), EXPERT_ADAPTERS)
    model = lora_engine_model(case.base_dir, case.adapter_dirs)
    yield case, model.engine
    model.stop()


def test_expert_adapters_match_peft_merged(served):
    case, engine = served
    greedy = [(n, p, engine.add_request(p, GenerateConfig(max_new_tokens=10, top_k=1, adapter_name=n)))
              for p in PROMPTS for n in NAMES]
    loss = [(n, p, engine.add_request(p, GenerateConfig(max_new_tokens=1, top_k=1, calculate_loss=2,
                                                         adapter_name=n))) for p in PROMPTS for n in NAMES]
    engine.run_until_idle()
    for name, prompt, handle in greedy:
        oracle = case.base if name is None else case.merged[name]
        assert handle.result().outputs[0].token_ids == reference_greedy(oracle, prompt, 10), (case.family, name)
    for name, prompt, handle in loss:
        oracle = case.base if name is None else case.merged[name]
        ours = -torch.tensor(handle.result().loss, dtype=torch.float64)
        ref = reference_prompt_logprobs(oracle, prompt)
        assert torch.allclose(ours, ref, atol=2e-4), (case.family, name, (ours - ref).abs().max())
        if name is not None:
            assert (ref - reference_prompt_logprobs(case.base, prompt)).abs().max() > 1e-2, name
    engine.pool.check_idle()
