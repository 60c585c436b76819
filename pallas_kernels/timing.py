"""GPU timing shared by the kernel benchmarks (bench.py of each kernel).

`looped(f, iters)`: one jitted program that calls f for `iters` separate copies of ALL its
inputs and returns every output. Separate copies are the point: with an input shared between
the calls, XLA computes whatever depends only on it once for all calls (CSE: routing on
shared router logits, the page gather of an XLA attention baseline) and merges dots that
share an operand (DotMerger: `lax.ragged_dot` on shared weights read them once for five
calls, which read as 130% of the copy ceiling in the second device run of 2026-11-28), and
L2 would keep small weights between calls. A call's custom kernels (Pallas) are never merged.
`time_calls(f, *args)`: seconds per call of f, from samples of `inner` calls dispatched back
to back and one `block_until_ready`, so the host dispatches ahead while the GPU runs; the
median of `reps` samples. `time_step` = both: the GPU time of one call inside a jitted step
(its kernels and the gaps between them), without host dispatch.

`device_time(f, *args)`: the GPU's own clock, from a `jax.profiler` trace (CUPTI kernel
timestamps): one jitted call of f dispatched `calls` times back to back, cycling through
`copies` distinct copies of every input (so consecutive calls read different memory and no
call finds its operands in L2); per call the span from its first kernel's start to its last
kernel's end (its kernels and the gaps between them, never the host), the median over calls.
`time_step` measures the same from the host's clock and is wrong for calls shorter than their
host dispatch (a program of 5 calls with ~35 input buffers takes longer to dispatch than to
run at small shapes, so it reports host time). The benchmarks use device_time wherever a GPU
trace is available (`timer` in each row). Every input is copied, not only the first: XLA's
native peers otherwise read some operands from L2 (RESULTS.md).
"""
from __future__ import annotations

import glob
import os
import shutil
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp


def looped(f, iters: int):
    """jit(((args of call 1), ..., (args of call iters))) -> [f(*args_i) for each i]."""
    del iters   # the number of argument tuples passed in decides it

    @jax.jit
    def run(arg_sets):
        return [f(*args) for args in arg_sets]
    return run


def distinct_copies(args, iters: int):
    """`iters` tuples holding copies of every array in args (inside pytrees too), each in its
    own device buffer (non-arrays are passed as they are)."""
    def copy(a):
        return jnp.array(a, copy=True) if isinstance(a, jax.Array) else a
    return tuple(tuple(jax.tree.map(copy, a) for a in args) for _ in range(iters))


def time_calls(f, *args, inner: int = 4, reps: int = 5, warmup: int = 2) -> float:
    """Median seconds per call of f over `reps` samples of `inner` back-to-back calls."""
    for _ in range(warmup):
        jax.block_until_ready(f(*args))
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = f(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / inner)
    return statistics.median(samples)


def time_step(f, *args, iters: int = 5, inner: int = 4, reps: int = 5) -> float:
    """GPU seconds of one f(*args) inside a jitted program: looped, then divided."""
    arg_sets = distinct_copies(args, iters)
    t = time_calls(looped(f, iters), arg_sets, inner=inner, reps=reps) / iters
    del arg_sets
    return t


def gpu_kernel_events(xplane_path: str) -> list[tuple[str, int, int]]:
    """[(name, start_ns, duration_ns)] of every kernel (and memcpy/memset) on the GPU streams
    of a trace, in start order; names are the HLO op's where the trace says ("hlo_op")."""
    from jax.profiler import ProfileData
    events = []
    for plane in ProfileData.from_file(xplane_path).planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if not line.name.startswith("Stream"):
                continue
            for ev in line.events:
                stats = dict(ev.stats)
                op = stats.get("hlo_op")
                events.append((f"{op} [{ev.name[:48]}]" if op else ev.name, int(ev.start_ns),
                               int(ev.duration_ns)))
    return sorted(events, key=lambda e: e[1])


def split_calls(events, calls: int):
    """Cut a trace's events into `calls` equal runs (every call of one program launches the
    same kernels); None when they do not divide evenly."""
    if not events or len(events) % calls:
        return None
    n = len(events) // calls
    return [events[i * n:(i + 1) * n] for i in range(calls)]


def call_spans(runs) -> list[float]:
    """Seconds from each run's first event start to its last event end."""
    return [(max(e[1] + e[2] for e in run) - run[0][1]) * 1e-9 for run in runs]


def traced_gpu_events(run) -> list[tuple[str, int, int]]:
    """`gpu_kernel_events` of a profiler trace around `run()` (which must wait for its device
    work); [] when the trace has none (a CPU)."""
    d = tempfile.mkdtemp(prefix="crosspool_trace_")
    try:
        with jax.profiler.trace(d):
            run()
        paths = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
        return gpu_kernel_events(paths[0]) if paths else []
    finally:
        shutil.rmtree(d, ignore_errors=True)


def traced_runs(f, args_list, calls: int):
    """Dispatch jitted f on args_list[i % len] for `calls` calls inside one profiler trace;
    -> the per-call event runs, or None without GPU events."""
    g = jax.jit(f)
    for args in args_list:
        jax.block_until_ready(g(*args))

    def run():
        jax.block_until_ready([g(*args_list[i % len(args_list)]) for i in range(calls)])

    return split_calls(traced_gpu_events(run), calls)


def device_time(f, *args, copies: int = 3, calls: int = 12) -> tuple[float, str]:
    """(seconds per call, timer): the median GPU span of one call from a trace (timer
    "trace"), or, where the trace has no GPU kernels (a CPU, a failed CUPTI), `time_step`
    (timer "host")."""
    arg_sets = distinct_copies(args, copies)
    try:
        runs = traced_runs(f, arg_sets, calls)
    finally:
        del arg_sets
    if runs:
        return statistics.median(call_spans(runs)), "trace"
    return time_step(f, *args), "host"
