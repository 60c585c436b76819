"""GPU kernels of the fused MoE: grouped matmul and gate/up with the activation fused.

Lowering: the Triton lowering of Pallas (`pl.pallas_call` + `pallas.triton.CompilerParams`).
Why: it runs on JAX 0.10 and 0.11.2 (deprecated in 0.11 but working), it can be interpreted on
a CPU so every kernel here is tested against the reference without a GPU, and decode MoE is
weight-bandwidth bound (a few rows per expert), where the win comes from the tiling (one M
tile per expert, the weight's N dim spread over the grid, empty experts skipped), not from
the instruction set (measured shares of the copy ceiling and of the matmul rate, against JAX's
Mosaic GPU `ragged_dot_mgpu`: RESULTS.md). Mosaic GPU cannot be interpreted on CPU. The choice lives here: api.py maps
backend "gpu" to this module and nothing else imports it.

The grouped matmul and gate/up kernels run over the padded tile layout of layout.py: grid
(tile i, column block j); the tile's group comes from `tile_group_I[i]` (an int load), tiles
>= num_active do nothing, so experts without rows are never read. `layer_matmul` (matrices of
one K side by side, no groups) has a grid (row tile, column block, K split) and no layout. K
is looped inside the program in `block_k` chunks (Triton software-pipelines that loop
`num_stages` deep). Operands are passed whole and sliced with `pl.ds` (block shapes must be
powers of two in this lowering; F = 768 or 14336 is not).
The weights arrive as `ExpertRows` (expert_rows.py): the whole buffer as rows [R, N] plus the
stack's first row (an int32[1] operand), so a layer of a stacked weight or a shard inside the
CrossPool arena row is read in place, never copied into the call. Row ids stay int32 (rows of
a 64 GiB buffer are < 2**31); the lowering widens pointer offsets to 64 bits for buffers over
4 GiB.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.fused_moe.activation import gated
from pallas_kernels.fused_moe.expert_rows import ExpertRows
from pallas_kernels.fused_moe.layout import TileLayout
from pallas_kernels.fused_moe.tuning import BlockConfig
from pallas_kernels.pow2 import next_pow2


def _gmm_kernel(tile_group_ref, num_active_ref, row0_ref, x_ref, w_ref, *rest, block_k: int,
                num_k: int, block_n: int, group_rows: int, has_scale: bool, has_bias: bool):
    # x_ref: [P, K] (whole); w_ref: [R, N] rows (whole), group g at rows row0 + g*K;
    # with a bias: bias_ref [G, N] (whole; group g's row added to its rows, before the scale);
    # with a scale: src_ref [P] int32 (source row of each padded row, R_src = fill) and
    # wts_ref [R_src] f32 (each source row's scale, read here: no gather launch before);
    # o_ref: [bm, bn] block (i, j).
    rest = list(rest)
    bias_ref = rest.pop(0) if has_bias else None
    src_ref, wts_ref, o_ref = rest if has_scale else (None, None, rest[0])
    i = pl.program_id(0)
    j = pl.program_id(1)

    @pl.when(i < num_active_ref[0])
    def _():
        r0 = row0_ref[0] + tile_group_ref[i] * group_rows
        bm = o_ref.shape[0]

        def body(k, acc):
            xk = x_ref[pl.ds(i * bm, bm), pl.ds(k * block_k, block_k)]
            wk = w_ref[pl.ds(r0 + k * block_k, block_k), pl.ds(j * block_n, block_n)]
            return acc + jnp.dot(xk, wk, preferred_element_type=jnp.float32)

        acc = jax.lax.fori_loop(0, num_k, body, jnp.zeros((bm, block_n), jnp.float32))
        if has_bias:
            acc = acc + _bias_row(bias_ref, tile_group_ref[i], j * block_n, block_n)[None, :]
        if has_scale:
            n_src = wts_ref.shape[0]
            src = src_ref[pl.ds(i * bm, bm)]
            scale = _masked_gather(wts_ref, jnp.minimum(src, n_src - 1), src < n_src)
            acc = acc * scale[:, None]
        o_ref[...] = acc.astype(o_ref.dtype)


def _bias_row(ref, g, col0, width):
    """ref[g, col0:col0 + width] in float32 (one group's bias columns)."""
    return ref[g, pl.ds(col0, width)].astype(jnp.float32)


def _masked_gather(ref, rows, ok):
    """ref[rows] where ok, else 0 (a masked gather of a 1-D ref)."""
    return pltriton.load(ref.at[rows], mask=ok, other=0)


def cells_shape(live_shape, tile_shape, interpret: bool) -> tuple:
    """The shape of an output that `store_cells` writes: its live cells, plus, under interpret
    mode, one tile's worth of scratch rows and columns."""
    if not interpret:
        return tuple(live_shape)
    return tuple(n + t for n, t in zip(live_shape, tile_shape))


def store_cells(ref, rows, cols, val, ok, *, live_shape, interpret: bool):
    """ref[rows[i], cols[j]] = val[i, j] where ok[i, j] (a 2-D masked scatter of a tile).

    Compiled, a masked lane writes nothing: its address is only clamped into the live cells.
    Interpret mode writes masked lanes back (the old value), which would race a live lane of
    the same store at the same cell, so there masked lane (i, j) gets a cell of its own,
    (n_rows + i, n_cols + j), in the scratch that `cells_shape` adds.
    """
    n_rows, n_cols = live_shape
    R, C = val.shape
    if interpret:
        r = jnp.where(ok, rows[:, None], n_rows + jnp.arange(R, dtype=jnp.int32)[:, None])
        c = jnp.where(ok, cols[None, :], n_cols + jnp.arange(C, dtype=jnp.int32)[None, :])
    else:
        r = jnp.broadcast_to(jnp.clip(rows, 0, n_rows - 1)[:, None], (R, C))
        c = jnp.broadcast_to(jnp.clip(cols, 0, n_cols - 1)[None, :], (R, C))
    pltriton.store(ref.at[r, c], val, mask=ok)


def _gate_up_kernel(tile_group_ref, num_active_ref, row0_ref, src_ref, x_ref, w_ref, *rest,
                    block_k: int, num_k: int, block_n: int, F: int, group_rows: int,
                    activation, top_k: int, has_bias: bool):
    # src_ref: [P] int32, the (token, k) pair of each padded row (T * top_k = a fill row);
    # x_ref: [T, D] (whole, the caller's tokens: each tile gathers its rows itself);
    # w_ref: [R, 2F] rows (whole), expert e at rows row0 + e*D;
    # with a bias: b_ref [E, 2F] (whole; gate | up, added before the activation);
    # o_ref: [bm, bn] block (i, j) of gated(x @ gate + b_gate, x @ up + b_up).
    b_ref, o_ref = rest if has_bias else (None, rest[0])
    i = pl.program_id(0)
    j = pl.program_id(1)

    @pl.when(i < num_active_ref[0])
    def _():
        r0 = row0_ref[0] + tile_group_ref[i] * group_rows
        bm = o_ref.shape[0]
        T = x_ref.shape[0]
        src = src_ref[pl.ds(i * bm, bm)]
        row_ok = src < T * top_k
        tok = jnp.minimum(src // top_k, T - 1)

        def body(k, carry):
            acc_g, acc_u = carry
            cols = k * block_k + jnp.arange(block_k, dtype=jnp.int32)
            xk = pltriton.load(x_ref.at[tok[:, None], cols[None, :]],
                               mask=jnp.broadcast_to(row_ok[:, None], (bm, block_k)), other=0)
            wg = w_ref[pl.ds(r0 + k * block_k, block_k), pl.ds(j * block_n, block_n)]
            wu = w_ref[pl.ds(r0 + k * block_k, block_k), pl.ds(F + j * block_n, block_n)]
            acc_g = acc_g + jnp.dot(xk, wg, preferred_element_type=jnp.float32)
            acc_u = acc_u + jnp.dot(xk, wu, preferred_element_type=jnp.float32)
            return acc_g, acc_u

        zero = jnp.zeros((bm, block_n), jnp.float32)
        acc_g, acc_u = jax.lax.fori_loop(0, num_k, body, (zero, zero))
        if has_bias:
            g = tile_group_ref[i]
            acc_g = acc_g + _bias_row(b_ref, g, j * block_n, block_n)[None, :]
            acc_u = acc_u + _bias_row(b_ref, g, F + j * block_n, block_n)[None, :]
        o_ref[...] = gated(acc_g, acc_u, activation).astype(o_ref.dtype)


def _whole(shape):
    """The whole operand as one block, whatever the grid."""
    nd = len(shape)
    return pl.BlockSpec(shape, lambda *_: (0,) * nd)


def gmm_padded(x_PK: jax.Array, w: ExpertRows, layout: TileLayout, cfg: BlockConfig, *,
               row_weights_R: jax.Array | None = None, bias_GN: jax.Array | None = None,
               out_dtype=None, interpret: bool = False):
    """[P, K] (padded layout) x w[tile group] (+ bias_GN[tile group]) -> [P, N]; with
    row_weights_R (f32, one per source row), padded row p is then scaled by
    row_weights_R[layout.src_row_P[p]] (fill rows by 0), read inside the kernel."""
    P, K = x_PK.shape
    _, _, N = w.shape
    bm, bn, bk = layout.block_m, cfg.block_n, cfg.block_k
    out_dtype = out_dtype or x_PK.dtype
    in_specs = [_whole((layout.num_tiles,)), _whole((1,)), _whole((1,)),
                _whole(x_PK.shape), _whole(w.rows_RN.shape)]
    args = [layout.tile_group_I, layout.num_active_1, w.first_row_1(), x_PK, w.rows_RN]
    has_bias = bias_GN is not None
    if has_bias:
        in_specs.append(_whole(bias_GN.shape))
        args.append(bias_GN)
    has_scale = row_weights_R is not None
    if has_scale:
        in_specs += [_whole(layout.src_row_P.shape), _whole(row_weights_R.shape)]
        args += [layout.src_row_P, row_weights_R.astype(jnp.float32)]
    kernel = functools.partial(_gmm_kernel, block_k=bk, num_k=K // bk, block_n=bn,
                               group_rows=w.group_rows, has_scale=has_scale, has_bias=has_bias)
    return pl.pallas_call(
        kernel,
        grid=(layout.num_tiles, N // bn),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((P, N), out_dtype),
        compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps,
                                                num_stages=cfg.num_stages),
        interpret=interpret,
        name="crosspool_gmm",
    )(*args)


def _layer_matmul_kernel(*refs, block_k: int, num_k: int, block_n: int, col_blocks: tuple):
    # refs: row0_refs (one int32[1] per matrix), x_ref [T, K] (whole; rows past T of a tile
    # load zeros), w_refs (one [R_m, N_m] rows buffer per matrix, whole: matrix m at rows
    # row0_m .. row0_m + K), o_ref [1, bm, bn]: block (s, i, j) of the matrices' outputs side
    # by side, the partial sum of K chunk s (num_k * block_k rows) for row tile i and column
    # block j, which is column block j - start_m of the matrix m whose blocks hold j.
    M = len(col_blocks)
    row0_refs, x_ref, w_refs, o_ref = refs[:M], refs[M], refs[M + 1:2 * M + 1], refs[-1]
    i, j, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bm = o_ref.shape[1]
    T = x_ref.shape[0]
    rows = i * bm + jnp.arange(bm, dtype=jnp.int32)
    row_ok = jnp.broadcast_to((rows < T)[:, None], (bm, block_k))
    k0 = s * (num_k * block_k)

    def product(row0_ref, w_ref, col_block):
        def body(k, acc):
            cols = k0 + k * block_k + jnp.arange(block_k, dtype=jnp.int32)
            xk = pltriton.load(x_ref.at[jnp.minimum(rows, T - 1)[:, None], cols[None, :]], mask=row_ok, other=0)
            wk = w_ref[pl.ds(row0_ref[0] + k0 + k * block_k, block_k), pl.ds(col_block * block_n, block_n)]
            return acc + jnp.dot(xk, wk, preferred_element_type=jnp.float32)

        acc = jax.lax.fori_loop(0, num_k, body, jnp.zeros((bm, block_n), jnp.float32))
        o_ref[0] = acc.astype(o_ref.dtype)

    if M == 1:
        product(row0_refs[0], w_refs[0], j)
        return
    start = 0
    for row0_ref, w_ref, blocks in zip(row0_refs, w_refs, col_blocks):
        pl.when((j >= start) & (j < start + blocks))(
            functools.partial(product, row0_ref, w_ref, j - start))
        start += blocks


def layer_matmul(x_TK: jax.Array, ws: tuple, cfg: BlockConfig, *, num_splits: int = 1, out_dtype=None,
                 interpret: bool = False) -> tuple:
    """x [T, K] @ each matrix of ws (one-group ExpertRows of one K: a layer of a stack, read in
    place) -> a tuple of [T, N_m], in ONE launch (q, k and v: one kernel, not three).

    Grid (row tile, column block of the matrices side by side, K split): with num_splits > 1
    each program sums K/num_splits rows of its matrix (split-K: at decode one row tile leaves
    only the columns to fill the grid, too few programs for a 2-17 MB projection), the float32
    partials [num_splits, P, sum N_m] summed after the call. Rows past T read zeros inside the
    kernel (no padded copy of x). cfg.block_n divides every N_m."""
    T, K = x_TK.shape
    Ns = tuple(w.shape[2] for w in ws)
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    if K % (num_splits * bk):
        raise ValueError(f"layer_matmul: K={K} must split into {num_splits} chunks of whole {bk}-row blocks")
    if any(N % bn for N in Ns):
        raise ValueError(f"layer_matmul: block_n={bn} must divide every matrix's N {Ns}")
    out_dtype = jnp.dtype(out_dtype or x_TK.dtype)
    I = -(-T // bm)
    col_blocks = tuple(N // bn for N in Ns)
    kernel = functools.partial(_layer_matmul_kernel, block_k=bk, num_k=K // (num_splits * bk), block_n=bn,
                               col_blocks=col_blocks)
    y_SPN = pl.pallas_call(
        kernel,
        grid=(I, sum(col_blocks), num_splits),
        in_specs=[*[_whole((1,))] * len(ws), _whole(x_TK.shape), *[_whole(w.rows_RN.shape) for w in ws]],
        out_specs=pl.BlockSpec((1, bm, bn), lambda i, j, s: (s, i, j)),
        out_shape=jax.ShapeDtypeStruct((num_splits, I * bm, sum(Ns)), out_dtype if num_splits == 1 else jnp.float32),
        compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="crosspool_layer_matmul",
    )(*[w.first_row_1() for w in ws], x_TK, *[w.rows_RN for w in ws])
    y_TN = y_SPN[0, :T] if num_splits == 1 else jnp.sum(y_SPN[:, :T], axis=0).astype(out_dtype)
    bounds = np.cumsum((0,) + Ns)
    return tuple(y_TN[:, a:b] for a, b in zip(bounds[:-1], bounds[1:]))


def gate_up_gathered(x_TD: jax.Array, top_k: int, w1: ExpertRows, layout: TileLayout,
                     cfg: BlockConfig, *, activation, b1_EF2: jax.Array | None = None,
                     interpret: bool = False):
    """gated(x @ w1[e][:, :F] + b1[e, :F], x @ w1[e][:, F:] + b1[e, F:]) over the padded
    layout -> [P, F] (activation.gated: "silu", "gelu" or a ClampedSwiGLU; b1 optional);
    padded row p computes token layout.src_row_P[p] // top_k, gathered inside the kernel
    (fill rows read zeros)."""
    T, D = x_TD.shape
    P = layout.src_row_P.shape[0]
    F = w1.shape[2] // 2
    bm, bn, bk = layout.block_m, cfg.block_n, cfg.block_k
    has_bias = b1_EF2 is not None
    kernel = functools.partial(_gate_up_kernel, block_k=bk, num_k=D // bk, block_n=bn, F=F,
                               group_rows=w1.group_rows, activation=activation, top_k=top_k,
                               has_bias=has_bias)
    bias = [b1_EF2] if has_bias else []
    return pl.pallas_call(
        kernel,
        grid=(layout.num_tiles, F // bn),
        in_specs=[_whole((layout.num_tiles,)), _whole((1,)), _whole((1,)), _whole((P,)),
                  _whole(x_TD.shape), _whole(w1.rows_RN.shape), *[_whole(b.shape) for b in bias]],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((P, F), x_TD.dtype),
        compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps,
                                                num_stages=cfg.num_stages),
        interpret=interpret,
        name="crosspool_moe_gate_up",
    )(layout.tile_group_I, layout.num_active_1, w1.first_row_1(), layout.src_row_P, x_TD,
      w1.rows_RN, *bias)


# One token per combine program, 128 columns (512 from 64 tokens up): enough programs to
# cover the GPU at every batch (16 tokens per program left a 16-token call with 8 programs;
# RESULTS.md has the timings).
_COMBINE_TOKENS = 1


def _combine_cols(T: int) -> int:
    return 512 if T >= 64 else 128


def _combine_kernel(dst_ref, y_ref, o_ref, *, top_k: int, T: int, block_t: int,
                    block_d: int, interpret: bool):
    # dst_ref: [T * top_k] int32 (padded row of each (token, k) pair; P = dropped);
    # y_ref: [P, D] f32 (whole); o_ref: cells_shape((T, D), ...) (whole): rows t < T get
    # sum_k y[dst[t * top_k + k]] in a fixed order (deterministic, no atomics).
    i = pl.program_id(0)
    j = pl.program_id(1)
    P, D = y_ref.shape
    t = i * block_t + jnp.arange(block_t, dtype=jnp.int32)
    t_ok = t < T
    tc = jnp.minimum(t, T - 1)
    cols = j * block_d + jnp.arange(block_d, dtype=jnp.int32)
    col_ok = cols < D
    cols_c = jnp.minimum(cols, D - 1)
    acc = jnp.zeros((block_t, block_d), jnp.float32)
    for k in range(top_k):
        rows = dst_ref[tc * top_k + k]
        ok = t_ok & (rows < P)
        acc += pltriton.load(y_ref.at[jnp.minimum(rows, P - 1)[:, None], cols_c[None, :]],
                             mask=ok[:, None] & col_ok[None, :], other=0.0)
    store_cells(o_ref, t, cols, acc.astype(o_ref.dtype), t_ok[:, None] & col_ok[None, :],
                live_shape=(T, D), interpret=interpret)


def combine_rows(y_PD: jax.Array, dst_row_R: jax.Array, top_k: int, out_dtype, *,
                 interpret: bool = False) -> jax.Array:
    """[T, D] in out_dtype: each token's top_k rows of the padded [P, D] result summed (rows
    at P, dropped pairs, add nothing), one launch instead of XLA's gather + reduce (which
    ran at ~0.4 TB/s: 84 us at Qwen3 / 256 tokens, RESULTS.md)."""
    P, D = y_PD.shape
    T = dst_row_R.shape[0] // top_k
    bt = min(_COMBINE_TOKENS, next_pow2(T))
    bd = min(_combine_cols(T), next_pow2(D))
    out_shape = cells_shape((T, D), (bt, bd), interpret)
    kernel = functools.partial(_combine_kernel, top_k=top_k, T=T, block_t=bt, block_d=bd,
                               interpret=interpret)
    out = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(T, bt), pl.cdiv(D, bd)),
        in_specs=[_whole(dst_row_R.shape), _whole(y_PD.shape)],
        out_specs=_whole(out_shape),
        out_shape=jax.ShapeDtypeStruct(out_shape, out_dtype),
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="crosspool_moe_combine",
    )(dst_row_R, y_PD)
    return out[:T, :D]
