"""Step costs: how long each model's step program takes per token bucket, measured on this engine.

The scheduler sizes the prefill of a step that carries decodes to `EngineConfig.tbt_budget_ms`
from these numbers (`scheduler.ModelStepCost`). They are measured, not modelled: for every
token bucket T of a model's shape menu, one prefill step of just over the next smaller bucket
up to T tokens (as many sequences as the model's context and the menu's rows need) runs
through the engine's own runner (`runner.run`: host inputs, dispatch, device, results back,
what an engine step pays per model), once untimed and then `repeats` times; the median is
the bucket's time. The pages come from the KV manager like a request's and go back after.
A bucket the pool cannot hold is read off the line base + per_token * T fitted to the
measured ones (through the origin from a single point), and the times are made
non-decreasing (a larger program is never cheaper). Models with the same program (config,
shape menu and device) are measured once.

The cost is a function of a step's tokens only, measured at short contexts (chunks from
position 0, the smallest page-table bucket): a step whose sequences attend long contexts
(decodes deep into a conversation, the late chunks of a long prompt) takes longer than its
estimate. Run after the warm-up, so nothing is compiled in a timed run.
"""
from __future__ import annotations

import logging
import statistics
import time
from typing import Optional

from crosspool_jax.engine.request import Request
from crosspool_jax.engine.scheduler import ModelStepCost, ScheduledChunk
from crosspool_jax.engine.step_plan import ModelStep
from crosspool_jax.runtime.sampling_metadata import SamplingRow
from crosspool_jax.sampling_params import SamplingParams

log = logging.getLogger(__name__)

_PARAMS = SamplingParams(max_tokens=1)          # the general sampling program (no greedy shortcut)


def measure_step_costs(registry, runner, kv_manager, *, repeats: int = 3) -> dict[str, ModelStepCost]:
    """{model: its step cost} of every model of the registry (acquired while measured)."""
    by_program: dict = {}
    costs = {}
    for name in registry.names:
        entry = registry.get(name)
        key = registry.program_key(name)
        if key not in by_program:
            weights = registry.acquire(name)
            try:
                by_program[key] = measure_model(runner, kv_manager, entry, weights, repeats=repeats)
            finally:
                registry.release(name)
        costs[name] = by_program[key]
    return costs


def measure_model(runner, kv_manager, entry, weights, *, repeats: int = 3) -> ModelStepCost:
    """The step cost of model `entry` (a `ModelEntry`) with its acquired `weights`."""
    menu = entry.menu
    lower = 0
    measured: list[Optional[float]] = []
    for T in menu.token_buckets:
        measured.append(_time_bucket(runner, kv_manager, entry, weights, lower, T, repeats))
        lower = T
    return _cost(menu.token_buckets, measured)


def _time_bucket(runner, kv, entry, weights, lower: int, T: int, repeats: int) -> Optional[float]:
    """Median seconds of `runner.run` on a prefill of (lower, T] tokens, or None if the pool cannot hold it."""
    menu = entry.menu
    vocab = entry.config.vocab_size
    requests, chunks = [], []
    left, rows, max_len = T, min(T, menu.max_seqs), kv.geometry(entry.name).max_model_len
    try:
        while left > 0 and len(chunks) < rows:
            n = min(left, max_len)
            ids = [(7 * i + 1) % vocab for i in range(n)]
            request = Request(f"step-cost-{entry.name}-{T}-{len(chunks)}", entry.name, ids, _PARAMS)
            if not kv.allocate_slots(request, n):
                break
            requests.append(request)
            chunks.append(ScheduledChunk(request, 0, n, ids, samples=True, num_steps=1,
                                         page_table=kv.page_table_array(request)))
            left -= n
        if T - left <= lower:
            return None
        step = ModelStep(entry.name, entry.config, entry.tokens_per_page, menu, weights, chunks,
                         [SamplingRow(_PARAMS, 0, 0, entry.eos_token_ids, c.token_ids) for c in chunks],
                         [list(entry.eos_token_ids)] * len(chunks), [1] * len(chunks))
        runner.run(step)                            # untimed: first-use costs (and a compile if not warmed up)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            runner.run(step)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)
    finally:
        for request in requests:
            kv.free(request)


def _cost(buckets: tuple[int, ...], measured: list[Optional[float]]) -> ModelStepCost:
    """The cost table: measured times, the fitted line where none, made non-decreasing."""
    points = [(T, s) for T, s in zip(buckets, measured) if s is not None]
    if not points:
        raise ValueError(f"step cost: the KV pool cannot hold a step of any token bucket {buckets}")
    base, per_token = fit_line(points)
    seconds, top = [], 0.0
    for T, s in zip(buckets, measured):
        top = max(top, s if s is not None else base + per_token * T)
        seconds.append(top)
    return ModelStepCost(tuple(buckets), tuple(seconds), base, per_token, tuple(s is not None for s in measured))


def fit_line(points: list[tuple[int, float]]) -> tuple[float, float]:
    """(base, per_token) >= 0 of the least-squares line seconds ~ base + per_token * tokens
    (one point, or points of one token count: the line through the origin)."""
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_s = sum(s for _, s in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return 0.0, mean_s / mean_t
    slope = sum((t - mean_t) * (s - mean_s) for t, s in points) / var
    if slope <= 0:
        return mean_s, 0.0
    base = mean_s - slope * mean_t
    if base < 0:                                    # through the origin instead
        return 0.0, sum(t * s for t, s in points) / sum(t * t for t, _ in points)
    return base, slope


def describe(costs: dict[str, ModelStepCost], budget_s: Optional[float]) -> dict:
    """Per model: the fitted line (ms, ms per token), each bucket's time (ms; measured or
    fitted) and `prefill_tokens`, the largest bucket within the budget for the model alone
    (a step with decodes of several models leaves each less)."""
    out = {}
    for name, cost in costs.items():
        out[name] = {"base_ms": cost.base_s * 1e3, "per_token_ms": cost.per_token_s * 1e3,
                     "bucket_ms": {T: s * 1e3 for T, s in zip(cost.token_buckets, cost.seconds)},
                     "measured_buckets": [T for T, m in zip(cost.token_buckets, cost.measured) if m]}
        if budget_s is not None:
            out[name]["prefill_tokens"] = cost.most_tokens_within(budget_s)
    return out


def log_costs(described: dict, budget_ms: Optional[float]) -> None:
    """One log line per model of `describe`'s output."""
    for name, d in described.items():
        log.info("step cost of %s: %.3f ms + %.5f ms/token (ms by token bucket: %s); alone within "
                 "tbt_budget_ms=%s: %s prefill tokens", name, d["base_ms"], d["per_token_ms"],
                 {T: round(ms, 3) for T, ms in d["bucket_ms"].items()}, budget_ms, d.get("prefill_tokens"))
