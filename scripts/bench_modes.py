"""The three memory organisations side by side on the same devices: static, shared, crosspool.

    python scripts/bench_modes.py --device_gib 24 --out /tmp/bench_modes     # every device JAX sees
    XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu \
        python scripts/bench_modes.py --models qwen3moe-mini-2l,qwen3moe-mini-2l --device_gib 0.05 --quick

Every mode gets the same devices and the same memory per device (`--device_gib`), serves
the same random-weight MoE models of real layer shapes (crosspool_jax/models/random_models.py)
through the same engine API, kernels and options; only the memory organisation differs:

- static:    every device holds the weights of the models placed on it and a KV region
             split equally between them (worst-case reservation per model);
- shared:    the same placement; the models of a device share its KV pages elastically;
- crosspool: n_kv KV devices (one global KV pool + attention sides) and n_w weight devices
             (every model's experts, sharded), hidden states moving between them per layer.

Each mode runs in a fresh Python process (`--fresh_process`), is warmed up by the engine's
own warm-up where the code has one and then by replaying the measured request mix once, and
is measured with the process's compile counter watching (`compiles_in_window`).

Every mode's KV pages are in --dtype (the engine's kv_cache_dtype), so capacities compare on a
CPU too. Per mode it reports: models resident (weights on the devices when serving starts), the total
KV capacity in tokens (`kv_tokens_total`, per model: pages / layers * tokens per page) and
that of ONE request (what the KV manager would admit), decode time between
tokens (P50/P99, a few requests per model at once, `--max_decode_steps` tokens per dispatch in
every mode, 1 by default), on a GPU the host's share of a decode step (`host_share`: 1 minus
the GPU's busy time per decode step, from a profiler trace of one more round, over the
untraced round's median decode step),
the swap-in latency of a cold model (first-token time of a request for a swapped-out model,
and the weights pool's own swap-in seconds), and for crosspool the fraction of the transfer
time that the ping-pong pipeline hides: 1 - (t_step - t_step_without_transfers) / t_transfers,
where t_transfers is the same exchanges timed alone (`ppermute` of the step's payload shapes).
Results: a markdown table and a JSON file under --out, with card, JAX version and date.
"""
from __future__ import annotations

import dataclasses
import datetime
import inspect
import json
import os
import statistics
import sys
import time
import traceback
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_MODELS = flags.DEFINE_string("models", "mixtral-8x7b-2l,qwen3moe-30b-a3b-4l,mixtral-8x7b-2l,qwen3moe-30b-a3b-4l",
                              "Comma-separated random model shapes (repeats are separate models).")
_DEVICE_GIB = flags.DEFINE_float("device_gib", 24.0, "Memory per device given to the engine (weights + KV), GiB.")
_MODES = flags.DEFINE_string("modes", "static,shared,crosspool", "Modes to run, comma-separated.")
_KV_DEVICES = flags.DEFINE_integer("kv_devices", None, "crosspool: KV devices (default half of the devices).")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 512, "Prompt tokens of the decode-latency requests.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 48, "Tokens generated per request.")
_PER_MODEL = flags.DEFINE_integer("requests_per_model", 2, "Concurrent requests per model (low concurrency).")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "Engine dtype.")
_DECODE_STEPS = flags.DEFINE_integer("max_decode_steps", 1, "Decode tokens per dispatch in every mode (1: the "
                                     "side-by-side default; >1 times multi-step decode, the engine's default is 8).")
_MAX_LOGPROBS = flags.DEFINE_integer("max_logprobs", None, "The engine's max_logprobs (default: the engine's); 0 "
                                     "leaves the logprobs programs out of the warm-up (the bench asks for none).")
_MAX_LANES = flags.DEFINE_integer("max_lanes", None, "The engine's max_lanes (default: the engine's); 1 runs "
                                  "every model's decode as its own program.")
_PIPELINE = flags.DEFINE_bool("pipeline_models", False, "The engine's pipeline_models: each step dispatches half "
                               "of the models and reads the previous step's results while the device runs them.")
_ASYNC = flags.DEFINE_bool("async_scheduling", None, "The engine's async_scheduling (default: the engine's): "
                            "each decode step is dispatched before the previous step's tokens reach the host "
                            "(placed modes).")
