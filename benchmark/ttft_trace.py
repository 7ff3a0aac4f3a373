"""Where the time to first token goes, stage by stage, for one long prompt at a time, in one run:
the engine alone, the Pipeline and the server.

    python3 benchmark/ttft_trace.py [--ckpt DIR] [--prompt-len 1024] [--runs 8] [--phases engine,pipeline,server]
                                    [--in-process] [--out report.json]

- engine: the engine in this process, stepped on this thread (what product_path.py calls "the engine
  alone"): add_request with the prompt's ids, step until the token is out. The reference.
- pipeline: `Pipeline([text], max_new_tokens=1)` with the engine core in its own process; stamps
  when the call began, when its ids were sent to the core and when the first update came out.
- server: the real app under uvicorn (the core in its own process unless --in-process); a client
  process streams /v1/completions with max_tokens=1 over a raw keep-alive socket, one request after
  the other's [DONE] and a short pause (an isolated request, as the engine phase's are).

Every stamp is time.monotonic(), one clock for all processes of the host. The core writes its step
records (MAGA_STEP_TRACE, set here), and the prefill step of each request is matched to it: so the
report splits each path into front end before the core, the hop in, the core's own step (planning,
the model, the outputs), the hop back and the front end after it. The checkpoint is product_path.py's
(written if missing), or --ckpt for a smoke run on a small one.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import multiprocessing
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

logger = logging.getLogger("benchmark.ttft_trace")
CORE_STAGES = ["core_received", "core_step_start", "core_planned", "core_executed", "core_step_end"]
SERVER_STAGES = ["asgi_entry", "encoded", "submitted"] + CORE_STAGES + [
    "step_back", "step_handed_out", "routed", "first_chunk_sent", "client_first_text"]
PIPELINE_STAGES = ["encode_start", "encoded", "submitted"] + CORE_STAGES + ["step_back", "step_handed_out", "first_update"]
PAUSE_S = 0.05  # between requests: each one finds the server idle, as a lone user's would


class Stamps:
    """The stamps of the request now in flight (one at a time), the first of each stage kept."""

    def __init__(self) -> None:
        self.current: Dict[str, float] = {}
        self.done: List[Dict[str, float]] = []

    def begin(self, **stamps: float) -> None:
        self.current = dict(stamps)
        self.done.append(self.current)

    def mark(self, stage: str) -> None:
        self.current.setdefault(stage, time.monotonic())


def _wrap(owner, name: str, before=None, after=None) -> None:
    """Replace owner.name with a function that stamps around the original."""
    original = getattr(owner, name)

    def wrapped(*args, **kwargs):
        if before is not None:
            before()
        result = original(*args, **kwargs)
        if after is not None:
            after()
        return result
    setattr(owner, name, wrapped)


def _instrument_front_end(engine, stamps: Stamps) -> None:
    """Stamps in the front end common to the Pipeline and the server: ids sent, step output back."""
    _wrap(engine, "add_requests", after=lambda: stamps.mark("submitted"))
    on_core_output = engine.on_core_output

    def traced_on_core_output(step):
        if step.deltas:
            stamps.mark("step_back")
        outputs = on_core_output(step)
        if step.deltas:
            stamps.mark("step_handed_out")
        return outputs
    engine.on_core_output = traced_on_core_output


def _read_steps(path: str) -> List[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _attach_core_steps(rows: List[Dict[str, float]], steps: List[dict], prompt_len: int) -> None:
    """Each request's prefill step: the first step that ran >= prompt_len prompt tokens after it was sent."""
    prefills = [s for s in steps if s["prefill_tokens"] >= prompt_len]
    for row in rows:
        sent = row.get("submitted")
        step = next((s for s in prefills if sent is not None and s["end"] > sent), None)
        if step is not None:
            row.update(core_received=step.get("received") or step["start"], core_step_start=step["start"], core_planned=step["planned"],
                       core_executed=step["executed"], core_step_end=step["end"])


def _summary(rows: List[Dict[str, float]], origin: str, stages: List[str]) -> Dict[str, float]:
    """Median ms since `origin` of each stage that every row has."""
    out = {}
    for stage in stages:
        values = [(r[stage] - r[origin]) * 1e3 for r in rows if stage in r]
        if len(values) == len(rows) and values:
            out[stage] = round(statistics.median(values), 3)
    return out


# ---- the engine alone -----------------------------------------------------------------------------

def phase_engine(args, prompts: List[List[int]]) -> Dict[str, object]:
    """add_request + step() on this thread until the token is out; the same prompts as the others."""
    from maga_transformer.config import GenerateConfig
    model = _load(args, process=False)
    engine = model.engine
    config = GenerateConfig(max_new_tokens=1, top_k=1, ignore_eos=True)
    times = []
    for ids in prompts:
        _sync()
        start = time.monotonic()
        handle = engine.add_request(ids, config, stream=False)
        while engine.has_work():
            engine.step()
        times.append((time.monotonic() - start) * 1e3)
        assert handle.result().error is None
        time.sleep(PAUSE_S)
    model.stop()
    del model, engine
    _release()
    times = times[1:]  # the first warms up
    return {"runs": len(times), "ttft_median_ms": round(statistics.median(times), 3),
            "ttft_min_ms": round(min(times), 3)}


# ---- the Pipeline ---------------------------------------------------------------------------------

