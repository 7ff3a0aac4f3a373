"""Serving benchmark in the manner of `vllm bench serve`: a client process streams /v1/completions
from `python3 -m maga_transformer.start_server` (its own process) at fixed concurrency levels.

    python3 benchmark/serving.py [--model DIR] [--concurrency 1 8 32] [--input-len 128] [--output-len 64]
                                 [--num-prompts N] [--out results.json]

Per level: TTFT, TPOT and ITL mean / median / p99 (ms), output tokens/s, requests/s. Random prompts of
`input-len` tokens (random vocabulary ids, as vLLM's random dataset), EOS ignored so every request
makes exactly `output-len` tokens. Then the same workload at the `--pipeline-concurrency` level (8)
through the Python Pipeline in this process, with the server stopped, for the server/Pipeline ratio.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import random
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List

import httpx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmark.server_process import ServerProcess  # noqa: E402

logger = logging.getLogger("benchmark.serving")


@dataclass
class RequestResult:
    ttft: float = 0.0
    itls: List[float] = field(default_factory=list)
    latency: float = 0.0
    output_tokens: int = 0
    ok: bool = False
    sent_at: float = 0.0  # time.perf_counter() at the send (CLOCK_MONOTONIC on Linux: time.monotonic()'s clock)


def random_prompts(tokenizer, count: int, input_len: int, seed: int) -> List[str]:
    rng = random.Random(seed)
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(len(tokenizer)) if i not in special]
    return [tokenizer.decode([rng.choice(vocab) for _ in range(input_len)]) for _ in range(count)]


async def _one_request(client: httpx.AsyncClient, url: str, prompt: str, output_len: int) -> RequestResult:
    body = {"model": "bench", "prompt": prompt, "max_tokens": output_len, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    result, start = RequestResult(), time.perf_counter()
    result.sent_at = start
    last = None
    async with client.stream("POST", url + "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            return result
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if chunk.get("usage"):
                result.output_tokens = chunk["usage"]["completion_tokens"]
            if not any(c.get("text") for c in chunk["choices"]):
                continue
            now = time.perf_counter()
            if last is None:
                result.ttft = now - start
            else:
                result.itls.append(now - last)
            last = now
    result.latency = time.perf_counter() - start
    result.ok = result.output_tokens > 0
    return result


async def run_level(url: str, prompts: List[str], output_len: int, concurrency: int, raw: bool = False):
    """The level's summary (raw=True: the per-request results, for callers that merge several)."""
    queue: "asyncio.Queue[str]" = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    results: List[RequestResult] = []

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            results.append(await _one_request(client, url, queue.get_nowait(), output_len))

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*[worker(client) for _ in range(concurrency)])
        duration = time.perf_counter() - start
    return results if raw else summarize(results, duration, concurrency)


def _pct(values: List[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else float("nan")


def summarize(results: List[RequestResult], duration: float, concurrency: int) -> Dict[str, float]:
    ok = [r for r in results if r.ok]
    ttft = [r.ttft * 1000 for r in ok]
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) * 1000 for r in ok if r.output_tokens > 1]
    itl = [x * 1000 for r in ok for x in r.itls]
    tokens = sum(r.output_tokens for r in ok)
    out = {"concurrency": concurrency, "requests": len(results), "failed": len(results) - len(ok),
           "duration_s": duration, "output_tok_s": tokens / duration, "requests_s": len(ok) / duration}
    for name, values in (("ttft", ttft), ("tpot", tpot), ("itl", itl)):
        out[f"{name}_mean_ms"] = statistics.fmean(values) if values else float("nan")
        out[f"{name}_median_ms"] = statistics.median(values) if values else float("nan")
        out[f"{name}_p99_ms"] = _pct(values, 0.99)
    return out


def run_pipeline(model_dir: str, prompts: List[str], output_len: int, concurrency: int) -> Dict[str, float]:
    """The same closed-loop workload through the Python Pipeline (no HTTP), `concurrency` callers."""
    from maga_transformer.model_factory import ModelFactory
    from maga_transformer.pipeline import Pipeline
    from maga_transformer.config import EngineConfig
    # the server's engine settings: no prefix cache, the default KV budget
    model = ModelFactory.from_huggingface(model_dir or None,
                                          engine_config=EngineConfig(enable_prefix_cache=False))
    pipeline = Pipeline(model, model.tokenizer)
    for _ in pipeline(prompts[:1], max_new_tokens=4, top_k=1):  # warm-up, as the server had
        pass
    pending = list(prompts)
    lock, produced = threading.Lock(), []

    def caller() -> None:
        while True:
            with lock:
                if not pending:
                    return
                prompt = pending.pop()
            last = None
            for last in pipeline([prompt], max_new_tokens=output_len, top_k=1, ignore_eos=True):
                pass
            produced.append(last.outputs[0].aux_info.output_len)

    threads = [threading.Thread(target=caller) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    duration = time.perf_counter() - start
    model.stop()
    return {"concurrency": concurrency, "requests": len(prompts), "duration_s": duration,
            "output_tok_s": sum(produced) / duration}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="", help="checkpoint dir (default: the embedded SmolLM2)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--num-prompts", type=int, default=0, help="per level; default 4 x concurrency (>= 8)")
    parser.add_argument("--pipeline-concurrency", type=int, default=8)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request

    from maga_transformer.model_loader import default_model_dir, load_tokenizer
    model_dir = args.model or default_model_dir()
    tokenizer = load_tokenizer(model_dir)
    env = {"CHECKPOINT_PATH": model_dir, "CONCURRENCY_LIMIT": str(max(args.concurrency) + 8),
           "USE_BLOCK_CACHE": "0"}  # random prompts share nothing; keep the comparison with the Pipeline plain
    server = ServerProcess(env)
    levels, pipeline_prompts = [], []
    try:
        asyncio.run(run_level(server.url, random_prompts(tokenizer, 2, args.input_len, 0), 4, 1))  # warm-up
        for concurrency in args.concurrency:
            count = args.num_prompts or max(8, 4 * concurrency)
            prompts = random_prompts(tokenizer, count, args.input_len, seed=concurrency)
            if concurrency == args.pipeline_concurrency:
                pipeline_prompts = prompts
            levels.append(asyncio.run(run_level(server.url, prompts, args.output_len, concurrency)))
            logger.info(json.dumps(levels[-1]))
    finally:
        server.stop()
    report = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "commit": _commit(), "date": time.strftime("%Y-%m-%d"), "input_len": args.input_len,
              "output_len": args.output_len, "server": levels}
    if pipeline_prompts:
        report["pipeline"] = run_pipeline(args.model, pipeline_prompts, args.output_len, args.pipeline_concurrency)
        server_level = next(l for l in levels if l["concurrency"] == args.pipeline_concurrency)
        report["server_over_pipeline"] = server_level["output_tok_s"] / report["pipeline"]["output_tok_s"]
        logger.info(json.dumps(report["pipeline"]))
    print(json.dumps(report, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


def _commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    main()
