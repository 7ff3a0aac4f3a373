"""The server's view of the engine: async iteration over a request's outputs, abort on cancel.

The engine runs in its own thread; outputs cross into the event loop through
call_soon_threadsafe, so no coroutine ever blocks on the engine.
"""
from __future__ import annotations

import asyncio
import itertools
from typing import AsyncIterator, List

from maga_transformer.config.generate_config import GenerateConfig
from maga_transformer.engine.engine import Engine
from maga_transformer.engine.output import RequestOutput
from maga_transformer.server.metrics import RequestTimer

_ids = itertools.count()


class _LoopSink:
    """Looks like queue.Queue to the engine; delivers into an asyncio.Queue on the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: "asyncio.Queue[RequestOutput]" = asyncio.Queue()

    def put(self, item: RequestOutput) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class AsyncEngine:
    def __init__(self, engine: Engine, metrics=None) -> None:
        self.engine = engine
        self.metrics = metrics  # ServerMetrics, or None
        engine.start()

    def validate(self, prompt_ids: List[int], config: GenerateConfig) -> None:
        self.engine.validate(prompt_ids, config)

    async def generate(self, prompt_ids: List[int], config: GenerateConfig) -> AsyncIterator[RequestOutput]:
        """Streams outputs until the request finishes; if the consumer goes away, aborts it."""
        sink = _LoopSink(asyncio.get_running_loop())
        handle = self.engine.add_request(prompt_ids, config, request_id=f"http-{next(_ids)}", sink=sink)
        timer = RequestTimer(self.metrics) if self.metrics is not None else None
        finished = False
        try:
            while not finished:
                output = await sink.queue.get()
                finished = output.finished
                if timer is not None:
                    timer.observe(output)
                yield output
        finally:
            if not finished:
                handle.abort()
