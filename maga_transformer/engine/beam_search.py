"""One beam-search step with transformers' semantics (its vectorised `_beam_search`, batch of one).

Per step: log-softmax, logits processors on log-probs, add running beam scores, keep the top
max(2, 1 + n_eos) * num_beams candidates; candidates that hit EOS or the length limit among the
first num_beams may enter the finished set (score / generated_len ** length_penalty); the best
num_beams candidates that did not stop continue. Without early stopping, search ends when no
running beam can beat the worst finished one (transformers' heuristic) or all candidates stop.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence as Seq

import torch

from maga_transformer.engine.request import BeamHypothesis, Request, Sequence
from maga_transformer.engine.sampler import SamplingRow, process_logits

_NEG = -1.0e9


@dataclass
class BeamCandidate:
    parent: int  # index into the running beams
    token: int
    score: float  # accumulated log-prob
    stops: bool


def beam_candidates(request: Request, beams: Seq[Sequence], logits: torch.Tensor) -> List[BeamCandidate]:
    """Top-K continuations over all running beams, best first."""
    cfg = request.config
    rows = [SamplingRow(temperature=0.0, repetition_penalty=cfg.repetition_penalty,
                        history_token_ids=seq.token_ids, eos_token_ids=request.eos_token_ids,
                        suppress_eos=seq.num_output_tokens < cfg.min_new_tokens) for seq in beams]
    log_probs = process_logits(torch.log_softmax(logits.float(), dim=-1), rows)
    scores = torch.tensor([seq.cum_logprob for seq in beams], dtype=torch.float32, device=logits.device)
    flat = (log_probs + scores.unsqueeze(1)).reshape(-1)
    num_beams = cfg.num_beams
    keep = min(max(2, 1 + len(request.eos_token_ids)) * num_beams, flat.numel())
    top_scores, top_index = torch.topk(flat, keep)
    vocab = logits.shape[-1]
    at_limit = beams[0].num_output_tokens + 1 >= request.max_new_tokens
    out = []
    for score, index in zip(top_scores.tolist(), top_index.tolist()):
        token = index % vocab
        stops = at_limit or (token in request.eos_token_ids and not cfg.ignore_eos)
        out.append(BeamCandidate(parent=index // vocab, token=token, score=score, stops=stops))
    return out


def update_finished(request: Request, candidates: List[BeamCandidate], beams: Seq[Sequence]) -> None:
    """Merge stopping candidates among the first num_beams into the finished set (best num_beams kept)."""
    cfg = request.config
    gen_len = beams[0].num_output_tokens + 1
    pool = list(request.beam_finished)
    for cand in candidates[:cfg.num_beams]:
        if cand.stops:
            tokens = beams[cand.parent].output_ids + [cand.token]
            pool.append(BeamHypothesis(tokens, cand.score / (gen_len ** cfg.length_penalty)))
    pool.sort(key=lambda h: h.score, reverse=True)  # stable, as topk keeps earlier entries on ties
    request.beam_finished = pool[:cfg.num_beams]


def next_running(candidates: List[BeamCandidate], num_beams: int) -> List[BeamCandidate]:
    ranked = sorted(candidates, key=lambda c: c.score + (_NEG if c.stops else 0.0), reverse=True)
    return ranked[:num_beams]


def search_finished(request: Request, candidates: List[BeamCandidate], running: List[BeamCandidate],
                    gen_len: int) -> bool:
    """transformers' stopping rule for early_stopping=False."""
    cfg = request.config
    if all(c.stops for c in candidates):
        return True
    if len(request.beam_finished) < cfg.num_beams:
        return False
    best_running = running[0].score / (gen_len ** cfg.length_penalty)
    worst_finished = min(h.score for h in request.beam_finished)
    return best_running <= worst_finished
