"""`python -m crosspool_jax.bench.trace generate|run|sweep|report`: the trace-driven serving benchmark.

    # a bursty 8-model chat trace: 4 req/s over all models, Zipf 1.0 popularity, CV 4 arrivals
    python -m crosspool_jax.bench.trace generate --out trace.jsonl --num_models 8 --rate 4 \\
        --cv 4 --zipf 1.0 --profile chat --duration_s 600 --seed 0
    # replay it open-loop: in this process (no --server_url; engine flags as the server's) or
    # against a running server, streaming
    python -m crosspool_jax.bench.trace run --trace trace.jsonl --out results/ --mode shared
    python -m crosspool_jax.bench.trace run --trace trace.jsonl --out results/ \\
        --server_url http://127.0.0.1:8000
    # modes side by side, each in a fresh process, over a rate sweep; merged tables and plots
    python -m crosspool_jax.bench.trace sweep --out sweep/ --modes static,shared \\
        --rates 2,4,8,16 --num_models 4 --cv 4 --duration_s 60
    # plots and tables again from the JSON files (e.g. after a run on a machine without matplotlib)
    python -m crosspool_jax.bench.trace report --out sweep/

generate: a seeded synthetic trace (`generator.py`), as this project's JSONL or in the Azure or
BurstGPT column format (`--format`). run: read a trace (this project's JSONL, an Azure LLM
inference trace or a BurstGPT file, told apart by their columns), map its models onto the
served ones (trace models m0, m1, ... most popular first take the served models in the order
given, unless --model_map), clip each request to its model's max_model_len, warm up by
replaying a separate shorter trace at every rate (--warmup_trace, or the first --warmup_s seconds
of the measured trace with other prompts) and each model's longest request, then drive the trace once per --rates entry (the trace's
arrival times scaled to that mean rate; no --rates: as it is) and write results.json,
results.md, requests.jsonl and PNG plots per rate (`results.py` says what each field means).
In process, the served models and the engine are the server's flags (--model, --mode,
--kv_pool_bytes, ...); without --model, the checkpoints shipped in checkpoints/.
sweep: generate the trace (or take --trace) and a warm-up trace, run each mode in a fresh
process with the same flags, and merge (`sweep.py`). report: redraw plots and tables under --out.
"""
from __future__ import annotations

import asyncio
import datetime
import json
import os
import sys
from typing import Optional

from absl import app, flags

from crosspool_jax import serving_flags
from crosspool_jax.runtime.compiles import use_compilation_cache
from crosspool_jax.bench import generator, results as results_lib, sweep as sweep_lib, traces
from crosspool_jax.bench.public_traces import load_trace, write_azure_csv, write_burstgpt_csv

FLAGS = flags.FLAGS
flags.adopt_module_key_flags(serving_flags)

COMMANDS = ("generate", "run", "sweep", "report")

# ---- generate (and sweep)
flags.DEFINE_integer("num_models", 8, "generate/sweep: models in the trace (m0 most popular).", lower_bound=1)
flags.DEFINE_float("rate", 4.0, "generate/sweep: mean requests/s over all models, shared out by the Zipf weights.")
flags.DEFINE_float("cv", 1.0, "generate/sweep: coefficient of variation of each model's inter-arrival gaps "
                   "(Gamma; 1 = Poisson, larger = burstier).")
flags.DEFINE_float("zipf", 1.0, "generate/sweep: Zipf exponent of model popularity (0 = uniform).")
flags.DEFINE_enum("profile", "chat", list(generator.PROFILES), "generate/sweep: length profile: " + "; ".join(
    f"{k}: {p.about}" for k, p in generator.PROFILES.items()) + ".")
