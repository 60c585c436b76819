"""`PackedArrays`: the host arrays of a pytree sent to the device as two buffers.

A step's host inputs are dozens of small arrays (token ids, positions, slots, page tables,
lengths; each sampling field; per lane of a multi-model program, all of them again). Each one
handed to a jitted program is its own host-to-device transfer and its own argument to convert
(measured on an H100 with 8 models as 4-lane programs: ~2.6 ms of host time per dispatch).
Packing every numpy leaf into one int32 buffer (int32, uint32 and bool leaves) and one float32
buffer makes it two transfers; unpacking inside the program is free (static slices, reshapes
and bitcasts that XLA fuses into their users). Leaves already on the device (weights, a cached
token history) pass through as they are.

    packed = PackedArrays.pack(tree)              # host: two buffers + static layout
    step_program(..., packed, ...)                # jit arg: the buffers and device leaves are traced
    tree = unpacked(packed)                       # inside the program: the original pytree

`unpack` also works on the host (numpy) for tests. The static layout (tree structure, leaf
shapes and dtypes) is part of the jit cache key, as the leaves' shapes were before, so a
program warmed up with packed inputs is the one served with them.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

_INT = "int32"                   # buffer of int32 / uint32 / bool leaves
_FLOAT = "float32"               # buffer of float32 leaves
_DEVICE = "device"               # a leaf passed through as it is
# host dtype -> (buffer, dtype name restored by unpack)
_KINDS = {np.dtype(np.int32): (_INT, "int32"), np.dtype(np.uint32): (_INT, "uint32"),
          np.dtype(np.bool_): (_INT, "bool"), np.dtype(np.float32): (_FLOAT, "float32")}


@jax.tree_util.register_pytree_node_class
class PackedArrays:
    """A pytree whose numpy leaves sit back to back in an int32 and a float32 buffer; `specs`
    says per leaf (where, shape, dtype): the buffer it is in, or a device leaf passed through."""

    def __init__(self, ints, floats, device_leaves: tuple, treedef, specs: tuple):
        self.ints = ints
        self.floats = floats
        self.device_leaves = device_leaves
        self.treedef = treedef
        self.specs = specs

    @classmethod
    def pack(cls, tree) -> "PackedArrays":
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        parts = {_INT: [], _FLOAT: []}
        device, specs = [], []
        for leaf in leaves:                    # the hot path of every dispatch: plain numpy calls only
            a = leaf if type(leaf) is np.ndarray else None
            if a is None:
                if isinstance(leaf, jax.Array):
                    device.append(leaf)
                    specs.append((_DEVICE, None, None))
                    continue
                a = np.asarray(leaf)
            kind_name = _KINDS.get(a.dtype)
            if kind_name is None:
                raise ValueError(f"PackedArrays.pack: a host leaf of dtype {a.dtype} (shape {a.shape}); "
                                 f"packable: {sorted(str(d) for d in _KINDS)}")
            kind, name = kind_name
            flat = a.ravel()
            if name == "uint32":
                flat = flat.view(np.int32)
            elif name == "bool":
                flat = flat.astype(np.int32)
            parts[kind].append(flat)
            specs.append((kind, a.shape, name))

        def buffer(kind):
            return np.concatenate(parts[kind]) if parts[kind] else np.zeros(0, kind)

        return cls(buffer(_INT), buffer(_FLOAT), tuple(device), treedef, tuple(specs))

    def unpack(self):
        """The original pytree (device arrays inside a program, numpy on the host)."""
        host = isinstance(self.ints, np.ndarray)
        starts = {_INT: 0, _FLOAT: 0}
        buffers = {_INT: self.ints, _FLOAT: self.floats}
        device = iter(self.device_leaves)
        leaves = []
        for kind, shape, dtype in self.specs:
            if kind == _DEVICE:
                leaves.append(next(device))
                continue
            size = math.prod(shape)
            x = buffers[kind][starts[kind]:starts[kind] + size].reshape(shape)
            starts[kind] += size
            if dtype == "uint32":
                x = x.view(np.uint32) if host else jax.lax.bitcast_convert_type(x, jnp.uint32)
            elif dtype == "bool":
                x = x != 0
            leaves.append(x)
        return jax.tree_util.tree_unflatten(self.treedef, leaves)

    def tree_flatten(self):
        return (self.ints, self.floats, self.device_leaves), (self.treedef, self.specs)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)


def unpacked(tree):
    """`tree.unpack()` for a PackedArrays, else the tree itself (programs take either)."""
    return tree.unpack() if isinstance(tree, PackedArrays) else tree
