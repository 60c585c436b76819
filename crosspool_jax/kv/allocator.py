"""`PageAllocator`: which physical pages of the global KV pool are free (plain Python, no JAX).

Page p lives on device `p // pages_per_device`; device d holds `device_pages[d]` of its
`pages_per_device` ids (all of them unless the devices differ, as a crosspool arena's do). The allocator knows nothing of models, layers or
requests: it hands out page ids per device and takes them back, refusing double frees
and ids it never handed out. Who owns which page is `kv_cache_manager.py`'s business.
"""
from __future__ import annotations

import operator
from typing import Iterable, Optional, Sequence


class NoFreePages(RuntimeError):
    """Raised when an allocation cannot be satisfied; nothing was allocated."""


class PageAllocator:
    """Free lists of the global page pool, one per KV device.

    `allocate` is atomic (all n pages from one device, or `NoFreePages` and no change);
    `free` validates every id before returning any.
    """

    def __init__(self, pages_per_device: int, num_devices: int = 1, device_pages: Optional[Sequence[int]] = None):
        for name, value in (("pages_per_device", pages_per_device), ("num_devices", num_devices)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"PageAllocator.{name} must be an integer >= 1, got {value!r}")
        usable = tuple(device_pages) if device_pages else (pages_per_device,) * num_devices
        if len(usable) != num_devices or not all(isinstance(p, int) and 0 <= p <= pages_per_device
                                                 for p in usable):
            raise ValueError(f"PageAllocator.device_pages {device_pages!r} must give each of the {num_devices} "
                             f"devices an integer in [0, {pages_per_device}]")
        self.pages_per_device = pages_per_device
        self.num_devices = num_devices
        self.device_pages = usable
        # Per device a stack of free ids; popping from the end hands out low ids first.
        self._free_lists: list[list[int]] = [
            list(range(d * pages_per_device + usable[d] - 1, d * pages_per_device - 1, -1))
            for d in range(num_devices)]
        self._is_free = bytearray(pages_per_device * num_devices)
        for free in self._free_lists:
            for p in free:
                self._is_free[p] = 1
        self._usable = bytearray(self._is_free)

    @property
    def num_total(self) -> int:
        """Pages in the whole pool (all devices)."""
        return sum(self.device_pages)

    @property
    def num_used(self) -> int:
        """Pages currently handed out (all devices)."""
        return self.num_total - self.num_free()

    def num_free(self, device: Optional[int] = None) -> int:
        """Free pages on `device`, or in the whole pool when device is None."""
        if device is None:
            return sum(len(f) for f in self._free_lists)
        self._check_device(device)
        return len(self._free_lists[device])

    def device_of(self, page: int) -> int:
        """The KV device holding global page id `page`."""
        return self._check_page(page) // self.pages_per_device

    def allocate(self, n: int, device: Optional[int] = None) -> list[int]:
        """Take n pages, all from `device` (None: the device with the most free pages,
        the lowest id on ties). Raises `NoFreePages` (allocating nothing) if it cannot."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"PageAllocator.allocate: n must be an integer >= 0, got {n!r}")
        if device is None:
            device = max(range(self.num_devices), key=lambda d: (len(self._free_lists[d]), -d))
        else:
            self._check_device(device)
        free = self._free_lists[device]
        if n > len(free):
            raise NoFreePages(f"need {n} pages on KV device {device}, only {len(free)} free "
                              f"(pool: {self.num_free()} free of {self.num_total})")
        pages = free[len(free) - n:][::-1]
        del free[len(free) - n:]
        for p in pages:
            self._is_free[p] = 0
        return pages

    def free(self, pages: Iterable[int]) -> None:
        """Return pages to their devices. Raises ValueError (returning none of them) on an id
        outside the pool, a page that is already free, or an id listed twice."""
        pages = [self._check_page(p) for p in pages]
        seen = set()
        for p in pages:
            if self._is_free[p] or p in seen:
                raise ValueError(f"PageAllocator.free: page {p} is already free (double free)")
            seen.add(p)
        for p in reversed(pages):
            self._is_free[p] = 1
            self._free_lists[p // self.pages_per_device].append(p)

    def _check_device(self, device) -> None:
        if not isinstance(device, int) or isinstance(device, bool) or not 0 <= device < self.num_devices:
            raise ValueError(f"PageAllocator: device must be in [0, {self.num_devices}), got {device!r}")

    def _check_page(self, page) -> int:
        try:
            index = operator.index(page)
        except TypeError:
            index = -1
        if isinstance(page, bool) or not 0 <= index < len(self._usable) or not self._usable[index]:
            raise ValueError(f"PageAllocator: page id {page!r} is not in this pool (device d holds ids "
                             f"[d * {self.pages_per_device}, d * {self.pages_per_device} + {self.device_pages}[d]))")
        return index
