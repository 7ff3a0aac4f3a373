"""The front end of the process mode (the default): the engine core runs in a child process
(engine/core_main.py) and this object is what the server and the Pipeline call.

One reader thread receives the core's step messages and turns them into outputs; callers' threads
send requests and aborts. Faults: if the core process exits, or sends nothing for `step_timeout_s`
while requests are live (a hang), every live request fails at once with the reason, `healthy`
turns False, and the log says what happened; new requests are refused with EngineUnavailable.
Start-up errors in the core (bad checkpoint, out of memory) are raised here with their message.
"""
from __future__ import annotations

import atexit
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import weakref
from typing import List, Optional, Tuple

from maga_transformer.engine.core_main import CoreLaunch
from maga_transformer.engine.frontend import FrontEnd
from maga_transformer.engine.ipc import Channel, describe_exit
from maga_transformer.engine.limits import PromptLayoutFn, RequestLimits
from maga_transformer.engine.messages import EngineInfo, EngineRequest
from maga_transformer.lora.messages import LoraCommand

logger = logging.getLogger(__name__)
core_logger = logging.getLogger("maga_transformer.engine_core")

_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_STARTUP_ERRORS = {"ValueError": ValueError, "TypeError": ValueError, "FileNotFoundError": ValueError}


class EngineUnavailable(RuntimeError):
    """The engine core is not running (it exited, hung, or was stopped)."""




def _spawn(launch: CoreLaunch) -> Tuple[subprocess.Popen, Channel]:
    ours, theirs = socket.socketpair()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
    # its own session: a Ctrl-C in the terminal reaches the front end, which drains and then stops
    # the core; a front end that dies closes the socket, which ends the core
    proc = subprocess.Popen([sys.executable, "-m", "maga_transformer.engine.core_main", str(theirs.fileno())],
                            pass_fds=[theirs.fileno()], env=env, start_new_session=True)
    theirs.close()
    channel = Channel(ours.detach())
    channel.send(launch)
    return proc, channel


def _wait_ready(proc: subprocess.Popen, channel: Channel):
    """The core's EngineInfo, or the start-up error it reported, raised here."""
    while True:
        if not channel.poll(0.5):
            if proc.poll() is not None:
                raise RuntimeError(f"the engine core process {describe_exit(proc.returncode)} during start-up "
                                   "(its output above says why)")
            continue
        try:
            message = channel.recv()
        except (EOFError, OSError):
            proc.wait(timeout=30)
            raise RuntimeError(f"the engine core process {describe_exit(proc.returncode)} during start-up "
                               "(its output above says why)") from None
        if message[0] == "log":
            core_logger.log(message[1], "%s", message[3])
        elif message[0] == "failed":
            proc.wait(timeout=30)
            raise _STARTUP_ERRORS.get(message[1], RuntimeError)(f"engine core start-up failed: {message[2]}")
        elif message[0] == "fatal":  # a tensor-parallel worker failed while the group started
            proc.wait(timeout=30)
            raise RuntimeError(f"engine core start-up failed: {message[1]}")
        elif message[0] == "ready":
            return message[1]


class StartingCore:
    """An engine-core process that is loading its weights; the front end meanwhile loads the
    tokenizer, then `connect` waits for the core to be ready."""

    def __init__(self, launch: CoreLaunch) -> None:
        self.proc, self.channel = _spawn(launch)

    def connect(self, tokenizer, prompt_layout: PromptLayoutFn, step_timeout_s: float = 120.0) -> "EngineProcessClient":
        try:
            info = _wait_ready(self.proc, self.channel)
        except BaseException:
            self.kill()
            raise
        return EngineProcessClient(tokenizer, self.proc, self.channel, info, prompt_layout, step_timeout_s)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


