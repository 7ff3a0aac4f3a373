"""Prometheus metrics with vLLM-style names; one registry per app (tests run several apps)."""
from __future__ import annotations

import time
from typing import Optional

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from maga_transformer.engine.frontend import FrontEnd
from maga_transformer.engine.output import RequestOutput

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _EngineState:
    """Read at scrape time: running / waiting requests, KV usage, prefix-cache counters."""

    def __init__(self, engine: FrontEnd) -> None:
        self.engine = engine

    def collect(self):
        stats = self.engine.stats  # as of the core's last step, wherever the core runs
        yield GaugeMetricFamily("vllm:num_requests_running", "Requests in the running batch", stats.num_running)
        yield GaugeMetricFamily("vllm:num_requests_waiting", "Requests waiting to be scheduled", stats.num_waiting)
        yield GaugeMetricFamily("vllm:kv_cache_usage_perc", "Fraction of KV blocks held by live requests",
                                stats.kv_usage)
        yield CounterMetricFamily("vllm:prefix_cache_queries", "Prompt blocks looked up in the prefix cache",
                                  stats.prefix_cache_queries)
        yield CounterMetricFamily("vllm:prefix_cache_hits", "Prompt blocks found in the prefix cache",
                                  stats.prefix_cache_hits)
        yield GaugeMetricFamily("maga:engine_core_healthy", "1 while the engine core serves, 0 once it failed",
                                1.0 if self.engine.healthy else 0.0)


class ServerMetrics:
    def __init__(self, engine: FrontEnd) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineState(engine))
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token", registry=self.registry,
                              buckets=_LATENCY_BUCKETS)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between streamed outputs",
                             registry=self.registry, buckets=_LATENCY_BUCKETS)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency",
                             registry=self.registry, buckets=_LATENCY_BUCKETS)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens processed", registry=self.registry)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated", registry=self.registry)
        self.requests = Counter("vllm:request_success", "Finished requests by reason", ["finished_reason"],
                                registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """Follows one request's outputs and feeds the histograms and counters."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics
        self.start = time.monotonic()
        self.last: Optional[float] = None

    def observe(self, output: RequestOutput) -> None:
        now = time.monotonic()
        if self.last is None:
            self.metrics.ttft.observe(now - self.start)
        else:
            self.metrics.itl.observe(now - self.last)
        self.last = now
        if output.finished:
            self.metrics.e2e.observe(now - self.start)
            self.metrics.prompt_tokens.inc(output.aux_info.input_len)
            self.metrics.generation_tokens.inc(sum(len(o.token_ids) for o in output.outputs))
            reason = output.outputs[0].finish_reason.value if output.outputs and output.outputs[0].finish_reason \
                else "unknown"
            self.metrics.requests.labels(finished_reason=reason).inc()
