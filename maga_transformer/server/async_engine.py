"""The server's view of the engine: async iteration over a request's outputs, abort on cancel.

Outputs are produced on the engine's output thread (the reader of the engine-core process, or the
in-process engine's loop). One sink serves every request of the server: it receives all of a
step's outputs at once, and the step's "changed" notices for the streams, and crosses into the
event loop with one call_soon_threadsafe for each (not one per request), which then routes them to
the requests' mailboxes. A stream's output is built when its task reads it (FrontEnd.latest).
"""
from __future__ import annotations

import asyncio
import itertools
from typing import AsyncIterator, Dict, List, Optional

from maga_transformer.config.generate_config import GenerateConfig
from maga_transformer.engine.output import AuxInfo, RequestOutput, SequenceOutput
from maga_transformer.engine.request import FinishReason
from maga_transformer.lora.messages import LoraUpdateResult
from maga_transformer.server.metrics import RequestTimer

_ids = itertools.count()


class EngineUnavailableError(RuntimeError):
    """The engine core is not running; the server answers 503 until it is restarted."""


class _Mailbox:
    """One request's deliveries, read by its task: built outputs (finals, stop-string requests) and
    "changed" notices (the output is then pulled from the front end, built once however many steps
    it covers). Lighter than an asyncio.Queue: one waiter, no size limit."""
    __slots__ = ("outputs", "changed", "waiter")

    def __init__(self) -> None:
        self.outputs: List[RequestOutput] = []
        self.changed = False
        self.waiter: Optional[asyncio.Future] = None

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, loop: asyncio.AbstractEventLoop) -> None:
        while not (self.outputs or self.changed):
            self.waiter = loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None


class _LoopSink:
    """Looks like a sink to the engine; delivers a step's outputs and notices into the loop in one hop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.boxes: Dict[str, _Mailbox] = {}

    def put_batch(self, outputs: List[RequestOutput]) -> None:
        self._call(self._route, outputs)

    def put(self, output: RequestOutput) -> None:
        self.put_batch([output])

    def notify_changed(self, request_ids: List[str]) -> None:
        self._call(self._mark_changed, request_ids)

    def _call(self, fn, arg) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, arg)
        except RuntimeError:  # the loop closed (its server stopped): nobody is left to read these
            pass

    def _route(self, outputs: List[RequestOutput]) -> None:
        for output in outputs:
            box = self.boxes.get(output.request_id)
            if box is not None:
                box.outputs.append(output)
                box.wake()

    def _mark_changed(self, request_ids: List[str]) -> None:
        boxes = self.boxes
        for request_id in request_ids:
            box = boxes.get(request_id)
            if box is not None:
                box.changed = True
                box.wake()


class AsyncEngine:
    def __init__(self, engine, metrics=None) -> None:
        self.engine = engine  # engine.frontend.FrontEnd: the process client, or the in-process Engine
        self.metrics = metrics  # ServerMetrics, or None
        self._sink = None
        engine.start()

    @property
    def healthy(self) -> bool:
        return self.engine.healthy

    @property
    def failure(self) -> str:
        return self.engine.failure or "the engine was stopped"

    def validate(self, prompt_ids: List[int], config: GenerateConfig) -> None:
        if not self.healthy:
            raise EngineUnavailableError(f"engine core is not running: {self.failure}")
        self.engine.validate(prompt_ids, config)

    @property
    def adapters(self) -> Dict[str, str]:
        """The LoRA adapters served (name -> path), as of the core's last answer."""
        return dict(self.engine.adapters)

    async def update_lora(self, kind: str, adapters: Dict[str, str]):
        """FrontEnd.update_lora off the event loop: the core loads while requests keep streaming."""
        if not self.healthy:
            raise EngineUnavailableError(f"engine core is not running: {self.failure}")
        try:
            return await asyncio.to_thread(self.engine.update_lora, kind, adapters)
        except TimeoutError as err:
            return LoraUpdateResult(0, self.adapters, error=str(err), status=504)
        except RuntimeError as err:  # the core went away meanwhile
            raise EngineUnavailableError(str(err)) from None

    def _loop_sink(self) -> _LoopSink:
        if self._sink is None:
            self._sink = _LoopSink(asyncio.get_running_loop())
        return self._sink

    def submit(self, prompt_ids: List[int], config: GenerateConfig) -> "RequestStream":
        """Send the request to the engine now; iterate the result for its outputs. A streaming route
        submits before it starts its response, so the core starts the prefill while the response's
        headers go out. Whoever submits must close the stream (RequestStream.close): that aborts
        the request if it has not finished."""
        sink = self._loop_sink()
        request_id = f"http-{next(_ids)}"
        box = sink.boxes[request_id] = _Mailbox()
        failed = None
        try:
            self.engine.add_request(prompt_ids, config, request_id=request_id, sink=sink)
        except RuntimeError as err:  # the core went away between validate and now
            failed = _failed(request_id, prompt_ids, str(err))
        except BaseException:  # refused (a ValueError naming the field): nothing was sent
            sink.boxes.pop(request_id, None)
            raise
        return RequestStream(self, sink, request_id, box, failed)

    async def generate(self, prompt_ids: List[int], config: GenerateConfig) -> AsyncIterator[RequestOutput]:
        """Streams outputs until the request finishes; if the consumer goes away, aborts it."""
        stream = self.submit(prompt_ids, config)
        try:
            async for output in stream:
                yield output
        finally:
            stream.close()

    def _newest(self, request_id: str, box: _Mailbox) -> Optional[RequestOutput]:
        """Outputs are cumulative: a consumer that fell behind takes the newest and sends the new
        text as one chunk, instead of one chunk per step it missed."""
        outputs, box.outputs = box.outputs, []
        box.changed = False
        for output in outputs:
            if output.finished:
                return output
        latest = self.engine.latest(request_id)
        return latest if latest is not None else (outputs[-1] if outputs else None)


class RequestStream:
    """One submitted request's outputs, newest first taken (AsyncEngine._newest), until it finishes.
    close() (or aclose()) aborts it in the engine if it has not finished; it is idempotent."""

    def __init__(self, owner: AsyncEngine, sink: _LoopSink, request_id: str, box: _Mailbox,
                 failed: Optional[RequestOutput]) -> None:
        self.owner, self.sink, self.request_id, self.box = owner, sink, request_id, box
        self._failed = failed
        self._finished = failed is not None  # a request that never reached the engine has nothing to abort
        self._closed = False
        self._timer = RequestTimer(owner.metrics) if owner.metrics is not None and failed is None else None

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self._failed is not None:
            output, self._failed = self._failed, None
            self.close()
            return output
        if self._closed:
            raise StopAsyncIteration
        while True:
            await self.box.wait(self.sink.loop)
            output = self.owner._newest(self.request_id, self.box)
            if output is not None:
                break
        if self._timer is not None:
            self._timer.observe(output)
        if output.finished:
            self._finished = True
            self.close()
        return output

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.sink.boxes.pop(self.request_id, None)
        if not self._finished:
            self.owner.engine.abort(self.request_id)

    async def aclose(self) -> None:
        self.close()


def _failed(request_id: str, prompt_ids: List[int], message: str) -> RequestOutput:
    aux = AuxInfo(cost_time=0.0, iter_count=0, input_len=len(prompt_ids), prefix_len=0, reuse_len=0,
                  output_len=0, cum_log_probs=[])
    empty = SequenceOutput(text="", token_ids=[], finish_reason=FinishReason.ERROR, cum_logprob=0.0)
    return RequestOutput(request_id=request_id, outputs=[empty], finished=True, aux_info=aux, error=message)
