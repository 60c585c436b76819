"""GPU kernels of the fused MoE: grouped matmul and gate/up with the activation fused.

Lowering: the Triton lowering of Pallas (`pl.pallas_call` + `pallas.triton.CompilerParams`).
Why: it runs on JAX 0.10 and 0.11.2 (deprecated in 0.11 but working), it can be interpreted on
a CPU so every kernel here is tested against the reference without a GPU, and decode MoE is
weight-bandwidth bound (a few rows per expert), where the win comes from the tiling (one M
tile per expert, the weight's N dim spread over the grid, empty experts skipped), not from
the instruction set. Measured on an H200 (RESULTS.md): 98.5% of the copy ceiling on Mixtral
decode, 78-86% on Qwen3-30B-A3B at 16-64 tokens and OLMoE, 44% at one token (launch-bound),
and 68% of the bf16 matmul rate on a prefill grouped matmul (Triton emits wgmma itself), ahead
of JAX's Mosaic GPU `ragged_dot_mgpu` (47%). Mosaic GPU cannot be interpreted on CPU. The choice lives here: api.py maps
backend "gpu" to this module and nothing else imports it.

Both kernels run over the padded tile layout of layout.py: grid (tile i, column block j);
the tile's group comes from `tile_group_I[i]` (an int load), tiles >= num_active do nothing,
so experts without rows are never read. K is looped inside the program in `block_k` chunks
(Triton software-pipelines that loop `num_stages` deep). Operands are passed whole and sliced
with `pl.ds` (block shapes must be powers of two in this lowering; F = 768 or 14336 is not).
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
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.fused_moe.activation import activate
from pallas_kernels.fused_moe.expert_rows import ExpertRows
from pallas_kernels.fused_moe.layout import TileLayout
from pallas_kernels.fused_moe.tuning import BlockConfig


def _gmm_kernel(tile_group_ref, num_active_ref, row0_ref, x_ref, w_ref, *rest, block_k: int,
                num_k: int, block_n: int, group_rows: int, has_scale: bool):
    # x_ref: [P, K] (whole); w_ref: [R, N] rows (whole), group g at rows row0 + g*K;
    # scale_ref: [bm] f32 row scale; o_ref: [bm, bn] block (i, j).
    scale_ref, o_ref = rest if has_scale else (None, rest[0])
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
        if scale_ref is not None:
            acc = acc * scale_ref[...][:, None]
        o_ref[...] = acc.astype(o_ref.dtype)


def _gate_up_kernel(tile_group_ref, num_active_ref, row0_ref, x_ref, w_ref, o_ref, *,
                    block_k: int, num_k: int, block_n: int, F: int, group_rows: int,
                    activation: str):
    # x_ref: [P, D] (whole); w_ref: [R, 2F] rows (whole), expert e at rows row0 + e*D;
    # o_ref: [bm, bn] block (i, j) of act(x @ gate) * (x @ up).
    i = pl.program_id(0)
    j = pl.program_id(1)

    @pl.when(i < num_active_ref[0])
    def _():
        r0 = row0_ref[0] + tile_group_ref[i] * group_rows
        bm = o_ref.shape[0]

        def body(k, carry):
            acc_g, acc_u = carry
            xk = x_ref[pl.ds(i * bm, bm), pl.ds(k * block_k, block_k)]
            wg = w_ref[pl.ds(r0 + k * block_k, block_k), pl.ds(j * block_n, block_n)]
            wu = w_ref[pl.ds(r0 + k * block_k, block_k), pl.ds(F + j * block_n, block_n)]
            acc_g = acc_g + jnp.dot(xk, wg, preferred_element_type=jnp.float32)
            acc_u = acc_u + jnp.dot(xk, wu, preferred_element_type=jnp.float32)
            return acc_g, acc_u

        zero = jnp.zeros((bm, block_n), jnp.float32)
        acc_g, acc_u = jax.lax.fori_loop(0, num_k, body, (zero, zero))
        o_ref[...] = (activate(acc_g, activation) * acc_u).astype(o_ref.dtype)


def _whole(shape):
    nd = len(shape)
    return pl.BlockSpec(shape, lambda i, j: (0,) * nd)


def gmm_padded(x_PK: jax.Array, w: ExpertRows, layout: TileLayout, cfg: BlockConfig, *,
               scale_P: jax.Array | None = None, out_dtype=None, interpret: bool = False):
    """[P, K] (padded layout) x w[tile group] -> [P, N]; optional f32 row scale fused."""
    P, K = x_PK.shape
    _, _, N = w.shape
    bm, bn, bk = layout.block_m, cfg.block_n, cfg.block_k
    out_dtype = out_dtype or x_PK.dtype
    in_specs = [_whole((layout.num_tiles,)), _whole((1,)), _whole((1,)),
                _whole(x_PK.shape), _whole(w.rows_RN.shape)]
    args = [layout.tile_group_I, layout.num_active_1, w.first_row_1(), x_PK, w.rows_RN]
    if scale_P is not None:
        in_specs.append(pl.BlockSpec((bm,), lambda i, j: (i,)))
        args.append(scale_P.astype(jnp.float32))
    kernel = functools.partial(_gmm_kernel, block_k=bk, num_k=K // bk, block_n=bn,
                               group_rows=w.group_rows, has_scale=scale_P is not None)
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


def gate_up_padded(x_PD: jax.Array, w1: ExpertRows, layout: TileLayout, cfg: BlockConfig,
                   *, activation: str, interpret: bool = False):
    """act(x @ w1[e][:, :F]) * (x @ w1[e][:, F:]) over the padded layout -> [P, F]."""
    P, D = x_PD.shape
    F = w1.shape[2] // 2
    bm, bn, bk = layout.block_m, cfg.block_n, cfg.block_k
    kernel = functools.partial(_gate_up_kernel, block_k=bk, num_k=D // bk, block_n=bn, F=F,
                               group_rows=w1.group_rows, activation=activation)
    return pl.pallas_call(
        kernel,
        grid=(layout.num_tiles, F // bn),
        in_specs=[_whole((layout.num_tiles,)), _whole((1,)), _whole((1,)),
                  _whole(x_PD.shape), _whole(w1.rows_RN.shape)],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((P, F), x_PD.dtype),
        compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps,
                                                num_stages=cfg.num_stages),
        interpret=interpret,
        name="crosspool_moe_gate_up",
    )(layout.tile_group_I, layout.num_active_1, w1.first_row_1(), x_PD, w1.rows_RN)
