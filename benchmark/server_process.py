"""Start `python3 -m maga_transformer.start_server` as its own process (as users run it) for the
serving benchmark and the soak script, and read its /metrics and memory."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Dict, Optional

import httpx

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, env_extra: Optional[Dict[str, str]] = None, startup_timeout_s: float = 300) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_dir = tempfile.mkdtemp(prefix="maga_server_logs_")
        env = dict(os.environ)
        env.update({"START_PORT": str(self.port), "HOST": "127.0.0.1", "LOG_PATH": self.log_dir,
                    "PYTHONPATH": REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")})
        env.update(env_extra or {})
        self.proc = subprocess.Popen([sys.executable, "-m", "maga_transformer.start_server"], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + startup_timeout_s
        while not self._healthy():
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("server did not start in time")
            time.sleep(0.25)

    def startup_lines(self, limit: int = 40) -> list:
        """The server's own start-up log lines (device, dtype, KV tokens, process layout)."""
        try:
            with open(os.path.join(self.log_dir, "main.log")) as f:
                return [line.rstrip() for line in f][:limit]
        except OSError:
            return []

    def _healthy(self) -> bool:
        try:
            return httpx.get(self.url + "/health", timeout=2).text == "ok"
        except httpx.TransportError:
            return False

    def metrics(self) -> Dict[str, float]:
        values = {}
        for line in httpx.get(self.url + "/metrics", timeout=10).text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        return values

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()
