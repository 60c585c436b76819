"""Tile layout shared by the GPU and TPU kernels: rows sorted by group, padded per group.

Every group (expert) gets whole tiles of `block_m` rows, so one tile belongs to exactly one
group and its weights are read once per tile. A tile -> group map and the number of active
tiles are computed here, outside the kernels (they are the kernels' scalar inputs); tiles
past `num_active` are inactive and read nothing. Letters (WORKSPACE.md) plus: R rows
(T*top_k for the MoE, M for grouped_matmul), P padded rows (I * block_m), I tiles.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


_ONE_HOT_LIMIT = 1 << 22  # R * G above this: rank rows by a stable sort instead


def max_tiles(num_rows: int, num_groups: int, block_m: int) -> int:
    """Static upper bound of sum_g ceil(n_g / block_m) over all splits of num_rows rows."""
    active = min(num_groups, num_rows)
    return max(1, (num_rows + active * (block_m - 1)) // block_m)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TileLayout:
    """Where each row goes in the padded, group-sorted buffer, and which group each tile uses."""

    src_row_P: jax.Array      # int32[P]: source row of padded row p (R = a fill row)
    dst_row_R: jax.Array      # int32[R]: padded position of source row r (P = dropped row)
    tile_group_I: jax.Array   # int32[I]: group of tile i (inactive tiles: the last active one's)
    num_active_1: jax.Array   # int32[1]: tiles in use; tiles >= this are skipped
    block_m: int = dataclasses.field(metadata=dict(static=True))

    @property
    def num_tiles(self) -> int:
        return self.tile_group_I.shape[0]


def build_layout(group_R: jax.Array, num_groups: int, block_m: int,
                 group_sizes_G: jax.Array | None = None) -> TileLayout:
    """Layout for rows whose group is group_R (any order; rows >= num_groups are dropped).

    group_sizes_G may be passed when known (it must equal bincount(group_R)).
    """
    R = group_R.shape[0]
    I = max_tiles(R, num_groups, block_m)
    P = I * block_m
    group_R = group_R.astype(jnp.int32)
    valid_R = group_R < num_groups
    g_R = jnp.minimum(group_R, num_groups - 1)
    if R * num_groups <= _ONE_HOT_LIMIT:
        # decode-sized: rank within the group by a one-hot running count (no sort kernels)
        onehot_RG = (group_R[:, None] == jnp.arange(num_groups, dtype=jnp.int32)[None, :])
        count_RG = jnp.cumsum(onehot_RG.astype(jnp.int32), axis=0)
        if group_sizes_G is None:
            group_sizes_G = count_RG[-1]
        rank_R = jnp.sum(jnp.where(onehot_RG, count_RG, 0), axis=1) - 1
    else:
        if group_sizes_G is None:
            group_sizes_G = jnp.bincount(group_R, length=num_groups).astype(jnp.int32)
        order_R = jnp.argsort(group_R, stable=True).astype(jnp.int32)
        row_start_G = (jnp.cumsum(group_sizes_G) - group_sizes_G).astype(jnp.int32)
        rank_sorted_R = jnp.arange(R, dtype=jnp.int32) - row_start_G[g_R[order_R]]
        rank_R = jnp.zeros((R,), jnp.int32).at[order_R].set(rank_sorted_R)
    group_sizes_G = group_sizes_G.astype(jnp.int32)
    tiles_G = (group_sizes_G + block_m - 1) // block_m
    tile_end_G = jnp.cumsum(tiles_G).astype(jnp.int32)
    tile_start_G = tile_end_G - tiles_G
    dst_row_R = jnp.where(valid_R, tile_start_G[g_R] * block_m + rank_R, P).astype(jnp.int32)
    src_row_P = jnp.full((P + 1,), R, jnp.int32).at[dst_row_R].set(
        jnp.arange(R, dtype=jnp.int32))[:P]
    num_active = tile_end_G[-1]
    tile_I = jnp.minimum(jnp.arange(I, dtype=jnp.int32), jnp.maximum(num_active - 1, 0))
    tile_group_I = jnp.sum((tile_end_G[None, :] <= tile_I[:, None]).astype(jnp.int32), axis=1)
    tile_group_I = jnp.minimum(tile_group_I, num_groups - 1)
    return TileLayout(src_row_P, dst_row_R, tile_group_I, num_active[None].astype(jnp.int32),
                      block_m)


def single_token_layout(group_K: jax.Array, block_m: int, num_groups: int | None = None) -> TileLayout:
    """Layout for ONE token's top-k rows, whose groups are distinct (top-k picks distinct
    experts): row r alone in tile r. Everything but the tile -> group map is a constant, so
    the XLA ops build_layout needs (one-hot running count, scatter, compare-and-count) are
    not launched at all; decode at one token is launch-bound (RESULTS.md).

    num_groups: rows whose group is >= num_groups are dropped (an expert slice: routed to
    experts held elsewhere); the kept rows take the first tiles, the rest are inactive."""
    K = group_K.shape[0]
    group_K = group_K.astype(jnp.int32)
    p = jnp.arange(K * block_m, dtype=jnp.int32)
    if num_groups is None:
        src_row_P = jnp.where(p % block_m == 0, p // block_m, K).astype(jnp.int32)
        dst_row_R = jnp.arange(K, dtype=jnp.int32) * block_m
        return TileLayout(src_row_P, dst_row_R, group_K, jnp.full((1,), K, jnp.int32), block_m)
    keep_K = group_K < num_groups
    order_K = jnp.argsort(~keep_K, stable=True).astype(jnp.int32)    # kept rows first: tile t holds row order[t]
    kept = jnp.sum(keep_K.astype(jnp.int32))
    tile_of_K = jnp.zeros((K,), jnp.int32).at[order_K].set(jnp.arange(K, dtype=jnp.int32))
    src_row_P = jnp.where((p % block_m == 0) & (p // block_m < kept), order_K[p // block_m], K).astype(jnp.int32)
    dst_row_R = jnp.where(keep_K, tile_of_K * block_m, K * block_m).astype(jnp.int32)
    tile_group_I = jnp.minimum(group_K[order_K], num_groups - 1)
    last = jnp.maximum(kept - 1, 0)
    tile_group_I = jnp.where(jnp.arange(K) < kept, tile_group_I, tile_group_I[last])
    return TileLayout(src_row_P, dst_row_R, tile_group_I, kept[None], block_m)


def gmm_layout(group_sizes_G: jax.Array, num_rows: int, block_m: int) -> TileLayout:
    """Layout for lax.ragged_dot's grouping: consecutive rows, rows past the total dropped."""
    G = group_sizes_G.shape[0]
    ends_G = jnp.minimum(jnp.cumsum(group_sizes_G.astype(jnp.int32)), num_rows)
    sizes_G = ends_G - jnp.concatenate([jnp.zeros((1,), jnp.int32), ends_G[:-1]])
    # compare_all: one fused compare-and-count (the default binary search is a while loop,
    # which on GPU costs a host round trip per step)
    method = "compare_all" if num_rows * G <= _ONE_HOT_LIMIT else "sort"
    group_R = jnp.searchsorted(ends_G, jnp.arange(num_rows, dtype=jnp.int32), side="right",
                               method=method)
    return build_layout(group_R.astype(jnp.int32), G, block_m, sizes_G)


def gather_rows(x_RD: jax.Array, layout: TileLayout) -> jax.Array:
    """x rows into the padded layout; fill rows are zeros."""
    return jnp.take(x_RD, layout.src_row_P, axis=0, mode="fill", fill_value=0)


def scatter_back(y_PD: jax.Array, layout: TileLayout) -> jax.Array:
    """Padded rows back to source order; dropped rows are zeros."""
    return jnp.take(y_PD, layout.dst_row_R, axis=0, mode="fill", fill_value=0)
