"""The Rust-tokenizer shortcut for encoding must give transformers' own ids (the oracle) on the real
SmolLM2 tokenizer and a word-level one, including special tokens written in the text; a tokenizer
whose backend disagrees keeps transformers' encode."""
from __future__ import annotations

import random

from maga_transformer.model_loader import load_tokenizer
from maga_transformer.model_loader.fast_encode import fast_encoder
from maga_transformer.test.fixtures import _tiny_tokenizer_dir


def _texts(tokenizer, seed: int):
    rng = random.Random(seed)
    specials = list(tokenizer.all_special_tokens)
    words = ["hello", " world", "\n", "  ", "Grüße", "東京", "🚀", "w12", "w7", "123", "\t"] + specials
    return ["".join(rng.choice(words) for _ in range(rng.randint(0, 40))) for _ in range(60)]


def test_fast_encode_equals_transformers_encode(smollm2_dir):
    for tokenizer in (load_tokenizer(smollm2_dir), load_tokenizer(_tiny_tokenizer_dir(300))):
        encode = fast_encoder(tokenizer)
        assert encode != tokenizer.encode  # the shortcut is really taken for these
        for text in _texts(tokenizer, 5):
            assert encode(text) == tokenizer.encode(text), text


def test_a_disagreeing_backend_keeps_transformers_encode(smollm2_dir):
    tokenizer = load_tokenizer(smollm2_dir)

    class Prefixed(type(tokenizer)):  # a wrapper that adds a token of its own, as some subclasses do
        def encode(self, text, **kwargs):
            return [0] + super().encode(text, **kwargs)
    tokenizer.__class__ = Prefixed
    assert fast_encoder(tokenizer) == tokenizer.encode
