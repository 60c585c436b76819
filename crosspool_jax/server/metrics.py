"""Prometheus metrics of the server, held in a registry owned by one `ServerMetrics` object.

Two kinds of series:

- events the server sees (requests by model and status, time to first token, time between
  tokens, tokens in and out): counters and histograms updated as they happen, from the HTTP
  event loop or the engine thread (prometheus-client metrics are thread-safe);
- engine state (KV pages used by model, weights resident by model, swaps, preemptions, queue
  depth): read at scrape time from the latest `EngineStats` snapshot through a collector, so
  a scrape never touches the engine itself.
"""
from __future__ import annotations

from typing import Callable, Optional

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# Latency buckets (seconds) wide enough for a CPU test run and a GPU deployment alike.
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TBT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)

# What a stats source returns: the latest engine stats snapshot (None before the first one)
# and the number of requests the server has accepted and not yet finished.
StatsSource = Callable[[], tuple[Optional[object], int]]


class ServerMetrics:
    """The server's metrics and the registry they live in (no module-level state)."""

    def __init__(self, namespace: str = "crosspool"):
        self.namespace = namespace
        self.registry = CollectorRegistry(auto_describe=True)
        self._requests = Counter(
            f"{namespace}_requests", "Finished HTTP requests by model and status code.",
            ["model", "status"], registry=self.registry)
        self._ttft = Histogram(
            f"{namespace}_time_to_first_token_seconds",
            "Time from a request's arrival to its first generated token.",
            ["model"], buckets=_TTFT_BUCKETS, registry=self.registry)
        self._tbt = Histogram(
            f"{namespace}_time_between_tokens_seconds",
            "Time between consecutive generated tokens of a request (inter-token latency).",
            ["model"], buckets=_TBT_BUCKETS, registry=self.registry)
        self._prompt_tokens = Counter(
            f"{namespace}_prompt_tokens", "Prompt tokens of finished requests.",
            ["model"], registry=self.registry)
        self._generation_tokens = Counter(
            f"{namespace}_generation_tokens", "Generated tokens of finished requests.",
            ["model"], registry=self.registry)
        self._engine_collector = _EngineStatsCollector(namespace)
        self.registry.register(self._engine_collector)

    def set_stats_source(self, source: StatsSource) -> None:
        """Where scrapes read engine state from (the async engine's snapshot)."""
        self._engine_collector.source = source

    def count_request(self, model: str, status: int | str) -> None:
        self._requests.labels(model=model, status=str(status)).inc()

    def observe_ttft(self, model: str, seconds: float) -> None:
        self._ttft.labels(model=model).observe(seconds)

    def observe_tbt(self, model: str, seconds: float, num_tokens: int = 1) -> None:
        """`num_tokens` tokens arrived together after `seconds`: each counts seconds/num_tokens."""
        child = self._tbt.labels(model=model)
        per_token = seconds / max(num_tokens, 1)
        for _ in range(num_tokens):
            child.observe(per_token)

    def count_tokens(self, model: str, prompt_tokens: int, generation_tokens: int) -> None:
        self._prompt_tokens.labels(model=model).inc(prompt_tokens)
        self._generation_tokens.labels(model=model).inc(generation_tokens)

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _EngineStatsCollector:
    """Turns the latest `EngineStats` snapshot into gauges and counters at scrape time."""

    def __init__(self, namespace: str):
        self.namespace = namespace
        self.source: Optional[StatsSource] = None

    def describe(self):
        return []

    def collect(self):
        ns = self.namespace
        stats, in_flight = self.source() if self.source is not None else (None, 0)
        in_flight_g = GaugeMetricFamily(
            f"{ns}_requests_in_flight", "Requests accepted by the server and not yet finished.")
        in_flight_g.add_metric([], in_flight)
        yield in_flight_g
        if stats is None:
            return
        waiting = GaugeMetricFamily(f"{ns}_queue_depth", "Requests waiting in the engine's queue.")
        waiting.add_metric([], getattr(stats, "num_waiting", 0))
        yield waiting
        running = GaugeMetricFamily(f"{ns}_requests_running", "Requests running in the engine.")
        running.add_metric([], getattr(stats, "num_running", 0))
        yield running
        pages_total = GaugeMetricFamily(f"{ns}_kv_pages_total", "Pages of the global KV pool.")
        pages_total.add_metric([], getattr(stats, "kv_pages_total", 0))
        yield pages_total
        pages_used = GaugeMetricFamily(
            f"{ns}_kv_pages_used", "KV pool pages in use, by model.", labels=["model"])
        for model, pages in sorted((getattr(stats, "kv_pages_used_by_model", None) or {}).items()):
            pages_used.add_metric([model], pages)
        yield pages_used
        resident = GaugeMetricFamily(
            f"{ns}_weights_resident", "1 if the model's weights are on device, 0 if swapped out.",
            labels=["model"])
        weights_bytes = GaugeMetricFamily(
            f"{ns}_weights_bytes", "Bytes of the model's weights.", labels=["model"])
        for model, info in sorted((getattr(stats, "models", None) or {}).items()):
            resident.add_metric([model], 1.0 if info.get("resident") else 0.0)
            weights_bytes.add_metric([model], float(info.get("weights_bytes", 0)))
        yield resident
        yield weights_bytes
        for name, field, doc in (
                ("swaps_in", "swaps_in", "Model weights swapped into device memory."),
                ("swaps_out", "swaps_out", "Model weights swapped out to host memory."),
                ("preemptions", "num_preemptions", "Requests preempted by the scheduler."),
                ("xla_compiles", "compiles", "XLA executables built in this process (compiled or read from the "
                                             "persistent compilation cache); flat while serving after warm-up.")):
            family = CounterMetricFamily(f"{ns}_{name}", doc)
            family.add_metric([], getattr(stats, field, 0))
            yield family
