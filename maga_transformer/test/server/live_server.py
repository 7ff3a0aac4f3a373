"""A real uvicorn server on a free loopback port, in a background thread, for the server tests."""
from __future__ import annotations

import socket
import threading
import time
from typing import Optional

import httpx
import uvicorn

from maga_transformer.config.server_config import ServerConfig
from maga_transformer.server.app import create_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, model, concurrency_limit: int, api_key: Optional[str] = None) -> None:
        port = free_port()
        app = create_app(model, ServerConfig(host="127.0.0.1", port=port, concurrency_limit=concurrency_limit,
                                             model_name="smollm2", api_key=api_key))
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def metrics(server: LiveServer) -> dict:
    """/metrics as an operator reads it: {sample name: value} (labelled samples keep their labels)."""
    text = httpx.get(server.url + "/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def wait_running(server: LiveServer, count: int, within_s: float = 20.0) -> None:
    """Until `count` requests run in the engine together (from /metrics), else fail the test."""
    deadline = time.monotonic() + within_s
    while metrics(server)["vllm:num_requests_running"] < count:
        assert time.monotonic() < deadline, f"{count} requests never ran together"
        time.sleep(0.02)


def wait_idle(server: LiveServer, within_s: float = 1.0) -> dict:
    """/metrics once nothing runs and no KV block is held, or after `within_s`, whichever comes first."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        state = metrics(server)
        if state["vllm:num_requests_running"] == 0 and state["vllm:kv_cache_usage_perc"] == 0:
            break
        time.sleep(0.05)
    return metrics(server)
