"""One driven trace turned into results.json, results.md and requests.jsonl.

results.json:

    {"overall": {...}, "per_model": {name: {...}}, "run": {...}, "kv_pages": {...}}

`overall` and each `per_model` entry hold `requests`, `completed`, `failed`, `unfinished`,
`ttft_ms`, `tbt_ms` and `e2e_ms` (each {"p50", "p90", "p99", "max"}; TBT over every gap between
tokens, `latency.py` says how they are counted), `slo_attainment` (the fraction of the
requests that completed with TTFT <= the TTFT limit and the 99th percentile of their own gaps
<= the TBT limit), `goodput_rps` (those requests per second of the run), `throughput_tok_s`
(tokens streamed per second) and `request_throughput_rps`. `overall` adds the engine's
counters over the measured window (`compiles_in_window`, which should be 0, `preemptions`,
`swaps_in`, `swaps_out`, `engine_steps` and of them `steps_run_ahead`: dispatched by async
scheduling before the previous step's tokens were in), the KV pages (`kv_pages_total`, `kv_pages_peak`, `kv_pages_peak_by_model` and
`kv_pages_equal_share`, the pool over the served models: static mode's share), the run's length
and offered rate, the driver's largest send lag, and `notes` (plain sentences about anything
that makes the numbers less than clean: compiles in the window, clipped, failed or unfinished
requests, a late driver). `run` is what was run (mode, options, trace, SLO limits, card, JAX
version, date); `kv_pages` the sampled KV pages in use over time (total and per model).
The seconds of a run go from the trace's time 0 to its last token (or the drain cut-off).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional, Sequence

from crosspool_jax.bench.driver import RequestResult, RunRecord
from crosspool_jax.bench.latency import percentile, quantiles_ms

SLOW_SEND_S = 0.05


@dataclasses.dataclass(frozen=True)
class Slo:
    """Per-request limits: time to first token and the request's P99 gap between tokens (ms)."""

    ttft_ms: float = 1000.0
    tbt_ms: float = 100.0

    def met(self, res: RequestResult) -> bool:
        if not res.ok:
            return False
        ttft = res.timing.ttft()
        gaps = res.timing.tbt_gaps()
        tbt = percentile(gaps, 99.0) if gaps else 0.0
        return ttft is not None and 1e3 * ttft <= self.ttft_ms and 1e3 * tbt <= self.tbt_ms


def summarize(results: Sequence[RequestResult], duration_s: float, slo: Slo) -> dict:
    """The measures of a group of requests (all of a run, or one model's)."""
    ttft = [r.timing.ttft() for r in results if r.timing.chunks]
    gaps = [g for r in results for g in r.timing.tbt_gaps()]
    e2e = [r.timing.e2e() for r in results if r.ok]
    good = sum(1 for r in results if slo.met(r))
    tokens = sum(r.timing.num_tokens for r in results)
    completed = sum(1 for r in results if r.ok)
    per_s = (lambda x: x / duration_s) if duration_s > 0 else (lambda x: None)
    return {
        "requests": len(results), "completed": completed,
        "failed": sum(1 for r in results if r.status == "failed"),
        "unfinished": sum(1 for r in results if r.status == "unfinished"),
        "ttft_ms": quantiles_ms(ttft), "tbt_ms": quantiles_ms(gaps), "e2e_ms": quantiles_ms(e2e),
        "tbt_samples": len(gaps),
        "slo_attainment": good / len(results) if results else None,
        "goodput_rps": per_s(good), "throughput_tok_s": per_s(tokens),
        "request_throughput_rps": per_s(completed),
    }


def build(record: RunRecord, slo: Slo, *, run_info: dict, clipped: int = 0) -> dict:
    """results.json's content for one run."""
    results, before, after = record.results, record.before, record.after
    overall = summarize(results, record.duration_s, slo)
    compiles = int(after.compiles - before.compiles)
    span = max((r.request.arrival_s for r in results), default=0.0)
    peak = max((s.kv_pages_used for s in record.samples), default=0.0)
    models = sorted({r.request.model for r in results})
    peak_by_model = {m: int(max((s.kv_pages_used_by_model.get(m, 0.0) for s in record.samples), default=0.0))
                     for m in models}
    total = int(after.kv_pages_total or before.kv_pages_total)
    share = total // max(len(run_info.get("models") or models), 1)
    overall.update(
        compiles_in_window=compiles, preemptions=int(after.preemptions - before.preemptions),
        swaps_in=int(after.swaps_in - before.swaps_in), swaps_out=int(after.swaps_out - before.swaps_out),
        engine_steps=int(after.engine_steps - before.engine_steps), steps_run_ahead=int(after.continuations - before.continuations),
        kv_pages_total=total, kv_pages_peak=int(peak), kv_pages_peak_by_model=peak_by_model,
        kv_pages_equal_share=share,
        duration_s=round(record.duration_s, 6),
        offered_rate_rps=len(results) / span if span > 0 else None,
        max_send_lag_ms=round(1e3 * record.max_send_lag_s, 3), clipped_requests=clipped,
        notes=_notes(record, compiles, clipped))
    above = [m for m, p in peak_by_model.items() if p > share]
    if above:
        overall["notes"].append(f"KV pages of {', '.join(above)} peaked above an equal share of the pool "
                                f"({share} of {total} pages: about what static mode reserves per model)")
    per_model = {m: summarize([r for r in results if r.request.model == m], record.duration_s, slo)
                 for m in models}
    timeline = {"t": [round(s.t, 4) for s in record.samples],
                "used": [s.kv_pages_used for s in record.samples],
                "total": overall["kv_pages_total"],
                "by_model": {m: [s.kv_pages_used_by_model.get(m, 0.0) for s in record.samples]
                             for m in models}}
    info = dict(run_info, slo={"ttft_ms": slo.ttft_ms, "tbt_ms": slo.tbt_ms,
                               "rule": "completed, TTFT <= ttft_ms and the request's P99 gap <= tbt_ms"})
    return {"overall": overall, "per_model": per_model, "run": info, "kv_pages": timeline}


