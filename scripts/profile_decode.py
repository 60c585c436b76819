"""Where a decode step's time goes: scheduler, host input building, the device program, result
fetch and the engine's own bookkeeping, per engine step (median over the decode steps).

    python scripts/profile_decode.py --random_config mixtral-8x7b-2l --mode shared
    python scripts/profile_decode.py --random_config mixtral-8x7b-2l --mode crosspool --split 1+1
    JAX_PLATFORMS=cpu python scripts/profile_decode.py --model m=checkpoints/qwen3-moe-tiny --tokens 8
    python scripts/profile_decode.py --random_config qwen3moe-30b-a3b-4l --copies 4 --max_lanes 4   # lanes
    python scripts/profile_decode.py ... --cprofile /tmp/decode.pstats     # and where the host's time goes
    python scripts/profile_decode.py --random_config qwen3moe-30b-a3b-4l:48 --requests 1 --kernels
                                           # what the GPU runs per decoded token and per layer

Timers wrap `scheduler.schedule`, the runner's `dispatch_all` (host work up to the programs'
dispatch: input building, transfers, the jit calls; "jit_calls" is the part spent inside the
jitted step programs' calls: argument handling and launch), `block_until_ready` on the dispatched
outputs (the device program, as seen from the host, after dispatch returned) and `collect`
(the device-to-host fetch and unpacking). "rest" is the engine step minus those: stop rules,
detokenization, output objects. One line per phase, milliseconds. Blocking after dispatch
serialises host and device (the engine normally overlaps them across models), so the step
total here is an upper bound of the engine's.

`--kernels` adds a round whose decode steps (after every request's prefill) run under a
`jax.profiler` trace, and prints the GPU's kernels per decoded token and per layer, its busy
time against the span, and the top op kinds (`crosspool_jax.bench.kernel_summary`; a GPU only:
a CPU trace has no GPU events).
"""
from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_MODEL = flags.DEFINE_multi_string("model", None, "NAME=PATH (default: --random_config)")
_RANDOM = flags.DEFINE_string("random_config", "mixtral-8x7b-2l", "random-weight model shape")
_MODE = flags.DEFINE_string("mode", "shared", "static | shared | crosspool")
_SPLIT = flags.DEFINE_string("split", None, "crosspool KV+W devices, e.g. 1+1")
_REQUESTS = flags.DEFINE_integer("requests", 2, "concurrent requests")
_PROMPT = flags.DEFINE_integer("prompt_len", 512, "prompt tokens")
_TOKENS = flags.DEFINE_integer("tokens", 32, "tokens generated per request")
_KV = flags.DEFINE_integer("kv_pool_bytes", 4 << 30, "KV pool bytes")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "dtype")
_DECODE_STEPS = flags.DEFINE_integer("max_decode_steps", 1, "decode tokens per dispatch (placed modes)")
_COPIES = flags.DEFINE_integer("copies", 1, "serve this many copies of each model (each loaded as a model of its "
                               "own), each with --requests requests")
_LANES = flags.DEFINE_integer("max_lanes", None, "the engine's max_lanes (default: the engine's)")
_KERNELS = flags.DEFINE_bool("kernels", False, "Also trace a round's decode steps on the GPU: kernels per token "
                             "and per layer, the top op kinds")
_CPROFILE = flags.DEFINE_string("cprofile", None, "Also profile the host (cProfile) over a third round like "
                                "the timed one: the pstats file to write; the top functions are printed")


