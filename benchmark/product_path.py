"""What users call against the engine alone, in one run: the Pipeline and the server (both with the
engine core in its own process, the default) next to the same engine driven on this thread.

    python3 benchmark/product_path.py [--quick] [--out results.json] [--ckpt DIR]

A random-weight Llama-3-8B-shaped checkpoint (bf16 safetensors + a word-level tokenizer, so a text
prompt encodes to exactly the random ids) is written once under --ckpt, then three phases run, each
in its own process so the GPU is free for the next (the KV pool takes what the card has left):
1. engine: the in-process Engine stepped on this thread (no front end in the loop): batch-1 decode
   (128 in / 256 out), time to first token of a 1,024-token prompt, a closed loop of 64 and of 256
   concurrent requests (128 / 128), offline 1,000 x 128 / 128 in one submission;
2. pipeline: the same through `Pipeline` (streaming for batch 1 and the TTFT, `generate` offline);
3. server: `python3 -m maga_transformer.start_server` (its own processes), streamed /v1/completions
   from client processes: batch 1, the TTFT, 64 and 256 concurrent streams.
Every phase uses the same engine size (MAX_NUM_SEQS 256, MAX_NUM_BATCHED_TOKENS 8192, no prefix
cache: random prompts share nothing). Ratios against the engine phase close the report.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

logger = logging.getLogger("benchmark.product_path")
ENGINE_SIZE = {"max_num_seqs": 256, "max_num_batched_tokens": 8192, "enable_prefix_cache": False}
MAX_SEQ_LEN = 4096


_VOCAB = [128256]  # the checkpoint's, once read


def _prompt_ids(count: int, length: int, seed: int) -> List[List[int]]:
    from benchmark.gpu_bench import random_prompts
    return random_prompts(count, length, _VOCAB[0], seed)


def _text(ids: List[int]) -> str:
    return " ".join(f"w{i}" for i in ids)  # the word-level tokenizer's words: encodes back to `ids`


# ---- the checkpoint -------------------------------------------------------------------------------

def make_checkpoint(directory: str) -> None:
    import torch

    from benchmark.gpu_bench import LLAMA3_8B, build_hf
    from maga_transformer.test.fixtures import _tiny_tokenizer_dir
    if os.path.exists(os.path.join(directory, "config.json")):
        return
    start = time.perf_counter()
    model = build_hf(LLAMA3_8B)
    model.save_pretrained(directory)
    tokenizer_dir = _tiny_tokenizer_dir(LLAMA3_8B["vocab_size"])
    for name in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, name), os.path.join(directory, name))
    del model
    torch.cuda.empty_cache()
    logger.info("checkpoint written in %.1f s", time.perf_counter() - start)


def _load(ckpt: str, process: bool):
    """The defaults a user gets (a visible GPU, the checkpoint's bf16), at the benchmark's engine size."""
    from maga_transformer.config import EngineConfig, ModelConfig
    from maga_transformer.model_factory import ModelFactory
    return ModelFactory.from_huggingface(ckpt, ModelConfig(max_seq_len=MAX_SEQ_LEN),
                                         engine_config=EngineConfig(engine_process=process, **ENGINE_SIZE))


# ---- phase 1: the engine alone --------------------------------------------------------------------

def _tpot_ms(output) -> float:
    aux = output.aux_info
    return (aux.cost_time - aux.first_token_time) / max(aux.output_len - 1, 1)


def engine_closed_loop(engine, prompts: List[List[int]], output_len: int, concurrency: int) -> Dict[str, float]:
    """`concurrency` requests in flight, a new one as each finishes, stepped on this thread."""
    from maga_transformer.config import GenerateConfig
    cfg = GenerateConfig(max_new_tokens=output_len, top_k=1, ignore_eos=True)
    pending, live, done = list(prompts), [], []
    start = time.perf_counter()
    while pending or live:
        while pending and len(live) < concurrency:
            live.append(engine.add_request(pending.pop(), cfg, stream=False))
        engine.step()
        finished = [h for h in live if h.queue.qsize()]
        for handle in finished:
            live.remove(handle)
            done.append(handle.result())
    elapsed = time.perf_counter() - start
    tokens = sum(o.aux_info.output_len for o in done)
    return {"concurrency": concurrency, "requests": len(done), "output_tok_s": tokens / elapsed,
            "tpot_median_ms": statistics.median(_tpot_ms(o) for o in done)}


def phase_engine(ckpt: str, quick: bool) -> Dict[str, object]:
    import gc

    from benchmark.gpu_bench import run_batch
    model = _load(ckpt, process=False)
    engine = model.engine
    gc.freeze()
    run_batch(engine, _prompt_ids(2, 128, 7), 8)  # warm-up
    out: Dict[str, object] = {"batch1": run_batch(engine, _prompt_ids(1, 128, 1), 256)}
    ttft_runs = [run_batch(engine, _prompt_ids(1, 1024, 9 + i), 1) for i in range(5)]
    out["ttft_1024_ms"] = min(r["elapsed_s"] for r in ttft_runs) * 1e3
    out["core_ttft_1024_ms"] = min(r["ttft_max_ms"] for r in ttft_runs)  # from arrival in the core
    for concurrency in (64, 256):
        prompts = _prompt_ids(concurrency * (2 if quick else 4), 128, 300 + concurrency)
        out[f"closed_loop_{concurrency}"] = engine_closed_loop(engine, prompts, 128, concurrency)
    out["offline"] = run_batch(engine, _prompt_ids(200 if quick else 1000, 128, 5), 128)
    return out


# ---- phase 2: the Pipeline ------------------------------------------------------------------------

def _stream_times(pipeline, prompt: str, output_len: int, last: list = None):
    start = time.perf_counter()
    times = []
    for response in pipeline([prompt], max_new_tokens=output_len, top_k=1, ignore_eos=True):
        times.append(time.perf_counter())
        if last is not None:
            last[:] = [response]
    return start, times


def phase_pipeline(ckpt: str, quick: bool) -> Dict[str, object]:
    from maga_transformer.pipeline import Pipeline
    model = _load(ckpt, process=True)
    pipeline = Pipeline(model)
    try:
        _stream_times(pipeline, _text(_prompt_ids(1, 128, 7)[0]), 8)  # warm-up
        _, times = _stream_times(pipeline, _text(_prompt_ids(1, 128, 1)[0]), 256)
        out: Dict[str, object] = {"batch1_decode_tok_s": (len(times) - 1) / (times[-1] - times[0]),
                                  "batch1_updates": len(times)}
        ttfts, tokenize, core = [], [], []
        for i in range(5):
            text = _text(_prompt_ids(1, 1024, 9 + i)[0])
            start = time.perf_counter()
            pipeline.encode(text)
            tokenize.append((time.perf_counter() - start) * 1e3)
            last: list = []
            start, times = _stream_times(pipeline, text, 1, last)
            ttfts.append((times[0] - start) * 1e3)
            core.append(last[0].outputs[0].aux_info.first_token_time)  # from arrival in the core
        out["ttft_1024_ms"] = min(ttfts)
        out["tokenize_1024_ms"] = min(tokenize)  # part of the TTFT: the engine phase is handed ids
        out["core_ttft_1024_ms"] = min(core)  # the same TTFT as the core saw it (no front end, no hops)
        out["concurrent_64"] = _pipeline_callers(pipeline, 64, 1 if quick else 2)
        prompts = [_text(p) for p in _prompt_ids(200 if quick else 1000, 128, 5)]
        start = time.perf_counter()
        pipeline.tokenizer(prompts)
        tokenize_s = time.perf_counter() - start  # part of generate's time: the engine phase is handed ids
        start = time.perf_counter()
        result = pipeline.generate(prompts, max_new_tokens=128, top_k=1, ignore_eos=True)
        elapsed = time.perf_counter() - start
        tokens = sum(o.aux_info.output_len for o in result.outputs)
        out["offline"] = {"requests": len(prompts), "output_tok_s": tokens / elapsed, "elapsed_s": elapsed,
                          "tokenize_s": tokenize_s}
    finally:
        pipeline.stop()
    return out


def _pipeline_callers(pipeline, callers: int, rounds: int) -> Dict[str, float]:
    """`callers` threads, each streaming its own prompts one after another (the issue's table)."""
    prompts = [_text(p) for p in _prompt_ids(callers * rounds, 128, 400)]
    tokens = [0] * callers

    def caller(index: int) -> None:
        for prompt in prompts[index::callers]:
            for last in pipeline([prompt], max_new_tokens=128, top_k=1, ignore_eos=True):
                pass
            tokens[index] += last.outputs[0].aux_info.output_len
    threads = [threading.Thread(target=caller, args=(i,)) for i in range(callers)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"callers": callers, "output_tok_s": sum(tokens) / (time.perf_counter() - start)}


# ---- phase 3: the server --------------------------------------------------------------------------

def _warm_client(_: int) -> None:
    """Import what a client needs (httpx and friends) before the clock starts."""
    importlib.import_module("benchmark.serving")


def _client_share(args):
    """One client process's streams, started at the agreed wall-clock time (so the pool's start-up
    is not timed); returns its results and when it ended."""
    from benchmark.serving import run_level
    url, prompts, output_len, concurrency, start_at = args
    time.sleep(max(0.0, start_at - time.time()))
    results = asyncio.run(run_level(url, prompts, output_len, concurrency, raw=True))
    return results, time.time()


def server_level(url: str, prompts: List[str], output_len: int, concurrency: int, procs: int) -> Dict[str, float]:
    """Closed-loop streaming clients split over `procs` processes (one Python client process cannot
    parse the SSE lines of hundreds of fast streams without becoming the bottleneck itself)."""
    from benchmark.serving import summarize
    procs = max(1, min(procs, concurrency))
    with multiprocessing.get_context("spawn").Pool(procs) as pool:
        pool.map(_warm_client, range(procs))  # every worker is up, its imports done, before the clock starts
        start_at = time.time() + 1.0
        shares = [(url, prompts[i::procs], output_len, concurrency // procs + (i < concurrency % procs), start_at)
                  for i in range(procs)]
        done = pool.map(_client_share, shares)
    results = [r for share, _ in done for r in share]
    return summarize(results, max(end for _, end in done) - start_at, concurrency)


def _one_client(url: str, prompts: List[str], output_len: int) -> Dict[str, float]:
    """Requests one after another from this process over one warm connection; the first one only
    warms the connection and is not counted."""
    from benchmark.serving import _one_request, summarize

    async def run():
        async with httpx.AsyncClient(timeout=600) as client:
            await _one_request(client, url, prompts[0], output_len)
            start = time.perf_counter()
            results = [await _one_request(client, url, p, output_len) for p in prompts[1:]]
            return results, time.perf_counter() - start
    import httpx
    results, elapsed = asyncio.run(run())
    return summarize(results, elapsed, 1)


def phase_server(ckpt: str, quick: bool) -> Dict[str, object]:
    from benchmark.server_process import ServerProcess
    env = {"CHECKPOINT_PATH": ckpt, "MAX_SEQ_LEN": str(MAX_SEQ_LEN), "MAX_NUM_SEQS": "256", "PY_LOG_LEVEL": "INFO",
           "MAX_NUM_BATCHED_TOKENS": "8192", "USE_BLOCK_CACHE": "0", "CONCURRENCY_LIMIT": "512"}
    server = ServerProcess(env, startup_timeout_s=600)
    out: Dict[str, object] = {"start_up_log": server.startup_lines()}
    try:
        server_level(server.url, [_text(p) for p in _prompt_ids(2, 128, 7)], 8, 1, 1)  # warm-up
        out["batch1"] = _one_client(server.url, [_text(p) for p in _prompt_ids(3, 128, 1)], 256)
        ttft = _one_client(server.url, [_text(p) for p in _prompt_ids(6, 1024, 9)], 1)
        out["ttft_1024_ms"] = ttft["ttft_median_ms"]
        for concurrency in (64, 256):
            prompts = [_text(p) for p in _prompt_ids(concurrency * (2 if quick else 4), 128, 300 + concurrency)]
            out[f"streams_{concurrency}"] = server_level(server.url, prompts, 128, concurrency, min(8, concurrency // 16))
    finally:
        server.stop()
    return out


# ---- the run --------------------------------------------------------------------------------------

PHASES = {"engine": phase_engine, "pipeline": phase_pipeline, "server": phase_server}


def ratios(report: Dict[str, dict]) -> Dict[str, float]:
    eng, pipe, srv = report["engine"], report["pipeline"], report["server"]
    engine_step_b1 = 1000 / eng["batch1"]["decode_tok_s"]
    out = {"pipeline_batch1_decode_vs_engine": pipe["batch1_decode_tok_s"] / eng["batch1"]["decode_tok_s"],
           "pipeline_offline_vs_engine": pipe["offline"]["output_tok_s"] / eng["offline"]["output_tok_s"],
           "pipeline_ttft_minus_engine_ms": pipe["ttft_1024_ms"] - eng["ttft_1024_ms"],
           "server_ttft_minus_engine_ms": srv["ttft_1024_ms"] - eng["ttft_1024_ms"],
           "server_batch1_tpot_vs_engine_step": srv["batch1"]["tpot_median_ms"] / engine_step_b1}
    for c in (64, 256):
        loop, streams = eng[f"closed_loop_{c}"], srv[f"streams_{c}"]
        out[f"server_{c}_tok_s_vs_engine"] = streams["output_tok_s"] / loop["output_tok_s"]
        out[f"server_{c}_tpot_vs_engine"] = streams["tpot_median_ms"] / loop["tpot_median_ms"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default="/tmp/maga_llama3_8b_random")
    parser.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    parser.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)  # a child's one phase
    parser.add_argument("--phases", nargs="+", default=["engine", "pipeline", "server"])
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.phase:
        import torch
        if not torch.cuda.is_available():  # a smoke run of the script's paths on a CPU (--ckpt: a tiny model)
            torch.cuda.synchronize = lambda *a, **k: None
        with open(os.path.join(args.ckpt, "config.json")) as f:
            _VOCAB[0] = json.load(f)["vocab_size"]
        print("RESULT " + json.dumps(PHASES[args.phase](args.ckpt, args.quick)), flush=True)
        return
    import torch
    from benchmark.gpu_bench import emit_report
    from benchmark.serving import _commit
    report: Dict[str, object] = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
                                 "date": time.strftime("%Y-%m-%d"), "commit": _commit(),
                                 "model": "Llama-3-8B shape, bf16", "engine_size": ENGINE_SIZE}
    make_checkpoint(args.ckpt)
    for phase in args.phases:
        report[phase] = _run_phase(phase, args)
        logger.info("%s: %s", phase, json.dumps(report[phase]))
        if args.out:  # what ran so far survives a run cut short
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1)
    if all(p in report for p in PHASES):
        report["ratios"] = ratios(report)
    emit_report(report, args.out)


def _run_phase(phase: str, args) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--phase", phase, "--ckpt", args.ckpt]
    proc = subprocess.run(command + (["--quick"] if args.quick else []), stdout=subprocess.PIPE, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"failed": f"exit code {proc.returncode}"}
    return json.loads(lines[-1][len("RESULT "):])


if __name__ == "__main__":
    main()
