"""Sampler tests: exact parity with transformers' logits processors, sampling statistics, seeding."""
from __future__ import annotations

from typing import List, Sequence

import pytest
import torch
from scipy.stats import chisquare
from transformers.generation.logits_process import (
    LogitsProcessorList, MinLengthLogitsProcessor, NoBadWordsLogitsProcessor,
    RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from maga_transformer.engine.sampler import SamplingRow, process_logits, sample

VOCAB = 64
# Under a correct sampler the chi-square p-value is uniform on [0, 1], so p > 1e-3 fails a correct
# implementation with probability 0.1% per test for an arbitrary seed (and never for the fixed seeds
# used here), while the deliberately wrong references below show that real errors give p << 1e-6.
P_ACCEPT = 1e-3
P_REJECT = 1e-6


def _hf_process(logits: torch.Tensor, row: SamplingRow) -> torch.Tensor:
    """The processors transformers' generate would build for this row, applied to one [1, V] row."""
    # ids outside the logits' vocab cannot be penalised; transformers >= 5.2x drops them itself,
    # older releases index out of bounds, so the reference gets them pre-filtered
    history = [t for t in row.history_token_ids if t < logits.shape[-1]] or [0]
    input_ids = torch.tensor([history], dtype=torch.long)
    procs = LogitsProcessorList()
    if row.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(row.repetition_penalty))
    if row.bad_words_ids:
        procs.append(NoBadWordsLogitsProcessor([[t] for t in row.bad_words_ids]))
    if row.suppress_eos and row.eos_token_ids:
        # the input is one token short of min_length, so the eos ids are masked
        procs.append(MinLengthLogitsProcessor(input_ids.shape[-1] + 1, list(row.eos_token_ids)))
    if not (row.temperature == 0.0 or row.top_k == 1):
        if row.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(row.temperature))
        if row.top_k > 0:
            procs.append(TopKLogitsWarper(row.top_k))
        if row.top_p < 1.0:
            procs.append(TopPLogitsWarper(row.top_p))
    return procs(input_ids, logits.float().clone().unsqueeze(0)).squeeze(0)


