"""PackedArrays: the arrays of a pytree as one int32 buffer (device leaves passed through), packed on
the host or inside a program, unpacked exactly on either side."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crosspool_jax.runtime.packed_arrays import PackedArrays, unpacked
from crosspool_jax.runtime.step_inputs import StepInputs


def _inputs(rng):
    shape = {"token_ids_T": (8,), "positions_T": (8,), "slots_LT": (2, 8), "page_indices_LSP": (2, 4, 3),
             "kv_lens_S": (4,), "cu_q_lens_S1": (5,), "num_seqs_1": (1,), "logits_indices_S": (4,)}
    return StepInputs(**{k: rng.integers(-5, 1000, s).astype(np.int32) for k, s in shape.items()})


def _mixed(rng):
    """float32 (with -inf and nan), uint32 (every bit, e.g. an rng key), bool, int32, a 0-size leaf."""
    f = rng.standard_normal(5).astype(np.float32)
    f[1], f[3] = -np.inf, np.nan
    return {"f": f, "key": rng.integers(0, 2 ** 32, (4, 2), dtype=np.uint32), "mask": rng.random(6) < 0.5,
            "ids": rng.integers(-9, 9, (2, 3)).astype(np.int32), "none": None,
            "nested": (rng.standard_normal((2, 0)).astype(np.float32), np.float32(-1.5) * np.ones(2, np.float32))}


def _check_equal(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert np.asarray(a).dtype == np.asarray(b).dtype and np.shape(a) == np.shape(b)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_round_trip_on_host_and_in_jit():
    rng = np.random.default_rng()
    tree = _inputs(rng)
    packed = PackedArrays.pack(tree)
    assert packed.data.shape == (sum(np.size(x) for x in jax.tree.leaves(tree)),) and packed.data.dtype == np.int32
    for got in (packed.unpack(), jax.jit(lambda p: unpacked(p))(packed)):
        _check_equal(got, tree)
        assert type(got) is StepInputs
    assert unpacked(tree) is tree


def test_mixed_dtypes_and_device_leaves():
    rng = np.random.default_rng()
    on_device = jnp.asarray(rng.standard_normal((3, 2)), jnp.float32)
    tree = {**_mixed(rng), "w": on_device}
    packed = PackedArrays.pack(tree)
    assert packed.data.dtype == np.int32 and packed.data.size == 5 + 8 + 6 + 6 + 0 + 2
    assert packed.device_leaves == (on_device,)
    for got in (packed.unpack(), jax.jit(lambda p: unpacked(p))(packed)):
        _check_equal(got, tree)


@pytest.mark.parametrize("lead", [False, True])
def test_program_outputs_come_back_as_one_buffer(lead):
    """A program packs its outputs (`pack_device`): one array comes back; the host unpacks it
    bit for bit. With `lead`, each leaf's leading axis stays the buffer's."""
    rng = np.random.default_rng()
    tree = _mixed(rng)
    if lead:       # every leaf with a leading axis of 3
        tree = jax.tree.map(lambda a: np.stack([a] * 3), tree)
    out = jax.jit(lambda t: PackedArrays.pack_device(t, lead=lead))(tree)
    assert isinstance(out.data, jax.Array) and out.device_leaves == ()
    host = jax.device_get(out)
    assert host.data.ndim == (2 if lead else 1) and (not lead or host.data.shape[0] == 3)
    _check_equal(host.unpack(), tree)


def test_unpackable_leaf_is_refused():
    with pytest.raises(ValueError, match="dtype int64"):
        PackedArrays.pack({"a": np.zeros(3, np.int32), "b": np.zeros(2, np.int64)})
    with pytest.raises(ValueError, match="dtype bfloat16"):
        jax.jit(lambda x: PackedArrays.pack_device(x))(jnp.zeros(3, jnp.bfloat16))
    with pytest.raises(ValueError, match="leading axes differ"):
        jax.jit(lambda t: PackedArrays.pack_device(t, lead=True))((jnp.zeros((2, 3)), jnp.zeros((3,))))
