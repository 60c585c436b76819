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

History: the first version chained the calls (each call's first input plus a zero-valued term
of the previous output), which added two small launches per call; the second copied only the
first input (device run 2 of 2026-11-28: valid for our kernels and JAX's Pallas/Mosaic
kernels, not for the XLA-native peers, see RESULTS.md); this third one copies every input.
"""
from __future__ import annotations

import statistics
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
    """`iters` tuples holding copies of every array in args, each in its own device buffer
    (non-arrays are passed as they are)."""
    def copy(a):
        return jnp.array(a, copy=True) if isinstance(a, jax.Array) else a
    return tuple(tuple(copy(a) for a in args) for _ in range(iters))


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
