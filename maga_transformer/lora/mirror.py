"""The LoRA adapters of a tensor-parallel worker rank: the same served set as rank 0's manager
(lora/manager.py), on this rank's shards, driven by the rank ops that come with each step.

At start-up it loads LORA_INFO's adapters in rank 0's order, which gives them rank 0's slots
(0, 1, ...). Later changes arrive as ops in the step inputs, applied before the step runs: "prepare"
starts reading and cutting this rank's share on a background thread (as rank 0 does), "attach"
waits for it (rank 0 finished its own share, so it is usually done) and serves it under rank 0's
slot, "discard" drops a load rank 0 refused, "detach" drops a slot.
"""
from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Dict, Iterable, Optional

from maga_transformer.lora.adapter import PreparedAdapter, prepare_adapter
from maga_transformer.lora.config import LoraConfig
from maga_transformer.lora.peft_reader import read_peft_adapter

logger = logging.getLogger(__name__)


class LoraMirror:
    def __init__(self, model, config: Optional[LoraConfig] = None) -> None:
        self.model = model
        self.config = config or LoraConfig()
        self.attached: Dict[int, PreparedAdapter] = {}
        self._loads: Dict[int, Future] = {}  # command id -> its adapters, being prepared
        self._executor: Optional[ThreadPoolExecutor] = None
        if not self.config.merge:
            for slot, (name, path) in enumerate(self.config.adapters.items()):
                self._attach(slot, self._prepare(name, path))

    def _prepare(self, name: str, path: str) -> PreparedAdapter:
        return prepare_adapter(self.model, read_peft_adapter(name, path, self.config.max_rank))

    def _prepare_all(self, adapters: Dict[str, str]) -> Dict[str, PreparedAdapter]:
        return {name: self._prepare(name, path) for name, path in adapters.items()}

    def _attach(self, slot: int, prepared: PreparedAdapter) -> None:
        prepared.attach(slot)
        self.attached[slot] = prepared

    def apply(self, ops: Iterable[tuple]) -> None:
        for op in ops:
            kind = op[0]
            if kind == "prepare":
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(1, thread_name_prefix="maga-lora-load")
                self._loads[op[1]] = self._executor.submit(self._prepare_all, op[2])
            elif kind == "attach":
                _, command_id, name, slot = op
                # rank 0 read the same files successfully: a failure here is this rank's, and fatal
                prepared = self._loads[command_id].result()
                self._attach(slot, prepared.pop(name))
                if not prepared:
                    del self._loads[command_id]
                logger.info("LoRA adapter %r served in slot %d on this rank", name, slot)
            elif kind == "discard":
                self._loads.pop(op[1], None)
            elif kind == "detach":
                prepared = self.attached.pop(op[1], None)
                if prepared is not None:
                    prepared.detach(op[1])
