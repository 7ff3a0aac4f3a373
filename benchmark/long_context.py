"""Long contexts through the public API (issue 15): a Llama-3-8B-shaped model with its positions
raised to 64k (and, with --128k, a Llama-3.1-shaped one at 128k), bf16 random weights, the engine
core in its own process behind `Pipeline`, the engine settings a user gets by default.

    python3 benchmark/long_context.py [--out results.json] [--128k] [--quick]

Rows, each with its floor where one applies (bytes a step must read over the measured copy rate):
- time to first token of one 32,000-token prompt;
- batch-1 decode after a 32k prompt; batch 8 after 8k prompts; (--128k) batch 1 after a 128k prompt;
- the same 16k document again with a new question (prefix cache) against the first time;
- inter-token latency p99 of 32 streams while one 32k prompt prefills, against the same streams
  without it (LONG_PREFILL_TOKEN_THRESHOLD caps the long prompt's chunk next to decodes);
- the memory plan: KV tokens in the pool and how many contexts of the longest length fit.
The checkpoint reuses product_path.py's random weights (symlinks) with a longer config.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import threading
import time
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmark.product_path import _prompt_ids, _text, make_checkpoint  # noqa: E402

logger = logging.getLogger("benchmark.long_context")
LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}


def long_checkpoint(base: str, directory: str, positions: int, rope_scaling=None) -> str:
    """base's weights and tokenizer (symlinked) under a config with `positions` positions."""
    os.makedirs(directory, exist_ok=True)
    for name in os.listdir(base):
        target = os.path.join(directory, name)
        if name != "config.json" and not os.path.exists(target):
            os.symlink(os.path.join(base, name), target)
    with open(os.path.join(base, "config.json")) as f:
        config = json.load(f)
    config["max_position_embeddings"] = positions
    if rope_scaling:
        config["rope_scaling"] = rope_scaling
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    return directory


def _pipeline(ckpt: str, max_seq_len: int):
    from maga_transformer.config import ModelConfig
    from maga_transformer.model_factory import ModelFactory
    from maga_transformer.pipeline import Pipeline
    model = ModelFactory.from_huggingface(ckpt, ModelConfig(max_seq_len=max_seq_len))
    return Pipeline(model), model


def _stream(pipeline, prompts: List[str], output_len: int) -> List[float]:
    """Wall times of each streamed update (one per engine step that advanced the batch)."""
    times = []
    for _ in pipeline(prompts, max_new_tokens=output_len, top_k=1, ignore_eos=True):
        times.append(time.perf_counter())
    return times


def ttft_ms(pipeline, prompt: str) -> float:
    start = time.perf_counter()
    times = _stream(pipeline, [prompt], 1)
    return (times[0] - start) * 1e3


def decode_rate(pipeline, prompts: List[str], output_len: int) -> Dict[str, float]:
    """Output tokens per second of the steps after every prompt has its first token (the prefill of
    the later prompts, which shares steps with the first ones' decodes, is not counted)."""
    start_time = start_tokens = None
    for response in pipeline(prompts, max_new_tokens=output_len, top_k=1, ignore_eos=True):
        now = time.perf_counter()
        if any(o is None for o in response.outputs):
            continue
        tokens = sum(o.aux_info.output_len for o in response.outputs)
        if start_time is None:
            start_time, start_tokens = now, tokens
        end_time, end_tokens = now, tokens
    rate = (end_tokens - start_tokens) / (end_time - start_time)
    return {"batch": len(prompts), "step_ms": len(prompts) * 1e3 / rate, "tok_s": rate}


def prefix_reuse(pipeline, vocab_seed: int) -> Dict[str, float]:
    document = _prompt_ids(1, 16000, vocab_seed)[0]
    first, second = _prompt_ids(2, 32, vocab_seed + 1)
    cold = ttft_ms(pipeline, _text(document + first))
    warm = ttft_ms(pipeline, _text(document + second))
    return {"cold_ms": cold, "warm_ms": warm, "speedup": cold / warm}


def _itl_gaps(pipeline, prompts: List[str], output_len: int, gaps: List[float], start_evt, stop_at: list) -> None:
    """Streams one prompt and records its inter-token gaps that end inside the measured window."""
    start_evt.wait()
    last = None
    for _ in pipeline([prompts[0]], max_new_tokens=output_len, top_k=1, ignore_eos=True):
        now = time.perf_counter()
        if last is not None and stop_at[0] <= now <= stop_at[1]:
            gaps.append((now - last) * 1e3)
        last = now