def _mixed_rows(gen: torch.Generator) -> List[SamplingRow]:
    def hist(n: int) -> List[int]:
        return torch.randint(0, VOCAB, (n,), generator=gen).tolist()

    return [
        SamplingRow(),
        SamplingRow(temperature=0.7),
        SamplingRow(temperature=1.3, top_k=5),
        SamplingRow(top_p=0.9),
        SamplingRow(temperature=0.8, top_k=20, top_p=0.75),
        SamplingRow(top_p=0.3, repetition_penalty=1.2, history_token_ids=hist(30)),
        SamplingRow(temperature=0.0, repetition_penalty=1.5, history_token_ids=hist(10)),
        SamplingRow(top_k=1, bad_words_ids=[3, 7]),
        SamplingRow(top_k=VOCAB + 10, repetition_penalty=0.8, history_token_ids=hist(5) + [VOCAB + 3]),
        SamplingRow(temperature=0.5, top_p=0.95, eos_token_ids=[2, 9], suppress_eos=True,
                    bad_words_ids=[11], repetition_penalty=1.1, history_token_ids=hist(40)),
        SamplingRow(temperature=2.0, top_k=3, top_p=0.5, eos_token_ids=[2], suppress_eos=False),
        SamplingRow(top_p=1e-9),  # 1 - p rounds to 1.0 in float32: only min_tokens_to_keep saves the top
    ]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_process_logits_matches_hf_per_row(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    rows = _mixed_rows(gen)
    logits = torch.randn(len(rows), VOCAB, generator=gen) * 3
    logits[:, 40:44] = logits[:, 40:41]  # ties, to exercise HF's top-k / top-p tie handling
    logits[:, 2] = 8.0  # eos id 2 is every row's favourite: suppress_eos must visibly remove it
    logits[:, 50] = -150.0  # probability underflows to 0: top_p == 1 must still keep it (HF skips top-p)
    ours = process_logits(logits, rows)
    assert ours.dtype == torch.float32
    for i, row in enumerate(rows):
        torch.testing.assert_close(ours[i], _hf_process(logits[i], row), rtol=0, atol=0)
    # the batch result must not depend on which other rows share the batch
    for i in (0, 4, 9):
        torch.testing.assert_close(process_logits(logits[i:i + 1], rows[i:i + 1])[0], ours[i],
                                   rtol=0, atol=0)


def test_process_logits_matches_hf_with_heavy_ties() -> None:
    gen = torch.Generator().manual_seed(8)
    params = [(t, k, p) for t in (0.5, 1.0) for k in (0, 3, 10) for p in (1.0, 0.9, 0.5, 0.25)]
    rows = [SamplingRow(temperature=t, top_k=k, top_p=p) for t, k, p in params]
    # logits on a coarse grid: the top-k / top-p boundaries routinely fall inside a tie
    logits = torch.round(torch.randn(len(rows), VOCAB, generator=gen) * 2) / 2
    ours = process_logits(logits, rows)
    for i, row in enumerate(rows):
        torch.testing.assert_close(ours[i], _hf_process(logits[i], row), rtol=0, atol=0)


def test_process_logits_does_not_modify_input_and_accepts_expanded_views() -> None:
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(1, VOCAB, generator=gen)
    logits = base.expand(4, -1)
    rows = [SamplingRow(repetition_penalty=1.3, history_token_ids=[1, 2], bad_words_ids=[5])] * 4
    before = base.clone()
    out = process_logits(logits, rows)
    assert torch.equal(base, before)
    assert torch.isinf(out[:, 5]).all()


def test_greedy_rows() -> None:
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(6, VOCAB, generator=gen)
    logits[5, 10] = logits[5, 20] = logits[5].max() + 1  # argmax tie -> lowest index
    hist = [int(logits[1].argmax())]
    rows = [SamplingRow(temperature=0.0), SamplingRow(temperature=0.0, repetition_penalty=2.0,
                                                      history_token_ids=hist),
            SamplingRow(top_k=1, temperature=5.0), SamplingRow(top_k=1, top_p=0.1),
            SamplingRow(temperature=0.0, bad_words_ids=[int(logits[4].argmax())]),
            SamplingRow(temperature=0.0)]
    expected = process_logits(logits, rows).argmax(dim=-1)
    for _ in range(3):
        assert torch.equal(sample(logits, rows).token_ids, expected)
    assert int(expected[5]) == 10
    assert int(expected[0]) == int(logits[0].argmax())
    assert int(expected[2]) == int(logits[2].argmax())  # top_k=1 ignores the temperature
    for i, row in enumerate(rows):
        assert int(expected[i]) == int(_hf_process(logits[i], row).argmax())
    # top_k=1 and temperature 0 are the same decision on the same processed logits
    assert torch.equal(sample(logits, [SamplingRow(top_k=1)] * 6).token_ids,
                       sample(logits, [SamplingRow(temperature=0.0)] * 6).token_ids)


def test_logprobs_are_raw_and_processed() -> None:
    gen = torch.Generator().manual_seed(5)
    rows = _mixed_rows(gen)
    logits = torch.randn(len(rows), VOCAB, generator=gen, dtype=torch.float64)
    res = sample(logits, rows, default_generator=torch.Generator().manual_seed(0))
    assert res.token_ids.dtype == torch.int64 and res.logprobs.dtype == torch.float32
    raw = torch.log_softmax(logits.float(), dim=-1).gather(1, res.token_ids[:, None]).squeeze(1)
    proc = torch.log_softmax(process_logits(logits, rows), -1).gather(1, res.token_ids[:, None])
    # x - logsumexp(x) rather than log_softmax: equal up to fp32 rounding (~1 ulp of the log-prob)
    torch.testing.assert_close(res.logprobs, raw, rtol=0, atol=2e-6)
    torch.testing.assert_close(res.processed_logprobs, proc.squeeze(1), rtol=0, atol=2e-6)
    assert torch.isfinite(res.processed_logprobs).all()


# ---- statistics ----------------------------------------------------------------------------------

def _chisquare_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Goodness of fit over the support of ``probs``; bins with expected count < 5 are merged."""
    n = int(counts.sum())
    expected = probs.double() / probs.double().sum() * n  # scipy needs matching totals
    order = torch.argsort(expected, descending=True)
    obs_sorted, exp_sorted = counts[order].double(), expected[order]
    big = exp_sorted >= 5
    obs_bins, exp_bins = obs_sorted[big].tolist(), exp_sorted[big].tolist()
    small_obs, small_exp = float(obs_sorted[~big].sum()), float(exp_sorted[~big].sum())
    if small_exp >= 5:
        obs_bins.append(small_obs)
        exp_bins.append(small_exp)
    elif small_exp > 0 or small_obs > 0:  # fold a tiny remainder into the smallest large bin
        obs_bins[-1] += small_obs
        exp_bins[-1] += small_exp
    assert len(exp_bins) >= 2
    return float(chisquare(obs_bins, exp_bins).pvalue)


def _draw_counts(logits_row: torch.Tensor, row: SamplingRow, n: int, seeded: bool) -> torch.Tensor:
    """n independent draws as one batch of n identical rows; seeded rows differ only by offset."""
    if seeded:
        rows = [SamplingRow(**{**row.__dict__, "seed": 1234, "seed_offset": i}) for i in range(n)]
    else:
        rows = [row] * n
    logits = logits_row.unsqueeze(0).expand(n, -1)
    tokens = sample(logits, rows, default_generator=torch.Generator().manual_seed(99)).token_ids
    return torch.bincount(tokens, minlength=logits_row.numel())


STAT_CASES = {
    "temperature": SamplingRow(temperature=0.6),
    "top_k": SamplingRow(top_k=8),
    "top_p": SamplingRow(top_p=0.8),
    "combined": SamplingRow(temperature=1.5, top_k=20, top_p=0.7, repetition_penalty=1.3,
                            history_token_ids=list(range(0, VOCAB, 3)), bad_words_ids=[1]),
}


@pytest.mark.parametrize("seeded", [False, True])
@pytest.mark.parametrize("case", sorted(STAT_CASES))
def test_sampling_distribution(case: str, seeded: bool) -> None:
    row = STAT_CASES[case]
    logits_row = torch.randn(VOCAB, generator=torch.Generator().manual_seed(7)) * 1.5
    n = 20_000 if not seeded else 8_000  # seeded rows build one generator each: keep it fast
    counts = _draw_counts(logits_row, row, n, seeded)
    probs = process_logits(logits_row[None], [row])[0].softmax(-1)
    assert int(counts[probs == 0].sum()) == 0, "a token outside top-k / the nucleus was sampled"
    if row.top_k:
        assert int((probs > 0).sum()) <= row.top_k
    assert _chisquare_p(counts, probs) > P_ACCEPT


def test_sampling_distribution_rejects_wrong_reference() -> None:
    row = SamplingRow(temperature=0.6, top_k=20)
    logits_row = torch.randn(VOCAB, generator=torch.Generator().manual_seed(7)) * 1.5
    counts = _draw_counts(logits_row, row, 20_000, seeded=False)
    right = process_logits(logits_row[None], [row])[0].softmax(-1)
    # same support, temperature ignored: the kind of bug the statistical test must catch
    wrong = process_logits(logits_row[None], [SamplingRow(top_k=20)])[0].softmax(-1)
    assert torch.equal(right > 0, wrong > 0)
    assert _chisquare_p(counts, right) > P_ACCEPT
    assert _chisquare_p(counts, wrong) < P_REJECT


# ---- seeding -------------------------------------------------------------------------------------

def _stream(row_of_offset, offsets: Sequence[int], position: int, batch: int, seed: int) -> List[int]:
    """Token of the seeded row at ``position`` inside a batch of random other rows, per offset."""
    gen = torch.Generator().manual_seed(seed)
    target_logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(11))
    out = []
    for off in offsets:
        logits = torch.randn(batch, VOCAB, generator=gen)
        logits[position] = target_logits
        others = [SamplingRow(temperature=0.9, top_p=0.95),
                  SamplingRow(seed=int(torch.randint(0, 1000, (1,), generator=gen)), seed_offset=off),
                  SamplingRow(temperature=0.0), SamplingRow(top_k=4)]
        rows = [others[j % len(others)] for j in range(batch)]
        rows[position] = row_of_offset(off)
        tokens = sample(logits, rows, default_generator=torch.Generator().manual_seed(off + seed))
        out.append(int(tokens.token_ids[position]))
    return out


def test_seeded_rows_are_reproducible_across_batch_layouts() -> None:
    offsets = list(range(40))

    def row(off: int) -> SamplingRow:
        return SamplingRow(temperature=1.5, top_p=0.98, seed=424242, seed_offset=off)

    alone = _stream(row, offsets, position=0, batch=1, seed=0)
    assert alone == _stream(row, offsets, position=0, batch=8, seed=1)
    assert alone == _stream(row, offsets, position=5, batch=8, seed=2)
    assert len(set(alone)) > 5  # the stream really varies with the offset


def test_different_seeds_give_different_streams() -> None:
    offsets = list(range(100))
    streams = [_stream(lambda off, s=s: SamplingRow(temperature=1.5, seed=s, seed_offset=off),
                       offsets, position=0, batch=1, seed=0) for s in (1, 2, 3)]
    for a in range(3):
        for b in range(a + 1, 3):
            matches = sum(x == y for x, y in zip(streams[a], streams[b]))
            assert matches < 40, (a, b, matches)


# ---- OpenAI penalties and top log-probs ------------------------------------------------------------

def _naive_openai_penalties(logits_row: torch.Tensor, row: SamplingRow) -> torch.Tensor:
    """OpenAI's documented formula, one token id at a time: mu[j] -= c[j] * freq + (c[j] > 0) * presence."""
    out = logits_row.float().clone()
    for token in set(t for t in row.output_token_ids if t < out.numel()):  # out-of-vocab ids are ignored
        count = list(row.output_token_ids).count(token)
        out[token] -= count * row.frequency_penalty + row.presence_penalty
    return out


def test_presence_and_frequency_penalties_follow_openai_formula() -> None:
    gen = torch.Generator().manual_seed(12)

    def outputs(n: int) -> List[int]:
        return torch.randint(0, 12, (n,), generator=gen).tolist()  # a small range: many repeats

    rows = [SamplingRow(temperature=0.0, presence_penalty=0.7, output_token_ids=outputs(20)),
            SamplingRow(temperature=0.0, frequency_penalty=0.4, output_token_ids=outputs(30)),
            SamplingRow(temperature=0.0, presence_penalty=-1.5, frequency_penalty=2.0, output_token_ids=outputs(9)),
            SamplingRow(temperature=0.0),  # no penalty: untouched even with outputs listed
            SamplingRow(temperature=0.0, frequency_penalty=1.0, output_token_ids=outputs(5) + [VOCAB + 4])]
    rows[3].output_token_ids = outputs(10)
    logits = torch.randn(len(rows), VOCAB, generator=gen)
    ours = process_logits(logits, rows)
    for i, row in enumerate(rows):
        expected = _naive_openai_penalties(logits[i], row) if i != 3 else logits[i]
        torch.testing.assert_close(ours[i], expected, rtol=0, atol=1e-5)
    assert not torch.equal(ours[1], logits[1])


def test_openai_penalties_come_after_repetition_penalty() -> None:
    gen = torch.Generator().manual_seed(13)
    logits = torch.randn(1, VOCAB, generator=gen)
    row = SamplingRow(temperature=0.0, repetition_penalty=1.4, history_token_ids=[1, 2, 3, 3],
                      frequency_penalty=0.5, output_token_ids=[3, 3])
    expected = _naive_openai_penalties(_hf_process(logits[0], SamplingRow(
        temperature=0.0, repetition_penalty=1.4, history_token_ids=[1, 2, 3, 3])), row)
    torch.testing.assert_close(process_logits(logits, [row])[0], expected, rtol=0, atol=1e-5)


def test_top_logprobs_per_row() -> None:
    gen = torch.Generator().manual_seed(14)
    rows = [SamplingRow(temperature=0.0, top_logprobs=5), SamplingRow(top_logprobs=0),
            SamplingRow(temperature=0.7, top_p=0.5, top_logprobs=2)]
    logits = torch.randn(len(rows), VOCAB, generator=gen) * 2
    res = sample(logits, rows, default_generator=torch.Generator().manual_seed(0))
    values, ids = res.top_logprobs
    assert values.shape == (3, 5)
    raw = torch.log_softmax(logits, dim=-1)
    for i in (0, 2):
        k = rows[i].top_logprobs
        expected = raw[i].sort(descending=True)
        assert ids[i, :k].tolist() == expected.indices[:k].tolist()
        torch.testing.assert_close(values[i, :k], expected.values[:k], rtol=0, atol=2e-6)  # fp32 rounding
    # the greedy row's chosen token is its most likely one, with the same (raw) log-prob
    assert int(res.token_ids[0]) == int(ids[0, 0]) and float(res.logprobs[0]) == float(values[0, 0])
    assert sample(logits, [SamplingRow()] * 3).top_logprobs is None
