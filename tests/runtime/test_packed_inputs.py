"""PackedArrays: the host arrays of a pytree as an int32 and a float32 buffer (device leaves passed
through), unpacked exactly on the host and in jit."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crosspool_jax.runtime.packed_inputs import PackedArrays, unpacked
from crosspool_jax.runtime.step_inputs import StepInputs


def _inputs(rng):
    shape = {"token_ids_T": (8,), "positions_T": (8,), "slots_LT": (2, 8), "page_indices_LSP": (2, 4, 3),
             "kv_lens_S": (4,), "cu_q_lens_S1": (5,), "num_seqs_1": (1,), "logits_indices_S": (4,)}
    return StepInputs(**{k: rng.integers(-5, 1000, s).astype(np.int32) for k, s in shape.items()})


def _check_equal(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert np.asarray(a).dtype == np.asarray(b).dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_round_trip_on_host_and_in_jit():
    rng = np.random.default_rng()
    tree = _inputs(rng)
    packed = PackedArrays.pack(tree)
    assert packed.ints.shape == (sum(np.size(x) for x in jax.tree.leaves(tree)),) and packed.floats.size == 0
    for got in (packed.unpack(), jax.jit(lambda p: unpacked(p))(packed)):
        _check_equal(got, tree)
        assert type(got) is StepInputs
    assert unpacked(tree) is tree


def test_mixed_dtypes_and_device_leaves():
    """float32, uint32 (every bit, e.g. an rng key) and bool host leaves, and a device leaf kept as it is."""
    rng = np.random.default_rng()
    on_device = jnp.asarray(rng.standard_normal((3, 2)), jnp.float32)
    tree = {"f": rng.standard_normal(5).astype(np.float32), "key": rng.integers(0, 2 ** 32, (4, 2), dtype=np.uint32),
            "mask": rng.random(6) < 0.5, "ids": rng.integers(-9, 9, (2, 3)).astype(np.int32), "w": on_device,
            "nested": (np.float32(-np.inf) * np.ones(2, np.float32),)}
    packed = PackedArrays.pack(tree)
    assert packed.ints.dtype == np.int32 and packed.floats.dtype == np.float32
    assert packed.ints.size == 8 + 6 + 6 and packed.floats.size == 7
    assert packed.device_leaves == (on_device,)
    for got in (packed.unpack(), jax.jit(lambda p: unpacked(p))(packed)):
        _check_equal(got, tree)


def test_unpackable_leaf_is_refused():
    with pytest.raises(ValueError, match="dtype int64"):
        PackedArrays.pack({"a": np.zeros(3, np.int32), "b": np.zeros(2, np.int64)})