flags.DEFINE_float("duration_s", 600.0, "generate/sweep: seconds of arrivals.")
# --seed (serving_flags: the engine's seed) is also the trace's seed in generate/sweep
flags.DEFINE_integer("prompt_len_median", None, "generate/sweep: override the profile's prompt length median.")
flags.DEFINE_integer("output_len_median", None, "generate/sweep: override the profile's output length median.")
flags.DEFINE_float("long_tail_fraction", None, "generate/sweep: fraction of requests with a long-context "
                   "prompt (default: the profile's).")
flags.DEFINE_integer("long_tail_median", None, "generate/sweep: median prompt length of the long-context tail.")
flags.DEFINE_list("model_names", None, "generate: names of the trace's models instead of m0, m1, ... "
                  "(e.g. ChatGPT,GPT-4 for a BurstGPT-style file).")
flags.DEFINE_enum("format", "jsonl", ["jsonl", "azure", "burstgpt"], "generate: file format (azure keeps no "
                  "model names).")
# ---- run
flags.DEFINE_string("out", None, "generate: the trace file; run/sweep/report: the results folder.")
flags.DEFINE_multi_string("trace", [], "run/sweep: trace file(s) (JSONL, Azure or BurstGPT CSV/JSONL; several "
                          "are merged by time; an Azure file's model is its file name).")
flags.DEFINE_enum("trace_format", "auto", ["auto", "jsonl", "azure", "burstgpt"], "run: format of --trace.")
flags.DEFINE_float("time_scale", 1.0, "run: multiply the trace's arrival times (0.5 = twice as fast).")
flags.DEFINE_string("model_map", None, "run: TRACE_MODEL=SERVED_MODEL,... (default: the trace's models, most "
                    "popular first, onto the served models in order).")
flags.DEFINE_string("server_url", None, "run: drive this running server over HTTP (streaming /v1/completions; "
                    "key from $OPENAI_API_KEY) instead of an engine in this process.")
flags.DEFINE_list("rates", None, "run/sweep: request rates (req/s); the trace is time-scaled to each, "
                  "one measured window and results folder rate_<r> per rate.")
flags.DEFINE_integer("max_requests", None, "run: measure only the first N requests of the trace.")
flags.DEFINE_float("window_s", None, "run: measure only the arrivals of the first N seconds of each rate's "
                   "(scaled) trace. sweep: default --duration_s (every rate point lasts as long).")
flags.DEFINE_string("warmup_trace", None, "run: trace replayed before measuring (not measured).")
flags.DEFINE_float("warmup_s", 30.0, "run: seconds of warm-up at each rate of --rates: --warmup_trace (scaled to "
                   "the rate) or else the measured trace's first N seconds (other prompts); the last warm-up "
                   "ends with each model's longest request. 0 without --warmup_trace: no warm-up. sweep: the "
                   "generated warm-up trace's duration.")
flags.DEFINE_float("ttft_slo_ms", 1000.0, "run: SLO limit on time to first token (ms).")
flags.DEFINE_float("tbt_slo_ms", 100.0, "run: SLO limit on each request's P99 time between tokens (ms).")
flags.DEFINE_float("sample_interval_s", 0.25, "run: seconds between samples of the engine's state.")
flags.DEFINE_float("drain_timeout_s", 300.0, "run: after the last arrival, wait this long for running "
                   "requests, then cancel them (counted unfinished).")
flags.DEFINE_integer("prompt_seed", 0, "run: seed of the random prompt token ids (the warm-up and each rate "
                     "window draw prompts of their own from it: no prefix-cache hits between them).")
flags.DEFINE_integer("token_id_max", 1000, "run: prompt token ids are drawn below min(this, vocab size).")
flags.DEFINE_string("label", None, "run: name of the run in tables and plots (default: the engine mode, "
                    "or 'server' over HTTP).")
