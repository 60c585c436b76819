"""Plain-Python bookkeeping of a weights pool: byte budget, residency, in-use counts, LRU order.

No JAX here: `LruBudget` decides *which* models to evict so that another fits; the JAX side
(`pool.py`) moves the arrays. Each model has a size in bytes (its device footprint), a
resident flag, an in-use count (acquire/release nest) and a last-used tick.
"""
from __future__ import annotations

import dataclasses
from typing import Optional


class WeightsPoolBusyError(RuntimeError):
    """A model fits the budget, but the models in use leave too little room for it now."""


@dataclasses.dataclass
class _Entry:
    nbytes: int
    resident: bool = False
    in_use: int = 0
    last_used: int = 0


class LruBudget:
    """Budget arithmetic and least-recently-used order over named models.

    budget_bytes None means unlimited (nothing is ever evicted to make room).
    """

    def __init__(self, budget_bytes: Optional[int]):
        if budget_bytes is not None and (not isinstance(budget_bytes, int) or budget_bytes < 0):
            raise ValueError(f"budget_bytes must be None or an integer >= 0 (got {budget_bytes!r})")
        self.budget_bytes = budget_bytes
        self._entries: dict[str, _Entry] = {}
        self._clock = 0

    # -- registration -------------------------------------------------------------------
    def add(self, name: str, nbytes: int) -> None:
        if name in self._entries:
            raise ValueError(f"model {name!r} is already registered")
        if not isinstance(nbytes, int) or nbytes < 0:
            raise ValueError(f"nbytes of {name!r} must be an integer >= 0 (got {nbytes!r})")
        self._entries[name] = _Entry(nbytes=nbytes)

    def remove(self, name: str) -> None:
        entry = self._get(name)
        if entry.in_use:
            raise WeightsPoolBusyError(f"model {name!r} is in use ({entry.in_use} holders); release it first")
        del self._entries[name]

    def _get(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise ValueError(
                f"model {name!r} is not registered (registered: {sorted(self._entries)})") from None

    # -- queries --------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self._entries)

    def nbytes(self, name: str) -> int:
        return self._get(name).nbytes

    def is_resident(self, name: str) -> bool:
        return self._get(name).resident

    def in_use(self, name: str) -> int:
        return self._get(name).in_use

    @property
    def bytes_resident(self) -> int:
        return sum(e.nbytes for e in self._entries.values() if e.resident)

    @property
    def free_bytes(self) -> Optional[int]:
        if self.budget_bytes is None:
            return None
        return self.budget_bytes - self.bytes_resident

    def resident_names(self) -> list[str]:
        """Resident models, least recently used first."""
        res = [(e.last_used, n) for n, e in self._entries.items() if e.resident]
        return [n for _, n in sorted(res)]

    def fits_without_eviction(self, name: str) -> bool:
        entry = self._get(name)
        return entry.resident or self.budget_bytes is None or entry.nbytes <= self.free_bytes

    # -- decisions ------------------------------------------------------------------------
    def plan_fit(self, name: str) -> list[str]:
        """Models to evict (LRU first) so that `name` becomes resident within the budget.

        Empty when `name` is resident or already fits. Raises ValueError when `name` is larger
        than the whole budget, WeightsPoolBusyError when the models in use leave too little room.
        """
        entry = self._get(name)
        if entry.resident or self.budget_bytes is None:
            return []
        if entry.nbytes > self.budget_bytes:
            raise ValueError(
                f"model {name!r} needs {entry.nbytes} bytes, more than the whole pool budget of "
                f"{self.budget_bytes} bytes")
        need = entry.nbytes - self.free_bytes
        victims: list[str] = []
        for victim in self.resident_names():
            if need <= 0:
                break
            if self._entries[victim].in_use:
                continue
            victims.append(victim)
            need -= self._entries[victim].nbytes
        if need > 0:
            busy = {n: e.nbytes for n, e in self._entries.items() if e.resident and e.in_use}
            raise WeightsPoolBusyError(
                f"model {name!r} ({entry.nbytes} bytes) does not fit the budget of "
                f"{self.budget_bytes} bytes while these models are in use: {busy}")
        return victims

    # -- state changes --------------------------------------------------------------------
    def touch(self, name: str) -> None:
        self._clock += 1
        self._get(name).last_used = self._clock

    def mark_resident(self, name: str) -> None:
        entry = self._get(name)
        if not entry.resident and self.budget_bytes is not None and entry.nbytes > self.free_bytes:
            raise ValueError(
                f"model {name!r} ({entry.nbytes} bytes) would overflow the budget: "
                f"{self.bytes_resident} of {self.budget_bytes} bytes already resident")
        entry.resident = True
        self.touch(name)

    def mark_evicted(self, name: str) -> None:
        entry = self._get(name)
        if entry.in_use:
            raise WeightsPoolBusyError(f"model {name!r} is in use ({entry.in_use} holders); cannot evict")
        entry.resident = False

    def pin(self, name: str) -> None:
        entry = self._get(name)
        if not entry.resident:
            raise ValueError(f"model {name!r} is not resident; cannot mark it in use")
        entry.in_use += 1
        self.touch(name)

    def unpin(self, name: str) -> None:
        entry = self._get(name)
        if entry.in_use <= 0:
            raise ValueError(f"model {name!r} is not in use; release without a matching acquire")
        entry.in_use -= 1
