"""GPU timing shared by the kernel benchmarks (bench.py of each kernel).

`looped(f, iters)`: one jitted program that calls f(x_i, *rest) for `iters` distinct copies
x_i of the first input and returns every output, so XLA can neither merge the calls (their
inputs differ) nor drop them, and no harness op runs between them (an earlier version chained
the calls through a zero-valued term, which added two small launches per call to every
implementation's time). `time_calls(f, *args)`: seconds per call of f, from samples of
`inner` calls dispatched back to back and one `block_until_ready`, so the host dispatches
ahead while the GPU runs; the median of `reps` samples. Together they give the GPU time of
one step of a jitted program (its kernels and the gaps between them), without host dispatch.
"""
from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp


def looped(f, iters: int):
    """jit((x_1, ..., x_iters), *rest) -> [f(x_i, *rest) for each i]."""
    del iters   # the number of copies passed in decides it

    @jax.jit
    def run(xs, *rest):
        return [f(x, *rest) for x in xs]
    return run


def distinct_copies(x, iters: int):
    """`iters` copies of x in separate device buffers."""
    return tuple(jnp.array(x, copy=True) for _ in range(iters))


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
    xs = distinct_copies(args[0], iters)
    return time_calls(looped(f, iters), xs, *args[1:], inner=inner, reps=reps) / iters
