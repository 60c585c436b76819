"""The arena layout: which tensor sits where in each device's flat arena row.

Every device of the CrossPool mesh (one axis, "dev") holds ONE row of the arena, a global
array `[num_devices, arena_elems]` of one dtype sharded over "dev". The first `n_kv`
devices are the KV pool, the next `n_w` the weights pool (a static role table). Every row is
two halves of `arena_elems / 2`: a device's pages fill each half from its start (local page
l's K at l * page_elems in the first half, its V at the same place in the second) and its
content fills each half from its end, the largest blocks first into the half holding less,
so both halves' content reaches about as deep and the pages under it are the row's memory
beyond the content (`device_pages[d]`; every device has its own count, weight devices too):

    KV device row:      K pages ... | its content, half 1 || V pages ... | its content, half 2
    content:            the attention sides homed there (embed/..., attn/... (all L: q/k/v/o or
                        MLA's projections, biases, sinks), final/..., and the FFN layers' input
                        norms and routers moe/norm_LD, moe/router_LDE, moe/router_bias_LE,
                        dense/norm_LD), or a budgeted attention `Region`
    weight device row:  the same halves; content: every model's FFN shards moe/w1_LEDF2 (local
                        shard), moe/w2_LEFD, moe/b1_LEF2, moe/b2_LED, ..., dense/w1_LDF2,
                        dense/w2_LFD, or a `Region`

so nothing is stored twice: each model's attention side (with its FFN norms and routers: the
KV device computes the FFN's input and sends it with the hidden state) sits on ONE KV device,
its home, where its requests start (`homes`; `attention_replicas` r puts it on r KV devices
whose rows are alike, and a budgeted attention region every model's on every KV device), and the FFN shards partition the experts. A
sequence starts on a home and may spill onto any device's pages, weight devices' included
(the step then attends sequence-sharded). A page holds G tokens of the model's cached row,
`config.kv_cache_row` in each half (per-head K and V; MLA: its latent + rope key row split in
two, K = 1), as in the placed KV pool. The K and V page offsets are the same on every
device (the kernels take them static); only the count of usable local ids differs, which
the page allocator knows (`kv.allocator.PageAllocator(device_pages=)`). A model's MoE layers
and dense layers (`config.ffn_kind(l)`) are two stacks, each in its own slots.

Sharding rule of the experts over the `n_w` weight devices (one rule, both cases):
`ep = gcd(E, n_w)` expert-parallel groups of `E / ep` experts each, and inside each group
`tp = n_w / ep` devices split the expert hidden dim F (tensor-parallel; F % tp must be 0).
Weight device j holds experts `[(j // tp) * E/ep, ...)` and hidden columns
`[(j % tp) * F/tp, ...)` of each (with their biases: b1's columns as w1's; b2, added once per
expert, on the first of its tp devices and zero on the others). E a multiple of n_w gives
pure expert parallelism; E = 1 (or coprime to n_w) gives pure tensor parallelism. A shared
expert (Qwen2-MoE) is split tensor-parallel over all n_w devices (Fs % n_w must be 0), and so
is a dense FFN layer (F = intermediate_size split in n_w contiguous blocks, gate and up
columns kept aligned; F % n_w must be 0).

Several models share one arena (`make_multi_layout`): one page space per device (page_elems
common to all, as the engine's `choose_page_elems` picks), each model's tensors under
"<model>/..." in the rows that hold them. `MultiArenaLayout.model(name)` is that model's
`ArenaLayout` view (the pages and its slots, prefix dropped; its attention slots valid on its
homes). The row's length is given (`row_elems`: the device's memory) or the shortest giving
each KV device `pages_per_device` pages.

Kernel operands are never slices of a row (a custom call's operand is a whole buffer, so XLA
would copy the slice into every call): the attention kernel gets the WHOLE row viewed as pages
`[arena_elems / page_elems, G, K, H]` with the K and V page offsets (`kernel_pages`), the
matmul kernels the whole row viewed as rows `[arena_elems / N, N]` with the layer's first row
(`layer_rows`, a `fused_moe.ExpertRows`: a layer of an expert stack, or of a stacked matrix
such as a projection, a router or a dense FFN's, `reads_in_place`). Hence the half is a
multiple of page_elems, of every model's cached row (the K/V scatter views the row as [rows,
kv_cache_row]) and of every in-place stack's last dim N, each such stack starts on a multiple
of its N, and a budgeted region's slots are multiples of all of them (a slot shift keeps every
stack aligned).

Budgeted regions (`make_multi_layout(..., attention_pool_bytes=, weights_pool_bytes=)`): a
role with a budget does not pack every model; its model region is a `Region` of `num_slots`
equal slots (`slot_elems` = the role's largest model, aligned), one block of content at the
same offset on every row of the role, and a model's view lays its slots out in slot 0; a
model placed in slot i sits `Region.shift_units(i)` ALIGN units further on (`bases`, int32[2]
of the KV and weight rows' shifts, turn into its `offsets`). A budget counts device bytes
over the role's devices (the attention side counted once per KV device, like the weights
pool's replicas): num_slots = budget // (devices * slot bytes), at most the number of models;
a budget below one slot raises ValueError naming the option. `disagg/residency.py` decides
which model sits in which slot.

Where a model's tensors sit is data of the step programs, not a constant: a program is
compiled for `ArenaLayout.program` (every tensor at offset 0: equal for models of one
architecture) and reads the model through `bind(offsets)`, `offsets()` giving each tensor's
start in ALIGN units (int32: valid for rows past 2^31 elements), with a dynamic slice. So
models of one architecture share their compiled programs, run as lanes of one program, and a
model is served by the same program in whatever budgeted slot it lands.
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
from crosspool_jax.models.transformer import reads_in_place
from pallas_kernels.fused_moe.expert_rows import ExpertRows

AXIS = "dev"
ROLES = ("kv", "w")
ALIGN = 128                       # elements; every tensor starts on a multiple of this
_ALIGN = ALIGN


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
    tokens_per_page: int          # G for this model's cached row (`kv_cache_row`)
    ep: int                       # expert-parallel groups
    tp: int                       # tensor-parallel ways inside a group (over F)
    kv_slots: tuple               # Slot, ... of a KV device's row (this model's: valid on its homes)
    w_slots: tuple                # Slot, ... of a weight device's row
    device_pages: tuple = ()      # usable pages of each device (n_kv + n_w); () = pages_per_device on KV devices
    homes: tuple = ()             # KV device indices holding this model's attention side; () = all of them

    def __post_init__(self):
        if self.n_kv < 1 or self.n_w < 1:
            raise ValueError(f"ArenaLayout: need n_kv >= 1 and n_w >= 1, got n_kv={self.n_kv}, n_w={self.n_w}")
        if len(self.device_ids) != self.n_kv + self.n_w:
            raise ValueError(f"ArenaLayout.device_ids has {len(self.device_ids)} ids, "
                             f"expected n_kv + n_w = {self.n_kv + self.n_w}")
        if not self.device_pages:
            object.__setattr__(self, "device_pages", (self.pages_per_device,) * self.n_kv + (0,) * self.n_w)
        if not self.homes:
            object.__setattr__(self, "homes", tuple(range(self.n_kv)))
        if len(self.device_pages) != self.n_kv + self.n_w or not all(
                0 <= p <= self.pages_per_device for p in self.device_pages):
            raise ValueError(f"ArenaLayout.device_pages {self.device_pages} must give each of the "
                             f"{self.n_kv + self.n_w} devices 0..pages_per_device={self.pages_per_device} pages")
        if not self.homes or not all(0 <= k < self.n_kv for k in self.homes):
            raise ValueError(f"ArenaLayout.homes {self.homes} must be KV device indices in [0, {self.n_kv})")
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

    def page_spans(self, device: int) -> list[tuple]:
        """[(lo, hi) of the K pages, (lo, hi) of the V pages]: the part of row `device` its usable
        pages take (the rest of the row is its content, or unused)."""
        n = self.device_pages[device] * self.page_elems
        return [(s.offset, s.offset + n) for s in (self.slot("kv", "pages/k_PX"), self.slot("kv", "pages/v_PX"))]

    def view(self, row_X: jax.Array, role: str, name: str) -> jax.Array:
        """The tensor `name` of a role inside one device's row (a static slice + reshape)."""
        s = self.slot(role, name)
        return jax.lax.slice_in_dim(row_X, s.offset, s.offset + s.size).reshape(s.shape)

    def kernel_pages(self, row_X: jax.Array, num_kv_heads: int, head_dim: int) -> tuple:
        """(pages [arena_elems / page_elems, G, K, H], k_page_offset, v_page_offset): the WHOLE row
        viewed as pages (a free reshape) and where the K and V pages start in it, for the attention
        kernel (a sliced pages region would be copied into every call)."""
        G = self.page_elems // (num_kv_heads * head_dim)
        pages = row_X.reshape(-1, G, num_kv_heads, head_dim)
        return (pages, self.slot("kv", "pages/k_PX").offset // self.page_elems,
                self.slot("kv", "pages/v_PX").offset // self.page_elems)

    def layer_rows(self, row_X: jax.Array, role: str, name: str, index) -> ExpertRows:
        """Entry `index` (traced ok) of the role's in-place stack `name` (`reads_in_place`: an
        expert stack [L, E, K, N] or a stacked matrix [L, K, N], one group) as `ExpertRows` over
        the WHOLE row viewed [arena_elems / N, N]: read in place by the kernels."""
        s = self.slot(role, name)
        return self._layer_rows(row_X, s, index, s.offset // s.shape[-1])

    def _layer_rows(self, row_X, s: Slot, index, first_row) -> ExpertRows:
        E, K, N = (1, *s.shape[1:]) if len(s.shape) == 3 else s.shape[1:]
        return ExpertRows(row_X.reshape(-1, N), first_row + index * (E * K), num_groups=E, group_rows=K)

    @property
    def own_slots(self) -> tuple:
        """(role, Slot) of every tensor of this model (the pages excepted), KV rows' first: the
        order of `offsets`."""
        return tuple((role, s) for role in ROLES for s in self.slots(role) if not s.name.startswith("pages/"))

    def offsets(self, bases=None) -> np.ndarray:
        """int32 [len(own_slots)]: where each of the model's tensors starts in its row, in ALIGN
        units, shifted by `bases` (int32[2]: the (KV rows, weight rows) slot shift of a model in
        budgeted regions, `Region.shift_units`; None: no shift). The step programs read a model
        through these (`bind`), so where a model sits is data of its program, not a constant."""
        shift = np.zeros(2, np.int64) if bases is None else np.asarray(bases, np.int64)
        return np.array([s.offset // ALIGN + shift[ROLES.index(role)] for role, s in self.own_slots], np.int32)

    @property
    def program(self) -> "ArenaLayout":
        """What a step program depends on: this view with every tensor at offset 0 and no homes.
        Models of one architecture have equal `program`s, so they share compiled programs and
        run as lanes of one (their `offsets` are the programs' data)."""
        zero = {role: tuple(s if s.name.startswith("pages/") else dataclasses.replace(s, offset=0)
                            for s in self.slots(role)) for role in ROLES}
        return dataclasses.replace(self, kv_slots=zero["kv"], w_slots=zero["w"], homes=tuple(range(self.n_kv)))

    def bind(self, offsets) -> "ArenaLayout | BoundArenaLayout":
        """This view reading the model's tensors at `offsets` (int32 [len(own_slots)], traced inside a
        step: `offsets()`); None: this static view itself."""
        return self if offsets is None else BoundArenaLayout(self, offsets)

    def mesh(self) -> jax.sharding.Mesh:
        """The 1D mesh over axis "dev" (KV devices first)."""
        by_id = {d.id: d for d in jax.devices()}
        missing = [i for i in self.device_ids if i not in by_id]
        if missing:
            raise ValueError(f"ArenaLayout.device_ids {missing} are not devices of this process")
        return jax.sharding.Mesh(np.array([by_id[i] for i in self.device_ids]), (AXIS,))

    def sharding(self) -> jax.sharding.NamedSharding:
        return jax.sharding.NamedSharding(self.mesh(), jax.sharding.PartitionSpec(AXIS, None))


class BoundArenaLayout:
    """An `ArenaLayout` whose model tensors start at traced `offsets` (ALIGN units, one per
    `own_slots` entry); the shared pages stay put. Same API as the layout (attributes are
    forwarded); `view` is a dynamic slice at the tensor's offset, `layer_rows` starts there."""

    def __init__(self, layout: ArenaLayout, offsets):
        self.layout = layout
        self.offsets = offsets                 # int32 [len(own_slots)], ALIGN units
        self._index = {(role, s.name): i for i, (role, s) in enumerate(layout.own_slots)}

    def __getattr__(self, name):
        return getattr(self.layout, name)

    def view(self, row_X: jax.Array, role: str, name: str) -> jax.Array:
        if name.startswith("pages/"):
            return self.layout.view(row_X, role, name)
        s = self.layout.slot(role, name)
        units_XA = row_X.reshape(-1, ALIGN)     # arena_elems and every slot offset are multiples of ALIGN
        block = jax.lax.dynamic_slice_in_dim(units_XA, self.offsets[self._index[(role, name)]],
                                             -(-s.size // ALIGN)).reshape(-1)
        return block[:s.size].reshape(s.shape)

    def layer_rows(self, row_X: jax.Array, role: str, name: str, index) -> ExpertRows:
        s = self.layout.slot(role, name)
        N = s.shape[-1]
        g = math.gcd(ALIGN, N)        # offset * ALIGN / N rows, exact (stacks start on multiples of N), in int32
        first_row = (self.offsets[self._index[(role, name)]] // (N // g)) * (ALIGN // g)
        return self.layout._layer_rows(row_X, s, index, first_row)


@dataclasses.dataclass(frozen=True)
class Region:
    """A budgeted role's model region: `num_slots` slots of `slot_elems` elements from `start`."""

    start: int
    slot_elems: int
    num_slots: int

    def __post_init__(self):
        if self.start % ALIGN or self.slot_elems % ALIGN or self.slot_elems < 1 or self.num_slots < 1:
            raise ValueError(f"Region: start {self.start} and slot_elems {self.slot_elems} must be positive "
                             f"multiples of {ALIGN} and num_slots {self.num_slots} >= 1")

    def offset(self, slot: int) -> int:
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} out of range [0, {self.num_slots})")
        return self.start + slot * self.slot_elems

    def shift_units(self, slot: int) -> int:
        """The `bind` shift (ALIGN units) of a model placed in `slot` (its view sits in slot 0)."""
        return (self.offset(slot) - self.start) // ALIGN

    @property
    def end(self) -> int:
        return self.start + self.num_slots * self.slot_elems


def _align(n: int, a: int = _ALIGN) -> int:
    return -(-n // a) * a


# an FFN layer's input norm, router and router bias (GPT-OSS): KV rows (`models.ffn_input` runs there)
ROUTING_LEAVES = ("norm_LD", "router_LDE", "router_bias_LE")


def _entry_align(name: str, shape) -> int:
    """An in-place stack starts on a multiple of its last dim (its rows view), the rest on ALIGN."""
    return math.lcm(_ALIGN, int(shape[-1])) if reads_in_place(name, shape) else _ALIGN


def _role_unit(entries: Sequence[tuple]) -> int:
    """Multiple of every entry's alignment: slot sizes and shifts in this unit keep them aligned."""
    return math.lcm(_ALIGN, *(_entry_align(n, shape) for n, shape in entries))


def _pack(entries: Sequence[tuple], start: int = 0) -> tuple:
    slots, offset = [], start
    for name, shape in entries:
        offset = _align(offset, _entry_align(name, shape))
        slots.append(Slot(name, offset, tuple(int(s) for s in shape)))
        offset += slots[-1].size
    return tuple(slots)


def expert_split(num_experts: int, n_w: int) -> tuple[int, int]:
    """(ep, tp): ep = gcd(E, n_w) expert-parallel groups, tp = n_w // ep ways over F."""
    ep = math.gcd(num_experts, n_w)
    return ep, n_w // ep


def _model_entries(config: ModelConfig, n_w: int) -> tuple[list, list, int, int]:
    """(attention-side entries, weight-row entries, ep, tp) of one model; raises for models the
    disaggregated step does not support. Weight rows: the MoE layers' leaves ("moe/...",
    experts split by `expert_split`) and the dense layers' ("dense/...", F split over all n_w)
    but their input norms and routers (ROUTING_LEAVES), which sit with the attention side: the
    KV device computes the FFN's input (`models.ffn_input`) and sends it; the experts' biases
    (GPT-OSS: b1 sharded like w1, b2 like w2's experts) sit with their experts, a router
    score bias whole on every weight row; ep, tp = (1, n_w) for a model without MoE layers."""
    c = config
    kv_shapes, ffn_shapes = param_shapes(c)
    kv_entries = []
    for group in ("embed", "attn", "final"):
        kv_entries += [(f"{group}/{leaf}", shape) for leaf, shape in kv_shapes[group].items()]
    D, w_entries, (ep, tp) = c.hidden_size, [], (1, n_w)
    if "moe" in ffn_shapes:
        E, F, Fs = c.num_experts, c.moe_intermediate_size, c.shared_expert_intermediate_size
        ep, tp = expert_split(E, n_w)
        if F % tp:
            raise ValueError(f"moe_intermediate_size F={F} must be divisible by the tensor-parallel ways "
                             f"tp = n_w / gcd(E, n_w) = {tp} (E={E}, n_w={n_w})")
        if Fs and Fs % n_w:
            raise ValueError(f"shared_expert_intermediate_size {Fs} must be divisible by n_w={n_w}")
        Lm = c.num_layers_of_kind("moe")
        local = {"w1_LEDF2": (Lm, E // ep, D, 2 * F // tp), "w2_LEFD": (Lm, E // ep, F // tp, D),
                 "b1_LEF2": (Lm, E // ep, 2 * F // tp), "b2_LED": (Lm, E // ep, D)}
        if Fs:
            local.update(shared_w1_LDF2=(Lm, D, 2 * Fs // n_w), shared_w2_LFD=(Lm, Fs // n_w, D))
        w_entries += [(f"moe/{leaf}", local.get(leaf, shape)) for leaf, shape in ffn_shapes["moe"].items()
                      if leaf not in ROUTING_LEAVES]
    if "dense" in ffn_shapes:
        F, Ld = c.intermediate_size, c.num_layers_of_kind("dense")
        if F % n_w:
            raise ValueError(f"intermediate_size F={F} of the dense FFN layers must be divisible by the "
                             f"weight devices n_w={n_w} (split tensor-parallel over F)")
        local = {"w1_LDF2": (Ld, D, 2 * F // n_w), "w2_LFD": (Ld, F // n_w, D)}
        w_entries += [(f"dense/{leaf}", local.get(leaf, shape)) for leaf, shape in ffn_shapes["dense"].items()
                      if leaf not in ROUTING_LEAVES]
    for kind in ("moe", "dense"):          # the FFN's input norm and router: on the KV side, once
        kv_entries += [(f"{kind}/{leaf}", shape) for leaf, shape in ffn_shapes.get(kind, {}).items()
                       if leaf in ROUTING_LEAVES]
    return kv_entries, w_entries, ep, tp


def _check_split(n_kv, n_w, pages_per_device, row_elems, devices) -> None:
    for name, n in (("n_kv", n_kv), ("n_w", n_w)):
        if not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"{name} must be a positive device count (each role needs at least one "
                             f"device), got {n!r}")
    if n_kv + n_w > len(devices):
        raise ValueError(f"split n_kv={n_kv} + n_w={n_w} = {n_kv + n_w} devices, but only "
                         f"{len(devices)} device(s) exist")
    if (pages_per_device is None) == (row_elems is None):
        raise ValueError("give exactly one of pages_per_device (the least pages of a KV device) and "
                         "row_elems (the arena row's length)")
    if pages_per_device is not None and pages_per_device < 1:
        raise ValueError(f"pages_per_device must be >= 1, got {pages_per_device}")


def make_layout(config: ModelConfig, *, n_kv: int, n_w: int, pages_per_device: int,
                page_elems: Optional[int] = None, dtype="float32",
                devices: Optional[Sequence[jax.Device]] = None) -> ArenaLayout:
    """Lay out one model's arena for a split of `n_kv` KV devices and `n_w` weight devices, its
    attention side on every KV device (each can home its sequences).

    devices: the pool to take them from (default `jax.devices()`): the first n_kv become the
    KV pool, the next n_w the weights pool. page_elems defaults to the pool's choice for this
    model's cached row (`kv.pool.choose_page_elems`).
    """
    multi = make_multi_layout({"": config}, n_kv=n_kv, n_w=n_w, pages_per_device=pages_per_device,
                              page_elems=page_elems, dtype=dtype, devices=devices, attention_replicas=n_kv)
    return multi.model("")


@dataclasses.dataclass(frozen=True)
class MultiArenaLayout:
    """The arena of several models. Every row is two halves of `half_elems`; a device's pages
    fill each half from its start (K pages in the first half, V pages in the second, local page
    l at the same place in both) and its content fills each half from its end (`depths[d]`: how
    deep the content reaches into each half). KV rows hold the attention sides homed there
    ("<model>/embed/...", "<model>/attn/...", "<model>/final/..."), weight rows every model's FFN
    shards ("<model>/moe/...", "<model>/dense/..."), the same on every weight row. `model(name)`
    is that model's view: an `ArenaLayout` over the same rows whose slots are the pages and the
    model's own slots with the prefix dropped (its `program` and `offsets`: one program per
    architecture reads each model's slots). A role with a `Region` (kv_region: attention sides, w_region: FFN shards) holds only
    `num_slots` models at a time, at the same offsets on every row of the role, and every
    model's view sits in its slot 0 (`Region.shift_units`).
    """

    models: tuple                 # ((name, ArenaLayout), ...) in registration order
    kv_region: Optional[Region] = None     # None: every model's attention side on its homes, resident
    w_region: Optional[Region] = None      # None: every model's FFN shards packed, resident
    depths: tuple = ()            # per device (depth in half 0, depth in half 1): elements of content
    content: tuple = ()           # per device: elements of tensors (or regions) placed there
    extents: tuple = ()           # ((name, attention side elements, one weight row's FFN elements), ...)
    units: tuple = (ALIGN, ALIGN)  # (KV rows, weight rows): what a budgeted slot's size is a multiple of

    def __post_init__(self):
        if not self.models:
            raise ValueError("MultiArenaLayout.models must name at least one model")
        first = self.models[0][1]
        for name, lay in self.models:
            for field in ("n_kv", "n_w", "device_ids", "arena_elems", "dtype", "pages_per_device", "page_elems",
                          "device_pages"):
                if getattr(lay, field) != getattr(first, field):
                    raise ValueError(f"MultiArenaLayout: model {name!r} has {field}={getattr(lay, field)!r}, "
                                     f"the arena has {getattr(first, field)!r}")
        for role in ROLES:
            region = self.region(role)
            if region is not None and region.end > first.arena_elems:
                raise ValueError(f"MultiArenaLayout: the {role!r} region ends at {region.end}, past "
                                 f"arena_elems={first.arena_elems}")

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.models]

    def model(self, name: str) -> ArenaLayout:
        for n, lay in self.models:
            if n == name:
                return lay
        raise ValueError(f"the arena holds no model named {name!r}; it holds {self.names}")

    def region(self, role: str) -> Optional[Region]:
        """The role's budgeted model region, None when every model is packed there."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        return self.kv_region if role == "kv" else self.w_region

    def region_elems(self, name: str, role: str) -> int:
        """Elements of one model's own slots in a role ("kv": its attention side, "w": one weight
        row's FFN shards), packed from an aligned start and rounded up to the role's slot unit
        (every in-place stack's N): the slot a budgeted region gives it."""
        for n, kv, w in self.extents:
            if n == name:
                return _align(kv, self.units[0]) if role == "kv" else _align(w, self.units[1])
        raise ValueError(f"the arena holds no model named {name!r}; it holds {self.names}")

    def homes(self, name: str) -> tuple:
        """The KV devices holding the model's attention side: where its sequences start."""
        return self.model(name).homes

    @property
    def half_elems(self) -> int:
        """Where the second half starts (the V pages; the second half may be longer by one unit)."""
        return self.first.slot("kv", "pages/v_PX").offset

    def content_spans(self, device: int) -> list[tuple]:
        """[(lo, hi), ...]: where row `device`'s content (weights, attention sides, regions) lies."""
        ends = (self.half_elems, self.arena_elems)
        return [(end - depth, end) for end, depth in zip(ends, self.depths[device]) if depth]

    def unused_elems(self, device: int) -> int:
        """Elements of row `device` holding neither content nor a usable page (alignment, the
        two halves' content depths differing, the last part-page of each half)."""
        return self.arena_elems - self.content[device] - 2 * self.device_pages[device] * self.first.page_elems

    @property
    def first(self) -> ArenaLayout:
        """Any model's view: the fields shared by all (n_kv, n_w, device_ids, arena_elems, dtype,
        pages_per_device, page_elems, device_pages, mesh(), sharding())."""
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
        """Page ids per device (the address space of a half; `device_pages` are usable)."""
        return self.first.pages_per_device

    @property
    def device_pages(self) -> tuple:
        return self.first.device_pages


def _extent(entries: Sequence[tuple]) -> int:
    """Elements a model's entries take when packed from an aligned start (aligned end)."""
    last = _pack(entries)[-1]
    return _align(last.offset + last.size)


def _budget_region(budget, option: str, extents: dict, n_rows: int, itemsize: int,
                   what: str, unit: int = _ALIGN) -> Optional[Region]:
    """The role's Region (start 0: placed later) for a byte budget over its n_rows devices (None:
    no budget); slots are multiples of `unit` (the role's alignments)."""
    if budget is None:
        return None
    if not isinstance(budget, (int, np.integer)) or budget < 0:
        raise ValueError(f"{option} must be None or an integer >= 0, got {budget!r}")
    slot_elems = _align(max(extents.values()), unit)
    biggest = max(extents, key=extents.get)
    slot_bytes = n_rows * slot_elems * itemsize
    if budget < slot_bytes:
        raise ValueError(f"{option}={budget} is smaller than the largest model's {what}: model {biggest!r} "
                         f"needs {slot_bytes} bytes ({slot_elems * itemsize} on each of {n_rows} devices)")
    return Region(0, slot_elems, min(len(extents), int(budget) // slot_bytes))


def _pack_halves(blocks: Sequence[tuple], extra: int = 0) -> tuple[dict, list]:
    """Place blocks (name, elems, alignment) from the ends of a row's two halves downwards, each
    (largest first) into the half with more room left (the second half is `extra` elements
    longer), so both halves keep about the same room and the pages in it, equal in both, leave
    little unused. Returns ({name: (half, depth of its start below the half's end)}, [depth of
    half 0, depth of half 1]); the halves' ends must be multiples of every alignment."""
    where, depth = {}, [0, 0]
    for name, elems, alignment in sorted(blocks, key=lambda b: -b[1]):
        h = 0 if depth[0] <= depth[1] - extra else 1
        depth[h] = _align(depth[h] + elems, alignment)
        where[name] = (h, depth[h])
    return where, depth


def _assign_homes(kv_extents: dict, n_kv: int, replicas: int) -> dict:
    """name -> its KV devices: the KV devices in groups of `replicas` consecutive ones (rows with
    the same content, so a model's slots sit at the same offsets on each), each model's
    attention side on one group, largest first onto the group holding the fewest elements so
    far (lowest index on ties)."""
    if not isinstance(replicas, (int, np.integer)) or not 1 <= replicas <= n_kv or n_kv % replicas:
        raise ValueError(f"attention_replicas must divide the KV devices n_kv={n_kv}, got {replicas!r}")
    load, homes = [0] * (n_kv // replicas), {}
    for name in sorted(kv_extents, key=lambda n: -kv_extents[n]):
        g = min(range(len(load)), key=lambda i: (load[i], i))
        homes[name] = tuple(range(g * replicas, (g + 1) * replicas))
        load[g] += kv_extents[name]
    return {name: homes[name] for name in kv_extents}


def make_multi_layout(configs, *, n_kv: int, n_w: int, pages_per_device: Optional[int] = None,
                      page_elems: Optional[int] = None, dtype="float32", devices: Optional[Sequence[jax.Device]] = None,
                      attention_pool_bytes: Optional[int] = None, weights_pool_bytes: Optional[int] = None,
                      row_elems: Optional[int] = None, max_pages_per_device: Optional[int] = None,
                      attention_replicas: int = 1) -> MultiArenaLayout:
    """Lay out several models (name -> ModelConfig) in one arena over n_kv + n_w devices.

    The row's length: `row_elems` (the device's memory for the arena, rounded down to the
    row's alignment), or the shortest row giving every KV device at least `pages_per_device`
    pages (exactly one of the two). Every device's memory beyond its content is pages
    (`device_pages`), weight devices included: a request spilling off its home attends there
    sequence-sharded. page_elems defaults to `kv.pool.choose_page_elems` over every model's
    `kv_cache_row` (the engine's choice). Raises ValueError naming the model for one whose FFN
    does not split over the weight devices (F not divisible), and for a row too short for the
    content (or for one block on a KV device).

    Attention sides: each model's on ONE KV device (`homes`, balanced by size), where its
    sequences start; `attention_replicas` r: on r KV devices instead (a divisor of n_kv; its
    requests then spread over them, at the cost of the copies' memory).
    attention_pool_bytes / weights_pool_bytes: budgets (device bytes over the role's devices)
    of a `Region` of slots for the attention sides (replicated on every KV device: any KV
    device homes any model) and for the FFN shards; None packs every model (all resident).
    max_pages_per_device caps each device's usable pages (the attention kernel's addressing).
    """
    devices = list(jax.devices() if devices is None else devices)
    _check_split(n_kv, n_w, pages_per_device, row_elems, devices)
    if not configs:
        raise ValueError("make_multi_layout: no models given")
    kv_rows = [c.kv_cache_row for c in configs.values()]
    page_elems = choose_page_elems(kv_rows) if page_elems is None else int(page_elems)
    entries = {}
    for name, c in configs.items():
        try:
            tokens_per_page(page_elems, c.kv_cache_heads, c.kv_cache_head_dim)
            entries[name] = _model_entries(c, n_w)
        except ValueError as e:
            if not name:                       # make_layout's single unnamed model
                raise
            raise ValueError(f"model {name!r} cannot run on the disaggregated step: {e}") from None
    kv_unit = _role_unit([e for kv_entries, _, _, _ in entries.values() for e in kv_entries])
    w_unit = _role_unit([e for _, w_entries, _, _ in entries.values() for e in w_entries])
    itemsize = jnp.dtype(dtype).itemsize
    extents = {n: (_extent(e[0]), _extent(e[1])) for n, e in entries.items()}
    kv_region = _budget_region(attention_pool_bytes, "attention_pool_bytes",
                               {n: x[0] for n, x in extents.items()}, n_kv, itemsize,
                               "attention side (replicated on every KV device)", unit=kv_unit)
    w_region = _budget_region(weights_pool_bytes, "weights_pool_bytes", {n: x[1] for n, x in extents.items()},
                              n_w, itemsize, "FFN shards over the weight devices", unit=w_unit)
    # the kernels view the whole row as pages and as the in-place stacks' rows, and the V pages
    # start at the half
    row_unit = math.lcm(_ALIGN, *kv_rows, page_elems, kv_unit, w_unit)
    prefix = {name: f"{name}/" if name else "" for name in configs}
    homes = _assign_homes({n: x[0] for n, x in extents.items()}, n_kv,
                          n_kv if kv_region is not None else attention_replicas)

    def role_blocks(role_index, region, names):
        if region is not None:
            return [("<region>", region.num_slots * region.slot_elems,
                     w_unit if role_index else kv_unit)]
        return [(prefix[n] + k, int(np.prod(shape, dtype=np.int64)), _entry_align(k, shape))
                for n in names for k, shape in entries[n][role_index]]

    # the first half ends at `half`, the second at the row's end (one row_unit longer when the
    # row holds an odd number of them)
    if row_elems is None:
        extra = 0
    else:
        arena_elems = int(row_elems) // row_unit * row_unit
        half = arena_elems // (2 * row_unit) * row_unit
        extra = arena_elems - 2 * half
    kv_packing = [_pack_halves(role_blocks(0, kv_region, [n for n in configs if k in homes[n]]), extra)
                  for k in range(n_kv)]
    w_packing = _pack_halves(role_blocks(1, w_region, list(configs)), extra)
    depths = [depth for _, depth in kv_packing] + [w_packing[1]] * n_w
    most_layers = max(c.num_layers for c in configs.values())
    if row_elems is None:
        half = _align(max(max(map(max, depths[:n_kv])) + pages_per_device * page_elems, max(map(max, depths))),
                      row_unit)
        arena_elems = 2 * half
    room = [min(half - d0, half + extra - d1) for d0, d1 in depths]
    if min(room[:n_kv]) < most_layers * page_elems or min(room) < 0:
        raise ValueError(f"an arena row of {row_elems} elements is too short: a KV device needs its attention "
                         f"sides and one block of {most_layers} pages ({max(map(sum, depths[:n_kv]))} + "
                         f"{2 * most_layers * page_elems} elements), a weight device its FFN shards "
                         f"({sum(depths[-1])}); the halves hold {half}")
    device_pages = tuple(min(r // page_elems, max_pages_per_device or r) for r in room)
    P = half // page_elems
    pages = (Slot("pages/k_PX", 0, (P, page_elems)), Slot("pages/v_PX", half, (P, page_elems)))
    ends = (half, arena_elems)

    def offset(packing, name):
        h, depth = packing[0][name]
        return ends[h] - depth

    if kv_region is not None:
        kv_region = dataclasses.replace(kv_region, start=offset(kv_packing[0], "<region>"))
    if w_region is not None:
        w_region = dataclasses.replace(w_region, start=offset(w_packing, "<region>"))

    def own_slots(name, role_index, region, packing):
        if region is not None:
            return _pack(entries[name][role_index], region.start)
        return tuple(Slot(k, offset(packing, prefix[name] + k), tuple(int(x) for x in shape))
                     for k, shape in entries[name][role_index])

    content = ([sum(b[1] for b in role_blocks(0, kv_region, [n for n in configs if k in homes[n]]))
                for k in range(n_kv)] + [sum(b[1] for b in role_blocks(1, w_region, list(configs)))] * n_w)
    device_ids = tuple(d.id for d in devices[:n_kv + n_w])
    views = []
    for name, (_, _, ep, tp) in entries.items():
        c = configs[name]
        views.append((name, ArenaLayout(
            n_kv=int(n_kv), n_w=int(n_w), device_ids=device_ids, arena_elems=arena_elems,
            dtype=jnp.dtype(dtype).name, pages_per_device=P, page_elems=page_elems,
            tokens_per_page=tokens_per_page(page_elems, c.kv_cache_heads, c.kv_cache_head_dim), ep=ep, tp=tp,
            kv_slots=pages + own_slots(name, 0, kv_region, kv_packing[homes[name][0]]),
            w_slots=own_slots(name, 1, w_region, w_packing), device_pages=device_pages, homes=homes[name])))
    all_depths = tuple(tuple(depth) for _, depth in kv_packing) + (tuple(w_packing[1]),) * n_w
    return MultiArenaLayout(tuple(views), kv_region, w_region, all_depths, tuple(content),
                            tuple((n, kv, w) for n, (kv, w) in extents.items()), (kv_unit, w_unit))
