"""The Rust-tokenizer shortcut for encoding must give transformers' own ids (the oracle) on the real
SmolLM2 tokenizer and a word-level one, including special tokens written in the text, one prompt at
a time and in thread-split batches; a tokenizer whose backend disagrees keeps transformers' encode."""
from __future__ import annotations

import os
import random

import pytest

from maga_transformer.model_loader import load_tokenizer
from maga_transformer.model_loader import fast_encode
from maga_transformer.model_loader.fast_encode import FastEncoder, prefer_serial_tokenizers
from maga_transformer.test.fixtures import _tiny_tokenizer_dir


def _texts(tokenizer, seed: int, count: int = 60):
    rng = random.Random(seed)
    specials = list(tokenizer.all_special_tokens)
    words = ["hello", " world", "\n", "  ", "Grüße", "東京", "🚀", "w12", "w7", "123", "\t"] + specials
    return ["".join(rng.choice(words) for _ in range(rng.randint(0, 40))) for _ in range(count)]


def _tokenizers(smollm2_dir):
    return (load_tokenizer(smollm2_dir), load_tokenizer(_tiny_tokenizer_dir(300)))


def test_fast_encode_equals_transformers_encode(smollm2_dir):
    for tokenizer in _tokenizers(smollm2_dir):
        encoder = FastEncoder(tokenizer)
        assert encoder._backend is not None  # the shortcut is really taken for these
        for text in _texts(tokenizer, 5):
            assert encoder.encode(text) == tokenizer.encode(text), text


@pytest.mark.parametrize("count", [1, 15, 200])
def test_batches_split_over_threads_keep_order_and_ids(smollm2_dir, monkeypatch, count):
    monkeypatch.setattr(fast_encode.os, "cpu_count", lambda: 4)  # 200 prompts: four parts on any machine
    for tokenizer in _tokenizers(smollm2_dir):
        texts = _texts(tokenizer, count, count)
        assert FastEncoder(tokenizer).encode_batch(texts) == [tokenizer.encode(t) for t in texts]


def test_parts_cover_the_batch_in_order():
    texts = [str(i) for i in range(100)]
    parts = fast_encode._split(texts, 8)
    assert len(parts) == 6 and sum(parts, []) == texts  # 100 // 16 parts at most
    assert fast_encode._split(texts[:20], 8) == [texts[:20]]


def test_a_disagreeing_backend_keeps_transformers_encode(smollm2_dir):
    tokenizer = load_tokenizer(smollm2_dir)

    class Prefixed(type(tokenizer)):  # a wrapper that adds a token of its own, as some subclasses do
        def encode(self, text, **kwargs):
            return [0] + super().encode(text, **kwargs)
    tokenizer.__class__ = Prefixed
    encoder = FastEncoder(tokenizer)
    assert encoder._backend is None
    assert encoder.encode("hello world") == tokenizer.encode("hello world")
    assert encoder.encode_batch(["a b", "c"]) == [tokenizer.encode("a b"), tokenizer.encode("c")]


def test_serial_tokenizers_only_when_the_user_did_not_choose(monkeypatch):
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    prefer_serial_tokenizers()
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    prefer_serial_tokenizers()
    assert os.environ["TOKENIZERS_PARALLELISM"] == "true"