def _notes(record: RunRecord, compiles: int, clipped: int) -> list[str]:
    results = record.results
    notes = []
    if compiles:
        notes.append(f"{compiles} XLA compile(s) during the measured window: its tail latencies "
                     f"include compile time (the warm-up did not cover every program shape)")
    else:
        notes.append("no XLA compiles during the measured window")
    if clipped:
        notes.append(f"{clipped} of {len(results)} requests were clipped to their model's "
                     f"max_model_len (prompt + output); the driver sent the clipped lengths")
    failed = [r for r in results if r.status == "failed"]
    if failed:
        notes.append(f"{len(failed)} request(s) failed; first: {failed[0].error}")
    unfinished = [r for r in results if r.status == "unfinished"]
    if unfinished:
        notes.append(f"{len(unfinished)} request(s) were still running at the drain cut-off and "
                     f"were cancelled (counted as SLO misses)")
    if record.max_send_lag_s > SLOW_SEND_S:
        notes.append(f"the driver sent up to {1e3 * record.max_send_lag_s:.0f} ms behind the trace's "
                     f"arrival times (the client was busy)")
    return notes


def request_rows(record: RunRecord) -> list[dict]:
    """requests.jsonl: one object per request, chunk times relative to the run's start."""
    return [{"i": r.index, "model": r.request.model, "arrival_s": r.request.arrival_s,
             "sent_s": round(r.timing.sent, 6), "prompt_tokens": r.request.prompt_tokens,
             "output_tokens": r.request.output_tokens, "status": r.status, "error": r.error,
             "chunks": [[round(t, 6), n] for t, n in r.timing.chunks]} for r in record.results]


def write_run(folder: str, results: dict, record: RunRecord) -> dict[str, str]:
    """results.json, results.md and requests.jsonl under folder; returns their paths."""
    os.makedirs(folder, exist_ok=True)
    paths = {k: os.path.join(folder, name) for k, name in
             (("json", "results.json"), ("md", "results.md"), ("requests", "requests.jsonl"))}
    with open(paths["json"], "w") as f:
        json.dump(results, f, indent=1)
    with open(paths["md"], "w") as f:
        f.write(run_markdown(results))
    with open(paths["requests"], "w") as f:
        for row in request_rows(record):
            f.write(json.dumps(row) + "\n")
    return paths


def _fmt(value: Optional[float], digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _row(label: str, m: dict) -> str:
    return (f"| {label} | {m['requests']} | {m['completed']} | {_fmt(m['ttft_ms']['p50'])} | "
            f"{_fmt(m['ttft_ms']['p99'])} | {_fmt(m['tbt_ms']['p50'], 2)} | {_fmt(m['tbt_ms']['p99'], 2)} | "
            f"{_fmt(m['slo_attainment'], 3)} | {_fmt(m['goodput_rps'], 2)} | {_fmt(m['throughput_tok_s'])} |")


def run_markdown(results: dict) -> str:
    """One run: overall and per model, then the counters and notes."""
    run, overall = results["run"], results["overall"]
    head = ", ".join(f"{k} {run[k]}" for k in ("mode", "rate_rps", "card", "jax", "date") if run.get(k) is not None)
    lines = [f"# Trace run: {head}", "",
             f"SLO: TTFT <= {run['slo']['ttft_ms']} ms and each request's P99 gap <= {run['slo']['tbt_ms']} ms", "",
             "| model | requests | completed | TTFT P50 ms | TTFT P99 ms | TBT P50 ms | TBT P99 ms | "
             "SLO attainment | goodput req/s | tokens/s |", "|---|---|---|---|---|---|---|---|---|---|",
             _row("**all**", overall)]
    lines += [_row(name, m) for name, m in results["per_model"].items()]
    lines += ["", f"compiles in window: {overall['compiles_in_window']}; preemptions: {overall['preemptions']}; "
                  f"swaps in/out: {overall['swaps_in']}/{overall['swaps_out']}; engine steps "
                  f"{overall.get('engine_steps', 0)}, {overall.get('steps_run_ahead', 0)} run ahead; KV pages peak "
                  f"{overall['kv_pages_peak']} of {overall['kv_pages_total']}; {overall['duration_s']:.1f} s", ""]
    lines += [f"- {n}" for n in overall["notes"]]
    return "\n".join(lines) + "\n"


def comparison_markdown(rows: Sequence[dict]) -> str:
    """One line per run of a sweep: rows are {"mode", "setting", "rate", "overall"}."""
    lines = ["| mode | setting | rate req/s | TTFT P50 ms | TTFT P99 ms | TBT P50 ms | TBT P99 ms | "
             "SLO attainment | goodput req/s | tokens/s | preemptions | compiles in window |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        m = row["overall"]
        lines.append(f"| {row['mode']} | {row['setting']} | {row['rate']:g} | {_fmt(m['ttft_ms']['p50'])} | "
                     f"{_fmt(m['ttft_ms']['p99'])} | {_fmt(m['tbt_ms']['p50'], 2)} | {_fmt(m['tbt_ms']['p99'], 2)} | "
                     f"{_fmt(m['slo_attainment'], 3)} | {_fmt(m['goodput_rps'], 2)} | "
                     f"{_fmt(m['throughput_tok_s'])} | {m['preemptions']} | {m['compiles_in_window']} |")
    return "\n".join(lines) + "\n"
