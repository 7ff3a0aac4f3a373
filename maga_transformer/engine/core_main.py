"""The engine-core process: `python3 -m maga_transformer.engine.core_main FD` (started by
engine/core_client.py, never by hand). It loads the weights, builds the EngineCore (KV cache, CUDA
graphs), says "ready" with its limits, then loops: take every queued message, run one step, send
one message with what the step changed. A closed socket (the front end is gone) ends it.

Its log records travel to the front end, which writes them where the server's own logs go; a crash
it cannot report still reaches the terminal through the inherited stderr.
"""
from __future__ import annotations

import gc
import logging
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import List, Optional

from maga_transformer.config.engine_config import EngineConfig
from maga_transformer.distributed.parallel_config import ParallelConfig
from maga_transformer.engine.ipc import Channel, describe_exit
from maga_transformer.lora.config import LoraConfig

logger = logging.getLogger(__name__)
_STOPPING = threading.Event()  # a clean shutdown: workers exiting now is expected
HEARTBEAT_S = 5.0  # an idle tensor-parallel core pings its workers this often (distributed/ranks.py)


@dataclass
class CoreLaunch:
    """What the front end asks the core process to build."""
    ckpt_path: str
    model_type: str
    dtype: str  # torch dtype name, e.g. "bfloat16"
    device: str
    engine_config: EngineConfig
    max_seq_len: int
    block_size: int
    eos_token_ids: List[int]
    log_level: int = logging.WARNING
    parallel: ParallelConfig = ParallelConfig()  # tensor parallelism: this core is rank 0 of the group
    weight_quant: str = ""  # WEIGHT_TYPE=INT8 / FP8: "int8" / "fp8"
    lora: Optional[LoraConfig] = None  # LORA_INFO's adapters and the served set's limits
    ptuning_dir: Optional[str] = None  # a P-tuning v2 checkpoint (ptuning/)


class _ForwardLogs(logging.Handler):
    def __init__(self, channel: Channel) -> None:
        super().__init__()
        self.channel = channel

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.channel.send(("log", record.levelno, record.name, self.format(record)))
        except OSError:
            pass  # the front end is gone; the loop notices


def _start_group(launch: CoreLaunch, device, channel: Channel):
    """Rank 0 of a tensor-parallel group: this machine's other ranks start as worker processes
    (unless torchrun started every rank), and a watchdog ends this process when one of them exits."""
    from maga_transformer.distributed.ranks import RankGroup
    from maga_transformer.distributed.worker import spawn_workers, watch_processes
    parallel = launch.parallel
    workers = [] if parallel.torchrun else spawn_workers(launch, range(1, parallel.local_world_size), 1)

    def on_worker_exit(proc) -> None:
        if not _STOPPING.is_set():
            _die(channel, _rank_exit_reason(proc))
    watch_processes(workers, on_worker_exit)
    return RankGroup(parallel, 0, device), workers


def _rank_exit_reason(proc) -> str:
    return f"tensor-parallel rank {proc.rank} (process {proc.pid}) {describe_exit(proc.returncode)}"


def _lost_rank(workers, wait_s: float) -> Optional[str]:
    """Why a local worker exited, if one did within wait_s (a failed collective usually means one)."""
    deadline = time.monotonic() + wait_s
    while True:
        for proc in workers:
            if proc.poll() is not None:
                return _rank_exit_reason(proc)
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)


def _die(channel: Channel, reason: str) -> None:
    """Tell the front end why (it fails what is live with this reason), then exit at once: rank 0
    may be stuck in a collective with a lost rank, so nothing is waited for."""
    logger.error("%s; the engine core stops", reason)
    try:
        channel.send(("fatal", reason))
    finally:
        os._exit(3)


def _build_core(launch: CoreLaunch, channel: Channel):
    import torch

    from maga_transformer.engine.core import EngineCore
    from maga_transformer.model_factory import load_model_weights
    device = torch.device(launch.device)
    ranks, workers = _start_group(launch, device, channel) if launch.parallel.enabled else (None, [])
    model = load_model_weights(launch.ckpt_path, launch.model_type, getattr(torch, launch.dtype), device,
                               ranks.tp if ranks is not None else None, launch.parallel.load_threads,
                               launch.weight_quant, launch.lora)
    logger.info("rank 0: %.1f MiB of weights", model.weight_bytes() / 2**20)
    core = EngineCore(model, launch.engine_config, launch.max_seq_len, launch.block_size, launch.eos_token_ids, ranks,
                      launch.lora, launch.ptuning_dir)
    _limit_host_threads(device)
    return core, workers


