"""Encoding a prompt through the Rust tokenizer directly, when that gives exactly transformers' ids.

transformers' `encode` wraps the Rust tokenizer in Python argument handling and conversions that
cost about as much as the encoding itself for a long prompt (1,024 words: 1.6 ms against 0.9 ms
on the build machine), and a server or Pipeline pays it inside every request's time to first token.
The shortcut is taken only if it agrees with `encode` on probes that cover what can differ: special
tokens written in the text, whitespace, non-ASCII text, the empty string.
"""
from __future__ import annotations

import logging
from typing import Callable, List

logger = logging.getLogger(__name__)
_PROBES = ("Hello, world! 123", "  two leading spaces,\nnew lines\tand tabs  ", "naïve café, 東京 🚀", "")


def fast_encoder(tokenizer) -> Callable[[str], List[int]]:
    """`tokenizer.encode`, or the Rust tokenizer's own encode where it returns the same ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return tokenizer.encode

    def encode(text: str) -> List[int]:
        return backend.encode(text).ids
    specials = " ".join(getattr(tokenizer, "all_special_tokens", []) or [])
    try:
        same = all(encode(text) == tokenizer.encode(text) for text in _PROBES + (specials, f"a{specials}b"))
    except Exception:  # an unusual tokenizer: keep transformers' path
        same = False
    if not same:
        logger.debug("the Rust tokenizer's encode differs from transformers' here: using transformers'")
        return tokenizer.encode
    return encode
