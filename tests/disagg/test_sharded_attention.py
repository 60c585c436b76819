"""Sequence-sharded attention: partials over each device's pages, merged by log-sum-exp, equal
the dense ragged paged attention over the whole pool (random inputs, shuffled pages, NaN in
every unused page, blocks of a sequence scattered over devices with holes, padding queries,
sliding window; MLA's latent rows and GPT-OSS's sinks, joined after the merge)."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec

from crosspool_jax.disagg.pages import PageMap
from crosspool_jax.disagg.sharded_attention import (EMPTY_LSE, merge_over_axis, merge_partials,
                                                    partial_paged_attention, with_sinks)
from pallas_kernels.ragged_paged_attention.reference import ragged_paged_attention_reference

N, K, H, G = 4, 2, 8, 4


def make_case(rng, n_dev, P=20, B=4, kv_heads=K, q_dim=H):
    """Sequences (q_len, kv_len) whose blocks sit on random devices, pages shuffled per device
    (kv_heads heads of H per token; q_dim: the queries' head dim, 2H for MLA's latent rows)."""
    pm = PageMap(P, n_dev)
    lens = [(1, 9), (5, 5), (3, 14), (2, 16), (4, 11)]       # decodes, a whole prefill, chunks
    free = [list(rng.permutation(P)) for _ in range(n_dev)]
    k = np.full((n_dev * P, G, kv_heads, H), np.nan, np.float32)
    v = np.full((n_dev * P, G, kv_heads, H), np.nan, np.float32)
    table = np.zeros((len(lens), B), np.int32)               # global ids (reference)
    for s, (_, kv_len) in enumerate(lens):
        for b in range(-(-kv_len // G)):
            d = int(rng.integers(n_dev))
            page = int(pm.global_of(d, free[d].pop()))
            table[s, b] = page
            k[page], v[page] = rng.normal(size=(2, G, kv_heads, H))
    T = 16                                                   # 15 real query rows + 1 padding
    q = rng.normal(size=(T, N, q_dim)).astype(np.float32)
    cu = np.concatenate([[0], np.cumsum([q_len for q_len, _ in lens])]).astype(np.int32)
    seq_T = np.full(T, -1, np.int32)
    pos_T = np.zeros(T, np.int32)
    for s, (q_len, kv_len) in enumerate(lens):
        seq_T[cu[s]:cu[s + 1]] = s
        pos_T[cu[s]:cu[s + 1]] = np.arange(kv_len - q_len, kv_len)
    kv_lens = np.array([kv_len for _, kv_len in lens], np.int32)
    return pm, k, v, table, q, cu, seq_T, pos_T, kv_lens


def local_tables(pm, table, kv_lens, d, B):
    """pages_SB / blocks_SB of device d: its blocks of each sequence, packed left, -1 after."""
    pages = np.zeros((len(table), B), np.int32)
    blocks = np.full((len(table), B), -1, np.int32)
    for s, row in enumerate(table):
        n_blocks = -(-int(kv_lens[s]) // G)
        devices, local = pm.split(row[:n_blocks])
        mine = np.nonzero(devices == d)[0]
        pages[s, :len(mine)], blocks[s, :len(mine)] = local[mine], mine
    return pages, blocks


@pytest.mark.parametrize("n_dev,window", [(1, None), (3, None), (3, 6)])
def test_merged_partials_equal_dense_paged_attention(n_dev, window):
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"random seed {seed}")
    rng = np.random.default_rng(seed)
    pm, k, v, table, q, cu, seq_T, pos_T, kv_lens = make_case(rng, n_dev)
    want = ragged_paged_attention_reference(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), kv_lens, table, cu,
                                            np.array([len(table)], np.int32), sliding_window=window)
    outs, lses = [], []
    P = pm.pages_per_device
    for d in range(n_dev):
        pages, blocks = local_tables(pm, table, kv_lens, d, B=6)   # wider than needed: unused columns
        out, lse = partial_paged_attention(jnp.asarray(q), jnp.asarray(k[d * P:(d + 1) * P]),
                                           jnp.asarray(v[d * P:(d + 1) * P]), pos_T, seq_T, kv_lens, pages, blocks,
                                           sliding_window=window)
        assert np.isfinite(np.asarray(out)).all() and np.isfinite(np.asarray(lse)).all()
        outs.append(out)
        lses.append(lse)
    got = np.asarray(merge_partials(jnp.stack(outs), jnp.stack(lses)))
    np.testing.assert_allclose(got, np.asarray(want), rtol=1e-5, atol=1e-5)
    assert (got[seq_T < 0] == 0).all()
    # a device holding none of a sequence's blocks adds nothing: lse EMPTY_LSE, out 0
    if n_dev == 3:
        holders = [{int(x) for x in pm.device_of(table[s, :-(-int(kv_lens[s]) // G)])} for s in range(len(table))]
        for d in range(n_dev):
            for t in np.nonzero(seq_T >= 0)[0]:
                if d not in holders[seq_T[t]]:
                    assert (np.asarray(lses[d])[t] == EMPTY_LSE).all() and (np.asarray(outs[d])[t] == 0).all()


def test_latent_rows_and_sinks_with_a_traced_window_merge_to_dense_paged_attention():
    """MLA's latent rows (K = 1: key = the row's two halves, value = its first R entries) and
    GPT-OSS's sinks, joined once after the merge over the axis (`with_sinks`), with a traced
    window, over 3 devices: the dense ragged paged attention with the same options."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"random seed {seed}")
    rng = np.random.default_rng(seed)
    n_dev, R = 3, 12
    pm, k, v, table, q, cu, seq_T, pos_T, kv_lens = make_case(rng, n_dev, kv_heads=1, q_dim=2 * H)
    sinks = rng.normal(size=N).astype(np.float32)
    window = jnp.int32(6)
    want = ragged_paged_attention_reference(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), kv_lens, table, cu,
                                            np.array([len(table)], np.int32), sliding_window=window,
                                            latent_value_dim=R, sinks=jnp.asarray(sinks))
    P = pm.pages_per_device
    partials = [partial_paged_attention(jnp.asarray(q), jnp.asarray(k[d * P:(d + 1) * P]),
                                        jnp.asarray(v[d * P:(d + 1) * P]), pos_T, seq_T, kv_lens,
                                        *local_tables(pm, table, kv_lens, d, B=6), sliding_window=window,
                                        latent_value_dim=R) for d in range(n_dev)]
    assert partials[0][0].shape == (len(q), N, R)
    mesh = Mesh(np.array(jax.devices()[:n_dev]), ("x",))
    fn = jax.shard_map(lambda o, s: tuple(a[None] for a in merge_over_axis(o[0], s[0], "x", return_lse=True)),
                       mesh=mesh, in_specs=(PartitionSpec("x"), PartitionSpec("x")), out_specs=PartitionSpec("x"))
    out, lse = fn(jnp.stack([o for o, _ in partials]), jnp.stack([s for _, s in partials]))
    got = np.asarray(with_sinks(out[0], lse[0], jnp.asarray(sinks)))
    np.testing.assert_allclose(got, np.asarray(want), rtol=1e-5, atol=1e-5)
    assert (got[seq_T < 0] == 0).all()