flags.DEFINE_string("setting", "", "run: the sweep setting this run belongs to (tables group by it).")
flags.DEFINE_bool("plots", True, "run/sweep: draw PNG plots (needs matplotlib).")
flags.DEFINE_bool("progress", True, "run: show a progress bar while a trace runs.")
# ---- sweep
flags.DEFINE_list("modes", ["static", "shared"], "sweep: engine modes, each run in a fresh process.")
flags.DEFINE_list("cvs", None, "sweep: several CVs (one generated trace each; default: --cv).")
flags.DEFINE_list("model_counts", None, "sweep: several numbers of models (trace and served models: the "
                  "first N of --model; default: --num_models).")
flags.DEFINE_float("run_timeout_s", None, "sweep: kill a run process after this many seconds.")

_RUN_FLAGS = ("time_scale", "model_map", "max_requests", "window_s", "warmup_s", "ttft_slo_ms", "tbt_slo_ms",
              "sample_interval_s", "drain_timeout_s", "prompt_seed", "token_id_max", "plots", "progress")


def _spec(**override) -> generator.TraceSpec:
    values = dict(num_models=FLAGS.num_models, rate=FLAGS.rate, cv=FLAGS.cv, zipf=FLAGS.zipf,
                  profile=FLAGS.profile, duration_s=FLAGS.duration_s, seed=FLAGS.seed or 0,
                  prompt_len_median=FLAGS.prompt_len_median, output_len_median=FLAGS.output_len_median,
                  long_tail_fraction=FLAGS.long_tail_fraction, long_tail_median=FLAGS.long_tail_median,
                  model_names=FLAGS.model_names)
    values.update(override)
    return generator.TraceSpec(**values)


def cmd_generate() -> int:
    requests = generator.generate(_spec())
    writer = {"jsonl": traces.write_jsonl, "azure": write_azure_csv, "burstgpt": write_burstgpt_csv}[FLAGS.format]
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    n = writer(requests, FLAGS.out)
    stats = traces.describe(requests)
    print(f"wrote {n} requests to {FLAGS.out}: {stats['rate']:.3f} req/s over {stats['span_s']:.1f} s, "
          f"prompt median {stats['prompt_tokens_median']}, output median {stats['output_tokens_median']}")
    return 0


def _load(paths, fmt: str, time_scale: float) -> list[traces.TraceRequest]:
    merged: list[traces.TraceRequest] = []
    for path in paths:
        loaded = load_trace(path, fmt=fmt, time_scale=time_scale)
        if loaded.dropped:
            print(f"{path}: dropped {loaded.dropped} rows without tokens", file=sys.stderr)
        merged.extend(loaded.requests)
    if not merged:
        raise ValueError(f"no requests in {', '.join(paths)}")
    return traces.sort(merged)


def _warmup_requests(warm: list[traces.TraceRequest], measured: list[traces.TraceRequest]
                     ) -> list[traces.TraceRequest]:
    """The warm-up trace, then (all at its end) the longest-context request of every model of the
    measured trace, so that the widest programs (page tables of the longest contexts) are built
    before the measured window too."""
    end = warm[-1].arrival_s if warm else 0.0
    longest: dict[str, traces.TraceRequest] = {}
    for r in measured:
        best = longest.get(r.model)
        if best is None or r.prompt_tokens + r.output_tokens > best.prompt_tokens + best.output_tokens:
            longest[r.model] = r
    return list(warm) + [traces.TraceRequest(end, r.model, r.prompt_tokens, r.output_tokens)
                         for _, r in sorted(longest.items())]


def _warmup_plan(backend, served, warmup, model_map, windows) -> list[tuple]:
    """[(rate, requests)]: the warm-up replayed at every rate of the run (each load level builds
    its own batch shapes), cut to --warmup_s seconds each; the last one ends with each model's
    longest request. The warm-up trace is --warmup_trace, else the measured trace's first seconds."""
    if warmup is None and FLAGS.warmup_s <= 0:
        return []
    if warmup is not None:
        warm = traces.clip_to_context(traces.map_models(warmup, served, model_map)[0], backend.max_model_len())[0]
    plan = []
    for rate, window, _ in windows:
        source = window if warmup is None else (traces.scale_to_rate(warm, rate) if rate else warm)
        plan.append((rate, [r for r in source if r.arrival_s < FLAGS.warmup_s]))
    plan[-1] = (plan[-1][0], _warmup_requests(plan[-1][1], [r for _, w, _ in windows for r in w]))
    return [(rate, reqs) for rate, reqs in plan if reqs]


