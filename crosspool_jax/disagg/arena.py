"""Building the arena: one flat row per device holding what its role needs (see layout.py).

`build_arena(kv_params, ffn_params, layout)` packs a model's parameter pytrees (as
`models.init_random_params` or `checkpoints.load_model` give them) into per-device host rows
-- the attention side and zeroed KV pages on each KV device, each weight device's expert
shard -- and places them with one `jax.device_put` of the rows, assembled into the global
`[num_devices, arena_elems]` array sharded over "dev". `expert_shard` is the one place that
says which experts and hidden columns weight device j holds. `build_multi_arena` packs several
models into one arena (a `MultiArenaLayout`); `Arena` owns the live array between steps.
"""
from __future__ import annotations

import functools
from typing import Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from crosspool_jax.disagg.layout import ArenaLayout, MultiArenaLayout


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


def weight_device_leaves(moe: dict, layout: ArenaLayout, w_index: int) -> dict:
    """The moe leaves as weight device `w_index` stores them (its shard; replicated leaves whole)."""
    E, F = moe["w1_LEDF2"].shape[1], moe["w2_LEFD"].shape[2]
    experts, cols = expert_shard(layout, w_index, E, F)
    out = {name: np.asarray(a) for name, a in moe.items()}
    out["w1_LEDF2"] = _gate_up_columns(out["w1_LEDF2"][:, experts], cols)
    out["w2_LEFD"] = out["w2_LEFD"][:, experts, cols]
    if "shared_w1_LDF2" in out:
        Fs_loc = out["shared_w2_LFD"].shape[1] // layout.n_w
        s_cols = slice(w_index * Fs_loc, (w_index + 1) * Fs_loc)
        out["shared_w1_LDF2"] = _gate_up_columns(out["shared_w1_LDF2"], s_cols)
        out["shared_w2_LFD"] = out["shared_w2_LFD"][:, s_cols]
    return out


def _fill(row: np.ndarray, layout: ArenaLayout, role: str, leaves: dict) -> None:
    for slot in layout.slots(role):
        if slot.name.startswith("pages/"):
            continue                                  # KV pages start zeroed
        if slot.name not in leaves:
            raise ValueError(f"build_arena: parameter {slot.name!r} is missing from the model's params")
        a = np.asarray(leaves[slot.name])
        if tuple(a.shape) != slot.shape:
            raise ValueError(f"build_arena: tensor {slot.name!r} has shape {tuple(a.shape)}, "
                             f"the layout expects {slot.shape}")
        row[slot.offset:slot.offset + slot.size] = a.astype(row.dtype).reshape(-1)


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _fill_model(rows: list, kv_params: dict, ffn_params: dict, layout: ArenaLayout) -> None:
    """Write one model's attention side into every KV row and its expert shards into the weight rows."""
    if set(ffn_params) != {"moe"}:
        raise ValueError(f"build_arena: ffn_params must hold only 'moe' stacks, got {sorted(ffn_params)}")
    kv_leaves = _flat({k: kv_params[k] for k in ("embed", "attn", "final")})
    for row in rows[:layout.n_kv]:             # the pages region is never touched on the host
        _fill(row, layout, "kv", kv_leaves)
    host_moe = {k: np.asarray(v) for k, v in ffn_params["moe"].items()}
    for j in range(layout.n_w):
        _fill(rows[layout.n_kv + j], layout, "w", _flat({"moe": weight_device_leaves(host_moe, layout, j)}))


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
    for name in layout.names:
        kv_params, ffn_params = params[name]
        try:
            _fill_model(rows, kv_params, ffn_params, layout.model(name))
        except ValueError as e:
            raise ValueError(f"model {name!r}: {e}") from None
    return rows


def _pages_end(layout: ArenaLayout) -> int:
    v = layout.slot("kv", "pages/v_PX")
    return v.offset + v.size


@functools.partial(jax.jit, static_argnames=("pages_end",))
def _with_zero_pages(tail_1X: jax.Array, *, pages_end: int) -> jax.Array:
    return jnp.concatenate([jnp.zeros((1, pages_end), tail_1X.dtype), tail_1X], axis=1)


def _place(rows: list, layout: ArenaLayout) -> jax.Array:
    """One shard per device; a KV row's zero pages are made on its device (only the parameter
    tail crosses from the host), so a large pool costs no host memory or transfer."""
    mesh_devices = list(layout.mesh().devices.reshape(-1))
    end = _pages_end(layout)
    shards = []
    for d, (row, device) in enumerate(zip(rows, mesh_devices)):
        if d < layout.n_kv:
            shards.append(_with_zero_pages(jax.device_put(row[None, end:], device), pages_end=end))
        else:
            shards.append(jax.device_put(row[None, :], device))
    return jax.make_array_from_single_device_arrays((layout.num_devices, layout.arena_elems),
                                                    layout.sharding(), shards)


def build_arena(kv_params: dict, ffn_params: dict, layout: ArenaLayout) -> jax.Array:
    """The global arena `[num_devices, arena_elems]` (layout.dtype), row d on mesh device d."""
    return _place(host_rows(kv_params, ffn_params, layout), layout)


def build_multi_arena(params: Mapping[str, tuple], layout: MultiArenaLayout) -> jax.Array:
    """The arena of several models (name -> (kv_params, ffn_params)): shared KV pages, each
    model's attention side on every KV device, its expert shard on each weight device."""
    return _place(multi_host_rows(params, layout), layout.first)


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
    def array(self) -> jax.Array:
        if self._array is None:
            raise RuntimeError("Arena.array: the arena is taken by a step")
        return self._array
