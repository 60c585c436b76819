"""Building the arena: one flat row per device holding what its role needs (see layout.py).

`build_arena(kv_params, ffn_params, layout)` packs a model's parameter pytrees (as
`models.init_random_params` or `checkpoints.load_model` give them) into per-device host rows
-- the attention side on each of its home KV devices, each weight device's FFN shards
(experts of the MoE layers, its block of F of the dense layers) -- and places them with one
`jax.device_put` of the rows, assembled into the global `[num_devices, arena_elems]` array
sharded over "dev". `expert_shard` is the one place that says which experts and hidden
columns weight device j holds; `_tp_shard` the one split over F of a shared expert or a dense
layer. `build_multi_arena` packs several
models into one arena (a `MultiArenaLayout`); `Arena` owns the live array between steps.
A budgeted role's region (`layout.Region`) is left zero by the builder: `region_payloads`
gives one model's content of that region per row, which `disagg/residency.py` writes into
the slot it assigns. Rows are made zero on their devices; only the packed content crosses
from the host.
"""
from __future__ import annotations

import functools
from typing import Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict

from crosspool_jax.disagg.layout import ALIGN, ROLES, ROUTING_LEAVES, ArenaLayout, MultiArenaLayout


def expert_shard(layout: ArenaLayout, w_index: int, num_experts: int, hidden: int) -> tuple[slice, slice]:
    """(experts, hidden columns) of weight device `w_index` (0-based within the weights pool)."""
    if not 0 <= w_index < layout.n_w:
        raise ValueError(f"weight device index {w_index} out of range [0, {layout.n_w})")
    e_loc, f_loc = num_experts // layout.ep, hidden // layout.tp
    e0, f0 = (w_index // layout.tp) * e_loc, (w_index % layout.tp) * f_loc
    return slice(e0, e0 + e_loc), slice(f0, f0 + f_loc)


def _gate_up_columns(w_DF2: np.ndarray, cols: slice) -> np.ndarray:
    """The [gate | up] columns `cols` of each half of a stacked [..., 2F] matrix."""
    F = w_DF2.shape[-1] // 2
    return np.concatenate([w_DF2[..., cols], w_DF2[..., F:][..., cols]], axis=-1)


def _tp_shard(w1_LDF2: np.ndarray, w2_LFD: np.ndarray, n_w: int, w_index: int) -> tuple[np.ndarray, np.ndarray]:
    """A SwiGLU FFN split tensor-parallel over all n_w weight devices: weight device `w_index`'s
    contiguous block of F (its [gate | up] columns of w1, its rows of w2). The shared expert and
    the dense FFN layers use it; the partial outputs sum to the full FFN."""
    F_loc = w2_LFD.shape[1] // n_w
    cols = slice(w_index * F_loc, (w_index + 1) * F_loc)
    return _gate_up_columns(w1_LDF2, cols), w2_LFD[:, cols]


def weight_device_leaves(moe: dict, layout: ArenaLayout, w_index: int) -> dict:
    """The moe leaves as weight device `w_index` stores them (its shard; replicated leaves whole).
    The experts' biases (GPT-OSS) go with their experts: b1 [gate | up] with w1's columns, b2
    (added once per expert after the down projection) on the first of the tp devices sharing
    those experts and zero on the others, so the sum over the shards adds it once."""
    E, F = moe["w1_LEDF2"].shape[1], moe["w2_LEFD"].shape[2]
    experts, cols = expert_shard(layout, w_index, E, F)
    out = {name: np.asarray(a) for name, a in moe.items()}
    out["w1_LEDF2"] = _gate_up_columns(out["w1_LEDF2"][:, experts], cols)
    out["w2_LEFD"] = out["w2_LEFD"][:, experts, cols]
    if "b1_LEF2" in out:
        out["b1_LEF2"] = _gate_up_columns(out["b1_LEF2"][:, experts], cols)
        b2 = out["b2_LED"][:, experts]
        out["b2_LED"] = b2 if w_index % layout.tp == 0 else np.zeros_like(b2)
    if "shared_w1_LDF2" in out:
        out["shared_w1_LDF2"], out["shared_w2_LFD"] = _tp_shard(out["shared_w1_LDF2"], out["shared_w2_LFD"],
                                                                layout.n_w, w_index)
    return out


def dense_device_leaves(dense: dict, layout: ArenaLayout, w_index: int) -> dict:
    """The dense FFN leaves as weight device `w_index` stores them (its block of F; norm whole)."""
    out = {name: np.asarray(a) for name, a in dense.items()}
    out["w1_LDF2"], out["w2_LFD"] = _tp_shard(out["w1_LDF2"], out["w2_LFD"], layout.n_w, w_index)
    return out


def _fill(row: np.ndarray, layout: ArenaLayout, role: str, leaves: dict, origin: int = 0) -> None:
    """Write the role's tensors into `row`, which starts at element `origin` of the arena row."""
    for slot in layout.slots(role):
        if slot.name.startswith("pages/"):
            continue                                  # KV pages start zeroed
        if slot.name not in leaves:
            raise ValueError(f"build_arena: parameter {slot.name!r} is missing from the model's params")
        a = np.asarray(leaves[slot.name])
        if tuple(a.shape) != slot.shape:
            raise ValueError(f"build_arena: tensor {slot.name!r} has shape {tuple(a.shape)}, "
                             f"the layout expects {slot.shape}")
        row[slot.offset - origin:slot.offset - origin + slot.size] = a.astype(row.dtype).reshape(-1)


def _role_leaves(kv_params: dict, ffn_params: dict, layout: ArenaLayout, role: str) -> list[dict]:
    """The flat leaves each row of a role stores: the attention side with the FFN stacks' input
    norms and routers (the same dict for every KV row) or weight device j's FFN shards (MoE and
    dense stacks)."""
    kinds = sorted({s.name.split("/", 1)[0] for s in layout.w_slots})
    if sorted(ffn_params) != kinds:
        raise ValueError(f"build_arena: ffn_params must hold the stacks {kinds} of the layout, "
                         f"got {sorted(ffn_params)}")
    if role == "kv":                 # the attention side and each FFN stack's input norm and router
        routing = {kind: {k: v for k, v in stack.items() if k in ROUTING_LEAVES} for kind, stack in ffn_params.items()}
        kv_side = {**{k: kv_params[k] for k in ("embed", "attn", "final")}, **routing}
        return [flatten_dict(kv_side, sep="/")] * layout.n_kv
    host = {kind: {k: np.asarray(v) for k, v in ffn_params[kind].items()} for kind in kinds}
    shard = {"moe": weight_device_leaves, "dense": dense_device_leaves}
    return [flatten_dict({kind: shard[kind](host[kind], layout, j) for kind in kinds}, sep="/")
            for j in range(layout.n_w)]


def _fill_model(rows: list, kv_params: dict, ffn_params: dict, layout: ArenaLayout,
                roles: tuple = ("kv", "w")) -> None:
    """Write one model's attention side into the KV rows of its homes and its FFN shards into
    the weight rows (only the given roles; the pages are never touched on the host)."""
    for role in roles:
        first = 0 if role == "kv" else layout.n_kv
        for i, leaves in enumerate(_role_leaves(kv_params, ffn_params, layout, role)):
            if role == "w" or i in layout.homes:
                _fill(rows[first + i], layout, role, leaves)


def region_payloads(kv_params: dict, ffn_params: dict, layout: ArenaLayout, role: str) -> list[np.ndarray]:
    """One model's content of a budgeted role's region, per row of that role (KV rows: one array
    shared by all): `[n_units, ALIGN]` host arrays, its slot-0 view's slots from the region start."""
    slots = [s for s in layout.slots(role) if not s.name.startswith("pages/")]
    start = min(s.offset for s in slots)
    n_units = -(-(max(s.offset + s.size for s in slots) - start) // ALIGN)
    out, made = [], {}
    for leaves in _role_leaves(kv_params, ffn_params, layout, role):
        if id(leaves) not in made:
            buf = np.zeros(n_units * ALIGN, jnp.dtype(layout.dtype))
            _fill(buf, layout, role, leaves, origin=start)
            made[id(leaves)] = buf.reshape(n_units, ALIGN)
        out.append(made[id(leaves)])
    return out


def host_rows(kv_params: dict, ffn_params: dict, layout: ArenaLayout) -> list[np.ndarray]:
    """The arena's rows on the host, one per device of the mesh (KV devices first)."""
    rows = [np.zeros(layout.arena_elems, jnp.dtype(layout.dtype)) for _ in range(layout.num_devices)]
    _fill_model(rows, kv_params, ffn_params, layout)
    return rows


def multi_host_rows(params: Mapping[str, tuple], layout: MultiArenaLayout) -> list[np.ndarray]:
    """Rows of a several-model arena; params: name -> (kv_params, ffn_params), every model of the layout."""
    missing = set(layout.names) - set(params)
    if missing:
        raise ValueError(f"build_multi_arena: no params for model(s) {sorted(missing)}")
    first = layout.first
    rows = [np.zeros(first.arena_elems, jnp.dtype(first.dtype)) for _ in range(first.num_devices)]
    packed = tuple(r for r in ROLES if layout.region(r) is None)    # budgeted regions stay zero here
    for name in layout.names:
        kv_params, ffn_params = params[name]
        try:
            _fill_model(rows, kv_params, ffn_params, layout.model(name), packed)
        except ValueError as e:
            raise ValueError(f"model {name!r}: {e}") from None
    return rows


@functools.partial(jax.jit, static_argnames=("spans", "total"))
def _zero_padded(*pieces_1N: jax.Array, spans: tuple, total: int) -> jax.Array:
    """A [1, total] row, zero but for pieces_1N[i] at spans[i] = (lo, hi) (ascending, disjoint)."""
    parts, at = [], 0
    for piece, (lo, hi) in zip(pieces_1N, spans):
        parts += [jnp.zeros((1, lo - at), piece.dtype), piece]
        at = hi
    parts.append(jnp.zeros((1, total - at), pieces_1N[0].dtype))
    return jnp.concatenate(parts, axis=1)


def _place(rows: list, layout: ArenaLayout, spans: list) -> jax.Array:
    """One shard per device, zero on its device except `spans[d]` = [(lo, hi), ...] of row d,
    the only parts that cross from the host (the pages and an empty region cost no transfer)."""
    mesh_devices = list(layout.mesh().devices.reshape(-1))
    dtype = jnp.dtype(layout.dtype)
    shards = []
    for row, device, row_spans in zip(rows, mesh_devices, spans):
        row_spans = tuple(sorted((lo, hi) for lo, hi in row_spans if hi > lo))
        if row_spans:
            pieces = [jax.device_put(row[None, lo:hi], device) for lo, hi in row_spans]
            shards.append(_zero_padded(*pieces, spans=row_spans, total=layout.arena_elems))
        else:
            shards.append(jnp.zeros((1, layout.arena_elems), dtype, device=device))
    return jax.make_array_from_single_device_arrays((layout.num_devices, layout.arena_elems),
                                                    layout.sharding(), shards)


def build_arena(kv_params: dict, ffn_params: dict, layout: ArenaLayout) -> jax.Array:
    """The global arena `[num_devices, arena_elems]` (layout.dtype), row d on mesh device d:
    the model's attention side on every KV row, its FFN shards on every weight row."""
    def spans(role):
        slots = [s for s in layout.slots(role) if not s.name.startswith("pages/")]
        return [(s.offset, s.offset + s.size) for s in slots]
    return _place(host_rows(kv_params, ffn_params, layout), layout,
                  [spans("kv")] * layout.n_kv + [spans("w")] * layout.n_w)


def build_multi_arena(params: Mapping[str, tuple], layout: MultiArenaLayout) -> jax.Array:
    """The arena of several models (name -> (kv_params, ffn_params)): each model's attention side
    on its home KV devices, its FFN shards on each weight device, pages zero. A budgeted role's
    region is left zero (disagg/residency.py fills its slots)."""
    spans = [[] if layout.region(layout.first.role_of(d)) is not None else layout.content_spans(d)
             for d in range(layout.num_devices)]
    return _place(multi_host_rows(params, layout), layout.first, spans)


class Arena:
    """Owns the live arena array of a `MultiArenaLayout`. Each step program takes it (donated)
    and hands the updated one back with `put`."""

    def __init__(self, layout: MultiArenaLayout, array: jax.Array):
        if array.shape != (layout.num_devices, layout.arena_elems):
            raise ValueError(f"Arena: array has shape {array.shape}, the layout needs "
                             f"{(layout.num_devices, layout.arena_elems)}")
        self.layout = layout
        self._array: Optional[jax.Array] = array

    def take(self) -> jax.Array:
        if self._array is None:
            raise RuntimeError("Arena.take: the arena is already taken by a step (put it back first)")
        array, self._array = self._array, None
        return array

    def put(self, array: jax.Array) -> None:
        self._array = array

    @property
    def taken(self) -> bool:
        """Whether a step holds the array now (between `take` and `put`)."""
        return self._array is None

    @property
    def array(self) -> jax.Array:
        if self._array is None:
            raise RuntimeError("Arena.array: the arena is taken by a step")
        return self._array
