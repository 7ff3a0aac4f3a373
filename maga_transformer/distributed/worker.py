"""Tensor-parallel workers: every rank but 0. A worker loads its shard of the weights, plans and
allocates its KV share and captures its decode graphs in step with rank 0 (engine/core.py's
build_model_runner), then runs every step rank 0 hands it, until rank 0 stops the group.

    python3 -m maga_transformer.distributed.worker     (started by the engine core or by start_server
                                                        on the other machines, never by hand; it
                                                        reads its WorkerLaunch pickled from stdin)

A worker that loses rank 0 (its parent gone, or a collective failing) exits, and the engine core
watches its local workers: one that exits ends the core, so the server fails every request and
reports unhealthy (docs/MultiGPU.md, "Faults").
"""
from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, List, Sequence

logger = logging.getLogger(__name__)

_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_FORMAT = "%(asctime)s %(levelname)s rank %(rank)s %(name)s: %(message)s"


@dataclass
class WorkerLaunch:
    core: object  # engine/core_main.py's CoreLaunch: checkpoint, dtype, engine settings, parallel config
    rank: int
    device: str


def rank_device(base_device: str, local_index: int) -> str:
    """Local rank i runs on GPU i of its machine; on CPU every rank runs on the CPU."""
    return f"cuda:{local_index}" if base_device.startswith("cuda") else "cpu"


def spawn_workers(core_launch, ranks: Sequence[int], first_local_index: int) -> List[subprocess.Popen]:
    """One worker process per rank, rank r on this machine's GPU (r - first rank + first_local_index)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    procs = []
    for offset, rank in enumerate(ranks):
        launch = WorkerLaunch(core_launch, rank, rank_device(core_launch.device, first_local_index + offset))
        proc = subprocess.Popen([sys.executable, "-m", "maga_transformer.distributed.worker"],
                                stdin=subprocess.PIPE, env=env)
        proc.rank = rank  # for the messages that name a lost rank
        proc.stdin.write(pickle.dumps(launch, protocol=5))
        proc.stdin.close()
        procs.append(proc)
    return procs


def watch_processes(procs: Sequence[subprocess.Popen], on_exit: Callable[[subprocess.Popen], None],
                    interval_s: float = 0.2) -> threading.Thread:
    """Call on_exit(proc) (from a daemon thread) as soon as any of procs exits."""
    def watch() -> None:
        while True:
            for proc in procs:
                if proc.poll() is not None:
                    on_exit(proc)
                    return
            time.sleep(interval_s)
    thread = threading.Thread(target=watch, name="rank-watchdog", daemon=True)
    thread.start()
    return thread


def stop_processes(procs: Sequence[subprocess.Popen], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def wait_group(procs: Sequence[subprocess.Popen]) -> int:
    """Wait for a machine's workers; when one exits, the others go too (the group cannot go on
    without it). The exit status is the first one's."""
    first: List[subprocess.Popen] = []
    done = threading.Event()

    def on_exit(proc: subprocess.Popen) -> None:
        first.append(proc)
        done.set()
    watch_processes(procs, on_exit)
    try:
        done.wait()
    except KeyboardInterrupt:
        pass
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    stop_processes(procs, timeout_s=10.0)
    code = first[0].returncode if first else 1
    if code:
        logger.error("tensor-parallel worker %d exited with code %s; this machine's ranks stopped", first[0].pid, code)
    return code


def _exit_with_parent() -> None:
    """A worker whose parent (the engine core, or a machine's launcher) is gone has no one to serve."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        logger.error("the process that started this worker is gone; exiting")
        os._exit(3)
    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def run_worker(launch: WorkerLaunch) -> int:
    import torch

    from maga_transformer.distributed.ranks import RankGroup
    from maga_transformer.engine.core import build_model_runner
    from maga_transformer.model_factory import load_model_weights
    core = launch.core
    device = torch.device(launch.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    ranks = RankGroup(core.parallel, launch.rank, device)
    model = load_model_weights(core.ckpt_path, core.model_type, getattr(torch, core.dtype), device, ranks.tp,
                               core.parallel.load_threads, core.weight_quant)
    runner = build_model_runner(model, core.engine_config, core.max_seq_len, core.block_size, ranks,
                                sends_steps=False, lora=core.lora)
    from maga_transformer.lora.mirror import LoraMirror
    runner.lora_mirror = LoraMirror(model, core.lora)  # LORA_INFO's adapters, in rank 0's slots
    if core.ptuning_dir:  # the same prefix blocks as rank 0's, this rank's heads
        from maga_transformer.ptuning.prefix import prefix_blocks, write_prefix
        from maga_transformer.ptuning.reader import read_prefix_past
        past = read_prefix_past(core.ptuning_dir)
        write_prefix(model, runner.kv_caches, past, prefix_blocks(past.shape[0], core.block_size), core.block_size)
    logger.info("ready: %.1f MiB of weights, %d KV blocks", model.weight_bytes() / 2**20, runner.num_blocks)
    while True:
        step = ranks.recv_step()
        if step is None:
            break
        runner.run(*step)
    ranks.close()
    return 0


def main() -> int:
    launch: WorkerLaunch = pickle.loads(sys.stdin.buffer.read())
    logging.basicConfig(level=launch.core.log_level, format=_FORMAT.replace("%(rank)s", str(launch.rank)))
    _exit_with_parent()
    try:
        return run_worker(launch)
    except Exception:
        logger.exception("tensor-parallel worker failed")
        return 1


if __name__ == "__main__":
    sys.exit(main())
