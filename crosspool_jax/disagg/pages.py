"""The page virtualizer of the disaggregated path: global page id <-> (device, local page).

The engine's `PageAllocator` hands out global ids over every device of the arena, KV devices
first, then weight devices (their rows' memory beyond the experts is pages too); each
device's row holds `pages_per_device` page ids (local ids), of which the allocator uses that
device's usable ones. `PageMap` is the ONE place that knows how a global id maps to a device
and a local id (`id // pages_per_device`, `id % pages_per_device`), and which KV device is a
sequence's home (a KV device holding its model's attention side: the device of its first
block when it is one, which is the rule; it runs the sequence's q/k/v, FFN exchange and
logits; `home`).
"""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class PageMap:
    """Global page ids of `n_kv` KV devices and `n_w` weight devices of `pages_per_device` ids each."""

    pages_per_device: int
    n_kv: int
    n_w: int = 0

    def __post_init__(self):
        for name, least in (("pages_per_device", 1), ("n_kv", 1), ("n_w", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"PageMap.{name} must be an integer >= {least}, got {value!r}")

    @property
    def num_devices(self) -> int:
        return self.n_kv + self.n_w

    @property
    def num_pages(self) -> int:
        return self.pages_per_device * self.num_devices

    def split(self, page_ids) -> tuple[np.ndarray, np.ndarray]:
        """(device, local id) int32 arrays of global page ids (any shape); ValueError if outside the pool."""
        ids = np.asarray(page_ids, np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_pages):
            bad = ids[(ids < 0) | (ids >= self.num_pages)]
            raise ValueError(f"page ids {bad[:4].tolist()} are outside the pool of {self.num_devices} devices x "
                             f"{self.pages_per_device} pages")
        return (ids // self.pages_per_device).astype(np.int32), (ids % self.pages_per_device).astype(np.int32)

    def device_of(self, page_ids) -> np.ndarray:
        return self.split(page_ids)[0]

    def local_of(self, page_ids) -> np.ndarray:
        return self.split(page_ids)[1]

    def global_of(self, device: int, local_ids) -> np.ndarray:
        """Global ids of `local_ids` on device `device`."""
        return (device * self.pages_per_device + np.asarray(local_ids, np.int64)).astype(np.int32)

    def block_devices(self, table_LB) -> np.ndarray:
        """int32 [B]: the device of each block of an [L, B] page table (a block's L pages are
        on one device; ValueError if not)."""
        devices = self.device_of(np.asarray(table_LB).reshape(-1, np.shape(table_LB)[-1]))
        if devices.size and (devices != devices[:1]).any():
            raise ValueError("a block's pages (one per layer) lie on different devices")
        return devices[0] if devices.size else np.zeros(0, np.int32)

    def home(self, table_LB, homes=None) -> int:
        """The KV device that owns a sequence's tokens in a step (runs its q/k/v, FFN exchange and
        logits): the device of its first block when that is one of `homes` (the KV devices
        holding its model's attention side; None: every KV device), else the first of them (a
        request that found no room on its homes started elsewhere: it attends sequence-sharded)."""
        table = np.asarray(table_LB)
        if table.size == 0:
            raise ValueError("a sequence without pages has no home KV device")
        homes = tuple(range(self.n_kv)) if homes is None else tuple(homes)
        first = int(self.device_of(table[0, 0]))
        return first if first in homes else homes[0]
