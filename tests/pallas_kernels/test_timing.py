"""The benchmarks' step timer (pallas_kernels/timing.py): every call of a timed program must
really run. With inputs shared between the calls, XLA computes shared work once (CSE) or
merges dots on a shared operand (which then reads more than the copy ceiling allows), so the
timer hands each call its own copy of every input."""
import re

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.timing import (call_spans, device_time, distinct_copies, looped, split_calls,
                                    time_step)


def _f(x, w, s):
    return jnp.tanh(x @ w) * s


def test_every_call_is_kept_and_reads_its_own_inputs():
    rng = np.random.default_rng()
    x = jnp.asarray(rng.standard_normal((8, 16)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((16, 4)), jnp.float32)
    s = jnp.float32(0.5)
    arg_sets = distinct_copies((x, w, s), 3)
    assert len(arg_sets) == 3 and all(len(a) == 3 for a in arg_sets)
    ptrs = {a[1].unsafe_buffer_pointer() for a in arg_sets}
    assert len(ptrs) == 3, "each call needs its own buffer of the shared weight"
    hlo = looped(_f, 3).lower(arg_sets).compile().as_text()
    assert len(re.findall(r"\bdot\(", hlo)) == 3, "a call was merged or dropped"
    outs = looped(_f, 3)(arg_sets)
    for out in outs:
        np.testing.assert_allclose(np.asarray(out), np.asarray(_f(x, w, s)), rtol=1e-6)


def test_time_step_is_positive_and_finite():
    x = jnp.asarray(np.random.default_rng().standard_normal((32, 32)), jnp.float32)
    t = time_step(lambda a, b: a @ b, x, x, iters=2, inner=2, reps=3)
    assert np.isfinite(t) and t > 0


def test_split_calls_and_spans():
    # two calls of three kernels each, with a launch gap inside the second
    events = [("a", 100, 10), ("b", 112, 5), ("c", 118, 2),
              ("a", 300, 10), ("b", 330, 5), ("c", 336, 4)]
    runs = split_calls(events, 2)
    assert [len(r) for r in runs] == [3, 3]
    np.testing.assert_allclose(call_spans(runs), [20e-9, 40e-9])
    assert split_calls(events, 4) is None, "uneven cuts must not be guessed"
    assert split_calls([], 2) is None


def test_device_time_uses_the_trace_on_a_gpu_and_the_host_clock_elsewhere():
    x = jnp.asarray(np.random.default_rng().standard_normal((32, 32)), jnp.float32)
    t, timer = device_time(lambda a, b: a @ b, x, x, copies=2, calls=4)
    assert timer == ("trace" if jax.default_backend() == "gpu" else "host")
    assert np.isfinite(t) and t > 0
