"""Soak test of the HTTP server (outside CI): many mixed requests, a share of clients that leave
early, then checks that nothing leaked.

    python3 benchmark/soak.py [--requests 1000] [--concurrency 16] [--disconnect 0.2] [--out soak.json]

Starts `python3 -m maga_transformer.start_server` on the embedded model (its own process, loopback
only) and sends a seeded mix of native (plain, batch, streaming), OpenAI chat (plain, streaming)
and completions requests, plus a few malformed ones that must get a 4xx. A `--disconnect` share of
clients drop their connection after the first streamed event or after a short timeout. Reports the
status codes, unexpected errors, server memory over time, and /metrics at the end: no running or
waiting request and zero KV-cache usage are required (exit code 1 otherwise).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import sys
import time
from collections import Counter
from typing import Dict, List, Tuple

import httpx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmark.server_process import ServerProcess  # noqa: E402

logger = logging.getLogger("benchmark.soak")
WORDS = "the a river mountain city light music quiet story ocean machine garden winter code".split()


def _text(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40)))


def make_request(rng: random.Random) -> Tuple[str, str, dict, bool]:
    """(kind, path, body, streamed)"""
    tokens = rng.randint(1, 24)
    kind = rng.choice(["native", "native_batch", "native_stream", "chat", "chat_stream", "completion",
                       "completion_stream", "bad"])
    if kind == "native":
        return kind, "/", {"prompt": _text(rng), "generate_config": {"max_new_tokens": tokens}}, False
    if kind == "native_batch":
        return kind, "/", {"prompt_batch": [_text(rng), _text(rng)],
                           "generate_config": {"max_new_tokens": tokens, "top_k": 1}}, False
    if kind == "native_stream":
        return kind, "/", {"prompt": _text(rng), "yield_generator": True,
                           "generate_config": {"max_new_tokens": tokens, "num_return_sequences": 2}}, True
    messages = [{"role": "user", "content": _text(rng)}]
    if kind in ("chat", "chat_stream"):
        return kind, "/v1/chat/completions", {"messages": messages, "max_tokens": tokens, "n": rng.randint(1, 2),
                                              "stream": kind == "chat_stream", "logprobs": True}, kind == "chat_stream"
    if kind in ("completion", "completion_stream"):
        return kind, "/v1/completions", {"prompt": [_text(rng)], "max_tokens": tokens,
                                         "stream": kind == "completion_stream"}, kind == "completion_stream"
    bad = rng.choice([{"prompt": ""}, {"prompt": "x", "generate_config": {"top_p": 7}}, {"prompt": 5},
                      {"prompt": "x", "generate_config": {"max_new_tokens": -3}}])
    return kind, "/", bad, False


async def send(client: httpx.AsyncClient, url: str, item: Tuple[str, str, dict, bool],
               leave_early: bool) -> str:
    kind, path, body, streamed = item
    try:
        if streamed:
            async with client.stream("POST", url + path, json=body) as resp:
                async for _ in resp.aiter_lines():
                    if leave_early:
                        return "left"
                return str(resp.status_code)
        timeout = 0.05 if leave_early else 600
        resp = await client.post(url + path, json=body, timeout=timeout)
        return str(resp.status_code)
    except httpx.TimeoutException:
        return "left" if leave_early else "timeout"
    except httpx.TransportError as err:
        return f"transport:{type(err).__name__}"


async def soak(url: str, server: ServerProcess, requests: int, concurrency: int, disconnect: float,
               seed: int) -> Dict:
    rng = random.Random(seed)
    work = [(make_request(rng), rng.random() < disconnect) for _ in range(requests)]
    outcomes: Dict[str, Counter] = {}
    memory: List[Tuple[float, float]] = []
    start = time.monotonic()

    async def worker(client: httpx.AsyncClient) -> None:
        while work:
            item, leave = work.pop()
            result = await send(client, url, item, leave)
            outcomes.setdefault(item[0], Counter())[result] += 1

    async def sample_memory() -> None:
        while work:
            memory.append((round(time.monotonic() - start, 1), round(server.rss_mb(), 1)))
            await asyncio.sleep(2)

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        sampler = asyncio.ensure_future(sample_memory())
        await asyncio.gather(*[worker(client) for _ in range(concurrency)])
        sampler.cancel()
    return {"duration_s": time.monotonic() - start, "outcomes": {k: dict(v) for k, v in outcomes.items()},
            "rss_mb": memory}


def unexpected(outcomes: Dict[str, Dict[str, int]]) -> Dict[str, Dict[str, int]]:
    """Anything but 200 / left / a concurrency rejection (409 native, 429 OpenAI) for good requests, and
    anything but 400 / left for bad ones. Rejections are expected: a client that leaves keeps its slot
    until the server has aborted its request (within an engine step), and its worker sends the next
    request at once."""
    allowed = {kind: ({"400", "left"} if kind == "bad" else {"200", "left", "409", "429"}) for kind in outcomes}
    return {kind: {k: v for k, v in counts.items() if k not in allowed[kind]}
            for kind, counts in outcomes.items() if set(counts) - allowed[kind]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--disconnect", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    server = ServerProcess({"CONCURRENCY_LIMIT": str(args.concurrency + 8), "KV_CACHE_MEM_MB": "512"})
    try:
        rss_start = server.rss_mb()
        report = asyncio.run(soak(server.url, server, args.requests, args.concurrency, args.disconnect, args.seed))
        time.sleep(1.0)  # aborts of the last dropped clients land within a step or two
        final = server.metrics()
        slots = httpx.get(server.url + "/worker_status", timeout=5).json()["concurrency"]["in_use"]
        report.update(rss_start_mb=rss_start, rss_end_mb=server.rss_mb(),
                      running=final["vllm:num_requests_running"], waiting=final["vllm:num_requests_waiting"],
                      kv_cache_usage=final["vllm:kv_cache_usage_perc"], slots_in_use=slots, unexpected=unexpected(report["outcomes"]),
                      healthy=httpx.get(server.url + "/health", timeout=5).text == "ok")
    finally:
        report["exit_code"] = server.stop()
    print(json.dumps(report, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    clean = (not report["unexpected"] and report["running"] == 0 and report["waiting"] == 0
             and report["kv_cache_usage"] == 0 and report["slots_in_use"] == 0 and report["healthy"])
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
