"""Which models' halves sit in the arena: budgeted slot regions, LRU eviction, swap-in from host.

With a byte budget for a role (`make_multi_layout(..., attention_pool_bytes=,
weights_pool_bytes=)`), that role's rows hold a `Region` of equal slots instead of every
model (layout.py). `ArenaResidency` owns the `Arena` and, per budgeted role, a `RegionPool`:

- every model's content of the region (the attention side for the KV rows, each weight
  device's FFN shards, of its MoE and dense layers, for the weight rows:
  `arena.region_payloads`) is kept on the host for the whole run, in "pinned_host" memory
  of each row's device where the platform has it (`weights.pool.supports_pinned_host`; one
  copy per KV device for the replicated attention side), numpy arrays otherwise; eviction
  therefore only frees the slot (nothing is copied back: parameters never change);
- which model to evict is the JAX-free `weights.budget.LruBudget` (each model costs one slot;
  models in use by a step are pinned and never chosen);
- a swap-in starts the host->device transfer of each row's payload (asynchronous), then writes
  it into the slot of that row IN PLACE: a jitted `dynamic_update_slice` that takes the row's
  shard donated (the arena's global array is taken apart into its per-device shards and put
  back together: never a second copy of the arena, and the other role's rows are untouched);
- `prefetch(name)` (the engine calls it when a request is admitted) starts the swap-in and
  dispatches the writes without waiting; `acquire(name)` swaps in what is still out, pins the
  model, waits until its payloads have landed (recording the swap-in seconds: wall time from
  the transfer's start until it was ready -- for a prefetch, until the acquire that waited on
  it returned, as in `WeightsPool`) and returns the model's `bases` for `ArenaLayout.offsets`:
  int32[2], (KV rows, weight rows) shift in ALIGN units of the slot it sits in (0 for a
  role without a budget); None when no role has a budget (the static layout, as before).

One compiled step program per model serves every slot (the shift is traced). A role without
a budget keeps every model packed and resident (no `RegionPool`).
"""
from __future__ import annotations

import dataclasses
import functools
import threading
import time
from typing import Mapping, Optional

import jax
import numpy as np

from crosspool_jax.disagg.arena import Arena, build_multi_arena, region_payloads
from crosspool_jax.disagg.layout import ALIGN, ROLES, MultiArenaLayout
from crosspool_jax.weights.budget import LruBudget, WeightsPoolBusyError
from crosspool_jax.weights.pool import WeightsPoolStats, supports_pinned_host


@functools.partial(jax.jit, donate_argnums=0)
def _write_units(row_1X: jax.Array, payload_UA: jax.Array, start_u) -> jax.Array:
    """row with payload written at ALIGN-unit `start_u` (the row donated: updated in place)."""
    units_XA = row_1X.reshape(-1, ALIGN)
    return jax.lax.dynamic_update_slice_in_dim(units_XA, payload_UA, start_u, axis=0).reshape(1, -1)


def write_rows(arena: Arena, writes: list) -> None:
    """Apply [(mesh position, start in ALIGN units, payload [U, ALIGN] on that device)] to the
    arena in place: each touched row's shard is donated to one `_write_units`."""
    if not writes:
        return
    array = arena.take()
    shape, sharding = array.shape, array.sharding
    by_device = {s.device: s.data for s in array.addressable_shards}
    del array                                  # the shards are now the only owners: donation works
    shards = [by_device[d] for d in arena.layout.first.mesh().devices.reshape(-1)]
    try:
        for position, start_u, payload in writes:
            shards[position] = _write_units(shards[position], payload, np.int32(start_u))
    finally:
        arena.put(jax.make_array_from_single_device_arrays(shape, sharding, shards))


@dataclasses.dataclass
class _Pending:
    since: float                  # perf_counter at the transfer's start
    payloads: list                # device arrays in flight (kept until they have landed)


