"""Batched next-token selection with per-row parameters.

Logit processing follows transformers' ``generate`` order exactly (repetition penalty, bad-words /
min-length eos masking, then the temperature, top-k and top-p warpers), so a request served here
sees the same distribution as the HF reference. OpenAI's presence / frequency penalties (which
transformers lacks) come right after the repetition penalty, over the generated tokens only, as
vLLM applies them. Sampling uses the exponential race
(argmax p_i / E_i with E_i ~ Exp(1)), which lets seeded rows draw from their own generator while the
rest of the batch shares one vectorised draw.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from maga_transformer import ops
from maga_transformer.engine.transfer import to_device

_MASK64 = (1 << 64) - 1
_NEG_INF = float("-inf")


@dataclass
class SamplingRow:
    """Sampling parameters of one sequence; one row of the logits batch."""
    temperature: float = 1.0       # 0 means greedy
    top_k: int = 0                 # 0 = off
    top_p: float = 1.0             # in (0, 1]
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0   # OpenAI: subtracted once from every generated token's logit
    frequency_penalty: float = 0.0  # OpenAI: subtracted per occurrence in the generated tokens
    seed: Optional[int] = None     # per-request seed
    seed_offset: int = 0           # stable per (sequence, output position) int chosen by the caller
    history_token_ids: Sequence[int] = ()   # prompt + generated ids, for repetition penalty
    output_token_ids: Sequence[int] = ()    # generated ids only, for presence / frequency penalties
    eos_token_ids: Sequence[int] = ()       # masked to -inf when suppress_eos
    suppress_eos: bool = False              # True while min_new_tokens not reached
    bad_words_ids: Sequence[int] = ()       # single-token bad words masked to -inf
    top_logprobs: int = 0                   # how many most likely tokens to report (raw log-probs)

    @property
    def is_greedy(self) -> bool:
        # top_k == 1 keeps only the argmax, so sampling would be a (slower) argmax anyway
        return self.temperature == 0.0 or self.top_k == 1


@dataclass
class SampleResult:
    token_ids: torch.Tensor           # [B] int64
    logprobs: torch.Tensor            # [B] float32, log_softmax(raw logits)[token]
    processed: torch.Tensor           # [B, V] the logits the tokens were drawn from (may be the raw ones)
    top_logprobs: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # ([B, K] log-probs, [B, K] ids)

    @property
    def processed_logprobs(self) -> torch.Tensor:
        """[B] float32, log_softmax(processed logits)[token]. Computed on request (no caller in the
        decode loop wants it, and it is a pass over [B, V]); read it before the logits change (a CUDA
        graph's output buffer is rewritten by the next step)."""
        return _gather_logprob(self.processed, _log_normalizer(self.processed), self.token_ids)


# ---- logits processing ------------------------------------------------------------------------

def _flat_row_ids(rows: Sequence[SamplingRow], ids_of: Callable[[SamplingRow], Sequence[int]],
                  vocab: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(row index, token id) pairs of the ids each row lists; out-of-vocab ids dropped (as HF does).

    Working on these pairs instead of a [B, V] mask keeps the cost O(history), not O(B * V).
    """
    per_row = [ids_of(row) for row in rows]
    lengths = torch.tensor([len(ids) for ids in per_row], dtype=torch.long)
    token_idx = torch.tensor(list(itertools.chain.from_iterable(per_row)), dtype=torch.long)
    row_idx = torch.repeat_interleave(torch.arange(len(rows)), lengths)
    keep = (token_idx >= 0) & (token_idx < vocab)
    return row_idx[keep].to(device, non_blocking=True), token_idx[keep].to(device, non_blocking=True)


def _apply_repetition_penalty(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    def history(row: SamplingRow) -> Sequence[int]:
        return row.history_token_ids if row.repetition_penalty != 1.0 else ()

    if not any(len(history(row)) > 0 for row in rows):
        return logits
    row_idx, token_idx = _flat_row_ids(rows, history, logits.shape[-1], logits.device)
    penalty = to_device([r.repetition_penalty for r in rows], torch.float32, logits.device)[row_idx]
    picked = logits[row_idx, token_idx]
    # HF semantics: negative logits are multiplied so the penalty always lowers the probability.
    # Repeated ids write the same value (computed from the unpenalised logit), so each id is
    # penalised once however often it occurs, exactly like HF's gather/scatter.
    logits[row_idx, token_idx] = torch.where(picked < 0, picked * penalty, picked / penalty)
    return logits


def _apply_openai_penalties(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    def generated(row: SamplingRow) -> Sequence[int]:
        return row.output_token_ids if (row.presence_penalty or row.frequency_penalty) else ()

    if not any(len(generated(row)) > 0 for row in rows):
        return logits
    row_idx, token_idx = _flat_row_ids(rows, generated, logits.shape[-1], logits.device)
    frequency = to_device([r.frequency_penalty for r in rows], torch.float32, logits.device)
    presence = to_device([r.presence_penalty for r in rows], torch.float32, logits.device)
    # accumulate: an id generated c times loses c * frequency_penalty
    logits.index_put_((row_idx, token_idx), -frequency[row_idx], accumulate=True)
    present = torch.unique(row_idx * logits.shape[-1] + token_idx)
    present_rows = present // logits.shape[-1]
    logits.index_put_((present_rows, present % logits.shape[-1]), -presence[present_rows], accumulate=True)
    return logits


def _apply_bans(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    def banned(row: SamplingRow) -> List[int]:
        return list(row.bad_words_ids) + (list(row.eos_token_ids) if row.suppress_eos else [])

    if not any(len(banned(row)) > 0 for row in rows):
        return logits
    row_idx, token_idx = _flat_row_ids(rows, banned, logits.shape[-1], logits.device)
    logits[row_idx, token_idx] = _NEG_INF
    return logits


def _top_k(logits: torch.Tensor, top_k: Sequence[int]) -> torch.Tensor:
    """HF TopKLogitsWarper per row: drop everything strictly below the k-th largest value."""
    vocab = logits.shape[-1]
    # k = 0 (off) or k >= vocab keeps the whole row: the vocab-th value is the row minimum
    ks = [min(k, vocab) if k > 0 else vocab for k in top_k]
    if min(ks) == vocab:
        return logits
    top_values = torch.topk(logits, max(ks), dim=-1).values
    kth_col = to_device(ks, torch.long, logits.device).unsqueeze(1) - 1
    kth = top_values.gather(1, kth_col)
    return logits.masked_fill(logits < kth, _NEG_INF)


def _top_p(logits: torch.Tensor, top_p: Sequence[float]) -> torch.Tensor:
    """HF TopPLogitsWarper per row (min_tokens_to_keep=1); rows with top_p >= 1 are untouched."""
    if all(p >= 1.0 for p in top_p):
        return logits
    # 1 - p is computed in double before the float32 cast, exactly like HF's scalar comparison;
    # rows without top-p get a negative threshold so not even zero-probability tokens are removed
    threshold = to_device([1.0 - p if p < 1.0 else -1.0 for p in top_p], torch.float32, logits.device).unsqueeze(1)
    sorted_logits, sorted_idx = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= threshold
    remove_sorted[:, -1] = False
    remove = remove_sorted.scatter(1, sorted_idx, remove_sorted)
    return logits.masked_fill(remove, _NEG_INF)


def _apply_warpers(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    stochastic = [i for i, r in enumerate(rows) if not r.is_greedy]
    if not stochastic:
        return logits
    sub_rows = [rows[i] for i in stochastic]
    idx = to_device(stochastic, torch.long, logits.device)
    temperature = to_device([r.temperature for r in sub_rows], torch.float32, logits.device).unsqueeze(1)
    sub = logits.index_select(0, idx) / temperature
    sub = _top_k(sub, [r.top_k for r in sub_rows])
    sub = _top_p(sub, [r.top_p for r in sub_rows])
    return logits.index_copy(0, idx, sub)


def process_logits(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """float32 copy of ``logits`` [B, V] processed per row in transformers' generate order."""
    assert logits.dim() == 2 and logits.shape[0] == len(rows), (tuple(logits.shape), len(rows))
    # a private contiguous copy: the helpers below write into it in place, and callers may pass
    # expanded (stride-0) views that must never be written through
    out = logits.to(dtype=torch.float32, memory_format=torch.contiguous_format, copy=True)
    out = _apply_repetition_penalty(out, rows)
    out = _apply_openai_penalties(out, rows)
    out = _apply_bans(out, rows)
    return _apply_warpers(out, rows)


# ---- sampling ----------------------------------------------------------------------------------

def _mix_seed(seed: int, offset: int) -> int:
    """splitmix64 finaliser over (seed, offset): nearby seeds/offsets give unrelated streams."""
    z = (seed * 0x9E3779B97F4A7C15 + offset * 0xD1B54A32D192ED03 + 0x632BE59BD9B4E019) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1  # 63 bits: manual_seed accepts it on every backend


def _row_generator(row: SamplingRow, device: torch.device) -> torch.Generator:
    assert row.seed is not None
    try:
        gen = torch.Generator(device=device)
    except RuntimeError:  # backends without device generators draw on CPU instead
        gen = torch.Generator(device="cpu")
    gen.manual_seed(_mix_seed(row.seed, row.seed_offset))
    return gen


def _exponential_noise(rows: Sequence[SamplingRow], vocab: int, device: torch.device,
                       default_generator: Optional[torch.Generator]) -> torch.Tensor:
    """[len(rows), vocab] Exp(1) noise; seeded rows use only their own generator."""
    noise = torch.empty(len(rows), vocab, dtype=torch.float32, device=device)
    unseeded = [i for i, r in enumerate(rows) if r.seed is None]
    if unseeded:
        gen_device = default_generator.device if default_generator is not None else device
        shared = torch.empty(len(unseeded), vocab, dtype=torch.float32, device=gen_device)
        shared.exponential_(generator=default_generator)
        noise[to_device(unseeded, torch.long, device)] = shared.to(device, non_blocking=True)
    for i, row in enumerate(rows):
        if row.seed is not None:
            gen = _row_generator(row, device)
            drawn = torch.empty(vocab, dtype=torch.float32, device=gen.device)
            noise[i] = drawn.exponential_(generator=gen).to(device, non_blocking=True)
    # Exp(1) may round to 0; a tiny floor keeps p / E finite and zero-probability tokens at 0
    return noise.clamp_min_(torch.finfo(torch.float32).tiny)


def _draw(processed: torch.Tensor, rows: Sequence[SamplingRow],
          default_generator: Optional[torch.Generator]) -> torch.Tensor:
    tokens = processed.argmax(dim=-1)
    stochastic = [i for i, r in enumerate(rows) if not r.is_greedy]
    if not stochastic:
        return tokens
    idx = to_device(stochastic, torch.long, processed.device)
    probs = processed.index_select(0, idx).softmax(dim=-1)
    noise = _exponential_noise([rows[i] for i in stochastic], processed.shape[-1],
                               processed.device, default_generator)
    # exponential race: P(argmax_i p_i / E_i = j) = p_j for independent E_i ~ Exp(1)
    return tokens.index_copy(0, idx, (probs / noise).argmax(dim=-1))


def _log_normalizer(logits: torch.Tensor) -> torch.Tensor:
    """logsumexp per row: log_softmax(x)[i] = x[i] - this. A full log_softmax would write the whole
    [rows, vocab] tensor for a few gathered entries (and torch's softmax kernel gives a row one CTA:
    58 us a decode step at batch 1 on a 128k vocabulary on the H100)."""
    return ops.row_argmax_logsumexp(logits)[1]


def _plain_greedy(row: SamplingRow) -> bool:
    """Greedy with nothing that changes the logits first: the token is the raw argmax."""
    return (row.is_greedy and row.repetition_penalty == 1.0 and row.presence_penalty == 0.0
            and row.frequency_penalty == 0.0 and not row.bad_words_ids
            and not (row.suppress_eos and row.eos_token_ids))


def _gather_logprob(logits: torch.Tensor, normalizer: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return logits.gather(1, tokens.unsqueeze(1)).squeeze(1) - normalizer


def sample(logits: torch.Tensor, rows: Sequence[SamplingRow],
           default_generator: Optional[torch.Generator] = None) -> SampleResult:
    """Pick one next token per row: argmax for greedy rows, a draw from softmax(processed) else."""
    raw = logits.float()
    if all(_plain_greedy(row) for row in rows):  # the decode fast path: one pass over each row
        tokens, raw_normalizer = ops.row_argmax_logsumexp(raw)
        processed = raw
    else:
        processed = process_logits(logits, rows)
        tokens = _draw(processed, rows, default_generator)
        raw_normalizer = _log_normalizer(raw)
    top_k = max(row.top_logprobs for row in rows)
    # one top-k for the whole batch (the widest request's k); each row keeps its own k later
    top = None
    if top_k > 0:
        values, indices = torch.topk(raw, min(top_k, logits.shape[-1]), dim=-1)
        top = (values - raw_normalizer.unsqueeze(1), indices)
    return SampleResult(token_ids=tokens, logprobs=_gather_logprob(raw, raw_normalizer, tokens), processed=processed,
                        top_logprobs=top)
