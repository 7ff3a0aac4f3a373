"""The engine loop: admit requests, schedule a step, run the model, sample, emit outputs.

Other threads talk to it only through `add_request` / `abort` (queued, applied at the top of the
next step) and per-request output queues, so the scheduler and KV bookkeeping stay single-threaded.
`step()` can also be driven directly (tests), when the background loop is not running.
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from typing import Iterator, List, Optional

import torch

from maga_transformer.config.engine_config import EngineConfig
from maga_transformer.config.generate_config import GenerateConfig
from maga_transformer.engine.block_pool import BlockPool
from maga_transformer.engine.memory_plan import CUDA_GRAPH_RESERVE_MB, plan_num_blocks
from maga_transformer.engine.model_runner import ModelRunner, profile_forward
from maga_transformer.engine.output import Detokenizer, RequestOutput
from maga_transformer.engine.overlap import (InflightStep, can_look_ahead, look_ahead_plan,
                                              step_can_overlap)
from maga_transformer.engine.request import FinishReason, Request, Sequence
from maga_transformer.engine.scheduler import Scheduler, SchedulerOutput
from maga_transformer.engine.step_processor import StepProcessor
from maga_transformer.models.decoder import DecoderModel

logger = logging.getLogger(__name__)
_request_ids = itertools.count()


class RequestHandle:
    """The caller's end of a request: iterate for streamed outputs, or wait for the final one."""

    def __init__(self, engine: "Engine", request_id: str, sink: Optional[queue.Queue] = None) -> None:
        self.engine = engine
        self.request_id = request_id
        # a caller following many requests can pass one shared queue (then read it, not the handle)
        self.queue: "queue.Queue[RequestOutput]" = sink if sink is not None else queue.Queue()
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


