"""No device memory idles in a crosspool arena (disagg/layout.py).

Every row is its content plus pages, but for alignment and the two halves' content depths
differing: the weight devices' rows hold pages beyond the experts, each attention side sits
on one KV device (its home), the FFN norms and routers with it, so nothing is stored twice;
on the bench's models and memory (scripts/bench_modes.py --quick on 4 devices) the arena
holds at least the pages of the `shared` baseline on the same devices. (A request using a
weight device's pages: tests/disagg/test_sharded_pipeline.py, and through the engine
tests/engine/test_engine_crosspool.py.)
"""
import jax
import numpy as np
import pytest

from crosspool_jax.disagg.arena import build_multi_arena
from crosspool_jax.disagg.layout import make_multi_layout
from crosspool_jax.kv.pool import KVPoolLayout
from crosspool_jax.models import ModelConfig
from crosspool_jax.models.params import side_bytes
from crosspool_jax.models.random_models import SHAPES

BENCH_GIB = 0.05


def _bench_configs(n_models=4):
    config = ModelConfig.from_hf_dict(SHAPES["qwen3moe-mini-2l"])
    return {f"m{i}": config for i in range(n_models)}


def test_bench_split_holds_at_least_shared_pages():
    """4 x qwen3moe-mini-2l on 2 KV + 2 weight devices of 0.05 GiB each (the bench's --quick
    case): the arena's pages >= the shared baseline's (each device: its model's weights, the
    rest pages), every model resident, every device holding pages."""
    configs = _bench_configs()
    budget = int(BENCH_GIB * (1 << 30))
    multi = make_multi_layout(configs, n_kv=2, n_w=2, row_elems=budget // 4, dtype="float32",
                              devices=jax.devices()[:4])
    assert multi.arena_elems * 4 <= budget
    assert multi.kv_region is None and multi.w_region is None          # every model resident
    weights = sum(sum(side_bytes(c, "float32")) for c in configs.values())
    shared = KVPoolLayout.from_bytes(4 * budget - weights, multi.first.page_elems, 4, "float32")
    assert sum(multi.device_pages) >= shared.num_pages
    L = configs["m0"].num_layers                      # a block: L pages on one device, both pools
    assert sum(p // L for p in multi.device_pages) >= sum(p // L for p in shared.usable_pages)
    assert all(p > 0 for p in multi.device_pages)                       # weight devices hold pages too
    assert sorted(multi.homes(n)[0] for n in multi.names) == [0, 0, 1, 1]   # one home each, balanced


@pytest.mark.parametrize("n_kv,n_w,n_models", [(2, 2, 4), (1, 1, 2), (2, 4, 3), (3, 1, 5)])
def test_every_row_element_is_content_or_page(n_kv, n_w, n_models):
    """content + pages + unused == the row on every device; unused is at most the halves'
    depth difference plus a part-page per half; nothing is stored twice (the content adds up
    to the models' parameters, up to alignment); no tensor overlaps a page or another tensor."""
    configs = _bench_configs(n_models)
    multi = make_multi_layout(configs, n_kv=n_kv, n_w=n_w, row_elems=(40 << 20) + 1000, dtype="float32",
                              devices=jax.devices()[:n_kv + n_w])
    pe = multi.first.page_elems
    for d in range(multi.num_devices):
        depth0, depth1 = multi.depths[d]
        unused = multi.unused_elems(d)
        room0, room1 = multi.half_elems - depth0, multi.arena_elems - multi.half_elems - depth1
        assert 0 <= unused <= abs(room0 - room1) + 2 * pe
        assert multi.content[d] <= max(depth0, depth1) * 2
        used = np.zeros(multi.arena_elems, np.int8)
        for lo, hi in multi.first.page_spans(d):
            used[lo:hi] += 1
        role = multi.first.role_of(d)
        for name in multi.names:
            lay = multi.model(name)
            if role == "kv" and d not in lay.homes:
                continue
            for s in lay.slots(role):
                if not s.name.startswith("pages/"):
                    used[s.offset:s.offset + s.size] += 1
        assert used.max() == 1, f"device {d}: a tensor overlaps a page or another tensor"
        assert int(used.sum()) == multi.content[d] + 2 * multi.device_pages[d] * pe
    params = sum(sum(side_bytes(c, "float32")) for c in configs.values()) // 4
    assert params <= sum(multi.content) <= params + 128 * 40 * n_models * (n_w + 1)


def test_built_rows_hold_each_tensor_once_and_zero_pages():
    """The builder writes each attention side only on its home and every expert shard on the
    weight rows: a row's non-zero elements all lie in its content spans."""
    from disagg_tiny import model
    params = {n: model(f, i)[1:] for i, (n, f) in enumerate([("a", "qwen3_moe"), ("b", "mixtral"), ("c", "qwen3_moe")])}
    configs = {n: model(f, i)[0] for i, (n, f) in enumerate([("a", "qwen3_moe"), ("b", "mixtral"), ("c", "qwen3_moe")])}
    multi = make_multi_layout(configs, n_kv=2, n_w=2, pages_per_device=8, devices=jax.devices()[:4])
    assert sorted(len(multi.homes(n)) for n in multi.names) == [1, 1, 1]
    rows = np.asarray(build_multi_arena(params, multi))
    for d in range(4):
        inside = np.zeros(multi.arena_elems, bool)
        for lo, hi in multi.content_spans(d):
            inside[lo:hi] = True
        assert not rows[d, ~inside].any() and rows[d, inside].any()
    for n in multi.names:
        lay = multi.model(n)
        emb = lay.slot("kv", "embed/embedding_VD")
        for k in range(2):
            on_k = np.array_equal(rows[k, emb.offset:emb.offset + emb.size],
                                  np.asarray(params[n][0]["embed"]["embedding_VD"]).reshape(-1))
            assert on_k == (k in lay.homes)
