"""TPU kernels of the fused MoE (Mosaic TPU Pallas), over the padded tile layout of layout.py.

No TPU is lent to this project: these kernels are tested only in the TPU interpret mode
(`pltpu.InterpretParams`) on CPU and have never been compiled or timed on a TPU.

Grid (tile i, column block j, K block k), K innermost with a float32 VMEM accumulator. The
tile -> group map and the active-tile count are scalar-prefetched, so the weight BlockSpec's
index map picks the tile's expert. Tiles past the active count map every input to the block
the last active step used: the pipeline sees an unchanged block index and fetches nothing,
so experts without rows are never read; those tiles only write zeros.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.fused_moe.activation import gated
from pallas_kernels.fused_moe.layout import TileLayout
from pallas_kernels.fused_moe.tuning import BlockConfig


def _clamp(i, j, k, num_active_ref, num_j: int, num_k: int):
    """Inactive steps re-point at the last active step's blocks (no new fetch)."""
    n = num_active_ref[0]
    active = i < n
    ii = jnp.where(active, i, jnp.maximum(n - 1, 0))
    jj = jnp.where(active, j, num_j - 1)
    kk = jnp.where(active, k, num_k - 1)
    return ii, jj, kk


def _gmm_kernel(tile_group_ref, num_active_ref, x_ref, w_ref, *rest, num_k: int,
                has_scale: bool):
    # x_ref [bm, bk]; w_ref [bk, bn] of the tile's group; scale_ref [bm, 1] f32;
    # o_ref [bm, bn]; acc_ref VMEM [bm, bn] f32.
    if has_scale:
        scale_ref, o_ref, acc_ref = rest
    else:
        (o_ref, acc_ref), scale_ref = rest, None
    i, k = pl.program_id(0), pl.program_id(2)

    @pl.when(k == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(i < num_active_ref[0])
    def _():
        acc_ref[...] += jnp.dot(x_ref[...], w_ref[...], preferred_element_type=jnp.float32)

    @pl.when(k == num_k - 1)
    def _():
        acc = acc_ref[...]
        if scale_ref is not None:
            acc = acc * scale_ref[...]
        o_ref[...] = acc.astype(o_ref.dtype)


def _gate_up_kernel(tile_group_ref, num_active_ref, x_ref, wg_ref, wu_ref, o_ref, accg_ref,
                    accu_ref, *, num_k: int, activation: str):
    # x_ref [bm, bk]; wg_ref, wu_ref [bk, bn] (gate and up columns of block j); o_ref [bm, bn].
    i, k = pl.program_id(0), pl.program_id(2)

    @pl.when(k == 0)
    def _():
        accg_ref[...] = jnp.zeros_like(accg_ref)
        accu_ref[...] = jnp.zeros_like(accu_ref)

    @pl.when(i < num_active_ref[0])
    def _():
        x = x_ref[...]
        accg_ref[...] += jnp.dot(x, wg_ref[...], preferred_element_type=jnp.float32)
        accu_ref[...] += jnp.dot(x, wu_ref[...], preferred_element_type=jnp.float32)

    @pl.when(k == num_k - 1)
    def _():
        o_ref[...] = gated(accg_ref[...], accu_ref[...], activation).astype(o_ref.dtype)


def _interpret_arg(interpret: bool):
    return pltpu.InterpretParams() if interpret else False


def gmm_padded(x_PK: jax.Array, w_GKN: jax.Array, layout: TileLayout, cfg: BlockConfig, *,
               scale_P: jax.Array | None = None, out_dtype=None, interpret: bool = False):
    """[P, K] (padded layout) x w[tile group] -> [P, N]; optional f32 row scale fused."""
    P, K = x_PK.shape
    _, _, N = w_GKN.shape
    bm, bn, bk = layout.block_m, cfg.block_n, cfg.block_k
    nj, nk = N // bn, K // bk
    clamp = functools.partial(_clamp, num_j=nj, num_k=nk)

    def x_map(i, j, k, tg, na):
        ii, _, kk = clamp(i, j, k, na)
        return ii, kk

    def w_map(i, j, k, tg, na):
        ii, jj, kk = clamp(i, j, k, na)
        return tg[ii], kk, jj

    def s_map(i, j, k, tg, na):
        ii, _, _ = clamp(i, j, k, na)
        return ii, 0

    in_specs = [pl.BlockSpec((bm, bk), x_map), pl.BlockSpec((None, bk, bn), w_map)]
    args = [x_PK, w_GKN]
    if scale_P is not None:
        in_specs.append(pl.BlockSpec((bm, 1), s_map))
        args.append(scale_P.astype(jnp.float32)[:, None])
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(layout.num_tiles, nj, nk), in_specs=in_specs,
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, k, tg, na: (i, j)),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)])
    return pl.pallas_call(
        functools.partial(_gmm_kernel, num_k=nk, has_scale=scale_P is not None),
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((P, N), out_dtype or x_PK.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        interpret=_interpret_arg(interpret),
        name="crosspool_gmm_tpu",
    )(layout.tile_group_I, layout.num_active_1, *args)


def gate_up_padded(x_PD: jax.Array, w1_EDF2: jax.Array, layout: TileLayout, cfg: BlockConfig,
                   *, activation: str, interpret: bool = False):
    """act(x @ w1[e][:, :F]) * (x @ w1[e][:, F:]) over the padded layout -> [P, F]."""
    P, D = x_PD.shape
    F = w1_EDF2.shape[2] // 2
    bm, bn, bk = layout.block_m, cfg.block_n, cfg.block_k
    nj, nk = F // bn, D // bk
    clamp = functools.partial(_clamp, num_j=nj, num_k=nk)

    def x_map(i, j, k, tg, na):
        ii, _, kk = clamp(i, j, k, na)
        return ii, kk

    def wg_map(i, j, k, tg, na):
        ii, jj, kk = clamp(i, j, k, na)
        return tg[ii], kk, jj

    def wu_map(i, j, k, tg, na):
        ii, jj, kk = clamp(i, j, k, na)
        return tg[ii], kk, jj + nj

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(layout.num_tiles, nj, nk),
        in_specs=[pl.BlockSpec((bm, bk), x_map), pl.BlockSpec((None, bk, bn), wg_map),
                  pl.BlockSpec((None, bk, bn), wu_map)],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, k, tg, na: (i, j)),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32), pltpu.VMEM((bm, bn), jnp.float32)])
    return pl.pallas_call(
        functools.partial(_gate_up_kernel, num_k=nk, activation=activation),
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((P, F), x_PD.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        interpret=_interpret_arg(interpret),
        name="crosspool_moe_gate_up_tpu",
    )(layout.tile_group_I, layout.num_active_1, x_PD, w1_EDF2, w1_EDF2)
