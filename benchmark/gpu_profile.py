"""Where a decode step's GPU time goes (Llama-3-8B shape, bf16, random weights).

    python3 benchmark/gpu_profile.py [--batch 1 64] [--context 256] [--prefill 16 512] [--host 256]
                                     [--steps 1] [--overhead 1 64]

Prints, per batch size: torch.profiler's CUDA kernel table for one eager decode forward (the same
kernels the CUDA graph replays), and the achieved bandwidth of each linear layer shape alone.
"""
from __future__ import annotations

import argparse
import itertools
import logging
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmark.gpu_bench import (LLAMA3_8B, build_engine, build_hf, build_ours, graph_time_us,  # noqa: E402
                                 random_prompts, step_until_decoding)

logger = logging.getLogger("benchmark.gpu_profile")


def linear_rates(model, batch: int) -> None:
    """Each linear shape alone, as cuBLAS runs it and as ops.linear does, timed inside CUDA graphs
    (as decode runs them: no launch overhead): GB/s of weight streamed. Each call takes the next
    layer's weight, as a decode step does, so a weight smaller than L2 is not served from it."""
    from maga_transformer import ops
    for name in ("qkv", "o", "gate_up", "down", "lm_head"):
        weights = [model.lm_head] if name == "lm_head" else [getattr(layer, name) for layer in model.layers]
        x = torch.randn(batch, weights[0].in_features, dtype=torch.bfloat16, device="cuda")
        cycle = itertools.cycle(weights)
        calls = 2 * len(weights)  # each weight twice per graph, never twice in a row (unless only one)
        cublas = graph_time_us(lambda: torch.nn.functional.linear(x, next(cycle).weight), calls=calls)
        ours = graph_time_us(lambda: ops.linear(x, next(cycle)), calls=calls)
        gbs = lambda us: weights[0].weight.numel() * 2 / us / 1e3  # noqa: E731
        logger.info("linear %-8s batch %3d: cuBLAS %7.1f us %6.0f GB/s | ops.linear %7.1f us %6.0f GB/s", name, batch,
                    cublas, gbs(cublas), ours, gbs(ours))


def profile_decode(engine, batch: int, context: int, vocab: int) -> None:
    from maga_transformer.config import GenerateConfig
    cfg = GenerateConfig(max_new_tokens=context, top_k=1, ignore_eos=True)
    for p in random_prompts(batch, context, vocab, seed=batch):
        engine.add_request(p, cfg)
    step_until_decoding(engine)
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


def _timed_step(engine) -> float:
    """Wall time of one engine.step(), the device drained before and after."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    engine.step()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def _time_and_profile(one_step, label: str) -> None:
    """A first (cold) run, the best of 3 more, then one run under the profiler: its GPU and host tables."""
    first = one_step()
    times = [one_step() for _ in range(3)]
    print(f"=== {label}: first {first * 1000:.1f} ms, then {min(times) * 1000:.1f} ms (best of 3) ===")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        one_step()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=70))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15, max_name_column_width=70))


def profile_prefill(engine, prompts: int, length: int, vocab: int) -> None:
    """One step that prefills `prompts` fresh prompts of `length` tokens: its wall time, and where
    its GPU and host time go."""
    from maga_transformer.config import GenerateConfig
    cfg = GenerateConfig(max_new_tokens=1, top_k=1, ignore_eos=True)

    def one_step() -> float:
        for p in random_prompts(prompts, length, vocab, seed=length + prompts + int(time.time() * 1000) % 997):
            engine.add_request(p, cfg)
        elapsed = _timed_step(engine)
        engine.run_until_idle()
        return elapsed

    _time_and_profile(one_step, f"prefill of {prompts} x {length} tokens in one step")


def profile_mixed(engine, decodes: int, prompts: int, length: int, vocab: int) -> None:
    """One step that prefills `prompts` fresh prompts of `length` tokens while `decodes` requests
    decode (what a loaded server runs when new requests arrive): its wall time and kernels."""
    from maga_transformer.config import GenerateConfig
    cfg = GenerateConfig(max_new_tokens=1, top_k=1, ignore_eos=True)

    def one_step(length: int = length) -> float:
        start_decoding(engine, decodes, vocab, 64, seed=int(time.time() * 1000) % 997)
        for p in random_prompts(prompts, length, vocab, seed=length + prompts + int(time.time() * 1000) % 991):
            engine.add_request(p, cfg)
        if engine.core._inflight is not None:
            engine.step()  # reads the launched decode back and admits the prompts (no new launch)
        elapsed = _timed_step(engine)
        for request_id in list(engine._handles):
            engine.abort(request_id)
        engine.run_until_idle()
        return elapsed

    _time_and_profile(one_step, f"{prompts} x {length} prompt tokens beside {decodes} decodes in one step")
    # A loaded server's steps rarely repeat a token count: what does a step of a count never seen cost?
    fresh = [one_step(length + k) for k in range(1, 4)]
    print(f"=== the same with prompts of {length + 1}..{length + 3} tokens (token counts not seen before): "
          + ", ".join(f"{t * 1000:.1f}" for t in fresh) + " ms ===")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        one_step(length + 4)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70))


def start_decoding(engine, batch: int, vocab: int, new_tokens: int, seed: int) -> None:
    """`batch` fresh 128-token prompts (final outputs only), stepped until every one decodes."""
    from maga_transformer.config import GenerateConfig
    cfg = GenerateConfig(max_new_tokens=new_tokens, top_k=1, ignore_eos=True)
    for p in random_prompts(batch, 128, vocab, seed=seed):
        engine.add_request(p, cfg, stream=False)
    step_until_decoding(engine)


def profile_host(engine, batch: int, vocab: int, steps: int = 40) -> None:
    """Where the host's time goes in overlapped decode steps at `batch` (cProfile), and how long the
    host waits for the GPU (reading a draw back): a host-bound loop hardly waits."""
    import cProfile
    import io
    import pstats

    from maga_transformer.engine import transfer
    start_decoding(engine, batch, vocab, steps + 20, seed=3)
    waited = [0.0]
    original_get = transfer.HostCopy.get

    def timed_get(self):
        start = time.perf_counter()
        try:
            return original_get(self)
        finally:
            waited[0] += time.perf_counter() - start
    transfer.HostCopy.get = timed_get
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    wall = (time.perf_counter() - start) / steps * 1000
    print(f"=== host at batch {batch}: {wall:.2f} ms a step, {waited[0] / steps * 1000:.2f} ms of it waiting for "
          f"the GPU; graph replay alone {engine.runner.graphs and _replay_ms(engine, batch):.2f} ms ===")
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(10):
        engine.step()
    profiler.disable()
    transfer.HostCopy.get = original_get
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
    print(text.getvalue())
    engine.run_until_idle()


def profile_steps(engine, batch: int, vocab: int, steps: int = 10) -> None:
    """GPU kernels of `steps` whole engine decode steps (overlapped as the engine runs them): the
    graph's kernels and everything around it (sampling, copies)."""
    start_decoding(engine, batch, vocab, steps + 20, seed=4)
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / steps * 1000
    print(f"=== {steps} engine steps at batch {batch}: {wall:.2f} ms a step (profiled) ===")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70))
    engine.run_until_idle()


