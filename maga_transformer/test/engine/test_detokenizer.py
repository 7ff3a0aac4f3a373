"""Incremental detokenization against the tokenizer's own one-shot decode (the oracle), on the real
SmolLM2 tokenizer (byte-level BPE: multi-byte characters split across tokens) and on a word-level
tokenizer; both through the fast backend path and through transformers' decode."""
from __future__ import annotations

import random

import pytest

from maga_transformer.engine.output import Detokenizer
from maga_transformer.engine.request import Sequence
from maga_transformer.model_loader import load_tokenizer
from maga_transformer.test.fixtures import _tiny_tokenizer_dir


def _stream(detok: Detokenizer, prompt_len: int, ids):
    seq = Sequence(token_ids=[1] * prompt_len, prompt_len=prompt_len)
    texts = []
    for token in ids:
        seq.token_ids.append(token)
        texts.append(detok.update(seq))
    return seq, texts


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("which", ["smollm2", "wordlevel"])
def test_incremental_text_equals_one_shot_decode(smollm2_dir, which, fast):
    tokenizer = load_tokenizer(smollm2_dir if which == "smollm2" else _tiny_tokenizer_dir(300))
    detok = Detokenizer(tokenizer)
    if which == "smollm2":
        assert detok._backend_decode is not None  # the path this test exists for is really taken
    if not fast:
        detok._backend_decode = None
    rng = random.Random(7)
    text_ids = tokenizer.encode("Grüße, 東京 🚀 naïve café — ok!") if which == "smollm2" else []
    for trial in range(20):
        ids = text_ids + [rng.randrange(3, min(len(tokenizer), 5000)) for _ in range(rng.randint(1, 40))]
        seq, texts = _stream(detok, prompt_len=rng.randint(1, 5), ids=ids)
        expected = tokenizer.decode(ids, skip_special_tokens=True)
        for text in texts:
            assert expected.startswith(text) or "\ufffd" in expected, (trial, text, expected)
        seq.finish_reason = "stop"
        assert detok.update(seq) == expected
        detok.forget(seq)