class Timer:
    def __init__(self):
        self.samples: dict[str, list[float]] = {}
        self.current: dict[str, float] = {}

    def wrap(self, name, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.current[name] = self.current.get(name, 0.0) + time.perf_counter() - t0
        return timed

    def close_step(self, total: float):
        self.current["step"] = total
        for k, v in self.current.items():
            self.samples.setdefault(k, []).append(v)
        self.current = {}


def main(argv):
    del argv
    import jax
    import numpy as np

    from crosspool_jax import LLM, SamplingParams
    from crosspool_jax.models.random_models import random_model_dirs
    from crosspool_jax.model_specs import models_from_specs
    from crosspool_jax.weights.devices import parse_split

    models = models_from_specs(_MODEL.value) if _MODEL.value else random_model_dirs([_RANDOM.value])
    if _COPIES.value > 1:
        models = {f"{name}-{i}": path for name, path in models.items() for i in range(_COPIES.value)}
    opts = dict(mode=_MODE.value)
    if _LANES.value is not None:
        opts["max_lanes"] = _LANES.value
    if _SPLIT.value:
        n_kv, n_w = parse_split(_SPLIT.value)
        opts.update(kv_devices=n_kv, weight_devices=n_w)
    opts["async_scheduling"] = False         # the phases of a synchronous step: each dispatch waits for its program
    llm = LLM(models, dtype=_DTYPE.value, kv_pool_bytes=_KV.value, max_decode_steps=_DECODE_STEPS.value,
              max_num_batched_tokens=max(512, _PROMPT.value), **opts)
    engine = llm.engine
    names = engine.model_names
    timer = Timer()
    runner = engine.runner
    orig_dispatch_all, orig_collect = runner.dispatch_all, runner.collect

    def dispatch_all(*args, **kwargs):
        t0 = time.perf_counter()
        steps = orig_dispatch_all(*args, **kwargs)
        t1 = time.perf_counter()
        for step in steps:
            if hasattr(step.outputs, "block_until_ready"):
                step.outputs.block_until_ready()
            else:                          # a tree from before ProgramOutputs (comparison runs)
                jax.block_until_ready(step.outputs)
        t2 = time.perf_counter()
        timer.current["dispatch"] = timer.current.get("dispatch", 0.0) + t1 - t0
        timer.current["device_after_dispatch"] = timer.current.get("device_after_dispatch", 0.0) + t2 - t1
        return steps

    runner.dispatch_all = dispatch_all
    from crosspool_jax.disagg import pipeline
    from crosspool_jax.engine import runner as runner_module

    for module, names_ in ((runner_module, ("ragged_step", "multi_decode")), (pipeline, ("disagg_step", "disagg_decode"))):
        for name in names_:
            program = getattr(module, name)
            timed = timer.wrap("jit_calls", program)
            timed.lower = program.lower    # warm-up paths lower the real program
            setattr(module, name, timed)
    runner.collect = timer.wrap("collect", orig_collect)
    schedule = timer.wrap("schedule", engine.scheduler.schedule)

    def schedule_and_note_prefill(*args, **kwargs):
        out = schedule(*args, **kwargs)
        timer.current["prefill"] = float(any(c.num_tokens > 1 for chunks in out.chunks_by_model.values()
                                             for c in chunks))
        return out

    engine.scheduler.schedule = schedule_and_note_prefill
    rng = np.random.default_rng(0)
    params = SamplingParams(max_tokens=_TOKENS.value, temperature=0.0, ignore_eos=True)

    def add_round(tag) -> dict:
        """The round's requests added; -> {request id: output tokens so far}."""
        for name in names:
            vocab = engine.registry.get(name).config.vocab_size
            for i in range(_REQUESTS.value):
                engine.add_request(f"{tag}-{name}-{i}", name,
                                   {"prompt_token_ids": rng.integers(1, vocab, _PROMPT.value).tolist()}, params)
        return {f"{tag}-{name}-{i}": 0 for name in names for i in range(_REQUESTS.value)}

    def step_and_count(seen: dict) -> None:
        t0 = time.perf_counter()
        for out in engine.step():
            seen[out.request_id] = len(out.outputs[0].token_ids)
        timer.close_step(time.perf_counter() - t0)

    def run_round(tag):
        seen = add_round(tag)
        while engine.has_unfinished_requests():
            step_and_count(seen)

    def kernel_round():
        """The decode steps of a round under a profiler trace -> (GPU events, tokens decoded)."""
        from pallas_kernels.timing import traced_gpu_events
        seen = add_round("kernels")
        while engine.has_unfinished_requests() and min(seen.values()) == 0:     # prefills, untraced
            step_and_count(seen)
        before = sum(seen.values())

        def decode_rest():
            while engine.has_unfinished_requests():
                step_and_count(seen)

        return traced_gpu_events(decode_rest), sum(seen.values()) - before

    run_round("warm")                      # compiles every shape once
    dispatches0 = runner.stats.dispatches
    timer.samples.clear()
    run_round("timed")
    dispatches = runner.stats.dispatches - dispatches0
    samples = {k: list(v) for k, v in timer.samples.items()}
    profiler = None
    if _CPROFILE.value:                    # a third round under the profiler: its overhead stays out of the times
        import cProfile
        profiler = cProfile.Profile()
        profiler.enable()
        run_round("profiled")
        profiler.disable()
        profiler.dump_stats(_CPROFILE.value)
    kernels = kernel_round() if _KERNELS.value else None
    timer.samples = samples
    decode = [i for i, p in enumerate(timer.samples["prefill"]) if not p]    # steps without a prefill chunk
    med = {k: 1e3 * statistics.median([v[i] for i in decode if i < len(v)]) for k, v in timer.samples.items()
           if k != "prefill"}
    known = sum(med.get(k, 0.0) for k in ("schedule", "dispatch", "device_after_dispatch", "collect"))
    print(f"profile_decode: {jax.devices()[0].device_kind} x{len(jax.devices())}, JAX {jax.__version__}, "
          f"models {names}, mode {_MODE.value} {_SPLIT.value or ''}, lanes up to "
          f"{max(engine.registry.get(names[0]).menu.lane_counts)}, {_REQUESTS.value} requests per model, "
          f"prompt {_PROMPT.value}, {len(timer.samples['step'])} steps, {dispatches} programs dispatched, "
          f"{len(decode)} decode steps (median ms)")
    for k in ("step", "schedule", "dispatch", "jit_calls", "device_after_dispatch", "collect"):
        label = "  of which jit calls" if k == "jit_calls" else k
        print(f"  {label:24s} {med.get(k, float('nan')):8.3f}")
    print(f"  {'rest (engine bookkeeping)':24s} {med['step'] - known:8.3f}")
    if kernels is not None:
        from crosspool_jax.bench.kernel_summary import summarize_kernels
        events, tokens = kernels
        if events and tokens:
            summary = summarize_kernels(events, tokens=tokens, num_layers=engine.registry.get(names[0]).config.num_layers)
            print("\n".join(summary.lines()))
        else:
            print(f"--kernels: the trace has no GPU events ({len(events)} events, {tokens} decode tokens)")
    if profiler is not None:
        import pstats
        for key in ("tottime", "cumulative"):
            print(f"host profile of a round like the timed one, by {key}:")
            pstats.Stats(_CPROFILE.value).sort_stats(key).print_stats(30)


if __name__ == "__main__":
    app.run(main)
