"""The benchmark's PNG plots (matplotlib, Agg backend), drawn from the files a run writes.

- `tbt_cdf`: the distribution of every gap between tokens, one curve per label (mode), on a
  log time axis, with the P99 marked;
- `versus_rate`: P99 TBT and SLO attainment against the request rate, one line per mode;
- `kv_pages`: KV pages in use over the run, one line per label, the pool's size dashed.

`run_gaps(folder)` reads every gap of a run back from its requests.jsonl, and `plot_run`
draws a single run's TBT CDF and KV pages next to its results.json.
"""
from __future__ import annotations

import json
import os
from typing import Mapping, Sequence

import numpy as np

from crosspool_jax.bench.latency import StreamTiming, percentile


def _pyplot():
    import matplotlib  # noqa: PLC0415 - only when plotting

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def run_gaps(folder: str) -> list[float]:
    """Every gap between tokens (seconds) of the run written under folder."""
    gaps: list[float] = []
    with open(os.path.join(folder, "requests.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            timing = StreamTiming(row["sent_s"], [(t, n) for t, n in row["chunks"]])
            gaps.extend(timing.tbt_gaps())
    return gaps


def tbt_cdf(curves: Mapping[str, Sequence[float]], path: str, title: str = "") -> str:
    """CDF of gaps (seconds), x in ms on a log axis."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, gaps in curves.items():
        if not len(gaps):
            continue
        x = np.sort(np.maximum(np.asarray(gaps, dtype=np.float64) * 1e3, 1e-3))
        y = np.arange(1, len(x) + 1) / len(x)
        line, = ax.step(x, y, where="post", label=f"{label} (P99 {1e3 * percentile(gaps, 99):.1f} ms)")
        ax.axvline(1e3 * percentile(gaps, 99), color=line.get_color(), linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("time between tokens (ms)")
    ax.set_ylabel("fraction of gaps")
    ax.set_ylim(0, 1.01)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title or "TBT CDF")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def versus_rate(points: Mapping[str, Sequence[tuple[float, dict]]], path: str, title: str = "") -> str:
    """points: {mode: [(rate, overall results)]}; P99 TBT (log) and SLO attainment panels."""
    plt = _pyplot()
    fig, (ax_tbt, ax_slo) = plt.subplots(1, 2, figsize=(10, 4))
    for mode, rows in points.items():
        rows = sorted(rows, key=lambda r: r[0])
        rates = [r for r, _ in rows]
        p99 = [o["tbt_ms"]["p99"] if o["tbt_ms"]["p99"] is not None else np.nan for _, o in rows]
        slo = [o["slo_attainment"] if o["slo_attainment"] is not None else np.nan for _, o in rows]
        ax_tbt.plot(rates, p99, marker="o", label=mode)
        ax_slo.plot(rates, slo, marker="o", label=mode)
    ax_tbt.set_yscale("log")
    ax_tbt.set_xlabel("request rate (req/s)")
    ax_tbt.set_ylabel("P99 time between tokens (ms)")
    ax_slo.set_xlabel("request rate (req/s)")
    ax_slo.set_ylabel("SLO attainment")
    ax_slo.set_ylim(-0.02, 1.02)
    for ax in (ax_tbt, ax_slo):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title or "P99 TBT and SLO attainment against request rate")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def kv_pages(timelines: Mapping[str, dict], path: str, title: str = "") -> str:
    """timelines: {label: results.json's "kv_pages"}; pages in use over time."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    totals = set()
    for label, tl in timelines.items():
        ax.plot(tl["t"], tl["used"], label=label, linewidth=1.2)
        if tl.get("total"):
            totals.add(tl["total"])
    for total in sorted(totals):
        ax.axhline(total, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("time since the run's start (s)")
    ax.set_ylabel("KV pages in use" + (f" (pool: {', '.join(str(t) for t in sorted(totals))})" if totals else ""))
    ax.grid(True, alpha=0.3)
    ax.set_title(title or "KV pages in use")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_run(folder: str) -> list[str]:
    """tbt_cdf.png and kv_pages.png beside a run's results.json."""
    with open(os.path.join(folder, "results.json")) as f:
        results = json.load(f)
    label = results["run"].get("mode") or "run"
    rate = results["run"].get("rate_rps")
    title = f"{label}" + (f", {rate:g} req/s" if rate else "")
    return [tbt_cdf({label: run_gaps(folder)}, os.path.join(folder, "tbt_cdf.png"), f"TBT CDF: {title}"),
            kv_pages({label: results["kv_pages"]}, os.path.join(folder, "kv_pages.png"), f"KV pages: {title}")]