def itl_with_long_prefill(pipeline, streams: int, long_prompt: str, with_long: bool) -> Dict[str, float]:
    """ITL of `streams` decoding streams over a window; with_long: one 32k prompt arrives at its start."""
    prompts = [_text(p) for p in _prompt_ids(streams, 128, 77)]
    gaps: List[float] = []
    start_evt = threading.Event()
    window = [float("inf"), float("inf")]
    threads = [threading.Thread(target=_itl_gaps, args=(pipeline, [p], 1024, gaps, start_evt, window))
               for p in prompts]
    for thread in threads:
        thread.start()
    start_evt.set()
    time.sleep(3.0)  # every stream decoding
    window[0] = time.perf_counter()
    long_ms = ttft_ms(pipeline, long_prompt) if with_long else None  # the window: its whole prefill
    if not with_long:
        time.sleep(1.5)
    window[1] = time.perf_counter()
    for thread in threads:
        thread.join()
    gaps.sort()
    return {"streams": streams, "gaps": len(gaps), "itl_p50_ms": gaps[len(gaps) // 2],
            "itl_p99_ms": gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))], "long_ttft_ms": long_ms}


def floors(copy_bytes_per_s: float, context: int, batch: int) -> float:
    """tok/s a decode step reaches at the copy rate: all weights but the embedding, plus the KV."""
    hidden, layers, inter, vocab, kv_heads, head_dim = 4096, 32, 14336, 128256, 8, 128
    per_layer = 2 * (hidden * (hidden + 2 * kv_heads * head_dim) + hidden * hidden + 3 * hidden * inter)
    weights = layers * per_layer + 2 * hidden * vocab
    kv = batch * 2 * layers * kv_heads * head_dim * 2 * context
    return batch * copy_bytes_per_s / (weights + kv)


def run(args) -> Dict[str, object]:
    import torch

    from benchmark.gpu_bench import copy_bandwidth
    from benchmark.serving import _commit
    report: Dict[str, object] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                 "date": time.strftime("%Y-%m-%d"), "commit": _commit()}
    copy = copy_bandwidth()
    report["copy_GB_s"] = copy / 1e9
    make_checkpoint(args.ckpt)
    ckpt = long_checkpoint(args.ckpt, args.ckpt + "_64k", 65536)
    pipeline, model = _pipeline(ckpt, 65536)
    try:
        info = model.engine.info
        report["memory_plan"] = {"kv_tokens": info.num_blocks * info.block_size, "description": info.description,
                                 "contexts_of_64k": info.num_blocks * info.block_size // 65536}
        _stream(pipeline, [_text(_prompt_ids(1, 512, 3)[0])], 4)  # warm-up
        long_prompt = _text(_prompt_ids(1, 32000, 11)[0])
        report["ttft_32k_ms"] = min(ttft_ms(pipeline, _text(_prompt_ids(1, 32000, 11 + i)[0])) for i in range(2))
        rate = decode_rate(pipeline, [long_prompt], 64 if args.quick else 128)
        rate["floor_tok_s"] = floors(copy, 32000 + 64, 1)
        report["decode_b1_32k"] = rate
        eight = [_text(p) for p in _prompt_ids(8, 8000, 21)]
        # prefilled once first: the timed run's prompts then come from the prefix cache together, so
        # all eight decode side by side (fresh, the later ones' chunks would share the early ones' steps)
        _stream(pipeline, eight, 1)
        rate = decode_rate(pipeline, eight, 64 if args.quick else 128)
        rate["floor_tok_s"] = floors(copy, 8000 + 64, 8)
        report["decode_b8_8k"] = rate
        report["prefix_16k"] = prefix_reuse(pipeline, 31)
        report["itl_32_streams_alone"] = itl_with_long_prefill(pipeline, 32, long_prompt, False)
        report["itl_32_streams_with_32k_prefill"] = itl_with_long_prefill(  # a prompt nothing cached
            pipeline, 32, _text(_prompt_ids(1, 32000, 99)[0]), True)
        report["short_ttft_1024_ms"] = min(ttft_ms(pipeline, _text(p)) for p in _prompt_ids(3, 1024, 41))
        report["short_decode_b1"] = decode_rate(pipeline, [_text(_prompt_ids(1, 128, 1)[0])], 256)
    finally:
        pipeline.stop()
    if args.with_128k:
        ckpt = long_checkpoint(args.ckpt, args.ckpt + "_128k", 131072, LLAMA31_ROPE)
        pipeline, model = _pipeline(ckpt, 131072)
        try:
            info = model.engine.info
            report["memory_plan_128k"] = {"kv_tokens": info.num_blocks * info.block_size,
                                          "contexts_of_128k": info.num_blocks * info.block_size // 131072}
            start = time.perf_counter()
            rate = decode_rate(pipeline, [_text(_prompt_ids(1, 128000, 51)[0])], 64)
            report["ttft_and_decode_128k_s"] = time.perf_counter() - start
            rate["floor_tok_s"] = floors(copy, 128000 + 32, 1)
            report["decode_b1_128k"] = rate
        finally:
            pipeline.stop()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default="/tmp/maga_llama3_8b_random")
    parser.add_argument("--128k", dest="with_128k", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from benchmark.gpu_bench import emit_report
    emit_report(run(args), args.out)


if __name__ == "__main__":
    main()
