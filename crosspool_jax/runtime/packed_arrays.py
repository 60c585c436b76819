"""`PackedArrays`: the arrays of a pytree as ONE int32 buffer, for a step program's inputs and outputs.

A step's host inputs are dozens of small arrays (token ids, positions, slots, page tables,
lengths; each sampling field; per lane of a multi-model program, all of them again), and its
outputs are a handful per model (sampled ids, logprobs, ranks, top tokens). Each array that
crosses between host and device is its own transfer and its own argument to convert or buffer
to fetch (measured on an H100 with 8 models as 4-lane programs: ~2.6 ms of host time per
dispatch when every input was its own argument). Packing every leaf into one int32 buffer
(int32 as it is, float32 and uint32 bit-cast, bool as 0/1) makes each direction one transfer;
unpacking is free on either side (static slices, reshapes and bitcasts: XLA fuses them into
their users; numpy views on the host).

    packed = PackedArrays.pack(tree)              # host: one buffer + static layout
    outs = step_program(..., packed, ...)         # jit arg: the buffer and device leaves are traced
    tree = unpacked(packed)                       # inside the program: the original pytree
    return PackedArrays.pack_device(results)      # inside the program: the outputs as one buffer
    host_tree = jax.device_get(outs).unpack()     # host: one fetch, numpy views

`pack` passes leaves already on the device (weights, a cached token history) through as they
are. `pack_device(tree, lead=True)` keeps every leaf's leading axis (a buffer `[n, ...]`): the
outputs of a program sharded over devices along that axis stay where they are, no gather. The
static layout (tree structure, leaf shapes and dtypes) is the pytree's aux data: part of a jit
cache key for inputs, returned with the buffer for outputs.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

_DEVICE = "device"               # a leaf passed through as it is
_PACKABLE = ("int32", "uint32", "float32", "bool")
_NAMES = {np.dtype(name): name for name in _PACKABLE}      # a dict lookup: numpy's dtype.name is slow


@jax.tree_util.register_pytree_node_class
class PackedArrays:
    """A pytree whose array leaves sit back to back in one int32 buffer `data` (1-D, or `[n, ...]`
    with `lead`: each leaf's leading axis kept); `specs` says per leaf (shape, dtype name), or
    `(_DEVICE, None)` for a device leaf passed through."""

    def __init__(self, data, device_leaves: tuple, treedef, specs: tuple, lead: bool = False):
        self.data = data
        self.device_leaves = device_leaves
        self.treedef = treedef
        self.specs = specs
        self.lead = lead

    @classmethod
    def pack(cls, tree) -> "PackedArrays":
        """Host leaves (numpy or scalars) into the buffer; jax.Array leaves passed through."""
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        parts, device, specs = [], [], []
        for leaf in leaves:                    # the hot path of every dispatch: plain numpy calls only
            a = leaf if type(leaf) is np.ndarray else None
            if a is None:
                if isinstance(leaf, jax.Array):
                    device.append(leaf)
                    specs.append((_DEVICE, None))
                    continue
                a = np.asarray(leaf)
            name = _NAMES.get(a.dtype)
            if name is None:
                raise ValueError(f"PackedArrays.pack: a host leaf of dtype {a.dtype} (shape {a.shape}); "
                                 f"packable: {', '.join(_PACKABLE)}")
            parts.append(a.view(np.int32) if name == "float32" else a)    # the rest: concatenate casts
            specs.append((a.shape, name))
        # axis=None flattens each part; the unsafe cast keeps uint32's bits and makes bools 0/1
        data = np.concatenate(parts, axis=None, dtype=np.int32, casting="unsafe") if parts else np.zeros(0, np.int32)
        return cls(data, tuple(device), treedef, tuple(specs))

    @classmethod
    def pack_device(cls, tree, *, lead: bool = False) -> "PackedArrays":
        """Inside a program: every leaf into the buffer (its outputs as one array to fetch).
        lead: the buffer is `[n, ...]`, each leaf's leading axis (all of size n) kept."""
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        parts, specs = [], []
        for x in leaves:
            name = _NAMES.get(np.dtype(x.dtype))
            if name is None:
                raise ValueError(f"PackedArrays.pack_device: a leaf of dtype {x.dtype} (shape {x.shape}); "
                                 f"packable: {', '.join(_PACKABLE)}")
            x = x.astype(jnp.int32) if name == "bool" else jax.lax.bitcast_convert_type(x, jnp.int32)
            parts.append(x.reshape(x.shape[0], -1) if lead else x.reshape(-1))
            specs.append((tuple(x.shape), name))
        if lead and len({p.shape[0] for p in parts}) > 1:
            raise ValueError(f"PackedArrays.pack_device(lead=True): leading axes differ: {[s for s, _ in specs]}")
        if not parts:
            data = jnp.zeros(0, jnp.int32)
        else:
            data = jnp.concatenate(parts, axis=-1)
        return cls(data, (), treedef, tuple(specs), lead)

    def unpack(self):
        """The original pytree (device arrays inside a program, numpy views on the host)."""
        host = isinstance(self.data, np.ndarray)
        start = 0
        device = iter(self.device_leaves)
        leaves = []
        for shape, dtype in self.specs:
            if shape == _DEVICE:
                leaves.append(next(device))
                continue
            if self.lead:
                size = math.prod(shape[1:])
                x = self.data[:, start:start + size].reshape(shape)
            else:
                size = math.prod(shape)
                x = self.data[start:start + size].reshape(shape)
            start += size
            if dtype == "bool":
                x = x != 0
            elif dtype != "int32":
                x = x.view(dtype) if host else jax.lax.bitcast_convert_type(x, jnp.dtype(dtype))
            leaves.append(x)
        return jax.tree_util.tree_unflatten(self.treedef, leaves)

    def tree_flatten(self):
        return (self.data, self.device_leaves), (self.treedef, self.specs, self.lead)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)


def unpacked(tree):
    """`tree.unpack()` for a PackedArrays, else the tree itself (programs take either)."""
    return tree.unpack() if isinstance(tree, PackedArrays) else tree
