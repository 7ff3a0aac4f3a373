"""Engine-level OpenAI sampling options against an independent oracle: transformers' forward pass in
a plain Python loop that applies OpenAI's penalty formula itself and reads the top log-probs."""
from __future__ import annotations

from typing import List, Tuple

import pytest
import torch

from maga_transformer.config import GenerateConfig
from maga_transformer.test.fixtures import load_engine_model, tiny_llama

PROMPTS = [[1, 5, 9, 12, 40], [1, 33, 22, 7, 7, 8, 9, 10, 11], [1, 4]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    hf_model, directory = tiny_llama(str(tmp_path_factory.mktemp("openai")), seed=5, vocab_size=48,
                                     max_position_embeddings=128)
    return hf_model, load_engine_model(directory, num_kv_blocks=256)


def _oracle(hf_model, prompt: List[int], steps: int, presence: float, frequency: float,
            top: int) -> Tuple[List[int], List[List[Tuple[int, float]]]]:
    """Greedy decoding with OpenAI penalties, recomputing the whole sequence each step (no cache)."""
    ids, tops = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            logits = hf_model(torch.tensor([ids])).logits[0, -1].float()
            logprobs = torch.log_softmax(logits, dim=-1)
            best = logprobs.topk(top)
            tops.append(list(zip(best.indices.tolist(), best.values.tolist())))
            generated = ids[len(prompt):]
            for token in set(generated):
                logits[token] -= generated.count(token) * frequency + presence
            ids.append(int(logits.argmax()))
    return ids[len(prompt):], tops


@pytest.mark.parametrize("presence,frequency", [(0.0, 1.5), (1.2, 0.0), (-0.5, 0.8)])
def test_greedy_with_penalties_and_top_logprobs_match_oracle(tiny, presence, frequency):
    hf_model, model = tiny
    config = GenerateConfig(max_new_tokens=24, top_k=1, ignore_eos=True, presence_penalty=presence,
                            frequency_penalty=frequency, top_logprobs=3)
    handles = [model.engine.add_request(p, config) for p in PROMPTS]  # batched, with other requests
    model.engine.run_until_idle()
    for prompt, handle in zip(PROMPTS, handles):
        seq = handle.result().outputs[0]
        tokens, tops = _oracle(hf_model, prompt, 24, presence, frequency, 3)
        assert seq.token_ids == tokens
        assert len(seq.top_logprobs) == 24
        for ours, ref in zip(seq.top_logprobs, tops):
            assert [t for t, _ in ours] == [t for t, _ in ref]
            torch.testing.assert_close(torch.tensor([v for _, v in ours]), torch.tensor([v for _, v in ref]),
                                       rtol=0, atol=1e-4)
        # the reported log-prob of each chosen token is the raw model's, not the penalised one
        for lp, token, top in zip(seq.logprobs, seq.token_ids, tops):
            if token == top[0][0]:
                assert abs(lp - top[0][1]) < 1e-4
    model.engine.pool.check_idle()


def test_penalties_change_the_output(tiny):
    """Guards the oracle test against penalties that are accepted but never applied."""
    hf_model, model = tiny
    plain, _ = _oracle(hf_model, PROMPTS[0], 24, 0.0, 0.0, 1)
    penalised, _ = _oracle(hf_model, PROMPTS[0], 24, 0.0, 1.5, 1)
    assert plain != penalised


@pytest.mark.parametrize("fields,name", [(dict(presence_penalty=2.5), "presence_penalty"),
                                         (dict(frequency_penalty="x"), "frequency_penalty"),
                                         (dict(top_logprobs=21), "top_logprobs")])
def test_bad_values_name_the_field(fields, name):
    with pytest.raises(ValueError, match=name):
        GenerateConfig(**fields)
