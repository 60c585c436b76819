"""The arena layout: which tensor sits where in each device's flat arena row.

Every device of the CrossPool mesh (one axis, "dev") holds ONE row of the arena, a global
array `[num_devices, arena_elems]` of one dtype sharded over "dev". The first `n_kv`
devices are the KV pool, the next `n_w` the weights pool (a static role table). A row's
contents depend on its device's role:

    KV device row:      pages/k_PX | pages/v_PX | embed/... | attn/... (all L) | final/...
    weight device row:  moe/norm_LD | moe/router_LDE | moe/w1_LEDF2 (local shard) | moe/w2_LEFD ...

so nothing is stored twice except the (small) attention side, replicated on each KV device,
and the router and FFN norm, replicated on each weight device. `arena_elems` is the max of
the two roles' sizes (a KV device's row is mostly KV pages).

Sharding rule of the experts over the `n_w` weight devices (one rule, both cases):
`ep = gcd(E, n_w)` expert-parallel groups of `E / ep` experts each, and inside each group
`tp = n_w / ep` devices split the expert hidden dim F (tensor-parallel; F % tp must be 0).
Weight device j holds experts `[(j // tp) * E/ep, ...)` and hidden columns
`[(j % tp) * F/tp, ...)` of each. E a multiple of n_w gives pure expert parallelism; E = 1
(or coprime to n_w) gives pure tensor parallelism. A shared expert (Qwen2-MoE) is split
tensor-parallel over all n_w devices (Fs % n_w must be 0).

Several models share one arena (`make_multi_layout`): ONE pages region (page_elems common to
all, as the engine's `choose_page_elems` picks), then each model's attention side under
"<model>/..." in the KV rows and its expert shard under "<model>/moe/..." in the weight rows.
`MultiArenaLayout.model(name)` is that model's `ArenaLayout` view (its slots, prefix dropped).

KV pages come first in a KV row (offset 0) so that the row viewed as `[rows, K*H]` addresses
a token slot of the K (resp. V) pages directly; `arena_elems` is a multiple of K*H.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from crosspool_jax.kv.pool import choose_page_elems, tokens_per_page
from crosspool_jax.models.config import ModelConfig
from crosspool_jax.models.params import param_shapes

AXIS = "dev"
ROLES = ("kv", "w")
_ALIGN = 128                      # elements; every tensor starts on a multiple of this


@dataclasses.dataclass(frozen=True)
class Slot:
    """One tensor in a row: element offset and shape (row[offset : offset+size] reshaped)."""

    name: str
    offset: int
    shape: tuple

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclasses.dataclass(frozen=True)
class ArenaLayout:
    """Static (hashable) description of the arena: roles, per-role slots, sharding of the experts."""

    n_kv: int
    n_w: int
    device_ids: tuple             # ids of the n_kv + n_w devices, KV devices first
    arena_elems: int
    dtype: str
    pages_per_device: int
    page_elems: int
    tokens_per_page: int          # G for this model's K*H
    ep: int                       # expert-parallel groups
    tp: int                       # tensor-parallel ways inside a group (over F)
    kv_slots: tuple               # Slot, ... of a KV device's row
    w_slots: tuple                # Slot, ... of a weight device's row

    def __post_init__(self):
        if self.n_kv < 1 or self.n_w < 1:
            raise ValueError(f"ArenaLayout: need n_kv >= 1 and n_w >= 1, got n_kv={self.n_kv}, n_w={self.n_w}")
        if len(self.device_ids) != self.n_kv + self.n_w:
            raise ValueError(f"ArenaLayout.device_ids has {len(self.device_ids)} ids, "
                             f"expected n_kv + n_w = {self.n_kv + self.n_w}")
        if self.ep * self.tp != self.n_w:
            raise ValueError(f"ArenaLayout: ep * tp = {self.ep} * {self.tp} must equal n_w = {self.n_w}")
        for role, slots in (("kv", self.kv_slots), ("w", self.w_slots)):
            for s in slots:
                if s.offset < 0 or s.offset + s.size > self.arena_elems:
                    raise ValueError(f"ArenaLayout: {role} slot {s.name!r} [{s.offset}, {s.offset + s.size}) "
                                     f"does not fit in arena_elems={self.arena_elems}")

    @property
    def num_devices(self) -> int:
        return self.n_kv + self.n_w

    def role_of(self, device_index: int) -> str:
        """'kv' or 'w' for the device at this position of the mesh axis."""
        if not 0 <= device_index < self.num_devices:
            raise ValueError(f"device index {device_index} out of range [0, {self.num_devices})")
        return "kv" if device_index < self.n_kv else "w"

    def slots(self, role: str) -> tuple:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        return self.kv_slots if role == "kv" else self.w_slots

    def slot(self, role: str, name: str) -> Slot:
        for s in self.slots(role):
            if s.name == name:
                return s
        raise ValueError(f"arena layout has no {role!r} slot named {name!r}; "
                         f"it has {[s.name for s in self.slots(role)]}")

    def has(self, role: str, name: str) -> bool:
        return any(s.name == name for s in self.slots(role))

    def used_elems(self, role: str) -> int:
        return max((s.offset + s.size for s in self.slots(role)), default=0)

    def view(self, row_X: jax.Array, role: str, name: str) -> jax.Array:
        """The tensor `name` of a role inside one device's row (a static slice + reshape)."""
        s = self.slot(role, name)
        return jax.lax.slice_in_dim(row_X, s.offset, s.offset + s.size).reshape(s.shape)

    def mesh(self) -> jax.sharding.Mesh:
        """The 1D mesh over axis "dev" (KV devices first)."""
        by_id = {d.id: d for d in jax.devices()}
        missing = [i for i in self.device_ids if i not in by_id]
        if missing:
            raise ValueError(f"ArenaLayout.device_ids {missing} are not devices of this process")
        return jax.sharding.Mesh(np.array([by_id[i] for i in self.device_ids]), (AXIS,))

    def sharding(self) -> jax.sharding.NamedSharding:
        return jax.sharding.NamedSharding(self.mesh(), jax.sharding.PartitionSpec(AXIS, None))


