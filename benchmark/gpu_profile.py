"""Where a decode step's GPU time goes (Llama-3-8B shape, bf16, random weights).

    python3 benchmark/gpu_profile.py [--batch 1 64] [--context 256] [--prefill 16 512]

Prints, per batch size: torch.profiler's CUDA kernel table for one eager decode forward (the same
kernels the CUDA graph replays), and the achieved bandwidth of each linear layer shape alone.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmark.gpu_bench import LLAMA3_8B, build_engine, build_hf, build_ours, random_prompts  # noqa: E402

logger = logging.getLogger("benchmark.gpu_profile")


def linear_rates(model, batch: int) -> None:
    layer = model.layers[0]
    for name, w in (("qkv", layer.qkv), ("o", layer.o), ("gate_up", layer.gate_up), ("down", layer.down),
                    ("lm_head", model.lm_head)):
        x = torch.randn(batch, w.in_features, dtype=torch.bfloat16, device="cuda")
        torch.nn.functional.linear(x, w.weight)
        torch.cuda.synchronize()
        reps = 200
        start = time.perf_counter()
        for _ in range(reps):
            torch.nn.functional.linear(x, w.weight)
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / reps
        logger.info("linear %-8s batch %3d: %7.1f us, %6.0f GB/s", name, batch, seconds * 1e6,
                    w.weight.numel() * 2 / seconds / 1e9)


def profile_decode(engine, batch: int, context: int, vocab: int) -> None:
    from maga_transformer.config import GenerateConfig
    cfg = GenerateConfig(max_new_tokens=context, top_k=1, ignore_eos=True)
    for p in random_prompts(batch, context, vocab, seed=batch):
        engine.add_request(p, cfg)
    for _ in range(3):  # prefill, then decode steps: every sequence now sits in the graphs' buffers
        engine.step()
    graphs = engine.runner.graphs
    size = graphs.bucket(batch)
    forward = lambda: graphs._forward(graphs._batch(size))  # noqa: E731  (eager: the graph's kernels)
    forward()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            forward()
        torch.cuda.synchronize()
    print(f"=== batch {batch}, context {context}: kernels of 5 eager decode forwards ===")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))
    while engine.has_work():
        for request_id in list(engine._handles):
            engine.abort(request_id)
        engine.step()


def profile_prefill(engine, prompts: int, length: int, vocab: int) -> None:
    """One step that prefills `prompts` fresh prompts of `length` tokens: its wall time, and where
    its GPU and host time go."""
    from maga_transformer.config import GenerateConfig
    cfg = GenerateConfig(max_new_tokens=1, top_k=1, ignore_eos=True)

    def one_step() -> float:
        for p in random_prompts(prompts, length, vocab, seed=length + prompts + int(time.time() * 1000) % 997):
            engine.add_request(p, cfg)
        torch.cuda.synchronize()
        start = time.perf_counter()
        engine.step()
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        engine.run_until_idle()
        return elapsed

    first = one_step()
    times = [one_step() for _ in range(3)]
    print(f"=== prefill of {prompts} x {length} tokens in one step: first {first * 1000:.1f} ms, then "
          f"{min(times) * 1000:.1f} ms (best of 3) ===")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        one_step()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=70))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15, max_name_column_width=70))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, nargs="*", default=[1, 64])
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--prefill", type=int, nargs=2, metavar=("PROMPTS", "LENGTH"), action="append", default=[],
                        help="also profile one prefill step of PROMPTS fresh prompts of LENGTH tokens")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    hf_model = build_hf(LLAMA3_8B)
    model = build_ours(hf_model)
    del hf_model
    torch.cuda.empty_cache()
    engine = build_engine(model, max_seq_len=4096)
    for batch in args.batch:
        linear_rates(model, batch)
        profile_decode(engine, batch, args.context, LLAMA3_8B["vocab_size"])
    for prompts, length in args.prefill:
        profile_prefill(engine, prompts, length, LLAMA3_8B["vocab_size"])


if __name__ == "__main__":
    main()
