"""The channel between the front end and the engine-core process: a Unix socket pair, framed by
multiprocessing's Connection (a length prefix per message), pickled at protocol 5.

Why this channel: it needs nothing outside the standard library (the GPU machine has no package
registry), pickling the step message's tuples of ints costs about what msgpack does, numpy arrays
go as one buffer copy, and one socket carries both directions with no broker. The benchmark
benchmark/ipc_bench.py measures a step message's round trip at realistic batch sizes.
"""
from __future__ import annotations

import pickle
import signal
import threading
from multiprocessing.connection import Connection
from typing import Any, List, Optional


class Channel:
    def __init__(self, fd: int) -> None:
        self.conn = Connection(fd)
        self._send_lock = threading.Lock()  # several front-end threads send (callers, the reader)

    def send(self, message: Any) -> None:
        data = pickle.dumps(message, protocol=5)
        with self._send_lock:
            self.conn.send_bytes(data)

    def recv(self) -> Any:
        return pickle.loads(self.conn.recv_bytes())

    def poll(self, timeout: Optional[float]) -> bool:
        return self.conn.poll(timeout)

    def recv_ready(self) -> List[Any]:
        """Every message already waiting, without blocking."""
        messages = []
        while self.conn.poll(0):
            messages.append(self.recv())
        return messages

    def close(self) -> None:
        self.conn.close()


def describe_exit(code: Optional[int]) -> str:
    """A process's exit status in words ("was killed by SIGKILL", "exited with code 3")."""
    if code is None:
        return "stopped answering"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"
