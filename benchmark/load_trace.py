"""Where a loaded server's time goes: closed-loop streaming clients against the server, with the
engine core recording every step (MAGA_STEP_TRACE, engine/step_trace.py).

    python3 benchmark/load_trace.py --out DIR [--ckpt DIR] [--concurrency 64] [--rounds 4]
                                    [--variant NAME=ENV=VALUE,ENV=VALUE ...]
    python3 benchmark/load_trace.py --analyze DIR     # the summary again, from the saved files

For each variant (default: the server's defaults at product_path.py's engine size) it starts the
server, runs `concurrency` closed-loop clients over `rounds` x `concurrency` prompts of 128 tokens
(128 out), and saves the clients' per-request stamps (`<variant>.clients.json`: sent, first text,
end, all time.monotonic(), one clock with the core's) and the core's steps (`<variant>.steps.jsonl`).
The summary splits the run's wall time into CUDA-graph decode steps, eager steps with and without
prompt tokens, read-backs and idle gaps, and the clients' time to first token into the wait before
the request reached the core and the wait inside it (a request counts as in the core from the start of the step that takes it in).
"""
from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import statistics
import sys
import time
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmark import product_path  # noqa: E402

logger = logging.getLogger("benchmark.load_trace")


def _stamped_client(args) -> List[Dict[str, float]]:
    """One client process's share of the closed loop; per request: sent, first text, end."""
    import asyncio

    from benchmark.serving import run_level
    url, prompts, output_len, concurrency, start_at = args
    time.sleep(max(0.0, start_at - time.time()))
    results = asyncio.run(run_level(url, prompts, output_len, concurrency, raw=True))
    return [{"sent": r.sent_at, "first": r.sent_at + r.ttft, "end": r.sent_at + r.latency,
             "tokens": r.output_tokens} for r in results if r.ok]


