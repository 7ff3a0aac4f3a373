"""The bf16 checks the GPU tests share.

1. Logprob-aware greedy comparison (vLLM's check): two bf16 implementations may break a near-tie
   differently and then legitimately diverge, so tokens must agree up to the first difference, and
   there each side's token must be among the other side's TOP most likely.
2. Accuracy against the fp32 truth: on the same token sequences (teacher forcing), our bf16
   per-token NLL may be off the oracle's fp32 NLL by at most RATIO x what the oracle's own bf16 run
   is off, plus SLACK (or by ABS_BOUND where the oracle has no bf16 run). Tie flips cannot fail this
   check, while a real bf16 mistake (a norm or rotary computed at the wrong precision, a wrong
   scale) shows as an error several times transformers'. Measured on the CPU for every family: ours
   0.004-0.047, transformers' 0.004-0.047, per sequence, within 0.002 of each other."""
from __future__ import annotations

from typing import List

import torch

from maga_transformer.config import GenerateConfig

TOP = 5
RATIO, SLACK = 1.5, 0.005
ABS_BOUND = 0.05


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


def reference_greedy_with_top(reference, prompt: List[int], new_tokens: int):
    """The same for an oracle that is only a forward (ids [1, T] -> .logits [1, T, vocab]), e.g. an
    independent transcription of a family's original modeling code: full recompute per token."""
    ids, tops = list(prompt), []
    with torch.no_grad():
        for _ in range(new_tokens):
            last = reference(torch.tensor([ids])).logits[0, -1].float()
            tops.append(set(torch.topk(last, TOP).indices.tolist()))
            ids.append(int(last.argmax()))
    return ids[len(prompt):], tops


def assert_logprob_aware_match(name: str, hf_model, model, prompts: List[List[int]], new_tokens: int,
                               device: str) -> List[List[int]]:
    """hf_model is a transformers model on `device`, or any forward callable (reference_greedy_with_top).
    Returns the oracle's sequences (prompt + its greedy tokens), for assert_bf16_error_like_oracle."""
    sequences = []
    for prompt, seq in zip(prompts, engine_greedy(model, prompts, new_tokens)):
        if hasattr(hf_model, "generate"):
            ref_tokens, ref_tops = hf_greedy_with_top(hf_model, prompt, new_tokens, device)
        else:
            ref_tokens, ref_tops = reference_greedy_with_top(hf_model, prompt, new_tokens)
        assert len(ref_tokens) == new_tokens, (name, "transformers stopped early: give the config no EOS")
        for position, (mine, theirs) in enumerate(zip(seq.token_ids, ref_tokens)):
            if mine != theirs:
                my_top = {t for t, _ in seq.top_logprobs[position]}
                assert mine in ref_tops[position] and theirs in my_top, (name, prompt, position)
                break
        sequences.append(list(prompt) + ref_tokens)
    return sequences


def teacher_forced_nll(forward, ids: List[int], device) -> torch.Tensor:
    """-log p(ids[t + 1] | ids[..t]) from a forward over the whole sequence, in float64 on the CPU."""
    with torch.no_grad():
        logits = forward(torch.tensor([ids], device=device)).logits[0].double().log_softmax(-1).cpu()
    return -logits[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]


def engine_prompt_nll(model, ids: List[int]) -> torch.Tensor:
    """The same from our engine (calculate_loss=2: the per-token NLL of the prompt)."""
    handle = model.engine.add_request(ids, GenerateConfig(max_new_tokens=1, calculate_loss=2))
    model.engine.run_until_idle()
    return torch.tensor(handle.result().loss, dtype=torch.float64)


def assert_bf16_error_like_oracle(name: str, model, truth, oracle_bf16, sequences: List[List[int]],
                                  device) -> None:
    """truth: the oracle's forward in fp32 (or float64); oracle_bf16: its bf16 forward, or None."""
    for ids in sequences:
        exact = teacher_forced_nll(truth, ids, device)
        ours = (engine_prompt_nll(model, ids) - exact).abs().max().item()
        if oracle_bf16 is None:
            assert ours <= ABS_BOUND, f"{name}: bf16 NLL off the truth by {ours:.4f} > {ABS_BOUND}"
            continue
        theirs = (teacher_forced_nll(oracle_bf16, ids, device) - exact).abs().max().item()
        assert ours <= RATIO * theirs + SLACK, (
            f"{name}: bf16 NLL off the fp32 truth by {ours:.4f}, transformers' bf16 by {theirs:.4f}")