def _align(n: int, a: int = _ALIGN) -> int:
    return -(-n // a) * a


def _pack(entries: Sequence[tuple], start: int = 0) -> tuple:
    slots, offset = [], start
    for name, shape in entries:
        offset = _align(offset)
        slots.append(Slot(name, offset, tuple(int(s) for s in shape)))
        offset += slots[-1].size
    return tuple(slots)


def expert_split(num_experts: int, n_w: int) -> tuple[int, int]:
    """(ep, tp): ep = gcd(E, n_w) expert-parallel groups, tp = n_w // ep ways over F."""
    ep = math.gcd(num_experts, n_w)
    return ep, n_w // ep


def _model_entries(config: ModelConfig, n_w: int) -> tuple[list, list, int, int]:
    """(attention-side entries, weight-row entries, ep, tp) of one model; raises for models the
    disaggregated step does not support."""
    c = config
    if c.ffn_kinds != ("moe",):
        raise ValueError(f"disaggregated step supports models whose every layer is MoE; "
                         f"{c.architecture} has FFN kinds {c.ffn_kinds}")
    E, F, Fs = c.num_experts, c.moe_intermediate_size, c.shared_expert_intermediate_size
    ep, tp = expert_split(E, n_w)
    if F % tp:
        raise ValueError(f"moe_intermediate_size F={F} must be divisible by the tensor-parallel ways "
                         f"tp = n_w / gcd(E, n_w) = {tp} (E={E}, n_w={n_w})")
    if Fs and Fs % n_w:
        raise ValueError(f"shared_expert_intermediate_size {Fs} must be divisible by n_w={n_w}")
    kv_shapes, ffn_shapes = param_shapes(c)
    kv_entries = []
    for group in ("embed", "attn", "final"):
        kv_entries += [(f"{group}/{leaf}", shape) for leaf, shape in kv_shapes[group].items()]
    Lm, D = c.num_layers, c.hidden_size
    local = {"w1_LEDF2": (Lm, E // ep, D, 2 * F // tp), "w2_LEFD": (Lm, E // ep, F // tp, D)}
    if Fs:
        local.update(shared_w1_LDF2=(Lm, D, 2 * Fs // n_w), shared_w2_LFD=(Lm, Fs // n_w, D))
    w_entries = [(f"moe/{leaf}", local.get(leaf, shape)) for leaf, shape in ffn_shapes["moe"].items()]
    return kv_entries, w_entries, ep, tp


def _check_split(n_kv, n_w, pages_per_device, devices) -> None:
    for name, n in (("n_kv", n_kv), ("n_w", n_w)):
        if not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"{name} must be a positive device count (each role needs at least one "
                             f"device), got {n!r}")
    if n_kv + n_w > len(devices):
        raise ValueError(f"split n_kv={n_kv} + n_w={n_w} = {n_kv + n_w} devices, but only "
                         f"{len(devices)} device(s) exist")
    if pages_per_device < 1:
        raise ValueError(f"pages_per_device must be >= 1, got {pages_per_device}")


def _page_slots(pages_per_device: int, page_elems: int, align: int) -> tuple:
    """pages/k_PX at offset 0, pages/v_PX right after (offsets multiples of every model's K*H)."""
    shape = (pages_per_device, page_elems)
    return (Slot("pages/k_PX", 0, shape), Slot("pages/v_PX", _align(pages_per_device * page_elems, align), shape))


def make_layout(config: ModelConfig, *, n_kv: int, n_w: int, pages_per_device: int,
                page_elems: Optional[int] = None, dtype="float32",
                devices: Optional[Sequence[jax.Device]] = None) -> ArenaLayout:
    """Lay out one model's arena for a split of `n_kv` KV devices and `n_w` weight devices.

    devices: the pool to take them from (default `jax.devices()`): the first n_kv become the
    KV pool, the next n_w the weights pool. page_elems defaults to the pool's choice for this
    model's K*H (`kv.pool.choose_page_elems`).
    """
    multi = make_multi_layout({"": config}, n_kv=n_kv, n_w=n_w, pages_per_device=pages_per_device,
                              page_elems=page_elems, dtype=dtype, devices=devices)
    return multi.model("")


@dataclasses.dataclass(frozen=True)
class MultiArenaLayout:
    """The arena of several models: ONE shared pages region in every KV row, then each model's
    attention side (slots "<model>/embed/...", "<model>/attn/...", "<model>/final/..."); each
    weight row holds every model's expert shard ("<model>/moe/..."). `model(name)` is that
    model's view: an `ArenaLayout` over the same rows whose slots are the shared pages and the
    model's own slots with the prefix dropped, so one step program per model reads only its slots.
    """

    models: tuple                 # ((name, ArenaLayout), ...) in registration order

    def __post_init__(self):
        if not self.models:
            raise ValueError("MultiArenaLayout.models must name at least one model")
        first = self.models[0][1]
        for name, lay in self.models:
            for field in ("n_kv", "n_w", "device_ids", "arena_elems", "dtype", "pages_per_device", "page_elems"):
                if getattr(lay, field) != getattr(first, field):
                    raise ValueError(f"MultiArenaLayout: model {name!r} has {field}={getattr(lay, field)!r}, "
                                     f"the arena has {getattr(first, field)!r}")

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.models]

    def model(self, name: str) -> ArenaLayout:
        for n, lay in self.models:
            if n == name:
                return lay
        raise ValueError(f"the arena holds no model named {name!r}; it holds {self.names}")

    @property
    def first(self) -> ArenaLayout:
        """Any model's view: the fields shared by all (n_kv, n_w, device_ids, arena_elems, dtype,
        pages_per_device, page_elems, mesh(), sharding())."""
        return self.models[0][1]

    @property
    def n_kv(self) -> int:
        return self.first.n_kv

    @property
    def n_w(self) -> int:
        return self.first.n_w

    @property
    def num_devices(self) -> int:
        return self.first.num_devices

    @property
    def arena_elems(self) -> int:
        return self.first.arena_elems

    @property
    def pages_per_device(self) -> int:
        return self.first.pages_per_device


def make_multi_layout(configs, *, n_kv: int, n_w: int, pages_per_device: int, page_elems: Optional[int] = None,
                      dtype="float32", devices: Optional[Sequence[jax.Device]] = None) -> MultiArenaLayout:
    """Lay out several models (name -> ModelConfig) in one arena over n_kv + n_w devices.

    page_elems defaults to `kv.pool.choose_page_elems` over every model's K*H (the engine's
    choice). Raises ValueError naming the model for one the disaggregated step cannot run.
    """
    devices = list(jax.devices() if devices is None else devices)
    _check_split(n_kv, n_w, pages_per_device, devices)
    if not configs:
        raise ValueError("make_multi_layout: no models given")
    kv_rows = [c.kv_size for c in configs.values()]
    page_elems = choose_page_elems(kv_rows) if page_elems is None else int(page_elems)
    entries = {}
    for name, c in configs.items():
        try:
            tokens_per_page(page_elems, c.num_kv_heads, c.head_dim)
            entries[name] = _model_entries(c, n_w)
        except ValueError as e:
            if not name:                       # make_layout's single unnamed model
                raise
            raise ValueError(f"model {name!r} cannot run on the disaggregated step: {e}") from None
    align = math.lcm(_ALIGN, *kv_rows)
    pages = _page_slots(pages_per_device, page_elems, align)
    prefix = {name: f"{name}/" if name else "" for name in configs}
    kv_all = _pack([(prefix[n] + k, shape) for n, (kv, _, _, _) in entries.items() for k, shape in kv],
                   pages[1].offset + pages[1].size)
    w_all = _pack([(prefix[n] + k, shape) for n, (_, w, _, _) in entries.items() for k, shape in w])
    used = max(max(s.offset + s.size for s in kv_all), max(s.offset + s.size for s in w_all))
    arena_elems = _align(used, align)
    device_ids = tuple(d.id for d in devices[:n_kv + n_w])

    views = []
    for name, (kv, w, ep, tp) in entries.items():
        c = configs[name]
        kv_names, w_names = {prefix[name] + k for k, _ in kv}, {prefix[name] + k for k, _ in w}
        kv_own = tuple(Slot(s.name[len(prefix[name]):], s.offset, s.shape) for s in kv_all if s.name in kv_names)
        w_own = tuple(Slot(s.name[len(prefix[name]):], s.offset, s.shape) for s in w_all if s.name in w_names)
        views.append((name, ArenaLayout(
            n_kv=int(n_kv), n_w=int(n_w), device_ids=device_ids, arena_elems=arena_elems,
            dtype=jnp.dtype(dtype).name, pages_per_device=pages_per_device, page_elems=page_elems,
            tokens_per_page=tokens_per_page(page_elems, c.num_kv_heads, c.head_dim), ep=ep, tp=tp,
            kv_slots=pages + kv_own, w_slots=w_own)))
    return MultiArenaLayout(tuple(views))
