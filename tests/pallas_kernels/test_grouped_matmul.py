"""grouped_matmul (GPU Triton and TPU Mosaic kernels, interpret mode) against lax.ragged_dot,
and layer_matmul (the GPU kernel over one group: a layer of a stacked matrix) against jnp.dot.

Tolerances: float32 runs at full precision (conftest), so kernel and reference differ only in
summation order (K chunked): 1e-4 relative to the output scale. bfloat16 inputs accumulate in
float32 in both, the output is rounded once to bf16 (2^-8 relative): 1e-2 of the scale.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.fused_moe import BlockConfig, ExpertRows, grouped_matmul, grouped_matmul_reference, layer_matmul
from pallas_kernels.fused_moe.layout import gmm_layout, max_tiles

TOL = {jnp.float32: 1e-4, jnp.bfloat16: 1e-2}
_rng = np.random.default_rng()  # fresh inputs every run


def _inputs(M, K, N, sizes, dtype):
    lhs = jnp.asarray(_rng.standard_normal((M, K), np.float32), dtype)
    rhs = jnp.asarray(_rng.standard_normal((len(sizes), K, N), np.float32) / np.sqrt(K), dtype)
    return lhs, rhs, jnp.asarray(sizes, jnp.int32)


def _assert_close(got, want, dtype):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    scale = max(1.0, float(np.abs(want).max()))
    err = float(np.abs(got - want).max())
    assert err <= TOL[dtype] * scale, f"max err {err} > {TOL[dtype]} * {scale}"


def _random_sizes(rng, G, total, empty):
    """G sizes summing to total with `empty` groups forced to 0."""
    live = np.sort(rng.choice(G, G - empty, replace=False))
    cuts = np.sort(rng.integers(0, total + 1, len(live) - 1))
    sizes = np.zeros(G, np.int64)
    sizes[live] = np.diff(np.concatenate([[0], cuts, [total]]))
    return sizes


CASES = [  # (M, K, N, G, rows in groups, empty groups, dtype)
    (40, 64, 32, 8, 40, 3, jnp.float32),
    (48, 128, 64, 16, 37, 9, jnp.float32),      # 11 rows beyond the group total
    (64, 64, 128, 8, 64, 2, jnp.bfloat16),
]


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize("M,K,N,G,total,empty,dtype", CASES)
def test_matches_ragged_dot(backend, M, K, N, G, total, empty, dtype):
    sizes = _random_sizes(_rng, G, total, empty)
    lhs, rhs, gs = _inputs(M, K, N, sizes, dtype)
    got = grouped_matmul(lhs, rhs, gs, backend=backend, interpret=True)
    assert got.shape == (M, N) and got.dtype == lhs.dtype
    _assert_close(got, grouped_matmul_reference(lhs, rhs, gs), dtype)
    assert np.all(np.asarray(got[total:], np.float32) == 0.0), "rows beyond the total not zero"


def test_expert_rows_inside_a_larger_buffer():
    """rhs as ExpertRows: G groups at a traced first row of a NaN-filled [R, N] buffer (the
    arena-row case) give the same result as the [G, K, N] array."""
    M, K, N, G = 40, 64, 32, 8
    sizes = _random_sizes(_rng, G, M, 2)
    lhs, rhs, gs = _inputs(M, K, N, sizes, jnp.float32)
    first = 3 * K + 5                                   # not a multiple of K
    rows = jnp.full((first + G * K + 7, N), jnp.nan, jnp.float32)
    rows = jax.lax.dynamic_update_slice_in_dim(rows, rhs.reshape(G * K, N), first, 0)
    want = grouped_matmul_reference(lhs, rhs, gs)
    for backend in ("gpu", "tpu", "reference"):
        run = jax.jit(lambda r0: grouped_matmul(
            lhs, ExpertRows(rows, r0, num_groups=G, group_rows=K), gs, backend=backend, interpret=True))
        _assert_close(run(jnp.int32(first)), want, jnp.float32)
    with pytest.raises(ValueError, match="do not fit"):
        ExpertRows(rows[:G * K - 1], 0, num_groups=G, group_rows=K)


def test_all_groups_empty_gives_zeros():
    lhs, rhs, gs = _inputs(16, 64, 32, [0] * 8, jnp.float32)
    got = grouped_matmul(lhs, rhs, gs, backend="gpu", interpret=True)
    assert np.all(np.asarray(got) == 0.0)


def test_group_sizes_past_m_are_truncated():
    lhs, rhs, gs = _inputs(32, 64, 32, [20, 0, 30, 5], jnp.float32)
    got = grouped_matmul(lhs, rhs, gs, backend="gpu", interpret=True)
    want = grouped_matmul_reference(lhs, rhs, jnp.asarray([20, 0, 12, 0], jnp.int32))
    _assert_close(got, want, jnp.float32)


def test_explicit_config_and_reference_backend():
    lhs, rhs, gs = _inputs(32, 64, 64, [7, 0, 9, 16], jnp.float32)
    cfg = BlockConfig(block_m=16, block_n=32, block_k=32, num_warps=4, num_stages=2)
    got = grouped_matmul(lhs, rhs, gs, backend="gpu", interpret=True, config=cfg)
    ref = grouped_matmul(lhs, rhs, gs, backend="reference")
    _assert_close(got, ref, jnp.float32)


def test_layout_skips_empty_groups():
    sizes = jnp.asarray([5, 0, 17, 0, 0, 1, 0, 9], jnp.int32)
    layout = jax.jit(gmm_layout, static_argnums=(1, 2))(sizes, 40, 8)
    n_active = int(layout.num_active_1[0])
    assert n_active == 1 + 3 + 1 + 2                     # sum ceil(n_g / 8)
    assert layout.num_tiles == max_tiles(40, 8, 8) >= n_active
    used = set(np.asarray(layout.tile_group_I[:n_active]).tolist())
    assert used == {0, 2, 5, 7}                          # empty groups own no tile
    assert np.all(np.asarray(layout.dst_row_R[32:]) == layout.num_tiles * 8)  # dropped rows


@pytest.mark.parametrize("bad,msg", [
    (dict(lhs=(4, 4, 4)), "lhs must be"),
    (dict(rhs=(4, 8)), "rhs must be"),
    (dict(rhs=(2, 16, 8)), "lhs K=8 != rhs K=16"),
    (dict(gs=3), "group_sizes must be"),
])
def test_bad_arguments(bad, msg):
    lhs = jnp.ones(bad.get("lhs", (4, 8)))
    rhs = jnp.ones(bad.get("rhs", (2, 8, 8)))
    gs = jnp.ones((bad.get("gs", 2),), jnp.int32)
    with pytest.raises(ValueError, match=msg):
        grouped_matmul(lhs, rhs, gs, backend="reference")


def test_bad_config_is_rejected():
    lhs, rhs, gs = _inputs(16, 48, 32, [8, 8], jnp.float32)
    with pytest.raises(ValueError, match="must divide the weight's K=48"):
        grouped_matmul(lhs, rhs, gs, backend="gpu", interpret=True,
                       config=BlockConfig(16, 32, 32))
    with pytest.raises(ValueError, match="power of two"):
        grouped_matmul(lhs, rhs, gs, backend="gpu", interpret=True,
                       config=BlockConfig(16, 32, 24))


def test_bad_backend_and_dtype():
    lhs, rhs, gs = _inputs(8, 16, 16, [4, 4], jnp.float32)
    with pytest.raises(ValueError, match="backend must be one of"):
        grouped_matmul(lhs, rhs, gs, backend="cuda")
    with pytest.raises(ValueError, match="group_sizes must be integers"):
        grouped_matmul(lhs, rhs, gs.astype(jnp.float32), backend="reference")


def _stack(L, K, N, dtype):
    return jnp.asarray(_rng.standard_normal((L, K, N), np.float32) / np.sqrt(K), dtype)


@pytest.mark.parametrize("T,K,N,dtype,out_dtype", [(1, 64, 96, jnp.float32, None), (5, 128, 48, jnp.bfloat16, None),
                                                   (40, 64, 128, jnp.bfloat16, jnp.float32),
                                                   (3, 1024, 64, jnp.bfloat16, None),      # K split in 4
                                                   (2, 768, 32, jnp.float32, None)])       # K split in 3
def test_layer_matmul_reads_one_layer_of_a_stack(T, K, N, dtype, out_dtype):
    """Each layer of a stack (a traced layer index, as the layer scan passes it), in the kernel
    (interpret mode, the tuning table's tiles and K splits) and the reference; rows past T of
    the row tile are not returned."""
    x = jnp.asarray(_rng.standard_normal((T, K), np.float32), dtype)
    w = _stack(3, K, N, dtype)
    run = jax.jit(lambda x, w, l, backend: layer_matmul(x, ExpertRows.of_stack(w[:, None], l), backend=backend,
                                                        out_dtype=out_dtype, interpret=True), static_argnums=3)
    for layer in range(3):
        want = jnp.dot(x, w[layer], preferred_element_type=jnp.float32)
        got = run(x, w, jnp.int32(layer), "gpu")
        assert got.shape == (T, N) and got.dtype == jnp.dtype(out_dtype or dtype)
        _assert_close(got, want, dtype)
        _assert_close(run(x, w, jnp.int32(layer), "reference"), want, dtype)


@pytest.mark.parametrize("splits", [1, 2, 8])
def test_layer_matmul_under_explicit_k_splits(splits):
    """A config override: 16 x 16 tiles over 64-row K chunks, the K dim split in 1, 2 or 8."""
    x = jnp.asarray(_rng.standard_normal((7, 512), np.float32), jnp.bfloat16)
    w = _stack(2, 512, 48, jnp.bfloat16)
    got = layer_matmul(x, ExpertRows.of_stack(w[:, None], 0), backend="gpu", interpret=True,
                       config=(BlockConfig(16, 16, 64, 4, 2), splits), out_dtype=jnp.float32)
    _assert_close(got, jnp.dot(x, w[0], preferred_element_type=jnp.float32), jnp.bfloat16)
    with pytest.raises(ValueError, match="must split into 3 chunks"):
        layer_matmul(x, ExpertRows.of_stack(w[:, None], 0), backend="gpu", interpret=True,
                     config=(BlockConfig(16, 16, 64, 4, 2), 3))


@pytest.mark.parametrize("T,K,splits", [(1, 512, None), (3, 256, 2), (37, 128, 1)])
def test_layer_matmul_of_matrices_side_by_side(T, K, splits):
    """q, k and v of a layer (three stacks of different N, one K) in one kernel call: each
    output equals its own product, under the tuning table's K split and explicit ones; 37 rows
    span three row tiles, two past T."""
    x = jnp.asarray(_rng.standard_normal((T, K), np.float32), jnp.bfloat16)
    stacks = [_stack(3, K, N, jnp.bfloat16) for N in (64, 32, 32)]
    config = None if splits is None else (BlockConfig(16, 16, 64, 4, 2), splits)
    run = jax.jit(lambda x, ws, l: layer_matmul(x, tuple(ExpertRows.of_stack(w[:, None], l) for w in ws),
                                                backend="gpu", interpret=True, config=config))
    got = run(x, stacks, jnp.int32(2))
    assert isinstance(got, tuple) and [g.shape for g in got] == [(T, 64), (T, 32), (T, 32)]
    for g, w in zip(got, stacks):
        _assert_close(g, jnp.dot(x, w[2], preferred_element_type=jnp.float32), jnp.bfloat16)
    ref = layer_matmul(x, [w[2] for w in stacks], backend="reference")     # a list: the same per matrix
    assert isinstance(ref, tuple) and len(ref) == 3
    for r, w in zip(ref, stacks):
        np.testing.assert_array_equal(np.asarray(r), np.asarray(jnp.dot(x, w[2])))


def test_layer_matmul_keeps_untileable_shapes_on_xla():
    """N = 1 (a shared expert's gate) is not a multiple of 16: XLA's dot, exact, on any backend."""
    x = jnp.asarray(_rng.standard_normal((3, 32), np.float32))
    w = _stack(2, 32, 1, jnp.float32)
    got = layer_matmul(x, ExpertRows.of_stack(w[:, None], 1), backend="gpu", interpret=True)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(x @ w[1]))


def test_layer_matmul_of_a_tuple_keeps_only_the_untileable_matrix_on_xla():
    """q (N 64) and a one-column gate (N 1) side by side: q still runs in the kernel, read in
    place (one pallas_call, no slice of its stack), the gate on XLA's dot of its slice."""
    x = jnp.asarray(_rng.standard_normal((3, 64), np.float32), jnp.bfloat16)
    q, gate = _stack(2, 64, 64, jnp.bfloat16), _stack(2, 64, 1, jnp.bfloat16)

    def run(x, q, gate, layer):
        return layer_matmul(x, (ExpertRows.of_stack(q[:, None], layer), ExpertRows.of_stack(gate[:, None], layer)),
                            backend="gpu", interpret=True, out_dtype=jnp.float32)

    got_q, got_gate = jax.jit(run)(x, q, gate, jnp.int32(1))
    _assert_close(got_q, jnp.dot(x, q[1], preferred_element_type=jnp.float32), jnp.bfloat16)
    want_gate = jnp.dot(x, gate[1], preferred_element_type=jnp.float32)
    np.testing.assert_allclose(np.asarray(got_gate), np.asarray(want_gate), rtol=1e-6, atol=1e-6)
    jaxpr = str(jax.make_jaxpr(run)(x, q, gate, jnp.int32(1)))
    assert jaxpr.count("pallas_call") == 1
    assert re.search(r"f32\[\d+,16,64\] = pallas_call", jaxpr)     # the kernel's output: q's 64 columns only
    assert "bf16[64,1] = dynamic_slice" in jaxpr                # the gate's layer, sliced for XLA
    assert "bf16[64,64] = dynamic_slice" not in jaxpr           # q's is not


def test_layer_matmul_rejects_bad_shapes():
    x = jnp.ones((2, 16), jnp.float32)
    with pytest.raises(ValueError, match="x's K \\(16\\) must equal w's K \\(32\\)"):
        layer_matmul(x, jnp.ones((32, 16), jnp.float32), backend="reference")
    with pytest.raises(ValueError, match="must hold one group"):
        layer_matmul(x, ExpertRows.whole(jnp.ones((2, 16, 16), jnp.float32)), backend="reference")
    with pytest.raises(ValueError, match="x must be \\[T, K\\]"):
        layer_matmul(jnp.ones((16,), jnp.float32), jnp.ones((16, 16), jnp.float32))
    with pytest.raises(ValueError, match="x's K \\(16\\) must equal w's K \\(32\\)"):
        layer_matmul(x, (jnp.ones((16, 16), jnp.float32), jnp.ones((32, 16), jnp.float32)), backend="reference")


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
class TestGpuKernel:
    """The compiled Triton kernel on realistic shapes (run on the device machine)."""

    @pytest.mark.parametrize("M,K,N,G", [(512, 2048, 768, 128), (128, 4096, 14336, 8),
                                         (4096, 2048, 1024, 64)])
    def test_bf16_against_ragged_dot(self, M, K, N, G):
        sizes = _random_sizes(_rng, G, M - 7, G // 4)
        k = jax.random.split(jax.random.PRNGKey(int(_rng.integers(1 << 30))), 2)
        lhs = jax.random.normal(k[0], (M, K), jnp.bfloat16)
        rhs = (jax.random.normal(k[1], (G, K, N)) / np.sqrt(K)).astype(jnp.bfloat16)
        gs = jnp.asarray(sizes, jnp.int32)
        got = grouped_matmul(lhs, rhs, gs, backend="gpu")
        _assert_close(got, grouped_matmul_reference(lhs, rhs, gs), jnp.bfloat16)
        assert np.all(np.asarray(got[M - 7:], np.float32) == 0.0)

    @pytest.mark.parametrize("T", [1, 2, 32, 512])
    def test_layer_matmul_at_qwen3_projection_shapes(self, T):
        """q (2048 -> 4096), k (2048 -> 512) and o (4096 -> 2048) of a 4-layer stack, layer 3."""
        for K, N in [(2048, 4096), (2048, 512), (4096, 2048)]:
            x = jnp.asarray(_rng.standard_normal((T, K), np.float32), jnp.bfloat16)
            w = _stack(4, K, N, jnp.bfloat16)
            got = layer_matmul(x, ExpertRows.of_stack(w[:, None], jnp.int32(3)), backend="gpu")
            _assert_close(got, jnp.dot(x, w[3], preferred_element_type=jnp.float32), jnp.bfloat16)
        x = jnp.asarray(_rng.standard_normal((T, 2048), np.float32), jnp.bfloat16)     # q|k|v in one launch
        stacks = [_stack(4, 2048, N, jnp.bfloat16) for N in (4096, 512, 512)]
        got = layer_matmul(x, tuple(ExpertRows.of_stack(w[:, None], jnp.int32(3)) for w in stacks), backend="gpu")
        for g, w in zip(got, stacks):
            _assert_close(g, jnp.dot(x, w[3], preferred_element_type=jnp.float32), jnp.bfloat16)
