"""What the server and the Pipeline talk to: requests in, RequestOutputs out, whichever way the
engine core runs (its own process: engine/core_client.py; a thread here: engine/engine.py).

The front end validates a request against the core's limits before anything is sent, keeps the
caller's handle, and turns each CoreStepOutput into outputs (engine/output_processor.py). Outputs
of one step are handed to each sink at once: a sink with `put_batch` gets one call per step for all
its requests (the Pipeline's batch, the server's event loop), which keeps hand-offs per step, not
per token x request. A sink with `notify_changed` pulls instead: each step it hears which of its
requests have new tokens and asks `latest(request_id)` when its consumer is ready (finals still
come through put_batch), so outputs are built as often as they are read.
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections import defaultdict
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from maga_transformer.config.generate_config import GenerateConfig
from maga_transformer.engine.limits import RequestLimits
from maga_transformer.engine.messages import CoreStepOutput, EngineInfo, EngineRequest, EngineStats
from maga_transformer.engine.output import RequestOutput
from maga_transformer.engine.output_processor import OutputProcessor
from maga_transformer.lora.messages import LoraCommand, LoraUpdateResult

logger = logging.getLogger(__name__)
_request_ids = itertools.count()
_lora_command_ids = itertools.count(1)
LORA_UPDATE_TIMEOUT_S = 600.0


class RequestHandle:
    """The caller's end of a request: iterate for streamed outputs, or wait for the final one."""

    def __init__(self, engine: "FrontEnd", request_id: str, sink=None) -> None:
        self.engine = engine
        self.request_id = request_id
        # a caller following many requests can pass one shared sink (then read it, not the handle)
        self.queue = sink if sink is not None else queue.Queue()
        self.last: Optional[RequestOutput] = None

    def __iter__(self) -> Iterator[RequestOutput]:
        while self.last is None or not self.last.finished:
            self.last = self.queue.get()
            yield self.last

    def result(self) -> RequestOutput:
        for _ in self:
            pass
        assert self.last is not None
        return self.last

    def abort(self) -> None:
        self.engine.abort(self.request_id)


class PoolView:
    """The KV pool's numbers as of the core's last step (the pool itself may be in another process)."""

    def __init__(self, frontend: "FrontEnd") -> None:
        self._frontend = frontend

    @property
    def usage(self) -> float:
        return self._frontend.stats.kv_usage

    @property
    def num_blocks(self) -> int:
        return self._frontend.info.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self._frontend.stats.num_free_blocks

    def check_idle(self) -> None:
        """With no request live, every block is free or an evictable cached one (the core's own
        BlockPool.check_idle, as its last step message reported it)."""
        stats = self._frontend.stats
        if stats.num_free_blocks + stats.num_resident_blocks != self.num_blocks:
            raise AssertionError(f"{self.num_blocks - stats.num_free_blocks} KV blocks still held with "
                                 f"{self._frontend.num_live_requests} request(s) live")


