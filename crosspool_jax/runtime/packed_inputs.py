"""`PackedInt32`: a pytree of small int32 host arrays sent to the device as ONE buffer.

A step's inputs are about ten small int32 arrays (token ids, positions, slots, page tables,
lengths). Each one handed to a jitted program is its own host-to-device transfer (on a mesh,
one per device); packing them into one flat buffer makes it one transfer, and unpacking
inside the program is free (static slices and reshapes that XLA fuses into their users).

    packed = PackedInt32.pack(step_inputs)          # host: one np.int32 buffer + static layout
    step_program(..., packed, ...)                  # jit arg: only the buffer is traced
    inputs = packed.unpack()                        # inside the program: the original pytree

`unpack` also works on the host (numpy) for tests. The static layout (tree structure and leaf
shapes) is part of the jit cache key, as the leaf shapes were before.
"""
from __future__ import annotations

import math

import jax
import numpy as np


@jax.tree_util.register_pytree_node_class
class PackedInt32:
    """One int32 buffer holding the leaves of a pytree back to back, plus their static layout."""

    def __init__(self, buffer, treedef, shapes: tuple):
        self.buffer = buffer
        self.treedef = treedef
        self.shapes = shapes

    @classmethod
    def pack(cls, tree) -> "PackedInt32":
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        for leaf in leaves:
            if np.asarray(leaf).dtype != np.int32:
                raise ValueError(f"PackedInt32.pack: every leaf must be int32, got {np.asarray(leaf).dtype} "
                                 f"(shape {np.shape(leaf)})")
        shapes = tuple(tuple(int(d) for d in np.shape(leaf)) for leaf in leaves)
        buffer = (np.concatenate([np.asarray(leaf).reshape(-1) for leaf in leaves]) if leaves
                  else np.zeros(0, np.int32))
        return cls(buffer, treedef, shapes)

    def unpack(self):
        """The original pytree (device arrays inside a program, numpy on the host)."""
        leaves, start = [], 0
        for shape in self.shapes:
            size = math.prod(shape)
            leaves.append(self.buffer[start:start + size].reshape(shape))
            start += size
        return jax.tree_util.tree_unflatten(self.treedef, leaves)

    def tree_flatten(self):
        return (self.buffer,), (self.treedef, self.shapes)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(children[0], *aux)


def unpacked(tree):
    """`tree.unpack()` for a PackedInt32, else the tree itself (programs take either)."""
    return tree.unpack() if isinstance(tree, PackedInt32) else tree