def profile_overhead(engine, batch: int, vocab: int, iters: int = 200) -> None:
    """What a decode step adds on the GPU around its graph, cumulatively (ms a step, the host far
    ahead): the graph alone; + the input copies of DecodeGraphs.run; + the greedy draw and its
    read-back (as the overlapped engine runs them); and whole engine steps."""
    from maga_transformer.engine.cuda_graph import DecodeRow
    from maga_transformer.engine.sampler import SamplingRow, sample
    from maga_transformer.engine.transfer import HostCopy
    graphs = engine.runner.graphs
    rows = [DecodeRow(0, 200, 12 * 16 + i % 16, list(range(13))) for i in range(batch)]  # free blocks
    sampling = [SamplingRow(temperature=0.0)] * batch
    tokens = torch.zeros(batch, dtype=torch.long, device="cuda")

    def per_step_ms(step) -> float:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / iters * 1000

    size = graphs.bucket(batch)
    graphs.run(rows, tokens)  # the graph's buffers now hold these rows: the replays attend over their keys
    replay = per_step_ms(graphs.graphs[size].replay)
    inputs = per_step_ms(lambda: graphs.run(rows, tokens))
    previous = []

    def draw_step() -> None:
        logits = graphs.run(rows, tokens)
        drawn = sample(logits, sampling)
        copy = HostCopy([drawn.token_ids, drawn.logprobs, None, None])
        if previous:
            previous.pop().get()
        previous.append(copy)
    drawn = per_step_ms(draw_step)
    start_decoding(engine, batch, vocab, iters + 40, seed=5)
    steps = per_step_ms(engine.step)
    engine.run_until_idle()
    print(f"=== batch {batch}, ms a step: graph replay {replay:.3f}; + input copies {inputs:.3f}; + greedy draw "
          f"and read-back {drawn:.3f}; engine decode steps {steps:.3f} ===")


def _replay_ms(engine, batch: int) -> float:
    from benchmark.gpu_bench import graph_replay_ms
    return graph_replay_ms(engine, batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, nargs="*", default=[1, 64])
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--host", type=int, nargs="*", default=[], metavar="BATCH",
                        help="also profile the host side of overlapped decode steps at these batch sizes")
    parser.add_argument("--prefill", type=int, nargs=2, metavar=("PROMPTS", "LENGTH"), action="append", default=[],
                        help="also profile one prefill step of PROMPTS fresh prompts of LENGTH tokens")
    parser.add_argument("--mixed", type=int, nargs=3, metavar=("DECODES", "PROMPTS", "LENGTH"), action="append",
                        default=[], help="also profile a step of PROMPTS fresh prompts beside DECODES decodes")
    parser.add_argument("--steps", type=int, nargs="*", default=[], metavar="BATCH",
                        help="also list the GPU kernels of whole engine steps at these batch sizes")
    parser.add_argument("--overhead", type=int, nargs="*", default=[], metavar="BATCH",
                        help="also time what a decode step adds around its graph at these batch sizes")
    parser.add_argument("--max-seqs", type=int, default=256, help="the engine's max_num_seqs (graph buckets)")
    parser.add_argument("--step-tokens", type=int, default=8192, help="the engine's max_num_batched_tokens")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    hf_model = build_hf(LLAMA3_8B)
    model = build_ours(hf_model)
    del hf_model
    torch.cuda.empty_cache()
    engine = build_engine(model, max_seq_len=4096, max_num_seqs=args.max_seqs, max_num_batched_tokens=args.step_tokens)
    for batch in args.batch:
        linear_rates(model, batch)
        profile_decode(engine, batch, args.context, LLAMA3_8B["vocab_size"])
    for prompts, length in args.prefill:
        profile_prefill(engine, prompts, length, LLAMA3_8B["vocab_size"])
    for decodes, prompts, length in args.mixed:
        profile_mixed(engine, decodes, prompts, length, LLAMA3_8B["vocab_size"])
    for batch in args.host:
        profile_host(engine, batch, LLAMA3_8B["vocab_size"])
    for batch in args.steps:
        profile_steps(engine, batch, LLAMA3_8B["vocab_size"])
    for batch in args.overhead:
        profile_overhead(engine, batch, LLAMA3_8B["vocab_size"])


if __name__ == "__main__":
    main()