def _device_info() -> dict:
    import jax  # noqa: PLC0415

    d = jax.devices()[0]
    return {"card": f"{d.platform}:{getattr(d, 'device_kind', '')} x{len(jax.devices())}", "jax": jax.__version__}


def cmd_run() -> int:
    if not FLAGS.trace:
        raise app.UsageError("run: --trace is required")
    if not FLAGS.out:
        raise app.UsageError("run: --out (the results folder) is required")
    trace = _load(FLAGS.trace, FLAGS.trace_format, FLAGS.time_scale)
    if FLAGS.max_requests:
        trace = trace[:FLAGS.max_requests]
    warmup = _load([FLAGS.warmup_trace], "auto", FLAGS.time_scale) if FLAGS.warmup_trace else None
    rates = [float(r) for r in FLAGS.rates] if FLAGS.rates else None
    slo = results_lib.Slo(FLAGS.ttft_slo_ms, FLAGS.tbt_slo_ms)
    model_map = traces.parse_model_map(FLAGS.model_map) if FLAGS.model_map else None
    if FLAGS.server_url:
        return asyncio.run(_run_http(trace, warmup, rates, slo, model_map))
    return _run_in_process(trace, warmup, rates, slo, model_map)


def _run_in_process(trace, warmup, rates, slo, model_map) -> int:
    from crosspool_jax.model_specs import models_from_specs  # noqa: PLC0415

    models = models_from_specs(FLAGS.model)
    options = serving_flags.engine_options()
    use_compilation_cache(FLAGS.compilation_cache_dir)
    from crosspool_jax.bench.driver import InProcessBackend  # noqa: PLC0415
    from crosspool_jax.engine import LLMEngine  # noqa: PLC0415
    from crosspool_jax.server import AsyncEngine  # noqa: PLC0415

    traces.map_models(trace, list(models), model_map)     # a bad mapping fails before the engine starts
    engine = LLMEngine.from_options(models, **options)
    compiled = engine.warm_up()          # every program of every model's shape menu, before any request
    vocab = {m: engine.registry.get(m).config.vocab_size for m in engine.model_names}
    async_engine = AsyncEngine(engine, max_queue=FLAGS.max_queue,
                               stats_interval_s=min(0.1, FLAGS.sample_interval_s / 2))
    async_engine.start()
    try:
        backend = InProcessBackend(async_engine, vocab, token_id_max=FLAGS.token_id_max)
        info = {"mode": engine.config.mode, "label": FLAGS.label or engine.config.mode,
                "engine_options": dict(options), "models": models, "engine_warm_up": compiled,
                "backend": backend.description}
        return asyncio.run(_measure(backend, list(models), trace, warmup, rates, slo, model_map, info))
    finally:
        async_engine.shutdown()


async def _run_http(trace, warmup, rates, slo, model_map) -> int:
    from crosspool_jax.bench.driver import HttpBackend  # noqa: PLC0415

    async with HttpBackend(FLAGS.server_url, api_key=os.environ.get("OPENAI_API_KEY"),
                           token_id_max=FLAGS.token_id_max) as backend:
        served = list(backend.models)
        info = {"mode": None, "label": FLAGS.label or "server", "models": served,
                "backend": backend.description}
        return await _measure(backend, served, trace, warmup, rates, slo, model_map, info)


