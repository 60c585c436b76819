"""The weights pool: every registered model's parameter pytree, resident on device or swapped out.

`WeightsPool` keeps a host copy of each registered pytree (in "pinned_host" memory where the
platform has it, else numpy arrays in host RAM) and a device copy for resident models, within a
byte budget. `acquire` swaps a model in when it is out, evicting least-recently-used models not
in use; `prefetch` starts the host->device transfer without blocking (jax.device_put is
asynchronous) and `acquire` waits on it. Eviction deletes the device arrays (the host copy
stays), so device memory is freed at once. Which models to evict is decided by the
JAX-free `LruBudget`; this module only moves arrays.

Sizes count device bytes: a leaf's shard bytes summed over the devices of its sharding, so a
leaf replicated over n devices counts n times. One pool serves the FFN side (weight devices)
and another, with its own budget, the attention side (KV devices).

A pytree handed out by `acquire` stays valid until the matching `release`; after that the pool
may delete its arrays at any time.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any, Callable, Optional

import jax
import numpy as np

from crosspool_jax.weights.budget import LruBudget, WeightsPoolBusyError

ShardingFn = Callable[[str, str, tuple], jax.sharding.Sharding]
__all__ = ["WeightsPool", "WeightsPoolStats", "WeightsPoolBusyError", "leaf_path_str",
           "sharding_bytes", "supports_pinned_host"]


def leaf_path_str(key_path) -> str:
    """A jax key path as "moe/w1" (dict keys, sequence indices, attribute names joined by "/")."""
    parts = []
    for k in key_path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def sharding_bytes(shape: tuple, dtype, sharding: jax.sharding.Sharding) -> int:
    """Device bytes of an array of `shape` placed with `sharding` (replicas counted)."""
    shard = sharding.shard_shape(tuple(shape))
    return int(np.prod(shard, dtype=np.int64)) * np.dtype(dtype).itemsize * len(sharding.device_set)


def supports_pinned_host(sharding: jax.sharding.Sharding) -> bool:
    """Whether every device of `sharding` has a "pinned_host" memory."""
    try:
        return all("pinned_host" in {m.kind for m in d.addressable_memories()}
                   for d in sharding.device_set)
    except Exception:  # platforms without memories API
        return False


@dataclasses.dataclass
class WeightsPoolStats:
    """Counters of one pool. Seconds are wall time from the transfer's start until it was ready
    (for a prefetch: until the acquire that waited on it returned); acquire_wait_seconds is the
    part callers of acquire spent blocked on swap-ins (cold-start latency seen by requests)."""

    swaps_in: int
    swaps_out: int
    bytes_swapped_in: int
    bytes_swapped_out: int
    swap_in_seconds: float
    last_swap_in_seconds: dict  # model -> seconds of its latest swap-in
    acquire_wait_seconds: float
    resident: dict  # model -> bool
    bytes_resident: int
    budget_bytes: Optional[int]


@dataclasses.dataclass
class _Model:
    treedef: Any
    paths: list  # leaf path strings
    shardings: list  # device sharding per leaf
    host_leaves: list  # pinned-host jax arrays or numpy arrays
    device_leaves: Optional[list] = None
    pending_since: Optional[float] = None  # set while a prefetch may still be in flight


class WeightsPool:
    """Parameter pytrees of many models within a device byte budget (None: unlimited).

    sharding_fn(model_name, leaf_path, shape) -> jax.sharding.Sharding gives each leaf's device
    placement. use_pinned_host None: pinned host memory where the devices have it.
    """

    def __init__(self, budget_bytes: Optional[int], sharding_fn: ShardingFn, *,
                 use_pinned_host: Optional[bool] = None):
        if not callable(sharding_fn):
            raise ValueError(f"sharding_fn must be callable (got {sharding_fn!r})")
        self._budget = LruBudget(budget_bytes)
        self._sharding_fn = sharding_fn
        self._use_pinned_host = use_pinned_host
        self._models: dict[str, _Model] = {}
        self._lock = threading.RLock()
        self._swaps_in = self._swaps_out = 0
        self._bytes_in = self._bytes_out = 0
        self._seconds_in = 0.0
        self._wait_seconds = 0.0
        self._last_seconds: dict[str, float] = {}

    # -- registration -------------------------------------------------------------------
    def register(self, model: str, params: Any, *, resident: Optional[bool] = None) -> None:
        """Add a model's pytree (numpy or jax arrays); a host copy is kept for swapping in.

        resident: True swap in now (evicting LRU models), False host only, None resident if it
        fits without evicting anything. Device arrays already placed with their leaf's sharding
        are adopted without a copy when the model becomes resident here: the pool then owns
        them and deletes them on eviction."""
        if not isinstance(model, str) or not model:
            raise ValueError(f"model name must be a non-empty string (got {model!r})")
        with self._lock:
            if model in self._models:
                raise ValueError(f"model {model!r} is already registered")
            flat, treedef = jax.tree_util.tree_flatten_with_path(params)
            if not flat:
                raise ValueError(f"params of {model!r} have no array leaves")
            paths, shardings, host_leaves, device_leaves, nbytes = [], [], [], [], 0
            for key_path, leaf in flat:
                path = leaf_path_str(key_path)
                if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
                    raise ValueError(f"params of {model!r}: leaf {path!r} is not an array ({type(leaf)})")
                sharding = self._sharding_fn(model, path, tuple(leaf.shape))
                if not isinstance(sharding, jax.sharding.Sharding):
                    raise ValueError(f"sharding_fn({model!r}, {path!r}, ...) returned {sharding!r}, "
                                     "not a jax.sharding.Sharding")
                sharding = sharding.with_memory_kind("device") if sharding.memory_kind not in (
                    None, "device") else sharding
                paths.append(path)
                shardings.append(sharding)
                nbytes += sharding_bytes(leaf.shape, leaf.dtype, sharding)
                host_leaves.append(self._to_host(leaf, sharding))
                device_leaves.append(leaf if isinstance(leaf, jax.Array)
                                     and leaf.sharding == sharding and not leaf.is_deleted() else None)
            self._budget.add(model, nbytes)
            entry = _Model(treedef, paths, shardings, host_leaves)
            self._models[model] = entry
            try:
                if resident is None:
                    resident = self._budget.fits_without_eviction(model)
                if resident:
                    if all(x is not None for x in device_leaves):
                        for victim in self._budget.plan_fit(model):
                            self._evict(victim)
                        self._budget.mark_resident(model)  # already placed: adopt, no transfer
                        entry.device_leaves = device_leaves
                    else:
                        self._swap_in(model, wait=True)
            except Exception:
                self._budget.remove(model)
                del self._models[model]
                raise

    def unregister(self, model: str) -> None:
        """Forget a model (it must not be in use); its device arrays are deleted."""
        with self._lock:
            if self._budget.in_use(model):
                raise WeightsPoolBusyError(f"model {model!r} is in use; release it before unregister")
            if self._budget.is_resident(model):
                self._evict(model)
            self._budget.remove(model)
            del self._models[model]

    def _host_memory(self, sharding) -> bool:
        if self._use_pinned_host is None:
            return supports_pinned_host(sharding)
        return self._use_pinned_host

    def _to_host(self, leaf, sharding):
        if self._host_memory(sharding):
            return jax.device_put(leaf, sharding.with_memory_kind("pinned_host"))
        return np.array(leaf, copy=True)

    # -- swapping -----------------------------------------------------------------------
    def _swap_in(self, model: str, *, wait: bool) -> None:
        """Evict what must go, then start (and with wait, finish) the host->device transfer."""
        for victim in self._budget.plan_fit(model):
            self._evict(victim)
        entry = self._models[model]
        start = time.perf_counter()
        entry.device_leaves = [jax.device_put(h, s) for h, s in zip(entry.host_leaves, entry.shardings)]
        self._budget.mark_resident(model)
        self._swaps_in += 1
        self._bytes_in += self._budget.nbytes(model)
        entry.pending_since = start
        if wait:
            self._finish_pending(model)

    def _finish_pending(self, model: str) -> None:
        """Block (under the lock) until a pending transfer of `model` has landed; record it."""
        entry = self._models[model]
        if entry.pending_since is not None:
            t0 = time.perf_counter()
            jax.block_until_ready(entry.device_leaves)
            self._record_landed(model, entry.pending_since, time.perf_counter() - t0)

    def _record_landed(self, model: str, since: float, waited: float) -> None:
        entry = self._models[model]
        self._wait_seconds += waited
        if entry.pending_since == since:  # the first waiter records the transfer
            seconds = time.perf_counter() - since
            self._seconds_in += seconds
            self._last_seconds[model] = seconds
            entry.pending_since = None

    def _evict(self, model: str) -> None:
        entry = self._models[model]
        self._budget.mark_evicted(model)
        leaves, entry.device_leaves = entry.device_leaves or [], None
        if entry.pending_since is not None:  # a prefetch never acquired: let it land, then drop
            jax.block_until_ready(leaves)
            entry.pending_since = None
        for leaf in leaves:
            if not leaf.is_deleted():
                leaf.delete()
        self._swaps_out += 1
        self._bytes_out += self._budget.nbytes(model)

    # -- public -------------------------------------------------------------------------
    def acquire(self, model: str) -> Any:
        """The model's device pytree, swapped in if needed; marks it in use until `release`.

        Waiting on the transfer happens outside the pool's lock (the model is already marked in
        use, so it cannot be evicted meanwhile)."""
        with self._lock:
            if not self._budget.is_resident(model):
                self._swap_in(model, wait=False)
            self._budget.pin(model)
            entry = self._models[model]
            leaves, since = list(entry.device_leaves), entry.pending_since
        if since is not None:
            t0 = time.perf_counter()
            jax.block_until_ready(leaves)
            waited = time.perf_counter() - t0
            with self._lock:
                self._record_landed(model, since, waited)
        return jax.tree_util.tree_unflatten(entry.treedef, leaves)

    def release(self, model: str) -> None:
        """End one `acquire`; the model may be evicted once no holder remains."""
        with self._lock:
            self._budget.unpin(model)

    def prefetch(self, model: str) -> bool:
        """Start swapping `model` in without waiting. False when the models in use leave no
        room (nothing started); True when it is resident or its transfer is under way."""
        with self._lock:
            if self._budget.is_resident(model):
                self._budget.touch(model)
                return True
            try:
                self._swap_in(model, wait=False)
            except WeightsPoolBusyError:
                return False
            return True

    def evict(self, model: str) -> None:
        """Drop the device copy of a model not in use (no-op when not resident)."""
        with self._lock:
            if self._budget.is_resident(model):
                self._evict(model)

    def is_resident(self, model: str) -> bool:
        with self._lock:
            return self._budget.is_resident(model)

    def resident_models(self) -> list[str]:
        """Resident models, least recently used first."""
        with self._lock:
            return self._budget.resident_names()

    def models(self) -> list[str]:
        with self._lock:
            return self._budget.names()

    def model_bytes(self, model: str) -> int:
        """Device bytes the model takes when resident."""
        with self._lock:
            return self._budget.nbytes(model)

    def host_leaves(self, model: str) -> list:
        """The host copies (read-only use), in pytree leaf order."""
        with self._lock:
            self._budget.nbytes(model)  # validates the name
            return list(self._models[model].host_leaves)

    @property
    def bytes_resident(self) -> int:
        with self._lock:
            return self._budget.bytes_resident

    @property
    def budget_bytes(self) -> Optional[int]:
        return self._budget.budget_bytes

    def stats(self) -> WeightsPoolStats:
        with self._lock:
            return WeightsPoolStats(
                swaps_in=self._swaps_in, swaps_out=self._swaps_out,
                bytes_swapped_in=self._bytes_in, bytes_swapped_out=self._bytes_out,
                swap_in_seconds=self._seconds_in, last_swap_in_seconds=dict(self._last_seconds),
                acquire_wait_seconds=self._wait_seconds,
                resident={m: self._budget.is_resident(m) for m in self._budget.names()},
                bytes_resident=self._budget.bytes_resident, budget_bytes=self._budget.budget_bytes)