class EngineProcessClient(FrontEnd):
    def __init__(self, tokenizer, proc: subprocess.Popen, channel: Channel, info: EngineInfo,
                 prompt_layout: PromptLayoutFn, step_timeout_s: float = 120.0) -> None:
        self._proc, self._channel = proc, channel
        super().__init__(tokenizer, info, RequestLimits(info, prompt_layout))
        self.step_timeout_s = step_timeout_s
        self._failure: Optional[str] = None  # why the core is gone, once it is
        self._closing = False
        self._last_message = time.monotonic()
        self._reader = threading.Thread(target=self._read_loop, name="maga-engine-reader", daemon=True)
        self._reader.start()
        atexit.register(_stop_at_exit, weakref.ref(self))
        logger.info("engine core in process %d: %s", self._proc.pid, info.description)

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def healthy(self) -> bool:
        return self._failure is None and not self._closing

    @property
    def failure(self) -> Optional[str]:
        return self._failure

    def has_work(self) -> bool:
        return self.num_live_requests > 0

    def start(self) -> None:
        """The core runs from construction on (kept for the in-process Engine's interface)."""

    def run_until_idle(self, timeout_s: float = 600.0) -> None:
        """Wait until every request sent has finished (the core steps on its own)."""
        deadline = time.monotonic() + timeout_s
        while self.has_work():
            if time.monotonic() > deadline:
                raise RuntimeError("engine did not become idle")
            time.sleep(0.001)

    # ---- to the core ----------------------------------------------------------------------------
    def _check_alive(self) -> None:
        if not self.healthy:
            raise EngineUnavailable(f"engine core is not running: {self.failure or 'the engine was stopped'}")

    def _send(self, message) -> None:
        try:
            self._channel.send(message)
        except OSError as err:
            self._on_core_gone(f"the engine core process cannot be reached ({err})")

    def _submit(self, requests: List[EngineRequest]) -> None:
        if not self.has_work():
            self._last_message = time.monotonic()  # the hang clock starts with the first live request
        self._send(("add", requests))

    def _send_aborts(self, request_ids: List[str]) -> None:
        if self.healthy:
            self._send(("abort", request_ids))

    def _send_stops(self, stops: List[Tuple[str, int]]) -> None:
        if self.healthy:
            self._send(("stop", stops))

    def _send_lora(self, command: LoraCommand) -> None:
        self._check_alive()
        self._send(("lora", command))

    def _send_tasks(self, prompts) -> None:
        self._send(("tasks", prompts))

    # ---- from the core --------------------------------------------------------------------------
    def _read_loop(self) -> None:
        channel = self._channel
        while True:
            try:
                if not channel.poll(1.0):
                    self._check_hang()
                    if self.failure is not None:
                        return
                    continue
                message = channel.recv()
            except (EOFError, OSError):
                if not self._closing:
                    self._on_core_gone(f"the engine core process {describe_exit(self._proc.wait(timeout=30))}")
                return
            self._last_message = time.monotonic()
            kind = message[0]
            if kind == "step":
                self._handle_step(message[1])
            elif kind == "log":
                core_logger.log(message[1], "%s", message[3])
            elif kind == "fatal":  # the core is about to exit, and says why (a lost tensor-parallel rank)
                self._on_core_gone(message[1])
            elif kind == "stopped":
                return

    def _handle_step(self, step) -> None:
        try:
            self.on_core_output(step)
        except Exception:  # a caller's sink failed: that must not stop the outputs of everyone else
            logger.exception("handing out the outputs of an engine step failed")

    def _check_hang(self) -> None:
        if self._proc.poll() is not None and not self._closing:
            self._on_core_gone(f"the engine core process {describe_exit(self._proc.returncode)}")
        elif self.has_work() and time.monotonic() - self._last_message > self.step_timeout_s:
            self._on_core_gone(f"the engine core sent nothing for {self.step_timeout_s:.0f} s with requests live "
                               "(ENGINE_STEP_TIMEOUT_S); it was stopped")
            self._kill()

    def _on_core_gone(self, reason: str) -> None:
        if self._failure is not None:
            return
        self._failure = reason
        logger.error("%s: failing %d live request(s); the server reports unhealthy", reason, self.num_live_requests)
        self.fail_all(f"engine core failed: {reason}")

    # ---- shutdown -------------------------------------------------------------------------------
    def stop(self, timeout_s: float = 30.0) -> None:
        """Abort what is live, let the core finish its last step, then end the process."""
        if self._closing:
            return
        self._closing = True
        if self.failure is None:
            try:
                self._channel.send(("shutdown",))
            except OSError:
                pass
            self._reader.join(timeout=timeout_s)
        try:
            self._proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            logger.warning("the engine core did not stop within %.0f s; killing it", timeout_s)
            self._kill()
        self._channel.close()

    def _kill(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=30)


def _stop_at_exit(ref) -> None:
    client = ref()
    if client is not None:
        client.stop(timeout_s=5.0)