async def _measure(backend, served, trace, warmup, rates, slo, model_map, info) -> int:
    """Warm up, then drive each measured window and write its results."""
    from crosspool_jax.bench.driver import drive  # noqa: PLC0415

    trace, mapping = traces.map_models(trace, served, model_map)
    windows = [(r, traces.scale_to_rate(trace, r)) for r in rates] if rates else [(None, trace)]
    if FLAGS.window_s:
        windows = [(r, [q for q in w if q.arrival_s < FLAGS.window_s]) for r, w in windows]
    windows = [(r, *traces.clip_to_context(w, backend.max_model_len())) for r, w in windows]
    base = dict(info, setting=FLAGS.setting, trace=list(FLAGS.trace), model_map=mapping,
                trace_stats=traces.describe(trace), **_device_info(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"))
    warmups = _warmup_plan(backend, served, warmup, model_map, windows)
    if warmups:
        base["warmup"] = {"requests": 0, "seconds": 0.0, "compiles": 0, "completed": 0}
    for j, (rate, warm) in enumerate(warmups):
        # every drive gets prompts of its own (no prefix-cache hit across windows): seed, window
        record = await drive(warm, backend, sample_interval_s=FLAGS.sample_interval_s,
                             drain_timeout_s=FLAGS.drain_timeout_s, prompt_seed=1000 * FLAGS.prompt_seed + 500 + j,
                             run_id=f"warmup{j}", progress=FLAGS.progress, label="warm-up")
        compiles = int(record.after.compiles - record.before.compiles)
        for key, value in (("requests", len(warm)), ("seconds", record.duration_s), ("compiles", compiles),
                           ("completed", sum(r.ok for r in record.results))):
            base["warmup"][key] += value
        print(f"warm-up{f' at {rate:g} req/s' if rate else ''}: {len(warm)} requests in "
              f"{record.duration_s:.1f} s, {compiles} compiles", flush=True)
    for k, (rate, window, clipped) in enumerate(windows):
        folder = FLAGS.out if rate is None else os.path.join(FLAGS.out, f"rate_{rate:g}")
        record = await drive(window, backend, sample_interval_s=FLAGS.sample_interval_s,
                             drain_timeout_s=FLAGS.drain_timeout_s, prompt_seed=1000 * FLAGS.prompt_seed + k + 1,
                             run_id=f"rate{rate:g}" if rate else "run", progress=FLAGS.progress,
                             label=f"{base['label']} {rate:g} req/s" if rate else base["label"])
        run_info = dict(base, rate_rps=rate if rate else traces.offered_rate(window))
        out = results_lib.build(record, slo, run_info=run_info, clipped=clipped)
        results_lib.write_run(folder, out, record)
        if FLAGS.plots:
            _plot(lambda: _plots().plot_run(folder))
        print(results_lib.run_markdown(out), flush=True)
    if rates:
        sweep_lib.merge(FLAGS.out, draw=FLAGS.plots)
    return 0


def _plots():
    from crosspool_jax.bench import plots  # noqa: PLC0415

    return plots


def _plot(draw) -> None:
    try:
        draw()
    except ImportError as e:
        print(f"no plots: {e} (run `python -m crosspool_jax.bench.trace report --out ...` where "
              f"matplotlib is installed)", file=sys.stderr)


def cmd_sweep() -> int:
    if not FLAGS.out:
        raise app.UsageError("sweep: --out (the results folder) is required")
    if FLAGS.server_url:
        raise app.UsageError("sweep: runs engines in fresh processes; --server_url does not apply "
                             "(use run against each server)")
    rates = [float(r) for r in FLAGS.rates] if FLAGS.rates else [FLAGS.rate]
    os.makedirs(FLAGS.out, exist_ok=True)
    specs = serving_flags.FLAGS.model
    counts = [int(n) for n in FLAGS.model_counts] if FLAGS.model_counts else [FLAGS.num_models]
    cvs = [float(c) for c in FLAGS.cvs] if FLAGS.cvs else [FLAGS.cv]
    if FLAGS.trace and (FLAGS.model_counts or FLAGS.cvs):
        raise app.UsageError("sweep: --cvs and --model_counts make generated traces; not with --trace")
    passthrough = _passthrough()
    if not FLAGS.trace and not FLAGS.window_s:
        passthrough.append(f"--window_s={FLAGS.duration_s:g}")
    jobs = []
    for n in counts:
        for cv in cvs:
            setting = "" if len(counts) == 1 and len(cvs) == 1 else f"n{n}_cv{cv:g}"
            folder = os.path.join(FLAGS.out, setting) if setting else FLAGS.out
            os.makedirs(folder, exist_ok=True)
            if FLAGS.trace:
                trace, warm = FLAGS.trace[0], FLAGS.warmup_trace
            else:
                spec = _spec(num_models=n, cv=cv, rate=max(rates))
                trace, warm = os.path.join(folder, "trace.jsonl"), os.path.join(folder, "warmup.jsonl")
                traces.write_jsonl(generator.generate(spec), trace)
                traces.write_jsonl(generator.generate(generator.warmup_spec(spec, FLAGS.warmup_s)), warm)
            models = [f"--model={s}" for s in specs[:n]] if specs else []
            if specs and len(specs) < n:
                raise app.UsageError(f"sweep: {n} models wanted, {len(specs)} --model given")
            for mode in FLAGS.modes:
                jobs.append(sweep_lib.job(mode, setting, trace=trace, warmup_trace=warm, rates=rates,
                                          out=FLAGS.out, passthrough=passthrough + models))
    status = sweep_lib.run_jobs(jobs, timeout_s=FLAGS.run_timeout_s)
    paths = sweep_lib.merge(FLAGS.out, status=status, draw=FLAGS.plots)
    print(open(paths["md"]).read())
    return 0 if all(s["rc"] == 0 for s in status) else 1


def _passthrough() -> list[str]:
    """The given engine and run flags, for the run processes (not --model, --mode, --rates, and
    not --seed, which was the trace's)."""
    names = [n for n in serving_flags.ENGINE_FLAGS if n not in ("mode", "seed")] + ["max_queue",
                                                                                   "compilation_cache_dir"]
    out = []
    for name in names + list(_RUN_FLAGS):
        if FLAGS[name].present:
            out += FLAGS[name].serialize().split("\n")
    return out


def cmd_report() -> int:
    if not FLAGS.out or not os.path.isdir(FLAGS.out):
        raise app.UsageError("report: --out must be a results folder")
    rows = sweep_lib.collect(FLAGS.out)
    if not rows:
        raise app.UsageError(f"report: no results.json under {FLAGS.out}")
    for row in rows:
        if FLAGS.plots:
            _plot(lambda: _plots().plot_run(row["folder"]))
    if len(rows) > 1:
        print(open(sweep_lib.merge(FLAGS.out, draw=FLAGS.plots)["md"]).read())
    else:
        print(open(os.path.join(rows[0]["folder"], "results.md")).read())
    return 0


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"expected one command, {' | '.join(COMMANDS)}; got {argv[1:]}")
    command = argv[1]
    try:
        if command == "generate":
            if not FLAGS.out:
                raise app.UsageError("generate: --out (the trace file) is required")
            return cmd_generate()
        return {"run": cmd_run, "sweep": cmd_sweep, "report": cmd_report}[command]()
    except ValueError as e:                        # bad input: say what, without a traceback
        raise app.UsageError(str(e))


def help_text() -> str:
    """The module docstring and every flag of this command (its own and the serving flags)."""
    module = sys.argv[0] if __name__ == "__main__" else __name__     # how absl keys the flags' module
    return __doc__ + "\n" + FLAGS.module_help(module) + "\n"


def run() -> None:
    if any(a in ("-h", "--help", "--helpshort", "-?") for a in sys.argv[1:]):
        print(help_text())
        sys.exit(0)
    app.run(main)


if __name__ == "__main__":
    run()
