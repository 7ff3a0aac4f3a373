"""The two parity tests every family file runs, on its own `case` fixture (name, oracle, our model).
A family test module imports them, and pytest collects them there, once per case:
prompt NLL and last logits within ATOL of the oracle, and NEW_TOKENS greedy tokens equal to its
generate, through the engine (three prompts batched, paged KV). ATOL: see test_llama_family.py."""
from __future__ import annotations

from maga_transformer.test.fixtures import PARITY_PROMPTS, assert_greedy_matches_generate, assert_prompt_logits_match

ATOL = 1e-4
NEW_TOKENS = 32


def test_prompt_logits_match(case):
    name, oracle, model = case
    assert_prompt_logits_match(model.engine, oracle, PARITY_PROMPTS, ATOL, name)


def test_greedy_tokens_match_generate(case):
    name, oracle, model = case
    assert_greedy_matches_generate(model.engine, oracle, PARITY_PROMPTS, NEW_TOKENS, name)
