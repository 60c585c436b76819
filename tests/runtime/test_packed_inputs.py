"""PackedInt32: a pytree of int32 arrays as one buffer, unpacked exactly on the host and in jit."""
import jax
import numpy as np
import pytest

from crosspool_jax.runtime.packed_inputs import PackedInt32, unpacked
from crosspool_jax.runtime.step_inputs import StepInputs


def _inputs(rng):
    shape = {"token_ids_T": (8,), "positions_T": (8,), "slots_LT": (2, 8), "page_indices_LSP": (2, 4, 3),
             "kv_lens_S": (4,), "cu_q_lens_S1": (5,), "num_seqs_1": (1,), "logits_indices_S": (4,)}
    return StepInputs(**{k: rng.integers(-5, 1000, s).astype(np.int32) for k, s in shape.items()})


def test_round_trip_on_host_and_in_jit():
    rng = np.random.default_rng()
    tree = _inputs(rng)
    packed = PackedInt32.pack(tree)
    assert packed.buffer.shape == (sum(np.size(x) for x in jax.tree.leaves(tree)),)
    for got in (packed.unpack(), jax.jit(lambda p: unpacked(p))(packed)):
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(tree)):
            np.testing.assert_array_equal(np.asarray(a), b)
        assert type(got) is StepInputs
    assert unpacked(tree) is tree


def test_non_int32_leaf_is_refused():
    with pytest.raises(ValueError, match="every leaf must be int32, got float32"):
        PackedInt32.pack({"a": np.zeros(3, np.int32), "b": np.zeros(2, np.float32)})
