"""A server-sent-events response with as little as possible between a token and the socket.

Starlette's StreamingResponse runs each stream in an anyio task group and its background task (the
concurrency slots' release) in a worker thread; at 64+ concurrent streams those hops are a large
share of the front end's CPU per token. EventStream is a plain ASGI response: the stream is
iterated on the request's own task, one small task waits for the client's disconnect and cancels
the stream when it comes (the stream's own cleanup then aborts the engine request), and `on_close`
runs on the event loop's thread when the response ends, however it ends.
"""
from __future__ import annotations

import asyncio
from typing import AsyncIterator, Callable, Optional

from starlette.responses import Response

_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no")]


class EventStream(Response):
    """A Response (FastAPI sends a route's Response as it is) that does its own sending."""

    media_type = "text/event-stream"

    def __init__(self, chunks: AsyncIterator[str], on_close: Optional[Callable[[], None]] = None) -> None:
        self.chunks = chunks
        self.on_close = on_close
        self.status_code = 200
        self.background = None  # FastAPI may attach the route's (empty) background tasks here
        self.raw_headers = list(_HEADERS)

    async def __call__(self, scope, receive, send) -> None:
        streaming = asyncio.current_task()
        disconnected = asyncio.Event()
        watcher = asyncio.ensure_future(_watch_disconnect(receive, streaming, disconnected))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk.encode(), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not disconnected.is_set():
                raise  # the server is cancelling us (shutdown): not ours to swallow
            if hasattr(streaming, "uncancel"):  # Python 3.11+: the task is not being cancelled any more
                streaming.uncancel()
        except OSError:  # the transport refused the write: the client is gone
            pass
        finally:
            watcher.cancel()
            await self.chunks.aclose()  # runs the stream's cleanup now: aborts what is still live
            if self.on_close is not None:
                self.on_close()
        if self.background is not None:
            await self.background()


async def _watch_disconnect(receive, streaming: "asyncio.Task", disconnected: asyncio.Event) -> None:
    """Waits for http.disconnect (the request body was read already) and cancels the stream."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            disconnected.set()
            streaming.cancel()
            return
