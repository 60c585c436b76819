"""Swap-in latency and bandwidth of parameter pytrees: host->device, device->host, and through
the WeightsPool (cold acquire with an eviction, prefetch then acquire). Prints one table.

    python scripts/bench_swap.py --sizes_mib=64,256,1024,4096 --devices=1
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python scripts/bench_swap.py --devices=4

Each row: one pytree of `--leaves` equal leaves totalling the size, sharded over the first
`--devices` devices on the leading axis; host memory "pinned" (pinned_host memory kind, where
the platform has it) or "numpy" (plain host RAM). Times are medians over `--repeats`; GB/s is
bytes / time / 1e9.

Into the CrossPool arena (`--arena_splits=1+1,2+2`, skip the pytree table with `--sizes_mib=`):
two copies of `--arena_model` (random weights, `models.random_models.SHAPES`) share one slot
of each budgeted region (weights_pool_bytes and attention_pool_bytes of exactly one model),
so every acquire of the other swaps its attention side into the KV rows and its expert
shards into the weight rows, written in place (`disagg/residency.py`):

    python scripts/bench_swap.py --sizes_mib= --arena_splits=1+1 --arena_model=mixtral-8x7b-2l

Per split: bytes per swap-in (all rows of both roles), cold acquire (evict, host->device,
in-place write, until the arena is ready), prefetch call, and the wait of the acquire after it.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from crosspool_jax.weights import WeightsPool  # noqa: E402
from crosspool_jax.weights.devices import parse_split  # noqa: E402
from pallas_kernels.timing import time_calls  # noqa: E402
from crosspool_jax.weights.pool import supports_pinned_host  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("sizes_mib", ["16", "64", "256"], "pytree sizes in MiB")
flags.DEFINE_integer("leaves", 8, "leaves per pytree")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "leaf dtype")
flags.DEFINE_integer("repeats", 5, "timed repetitions per measurement (after one warm-up)")
flags.DEFINE_integer("devices", 1, "devices to shard each leaf over (leading axis)")
flags.DEFINE_list("host", ["pinned", "numpy"], "host memory kinds to measure: pinned, numpy")
flags.DEFINE_list("arena_splits", [], "crosspool splits KV+W (e.g. 1+1,2+2): swap-in into the arena")
flags.DEFINE_string("arena_model", "qwen3moe-mini-2l", "random model shape for the arena rows "
                    "(crosspool_jax.models.random_models.SHAPES)")


def _median_seconds(fn, repeats):
    """Median seconds of fn() (it waits for its own transfers) after one warm-up call."""
    return time_calls(fn, inner=1, reps=repeats, warmup=1)


def _make_tree(nbytes, leaves, dtype, n_dev, rng):
    itemsize = np.dtype(dtype).itemsize
    rows = max(n_dev, (nbytes // leaves // itemsize // 1024) // n_dev * n_dev)
    bits = np.dtype(f"uint{8 * itemsize}")
    return [rng.integers(0, 1 << 14, (rows, 1024), dtype=bits).view(dtype) for _ in range(leaves)]


def _row(size_mib, host, tree, sharding, repeats):
    nbytes = sum(x.nbytes for x in tree)
    pinned = host == "pinned"
    host_sharding = sharding.with_memory_kind("pinned_host") if pinned else None
    host_tree = [jax.device_put(x, host_sharding) for x in tree] if pinned else tree
    jax.block_until_ready(host_tree)

    def h2d():
        jax.block_until_ready([jax.device_put(h, sharding) for h in host_tree])

    dev_tree = [jax.device_put(h, sharding) for h in host_tree]
    jax.block_until_ready(dev_tree)
    if not all(np.array_equal(np.asarray(a).view(np.uint8), b.view(np.uint8))
               for a, b in zip(dev_tree[:1], tree[:1])):
        raise AssertionError("host->device copy changed the data")

    def d2h():
        if pinned:
            jax.block_until_ready([jax.device_put(d, host_sharding) for d in dev_tree])
        else:
            # a fresh device array each time: jax caches an array's numpy copy after the first
            # device_get, which would time nothing (adds a device-side copy, ~1% of the transfer)
            jax.device_get([jnp.copy(d) for d in dev_tree])

    t_h2d = _median_seconds(h2d, repeats)
    t_d2h = _median_seconds(d2h, repeats)

    # through the pool: budget for one model, two models alternate -> each acquire swaps
    pool = WeightsPool(_one_model_budget(tree, sharding), lambda m, p, s: sharding,
                       use_pinned_host=pinned)
    pool.register("a", tree, resident=True)
    pool.register("b", tree, resident=False)
    names = iter(["b", "a"] * (repeats + 1))

    def cold_acquire():
        name = next(names)
        jax.block_until_ready(pool.acquire(name))
        pool.release(name)

    t_cold = _median_seconds(cold_acquire, repeats)
    prefetch_call, wait = [], []
    for _ in range(repeats):
        other = "a" if pool.is_resident("b") else "b"
        t0 = time.perf_counter()
        pool.prefetch(other)
        prefetch_call.append(time.perf_counter() - t0)
        w0 = pool.stats().acquire_wait_seconds
        pool.acquire(other)
        wait.append(pool.stats().acquire_wait_seconds - w0)
        pool.release(other)
    stats = pool.stats()
    gbps = lambda t: nbytes / t / 1e9 if t > 0 else float("inf")
    return (f"{size_mib:>8} {host:>6} {t_h2d * 1e3:>9.2f} {gbps(t_h2d):>8.2f} {t_d2h * 1e3:>9.2f} "
            f"{gbps(t_d2h):>8.2f} {t_cold * 1e3:>10.2f} {gbps(t_cold):>8.2f} "
            f"{statistics.median(prefetch_call) * 1e3:>9.3f} {statistics.median(wait) * 1e3:>9.2f} "
            f"{stats.swaps_in:>6}")


def _one_model_budget(tree, sharding):
    """Device bytes of `tree` under `sharding`: the budget that holds exactly one such model."""
    return sum(int(np.prod(sharding.shard_shape(x.shape))) * x.itemsize * len(sharding.device_set)
               for x in tree)


def _arena_params():
    """(config, host params) of `--arena_model`: drawn on the device (fast), fetched once."""
    from crosspool_jax.models.random_models import SHAPES
    from crosspool_jax.models import ModelConfig, init_random_params

    config = ModelConfig.from_hf_dict(SHAPES[FLAGS.arena_model])
    return config, jax.device_get(init_random_params(config, jax.random.key(0), FLAGS.dtype))


def _arena_row(split: str, host: str, repeats: int, config, params) -> str:
    """Swap-in of one model into a crosspool arena of two same-shaped models with one slot per role."""
    from crosspool_jax.disagg.layout import make_multi_layout
    from crosspool_jax.disagg.residency import build_residency

    n_kv, n_w = parse_split(split)
    configs = {"a": config, "b": config}
    probe = make_multi_layout(configs, n_kv=n_kv, n_w=n_w, pages_per_device=16, dtype=FLAGS.dtype)
    itemsize = np.dtype(jax.numpy.dtype(FLAGS.dtype)).itemsize
    budgets = {role: probe.region_elems("a", role) * n * itemsize for role, n in (("kv", n_kv), ("w", n_w))}
    layout = make_multi_layout(configs, n_kv=n_kv, n_w=n_w, pages_per_device=16, dtype=FLAGS.dtype,
                               attention_pool_bytes=budgets["kv"], weights_pool_bytes=budgets["w"])
    res = build_residency({"a": params, "b": params}, layout, use_pinned_host=host == "pinned")
    names = iter(["b", "a"] * (2 * repeats + 2))

    def cold_acquire():
        name = next(names)
        res.acquire(name)
        res.release(name)
        jax.block_until_ready(res.arena.array)

    t_cold = _median_seconds(cold_acquire, repeats)
    prefetch_call, wait = [], []
    for _ in range(repeats):
        other = next(names)
        t0 = time.perf_counter()
        res.prefetch(other)
        prefetch_call.append(time.perf_counter() - t0)
        w0 = sum(st.acquire_wait_seconds for st in res.stats().values())
        res.acquire(other)
        wait.append(sum(st.acquire_wait_seconds for st in res.stats().values()) - w0)
        res.release(other)
        jax.block_until_ready(res.arena.array)
    stats = res.stats()
    per_swap = {role: st.bytes_swapped_in / max(st.swaps_in, 1) for role, st in stats.items()}
    nbytes = sum(per_swap.values())
    landed = sum(st.swap_in_seconds for st in stats.values()) / max(sum(st.swaps_in for st in stats.values()), 1)
    return (f"{split:>6} {host:>6} {per_swap['kv'] / 2**20:>9.1f} {per_swap['w'] / 2**20:>9.1f} "
            f"{t_cold * 1e3:>10.2f} {nbytes / t_cold / 1e9:>8.2f} {landed * 1e3:>10.2f} "
            f"{statistics.median(prefetch_call) * 1e3:>9.3f} {statistics.median(wait) * 1e3:>9.2f} "
            f"{stats['w'].swaps_in:>6}")


def arena_table() -> None:
    devices = jax.devices()
    hosts = [h for h in FLAGS.host if h != "pinned" or supports_pinned_host(
        jax.sharding.SingleDeviceSharding(devices[0]))]
    print(f"arena swap-in: {FLAGS.arena_model}, dtype {FLAGS.dtype}, two models, one slot per role, "
          f"median of {FLAGS.repeats}")
    print(f"{'split':>6} {'host':>6} {'attn MiB':>9} {'ffn MiB':>9} {'acquire ms':>10} {'acq GB/s':>8} "
          f"{'landed ms':>10} {'prefetch':>9} {'wait ms':>9} {'swaps':>6}")
    config, params = _arena_params()
    for split in FLAGS.arena_splits:
        for host in hosts:
            print(_arena_row(split, host, FLAGS.repeats, config, params), flush=True)
    print("MiB: bytes one swap-in moves, over all rows of the role; acquire: cold acquire of the "
          "swapped-out model until the arena is written; landed: mean per-role wall time from a "
          "transfer's start until its data was on device (the registry's swap_in_seconds)")


def main(argv):
    del argv
    devices = jax.devices()[:FLAGS.devices]
    if len(devices) < FLAGS.devices:
        raise ValueError(f"--devices={FLAGS.devices} but only {len(jax.devices())} devices exist")
    mesh = Mesh(np.array(devices, dtype=object), ("expert",))
    sharding = NamedSharding(mesh, PartitionSpec("expert", None))
    dtype = jax.numpy.bfloat16 if FLAGS.dtype == "bfloat16" else np.float32
    hosts = [h for h in FLAGS.host if h != "pinned" or supports_pinned_host(sharding)]
    print(f"jax {jax.__version__}, {devices[0].platform}: {devices[0].device_kind} x{len(devices)}, "
          f"dtype {FLAGS.dtype}, {FLAGS.leaves} leaves, median of {FLAGS.repeats}")
    if set(FLAGS.host) - set(hosts):
        print("(pinned_host memory is not available on this platform: pinned rows skipped)")
    rng = np.random.default_rng(0)
    sizes = [x for x in FLAGS.sizes_mib if x]
    if sizes:
        print(f"{'MiB':>8} {'host':>6} {'h2d ms':>9} {'h2d GB/s':>8} {'d2h ms':>9} {'d2h GB/s':>8} "
              f"{'acquire ms':>10} {'acq GB/s':>8} {'prefetch':>9} {'wait ms':>9} {'swaps':>6}")
    for size in sizes:
        tree = _make_tree(int(size) << 20, FLAGS.leaves, dtype, len(devices), rng)
        for host in hosts:
            print(_row(size, host, tree, sharding, FLAGS.repeats), flush=True)
    if sizes:
        print("acquire: cold acquire of a swapped-out model (evicts the other, swaps in, waits);"
              " prefetch: ms the prefetch call takes (non-blocking); wait: ms acquire then blocks")
    if FLAGS.arena_splits:
        arena_table()


if __name__ == "__main__":
    app.run(main)
