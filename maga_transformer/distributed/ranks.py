"""The tensor-parallel process group of one engine: joining it, and the step channel from rank 0 (in
the engine core, which schedules and samples) to the other ranks (workers, which run the same step
on their shards).

Two groups: a gloo group for Python objects (each step's inputs, start-up agreements; its long
timeout covers loading and idle time, which rank 0's heartbeats break up) and the device group for
the forward pass's all-reduces and all-gathers (NCCL on GPU, gloo on CPU), whose timeout,
TP_COLLECTIVE_TIMEOUT_S, bounds how long a lost or hung rank can stall a step. Rank 0 sends each
step's message under that timeout too: gloo's root waits until every rank has posted its receive,
so a rank hung between two steps held the core for the object group's start-up timeout (30 min).
"""
from __future__ import annotations

import logging
import pickle
from datetime import timedelta
from typing import Optional, Tuple

import torch

from maga_transformer.distributed.parallel_config import ParallelConfig
from maga_transformer.distributed.tensor_parallel import TensorParallel

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT = timedelta(minutes=30)  # ranks load their shards at different speeds

_STOP, _PING = "stop", "ping"


class RankGroup:
    def __init__(self, parallel: ParallelConfig, rank: int, device: torch.device) -> None:
        import torch.distributed as dist
        self.parallel, self.rank, self.device = parallel, rank, device
        self._dist = dist
        options = dict(init_method=f"tcp://{parallel.master_addr}:{parallel.master_port}", rank=rank,
                       world_size=parallel.world_size, timeout=STARTUP_TIMEOUT)
        dist.init_process_group(backend="gloo", **options)
        self.object_group = dist.group.WORLD
        backend = "nccl" if device.type == "cuda" else "gloo"
        self.device_group = dist.new_group(backend=backend,
                                           timeout=timedelta(seconds=parallel.collective_timeout_s))
        self.tp = TensorParallel(rank % parallel.tp_size, parallel.tp_size, self.device_group,
                                 split_embeddings=parallel.split_embeddings)
        logger.info("rank %d of %d joined (%s collectives on %s)", rank, parallel.world_size, backend, device)

    # ---- start-up ---------------------------------------------------------------------------------
    def agree_min(self, value: int) -> int:
        """The smallest of every rank's value (the KV blocks every rank has room for)."""
        tensor = torch.tensor([value], dtype=torch.long)
        self._dist.all_reduce(tensor, op=self._dist.ReduceOp.MIN, group=self.object_group)
        return int(tensor.item())

    # ---- rank 0 -----------------------------------------------------------------------------------
    def send_step(self, inputs, pending_tokens: Optional[torch.Tensor]) -> None:
        self._broadcast(inputs)
        if pending_tokens is not None:
            self._dist.broadcast(pending_tokens[:inputs.num_pending].contiguous(), src=0, group=self.device_group)

    def heartbeat(self) -> None:
        self._broadcast(_PING)

    def send_stop(self) -> None:
        try:
            self._broadcast(_STOP)
        except RuntimeError:  # a rank already gone (torchrun or a signal stopped it first): nothing to stop
            logger.debug("stopping the group: a rank was already gone", exc_info=True)

    def _broadcast(self, message) -> None:
        """Rank 0's message to every rank (its pickled size, then its bytes), each send bounded by
        TP_COLLECTIVE_TIMEOUT_S; the receivers wait as long as the group's own timeout."""
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        options = self._dist.BroadcastOptions()
        options.rootRank, options.rootTensor = 0, 0
        options.timeout = timedelta(seconds=self.parallel.collective_timeout_s)
        for tensor in (torch.tensor([len(data)], dtype=torch.long), torch.frombuffer(bytearray(data), dtype=torch.uint8)):
            self.object_group.broadcast([tensor], options).wait()

    def _receive(self):
        size = torch.empty(1, dtype=torch.long)
        self._dist.broadcast(size, src=0, group=self.object_group)
        data = torch.empty(int(size.item()), dtype=torch.uint8)
        self._dist.broadcast(data, src=0, group=self.object_group)
        return pickle.loads(data.numpy().tobytes())

    # ---- workers ----------------------------------------------------------------------------------
    def recv_step(self) -> Optional[Tuple[object, Optional[torch.Tensor]]]:
        """The next step's (inputs, pending tokens), or None when rank 0 stops the group."""
        while True:
            message = self._receive()
            if message == _STOP:
                return None
            if isinstance(message, str):  # a heartbeat
                continue
            pending = None
            if message.num_pending:
                pending = torch.empty(message.num_pending, dtype=torch.long, device=self.device)
                self._dist.broadcast(pending, src=0, group=self.device_group)
            return message, pending

    def close(self) -> None:
        try:
            self._dist.destroy_process_group()
        except Exception:  # a peer already gone: nothing left to tear down cleanly
            logger.debug("destroying the process group failed", exc_info=True)
