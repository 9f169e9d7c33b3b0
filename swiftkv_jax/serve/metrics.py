"""GET /metrics: the server's Prometheus metrics (prometheus-client), one registry per app.

Counters and latency histograms are observed as requests end; the engine's state (requests
running and waiting, KV blocks, prefix-cache hit rate) is read from `engine.stats()` at scrape
time. Names follow vLLM's (`vllm:num_requests_running` -> `swiftkv_num_requests_running`), so
dashboards made for it need only the prefix changed.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..runtime.handle import RequestHandle

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _EngineState:
    """A collector that reads the engine's stats on each scrape."""

    GAUGES = (("num_requests_running", "running", "Requests in a slot (prefilling or decoding)."),
              ("num_requests_waiting", "waiting", "Requests queued for a slot."),
              ("kv_blocks_used", "blocks_in_use", "KV blocks held by running requests."),
              ("kv_blocks_cached", "blocks_cached", "KV blocks free to reuse but holding a cached prefix."),
              ("kv_blocks_free", "blocks_free", "KV blocks holding nothing."),
              ("kv_blocks_total", "blocks_total", "KV blocks in the pool."),
              ("prefix_cache_hit_rate", "prefix_hit_rate", "Share of prompt tokens read from the prefix cache."))

    def __init__(self, stats: Callable[[], dict[str, Any]]):
        self._stats = stats

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        stats = self._stats()
        for name, key, doc in self.GAUGES:
            yield GaugeMetricFamily(f"swiftkv_{name}", doc, value=float(stats[key] or 0.0))
        ended = CounterMetricFamily("swiftkv_engine_requests_finished", "Requests the engine ended, "
                                    "by why (cancelled: the client went away or a stop string).",
                                    labels=["reason"])
        for reason, n in stats["finished"].items():
            ended.add_metric([reason], n)
        yield ended


class Metrics:
    """The app's metrics; `observe(handle, ...)` once per finished request."""

    def __init__(self, stats: Callable[[], dict[str, Any]]):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineState(stats))
        r = self.registry
        self.prompt_tokens = Counter("swiftkv_prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.cached_tokens = Counter("swiftkv_prompt_tokens_cached",
                                     "Prompt tokens read from the prefix cache.", registry=r)
        self.generation_tokens = Counter("swiftkv_generation_tokens", "Tokens generated.", registry=r)
        self.requests = Counter("swiftkv_request_success", "Requests finished, by finish reason.",
                                ["finished_reason"], registry=r)
        self.errors = Counter("swiftkv_request_errors", "Requests answered with an error, by status.",
                              ["status"], registry=r)
        self.ttft = Histogram("swiftkv_time_to_first_token_seconds", "Submit to first token.",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("swiftkv_time_per_output_token_seconds",
                              "Mean time between output tokens of a request.", buckets=LATENCY_BUCKETS,
                              registry=r)
        self.e2e = Histogram("swiftkv_e2e_request_latency_seconds", "Submit to last token.",
                             buckets=LATENCY_BUCKETS, registry=r)

    def observe(self, handle: RequestHandle, reason: str, completion_tokens: int) -> None:
        self.prompt_tokens.inc(len(handle.prompt))
        self.cached_tokens.inc(handle.cached_tokens)
        self.generation_tokens.inc(completion_tokens)
        self.requests.labels(reason).inc()
        if handle.ttft_s is not None:
            self.ttft.observe(handle.ttft_s)
            self.e2e.observe((handle.finished_at or handle.token_times[-1]) - handle.submitted_at)
        if handle.tpot_s is not None:
            self.tpot.observe(handle.tpot_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
