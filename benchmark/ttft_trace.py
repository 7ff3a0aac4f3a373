"""Where the server's time to first token goes, stage by stage, for one long prompt at a time.

    python3 benchmark/ttft_trace.py [--ckpt DIR] [--prompt-len 1024] [--runs 6] [--in-process]

The server runs here (the real app under uvicorn, the engine core in its own process unless
--in-process); a client process streams /v1/completions with max_tokens=1 over a raw socket and
stamps when it sent the request and when the first text arrived. Every stamp is time.monotonic(),
one clock for all processes of the host, so the stages line up:

    client send -> ASGI entry -> add_request (tokenized, validated) -> step output back from the core
    -> event loop routes it -> first text chunk sent -> client reads it

The core's own share (arrival in the core to the token, from the request's aux info) is inside the
add_request -> step output gap; what is left of that gap is the two socket hops. The same engine
stepped on this thread (product_path.py's engine phase) is the reference a user compares against.
The checkpoint is product_path.py's (written if missing), or --ckpt for a smoke run on a small one.
"""
from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import socket
import statistics
import sys
import threading
import time
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

logger = logging.getLogger("benchmark.ttft_trace")
STAGES = ["asgi_entry", "submitted", "core_step_back", "routed", "first_chunk_sent", "client_first_text"]


def _client(args) -> List[Dict[str, float]]:
    """Sends each prompt in turn on one keep-alive connection; stamps send and first text."""
    port, prompts = args
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    stamps = []
    for prompt in prompts:
        body = json.dumps({"model": "m", "prompt": prompt, "max_tokens": 1, "temperature": 0, "ignore_eos": True,
                           "stream": True}).encode()
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        sent = time.monotonic()
        sock.sendall(head + body)
        first, seen = None, b""
        while b"data: [DONE]" not in seen:
            data = sock.recv(65536)
            if not data:
                raise RuntimeError("the server closed the connection")
            seen += data
            if first is None and b'"text": "w' in seen:
                first = time.monotonic()
        stamps.append({"client_send": sent, "client_first_text": first})
    sock.close()
    return stamps


class _Stamps:
    """The server-side stamps of the request now in flight (one at a time)."""

    def __init__(self) -> None:
        self.current: Dict[str, float] = {}
        self.done: List[Dict[str, float]] = []

    def mark(self, stage: str) -> None:
        self.current.setdefault(stage, time.monotonic())


def _instrument(app, engine, sink_class, stamps: _Stamps):
    """Wraps the app, add_request, the step hand-off and the sink's routing with stamps."""
    add_request, on_core_output, route = engine.add_request, engine.on_core_output, sink_class._route

    async def traced_app(scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/v1/completions":
            return await app(scope, receive, send)
        stamps.current = {}  # a new request: the client sends it only after the last one's [DONE]
        stamps.done.append(stamps.current)
        stamps.mark("asgi_entry")

        async def traced_send(message):
            if message["type"] == "http.response.body" and b'"text": "w' in message.get("body", b""):
                stamps.mark("first_chunk_sent")
            await send(message)
        await app(scope, receive, traced_send)

    def traced_add_request(*args, **kwargs):
        handle = add_request(*args, **kwargs)
        stamps.mark("submitted")
        return handle

    def traced_on_core_output(step):
        if step.deltas:
            stamps.mark("core_step_back")
        return on_core_output(step)

    def traced_route(self, outputs):
        if outputs:
            stamps.mark("routed")
            for output in outputs:
                if output.aux_info.first_token_time is not None:
                    stamps.current["core_ttft_ms"] = output.aux_info.first_token_time
        return route(self, outputs)

    engine.add_request, engine.on_core_output, sink_class._route = \
        traced_add_request, traced_on_core_output, traced_route
    return traced_app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default="/tmp/maga_llama3_8b_random")
    parser.add_argument("--prompt-len", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--in-process", action="store_true", help="the engine core on a thread of the server")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import gc

    import uvicorn

    from benchmark import product_path
    from maga_transformer.config import EngineConfig, ModelConfig
    from maga_transformer.config.server_config import ServerConfig
    from maga_transformer.model_factory import ModelFactory
    from maga_transformer.server.app import create_app
    from maga_transformer.server.async_engine import _LoopSink
    from maga_transformer.test.server.live_server import free_port
    product_path.make_checkpoint(args.ckpt)
    with open(os.path.join(args.ckpt, "config.json")) as f:
        product_path._VOCAB[0] = json.load(f)["vocab_size"]
    model = ModelFactory.from_huggingface(args.ckpt, ModelConfig(max_seq_len=product_path.MAX_SEQ_LEN),
                                          engine_config=EngineConfig(engine_process=not args.in_process,
                                                                     **product_path.ENGINE_SIZE))
    gc.freeze()  # as start_server does
    port = free_port()
    stamps = _Stamps()
    app = create_app(model, ServerConfig(host="127.0.0.1", port=port, concurrency_limit=512))
    traced = _instrument(app, model.engine, _LoopSink, stamps)
    server = uvicorn.Server(uvicorn.Config(traced, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    prompts = [product_path._text(p) for p in product_path._prompt_ids(args.runs + 1, args.prompt_len, 9)]
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        client = pool.map(_client, [(port, prompts)])[0]
    server.should_exit = True
    rows = [dict(c, **s) for c, s in zip(client, stamps.done)][1:]  # the first one warms up
    report = {"prompt_len": args.prompt_len, "engine_process": not args.in_process, "runs": len(rows),
              "median_ms_since_client_send": {}}
    for stage in STAGES:
        report["median_ms_since_client_send"][stage] = statistics.median(
            (r[stage] - r["client_send"]) * 1e3 for r in rows)
    report["core_ttft_ms_median"] = statistics.median(r.get("core_ttft_ms", float("nan")) for r in rows)
    print(json.dumps(report, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    model.stop()


if __name__ == "__main__":
    main()
