"""What every route shares: the async engine, the tokenizer, the concurrency slots, and helpers that
run a request to its end or merge several streams while watching for a client that went away."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import AsyncIterator, List, Optional, Sequence, Tuple

from fastapi import Request

from maga_transformer.config.server_config import ServerConfig
from maga_transformer.engine.output import RequestOutput
from maga_transformer.model_loader.fast_encode import FastEncoder, prefer_serial_tokenizers
from maga_transformer.server.async_engine import AsyncEngine


class Slots:
    """CONCURRENCY_LIMIT: a request beyond it is rejected at once, never queued.

    A request takes one slot per sequence it runs (each prompt of a batch, times n), so a batch of
    5,000 prompts cannot slip in as "one request" and hold the engine for minutes. Only the event
    loop's thread touches it, so a plain counter is enough."""

    def __init__(self, limit: int) -> None:
        self.limit, self.in_use = limit, 0

    @property
    def free(self) -> int:
        return self.limit - self.in_use

    def try_acquire(self, count: int = 1) -> bool:
        """All `count` slots or none: a batch is never admitted in part."""
        if count < 1:
            raise ValueError(f"count: must be >= 1, got {count}")
        if count > self.free:
            return False
        self.in_use += count
        return True

    def release(self, count: int = 1) -> None:
        """Give back what try_acquire(count) took."""
        if count < 1:
            raise ValueError(f"count: must be >= 1, got {count}")
        self.in_use -= count


@dataclass
class ServerContext:
    engine: AsyncEngine
    tokenizer: object
    slots: Slots
    config: ServerConfig
    max_seq_len: int

    def __post_init__(self) -> None:
        prefer_serial_tokenizers()  # requests are encoded one prompt at a time (model_loader/fast_encode.py)
        self._encode = FastEncoder(self.tokenizer)

    def encode(self, text: str, field: str) -> List[int]:
        ids = self._encode(text)
        if not ids:
            raise ValueError(f"{field}: encodes to no tokens")
        return ids

    def default_max_new_tokens(self, prompt_ids: List[int]) -> int:
        return max(1, self.max_seq_len - len(prompt_ids))


async def last_output(stream: AsyncIterator[RequestOutput], request: Request) -> Optional[RequestOutput]:
    """Run a request to the end, aborting it (through the stream's cleanup) if the client leaves."""
    async def consume() -> Optional[RequestOutput]:
        last = None
        async for last in stream:
            pass
        return last

    task = asyncio.ensure_future(consume())
    while not task.done():
        done, _ = await asyncio.wait({task}, timeout=0.1)
        if not done and await request.is_disconnected():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await stream.aclose()
            return None
    return task.result()


async def last_outputs(streams: Sequence[AsyncIterator[RequestOutput]],
                       request: Request) -> Optional[List[RequestOutput]]:
    """last_output of each stream, concurrently; None (every request aborted) if the client left."""
    outputs = await asyncio.gather(*[last_output(s, request) for s in streams])
    return None if any(o is None for o in outputs) else list(outputs)


async def merge_streams(streams: Sequence[AsyncIterator[RequestOutput]]) -> AsyncIterator[Tuple[int, RequestOutput]]:
    """Outputs of several requests as they come, tagged with the stream's index. Closing the merged
    stream (a client that left) cancels every pump, which aborts every request that is still live."""
    queue: "asyncio.Queue[Tuple[int, Optional[RequestOutput]]]" = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for output in stream:
                await queue.put((index, output))
        finally:
            queue.put_nowait((index, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, output = await queue.get()
            if output is None:
                remaining -= 1
            else:
                yield index, output
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in streams:
            await stream.aclose()