class RegionPool:
    """One budgeted role's slots: LRU over models (one slot each), host copies, swap counters."""

    def __init__(self, layout: MultiArenaLayout, role: str, *, use_pinned_host: Optional[bool] = None):
        region = layout.region(role)
        if region is None:
            raise ValueError(f"RegionPool: the arena has no budgeted {role!r} region")
        first = layout.first
        self.role, self.region = role, region
        self.positions = list(range(first.n_kv)) if role == "kv" else list(range(first.n_kv, first.num_devices))
        mesh_devices = list(first.mesh().devices.reshape(-1))
        self.devices = [mesh_devices[p] for p in self.positions]
        self.slot_bytes = len(self.positions) * region.slot_elems * np.dtype(first.dtype).itemsize
        self.pinned = supports_pinned_host(first.sharding()) if use_pinned_host is None else use_pinned_host
        self._budget = LruBudget(region.num_slots * self.slot_bytes)
        self._free = list(range(region.num_slots))
        self._slot: dict[str, int] = {}
        self._host: dict[str, list] = {}
        self._nbytes: dict[str, int] = {}
        self._pending: dict[str, _Pending] = {}
        self.swaps_in = self.swaps_out = self.bytes_in = self.bytes_out = 0
        self.seconds_in = self.wait_seconds = 0.0
        self.last_seconds: dict[str, float] = {}

    def register(self, name: str, payloads: list) -> None:
        """Keep a model's per-row payloads ([U, ALIGN] host arrays, one per row of the role)."""
        if len(payloads) != len(self.devices):
            raise ValueError(f"model {name!r}: {len(payloads)} payloads for {len(self.devices)} {self.role!r} rows")
        if payloads[0].size > self.region.slot_elems:
            raise ValueError(f"model {name!r}: {payloads[0].size} elements do not fit a slot of "
                             f"{self.region.slot_elems}")
        self._budget.add(name, self.slot_bytes)
        if self.pinned:
            self._host[name] = [jax.device_put(p, jax.sharding.SingleDeviceSharding(d, memory_kind="pinned_host"))
                                for p, d in zip(payloads, self.devices)]
        else:
            self._host[name] = list(payloads)
        self._nbytes[name] = sum(int(p.nbytes) for p in payloads)

    # -- decisions and moves (the caller holds the residency's lock) ----------------------
    def is_resident(self, name: str) -> bool:
        return self._budget.is_resident(name)

    def shift_units(self, name: str) -> int:
        return self.region.shift_units(self._slot[name])

    def swap_in(self, name: str, *, count: bool = True) -> tuple[list, list]:
        """Evict what must go (LRU, not in use), give `name` a slot and start its transfers.
        Returns (evicted models, row writes to apply). Raises WeightsPoolBusyError when every
        slot is in use."""
        victims = self._budget.plan_fit(name)
        for victim in victims:
            self._evict(victim)
        slot = self._free.pop(0)
        self._slot[name] = slot
        start = time.perf_counter()
        payloads = [jax.device_put(h, jax.sharding.SingleDeviceSharding(d, memory_kind="device"))
                    for h, d in zip(self._host[name], self.devices)]
        self._budget.mark_resident(name)
        if count:
            self.swaps_in += 1
            self.bytes_in += self._nbytes[name]
            self._pending[name] = _Pending(start, payloads)
        start_u = self.region.offset(slot) // ALIGN
        return victims, [(p, start_u, x) for p, x in zip(self.positions, payloads)]

    def _evict(self, name: str) -> None:
        self._budget.mark_evicted(name)
        self._free.append(self._slot.pop(name))
        self._pending.pop(name, None)
        self.swaps_out += 1
        self.bytes_out += self._nbytes[name]

    def touch(self, name: str) -> None:
        self._budget.touch(name)

    def pin(self, name: str) -> None:
        self._budget.pin(name)

    def unpin(self, name: str) -> None:
        self._budget.unpin(name)

    def take_pending(self, name: str) -> Optional[_Pending]:
        return self._pending.get(name)

    def landed(self, name: str, pending: _Pending, waited: float) -> None:
        self.wait_seconds += waited
        if self._pending.get(name) is pending:           # the first waiter records the transfer
            seconds = time.perf_counter() - pending.since
            self.seconds_in += seconds
            self.last_seconds[name] = seconds
            del self._pending[name]

    def stats(self) -> WeightsPoolStats:
        names = self._budget.names()
        return WeightsPoolStats(
            swaps_in=self.swaps_in, swaps_out=self.swaps_out, bytes_swapped_in=self.bytes_in,
            bytes_swapped_out=self.bytes_out, swap_in_seconds=self.seconds_in,
            last_swap_in_seconds=dict(self.last_seconds), acquire_wait_seconds=self.wait_seconds,
            resident={n: self._budget.is_resident(n) for n in names},
            bytes_resident=sum(self._nbytes[n] for n in names if self._budget.is_resident(n)),
            budget_bytes=self._budget.budget_bytes)


