"""WeightsPool: swapping pytrees between host and device within a budget (8 simulated CPU devices)."""
import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P, SingleDeviceSharding

from crosspool_jax.weights import WeightsPool, WeightsPoolBusyError, resolve_device_roles

DEV = jax.devices()[0]
E, D, F, L = 4, 8, 6, 2


def _one_device(model, path, shape):
    return SingleDeviceSharding(DEV)


def _ffn_params(rng, e=E, f=F):
    """A MoE FFN pytree, fresh random values (float32 and bfloat16 leaves)."""
    return {
        "moe": {
            "w1_LEDF2": rng.standard_normal((L, e, D, 2 * f)).astype(np.float32),
            "w2_LEFD": rng.standard_normal((L, e, f, D)).astype(np.float32),
            "router_LDE": rng.standard_normal((L, D, e)).astype(np.float32),
            "norm": [rng.standard_normal((L, D)).astype(jax.numpy.bfloat16)],
        }
    }


def _nbytes(tree):
    return sum(x.nbytes for x in jax.tree_util.tree_leaves(tree))


def _assert_identical(device_tree, host_tree):
    assert jax.tree_util.tree_structure(device_tree) == jax.tree_util.tree_structure(host_tree)
    for got, want in zip(jax.tree_util.tree_leaves(device_tree), jax.tree_util.tree_leaves(host_tree)):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(np.asarray(got).view(np.uint8), np.asarray(want).view(np.uint8))


def _live_ids():
    return {id(x) for x in jax.live_arrays() if x.sharding.memory_kind == "device"}


@pytest.fixture
def models():
    rng = np.random.default_rng()
    return {f"m{i}": _ffn_params(rng) for i in range(4)}


@pytest.mark.parametrize("pinned", [None, False])
def test_budget_swaps_lru_and_values_come_back(models, pinned):
    size = _nbytes(models["m0"])
    pool = WeightsPool(2 * size, _one_device, use_pinned_host=pinned)  # holds two of four
    for name, params in models.items():
        pool.register(name, params)
    assert pool.resident_models() == ["m0", "m1"]  # fit without eviction; the rest host only
    assert pool.model_bytes("m0") == size and pool.bytes_resident == 2 * size
    host_kind = "pinned_host" if pinned is None else None
    assert all(getattr(getattr(h, "sharding", None), "memory_kind", None) == host_kind
               for h in pool.host_leaves("m2"))
    for name in ["m2", "m3", "m0", "m1", "m2"]:
        before = pool.stats()
        tree = pool.acquire(name)
        _assert_identical(tree, models[name])
        pool.release(name)
        after = pool.stats()
        assert after.swaps_in == before.swaps_in + 1
        assert after.swaps_out == before.swaps_out + 1
        assert after.bytes_swapped_in == before.bytes_swapped_in + size
        assert after.last_swap_in_seconds[name] > 0
        assert pool.bytes_resident <= 2 * size
    # LRU: the two most recently acquired are resident
    assert pool.resident_models() == ["m1", "m2"]
    # acquiring a resident model swaps nothing
    before = pool.stats()
    _assert_identical(pool.acquire("m1"), models["m1"])
    pool.release("m1")
    assert pool.stats().swaps_in == before.swaps_in
    stats = pool.stats()
    assert stats.resident == {"m0": False, "m1": True, "m2": True, "m3": False}
    assert stats.swap_in_seconds >= sum(stats.last_swap_in_seconds.values()) - 1e-9
    assert stats.budget_bytes == 2 * size


def test_in_use_models_are_never_evicted(models):
    size = _nbytes(models["m0"])
    pool = WeightsPool(2 * size, _one_device)
    for name, params in models.items():
        pool.register(name, params, resident=False)
    a = pool.acquire("m0")
    b = pool.acquire("m1")
    with pytest.raises(WeightsPoolBusyError, match="in use"):
        pool.acquire("m2")
    assert pool.prefetch("m2") is False  # a hint: no room now, nothing started
    pool.release("m1")
    c = pool.acquire("m2")  # evicts m1, never m0
    assert pool.is_resident("m0") and not pool.is_resident("m1")
    _assert_identical(a, models["m0"])  # still valid while held
    _assert_identical(c, models["m2"])
    with pytest.raises(WeightsPoolBusyError):
        pool.evict("m0")
    with pytest.raises(ValueError, match="not in use"):
        pool.release("m1")
    del b


def test_eviction_frees_device_memory(models):
    size = _nbytes(models["m0"])
    pool = WeightsPool(size, _one_device)
    pool.register("m0", models["m0"], resident=True)
    pool.register("m1", models["m1"], resident=False)
    tree = pool.acquire("m0")
    ids = {id(x) for x in jax.tree_util.tree_leaves(tree)}
    assert ids <= _live_ids()
    in_use_before = (DEV.memory_stats() or {}).get("bytes_in_use")
    pool.release("m0")
    pool.evict("m0")
    assert all(x.is_deleted() for x in jax.tree_util.tree_leaves(tree))
    assert not ids & _live_ids()
    if in_use_before is not None:  # GPU/TPU report allocator stats; the CPU client does not
        assert DEV.memory_stats()["bytes_in_use"] <= in_use_before - size
    pool.acquire("m1")
    pool.release("m1")
    pool.evict("m1")
    pool.unregister("m0")
    assert pool.models() == ["m1"] and pool.bytes_resident == 0


