"""The in-process mode: the engine core on a thread of the caller's process, with the same front
end as the process mode (engine/core_client.py). For debugging and for tests that drive steps one
by one (`step()`, `run_until_idle()`) or look inside the core (scheduler, pool, runner); the
product path runs the core in its own process.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Dict, List, Optional, Tuple

from maga_transformer.config.engine_config import EngineConfig
from maga_transformer.engine.core import EngineCore
from maga_transformer.engine.frontend import FrontEnd
from maga_transformer.engine.messages import EngineRequest
from maga_transformer.engine.output import RequestOutput
from maga_transformer.lora.config import LoraConfig
from maga_transformer.lora.messages import LoraCommand
from maga_transformer.models.decoder import DecoderModel

logger = logging.getLogger(__name__)


class Engine(FrontEnd):
    def __init__(self, model: DecoderModel, tokenizer, engine_config: EngineConfig, max_seq_len: int,
                 block_size: int, eos_token_ids: List[int], lora: Optional[LoraConfig] = None,
                 ptuning_dir: Optional[str] = None) -> None:
        self.core = EngineCore(model, engine_config, max_seq_len, block_size, eos_token_ids, lora=lora,
                               ptuning_dir=ptuning_dir)
        super().__init__(tokenizer, self.core.info, self.core.limits)
        self.model = model
        self.config = engine_config
        self.block_size = block_size
        self.eos_token_ids = list(eos_token_ids)
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        logger.info("engine core in-process: %s", self.core.info.description)

    # the core's parts, for tests and benchmarks that look inside
    @property
    def pool(self):
        return self.core.pool

    @property
    def scheduler(self):
        return self.core.scheduler

    @property
    def runner(self):
        return self.core.runner

    @property
    def overlap(self) -> bool:
        return self.core.overlap

    @overlap.setter
    def overlap(self, enabled: bool) -> None:
        self.core.overlap = enabled

    @property
    def num_look_ahead_steps(self) -> int:
        return self.core.num_look_ahead_steps

    @property
    def num_running(self) -> int:
        return len(self.core.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return self.core.stats().num_waiting

    def has_work(self) -> bool:
        return self.core.has_work()

    # ---- to the core ----------------------------------------------------------------------------
    def _submit(self, requests: List[EngineRequest]) -> None:
        self.core.add_requests(requests)

    def _send_aborts(self, request_ids: List[str]) -> None:
        self.core.abort(request_ids)

    def _send_stops(self, stops: List[Tuple[str, int]]) -> None:
        self.core.stop_sequences(stops)

    def _send_lora(self, command: LoraCommand) -> None:
        self.core.lora_command(command)

    def _send_tasks(self, prompts: Dict[str, List[int]]) -> None:
        self.core.set_task_prompts(prompts)

    def _wait_lora(self, done: threading.Event, timeout_s: float) -> bool:
        if self._thread is not None:
            return done.wait(timeout_s)
        deadline = time.monotonic() + timeout_s  # nobody else steps the core: do it here
        while not done.is_set() and time.monotonic() < deadline:
            self.step()
        return done.is_set()

    # ---- driving the core -----------------------------------------------------------------------
    def step(self) -> List[RequestOutput]:
        """One engine step on this thread; returns the outputs it handed out."""
        if self._thread is not None and threading.current_thread() is not self._thread:
            raise RuntimeError("the engine loop thread is running: do not call step() from another thread")
        return self.on_core_output(self.core.step())

    def run_until_idle(self, max_steps: int = 1_000_000) -> None:
        """Drive steps on this thread until nothing is left (tests, offline batch)."""
        for _ in range(max_steps):
            if not self.has_work():
                return
            self.step()
        raise RuntimeError("engine did not become idle")

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="maga-engine", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        core = self.core
        while True:
            with core.wakeup:
                while not self._stopping and not core.has_work_locked():
                    core.wakeup.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as err:  # a bug outside the model step: fail what is live, keep serving
                logger.exception("engine step failed")
                self.on_core_output(core.fail_all(err))

    def stop(self) -> None:
        """Abort everything still running and stop the loop thread."""
        with self._lock:
            ids = list(self._handles)
        self._send_aborts(ids)
        if self._thread is not None:
            while self.has_work():
                time.sleep(0.001)
            with self.core.wakeup:
                self._stopping = True
                self.core.wakeup.notify()
            self._thread.join()
            self._thread = None
        else:
            self.run_until_idle()
