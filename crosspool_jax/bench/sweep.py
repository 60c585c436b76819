"""Sweeps: one fresh process per mode and setting, and the merge of their results.

Every mode of a comparison runs in its own `python -m crosspool_jax.bench.trace run` process
(no compiled program, cache or allocator state carries from one mode to the next), on the
same devices with the same flags; inside it, one warm-up trace, then one measured window per
request rate. `merge(folder)` gathers every results.json under a folder into
comparison.md, sweep.json and the comparison plots:

- `tbt_cdf[_<setting>]_rate<r>.png`: the TBT CDF of each mode at that rate;
- `vs_rate[_<setting>].png`: P99 TBT and SLO attainment against the rate, per mode;
- `kv_pages[_<setting>]_rate<r>.png`: KV pages in use over time, per mode.

Plots need matplotlib; without it the tables are still written (`trace report` draws the
plots later from the same files).
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from typing import Optional, Sequence

from crosspool_jax.bench import plots
from crosspool_jax.bench.results import comparison_markdown


@dataclasses.dataclass
class Job:
    """One `trace run` process: a mode under one setting (its trace and served models)."""

    mode: str
    setting: str
    argv: list[str]
    folder: str


def job(mode: str, setting: str, *, trace: str, warmup_trace: Optional[str], rates: Sequence[float],
        out: str, passthrough: Sequence[str]) -> Job:
    folder = os.path.join(out, setting, mode) if setting else os.path.join(out, mode)
    argv = [sys.executable, "-m", "crosspool_jax.bench.trace", "run", f"--trace={trace}",
            f"--out={folder}", f"--mode={mode}", f"--label={mode}", f"--setting={setting}",
            f"--rates={','.join(f'{r:g}' for r in rates)}"]
    argv += [f"--warmup_trace={warmup_trace}"] if warmup_trace else []
    return Job(mode, setting, argv + list(passthrough), folder)


def run_jobs(jobs: Sequence[Job], *, timeout_s: Optional[float] = None) -> list[dict]:
    """Run the jobs one after the other (each a fresh process); their exit status and seconds."""
    status = []
    for j in jobs:
        os.makedirs(j.folder, exist_ok=True)
        print(f"== {j.setting or 'run'} / {j.mode}: {' '.join(j.argv)}", flush=True)
        t0 = time.perf_counter()
        try:
            rc = subprocess.run(j.argv, timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        status.append({"mode": j.mode, "setting": j.setting, "folder": j.folder, "rc": rc,
                       "seconds": round(time.perf_counter() - t0, 1)})
        print(f"== {j.setting or 'run'} / {j.mode}: exit {rc} after {status[-1]['seconds']} s", flush=True)
    return status


def collect(folder: str) -> list[dict]:
    """{"mode", "setting", "rate", "folder", "overall", "run"} of every results.json under folder."""
    rows = []
    for root, _, files in os.walk(folder):
        if "results.json" not in files:
            continue
        with open(os.path.join(root, "results.json")) as f:
            results = json.load(f)
        run = results["run"]
        rate = run.get("rate_rps") or results["overall"].get("offered_rate_rps") or 0.0
        rows.append({"mode": run.get("label") or run.get("mode") or "run", "setting": run.get("setting") or "",
                     "rate": float(rate), "folder": root, "overall": results["overall"], "run": run,
                     "kv_pages": results["kv_pages"]})
    return sorted(rows, key=lambda r: (r["setting"], r["mode"], r["rate"]))


def merge(folder: str, *, status: Optional[list[dict]] = None, draw: bool = True) -> dict[str, object]:
    """comparison.md, sweep.json and (with matplotlib) the comparison plots under folder."""
    rows = collect(folder)
    paths: dict[str, object] = {}
    md = ["# Trace benchmark comparison", ""]
    if rows:
        first = rows[0]["run"]
        md += [f"card {first.get('card')}, JAX {first.get('jax')}, {first.get('date')}; SLO: TTFT <= "
               f"{first['slo']['ttft_ms']} ms, request P99 gap <= {first['slo']['tbt_ms']} ms", ""]
    md.append(comparison_markdown(rows))
    for row in rows:
        for note in row["overall"]["notes"]:
            if not note.startswith("no XLA compiles"):
                md.append(f"- {row['mode']} {row['setting']} {row['rate']:g} req/s: {note}")
    for s in status or ():
        if s["rc"] != 0:
            md.append(f"- {s['mode']} {s['setting']}: the run process ended with {s['rc']} after {s['seconds']} s")
    paths["md"] = os.path.join(folder, "comparison.md")
    with open(paths["md"], "w") as f:
        f.write("\n".join(md) + "\n")
    paths["json"] = os.path.join(folder, "sweep.json")
    with open(paths["json"], "w") as f:
        json.dump({"runs": [{k: v for k, v in r.items() if k != "kv_pages"} for r in rows],
                   "processes": status or []}, f, indent=1)
    if draw:
        paths["png"] = draw_comparison(folder, rows)
    return paths


def draw_comparison(folder: str, rows: Sequence[dict]) -> list[str]:
    """The comparison plots of `rows` (from `collect`) under folder; [] without matplotlib."""
    try:
        import matplotlib  # noqa: F401,PLC0415
    except ImportError:
        print("matplotlib is not installed: no plots (run `python -m crosspool_jax.bench.trace report "
              f"--out {folder}` where it is)", file=sys.stderr)
        return []
    out = []
    for setting in sorted({r["setting"] for r in rows}):
        group = [r for r in rows if r["setting"] == setting]
        tag = f"_{setting}" if setting else ""
        by_mode: dict[str, list] = {}
        for r in group:
            by_mode.setdefault(r["mode"], []).append((r["rate"], r["overall"]))
        out.append(plots.versus_rate(by_mode, os.path.join(folder, f"vs_rate{tag}.png"),
                                     f"P99 TBT and SLO attainment vs rate {setting}".strip()))
        for rate in sorted({r["rate"] for r in group}):
            at = [r for r in group if r["rate"] == rate]
            title = f"{setting} {rate:g} req/s".strip()
            out.append(plots.tbt_cdf({r["mode"]: plots.run_gaps(r["folder"]) for r in at},
                                     os.path.join(folder, f"tbt_cdf{tag}_rate{rate:g}.png"), f"TBT CDF: {title}"))
            out.append(plots.kv_pages({r["mode"]: r["kv_pages"] for r in at},
                                      os.path.join(folder, f"kv_pages{tag}_rate{rate:g}.png"), f"KV pages: {title}"))
    return out