def phase_pipeline(model, texts: List[str], prompt_len: int, trace_path: str) -> Dict[str, object]:
    from maga_transformer.pipeline import Pipeline
    pipeline = Pipeline(model)
    stamps = Stamps()
    _instrument_front_end(model.engine, stamps)
    _wrap(pipeline, "encode", before=lambda: stamps.mark("encode_start"), after=lambda: stamps.mark("encoded"))
    start_line = len(_read_steps(trace_path))
    for text in texts:
        stamps.begin(call=time.monotonic())
        for _ in pipeline([text], max_new_tokens=1, top_k=1, ignore_eos=True):
            stamps.mark("first_update")
        time.sleep(PAUSE_S)
    rows = stamps.done[1:]
    _attach_core_steps(rows, _read_steps(trace_path)[start_line:], prompt_len)
    ttft = [(r["first_update"] - r["call"]) * 1e3 for r in rows]
    return {"runs": len(rows), "ttft_median_ms": round(statistics.median(ttft), 3),
            "ttft_min_ms": round(min(ttft), 3), "median_ms_since_call": _summary(rows, "call", PIPELINE_STAGES)}


# ---- the server -----------------------------------------------------------------------------------

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
        time.sleep(PAUSE_S)
    sock.close()
    return stamps


def _instrument_server(app, model, stamps: Stamps):
    """Wraps the app, the tokenizer call and the sink's routing with stamps; returns the traced app."""
    from maga_transformer.server.async_engine import _LoopSink
    from maga_transformer.server.context import ServerContext
    _instrument_front_end(model.engine, stamps)
    _wrap(ServerContext, "encode", after=lambda: stamps.mark("encoded"))
    route = _LoopSink._route

    def traced_route(self, outputs):
        if outputs:
            stamps.mark("routed")
        return route(self, outputs)
    _LoopSink._route = traced_route
    _LoopSink._mark_changed_untraced = _LoopSink._mark_changed

    def traced_mark_changed(self, request_ids):
        if request_ids:
            stamps.mark("routed")
        return self._mark_changed_untraced(request_ids)
    _LoopSink._mark_changed = traced_mark_changed

    async def traced_app(scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/v1/completions":
            return await app(scope, receive, send)
        stamps.begin(asgi_entry=time.monotonic())  # the client sends a request only after the last one's [DONE]

        async def traced_send(message):
            if message["type"] == "http.response.body" and b'"text": "w' in message.get("body", b""):
                stamps.mark("first_chunk_sent")
            await send(message)
        await app(scope, receive, traced_send)
    return traced_app


def phase_server(model, texts: List[str], prompt_len: int, trace_path: str) -> Dict[str, object]:
    import uvicorn

    from maga_transformer.config.server_config import ServerConfig
    from maga_transformer.server.app import create_app
    from maga_transformer.test.server.live_server import free_port
    port = free_port()
    stamps = Stamps()
    app = create_app(model, ServerConfig(host="127.0.0.1", port=port, concurrency_limit=512))
    traced = _instrument_server(app, model, stamps)
    server = uvicorn.Server(uvicorn.Config(traced, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    start_line = len(_read_steps(trace_path))
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        client = pool.map(_client, [(port, texts)])[0]
    server.should_exit = True
    rows = [dict(c, **s) for c, s in zip(client, stamps.done)][1:]  # the first one warms up
    _attach_core_steps(rows, _read_steps(trace_path)[start_line:], prompt_len)
    ttft = [(r["client_first_text"] - r["client_send"]) * 1e3 for r in rows]
    return {"runs": len(rows), "ttft_median_ms": round(statistics.median(ttft), 3),
            "ttft_min_ms": round(min(ttft), 3),
            "median_ms_since_client_send": _summary(rows, "client_send", SERVER_STAGES)}


# ---- the run --------------------------------------------------------------------------------------

def _sync() -> None:
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _release() -> None:
    import torch
    gc.unfreeze()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _load(args, process: bool):
    from benchmark import product_path
    from maga_transformer.config import EngineConfig, ModelConfig
    from maga_transformer.model_factory import ModelFactory
    return ModelFactory.from_huggingface(args.ckpt, ModelConfig(max_seq_len=product_path.MAX_SEQ_LEN),
                                         engine_config=EngineConfig(engine_process=process,
                                                                    **product_path.ENGINE_SIZE))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default="/tmp/maga_llama3_8b_random")
    parser.add_argument("--prompt-len", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--phases", default="engine,pipeline,server")
    parser.add_argument("--in-process", action="store_true", help="the server's engine core on a thread of the server")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from benchmark import product_path
    product_path.make_checkpoint(args.ckpt)
    with open(os.path.join(args.ckpt, "config.json")) as f:
        product_path._VOCAB[0] = json.load(f)["vocab_size"]
    prompts = product_path._prompt_ids(args.runs + 1, args.prompt_len, 9)
    texts = [product_path._text(p) for p in prompts]
    trace_path = os.path.join(tempfile.mkdtemp(prefix="maga_ttft_"), "steps.jsonl")
    os.environ["MAGA_STEP_TRACE"] = trace_path  # the core process inherits it
    open(trace_path, "w").close()
    phases = args.phases.split(",")
    report: Dict[str, object] = {"prompt_len": args.prompt_len, "runs": args.runs}
    if "pipeline" in phases or "server" in phases:
        model = _load(args, process=not args.in_process)
        gc.freeze()  # as start_server does
        if "pipeline" in phases:
            report["pipeline"] = phase_pipeline(model, texts, args.prompt_len, trace_path)
        if "server" in phases:
            report["server"] = phase_server(model, texts, args.prompt_len, trace_path)
        model.stop()  # the core's process ends: its GPU memory is free for the engine phase's
        del model
        _release()
    if "engine" in phases:
        report["engine"] = phase_engine(args, prompts)
    if "engine" in report:
        for phase in ("pipeline", "server"):
            if phase in report:
                report[f"{phase}_minus_engine_ms"] = round(
                    report[phase]["ttft_median_ms"] - report["engine"]["ttft_median_ms"], 3)
    print(json.dumps(report, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