def test_merge_over_axis_equals_host_merge():
    rng = np.random.default_rng(0)
    n = 4
    out = rng.normal(size=(n, 3, 2, 5)).astype(np.float32)
    lse = rng.normal(size=(n, 3, 2)).astype(np.float32) * 3
    lse[1:, 0, 0] = EMPTY_LSE                                # only device 0 has keys for this row
    lse[:, 1, 1] = EMPTY_LSE                                 # no device has keys: 0
    out[:, 1, 1] = 0
    mesh = Mesh(np.array(jax.devices()[:n]), ("x",))
    fn = jax.shard_map(lambda o, s: merge_over_axis(o[0], s[0], "x")[None], mesh=mesh,
                       in_specs=(PartitionSpec("x"), PartitionSpec("x")), out_specs=PartitionSpec("x"))
    got = np.asarray(fn(out, lse))
    want = np.asarray(merge_partials(jnp.asarray(out), jnp.asarray(lse)))
    for d in range(n):
        np.testing.assert_allclose(got[d], want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(want[0, 0], out[0, 0, 0], rtol=1e-6)
    assert (want[1, 1] == 0).all()


def test_page_map_splits_and_refuses_outside_ids():
    pm = PageMap(8, 3)
    devices, local = pm.split([[0, 9], [23, 17]])
    assert devices.tolist() == [[0, 1], [2, 2]] and local.tolist() == [[0, 1], [7, 1]]
    assert pm.global_of(2, [7, 1]).tolist() == [23, 17]
    assert pm.home([[9, 0], [10, 1]]) == 1 and pm.block_devices([[9, 0], [10, 1]]).tolist() == [1, 0]
    assert pm.home([[9, 0], [10, 1]], homes=(0, 2)) == 0          # its model's homes decide
    with pytest.raises(ValueError, match="outside the pool"):
        pm.split([24])
    with pytest.raises(ValueError, match="different devices"):
        pm.block_devices([[9, 0], [1, 1]])
    with pytest.raises(ValueError, match="pages_per_device"):
        PageMap(0, 2)
