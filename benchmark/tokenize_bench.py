"""What encoding costs the front end: one 1,024-word prompt (the TTFT benchmarks' prompts) and a
Pipeline batch of 1,000 x 128 words, through each path, with TOKENIZERS_PARALLELISM as you set it.

    python3 benchmark/tokenize_bench.py [--ckpt DIR]
    TOKENIZERS_PARALLELISM=false python3 benchmark/tokenize_bench.py [--ckpt DIR]

The checkpoint's tokenizer is product_path.py's word-level one unless --ckpt names another
(medians over 50 prompts, ms). model_loader/fast_encode.py says why the front ends use what they use.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Callable, Dict, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _median_ms(fn: Callable[[str], object], texts: List[str]) -> float:
    times = []
    for text in texts:
        start = time.perf_counter()
        fn(text)
        times.append(time.perf_counter() - start)
    return statistics.median(times[10:]) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default="/tmp/maga_llama3_8b_random")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from benchmark import product_path
    from maga_transformer.model_loader.fast_encode import FastEncoder
    with open(os.path.join(args.ckpt, "config.json")) as f:
        product_path._VOCAB[0] = json.load(f)["vocab_size"]
    tokenizer = AutoTokenizer.from_pretrained(args.ckpt)
    backend, encoder = tokenizer.backend_tokenizer, FastEncoder(tokenizer)
    texts = [product_path._text(p) for p in product_path._prompt_ids(60, 1024, 9)]
    report: Dict[str, object] = {"TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM")}
    report["one_prompt_ms"] = {
        "backend.encode": _median_ms(lambda t: backend.encode(t).ids, texts),
        "backend.encode_batch_fast": _median_ms(lambda t: backend.encode_batch_fast([t])[0].ids, texts),
        "transformers encode": _median_ms(tokenizer.encode, texts),
        "FastEncoder.encode": _median_ms(encoder.encode, texts)}
    batch = [product_path._text(p) for p in product_path._prompt_ids(1000, 128, 5)]
    report["batch_1000x128_ms"] = {}
    for name, fn in (("FastEncoder.encode_batch", encoder.encode_batch),
                     ("transformers tokenizer(batch)", lambda b: tokenizer(b)["input_ids"])):
        fn(batch)
        start = time.perf_counter()
        fn(batch)
        report["batch_1000x128_ms"][name] = (time.perf_counter() - start) * 1e3
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