HOST_THREADS_ENV = "MAGA_CORE_HOST_THREADS"


def _limit_host_threads(device) -> None:
    """With the model on a GPU, the core's CPU work is small tensors (a step's index and mask
    tensors): one thread does it. torch's default pool (a thread per core) woke for the larger masks
    and spun, taking the cores the front end and the clients run on just when a burst of requests
    arrived, and made a loaded server's prefill steps twice as long as the same steps alone.
    MAGA_CORE_HOST_THREADS=N sets the pool (0: torch's default); a CPU model keeps every core."""
    import torch
    wanted = os.environ.get(HOST_THREADS_ENV)
    threads = int(wanted) if wanted else (1 if device.type == "cuda" else 0)
    if threads > 0:
        torch.set_num_threads(threads)


def _apply(core, message) -> bool:
    """Apply one front-end message; False on shutdown."""
    kind = message[0]
    if kind == "add":
        core.add_requests(message[1])
    elif kind == "abort":
        core.abort(message[1])
    elif kind == "stop":
        core.stop_sequences(message[1])
    elif kind == "lora":
        core.lora_command(message[1])
    elif kind == "tasks":
        core.set_task_prompts(message[1])
    elif kind == "shutdown":
        return False
    return True


def serve(core, channel: Channel) -> None:
    """The step loop. Blocks on the socket only when the core has nothing to do."""
    last_stats: Optional[object] = None
    running = True
    ranks = core.ranks
    idle_wait = HEARTBEAT_S if ranks is not None else None
    while running or core.has_work():
        if running and channel.poll(0 if core.has_work() else idle_wait):
            for message in channel.recv_ready():
                running = _apply(core, message) and running
            if not running:  # shutdown: abort what is live, finish the loop's last messages
                core.abort(list(core.scheduler.requests))
        elif ranks is not None and not core.has_work():
            ranks.heartbeat()  # idle: a lost rank fails this, not the next request
        if not core.has_work():
            continue
        try:
            out = core.step()
        except Exception as err:  # a bug outside the model step: fail what is live, keep serving
            logger.exception("engine step failed")
            if ranks is not None:
                raise  # the other ranks may be inside the step's collectives: the group cannot go on
            out = core.fail_all(err)
        if not out.is_empty or out.stats != last_stats:
            channel.send(("step", out))
            last_stats = out.stats
    channel.send(("stopped",))


def main(argv: List[str]) -> int:
    channel = Channel(int(argv[1]))
    launch: CoreLaunch = channel.recv()
    root = logging.getLogger()
    root.setLevel(launch.log_level)
    root.addHandler(_ForwardLogs(channel))
    try:
        core, workers = _build_core(launch, channel)
    except BaseException as err:  # bad checkpoint, out of memory, ...: the user must read why
        logger.debug("engine core start-up failed:\n%s", traceback.format_exc())
        channel.send(("failed", type(err).__name__, str(err) or type(err).__name__))
        return 1
    # what is loaded lives as long as the process: out of the collector's reach, full collections
    # (which the per-step objects trigger) do not walk it (half the host time of a batch-256 step)
    gc.freeze()
    channel.send(("ready", core.info))
    try:
        serve(core, channel)
    except (EOFError, OSError):
        pass  # the front end closed the socket: nobody is left to serve
    except Exception as err:  # a tensor-parallel step failed (a rank lost or hung): the group is done
        logger.debug("tensor-parallel step failure:\n%s", traceback.format_exc())
        _die(channel, _lost_rank(workers, wait_s=1.0)
             or f"the tensor-parallel group failed: {type(err).__name__}: {err}")
    if core.ranks is not None:
        _STOPPING.set()
        core.ranks.send_stop()
        from maga_transformer.distributed.worker import stop_processes
        stop_processes(workers)
        core.ranks.close()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main(sys.argv))