class FrontEnd:
    """Subclasses send to the core: _submit, _send_aborts, _send_stops."""

    def __init__(self, tokenizer, info: EngineInfo, limits: RequestLimits) -> None:
        self.tokenizer = tokenizer
        self.info = info
        self.limits = limits
        self.processor = OutputProcessor(tokenizer)
        self.stats = EngineStats(num_free_blocks=info.num_blocks)
        self._handles: Dict[str, RequestHandle] = {}
        self._lock = threading.Lock()  # handles + processor: callers add, the output side processes
        self.adapters: Dict[str, str] = dict(info.adapters)  # LoRA adapters served, as of the core's last word
        self._lora_waiters: Dict[int, list] = {}  # command id -> [threading.Event, result]
        self.task_prompts: Dict[str, List[int]] = {}  # MULTI_TASK_PROMPT: task_id -> its prompt's token ids

    # ---- to the core (subclasses) ---------------------------------------------------------------
    def _submit(self, requests: List[EngineRequest]) -> None:
        raise NotImplementedError

    def _send_aborts(self, request_ids: List[str]) -> None:
        raise NotImplementedError

    def _send_stops(self, stops: List[Tuple[str, int]]) -> None:
        raise NotImplementedError

    def _send_lora(self, command: LoraCommand) -> None:
        raise NotImplementedError

    def _send_tasks(self, prompts: Dict[str, List[int]]) -> None:
        raise NotImplementedError

    def set_task_prompts(self, prompts: Dict[str, List[int]]) -> None:
        """MULTI_TASK_PROMPT's prompts, tokenized: a request's task_id puts its task's prompt first,
        and the core keeps that prompt's KV blocks resident once computed."""
        self.task_prompts = {str(k): list(v) for k, v in prompts.items()}
        if self.task_prompts:
            self._send_tasks(self.task_prompts)

    def _with_task(self, prompt_token_ids: List[int], config: GenerateConfig) -> List[int]:
        if config.task_id is None:
            return prompt_token_ids
        task = self.task_prompts.get(config.task_id)
        if task is None:
            raise ValueError(f"task_id: no MULTI_TASK_PROMPT task {config.task_id!r} "
                             f"(tasks: {sorted(self.task_prompts) or 'none'})")
        return task + list(prompt_token_ids)

    # ---- public API (thread-safe) ---------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        """False once no core serves requests (the process client says why in `failure`)."""
        return True

    @property
    def failure(self) -> Optional[str]:
        return None

    @property
    def max_seq_len(self) -> int:
        return self.info.max_seq_len

    @property
    def pool(self) -> PoolView:
        return PoolView(self)

    @property
    def num_running(self) -> int:
        return self.stats.num_running

    @property
    def num_waiting(self) -> int:
        return self.stats.num_waiting

    @property
    def num_live_requests(self) -> int:
        """Requests the front end follows (sent and not finished)."""
        with self._lock:
            return len(self._handles)

    def validate(self, prompt_token_ids: List[int], config: GenerateConfig) -> None:
        """Raise ValueError naming the field if add_request would refuse this request."""
        self.limits.check(self._with_task(prompt_token_ids, config), config)
        self._check_adapter(config)

    def _check_adapter(self, config: GenerateConfig) -> None:
        name = config.adapter_name
        if name is not None and name not in self.adapters:
            raise ValueError(f"adapter_name: no LoRA adapter named {name!r} is served "
                             f"(served: {sorted(self.adapters) or 'none'})")

    # ---- LoRA adapters (lora/manager.py does the work, in the core) -----------------------------
    def update_lora(self, kind: str, adapters: Dict[str, str],
                    timeout_s: float = LORA_UPDATE_TIMEOUT_S) -> LoraUpdateResult:
        """Change the served adapters and wait for the core's answer. kind "set": `adapters` is the
        whole wanted set (rtp-llm's /update); "load" adds, "unload" removes the named ones. Requests
        keep running meanwhile; a refused command changes nothing (result.error says why)."""
        command = LoraCommand(next(_lora_command_ids), kind, dict(adapters))
        waiter = [threading.Event(), None]
        with self._lock:
            self._check_alive()
            self._lora_waiters[command.command_id] = waiter
        self._send_lora(command)
        if not self._wait_lora(waiter[0], timeout_s):
            with self._lock:
                self._lora_waiters.pop(command.command_id, None)
            raise TimeoutError(f"the engine core did not finish the LoRA update within {timeout_s:.0f} s")
        return waiter[1]

    def _wait_lora(self, done: threading.Event, timeout_s: float) -> bool:
        """Wait for the core's answer (the in-process Engine without its loop thread steps meanwhile)."""
        return done.wait(timeout_s)

    def _on_lora_results(self, results: List[LoraUpdateResult]) -> None:
        """Call with the lock held."""
        for result in results:
            self.adapters = dict(result.adapters)
            waiter = self._lora_waiters.pop(result.command_id, None)
            if waiter is not None:
                waiter[1] = result
                waiter[0].set()

    def _fail_lora_waiters(self, message: str) -> None:
        """Call with the lock held: the core is gone, no answer will come."""
        for command_id, waiter in list(self._lora_waiters.items()):
            waiter[1] = LoraUpdateResult(command_id, dict(self.adapters), error=message, status=503)
            waiter[0].set()
        self._lora_waiters.clear()

    def add_request(self, prompt_token_ids: List[int], config: GenerateConfig,
                    request_id: Optional[str] = None, sink=None, stream: bool = True) -> RequestHandle:
        """Validate and send a request. Raises ValueError naming the bad field. stream=False: the
        handle gets only the final output (the core sends its tokens once, at the end)."""
        return self.add_requests([prompt_token_ids], config, [request_id], sink, stream)[0]

    def add_requests(self, prompts: Sequence[List[int]], config: GenerateConfig,
                     request_ids: Optional[Sequence[Optional[str]]] = None, sink=None,
                     stream: bool = True) -> List[RequestHandle]:
        """Several requests in one message to the core; all are validated before any is sent."""
        prompts = [self._with_task(ids, config) for ids in prompts]
        for ids in prompts:
            self.limits.check(ids, config)
        self._check_adapter(config)
        ids_given = list(request_ids or [None] * len(prompts))
        names = [rid or f"req-{next(_request_ids)}" for rid in ids_given]
        handles = [RequestHandle(self, name, sink) for name in names]
        pull = hasattr(sink, "notify_changed")
        with self._lock:
            taken = [n for n in names if n in self._handles] or _repeated(names)
            if taken:
                raise ValueError(f"request_id {taken[0]!r} is already in use")
            self._check_alive()
            for handle, ids in zip(handles, prompts):
                self._handles[handle.request_id] = handle
                self.processor.add(handle.request_id, ids, config, stream, pull=pull)
        self._submit([EngineRequest(h.request_id, list(ids), config, stream) for h, ids in zip(handles, prompts)])
        return handles

    def abort(self, request_id: str) -> None:
        self._send_aborts([request_id])

    def abort_requests(self, request_ids: List[str]) -> None:
        """Several aborts in one message."""
        if request_ids:
            self._send_aborts(list(request_ids))

    def _check_alive(self) -> None:
        """Raise RuntimeError when no core can take requests (subclasses)."""

    # ---- from the core --------------------------------------------------------------------------
    def on_core_output(self, step: CoreStepOutput) -> List[RequestOutput]:
        """Turn one step's deltas into outputs, stop what stop strings ended, hand outputs out."""
        with self._lock:
            outputs, stops, changed = self.processor.process(step)
            if step.lora_results:
                self._on_lora_results(step.lora_results)
            if step.stats is not None:
                self.stats = step.stats
            routed = self._route(outputs)
            notices = self._route_changed(changed)
        if stops:
            self._send_stops(stops)
        _deliver(routed)
        for sink, request_ids in notices:
            _guarded(sink.notify_changed, request_ids)
        return outputs

    def latest(self, request_id: str) -> Optional[RequestOutput]:
        """The current output of a request followed by a pulling sink (None once it finished)."""
        with self._lock:
            return self.processor.latest(request_id)

    def fail_all(self, message: str) -> None:
        with self._lock:
            routed = self._route(self.processor.fail_all(message))
            self._fail_lora_waiters(message)
        _deliver(routed)

    def _route(self, outputs: List[RequestOutput]):
        """Group outputs by sink (call with the lock held); finished requests leave the handles."""
        by_sink = defaultdict(list)
        sinks = {}
        for output in outputs:
            handle = self._handles.get(output.request_id)
            if handle is None:
                continue
            if output.finished:
                del self._handles[output.request_id]
            by_sink[id(handle.queue)].append(output)
            sinks[id(handle.queue)] = handle.queue
        return [(sinks[key], group) for key, group in by_sink.items()]

    def _route_changed(self, request_ids: List[str]):
        """Group changed pull requests by sink (call with the lock held)."""
        by_sink: Dict[int, list] = {}
        for request_id in request_ids:
            handle = self._handles.get(request_id)
            if handle is not None:
                by_sink.setdefault(id(handle.queue), [handle.queue, []])[1].append(request_id)
        return list(by_sink.values())


def _guarded(call, arg) -> None:
    try:
        call(arg)
    except Exception:  # one caller's broken sink must not keep outputs from the others
        logger.exception("a sink refused a notice")


def _repeated(names: List[str]) -> List[str]:
    seen: set = set()
    return [n for n in names if n in seen or seen.add(n)]


def _deliver(routed) -> None:
    for sink, group in routed:
        try:
            put_batch = getattr(sink, "put_batch", None)
            if put_batch is not None:
                put_batch(group)
            else:
                for output in group:
                    sink.put(output)
        except Exception:  # one caller's broken sink must not keep outputs from the others
            logger.exception("a sink refused %d output(s)", len(group))
