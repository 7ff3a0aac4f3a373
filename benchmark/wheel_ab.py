"""Batch-1 decode through the Pipeline from whichever maga_transformer is importable: the installed
release wheel or the source tree (issue 17's A/B). It does not put the source tree on sys.path.

    PYTHONPATH=<site with the wheel> python3 benchmark/wheel_ab.py --ckpt DIR --label wheel
    PYTHONPATH=<repo>                python3 benchmark/wheel_ab.py --ckpt DIR --label source

The checkpoint is product_path.py's Llama-3-8B-shaped one (a word-level tokenizer: "w<id>" words
encode to <id>). Prints one RESULT line: where the package and its CUDA library came from (bundled,
built, or none), whether nvcc is on PATH, and the decode rate (the best and the median of 5 runs
of 128 in / 256 out, tok/s between the first and the last token), the engine core in its own
process as start_server runs it.
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import statistics
import time


def _rate(pipeline, prompt: str, tokens: int) -> float:
    stamps = []
    for _ in pipeline([prompt], max_new_tokens=tokens, top_k=1, ignore_eos=True):
        stamps.append(time.perf_counter())
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--label", default="")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import maga_transformer
    from maga_transformer.config import EngineConfig, ModelConfig
    from maga_transformer.model_factory import ModelFactory
    from maga_transformer.ops._compiled import cuda_kernels
    from maga_transformer.pipeline import Pipeline
    kernels = cuda_kernels()
    with open(f"{args.ckpt}/config.json") as f:
        vocab = json.load(f)["vocab_size"]
    rng = random.Random(1)
    prompt = " ".join(f"w{rng.randrange(3, vocab)}" for _ in range(128))
    model = ModelFactory.from_huggingface(
        args.ckpt, ModelConfig(max_seq_len=4096),
        engine_config=EngineConfig(engine_process=True, max_num_seqs=256, max_num_batched_tokens=8192,
                                   enable_prefix_cache=False))
    pipeline = Pipeline(model)
    try:
        _rate(pipeline, prompt, 16)  # warm-up
        rates = [_rate(pipeline, prompt, 256) for _ in range(args.runs)]
    finally:
        pipeline.stop()
    print("RESULT " + json.dumps({
        "label": args.label, "package": maga_transformer.__file__, "nvcc_on_path": shutil.which("nvcc"),
        "cuda_library": None if kernels is None else {"source": kernels.source, "path": kernels.path},
        "batch1_tok_s_best": max(rates), "batch1_tok_s_median": statistics.median(rates), "rates": rates}), flush=True)


if __name__ == "__main__":
    main()
