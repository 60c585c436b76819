"""`ExpertRows`: G experts' [K, N] weight matrices read in place from a larger buffer.

A grouped matmul's weight operand is usually one layer's expert stack, `w_LGKN[layer]`, or a
model's shard inside a flat device buffer (the CrossPool arena row). Slicing it out before a
kernel call is a copy on the GPU: a custom call's operands are whole buffers, so XLA
materialises the slice (one layer of Mixtral-8x7B's w1 is 1.9 GB, copied per layer per step).
`ExpertRows` hands the kernel the whole buffer as rows `[R, N]` plus the first row of the
stack instead; the GPU kernels read `rows_RN[first_row + g * K + k]` directly.

    ExpertRows.of_stack(w_LGKN, layer)        # layer `layer` of a stacked [L, G, K, N] (traced ok)
    ExpertRows(rows_RN, first_row, num_groups=G, group_rows=K)   # any [R, N] buffer

`first_row` is an int32 scalar (traced is fine); `num_groups` and `group_rows` are static.
The caller guarantees `first_row + G * K <= R` (of_stack clamps the layer). It is a pytree
(rows and first_row are leaves), so it passes through jit. `shape`/`dtype`/`ndim` describe
the logical [G, K, N] operand; `materialize()` is that operand as an array (a dynamic slice:
the reference and the TPU kernels use it).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.tree_util.register_pytree_node_class
class ExpertRows:
    """[G, K, N] weights = rows_RN[first_row : first_row + G*K] viewed [G, K, N], never sliced out."""

    def __init__(self, rows_RN: jax.Array, first_row, *, num_groups: int, group_rows: int):
        if getattr(rows_RN, "ndim", None) != 2:
            raise ValueError(f"ExpertRows: rows must be [R, N], got shape {getattr(rows_RN, 'shape', None)}")
        if num_groups < 1 or group_rows < 1:
            raise ValueError(f"ExpertRows: num_groups ({num_groups}) and group_rows ({group_rows}) must be >= 1")
        if num_groups * group_rows > rows_RN.shape[0]:
            raise ValueError(f"ExpertRows: {num_groups} groups of {group_rows} rows do not fit in "
                             f"{rows_RN.shape[0]} rows")
        self.rows_RN = rows_RN
        self.first_row = first_row
        self.num_groups = int(num_groups)
        self.group_rows = int(group_rows)

    @classmethod
    def of_stack(cls, w_LGKN: jax.Array, layer) -> "ExpertRows":
        """Entry `layer` of a stacked [L, G, K, N] weight (layer clamped into [0, L))."""
        L, G, K, N = w_LGKN.shape
        layer = jnp.clip(jnp.asarray(layer, jnp.int32), 0, L - 1)
        return cls(w_LGKN.reshape(L * G * K, N), layer * (G * K), num_groups=G, group_rows=K)

    @classmethod
    def whole(cls, w_GKN: jax.Array) -> "ExpertRows":
        G, K, N = w_GKN.shape
        return cls(w_GKN.reshape(G * K, N), 0, num_groups=G, group_rows=K)

    @property
    def shape(self) -> tuple:
        return (self.num_groups, self.group_rows, self.rows_RN.shape[1])

    @property
    def ndim(self) -> int:
        return 3

    @property
    def dtype(self):
        return self.rows_RN.dtype

    def first_row_1(self) -> jax.Array:
        """first_row as int32[1] (a kernel operand)."""
        return jnp.reshape(jnp.asarray(self.first_row, jnp.int32), (1,))

    def materialize(self) -> jax.Array:
        """The [G, K, N] operand as an array (a dynamic slice: a copy where it cannot fuse)."""
        G, K, N = self.shape
        start = jnp.asarray(self.first_row, jnp.int32)
        return jax.lax.dynamic_slice_in_dim(self.rows_RN, start, G * K).reshape(G, K, N)

    def tree_flatten(self):
        return (self.rows_RN, self.first_row), (self.num_groups, self.group_rows)

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        obj.rows_RN, obj.first_row = children
        obj.num_groups, obj.group_rows = aux
        return obj

    def __repr__(self) -> str:
        return (f"ExpertRows(rows={tuple(self.rows_RN.shape)}, first_row={self.first_row}, "
                f"shape={self.shape}, dtype={self.dtype})")


def as_expert_rows(w) -> ExpertRows:
    """An ExpertRows for a [G, K, N] array (a free reshape) or the ExpertRows itself."""
    return w if isinstance(w, ExpertRows) else ExpertRows.whole(w)


def as_array(w) -> jax.Array:
    """The [G, K, N] array of an array or an ExpertRows (materialised)."""
    return w.materialize() if isinstance(w, ExpertRows) else w