def run_clients(url: str, prompts: List[str], concurrency: int, procs: int) -> List[Dict[str, float]]:
    procs = max(1, min(procs, concurrency))
    with multiprocessing.get_context("spawn").Pool(procs) as pool:
        pool.map(product_path._warm_client, range(procs))
        start_at = time.time() + 1.0
        shares = [(url, prompts[i::procs], 128, concurrency // procs + (i < concurrency % procs), start_at)
                  for i in range(procs)]
        return [r for share in pool.map(_stamped_client, shares) for r in share]


def run_variant(name: str, env_extra: Dict[str, str], args, out_dir: str) -> None:
    from benchmark.server_process import ServerProcess
    steps_path = os.path.join(out_dir, f"{name}.steps.jsonl")
    if os.path.exists(steps_path):
        os.remove(steps_path)
    env = {"CHECKPOINT_PATH": args.ckpt, "MAX_SEQ_LEN": str(product_path.MAX_SEQ_LEN), "MAX_NUM_SEQS": "256",
           "MAX_NUM_BATCHED_TOKENS": "8192", "USE_BLOCK_CACHE": "0", "CONCURRENCY_LIMIT": "512"}
    env.update(env_extra)
    server = ServerProcess(env, startup_timeout_s=600)
    try:
        warm = [product_path._text(p) for p in product_path._prompt_ids(args.concurrency, 128, 7)]
        run_clients(server.url, warm, args.concurrency, args.procs)  # warm-up round, not traced below
        time.sleep(0.5)
        warm_end = time.monotonic()
        prompts = [product_path._text(p) for p in
                   product_path._prompt_ids(args.concurrency * args.rounds, 128, 300 + args.concurrency)]
        clients = run_clients(server.url, prompts, args.concurrency, args.procs)
    finally:
        server.stop()
    with open(os.path.join(out_dir, f"{name}.clients.json"), "w") as f:
        json.dump({"env": env_extra, "after": warm_end, "requests": clients}, f)


# ---- the summary ----------------------------------------------------------------------------------

def _load(out_dir: str, name: str):
    with open(os.path.join(out_dir, f"{name}.clients.json")) as f:
        clients = json.load(f)
    steps = []
    path = os.path.join(out_dir, f"{name}.steps.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            steps = [json.loads(line) for line in f if line.strip()]
    return clients, [s for s in steps if s["start"] >= clients["after"]]


def _step_class(step: dict) -> str:
    if step["graph"]:
        return "graph decode"
    if step["prefill_tokens"] and step["decode_seqs"]:
        return "eager, prompts + decodes"
    if step["prefill_tokens"]:
        return "eager, prompts only"
    if step["decode_seqs"]:
        return "eager, decodes only"
    return step["kind"]


def summarize(out_dir: str, name: str) -> Dict[str, object]:
    clients, steps = _load(out_dir, name)
    requests = clients["requests"]
    begin, finish = min(r["sent"] for r in requests), max(r["end"] for r in requests)
    wall = finish - begin
    out: Dict[str, object] = {"variant": name, "env": clients["env"], "requests": len(requests),
                              "output_tok_s": sum(r["tokens"] for r in requests) / wall,
                              "ttft_median_ms": statistics.median((r["first"] - r["sent"]) * 1e3 for r in requests),
                              "tpot_median_ms": statistics.median((r["end"] - r["first"]) / max(r["tokens"] - 1, 1) * 1e3
                                                                  for r in requests)}
    steps = [s for s in steps if begin <= s["start"] <= finish]
    if not steps:
        return out
    classes: Dict[str, List[float]] = {}
    for step in steps:
        classes.setdefault(_step_class(step), []).append((step["end"] - step["start"]) * 1e3)
    busy = sum(sum(v) for v in classes.values())
    out["wall_ms"] = wall * 1e3
    out["core_idle_ms"] = wall * 1e3 - busy
    out["steps"] = {k: {"count": len(v), "total_ms": sum(v), "median_ms": statistics.median(v),
                        **_phases([s for s in steps if _step_class(s) == k])}
                    for k, v in sorted(classes.items())}
    out["prompt_tokens_per_eager_prefill_step"] = statistics.fmean(
        s["prefill_tokens"] for s in steps if s["prefill_tokens"]) if any(s["prefill_tokens"] for s in steps) else 0
    out["admission"] = _admission(requests, steps)
    return out


def _phases(steps: List[dict]) -> Dict[str, float]:
    """Medians of a class's split: start to plan made (intake, scheduling), plan to the runner's
    return (the host's launch work; a CUDA-graph step returns at once), runner to the end (the wait
    for the device, sampling's read-back, outputs)."""
    ran = [s for s in steps if s.get("executed")]
    if not ran:
        return {}
    return {"plan_median_ms": statistics.median((s["planned"] - s["start"]) * 1e3 for s in ran),
            "launch_median_ms": statistics.median((s["executed"] - s["planned"]) * 1e3 for s in ran),
            "after_median_ms": statistics.median((s["end"] - s["executed"]) * 1e3 for s in ran)}


def _admission(requests: List[dict], steps: List[dict]) -> Dict[str, float]:
    """Requests reach the core in the order the front end sends them; match the k-th send to the
    k-th request the core took in (the sends are sorted, the core's intake too), and the k-th
    first token to the k-th prompt completed."""
    intake = sorted(t for s in steps for t in [s["start"]] * s["added"])
    sends = sorted(r["sent"] for r in requests)
    firsts = sorted(r["first"] for r in requests)
    n = min(len(intake), len(sends))
    to_core = [(intake[i] - sends[i]) * 1e3 for i in range(n)]
    in_core = [(firsts[i] - intake[i]) * 1e3 for i in range(n)]
    return {"matched": n, "send_to_core_median_ms": statistics.median(to_core) if to_core else float("nan"),
            "core_to_first_text_median_ms": statistics.median(in_core) if in_core else float("nan"),
            "intakes_per_add_step": statistics.fmean(s["added"] for s in steps if s["added"]) if intake else 0}


def _parse_variant(text: str):
    name, _, assignments = text.partition("=")
    env = dict(item.split("=", 1) for item in assignments.split(",") if item)
    return name, env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="where the stamps, the step traces and summary.json go")
    parser.add_argument("--analyze", help="summarize the saved files of this directory and exit")
    parser.add_argument("--ckpt", default="/tmp/maga_llama3_8b_random")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--procs", type=int, default=4, help="client processes")
    parser.add_argument("--variant", action="append", default=[], help="NAME=ENV=VALUE,ENV=VALUE (repeatable)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out_dir = args.analyze or args.out
    variants = [_parse_variant(v) for v in args.variant] or [("default", {})]
    if not args.analyze:
        os.makedirs(out_dir, exist_ok=True)
        product_path.make_checkpoint(args.ckpt)  # written once
        with open(os.path.join(args.ckpt, "config.json")) as f:
            product_path._VOCAB[0] = json.load(f)["vocab_size"]
        for name, env in variants:
            env = dict(env, MAGA_STEP_TRACE=os.path.join(os.path.abspath(out_dir), f"{name}.steps.jsonl"))
            run_variant(name, env, args, out_dir)
    names = sorted(f[:-len(".clients.json")] for f in os.listdir(out_dir) if f.endswith(".clients.json"))
    report = [summarize(out_dir, name) for name in names]
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
