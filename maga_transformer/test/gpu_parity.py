"""The logprob-aware greedy comparison the GPU tests share (vLLM's check): two bf16 implementations
may break a near-tie differently and then legitimately diverge, so tokens must agree up to the
first difference, and there each side's token must be among the other side's TOP most likely."""
from __future__ import annotations

from typing import List

import torch

from maga_transformer.config import GenerateConfig

TOP = 5


def engine_greedy(model, prompts: List[List[int]], new_tokens: int):
    cfg = GenerateConfig(max_new_tokens=new_tokens, top_k=1, ignore_eos=True, top_logprobs=TOP)
    handles = [model.engine.add_request(p, cfg) for p in prompts]
    model.engine.run_until_idle()
    return [h.result().outputs[0] for h in handles]


def hf_greedy_with_top(hf_model, prompt: List[int], new_tokens: int, device: str):
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt], device=device), max_new_tokens=new_tokens, do_sample=False,
                                output_scores=True, return_dict_in_generate=True, pad_token_id=0,
                                attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=device))
    tokens = out.sequences[0, len(prompt):].tolist()
    return tokens, [set(torch.topk(score[0].float(), TOP).indices.tolist()) for score in out.scores]


def assert_logprob_aware_match(name: str, hf_model, model, prompts: List[List[int]], new_tokens: int,
                               device: str) -> int:
    """Returns how many tokens agreed before the first (tolerated) near-tie divergence."""
    agreed = 0
    for prompt, seq in zip(prompts, engine_greedy(model, prompts, new_tokens)):
        ref_tokens, ref_tops = hf_greedy_with_top(hf_model, prompt, new_tokens, device)
        assert len(ref_tokens) == new_tokens, (name, "transformers stopped early: give the config no EOS")
        for position, (mine, theirs) in enumerate(zip(seq.token_ids, ref_tokens)):
            if mine != theirs:
                my_top = {t for t, _ in seq.top_logprobs[position]}
                assert mine in ref_tops[position] and theirs in my_top, (name, prompt, position)
                break
            agreed += 1
    assert agreed >= new_tokens * len(prompts) // 2, f"{name}: only {agreed} tokens agreed before a near-tie"
    return agreed