def test_too_large_model_raises_naming_sizes(models):
    size = _nbytes(models["m0"])
    pool = WeightsPool(size - 1, _one_device)
    with pytest.raises(ValueError, match=rf"'big' needs {size} bytes.*budget of {size - 1}"):
        pool.register("big", models["m0"], resident=True)
    assert pool.models() == []  # a failed register leaves nothing behind
    pool.register("big", models["m0"])  # resident=None: host only, it cannot fit
    assert not pool.is_resident("big")
    with pytest.raises(ValueError, match="more than the whole pool budget"):
        pool.acquire("big")
    with pytest.raises(ValueError, match="not registered"):
        pool.acquire("nobody")
    with pytest.raises(ValueError, match="already registered"):
        pool.register("big", models["m1"])


def test_prefetch_then_acquire(models):
    size = _nbytes(models["m0"])
    pool = WeightsPool(size, _one_device)
    pool.register("m0", models["m0"], resident=True)
    pool.register("m1", models["m1"], resident=False)
    assert pool.prefetch("m1") is True  # m0 not in use: evicted, transfer started
    assert pool.is_resident("m1") and not pool.is_resident("m0")
    assert "m1" not in pool.stats().last_swap_in_seconds  # not waited on yet
    assert pool.prefetch("m1") is True  # already under way: no second transfer
    assert pool.stats().swaps_in == 2
    tree = pool.acquire("m1")
    _assert_identical(tree, models["m1"])
    stats = pool.stats()
    assert stats.swaps_in == 2 and stats.last_swap_in_seconds["m1"] > 0
    assert stats.acquire_wait_seconds <= stats.swap_in_seconds
    pool.release("m1")
    # a prefetched model that is evicted before anyone acquires it is dropped cleanly
    assert pool.prefetch("m0")
    pool.evict("m0")
    assert pool.resident_models() == []
    _assert_identical(pool.acquire("m0"), models["m0"])


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs the 8 simulated devices of the CPU suite")
def test_multi_device_sharding_is_kept():
    rng = np.random.default_rng()
    roles = resolve_device_roles("crosspool", 4, 4)
    mesh = Mesh(np.array(roles.weight_devices, dtype=object), ("expert",))
    params = {"a": _ffn_params(rng), "b": _ffn_params(rng, e=6, f=8)}
    # a: 4 experts over 4 devices (expert axis split); b: 6 experts -> its F axis split (F = 8)
    split = {"a": {"w1_LEDF2": P(None, "expert", None, None), "w2_LEFD": P(None, "expert", None, None)},
             "b": {"w1_LEDF2": P(None, None, None, "expert"), "w2_LEFD": P(None, None, "expert", None)}}

    def sharding_fn(model, path, shape):     # a placement the pool must keep across swaps
        return NamedSharding(mesh, split[model].get(path.rsplit("/", 1)[-1], P()))

    pool = WeightsPool(None, sharding_fn)
    pool.register("a", params["a"])
    pool.register("b", jax.device_put(params["b"], NamedSharding(mesh, P())), resident=False)
    pool.evict("a")
    tree = pool.acquire("a")
    _assert_identical(tree, params["a"])
    assert tree["moe"]["w1_LEDF2"].sharding == NamedSharding(mesh, P(None, "expert", None, None))
    assert tree["moe"]["w1_LEDF2"].sharding.memory_kind == "device"
    assert tree["moe"]["w1_LEDF2"].addressable_shards[0].data.shape == (L, 1, D, 2 * F)
    assert set(tree["moe"]["w1_LEDF2"].sharding.device_set) == set(roles.weight_devices)
    assert tree["moe"]["router_LDE"].sharding.is_fully_replicated
    # replicated leaves count once per device holding them
    expected = sum(x.nbytes for x in [params["a"]["moe"]["w1_LEDF2"], params["a"]["moe"]["w2_LEFD"]]) + 4 * (
        params["a"]["moe"]["router_LDE"].nbytes + params["a"]["moe"]["norm"][0].nbytes)
    assert pool.model_bytes("a") == expected
    tb = pool.acquire("b")
    _assert_identical(tb, params["b"])
    assert tb["moe"]["w1_LEDF2"].sharding.spec == P(None, None, None, "expert")
    assert tb["moe"]["w2_LEFD"].sharding.spec == P(None, None, "expert", None)
    assert tb["moe"]["w2_LEFD"].addressable_shards[0].data.shape == (L, 6, 2, D)
    pool.release("a")
    pool.release("b")


def test_adopts_device_arrays_already_placed():
    rng = np.random.default_rng()
    host = _ffn_params(rng)
    params = jax.device_put(host, DEV)
    pool = WeightsPool(None, _one_device)
    before = pool.stats().swaps_in
    pool.register("m", params, resident=True)
    assert pool.stats().swaps_in == before  # no transfer: placed arrays adopted
    tree = pool.acquire("m")
    assert tree["moe"]["w1_LEDF2"] is params["moe"]["w1_LEDF2"]
    pool.release("m")
    pool.evict("m")
    assert params["moe"]["w1_LEDF2"].is_deleted()  # adopted arrays belong to the pool
    _assert_identical(pool.acquire("m"), host)


def test_threads_share_the_pool(models):
    """Concurrent acquire/release from several threads: values right, budget and pins respected."""
    import random
    import threading

    size = _nbytes(models["m0"])
    pool = WeightsPool(2 * size, _one_device)
    for name, params in models.items():
        pool.register(name, params, resident=False)
    errors = []

    def worker(seed):
        rnd = random.Random(seed)
        try:
            for _ in range(15):
                name = rnd.choice(sorted(models))
                if rnd.random() < 0.3:
                    pool.prefetch(name)
                try:
                    tree = pool.acquire(name)
                except WeightsPoolBusyError:
                    continue
                assert pool.bytes_resident <= 2 * size
                _assert_identical(tree, models[name])
                pool.release(name)
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    stats = pool.stats()
    assert stats.swaps_in >= 2 and stats.swaps_in - stats.swaps_out == len(pool.resident_models())
    assert pool.bytes_resident <= 2 * size
