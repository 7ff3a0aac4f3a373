"""The served adapters, inside the engine core: start-up loads, hot updates, unloads.

Loading reads and prepares an adapter on a background thread of the core's process; the step loop
keeps running, and at the top of the first step after the load finished the adapter's factors are
attached to the projections (a few dict insertions), so no running request waits for more than
that step. Commands run one at a time in arrival order, each all or nothing: a bad adapter in a
`set` leaves the served set as it was.

Under tensor parallelism (rank 0 here, in the engine core) every change is also queued as a rank op
(`take_rank_ops`) that travels to the other ranks with the next step's inputs, where a LoraMirror
(lora/mirror.py) replays it on their shards: "prepare" as the load starts (they read and cut their
share meanwhile), "attach" under the slot rank 0 chose, "discard" for a refused load, "detach".

Unloading takes a name out of the served set at once (new requests naming it are refused) and lets
the requests already using it finish with it: its factors stay attached under its slot until no
live request has that slot, then they are dropped. Slots are never reused, so a name unloaded and
loaded again (maybe from new files) gets a new slot and a new prefix-cache salt.
"""
from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable, Deque, Dict, List, Optional, Set, Tuple

from maga_transformer.lora.adapter import PreparedAdapter, check_model_supports_lora, prepare_adapter
from maga_transformer.lora.config import LoraConfig
from maga_transformer.lora.messages import LoraCommand, LoraUpdateResult
from maga_transformer.lora.peft_reader import read_peft_adapter

logger = logging.getLogger(__name__)
MERGED_SLOT = -1  # LORA_MERGE=1: the adapter is in the weights; its requests run as the model itself


@dataclass
class ServedAdapter:
    name: str
    path: str
    slot: int
    prepared: Optional[PreparedAdapter]  # None when merged into the weights

    @property
    def cache_salt(self) -> Optional[str]:
        """What separates this adapter's cached KV blocks from every other's (engine/block_pool.py)."""
        return None if self.slot == MERGED_SLOT else f"lora-slot-{self.slot}"


@dataclass
class _Plan:
    command: LoraCommand
    load: Dict[str, str]
    unload: List[str]


