"""Offline throughput on the Llama-3-8B shape (random bf16 weights) under several engine settings.

    python3 benchmark/offline_bench.py [--count 1000] [--configs 1024:32768 512:16384] [--out results.json]

Each config is max_num_seqs:max_num_batched_tokens; the default, 1024:32768, takes all 1,000
requests in one batch (as vLLM's offline defaults do). One engine per config (the previous one freed
first: the KV pool is planned from free memory); 1,000 requests of 128 in / 128 out, EOS ignored,
submitted at once with stream=False. Steps are timed on the host and split by kind: steps that
carry a prefill chunk (decodes ride along in them), and pure decode steps (graph replays,
overlapped when possible; with overlap a step's host time covers launching the next one).
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import time
from typing import Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmark.gpu_bench import (LLAMA3_8B, build_engine, build_hf, build_ours, emit_report,  # noqa: E402
                                 linear_params, random_prompts)

logger = logging.getLogger("benchmark.offline")


class PlanRecorder:
    """Wraps the scheduler's schedule() to see what each step carries (prefill tokens or not)."""

    def __init__(self, engine) -> None:
        self.prefill_tokens = 0
        original = engine.scheduler.schedule

        def schedule():
            plan = original()
            self.prefill_tokens += sum(item.num_tokens for item in plan.scheduled if item.num_tokens > 1)
            return plan
        engine.scheduler.schedule = schedule


def run_offline(engine, prompts: List[List[int]], output_len: int) -> Dict[str, float]:
    from maga_transformer.config import GenerateConfig
    cfg = GenerateConfig(max_new_tokens=output_len, top_k=1, ignore_eos=True)
    recorder = PlanRecorder(engine)
    torch.cuda.synchronize()
    start = time.perf_counter()
    handles = [engine.add_request(p, cfg, stream=False) for p in prompts]
    times = {"prefill_steps_s": 0.0, "decode_steps_s": 0.0}
    counts = {"prefill_steps": 0, "decode_steps": 0}
    peak = 0
    while engine.has_work():
        before = recorder.prefill_tokens
        t0 = time.perf_counter()
        engine.step()
        kind = "prefill" if recorder.prefill_tokens > before else "decode"
        times[f"{kind}_steps_s"] += time.perf_counter() - t0
        counts[f"{kind}_steps"] += 1
        peak = max(peak, engine.num_running)
    elapsed = time.perf_counter() - start
    outs = [h.result() for h in handles]
    tokens = sum(o.aux_info.output_len for o in outs)
    return {"output_tok_s": tokens / elapsed, "elapsed_s": elapsed, "peak_running": peak, **times, **counts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--configs", nargs="+", default=["1024:32768"])
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    hf_model = build_hf(LLAMA3_8B)
    model = build_ours(hf_model)
    del hf_model
    gc.collect()
    torch.cuda.empty_cache()
    vocab = LLAMA3_8B["vocab_size"]
    report: Dict[str, object] = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
                                 "flops_per_token": 2 * linear_params(model), "runs": {}}
    for spec in args.configs:
        seqs, tokens = (int(x) for x in spec.split(":"))
        engine = build_engine(model, 4096, seqs, tokens)
        gc.freeze()
        run_offline(engine, random_prompts(2 * seqs, 16, vocab, 3), 4)  # warm-up: every graph bucket's path
        result = run_offline(engine, random_prompts(args.count, 128, vocab, 5), 128)
        report["runs"][spec] = result
        logger.info("%s: %s", spec, json.dumps(result))
        gc.unfreeze()
        del engine
        gc.collect()
        torch.cuda.empty_cache()
    emit_report(report, args.out)


if __name__ == "__main__":
    main()
