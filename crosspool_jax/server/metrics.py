"""Prometheus metrics of the server, held in a registry owned by one `ServerMetrics` object.

Request metrics carry vLLM's names and its `model_name` label, so vLLM's Grafana dashboard
reads them: `vllm:time_to_first_token_seconds`, `vllm:inter_token_latency_seconds`,
`vllm:time_per_output_token_seconds`, `vllm:e2e_request_latency_seconds`, and the phases of
a finished request as vLLM splits them (`vllm:request_queue_time_seconds`: arrival in the
engine to first scheduled; `vllm:request_prefill_time_seconds`: first scheduled to first
token; `vllm:request_decode_time_seconds`: first to last token;
`vllm:request_inference_time_seconds`: first scheduled to last token) (histograms); the
length histograms `vllm:request_prompt_tokens`, `vllm:request_generation_tokens` (per
completion) and `vllm:request_max_num_generation_tokens` (the longest of a request's n);
`vllm:prompt_tokens_total`, `vllm:generation_tokens_total`, `vllm:request_success_total`
(by `finished_reason`), `vllm:num_preemptions_total`, `vllm:prefix_cache_queries_total` and
`vllm:prefix_cache_hits_total` (prompt tokens of admitted requests, and of them those the
prefix cache held), and the gauges
`vllm:num_requests_running` / `vllm:num_requests_waiting` (the scheduler's sequences of the
model, from `EngineStats.requests_by_model`) and `vllm:kv_cache_usage_perc` (the model's
share of the one KV pool, in [0, 1]; `vllm:gpu_cache_usage_perc` is the older name of the
same gauge).

The engine's own extras keep the `crosspool_` prefix: HTTP requests by model and status
(`crosspool_requests_total`), requests in flight, KV pages used by model and in the pool,
weights residency and bytes by model, swaps in and out, XLA compiles
(`crosspool_xla_compiles_total`, flat while serving after warm-up), the engine steps
(`crosspool_engine_steps_total`) and of them those that async scheduling dispatched ahead
(`crosspool_async_continuations_total`).

Events are recorded as they happen (from the event loop or the engine thread;
prometheus-client metrics are thread-safe); engine state is read at scrape time from the
latest `EngineStats` snapshot through a collector, so a scrape never touches the engine.
"""
from __future__ import annotations

from typing import Callable, Optional

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# Latency buckets (seconds) wide enough for a CPU test run and a GPU deployment alike.
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TBT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)
_PHASE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
                  300.0, 600.0)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)
VLLM = "vllm:"

# What a stats source returns: the latest engine stats snapshot (None before the first one)
# and the number of sequences the server has accepted and not yet finished.
StatsSource = Callable[[], tuple[Optional[object], int]]


