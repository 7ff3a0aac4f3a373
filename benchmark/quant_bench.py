"""Quantized weights and KV cache against bf16 on the GPU, Llama-3-8B shape (random weights), in one run.

    python3 benchmark/quant_bench.py [--ckpt DIR] [--modes bf16,int8,fp8,int8kv] [--quick] [--long-context]
                                     [--pipeline] [--out results.json]

Each mode loads the same checkpoint through ModelFactory (WEIGHT_TYPE / KV_CACHE_DTYPE as a user sets
them, the engine in-process so this thread drives its steps) and measures: batch-1 decode (128 in /
256 out, tok/s between the first and last token), the time to first token of one 1,024-token prompt
(prefill speed), and offline throughput of 1,000 x 128 / 128; plus the KV tokens the pool holds and
batch-1 decode's share of its bandwidth floor (the bytes one step reads: the projections at their
storage size, the LM head in bf16, the KV cache). Ratios are against the first mode.
"""
from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import time
from typing import Dict

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

logger = logging.getLogger("benchmark.quant")
MODES = {"bf16": ("bf16", "auto"), "int8": ("int8", "auto"), "fp8": ("fp8", "auto"),
         "int8kv": ("bf16", "int8"), "fp8kv": ("bf16", "fp8")}


LONG_CONTEXT = 32768


def pipeline_mode(ckpt: str, name: str, quick: bool) -> Dict[str, object]:
    """What a user of the Pipeline sees (the engine core in its own process, start_server's layout):
    streaming batch-1 decode, 128 in / 256 out, and offline generate of 200 (quick) or 1,000 x 128 / 128."""
    from benchmark.product_path import _prompt_ids, _stream_times, _text
    from maga_transformer.pipeline import Pipeline
    weight_type, kv = MODES[name]
    pipeline = Pipeline(_load(ckpt, weight_type, kv, 4096, engine_process=True))
    try:
        _stream_times(pipeline, _text(_prompt_ids(1, 128, 7)[0]), 8)  # warm-up
        _, times = _stream_times(pipeline, _text(_prompt_ids(1, 128, 1)[0]), 256)
        prompts = [_text(p) for p in _prompt_ids(200 if quick else 1000, 128, 5)]
        start = time.perf_counter()
        result = pipeline.generate(prompts, max_new_tokens=128, top_k=1, ignore_eos=True)
        elapsed = time.perf_counter() - start
    finally:
        pipeline.stop()
    return {"pipeline_batch1_decode_tok_s": (len(times) - 1) / (times[-1] - times[0]),
            "pipeline_offline_tok_s": sum(o.aux_info.output_len for o in result.outputs) / elapsed}


def _load(ckpt: str, weight_type: str, kv_cache_dtype: str, max_seq_len: int, engine_process: bool = False):
    from maga_transformer.config import EngineConfig, ModelConfig
    from maga_transformer.model_factory import ModelFactory
    return ModelFactory.from_huggingface(
        ckpt, ModelConfig(max_seq_len=max_seq_len, weight_type=weight_type, act_type="bf16"),
        engine_config=EngineConfig(engine_process=engine_process, max_num_seqs=256, max_num_batched_tokens=8192,
                                   enable_prefix_cache=False, kv_cache_dtype=kv_cache_dtype))


def step_bytes(model, weight_type: str) -> int:
    """Bytes a batch-1 decode step reads at short context: every projection at its storage size
    (one byte a weight quantized, two in bf16) and the bf16 LM head."""
    from benchmark.gpu_bench import linear_params
    arch = model.arch
    lm_head = arch.vocab_size * arch.hidden_size
    projections = linear_params(model) - lm_head
    return int(projections * (1 if weight_type in ("int8", "fp8") else 2) + lm_head * 2)


def bench_mode(ckpt: str, name: str, quick: bool, copy_gbs: float, long_context: bool) -> Dict[str, object]:
    from benchmark.gpu_bench import random_prompts, run_batch
    weight_type, kv = MODES[name]
    start = time.perf_counter()
    model = _load(ckpt, weight_type, kv, LONG_CONTEXT + 256 if long_context else 4096)
    engine = model.engine
    out: Dict[str, object] = {"load_s": time.perf_counter() - start, "description": engine.info.description,
                              "kv_tokens": engine.info.num_blocks * engine.info.block_size}
    vocab = model.model.arch.vocab_size
    run_batch(engine, random_prompts(2, 128, vocab, 7), 8)  # warm-up
    out["batch1_decode_tok_s"] = run_batch(engine, random_prompts(1, 128, vocab, 1), 256)["decode_tok_s"]
    ttft = [run_batch(engine, random_prompts(1, 1024, vocab, 9 + i), 1)["elapsed_s"] for i in range(5)]
    out["ttft_1024_ms"] = min(ttft) * 1e3
    out["offline_tok_s"] = run_batch(engine, random_prompts(200 if quick else 1000, 128, vocab, 5), 128)["output_tok_s"]
    floor_tok_s = copy_gbs * 1e9 / step_bytes(model.model, weight_type)
    out["batch1_floor_tok_s"] = floor_tok_s
    out["batch1_share_of_floor"] = out["batch1_decode_tok_s"] / floor_tok_s
    if long_context:  # batch-1 decode after a 32k-token prompt: the KV read dominates
        out["decode_at_32k_tok_s"] = run_batch(engine, random_prompts(1, LONG_CONTEXT, vocab, 3), 64)["decode_tok_s"]
    model.stop()
    del model, engine
    gc.collect()
    torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt", default="/tmp/maga_llama3_8b_random")
    parser.add_argument("--modes", default="bf16,int8,fp8")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--long-context", action="store_true", help="also batch-1 decode after a 32k prompt")
    parser.add_argument("--pipeline", action="store_true",
                        help="measure through the Pipeline (engine core in its own process) instead")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    from benchmark.gpu_bench import copy_bandwidth, emit_report
    from benchmark.product_path import make_checkpoint
    make_checkpoint(args.ckpt)
    copy_gbs = copy_bandwidth() / 1e9
    report: Dict[str, object] = {"device": torch.cuda.get_device_name(0), "copy_gb_s": copy_gbs, "modes": {}}
    modes = args.modes.split(",")
    for name in modes:
        report["modes"][name] = (pipeline_mode(args.ckpt, name, args.quick) if args.pipeline
                                 else bench_mode(args.ckpt, name, args.quick, copy_gbs, args.long_context))
        logger.info("%s: %s", name, report["modes"][name])
    base = report["modes"][modes[0]]
    if args.pipeline:
        report["ratios"] = {name: {key: r[key] / base[key] for key in r} for name, r in report["modes"].items()}
        emit_report(report, args.out)
        return
    keys = ("batch1_decode_tok_s", "offline_tok_s", "kv_tokens") + (("decode_at_32k_tok_s",) if args.long_context else ())
    report["ratios"] = {name: {key: r[key] / base[key] for key in keys}
                        | {"prefill_speed": base["ttft_1024_ms"] / r["ttft_1024_ms"]}
                        for name, r in report["modes"].items()}
    emit_report(report, args.out)


if __name__ == "__main__":
    main()
