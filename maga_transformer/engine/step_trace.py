"""An opt-in record of every engine step, for finding where time goes under load.

MAGA_STEP_TRACE=/path/steps.jsonl makes the engine core (in its own process or in-process) append
one JSON line per step: how many requests it took in, when it started and ended (time.monotonic(), one clock for every process of the host, so the lines match a client's
stamps), what the step ran (requests, prefill tokens, decode sequences, whether it was a CUDA-graph
decode, launched ahead or read back), and the queue lengths after it. Off by default: the record
costs a few microseconds per step. benchmark/load_trace.py reads it.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from typing import IO, Optional

ENV_VAR = "MAGA_STEP_TRACE"


@dataclass
class StepRecord:
    added: int  # requests the step took in (sent since the step before began)
    start: float
    end: float
    kind: str  # "run" (planned and run), "launch" (a decode queued ahead), "read_back", "idle"
    requests: int  # requests the step's plan scheduled
    prefill_tokens: int  # tokens of prompt chunks (and recomputes) in the plan
    decode_seqs: int  # sequences given one token past their first output
    graph: bool  # the plan ran as a CUDA-graph decode
    finished: int  # requests that finished in this step
    waiting: int
    running: int
    planned: float  # when the plan was made (the rest of start..end is the model and the outputs)
    executed: float  # when the runner returned: launched, for a step that reads back later; 0 if none ran
    received: float = 0.0  # when the first request the step took in reached the core; 0 if it took none


@dataclass
class StepSummary:
    """What one core.step() ran: EngineCore keeps the last one (core.last_step) for the trace."""
    kind: str = "idle"
    requests: int = 0
    prefill_tokens: int = 0
    decode_seqs: int = 0
    graph: bool = False
    planned: float = 0.0
    executed: float = 0.0

    @classmethod
    def of_plan(cls, kind: str, plan, graph: bool, planned: float) -> "StepSummary":
        summary = cls(kind=kind, requests=len(plan.scheduled), graph=graph, planned=planned,
                      executed=time.monotonic())
        for item in plan.scheduled:
            seqs = item.request.live_seqs
            if item.num_tokens == 1 and seqs[0].num_output_tokens >= 1:
                summary.decode_seqs += len(seqs)
            else:
                summary.prefill_tokens += item.num_tokens * len(seqs)
        return summary


class StepTrace:
    def __init__(self, sink: IO[str]) -> None:
        self.sink = sink

    @classmethod
    def from_env(cls) -> Optional["StepTrace"]:
        path = os.environ.get(ENV_VAR)
        return cls(open(path, "a", buffering=1)) if path else None  # line-buffered: a killed core keeps its lines

    def record(self, core, start: float, added: int, out, received: float = 0.0) -> None:
        """At the end of core.step(): what it ran (core.last_step) and what it changed."""
        plan = core.last_step
        record = StepRecord(added=added, start=start, end=time.monotonic(),
                            kind=plan.kind, requests=plan.requests, prefill_tokens=plan.prefill_tokens,
                            decode_seqs=plan.decode_seqs, graph=plan.graph, finished=len(out.finals),
                            waiting=len(core.scheduler.waiting), running=len(core.scheduler.running),
                            planned=plan.planned, executed=plan.executed, received=received if added else 0.0)
        self.sink.write(json.dumps(asdict(record)) + "\n")

    def close(self) -> None:
        self.sink.close()
