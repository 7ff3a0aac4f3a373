"""The server's front end alone: how many streamed tokens per second it can hand out when the engine
costs nothing. A stand-in core (no model) answers every request with one token per step at a fixed
step time, through the real front end (output processor, detokenizer, sinks) and the real FastAPI
app under uvicorn; client processes stream /v1/completions as benchmark/serving.py does.

    python3 benchmark/frontend_bench.py [--streams 64 256] [--step-ms 5] [--tokens 128] [--client-procs 4]

`frontend_cpu_us_per_token` (this process's CPU time over the tokens streamed) is the cost to cut;
it holds on a small machine too, where the clients share the cores. If the output rate stays at
streams x 1000 / step-ms, the front end keeps up with an engine of that
step time; where it falls short, the front end is the bottleneck (run py-spy on this process to see
where its time goes). The stand-in's tokens are drawn from a word-level vocabulary, so every token is
one word of text.
"""
from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import random
import re
import sys
import threading
import time
from types import SimpleNamespace
from typing import Dict, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from maga_transformer.engine.frontend import FrontEnd  # noqa: E402
from maga_transformer.engine.limits import RequestLimits  # noqa: E402
from maga_transformer.engine.messages import (CoreStepOutput, EngineInfo, EngineRequest, EngineStats,  # noqa: E402
                                              RequestFinal)

logger = logging.getLogger("benchmark.frontend")
VOCAB = 512


class StandInCore(FrontEnd):
    """A front end whose core is a thread emitting one token per live request every step."""

    def __init__(self, tokenizer, step_ms: float) -> None:
        info = EngineInfo(vocab_size=VOCAB, max_seq_len=4096, block_size=16, num_blocks=1 << 20,
                          max_num_batched_tokens=8192, enable_chunked_prefill=True, eos_token_ids=[2])
        super().__init__(tokenizer, info, RequestLimits(info, lambda ids: None))
        self.step_s = step_ms / 1000
        self._live: Dict[str, Tuple[EngineRequest, int]] = {}
        self._inbox: List[EngineRequest] = []
        self._aborts: List[str] = []
        self._inbox_lock = threading.Lock()
        self._rng = random.Random(0)
        self.steps = 0
        threading.Thread(target=self._loop, daemon=True).start()

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def _submit(self, requests: List[EngineRequest]) -> None:
        with self._inbox_lock:
            self._inbox.extend(requests)

    def _send_aborts(self, request_ids: List[str]) -> None:
        with self._inbox_lock:
            self._aborts.extend(request_ids)

    def _send_stops(self, stops) -> None:
        self._send_aborts([rid for rid, _ in stops])

    def _loop(self) -> None:
        deadline = time.perf_counter()
        while True:
            deadline += self.step_s
            time.sleep(max(0.0, deadline - time.perf_counter()))
            self.on_core_output(self._step())

    def _step(self) -> CoreStepOutput:
        with self._inbox_lock:
            inbox, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, []
        for request in inbox:
            self._live[request.request_id] = (request, 0)
        out = CoreStepOutput()
        for request_id in aborts:
            if self._live.pop(request_id, None) is not None:
                out.deltas.append((request_id, 0, [], [], None, "abort", None))
                out.finals.append(RequestFinal(request_id, 0.0, 0, 0, 0, None))
        for request_id, (request, made) in list(self._live.items()):
            made += 1
            done = made >= request.config.max_new_tokens
            out.deltas.append((request_id, 0, [self._rng.randrange(3, VOCAB)], [-1.0], None,
                               "length" if done else None, None))
            if done:
                del self._live[request_id]
                out.finals.append(RequestFinal(request_id, 0.0, made, 0, 0, None))
            else:
                self._live[request_id] = (request, made)
        self.steps += 1
        out.stats = EngineStats(num_running=len(self._live))
        return out


async def _lean_stream(port: int, prompt: str, tokens: int) -> int:
    """One streamed /v1/completions over a raw socket; returns the tokens its usage chunk counts."""
    import asyncio
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = json.dumps({"model": "m", "prompt": prompt, "max_tokens": tokens, "ignore_eos": True,
                       "stream": True, "stream_options": {"include_usage": True}}).encode()
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
    seen = b""
    while True:
        data = await reader.read(1 << 16)
        if not data:
            break
        seen += data
    writer.close()
    usage = re.search(rb'"completion_tokens": (\d+)', seen)
    return int(usage.group(1)) if usage else 0


def lean_level(port: int, prompts: List[str], tokens: int, streams: int) -> Dict[str, float]:
    """`streams` closed-loop clients in this process's own event loop thread, parsing nothing: on a
    small machine an httpx client process costs more CPU than the server it measures."""
    import asyncio
    streamed = [0]

    async def worker(mine: List[str]) -> None:
        for prompt in mine:
            got = await _lean_stream(port, prompt, tokens)
            streamed[0] += got

    async def run() -> float:
        start = time.perf_counter()
        await asyncio.gather(*(worker(prompts[i::streams]) for i in range(streams)))
        return time.perf_counter() - start
    duration = asyncio.run(run())
    return {"concurrency": streams, "duration_s": duration, "output_tok_s": streamed[0] / duration}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--step-ms", type=float, default=5.0)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--client-procs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--lean-client", action="store_true",
                        help="raw-socket clients on a thread of their own (for a 2-core machine)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    import uvicorn

    from benchmark.product_path import server_level
    from maga_transformer.config.server_config import ServerConfig
    from maga_transformer.server.app import create_app
    from maga_transformer.test.fixtures import _tiny_tokenizer_dir
    from maga_transformer.test.server.live_server import free_port
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(_tiny_tokenizer_dir(VOCAB))
    engine = StandInCore(tokenizer, args.step_ms)
    model = SimpleNamespace(engine=engine, tokenizer=tokenizer, max_seq_len=4096, stop=lambda: None)
    import gc
    gc.freeze()  # as start_server does: the imports' objects stay out of the collector's full walks
    port = free_port()
    app = create_app(model, ServerConfig(host="127.0.0.1", port=port, concurrency_limit=4096))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    serving = threading.Thread(target=server.run, daemon=True)
    serving.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    rng = random.Random(1)
    report = {"step_ms": args.step_ms, "tokens": args.tokens}
    for streams in args.streams:
        prompts = [" ".join(f"w{rng.randrange(3, VOCAB)}" for _ in range(64)) for _ in range(streams * args.rounds)]
        if args.lean_client:  # its own process, so the CPU time below stays the server's
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                pool.apply(time.sleep, (0,))
                cpu_before, sys_before = time.process_time(), os.times().system
                result = pool.apply(lean_level, (port, prompts, args.tokens, streams))
        else:
            # this process: the front end, uvicorn and the stand-in (clients are apart)
            cpu_before, sys_before = time.process_time(), os.times().system
            result = server_level(url, prompts, args.tokens, streams, args.client_procs)
        tokens = result["output_tok_s"] * result["duration_s"]
        result["frontend_cpu_us_per_token"] = (time.process_time() - cpu_before) / max(tokens, 1) * 1e6
        result["of_which_kernel_us_per_token"] = (os.times().system - sys_before) / max(tokens, 1) * 1e6
        result["engine_rate_tok_s"] = streams * 1000 / args.step_ms
        result["share_of_engine_rate"] = result["output_tok_s"] / result["engine_rate_tok_s"]
        report[f"streams_{streams}"] = result
        logger.info(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}))
    server.should_exit = True
    serving.join(timeout=10)  # uvloop torn down under a live daemon thread at exit can crash the interpreter
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
