"""The channel between the front end and the engine-core process: a Unix socket pair, framed by
multiprocessing's Connection (a length prefix per message), pickled at protocol 5.

Why this channel: it needs nothing outside the standard library (the GPU machine has no package
registry), pickling the step message's tuples of ints costs about what msgpack does, numpy arrays
go as one buffer copy, and one socket carries both directions with no broker. The benchmark
benchmark/ipc_bench.py measures a step message's round trip at realistic batch sizes.
"""
from __future__ import annotations

import pickle
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
