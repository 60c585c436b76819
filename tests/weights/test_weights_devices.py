"""Device roles, meshes and the FFN sharding rule on 8 simulated CPU devices."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from crosspool_jax.weights.devices import (
    DeviceRoles,
    deinterleave_gate_up,
    ffn_sharding_for,
    interleave_gate_up,
    kv_mesh,
    place_models,
    resolve_device_roles,
    weights_mesh,
)

DEVS = jax.devices()
# the CPU suite simulates 8 devices (tests/conftest.py); a GPU run (CROSSPOOL_TEST_ON_GPU=1) may have fewer
pytestmark = pytest.mark.skipif(len(DEVS) < 8, reason="needs the 8 simulated devices of the CPU suite")


def test_eight_devices():
    assert len(DEVS) == 8


@pytest.mark.parametrize("n_kv,n_w", [(1, 1), (2, 2), (4, 4), (6, 2)])
def test_crosspool_splits(n_kv, n_w):
    roles = resolve_device_roles("crosspool", n_kv, n_w)
    assert roles.kv_devices == tuple(DEVS[:n_kv])
    assert roles.weight_devices == tuple(DEVS[n_kv:n_kv + n_w])
    assert not set(roles.kv_devices) & set(roles.weight_devices)
    km, wm = kv_mesh(roles), weights_mesh(roles)
    assert km.axis_names == ("kv",) and km.shape["kv"] == n_kv
    assert wm.axis_names == ("expert",) and wm.shape["expert"] == n_w
    assert tuple(wm.devices.flat) == roles.weight_devices


def test_crosspool_defaults_and_degenerate():
    roles = resolve_device_roles("crosspool", None, None)
    assert roles.kv_devices == (DEVS[0],) and roles.weight_devices == (DEVS[1],)
    one = resolve_device_roles("crosspool", None, None, devices=DEVS[3:4])
    assert one.is_degenerate and one.kv_devices == one.weight_devices == (DEVS[3],)
    assert resolve_device_roles("crosspool", 1, 1, devices=DEVS[:1]).is_degenerate
    explicit = DeviceRoles((DEVS[5],), (DEVS[5],))
    assert explicit.is_degenerate and kv_mesh(explicit).shape["kv"] == 1
    assert weights_mesh(explicit).devices.flat[0] == DEVS[5]


def test_explicit_lists_devices_or_ids():
    roles = resolve_device_roles("crosspool", [DEVS[7], DEVS[6]], [1, 2, 3])
    assert roles.kv_devices == (DEVS[7], DEVS[6])
    assert roles.weight_devices == (DEVS[1], DEVS[2], DEVS[3])
    # count after a list: the first devices not holding KV
    roles = resolve_device_roles("crosspool", [0, 1], 2)
    assert roles.weight_devices == (DEVS[2], DEVS[3])


def test_shared_and_static():
    shared = resolve_device_roles("shared", None, None)
    assert shared.kv_devices == shared.weight_devices == tuple(DEVS)
    four = resolve_device_roles("shared", 4, None)
    assert four.kv_devices == four.weight_devices == tuple(DEVS[:4])
    static = resolve_device_roles("static", None, 6)
    assert static.weight_devices == tuple(DEVS[:6])


def test_place_models_greedy_by_bytes():
    # largest first onto the least loaded device; ties keep the order given / the lowest index
    sizes = {"a": 10, "b": 40, "c": 30, "d": 25, "e": 10}
    assert place_models(sizes, 2) == {"b": 0, "c": 1, "d": 1, "a": 0, "e": 0}
    assert place_models(sizes, 8) == {"b": 0, "c": 1, "d": 2, "a": 3, "e": 4}
    assert place_models({"x": 5, "y": 5}, 1) == {"x": 0, "y": 0}
    assert place_models({"x": 5, "y": 5, "z": 5}, 2) == {"x": 0, "y": 1, "z": 0}
    with pytest.raises(ValueError, match="num_devices"):
        place_models(sizes, 0)
    with pytest.raises(ValueError, match="model 'x' has -1 bytes"):
        place_models({"x": -1}, 2)
    with pytest.raises(ValueError, match="no models"):
        place_models({}, 2)


def test_errors():
    with pytest.raises(ValueError, match=r"6 \+ weight_devices=4 = 10 devices asked.*only 8"):
        resolve_device_roles("crosspool", 6, 4)
    with pytest.raises(ValueError, match=r"kv_devices=9 .*\(8\)"):
        resolve_device_roles("crosspool", 9, 1)
    with pytest.raises(ValueError, match="overlap"):
        resolve_device_roles("crosspool", [0, 1], [1, 2])
    with pytest.raises(ValueError, match="overlap"):
        DeviceRoles(tuple(DEVS[:2]), tuple(DEVS[:2]))
    assert DeviceRoles(tuple(DEVS[:2]), tuple(DEVS[:2]), mode="shared").kv_devices == tuple(DEVS[:2])
    with pytest.raises(ValueError, match="twice"):
        DeviceRoles((DEVS[0], DEVS[0]), (DEVS[1],))
    with pytest.raises(ValueError, match="weight_devices must not be empty"):
        DeviceRoles((DEVS[0],), ())
    with pytest.raises(ValueError, match="mode must be one of"):
        resolve_device_roles("monolithic", 1, 1)
    with pytest.raises(ValueError, match="no device with id 42"):
        resolve_device_roles("crosspool", [42], 1)
    with pytest.raises(ValueError, match="kv_devices must be >= 1"):
        resolve_device_roles("crosspool", 0, 1)
    with pytest.raises(ValueError, match="must select the same devices"):
        resolve_device_roles("shared", 2, 4)
    with pytest.raises(ValueError, match="asks for more devices"):
        resolve_device_roles("static", 9, None)


def _spec(path, shape, n, num_experts):
    mesh = weights_mesh(resolve_device_roles("crosspool", 8 - n, n))
    return ffn_sharding_for(path, shape, mesh, num_experts).spec


def test_sharding_expert_parallel_when_experts_divide():
    # stacked over 3 MoE layers: [L, E, D, 2F], [L, E, F, D]
    assert _spec("moe/w1", (3, 8, 16, 12), 4, 8) == P(None, "expert", None, None)
    assert _spec("moe/w2", (3, 8, 6, 16), 4, 8) == P(None, "expert", None, None)
    assert _spec("moe/w1", (8, 16, 12), 2, 8) == P("expert", None, None)  # unstacked
    assert _spec("moe/w1", (8, 16, 12), 1, 8) == P(None, None, None)  # one device: trivial


def test_sharding_tensor_parallel_otherwise():
    # 6 experts over 4 devices: not divisible -> TP on F (F = 8)
    assert _spec("moe/w1", (2, 6, 16, 16), 4, 6) == P(None, None, None, "expert")
    assert _spec("moe/w2", (2, 6, 8, 16), 4, 6) == P(None, None, "expert", None)
    # 2 experts over 4 devices (E < n) -> TP
    assert _spec("moe/w1", (2, 16, 16), 4, 2) == P(None, None, "expert")
    # F = 6 not divisible by 4 -> replicated
    assert _spec("moe/w1", (6, 16, 12), 4, 6) == P(None, None, None)
    assert _spec("moe/w2", (6, 6, 16), 4, 6) == P(None, None, None)
    # dense / shared-expert FFN: TP on F
    assert _spec("dense/w1", (8, 16, 16), 4, 8) == P(None, None, "expert")
    assert _spec("moe/shared/w2", (3, 8, 16), 4, 8) == P(None, "expert", None)


def test_sharding_small_leaves_replicated():
    for path, shape in [("moe/router", (3, 16, 8)), ("moe/norm", (3, 16)),
                        ("moe/shared_gate", (3, 16, 1)), ("moe/b1", (3, 8, 12))]:
        assert _spec(path, shape, 4, 8) == P(*([None] * len(shape)))


def test_gate_up_interleave_aligns_tp_blocks():
    rng = np.random.default_rng(0)
    d, f, n = 5, 8, 4
    w1 = rng.standard_normal((3, d, 2 * f)).astype(np.float32)
    inter = interleave_gate_up(w1, n)
    blk = 2 * f // n
    for i in range(n):
        block = inter[..., i * blk:(i + 1) * blk]
        np.testing.assert_array_equal(block[..., :blk // 2], w1[..., i * (f // n):(i + 1) * (f // n)])
        np.testing.assert_array_equal(block[..., blk // 2:], w1[..., f + i * (f // n):f + (i + 1) * (f // n)])
    np.testing.assert_array_equal(deinterleave_gate_up(inter, n), w1)
    np.testing.assert_array_equal(np.asarray(deinterleave_gate_up(jax.numpy.asarray(inter), n)), w1)
    with pytest.raises(ValueError, match="gate/up pairs"):
        interleave_gate_up(w1, 3)


def test_sharding_reads_dimension_letters_of_model_leaf_names():
    # names as crosspool_jax/models/params.py spells them
    assert _spec("moe/w1_LEDF2", (3, 8, 16, 12), 4, 8) == P(None, "expert", None, None)
    assert _spec("moe/w2_LEFD", (3, 8, 6, 16), 4, 8) == P(None, "expert", None, None)
    assert _spec("moe/w1_LEDF2", (3, 6, 16, 16), 4, 6) == P(None, None, None, "expert")
    assert _spec("moe/w2_LEFD", (3, 6, 8, 16), 4, 6) == P(None, None, "expert", None)
    assert _spec("moe/shared_w1_LDF2", (3, 16, 16), 4, 8) == P(None, None, "expert")
    assert _spec("moe/shared_w2_LFD", (3, 8, 16), 4, 8) == P(None, "expert", None)
    assert _spec("dense/w1_LDF2", (8, 16, 16), 4, 8) == P(None, None, "expert")  # L == E: no confusion
    assert _spec("dense/w2_LFD", (2, 6, 16), 4, 8) == P(None, None, None)  # F = 6: replicated
    for path, shape in [("moe/router_LDE", (3, 16, 8)), ("moe/norm_LD", (3, 16)),
                        ("moe/shared_gate_LD1", (3, 16, 1)), ("dense/norm_LD", (2, 16))]:
        assert _spec(path, shape, 4, 8) == P(*([None] * len(shape)))


def test_tp_layouts_compute_the_same_ffn():
    """TP over F (n=4): the contract layout under plain jit (GSPMD keeps it exact) and the
    interleaved layout under shard_map (local gate/up split, one psum) both match numpy."""
    rng = np.random.default_rng()
    n, t, d, f = 4, 5, 16, 8
    mesh = weights_mesh(resolve_device_roles("crosspool", 4, n))
    x = rng.standard_normal((t, d)).astype(np.float32)
    w1 = rng.standard_normal((d, 2 * f)).astype(np.float32)
    w2 = rng.standard_normal((f, d)).astype(np.float32)
    h = x @ w1
    gate, up = h[:, :f], h[:, f:]
    want = (gate / (1 + np.exp(-gate)) * up) @ w2

    s1 = ffn_sharding_for("dense/w1_DF2", w1.shape, mesh, None)
    s2 = ffn_sharding_for("dense/w2_FD", w2.shape, mesh, None)
    assert s1.spec == P(None, "expert") and s2.spec == P("expert", None)

    def swiglu(x, w1, w2):
        g, u = jax.numpy.split(x @ w1, 2, axis=-1)
        return (jax.nn.silu(g) * u) @ w2

    got = jax.jit(swiglu)(x, jax.device_put(w1, s1), jax.device_put(w2, s2))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4)

    shard_map = getattr(jax, "shard_map", None)
    if shard_map is None:
        from jax.experimental.shard_map import shard_map
    local = shard_map(lambda x, w1, w2: jax.lax.psum(swiglu(x, w1, w2), "expert"), mesh=mesh,
                      in_specs=(P(), s1.spec, s2.spec), out_specs=P())
    w1_inter = jax.device_put(interleave_gate_up(w1, n), s1)
    got = jax.jit(local)(x, w1_inter, jax.device_put(w2, s2))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4)
    # the contract layout under the same shard_map pairs gate with gate: wrong, hence the helper
    wrong = jax.jit(local)(x, jax.device_put(w1, s1), jax.device_put(w2, s2))
    assert not np.allclose(np.asarray(wrong), want, rtol=1e-3, atol=1e-2)


def test_parse_split():
    from crosspool_jax.weights.devices import parse_split
    assert parse_split("1+1") == (1, 1) and parse_split("6+2") == (6, 2)
    for bad in ("2", "0+1", "1+x", "+2"):
        with pytest.raises(ValueError, match="'KV\\+W' with two positive counts"):
            parse_split(bad)