class ServerMetrics:
    """The server's metrics and the registry they live in (no module-level state)."""

    def __init__(self, namespace: str = "crosspool"):
        self.namespace = namespace
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._requests = Counter(f"{namespace}_requests", "Finished HTTP requests by model and status code.",
                                 ["model", "status"], registry=r)
        self._ttft = Histogram(f"{VLLM}time_to_first_token_seconds",
                               "Time from a request's arrival to its first generated token.",
                               ["model_name"], buckets=_TTFT_BUCKETS, registry=r)
        self._itl = Histogram(f"{VLLM}inter_token_latency_seconds",
                              "Time between consecutive generated tokens of a request.",
                              ["model_name"], buckets=_TBT_BUCKETS, registry=r)
        self._tpot = Histogram(f"{VLLM}time_per_output_token_seconds",
                               "Per finished request: (finish - first token) / (generated tokens - 1).",
                               ["model_name"], buckets=_TBT_BUCKETS, registry=r)
        self._e2e = Histogram(f"{VLLM}e2e_request_latency_seconds",
                              "Time from a request's arrival to its last token.",
                              ["model_name"], buckets=_E2E_BUCKETS, registry=r)
        self._prompt_tokens = Counter(f"{VLLM}prompt_tokens", "Prompt tokens of finished requests.",
                                      ["model_name"], registry=r)
        self._generation_tokens = Counter(f"{VLLM}generation_tokens", "Generated tokens of finished requests.",
                                          ["model_name"], registry=r)
        self._success = Counter(f"{VLLM}request_success", "Finished completions by finish reason.",
                                ["model_name", "finished_reason"], registry=r)
        self._phases = {phase: Histogram(f"{VLLM}request_{phase}_time_seconds", doc, ["model_name"],
                                         buckets=_PHASE_BUCKETS, registry=r)
                        for phase, doc in (
                            ("queue", "Time from a request's arrival in the engine to its first scheduling."),
                            ("prefill", "Time from a request's first scheduling to its first token."),
                            ("decode", "Time from a request's first token to its last."),
                            ("inference", "Time from a request's first scheduling to its last token."))}
        self._lengths = {name: Histogram(f"{VLLM}request_{name}", doc, ["model_name"], buckets=_TOKEN_BUCKETS,
                                         registry=r)
                         for name, doc in (
                             ("prompt_tokens", "Prompt tokens of each finished request."),
                             ("generation_tokens", "Generated tokens of each finished completion."),
                             ("max_num_generation_tokens", "Generated tokens of the longest completion of "
                                                           "each finished request."))}
        self._engine_collector = _EngineStatsCollector(namespace)
        r.register(self._engine_collector)

    def set_stats_source(self, source: StatsSource) -> None:
        """Where scrapes read engine state from (the async engine's snapshot)."""
        self._engine_collector.source = source

    def count_request(self, model: str, status: int | str) -> None:
        self._requests.labels(model=model, status=str(status)).inc()

    def observe_ttft(self, model: str, seconds: float) -> None:
        self._ttft.labels(model_name=model).observe(seconds)

    def observe_tbt(self, model: str, seconds: float, num_tokens: int = 1) -> None:
        """`num_tokens` tokens arrived together after `seconds`: each counts seconds/num_tokens."""
        child = self._itl.labels(model_name=model)
        per_token = seconds / max(num_tokens, 1)
        for _ in range(num_tokens):
            child.observe(per_token)

    def observe_finished(self, model: str, *, prompt_tokens: int, generation_tokens: list[int],
                         finish_reasons: list[str], e2e_s: float, decode_s: Optional[float],
                         queue_s: Optional[float] = None, prefill_s: Optional[float] = None) -> None:
        """A request finished: its prompt tokens, each completion's generated tokens and finish
        reason, end-to-end latency, its queue time and prefill time (None when it never got
        there), and the time from its first to its last token (None without a token)."""
        total = sum(generation_tokens)
        self._prompt_tokens.labels(model_name=model).inc(prompt_tokens)
        self._generation_tokens.labels(model_name=model).inc(total)
        self._lengths["prompt_tokens"].labels(model_name=model).observe(prompt_tokens)
        for n in generation_tokens:
            self._lengths["generation_tokens"].labels(model_name=model).observe(n)
        self._lengths["max_num_generation_tokens"].labels(model_name=model).observe(max(generation_tokens, default=0))
        for reason in finish_reasons:
            self._success.labels(model_name=model, finished_reason=reason or "unknown").inc()
        self._e2e.labels(model_name=model).observe(e2e_s)
        phases = {"queue": queue_s, "prefill": prefill_s, "decode": decode_s,
                  "inference": None if prefill_s is None or decode_s is None else prefill_s + decode_s}
        for phase, seconds in phases.items():
            if seconds is not None:
                self._phases[phase].labels(model_name=model).observe(max(seconds, 0.0))
        if decode_s is not None and total > 1:
            self._tpot.labels(model_name=model).observe(decode_s / (total - 1))

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
            f"{ns}_requests_in_flight", "Sequences accepted by the server and not yet finished.")
        in_flight_g.add_metric([], in_flight)
        yield in_flight_g
        if stats is None:
            return
        running = GaugeMetricFamily(f"{VLLM}num_requests_running", "Sequences the scheduler is running "
                                    "(prefilling or decoding).", labels=["model_name"])
        waiting = GaugeMetricFamily(f"{VLLM}num_requests_waiting", "Sequences waiting in the scheduler's "
                                    "queue (new or preempted).", labels=["model_name"])
        for model, (n_running, n_waiting) in sorted((getattr(stats, "requests_by_model", None) or {}).items()):
            running.add_metric([model], n_running)
            waiting.add_metric([model], n_waiting)
        yield running
        yield waiting
        pages_total = getattr(stats, "kv_pages_total", 0)
        pages_total_g = GaugeMetricFamily(f"{ns}_kv_pages_total", "Pages of the global KV pool.")
        pages_total_g.add_metric([], pages_total)
        yield pages_total_g
        used = getattr(stats, "kv_pages_used_by_model", None) or {}
        pages_used = GaugeMetricFamily(f"{ns}_kv_pages_used", "KV pool pages in use, by model.", labels=["model"])
        for model, pages in sorted(used.items()):
            pages_used.add_metric([model], pages)
        yield pages_used
        for name in ("kv_cache_usage_perc", "gpu_cache_usage_perc"):
            usage = GaugeMetricFamily(f"{VLLM}{name}", "The model's share of the KV pool in use (1 = the "
                                      "whole pool).", labels=["model_name"])
            for model, pages in sorted(used.items()):
                usage.add_metric([model], pages / pages_total if pages_total else 0.0)
            yield usage
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
        preemptions = CounterMetricFamily(f"{VLLM}num_preemptions", "Requests preempted by the scheduler.")
        preemptions.add_metric([], getattr(stats, "num_preemptions", 0))
        yield preemptions
        for name, field, doc in (
                ("prefix_cache_queries", "prefix_cache_queries", "Prompt tokens of admitted requests looked up in "
                                                                 "the prefix cache."),
                ("prefix_cache_hits", "prefix_cache_hits", "Of them, tokens found computed in the prefix cache.")):
            family = CounterMetricFamily(f"{VLLM}{name}", doc)
            family.add_metric([], getattr(stats, field, 0))
            yield family
        for name, field, doc in (
                ("swaps_in", "swaps_in", "Model weights swapped into device memory."),
                ("swaps_out", "swaps_out", "Model weights swapped out to host memory."),
                ("xla_compiles", "compiles", "XLA executables built in this process (compiled or read from the "
                                             "persistent compilation cache); flat while serving after warm-up."),
                ("engine_steps", "engine_steps", "Engine steps that scheduled work."),
                ("async_continuations", "continuations", "Engine steps dispatched before the previous step's "
                                                         "tokens reached the host (async scheduling).")):
            family = CounterMetricFamily(f"{ns}_{name}", doc)
            family.add_metric([], getattr(stats, field, 0))
            yield family
