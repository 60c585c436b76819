"""The process's compile counter counts every executable JAX builds, and nothing else."""
import jax
import jax.numpy as jnp
import numpy as np

from crosspool_jax.runtime.compiles import compile_counter


def test_counts_new_shapes_only():
    counter = compile_counter()
    assert compile_counter() is counter                  # one per process
    f = jax.jit(lambda x: x * 3 + 1)
    x4, x5 = np.arange(4, dtype=np.float32), np.arange(5, dtype=np.float32)
    before = counter.count
    f(x4).block_until_ready()
    after_first = counter.count
    f(x4).block_until_ready()                            # cached: no new executable
    assert counter.count == after_first
    assert after_first - before == 1
    f(x5).block_until_ready()                            # a new shape compiles once more
    assert counter.count == after_first + 1
    assert counter.seconds > 0