class ArenaResidency:
    """The arena plus, per budgeted role, its `RegionPool`; the engine's acquire/release/prefetch."""

    def __init__(self, arena: Arena, pools: Mapping[str, RegionPool]):
        self.arena = arena
        self.pools = dict(pools)                 # role -> RegionPool, budgeted roles only
        self._lock = threading.RLock()
        self._deferred: dict[tuple, list] = {}   # (model, role) -> writes not applied yet (arena taken)

    @property
    def layout(self) -> MultiArenaLayout:
        return self.arena.layout

    def _check(self, name: str) -> None:
        self.layout.model(name)                  # raises naming the models

    def _swap_in(self, name: str, *, count: bool = True) -> None:
        for role, pool in self.pools.items():
            if pool.is_resident(name):
                pool.touch(name)
                continue
            evicted, writes = pool.swap_in(name, count=count)
            for gone in evicted:                  # an evicted model's unapplied writes must not land
                self._deferred.pop((gone, role), None)
            self._deferred[(name, role)] = writes

    def _flush(self, *, required: bool) -> None:
        """Apply the deferred writes (all of them, in order); when the arena is taken by a step
        (another thread), keep them for later unless `required`."""
        if not self._deferred:
            return
        if self.arena.taken:
            if required:
                raise RuntimeError(f"the arena is held by a step; cannot write the swapped-in models "
                                   f"{sorted({n for n, _ in self._deferred})} now")
            return
        write_rows(self.arena, [w for ws in self._deferred.values() for w in ws])
        self._deferred.clear()

    def prefetch(self, name: str) -> bool:
        """Start swapping `name` in (transfers and in-place writes dispatched, no wait). False when
        the models in use leave no free slot (nothing started)."""
        self._check(name)
        with self._lock:
            try:
                self._swap_in(name)
            except WeightsPoolBusyError:
                return False
            finally:
                self._flush(required=False)
            return True

    def acquire(self, name: str) -> Optional[np.ndarray]:
        """Swap `name` in if it is out, mark it in use until `release`, wait until its payloads
        have landed; returns its `bases` (int32[2]) for `ArenaLayout.offsets`, None without budgets."""
        self._check(name)
        with self._lock:
            self._swap_in(name)
            self._flush(required=True)
            for pool in self.pools.values():
                pool.pin(name)
            pending = {role: pool.take_pending(name) for role, pool in self.pools.items()}
        for role, p in pending.items():
            if p is None:
                continue
            t0 = time.perf_counter()
            jax.block_until_ready(p.payloads)
            waited = time.perf_counter() - t0
            with self._lock:
                self.pools[role].landed(name, p, waited)
        return self.bases(name)

    def release(self, name: str) -> None:
        with self._lock:
            for pool in self.pools.values():
                pool.unpin(name)

    def bases(self, name: str) -> Optional[np.ndarray]:
        """(KV rows, weight rows) shift of the model's slots in ALIGN units (it must be resident)."""
        if not self.pools:
            return None
        with self._lock:
            return np.array([self.pools[r].shift_units(name) if r in self.pools else 0 for r in ROLES], np.int32)

    def is_resident(self, name: str) -> bool:
        self._check(name)
        with self._lock:
            return all(pool.is_resident(name) for pool in self.pools.values())

    def stats(self) -> dict:
        """role -> `WeightsPoolStats` of each budgeted role ("kv": attention sides, "w": experts)."""
        with self._lock:
            return {role: pool.stats() for role, pool in self.pools.items()}


def build_residency(params: Mapping[str, tuple], layout: MultiArenaLayout, *,
                    use_pinned_host: Optional[bool] = None) -> ArenaResidency:
    """The arena of `params` (name -> (kv_params, ffn_params)) with its budgeted regions filled:
    the first `num_slots` models (in layout order) start resident, the rest on the host only
    (these initial placements are not counted as swaps)."""
    arena = Arena(layout, build_multi_arena(params, layout))
    pools = {}
    for role in ROLES:
        if layout.region(role) is None:
            continue
        pool = RegionPool(layout, role, use_pinned_host=use_pinned_host)
        made = {}                                # one checkpoint served under two names: packed once
        for name in layout.names:
            kv_params, ffn_params = params[name]
            key = (id(kv_params), id(ffn_params), layout.model(name))
            if key not in made:
                made[key] = region_payloads(kv_params, ffn_params, layout.model(name), role)
            pool.register(name, made[key])
        pools[role] = pool
    residency = ArenaResidency(arena, pools)
    with residency._lock:
        for role, pool in pools.items():
            for name in layout.names[:layout.region(role).num_slots]:
                residency._deferred[(name, role)] = pool.swap_in(name, count=False)[1]
        residency._flush(required=True)
    return residency


__all__ = ["ArenaResidency", "RegionPool", "build_residency", "write_rows"]
