"""python3 -m maga_transformer.start_server: the HTTP server, configured by environment variables.

Logs go to files under LOG_PATH (default ./logs: main.log and access.log, as rtp-llm keeps them)
unless FT_SERVER_TEST=1 sends them to the terminal. SIGTERM or Ctrl-C stop accepting connections,
let in-flight requests finish for up to GRACEFUL_SHUTDOWN_TIMEOUT seconds, then stop the engine;
after that uvicorn re-raises the signal, so the exit status says the process ended on SIGTERM.
"""
from __future__ import annotations

import gc
import logging
import os
import sys

from maga_transformer.config.server_config import ServerConfig

logger = logging.getLogger("maga_transformer.start_server")
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(config: ServerConfig) -> None:
    root = logging.getLogger()
    root.setLevel(config.log_level)
    access = logging.getLogger("maga_transformer.access")
    access.setLevel(logging.INFO)  # access lines are kept at any PY_LOG_LEVEL
    if config.log_to_terminal:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT))
        root.addHandler(handler)
        return
    os.makedirs(config.log_dir, exist_ok=True)
    main_log = logging.FileHandler(os.path.join(config.log_dir, "main.log"))
    main_log.setFormatter(logging.Formatter(_FORMAT))
    root.addHandler(main_log)
    access_log = logging.FileHandler(os.path.join(config.log_dir, "access.log"))
    access_log.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(access_log)
    access.propagate = False  # keep main.log for the server's own messages
    errors = logging.StreamHandler(sys.stderr)  # problems still reach the terminal
    errors.setLevel(logging.ERROR)
    errors.setFormatter(logging.Formatter(_FORMAT))
    root.addHandler(errors)


def describe_layout(engine) -> str:
    """Device, dtype, KV tokens and where the engine core runs, in one line."""
    core = f"engine core in process {engine.pid}" if hasattr(engine, "pid") else "engine core in-process"
    return f"{engine.info.description}; {core}, front end in process {os.getpid()}"


def serve_worker_ranks() -> int:
    """A machine (or torchrun process) of a tensor-parallel group whose ranks do not start at 0: no
    HTTP server, only its ranks' workers, until the first machine stops the group."""
    from maga_transformer.distributed import worker
    from maga_transformer.model_factory import ModelFactory
    try:
        launch = ModelFactory.worker_launch_from_env()
    except ValueError as err:
        logger.error("cannot start: %s", err)
        sys.stderr.write(f"cannot start: {err}\n")
        return 2
    parallel = launch.parallel
    if parallel.torchrun:  # torchrun started this process as one rank on GPU LOCAL_RANK
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return worker.run_worker(worker.WorkerLaunch(launch, parallel.world_rank,
                                                     worker.rank_device(launch.device, local_rank)))
    ranks = range(parallel.world_rank, parallel.world_rank + parallel.local_world_size)
    sys.stderr.write(f"maga_transformer: tensor-parallel ranks {ranks.start}..{ranks.stop - 1} of "
                     f"{parallel.world_size}, rendezvous {parallel.master_addr}:{parallel.master_port}\n")
    procs = worker.spawn_workers(launch, ranks, 0)
    return worker.wait_group(procs)


def main() -> int:
    try:
        server_config = ServerConfig.from_env()
        from maga_transformer.distributed.parallel_config import ParallelConfig
        parallel = ParallelConfig.from_env(os.environ)
    except ValueError as err:
        sys.stderr.write(f"cannot start: {err}\n")
        return 2
    configure_logging(server_config)
    if parallel.enabled and not parallel.serves_http:
        return serve_worker_ranks()
    try:
        import uvicorn

        from maga_transformer.model_factory import ModelFactory
        from maga_transformer.server.app import create_app
        model = ModelFactory.create_from_env()
    except ValueError as err:  # a bad environment variable or checkpoint: say which, do not start
        logger.error("cannot start: %s", err)
        sys.stderr.write(f"cannot start: {err}\n")
        return 2
    except RuntimeError as err:  # the engine core could not start (out of memory, a crash): its message
        logger.error("cannot start: %s", err)
        sys.stderr.write(f"cannot start: {err}\n")
        return 1
    # Everything loaded so far (torch, transformers, the model) lives as long as the process; moving
    # it out of the collector's reach keeps full collections, which the engine's per-step objects
    # trigger, from walking millions of objects (measured: half the host time of a batch-256 step).
    gc.freeze()
    app = create_app(model, server_config, stop_model_on_shutdown=True)
    where = "the terminal" if server_config.log_to_terminal else os.path.abspath(server_config.log_dir)
    layout = describe_layout(model.engine)
    logger.warning("serving %s: %s", server_config.model_name, layout)  # kept in main.log at any PY_LOG_LEVEL
    # the one line a user starting the server by hand needs, whatever the log settings
    sys.stderr.write(f"maga_transformer: serving {server_config.model_name} ({layout}) on "
                     f"http://{server_config.host}:{server_config.port} (logs: {where})\n")
    uvicorn.run(app, host=server_config.host, port=server_config.port, log_config=None, access_log=False,
                log_level=server_config.log_level.lower(),
                timeout_graceful_shutdown=server_config.graceful_shutdown_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
