"""GPU timing shared by the kernel benchmarks (bench.py of each kernel).

`looped(f, iters)`: f(x, *rest) -> out, run `iters` times inside one jitted, unrolled loop in
which each call's first input depends (by a zero-valued term) on the previous output, so no
call is hoisted or removed. `time_calls(f, *args)`: seconds per call of f, from samples of
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
    """jit(x, *rest -> scalar) running f `iters` times, each x depending on the last out."""
    @jax.jit
    def run(x, *rest):
        def body(_, carry):
            xx, acc = carry
            out = f(xx, *rest)
            first = jnp.ravel(out)[0]
            return xx + (first * 0).astype(xx.dtype), acc + first.astype(jnp.float32)
        return jax.lax.fori_loop(0, iters, body, (x, jnp.float32(0)), unroll=True)[1]
    return run


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
    return time_calls(looped(f, iters), *args, inner=inner, reps=reps) / iters