class LoraManager:
    def __init__(self, model, config: Optional[LoraConfig] = None) -> None:
        self.model = model
        self.config = config or LoraConfig()
        self.served: Dict[str, ServedAdapter] = {}
        self.draining: Dict[int, ServedAdapter] = {}  # unloaded, still used by live requests
        self._slots = itertools.count()
        self._commands: Deque[LoraCommand] = deque()
        self._job: Optional[Tuple[_Plan, Future]] = None
        self._executor: Optional[ThreadPoolExecutor] = None
        self._lock = threading.Lock()  # commands arrive from other threads (the in-process mode)
        self.on_job_done: Optional[Callable[[], None]] = None  # wakes the step loop (in-process mode)
        self._rank_ops: List[tuple] = []  # tensor parallelism: what the other ranks must replay
        self._mirror_ranks = getattr(getattr(model, "tp", None), "size", 1) > 1
        if self.config.merge:
            name, path = next(iter(self.config.adapters.items()))
            self.served[name] = ServedAdapter(name, path, MERGED_SLOT, None)
        else:
            self._load_at_start(self.config.adapters)

    def _load_at_start(self, adapters: Dict[str, str]) -> None:
        """LORA_INFO: a bad adapter stops start-up with its ValueError (a configuration error)."""
        for prepared in self._prepare_all(adapters):
            self._install_one(prepared)

    # ---- what the core asks -----------------------------------------------------------------------
    @property
    def adapters(self) -> Dict[str, str]:
        return {name: served.path for name, served in self.served.items()}

    @property
    def busy(self) -> bool:
        """Work for the step loop: commands queued or loading, or unloaded adapters to drop."""
        return bool(self._commands or self._job is not None or self.draining)

    @property
    def loading(self) -> bool:
        return self._job is not None

    def resolve(self, name: str) -> ServedAdapter:
        served = self.served.get(name)
        if served is None:
            raise ValueError(f"adapter_name: no LoRA adapter named {name!r} is served "
                             f"(served: {sorted(self.served) or 'none'})")
        return served

    def take_rank_ops(self) -> List[tuple]:
        """The changes since the last call, for the other tensor-parallel ranks (in order)."""
        ops, self._rank_ops = self._rank_ops, []
        return ops

    def _rank_op(self, *op) -> None:
        if self._mirror_ranks:
            self._rank_ops.append(op)

    def submit(self, command: LoraCommand) -> None:
        with self._lock:
            self._commands.append(command)

    def wait(self, timeout_s: float) -> None:
        """Block up to timeout_s for the running load (an idle core would otherwise spin)."""
        job = self._job
        if job is not None:
            wait([job[1]], timeout=timeout_s)

    def step(self, live_slots: Callable[[], Set[int]]) -> List[LoraUpdateResult]:
        """Between two steps: install a finished load, start the next command, drop drained adapters."""
        results: List[LoraUpdateResult] = []
        if self._job is not None and self._job[1].done():
            plan, future = self._job
            self._job = None
            results.append(self._finish(plan, future))
        while self._job is None:
            with self._lock:
                command = self._commands.popleft() if self._commands else None
            if command is None:
                break
            result = self._start(command)
            if result is not None:
                results.append(result)
        if self.draining:
            self._drop_drained(live_slots())
        return results

    # ---- commands ---------------------------------------------------------------------------------
    def _start(self, command: LoraCommand) -> Optional[LoraUpdateResult]:
        """Plan the command; an immediate result (refused, or nothing to load), or None while loading."""
        try:
            plan = self._plan(command)
        except _Refused as err:
            return LoraUpdateResult(command.command_id, self.adapters, error=str(err), status=err.status)
        if not plan.load:
            return self._apply(plan, [])
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="maga-lora-load")
        future = self._executor.submit(self._prepare_all, plan.load)
        self._rank_op("prepare", command.command_id, dict(plan.load))
        if self.on_job_done is not None:
            future.add_done_callback(lambda _: self.on_job_done())
        self._job = (plan, future)
        return None

    def _plan(self, command: LoraCommand) -> _Plan:
        if self.config.merge:
            raise _Refused("LORA_MERGE=1: the adapter is merged into the weights; the served set cannot change")
        if command.kind == "set":
            plan = self._plan_set(command)
        elif command.kind == "load":
            plan = self._plan_load(command)
        elif command.kind == "unload":
            missing = [n for n in command.adapters if n not in self.served]
            if missing:
                raise _Refused(f"no LoRA adapter named {missing[0]!r} is served", 404)
            plan = _Plan(command, {}, list(command.adapters))
        else:
            raise _Refused(f"unknown LoRA command {command.kind!r}")
        count = len(self.served) - len(plan.unload) + len(plan.load)
        if count > self.config.max_loras:
            raise _Refused(f"serving {count} LoRA adapters would exceed MAX_LORA_MODEL_SIZE={self.config.max_loras}")
        return plan

    def _plan_set(self, command: LoraCommand) -> _Plan:
        for name, path in command.adapters.items():
            served = self.served.get(name)
            if served is not None and served.path != path:
                raise _Refused(f"LoRA adapter {name!r} is served from {served.path}; a new path for a known name "
                               "is refused (unload it first, or use a new name)")
        load = {n: p for n, p in command.adapters.items() if n not in self.served}
        return _Plan(command, load, [n for n in self.served if n not in command.adapters])

    def _plan_load(self, command: LoraCommand) -> _Plan:
        for name in command.adapters:
            if name in self.served:
                raise _Refused(f"LoRA adapter {name!r} is already loaded (from {self.served[name].path})")
        return _Plan(command, dict(command.adapters), [])

    def _prepare_all(self, adapters: Dict[str, str]) -> List[PreparedAdapter]:
        """On the loader thread (or at start-up): read, check and lay out every adapter of a command."""
        prepared = []
        for name, path in adapters.items():
            check_model_supports_lora(self.model, name)
            peft = read_peft_adapter(name, path, self.config.max_rank)
            prepared.append(prepare_adapter(self.model, peft))
        return prepared

    def _finish(self, plan: _Plan, future: Future) -> LoraUpdateResult:
        err = future.exception()
        if err is not None:
            status = 400 if isinstance(err, ValueError) else 500
            logger.warning("LoRA update refused: %s", err)
            self._rank_op("discard", plan.command.command_id)
            return LoraUpdateResult(plan.command.command_id, self.adapters, error=str(err), status=status)
        return self._apply(plan, future.result())

    def _apply(self, plan: _Plan, prepared: List[PreparedAdapter]) -> LoraUpdateResult:
        for adapter in prepared:
            slot = self._install_one(adapter)
            self._rank_op("attach", plan.command.command_id, adapter.name, slot)
        for name in plan.unload:
            served = self.served.pop(name)
            self.draining[served.slot] = served
            logger.info("LoRA adapter %r unloaded (slot %d; dropped when its last request ends)", name, served.slot)
        return LoraUpdateResult(plan.command.command_id, self.adapters, loaded=[p.name for p in prepared],
                                unloaded=list(plan.unload))

    def _install_one(self, prepared: PreparedAdapter) -> int:
        slot = next(self._slots)
        prepared.attach(slot)
        self.served[prepared.name] = ServedAdapter(prepared.name, prepared.path, slot, prepared)
        logger.info("LoRA adapter %r served in slot %d (rank %d, %.1f MiB)", prepared.name, slot, prepared.rank,
                    prepared.nbytes / 2**20)
        return slot

    def _drop_drained(self, live: Set[int]) -> None:
        for slot in [s for s in self.draining if s not in live]:
            served = self.draining.pop(slot)
            served.prepared.detach(slot)
            self._rank_op("detach", slot)
            logger.info("LoRA adapter %r (slot %d) dropped: no request uses it any more", served.name, slot)


class _Refused(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status