class Engine:
    def __init__(self, model: DecoderModel, tokenizer, engine_config: EngineConfig, max_seq_len: int,
                 block_size: int, eos_token_ids: List[int]) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = engine_config
        self.max_seq_len = max_seq_len
        self.block_size = block_size
        self.eos_token_ids = list(eos_token_ids)
        step_tokens = min(engine_config.max_num_batched_tokens, max_seq_len)
        num_blocks = plan_num_blocks(
            model, block_size, engine_config, graph_reserve_mb=CUDA_GRAPH_RESERVE_MB,
            profile=lambda: profile_forward(model, block_size, step_tokens, min(engine_config.max_num_seqs, step_tokens)))
        prefix_cache = engine_config.enable_prefix_cache and not model.USES_PROMPT_LAYOUT
        if engine_config.enable_prefix_cache and not prefix_cache:
            logger.info("prefix cache off: %s's keys depend on the whole prompt", type(model).__name__)
        self.pool = BlockPool(num_blocks, prefix_cache)
        self.scheduler = Scheduler(self.pool, block_size, engine_config.max_num_batched_tokens,
                                   engine_config.max_num_seqs, engine_config.enable_chunked_prefill)
        self.runner = ModelRunner(model, block_size, num_blocks, max_seq_len, engine_config.max_num_seqs)
        self.processor = StepProcessor(self.scheduler, Detokenizer(tokenizer))
        overlap = engine_config.overlap_scheduling
        self.overlap = model.device.type == "cuda" if overlap is None else overlap
        self._inflight: Optional[InflightStep] = None  # overlap scheduling: launched, not read back
        self.num_look_ahead_steps = 0  # steps launched before the previous one was read back
        self._handles: dict = {}
        self._pending_adds: List[Request] = []
        self._pending_aborts: List[str] = []
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._thread: Optional[threading.Thread] = None
        self._stopping = False

    # ---- public API (thread-safe) -------------------------------------------------------------
    def add_request(self, prompt_token_ids: List[int], config: GenerateConfig,
                    request_id: Optional[str] = None, sink: Optional[queue.Queue] = None,
                    stream: bool = True) -> RequestHandle:
        """Validate and queue a request. Raises ValueError naming the bad field. stream=False: the
        handle gets only the final output (no per-step text or output objects: less host work per
        step, for offline batches)."""
        request = self._make_request(prompt_token_ids, config, request_id)
        request.stream = stream
        handle = RequestHandle(self, request.request_id, sink)
        with self._lock:
            if request.request_id in self._handles:
                raise ValueError(f"request_id {request.request_id!r} is already in use")
            self._handles[request.request_id] = handle
            self._pending_adds.append(request)
            self._wakeup.notify()
        return handle

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._pending_aborts.append(request_id)
            self._wakeup.notify()

    def has_work(self) -> bool:
        with self._lock:
            return (bool(self._pending_adds or self._pending_aborts) or self.scheduler.has_unfinished()
                    or self._inflight is not None)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting) + len(self._pending_adds)

    # ---- admission ----------------------------------------------------------------------------
    def validate(self, prompt_token_ids: List[int], config: GenerateConfig) -> None:
        """Raise ValueError naming the field if add_request would refuse this request."""
        self._make_request(prompt_token_ids, config, None)

    def _make_request(self, prompt_token_ids: List[int], config: GenerateConfig,
                      request_id: Optional[str]) -> Request:
        if not isinstance(config, GenerateConfig):
            raise TypeError("config must be a GenerateConfig")
        if not prompt_token_ids:
            raise ValueError("prompt: must not be empty")
        vocab = self.model.arch.vocab_size
        if any((not isinstance(t, int)) or t < 0 or t >= vocab for t in prompt_token_ids):
            raise ValueError(f"prompt: token ids must be integers in [0, {vocab})")
        prompt_len = len(prompt_token_ids)
        if prompt_len >= self.max_seq_len:
            raise ValueError(f"prompt: {prompt_len} tokens leaves no room to generate under "
                             f"max_seq_len={self.max_seq_len}")
        max_new = min(config.max_new_tokens, self.max_seq_len - prompt_len)
        if config.min_new_tokens > max_new:
            raise ValueError(f"min_new_tokens: {config.min_new_tokens} exceeds the {max_new} tokens allowed")
        seqs_needed = max(config.num_beams, config.num_return_sequences)
        blocks = seqs_needed * ((prompt_len + max_new + self.block_size - 1) // self.block_size + 1)
        if blocks > self.pool.num_blocks:
            raise ValueError(f"max_new_tokens: prompt ({prompt_len}) + max_new_tokens ({max_new}) x "
                             f"{seqs_needed} sequences does not fit in the KV cache "
                             f"({self.pool.num_blocks} blocks of {self.block_size} tokens)")
        eos = [config.eos_token_id] if config.eos_token_id is not None else self.eos_token_ids
        request = Request(request_id=request_id or f"req-{next(_request_ids)}",
                          prompt_token_ids=list(prompt_token_ids), config=config, max_new_tokens=max_new,
                          eos_token_ids=list(eos))
        request.seqs = [Sequence(token_ids=list(prompt_token_ids), prompt_len=prompt_len)]
        self._set_unsplit_prefix(request)
        return request

    def _set_unsplit_prefix(self, request: Request) -> None:
        """The tokens the first prefill chunk must hold; refuse the request if no step can."""
        request.prompt_layout = self.model.prompt_layout(request.prompt_token_ids)
        if request.prompt_layout is not None:
            request.unsplit_prefix_len = request.prompt_layout.bidirectional_len
        unsplit = request.unsplit_prefix_len if self.config.enable_chunked_prefill else request.prompt_len
        budget = self.config.max_num_batched_tokens
        if unsplit > budget:
            why = ("its first {} tokens attend both ways".format(unsplit) if self.config.enable_chunked_prefill
                   else "chunked prefill is off")
            raise ValueError(f"prompt: {request.prompt_len} tokens must be computed in one step ({why}) but "
                             f"max_num_batched_tokens is {budget}")

    # ---- the step -----------------------------------------------------------------------------
    def _apply_pending(self) -> None:
        with self._lock:
            adds, self._pending_adds = self._pending_adds, []
            aborts, self._pending_aborts = self._pending_aborts, []
        for request in adds:
            self.scheduler.add_request(request)
        for request_id in aborts:
            request = self.scheduler.requests.get(request_id)
            if request is not None:
                self._finish(request, FinishReason.ABORT)
        self._expire_timeouts()

    def _expire_timeouts(self) -> None:
        now = time.monotonic()
        for request in list(self.scheduler.requests.values()):
            timeout = request.config.timeout_ms
            if timeout is not None and (now - request.arrival_time) * 1e3 > timeout:
                request.error = f"timeout_ms: request exceeded {timeout} ms"
                self._finish(request, FinishReason.ABORT)

    def _finish(self, request: Request, reason: FinishReason) -> None:
        for seq in request.live_seqs:
            seq.finish_reason = reason
        self._emit(self.processor.finish(request))

    def _emit(self, output: RequestOutput) -> None:
        with self._lock:
            handle = self._handles.get(output.request_id)
            if output.finished:
                self._handles.pop(output.request_id, None)
        if handle is not None:
            handle.queue.put(output)

    @torch.inference_mode()
    def step(self) -> List[RequestOutput]:
        """One scheduling step; returns the outputs it emitted. With overlap scheduling a decode step
        is read back by the next call (which first launches the step after it, when it may)."""
        if self._thread is not None and threading.current_thread() is not self._thread:
            raise RuntimeError("the engine loop thread is running: do not call step() from another thread")
        self._apply_pending()
        if self._inflight is not None:
            return self._read_back_inflight()
        plan = self.scheduler.schedule()
        if plan.is_empty:
            return []
        if self.overlap and step_can_overlap(plan):
            self._inflight = self._launch(plan, None)
            return []
        try:
            result = self.runner.execute(plan)
        except Exception as err:  # a broken step fails its requests, not the engine
            logger.exception("model step failed")
            return self._fail_step(plan, err)
        outputs = self.processor.process(plan, result)
        for output in outputs:
            self._emit(output)
        return outputs

    def _launch(self, plan: SchedulerOutput, previous: Optional[InflightStep]) -> Optional[InflightStep]:
        """Queue a decode step and its draw on the device without waiting for either. After
        `previous` (look-ahead), the step's input tokens are previous's draw, still on the device."""
        try:
            result = self.runner.execute(plan, previous.draw.tokens if previous is not None else None)
            ready = self.processor.advance(plan, result, register=False)
            return InflightStep(plan, ready, self.processor.launch_draw(ready, result, 1 if previous else 0))
        except Exception as err:
            logger.exception("model step failed")
            self._fail_step(plan, err)
            return None

    def _read_back_inflight(self) -> List[RequestOutput]:
        step, self._inflight = self._inflight, None
        if can_look_ahead(step, self.scheduler):
            plan = look_ahead_plan(step, self.scheduler.kv)
            self._inflight = self._launch(plan, step)
            self.num_look_ahead_steps += 1
        self.processor.complete_draw(step.draw)
        self.processor.register_blocks(step.ready)
        outputs = self.processor.outputs_of_live(step.ready)
        for output in outputs:
            self._emit(output)
        return outputs

    def _fail_step(self, plan: SchedulerOutput, err: Exception) -> List[RequestOutput]:
        outputs = []
        for item in plan.scheduled:
            item.request.error = f"internal error: {type(err).__name__}: {err}"
            for seq in item.request.live_seqs:
                seq.finish_reason = FinishReason.ERROR
            output = self.processor.finish(item.request)
            self._emit(output)
            outputs.append(output)
        return outputs

    def run_until_idle(self, max_steps: int = 1_000_000) -> None:
        """Drive steps on this thread until nothing is left (tests, offline batch)."""
        for _ in range(max_steps):
            if not self.has_work():
                return
            self.step()
        raise RuntimeError("engine did not become idle")

    # ---- background loop ----------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="maga-engine", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not (self._pending_adds or self._pending_aborts
                                                  or self.scheduler.has_unfinished() or self._inflight):
                    self._wakeup.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as err:  # a bug outside the model step: fail what is live, keep serving
                logger.exception("engine step failed")
                self._fail_all(err)

    def _fail_all(self, err: Exception) -> None:
        for request in list(self.scheduler.requests.values()):
            request.error = f"internal error: {type(err).__name__}: {err}"
            self._finish(request, FinishReason.ERROR)

    def stop(self) -> None:
        """Abort everything still running and stop the loop thread."""
        with self._lock:
            ids = list(self._handles)
        for request_id in ids:
            self.abort(request_id)
        if self._thread is not None:
            while self.has_work():
                time.sleep(0.001)
            with self._lock:
                self._stopping = True
                self._wakeup.notify()
            self._thread.join()
            self._thread = None
        else:
            self.run_until_idle()
