"""The engine core: admit requests, schedule a step, run the model, sample, emit token deltas.

It knows token ids, never text (DESIGN.md, "Processes"). Other threads talk to it only through
`add_requests` / `abort` / `stop_sequences` (queued, applied at the top of the next step), so the
scheduler and KV bookkeeping stay single-threaded. Each `step()` returns ONE CoreStepOutput with
everything the step changed; the front end (engine/frontend.py) turns it into text and outputs. It
runs in its own process by default (engine/core_main.py), or on a thread of the caller's process
(engine/engine.py, the in-process mode).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Dict, Iterable, List, Optional, Set, Tuple

import torch

from maga_transformer.config.engine_config import EngineConfig
from maga_transformer.engine.block_pool import BlockPool
from maga_transformer.engine.limits import RequestLimits
from maga_transformer.engine.memory_plan import CUDA_GRAPH_RESERVE_MB, plan_num_blocks
from maga_transformer.engine.messages import CoreStepOutput, EngineInfo, EngineRequest, EngineStats
from maga_transformer.engine.model_runner import ModelRunner, profile_forward
from maga_transformer.engine.overlap import (InflightStep, can_look_ahead, look_ahead_plan,
                                              step_can_overlap)
from maga_transformer.engine.request import FinishReason, Request, Sequence
from maga_transformer.engine.scheduler import PrefillPolicy, Scheduler, SchedulerOutput
from maga_transformer.engine.step_processor import StepProcessor
from maga_transformer.engine.step_trace import StepSummary, StepTrace
from maga_transformer.lora.config import LoraConfig
from maga_transformer.lora.manager import LoraManager
from maga_transformer.lora.messages import LoraCommand
from maga_transformer.ptuning.prefix import PLACEHOLDER, FixedPrefix, prefix_blocks, write_prefix
from maga_transformer.ptuning.reader import read_prefix_past
from maga_transformer.models.decoder import DecoderModel

logger = logging.getLogger(__name__)


def build_model_runner(model: DecoderModel, engine_config: EngineConfig, max_seq_len: int, block_size: int,
                       ranks=None, sends_steps: bool = True, lora: Optional[LoraConfig] = None) -> ModelRunner:
    """Plan the KV cache (profiling the largest step on CUDA), allocate it, capture the decode graphs.
    Under tensor parallelism every rank runs this in step (the profile and the captures call
    collectives) and all keep the KV blocks the tightest rank has room for; rank 0's runner
    (sends_steps) then hands every step to the others. lora: with adapters servable unmerged (LORA_INFO
    or MAX_LORA_MODEL_SIZE set), decode steps with adapter rows get graphs too."""
    step_tokens = min(engine_config.max_num_batched_tokens, max_seq_len)
    num_blocks = plan_num_blocks(
        model, block_size, engine_config, graph_reserve_mb=CUDA_GRAPH_RESERVE_MB,
        profile=lambda: profile_forward(model, block_size, step_tokens, min(engine_config.max_num_seqs, step_tokens)))
    if ranks is not None:
        num_blocks = ranks.agree_min(num_blocks)
    lora_graphs = lora is not None and lora.enabled and not lora.merge
    return ModelRunner(model, block_size, num_blocks, max_seq_len, engine_config.max_num_seqs,
                       ranks if sends_steps else None, engine_config.kv_cache_dtype, lora_graphs)


def _description(model: DecoderModel, engine_config: EngineConfig, num_blocks: int, block_size: int,
                 max_seq_len: int) -> str:
    """What the start-up log and /info say the core runs: device, dtype, quantization, KV tokens (and how
    many sequences of the longest length fit), ranks."""
    weights = f" with {model.weight_quant} weights" if model.weight_quant else ""
    kv = "" if engine_config.kv_cache_dtype == "auto" else f"{engine_config.kv_cache_dtype} "
    tp = f", tensor parallel over {model.tp.size} ranks" if model.tp.size > 1 else ""
    full_length = num_blocks // max(1, -(-max_seq_len // block_size))
    return (f"{model.device.type} {str(model.dtype).replace('torch.', '')}{weights}, KV cache {kv}"
            f"{num_blocks * block_size:,} tokens ({num_blocks:,} blocks of {block_size}; "
            f"{full_length:,} {'sequence' if full_length == 1 else 'sequences'} of {max_seq_len:,} tokens at once){tp}")


class EngineCore:
    def __init__(self, model: DecoderModel, engine_config: EngineConfig, max_seq_len: int,
                 block_size: int, eos_token_ids: List[int], ranks=None, lora: Optional[LoraConfig] = None,
                 ptuning_dir: Optional[str] = None) -> None:
        """ranks: the tensor-parallel group (distributed/ranks.py) when this core is rank 0 of one.
        lora: the adapters to serve from the start and the served set's limits (lora/config.py).
        ptuning_dir: a P-tuning v2 checkpoint whose prefix every request starts with (ptuning/)."""
        self.model = model
        self.config = engine_config
        self.max_seq_len = max_seq_len
        self.block_size = block_size
        self.ranks = ranks
        self.runner = build_model_runner(model, engine_config, max_seq_len, block_size, ranks, lora=lora)
        num_blocks = self.runner.num_blocks
        prefix_cache = engine_config.enable_prefix_cache and not model.USES_PROMPT_LAYOUT
        if engine_config.enable_prefix_cache and not prefix_cache:
            logger.info("prefix cache off: %s's keys depend on the whole prompt", type(model).__name__)
        self.pool = BlockPool(num_blocks, prefix_cache)
        self.prefix = self._install_prefix(ptuning_dir) if ptuning_dir else None
        policy = PrefillPolicy(engine_config.max_num_partial_prefills, engine_config.long_prefill_token_threshold)
        self.scheduler = Scheduler(self.pool, block_size, engine_config.max_num_batched_tokens,
                                   engine_config.max_num_seqs, engine_config.enable_chunked_prefill, policy)
        self.processor = StepProcessor(self.scheduler)
        self.lora = LoraManager(model, lora)  # loads LORA_INFO's adapters now (a bad one stops start-up)
        self.info = EngineInfo(
            vocab_size=model.arch.vocab_size, max_seq_len=max_seq_len, block_size=block_size,
            num_blocks=num_blocks - len(self.pool.pinned),  # what requests can use
            max_num_batched_tokens=engine_config.max_num_batched_tokens,
            enable_chunked_prefill=engine_config.enable_chunked_prefill, eos_token_ids=list(eos_token_ids),
            description=_description(model, engine_config, num_blocks, block_size, max_seq_len),
            adapters=self.lora.adapters, lora_merged=self.lora.config.merge,
            ptuning_prefix_len=self.prefix.length if self.prefix is not None else 0)
        self.limits = RequestLimits(self.info, model.prompt_layout)
        overlap = engine_config.overlap_scheduling
        self.overlap = model.device.type == "cuda" if overlap is None else overlap
        self._inflight: Optional[InflightStep] = None  # overlap scheduling: launched, not read back
        self.num_look_ahead_steps = 0  # steps launched before the previous one was read back
        self.num_steps = 0
        self.last_step = StepSummary()  # what the last step() ran (engine/step_trace.py)
        self.trace = StepTrace.from_env()  # MAGA_STEP_TRACE: a line per step, for load studies
        self._pending_adds: List[EngineRequest] = []
        self.adds_arrived_at = 0.0  # when the oldest queued request reached the core (time.monotonic())
        self._pending_aborts: List[str] = []
        self._pending_stops: List[Tuple[str, int]] = []
        self._lock = threading.Lock()
        self.wakeup = threading.Condition(self._lock)  # notified when work is queued
        self.lora.on_job_done = self._notify

    def _install_prefix(self, ptuning_dir: str) -> FixedPrefix:
        """The P-tuning prefix into the pool's first blocks, held by the engine for good."""
        past = read_prefix_past(ptuning_dir)
        blocks = prefix_blocks(past.shape[0], self.block_size)
        if len(blocks) >= self.pool.num_blocks:
            raise ValueError(f"P-tuning: the prefix needs {len(blocks)} KV blocks, the pool has {self.pool.num_blocks}")
        taken = self.pool.pin(len(blocks))
        assert taken == blocks, "a fresh pool hands out blocks 0, 1, ... (every rank writes the same ones)"
        write_prefix(self.model, self.runner.kv_caches, past, blocks, self.block_size)
        return FixedPrefix(past.shape[0], blocks)

    # ---- queued from other threads --------------------------------------------------------------
    def add_requests(self, requests: Iterable[EngineRequest]) -> None:
        with self._lock:
            if not self._pending_adds:
                self.adds_arrived_at = time.monotonic()  # the step trace's `received`
            self._pending_adds.extend(requests)
            self.wakeup.notify()

    def abort(self, request_ids: Iterable[str]) -> None:
        with self._lock:
            self._pending_aborts.extend(request_ids)
            self.wakeup.notify()

    def stop_sequences(self, stops: Iterable[Tuple[str, int]]) -> None:
        """The front end found a stop string: finish these (request id, sequence index) with STOP."""
        with self._lock:
            self._pending_stops.extend(stops)
            self.wakeup.notify()

    def set_task_prompts(self, prompts: Dict[str, List[int]]) -> None:
        """MULTI_TASK_PROMPT: the full blocks of each task prompt (after the P-tuning prefix, if any)
        stay in the prefix cache for good once a request has computed them."""
        head = [PLACEHOLDER] * self.prefix.length if self.prefix is not None else []
        skip = len(self.prefix.blocks) if self.prefix is not None else 0
        for ids in prompts.values():
            self.pool.resident_hashes.update(self.scheduler.kv.full_block_hashes(head + list(ids))[skip:])

    def lora_command(self, command: LoraCommand) -> None:
        """Change the served LoRA adapters; the result comes in a step's `lora_results`."""
        self.lora.submit(command)
        self._notify()

    def _notify(self) -> None:
        with self._lock:
            self.wakeup.notify()

    def has_work_locked(self) -> bool:
        """Anything queued, scheduled or in flight; call with `wakeup` held."""
        return bool(self._pending_adds or self._pending_aborts or self._pending_stops
                    or self.scheduler.has_unfinished() or self._inflight is not None or self.lora.busy)

    def has_work(self) -> bool:
        with self._lock:
            return self.has_work_locked()

    def stats(self) -> EngineStats:
        with self._lock:
            waiting = len(self.scheduler.waiting) + len(self._pending_adds)
        return EngineStats(num_running=len(self.scheduler.running), num_waiting=waiting, kv_usage=self.pool.usage,
                           num_free_blocks=self.pool.num_free_blocks,
                           prefix_cache_queries=self.pool.stats.queries, prefix_cache_hits=self.pool.stats.hits,
                           num_steps=self.num_steps, num_resident_blocks=len(self.pool.resident))

    # ---- admission ------------------------------------------------------------------------------
    def _make_request(self, req: EngineRequest) -> Request:
        admission = self.limits.check(req.prompt_token_ids, req.config)
        request = Request(request_id=req.request_id, prompt_token_ids=list(req.prompt_token_ids), config=req.config,
                          max_new_tokens=admission.max_new_tokens, eos_token_ids=admission.eos_token_ids,
                          emits_every_step=req.emits_every_step, prompt_layout=admission.prompt_layout,
                          unsplit_prefix_len=admission.unsplit_prefix_len)
        salt = None
        if req.config.adapter_name is not None:
            adapter = self.lora.resolve(req.config.adapter_name)  # unloaded since the front end checked: refused
            request.lora_slot, salt = adapter.slot, adapter.cache_salt
        head, fixed = [], None
        if self.prefix is not None:  # (calculate_loss was refused by the limits)
            request.prefix_len, fixed = self.prefix.length, self.prefix.blocks
            head = [PLACEHOLDER] * self.prefix.length
        request.seqs = [Sequence(token_ids=head + list(req.prompt_token_ids), prompt_len=len(head) + request.prompt_len,
                                 cache_salt=salt, fixed_prefix=fixed)]
        return request

    def _live_lora_slots(self) -> Set[int]:
        return {request.lora_slot for request in self.scheduler.requests.values()}

    def _apply_pending(self, out: CoreStepOutput) -> int:
        """Admit, abort and stop what other threads queued; returns the number admitted."""
        with self._lock:
            adds, self._pending_adds = self._pending_adds, []
            aborts, self._pending_aborts = self._pending_aborts, []
            stops, self._pending_stops = self._pending_stops, []
        for req in adds:
            self._admit(req, out)
        for request_id in aborts:
            request = self.scheduler.requests.get(request_id)
            if request is not None:
                self._finish(request, FinishReason.ABORT, out)
        self._apply_stops(stops, out)
        self._expire_timeouts(out)
        return len(adds)

    def _admit(self, req: EngineRequest, out: CoreStepOutput) -> None:
        try:
            request = self._make_request(req)
        except (ValueError, TypeError) as err:  # the front end checked; a mismatch fails this request only
            request = Request(request_id=req.request_id, prompt_token_ids=list(req.prompt_token_ids),
                              config=req.config, max_new_tokens=0, error=str(err))
            request.seqs = [Sequence(token_ids=list(req.prompt_token_ids), prompt_len=len(req.prompt_token_ids),
                                     finish_reason=FinishReason.ERROR)]
            self.processor.finish(request, out)
            return
        self.scheduler.add_request(request)

    def _apply_stops(self, stops: List[Tuple[str, int]], out: CoreStepOutput) -> None:
        touched = []
        for request_id, index in stops:
            request = self.scheduler.requests.get(request_id)
            if request is None or index >= len(request.seqs) or request.seqs[index].is_finished:
                continue
            seq = request.seqs[index]
            seq.finish_reason = FinishReason.STOP
            self.scheduler.free_sequence(seq)
            touched.append(request)
        self.processor.emit(touched, out)

    def _expire_timeouts(self, out: CoreStepOutput) -> None:
        now = time.monotonic()
        for request in list(self.scheduler.requests.values()):
            timeout = request.config.timeout_ms
            if timeout is not None and (now - request.arrival_time) * 1e3 > timeout:
                request.error = f"timeout_ms: request exceeded {timeout} ms"
                self._finish(request, FinishReason.ABORT, out)

    def _finish(self, request: Request, reason: FinishReason, out: CoreStepOutput) -> None:
        for seq in request.live_seqs:
            seq.finish_reason = reason
        self.processor.finish(request, out)

    # ---- the step -------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> CoreStepOutput:
        """One scheduling step and what it changed. With overlap scheduling a decode step is read
        back by the next call (which first launches the step after it, when it may)."""
        out = CoreStepOutput()
        self.num_steps += 1
        if self.trace is not None:
            self.last_step = StepSummary()
        start, received = time.monotonic(), self.adds_arrived_at
        added = self._apply_pending(out)
        if self.lora.busy:
            out.lora_results = self.lora.step(self._live_lora_slots)
            if self.ranks is not None:
                self.runner.lora_ops.extend(self.lora.take_rank_ops())
        if self._inflight is not None:
            self._read_back_inflight(out)
        else:
            plan = self.scheduler.schedule()
            self._run_plan(plan, out, time.monotonic())
        out.stats = self.stats()
        if self.trace is not None:
            self.trace.record(self, start, added, out, received)
        if self.lora.loading and not self.scheduler.has_unfinished():
            self.lora.wait(0.01)  # nothing to run while an adapter loads: do not spin on empty steps
        return out

    def _run_plan(self, plan: SchedulerOutput, out: CoreStepOutput, planned: float) -> None:
        if plan.is_empty:
            return
        if self.overlap and step_can_overlap(plan):
            self._inflight = self._launch(plan, None, out)
            self._note_step("launch", plan, planned)
            return
        try:
            result = self.runner.execute(plan)
            self._note_step("run", plan, planned)
            ready = self.processor.process(plan, result)
        except Exception as err:  # a broken step fails its requests, not the engine
            logger.exception("model step failed")
            self._fail_step(plan, err, out)
            return
        self.processor.emit([request for request, _ in ready], out)

    def _launch(self, plan: SchedulerOutput, previous: Optional[InflightStep],
                out: CoreStepOutput) -> Optional[InflightStep]:
        """Queue a decode step and its draw on the device without waiting for either. After
        `previous` (look-ahead), the step's input tokens are previous's draw, still on the device."""
        try:
            result = self.runner.execute(plan, previous.draw.tokens if previous is not None else None)
            ready = self.processor.advance(plan, result, register=False)
            return InflightStep(plan, ready, self.processor.launch_draw(ready, result, 1 if previous else 0))
        except Exception as err:
            logger.exception("model step failed")
            self._fail_step(plan, err, out)
            return None

    def _read_back_inflight(self, out: CoreStepOutput) -> None:
        step, self._inflight = self._inflight, None
        if can_look_ahead(step, self.scheduler):
            plan = look_ahead_plan(step, self.scheduler.kv)
            planned = time.monotonic()
            self._inflight = self._launch(plan, step, out)
            self.num_look_ahead_steps += 1
            self._note_step("read_back", plan, planned)
        else:
            self._note_step("read_back", None, 0.0)
        self.processor.complete_draw(step.draw)
        self.processor.register_blocks(step.ready)
        self.processor.emit([request for request, _ in step.ready], out)

    def _note_step(self, kind: str, plan: Optional[SchedulerOutput], planned: float) -> None:
        """What this step ran, for MAGA_STEP_TRACE only (a loop over the plan: not paid when off)."""
        if self.trace is not None:
            self.last_step = (StepSummary(kind=kind) if plan is None
                              else StepSummary.of_plan(kind, plan, self.runner.last_ran_graph, planned))

    def _fail_step(self, plan: SchedulerOutput, err: Exception, out: CoreStepOutput) -> None:
        if self.ranks is not None:  # the ranks may be inside different collectives now: the group is done
            raise err
        for item in plan.scheduled:
            item.request.error = f"internal error: {type(err).__name__}: {err}"
            self._finish(item.request, FinishReason.ERROR, out)

    def fail_all(self, err: Exception) -> CoreStepOutput:
        """A bug outside the model step: fail what is live, keep serving."""
        out = CoreStepOutput()
        self._inflight = None
        for request in list(self.scheduler.requests.values()):
            request.error = f"internal error: {type(err).__name__}: {err}"
            self._finish(request, FinishReason.ERROR, out)
        out.stats = self.stats()
        return out