_QUICK = flags.DEFINE_bool("quick", False, "Tiny run (CPU smoke test): fewer tokens, no decode-latency rounds.")
_OUT = flags.DEFINE_string("out", None, "Folder for bench_modes.json and bench_modes.md.")
_FRESH = flags.DEFINE_bool("fresh_process", True, "Run each mode in a fresh Python process (no compiled program "
                           "or cache shared between modes).")
_ROW_OUT = flags.DEFINE_string("row_out", None, "Internal: the child process of one mode writes its row here.")
_TRACE = flags.DEFINE_bool("trace", True, "Profile one more decode round (GPU): device busy time per step, so the "
                           "host overhead of a step is measured, not guessed.")

GIB = 1 << 30


def engine_options(mode: str, n: int, n_kv: int, budget: int, sizes: dict) -> dict:
    """Engine options that give `mode` exactly `budget` bytes per device on n devices.

    static/shared: the models are spread over the devices by the engine's placement (greedy by
    bytes); each device's weights and attention pools get what its share of the models needs
    (the largest models, as many as the busiest device holds), capped together at 3/4 of the
    device, and the rest is KV. crosspool: every device's arena row is the whole budget
    (`arena_bytes`): the weight devices hold every model's expert shards, each model's
    attention side sits on one KV device (its home), and every device's memory beyond that
    is KV pages, weight devices included (disagg/layout.py).
    """
    attn = sorted((a for a, _ in sizes.values()), reverse=True)
    ffn = sorted((f for _, f in sizes.values()), reverse=True)
    if mode in ("static", "shared"):
        per_device = -(-len(sizes) // n)                       # models on the busiest device
        want_ffn, want_attn = sum(ffn[:per_device]), sum(attn[:per_device])
        scale = min(1.0, budget * 3 / 4 / (want_ffn + want_attn))
        ffn_budget = max(int(want_ffn * scale), ffn[0])
        attn_budget = max(int(want_attn * scale), attn[0])
        return dict(mode=mode, kv_devices=n, weight_devices=n,
                    kv_pool_bytes=n * (budget - ffn_budget - attn_budget),
                    weights_pool_bytes=ffn_budget, attention_pool_bytes=attn_budget)
    return dict(mode="crosspool", kv_devices=n_kv, weight_devices=n - n_kv, arena_bytes=budget)


def _prompts(llm, names, per_model, prompt_len, seed):
    import numpy as np
    rng = np.random.default_rng(seed)
    prompts, model_of = [], []
    for name in names:
        vocab = llm.engine.registry.get(name).config.vocab_size
        for _ in range(per_model):
            prompts.append(rng.integers(0, vocab, prompt_len).tolist())
            model_of.append(name)
    return prompts, model_of


@dataclasses.dataclass
class DecodeRound:
    """One round of the measured request mix: every gap between a request's consecutive tokens
    after its first (seconds per token), and the wall seconds of each engine step taken once
    every request had its first token (the decode-only steps)."""

    gaps: list
    decode_steps: list


def decode_round(llm, names, per_model, prompt_len, max_tokens, seed, run_decode=None) -> DecodeRound:
    """Run the requests to completion through `engine.step()`. The steps taken once every
    request has its first token run inside `run_decode(rest)` if given (it must call `rest()`:
    a profiler trace around the decode-only steps)."""
    from crosspool_jax import SamplingParams

    engine = llm.engine
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    prompts, model_of = _prompts(llm, names, per_model, prompt_len, seed)
    ids = []
    for i, (p, m) in enumerate(zip(prompts, model_of)):
        rid = f"s{seed}-{i}"
        engine.add_request(rid, m, {"prompt_token_ids": p}, params)
        ids.append(rid)
    seen = {r: 0 for r in ids}
    last = {}
    out = DecodeRound(gaps=[], decode_steps=[])

    def step():
        decoding = len(last) == len(ids)             # every request has its first token
        t0 = time.perf_counter()
        outs = engine.step()
        now = time.perf_counter()
        if decoding:
            out.decode_steps.append(now - t0)
        for o in outs:
            n = len(o.outputs[0].token_ids)
            new = n - seen.get(o.request_id, 0)
            if new > 0:
                if o.request_id in last:
                    out.gaps.extend([(now - last[o.request_id]) / new] * new)
                last[o.request_id] = now
                seen[o.request_id] = n

    def rest():
        while engine.has_unfinished_requests():
            step()

    while engine.has_unfinished_requests() and len(last) < len(ids):     # prefills
        step()
    (run_decode or (lambda f: f()))(rest)
    return out


def cold_start(llm, names, prompt_len) -> list[dict]:
    """Per model not resident now: time to first token of one request for it, and the swap counters."""
    from crosspool_jax import SamplingParams

    engine = llm.engine
    out = []
    for name in names:
        if engine.stats().models[name]["resident"]:
            continue
        before = engine.registry.weights_stats()
        prompts, _ = _prompts(llm, [name], 1, prompt_len, seed=hash(name) % 1000)
        t0 = time.perf_counter()
        engine.add_request(f"cold-{name}", name, {"prompt_token_ids": prompts[0]},
                           SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
        while engine.has_unfinished_requests():
            engine.step()
        ttft = time.perf_counter() - t0
        after = engine.registry.weights_stats()
        row = {"model": name, "ttft_s": ttft, "swaps_in": after.swaps_in - before.swaps_in}
        for field in ("swap_in_seconds", "swap_in_bytes"):
            if hasattr(after, field):
                row[field] = getattr(after, field) - getattr(before, field)
        out.append(row)
    return out


def transfer_alone_seconds(llm, tokens_per_device: int, hidden: int, num_layers: int, microbatches: int) -> float:
    """The step's exchanges without compute: 2 ppermutes per stage of [Tm, D] between each KV
    device and weight device pair (p2p rounds), timed in one jitted scan."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec

    from crosspool_jax.disagg.layout import AXIS
    from crosspool_jax.disagg.pipeline import num_stages, p2p_rounds

    layout = llm.engine.registry.arena.layout.first
    n_kv, n_w = layout.n_kv, layout.n_w
    mesh = layout.mesh()
    Tm = -(-tokens_per_device // microbatches)
    stages = num_stages(num_layers, microbatches)
    rounds = p2p_rounds(n_kv, n_w)

    def body(x_1TD):
        def stage(x, _):
            for pairs in rounds:
                x = x + jax.lax.ppermute(x, AXIS, perm=[(k, n_kv + j) for k, j in pairs])
                x = x + jax.lax.ppermute(x, AXIS, perm=[(n_kv + j, k) for k, j in pairs])
            return x, None
        return jax.lax.scan(stage, x_1TD, None, length=stages)[0]

    fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=PartitionSpec(AXIS), out_specs=PartitionSpec(AXIS),
                               check_vma=False))
    x = jax.device_put(jnp.zeros((n_kv + n_w, Tm, hidden), jnp.bfloat16),
                       jax.sharding.NamedSharding(mesh, PartitionSpec(AXIS)))
    return _median_seconds(fn, x)


def interconnect_gbps(llm, nbytes: int = 256 << 20) -> float:
    """Device-to-device bandwidth of one ppermute from the first KV device to the first weight device."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec

    from crosspool_jax.disagg.layout import AXIS

    layout = llm.engine.registry.arena.layout.first
    mesh = layout.mesh()
    n = layout.n_kv + layout.n_w
    fn = jax.jit(jax.shard_map(lambda x: jax.lax.ppermute(x, AXIS, perm=[(0, layout.n_kv)]), mesh=mesh,
                               in_specs=PartitionSpec(AXIS), out_specs=PartitionSpec(AXIS), check_vma=False))
    x = jax.device_put(jnp.ones((n, nbytes // 2), jnp.bfloat16), jax.sharding.NamedSharding(mesh, PartitionSpec(AXIS)))
    return nbytes / _median_seconds(fn, x) / 1e9


def _median_seconds(fn, x, repeats: int = 5) -> float:
    """Median wall seconds of fn(x) until ready, after one call to compile."""
    from pallas_kernels.timing import time_calls
    return time_calls(fn, x, inner=1, reps=repeats, warmup=1)


def jax_itemsize(dtype: str) -> int:
    import jax.numpy as jnp
    return jnp.dtype(dtype).itemsize


def _pct(xs, q):
    from crosspool_jax.bench.latency import percentile
    value = percentile(xs, q)
    return float("nan") if value is None else value


def _compiles():
    """XLA compiles so far in this process (the engine's counter where the code has one)."""
    try:
        from crosspool_jax.runtime.compiles import compile_counter
    except ImportError:
        return None
    return compile_counter().count


def device_ms_per_decode_step(llm, names, per_model, prompt_len, max_tokens, seed) -> Optional[float]:
    """The GPU's busy milliseconds per decode-only engine step: one more round of the mix with a
    profiler trace from the moment every request has its first token to the end (the union of
    kernel and copy intervals over the number of steps). The trace slows the host, not the
    kernels, so this is the device-only time of a step; None off a GPU or with --notrace."""
    import jax
    if not _TRACE.value or jax.devices()[0].platform != "gpu":
        return None
    from crosspool_jax.bench.kernel_summary import busy_ns
    from pallas_kernels.timing import traced_gpu_events
    events = []
    rnd = decode_round(llm, names, per_model, prompt_len, max_tokens, seed,
                       run_decode=lambda rest: events.extend(traced_gpu_events(rest)))
    return busy_ns(events) * 1e-6 / len(rnd.decode_steps) if rnd.decode_steps else None


def run_mode(mode: str, models: dict, sizes: dict, n: int, n_kv: int, budget: int) -> dict:
    from crosspool_jax import LLM

    opts = engine_options(mode, n, n_kv, budget, sizes)
    if _MAX_LOGPROBS.value is not None:
        opts["max_logprobs"] = _MAX_LOGPROBS.value
    if _MAX_LANES.value is not None:
        opts["max_lanes"] = _MAX_LANES.value
    if _PIPELINE.value:
        opts["pipeline_models"] = True
    if _ASYNC.value is not None:
        opts["async_scheduling"] = _ASYNC.value
    from crosspool_jax.engine.config import EngineConfig
    if "kv_cache_dtype" in {f.name for f in dataclasses.fields(EngineConfig)}:   # an earlier tree has none
        # every mode's KV pages in --dtype, as the split's arena holds them ("auto" stores a CPU's
        # placed pools in float32: half the tokens per byte, no like-for-like capacity)
        opts["kv_cache_dtype"] = _DTYPE.value
    t0 = time.perf_counter()
    llm = LLM(models, dtype=_DTYPE.value, max_decode_steps=_DECODE_STEPS.value, max_num_seqs=64,
              max_num_batched_tokens=max(512, _PROMPT_LEN.value), **opts)
    load_s = time.perf_counter() - t0
    engine = llm.engine
    names = engine.model_names
    stats = engine.stats()
    resident = [m for m in names if stats.models[m]["resident"]]
    capacity = {m: engine.kv_manager.max_request_tokens(m) for m in names}
    row = {"mode": mode, "options": {k: v for k, v in opts.items()}, "load_s": load_s,
           "models_resident": len(resident), "models": len(names), "resident": resident,
           "kv_pages_total": stats.kv_pages_total,
           "kv_capacity_tokens_one_request": capacity}
    row["kv_tokens_total"] = {m: stats.kv_pages_total // engine.registry.get(m).config.num_layers
                              * engine.registry.get(m).tokens_per_page for m in names}
    per_model, prompt_len, max_tokens = _PER_MODEL.value, _PROMPT_LEN.value, _MAX_TOKENS.value
    if _QUICK.value:
        return row
    if hasattr(engine, "warm_up"):                  # the engine's own: every program of its shape menu
        started = time.perf_counter()

        def progress(model, done, total):           # a run stopped by its time limit shows how far it got
            print(f"warm-up: {model} ready ({done}/{total}, {time.perf_counter() - started:.0f} s)", flush=True)

        takes_progress = "progress" in inspect.signature(engine.warm_up).parameters     # an earlier tree's may not
        row["engine_warm_up"] = engine.warm_up(progress=progress) if takes_progress else engine.warm_up()
    t0 = time.perf_counter()
    decode_round(llm, names, per_model, prompt_len, max_tokens, seed=1)    # the measured mix, replayed
    row["warm_up_replay_s"] = time.perf_counter() - t0
    compiles0 = _compiles()
    swaps0 = engine.registry.weights_stats()
    runner0 = engine.runner.stats
    steps0, dispatches0 = runner0.steps, getattr(runner0, "dispatches", None)
    continued0 = getattr(engine.stats(), "continuations", 0)
    measured = decode_round(llm, names, per_model, prompt_len, max_tokens, seed=2)
    row["continuations_in_window"] = getattr(engine.stats(), "continuations", 0) - continued0
    swaps1 = engine.registry.weights_stats()
    runner1 = engine.runner.stats
    row["model_steps_in_window"] = runner1.steps - steps0
    if dispatches0 is not None:                     # programs dispatched (lanes: fewer than model steps)
        row["dispatches_in_window"] = runner1.dispatches - dispatches0
    gaps = measured.gaps
    row.update(tbt_p50_ms=1e3 * _pct(gaps, 50), tbt_p99_ms=1e3 * _pct(gaps, 99), tbt_samples=len(gaps),
               swaps_in_during_decode=swaps1.swaps_in - swaps0.swaps_in, compiles_in_window=_compiles() - compiles0,
               decode_step_p50_ms=1e3 * _pct(measured.decode_steps, 50), decode_steps=len(measured.decode_steps))
    try:
        device_ms = device_ms_per_decode_step(llm, names, per_model, prompt_len, max_tokens, seed=3)
    except Exception as e:                          # the trace must not lose the measured row
        device_ms, row["host_share_error"] = None, f"{type(e).__name__}: {e}"
    if device_ms is not None:                       # the host's share of a decode step (issue 12: under 20%)
        row.update(device_ms_per_decode_step=device_ms, host_share=1 - device_ms / row["decode_step_p50_ms"])
    row["cold_start"] = cold_start(llm, names, prompt_len)
    if mode == "crosspool" and engine.registry.arena is not None:
        runner = engine.runner
        config = engine.registry.get(names[0]).config
        steps = {}
        from crosspool_jax.disagg.report import no_exchange
        for exchange in ("p2p", "none"):
            runner.exchange = no_exchange if exchange == "none" else exchange
            if not _QUICK.value:
                decode_round(llm, names[:1], per_model, prompt_len, 4, seed=3)
            g = decode_round(llm, names[:1], per_model, prompt_len, max_tokens, seed=4).gaps
            steps[exchange] = statistics.median(g)
        runner.exchange = "p2p"
        tokens = -(-per_model // engine.registry.arena.layout.n_kv)
        M = 2 if tokens >= 2 else 1
        t_x = transfer_alone_seconds(llm, max(tokens, 1), config.hidden_size, config.num_layers, M)
        exposed = steps["p2p"] - steps["none"]
        from crosspool_jax.disagg.report import transfer_bytes
        moved = transfer_bytes(n_kv=engine.registry.arena.layout.n_kv, n_w=engine.registry.arena.layout.n_w,
                               tokens_per_device=max(tokens, 1), hidden=config.hidden_size,
                               itemsize=jax_itemsize(_DTYPE.value), num_layers=config.num_layers, num_microbatches=M,
                               experts=config.num_experts if "moe" in config.ffn_kinds else 0)
        row["bytes_per_layer_busiest_device"] = moved.busiest_device_received
        row.update(step_ms_one_model=1e3 * steps["p2p"], step_ms_no_transfer=1e3 * steps["none"],
                   transfer_alone_ms=1e3 * t_x, hidden_fraction=max(0.0, min(1.0, 1 - exposed / t_x)) if t_x else None,
                   interconnect_gbps=interconnect_gbps(llm), hidden_model=names[0])
        row["bytes_per_layer_over_link_us"] = row["bytes_per_layer_busiest_device"] / (row["interconnect_gbps"] * 1e3)
    del llm
    import gc
    gc.collect()
    return row


def _run_fresh(mode: str) -> dict:
    """run_mode in a child process of this script with the same flags; its row."""
    import subprocess
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "row.json")
        argv = [a for a in sys.argv[1:] if not a.startswith(("--modes", "--row_out", "--out"))]
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, f"--modes={mode}",
                               f"--row_out={path}"])
        if proc.returncode != 0 or not os.path.exists(path):
            raise RuntimeError(f"mode {mode} exited with status {proc.returncode}")
        with open(path) as f:
            return json.load(f)


def main(argv):
    del argv
    import jax

    try:
        from crosspool_jax.models.random_models import SHAPES, random_model_dirs
    except ImportError:                              # a tree from before the runtime layer (run_redesign_gpu.sh)
        from crosspool_jax.engine.random_models import SHAPES, random_model_dirs
    from crosspool_jax.models import ModelConfig
    from crosspool_jax.models.params import side_bytes

    shapes = [s for s in _MODELS.value.split(",") if s]
    folders = {}
    for i, shape in enumerate(shapes):
        folders[f"{shape}-{i}"] = random_model_dirs([shape])[shape]
    configs = {name: ModelConfig.from_hf_dict(SHAPES[shape]) for name, shape in zip(folders, shapes)}
    sizes = {name: side_bytes(config, _DTYPE.value) for name, config in configs.items()}
    n = len(jax.devices())
    n_kv = _KV_DEVICES.value or max(1, n // 2)
    budget = int(_DEVICE_GIB.value * GIB)
    d = jax.devices()[0]
    head = {"card": f"{d.platform}:{getattr(d, 'device_kind', '')} x{n}", "jax": jax.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
            "device_gib": _DEVICE_GIB.value, "models": {k: shapes[i] for i, k in enumerate(folders)},
            "model_gib": {k: (round(a / GIB, 3), round(f / GIB, 3)) for k, (a, f) in sizes.items()},
            "prompt_len": _PROMPT_LEN.value, "max_tokens": _MAX_TOKENS.value,
            "requests_per_model": _PER_MODEL.value, "crosspool_split": f"{n_kv}+{n - n_kv}",
            "max_decode_steps": _DECODE_STEPS.value, "async_scheduling": _ASYNC.value,
            "pipeline_models": _PIPELINE.value}
    modes = [m for m in _MODES.value.split(",") if m]
    if _ROW_OUT.value:                               # the child of one mode
        row = run_mode(modes[0], folders, sizes, n, n_kv, budget)
        with open(_ROW_OUT.value, "w") as f:
            json.dump(row, f, default=str)
        return
    rows = []
    for mode in modes:
        try:
            rows.append(_run_fresh(mode) if _FRESH.value else run_mode(mode, folders, sizes, n, n_kv, budget))
        except Exception as e:                       # one mode failing must not lose the others
            traceback.print_exc()
            rows.append({"mode": mode, "error": f"{type(e).__name__}: {e}"})
        print(json.dumps(rows[-1], default=str), flush=True)
        if _OUT.value:                               # after every mode: a time limit keeps what ran
            os.makedirs(_OUT.value, exist_ok=True)
            with open(os.path.join(_OUT.value, "bench_modes.json"), "w") as f:
                json.dump({"head": head, "rows": rows}, f, indent=1, default=str)
    lines = [f"bench_modes: {head['card']}, JAX {head['jax']}, {head['date']}, {head['device_gib']} GiB per device, "
             f"models {list(head['models'].values())}, {head['requests_per_model']} requests/model, "
             f"prompt {head['prompt_len']}, {head['max_tokens']} new tokens, crosspool split {head['crosspool_split']}",
             "", "| mode | models resident | KV tokens total (first model) | KV tokens, one request (min over models) | "
             "TBT P50 ms | TBT P99 ms | compiles in window | host share of a decode step | cold TTFT ms (mean) | swap-in s (mean) | "
             "transfer hidden |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['mode']} | error: {r['error'][:120]} | | | | | | | | | |")
            continue
        if "tbt_p50_ms" not in r:                    # --quick: capacity only
            lines.append(f"| {r['mode']} | {r['models_resident']}/{r['models']} | "
                         f"{next(iter(r['kv_tokens_total'].values()))} | "
                         f"{min(r['kv_capacity_tokens_one_request'].values())} | | | | | | | |")
            continue
        cold = r["cold_start"]
        ttft = statistics.mean(c["ttft_s"] for c in cold) * 1e3 if cold else float("nan")
        swap = (statistics.mean(c["swap_in_seconds"] for c in cold)
                if cold and all("swap_in_seconds" in c for c in cold) else float("nan"))
        hidden = r.get("hidden_fraction")
        host = r.get("host_share")
        lines.append(f"| {r['mode']} | {r['models_resident']}/{r['models']} | "
                     f"{next(iter(r['kv_tokens_total'].values()))} | "
                     f"{min(r['kv_capacity_tokens_one_request'].values())} | {r['tbt_p50_ms']:.2f} | "
                     f"{r['tbt_p99_ms']:.2f} | {r.get('compiles_in_window')} | "
                     f"{'-' if host is None else f'{host:.0%}'} | {ttft:.1f} | {swap:.3f} | "
                     f"{'-' if hidden is None else f'{hidden:.2f}'} |")
    table = "\n".join(lines)
    print(table)
    if _OUT.value:
        with open(os.path.join(_OUT.value, "bench_modes.md"), "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    app.run(main)
