"""Encoding prompts through the Rust tokenizer directly, when that gives exactly transformers' ids.

transformers' `encode` wraps the Rust tokenizer in Python argument handling and conversions that
cost about as much as the encoding itself for a long prompt (1,024 words: 1.6 ms against 0.9 ms
on the build machine), and a server or Pipeline pays it inside every request's time to first token.
The Rust tokenizer's `encode_batch_fast` (tokenizers >= 0.20) skips the character offsets that
`encode` computes and nobody here reads: the same ids in about two thirds of the time again.
The shortcut is taken only if it agrees with `encode` on probes that cover what can differ: special
tokens written in the text, whitespace, non-ASCII text, the empty string.

Parallelism: with TOKENIZERS_PARALLELISM on (its default), the Rust tokenizer hands even one
prompt to its thread pool, which on the 16-core H200 host cost 0.6-0.9 ms of a 1,024-word prompt's
1.5-2.3 ms (benchmark: docs/benchmarks.md). The front ends encode one prompt per request, so
`prefer_serial_tokenizers` turns that off unless the user set it; batches (the Pipeline's) are
split over a few Python threads instead, which run in parallel because the tokenizer releases the
interpreter lock while it encodes.
"""
from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional

logger = logging.getLogger(__name__)
_PROBES = ("Hello, world! 123", "  two leading spaces,\nnew lines\tand tabs  ", "naïve café, 東京 🚀", "")
PARALLELISM_ENV = "TOKENIZERS_PARALLELISM"
_BATCH_THREADS = 8  # at most: a batch is split into this many parts (fewer on smaller machines)
_MIN_PER_THREAD = 16  # prompts: below this a part is not worth a thread


def prefer_serial_tokenizers() -> None:
    """TOKENIZERS_PARALLELISM=false unless the user chose a value (read by the tokenizer per call)."""
    os.environ.setdefault(PARALLELISM_ENV, "false")


class FastEncoder:
    """encode(text) and encode_batch(texts) with transformers' ids, by the fastest path that gives them."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._backend = _checked_backend(tokenizer)
        self._pool: Optional[ThreadPoolExecutor] = None
        self._pool_lock = threading.Lock()

    def encode(self, text: str) -> List[int]:
        if self._backend is None:
            return self.tokenizer.encode(text)
        return self._backend.encode_batch_fast([text])[0].ids

    def __call__(self, text: str) -> List[int]:
        return self.encode(text)

    def encode_batch(self, texts: List[str]) -> List[List[int]]:
        if self._backend is None:  # encode's ids, as one prompt gets them (a subclass may override encode)
            return [self.tokenizer.encode(text) for text in texts]
        parts = _split(texts, min(_BATCH_THREADS, os.cpu_count() or 1))
        if len(parts) == 1:
            return self._encode_part(texts)
        results = list(self._threads().map(self._encode_part, parts))
        return [ids for part in results for ids in part]

    def _encode_part(self, texts: List[str]) -> List[List[int]]:
        return [encoding.ids for encoding in self._backend.encode_batch_fast(texts)]

    def _threads(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(_BATCH_THREADS, thread_name_prefix="maga-tokenize")
            return self._pool


def _split(texts: List[str], most: int) -> List[List[str]]:
    count = max(1, min(most, len(texts) // _MIN_PER_THREAD))
    size = -(-len(texts) // count)
    return [texts[i:i + size] for i in range(0, len(texts), size)]


def _checked_backend(tokenizer):
    """The Rust tokenizer if its encode_batch_fast gives `tokenizer.encode`'s ids on the probes, else None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_batch_fast"):
        return None
    specials = " ".join(getattr(tokenizer, "all_special_tokens", []) or [])
    probes = _PROBES + (specials, f"a{specials}b")
    try:
        same = all(backend.encode_batch_fast([text])[0].ids == tokenizer.encode(text) for text in probes)
    except Exception:  # an unusual tokenizer: keep transformers' path
        same = False
    if not same:
        logger.debug("the Rust tokenizer's encode differs from transformers' here: using transformers'")
        return None
    return backend

