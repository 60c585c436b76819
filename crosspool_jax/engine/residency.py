"""Which models' weights are on the devices: one interface over the two memory organisations.

The registry owns one residency object and asks it, per model, to bring weights in
(`prefetch`), to hold them for a step and hand back the typed handle the runner reads
(`acquire` -> `step_plan.Weights`), to let them go (`release`), and whether a set of models
can be resident together (`fit_together`, which the scheduler uses to keep a step's models to
such a set). Two implementations, each over its own pools:

- `PlacedResidency` (modes shared/static): each model is placed whole on one device, its
  attention side in that device's attention `WeightsPool` and its FFN side in its weights
  `WeightsPool`; `acquire` gives `PlacedWeights` (the two pytrees on that device).
- `ArenaSlots` (a CrossPool split): both halves live in the arena's rows, in budgeted slot
  regions where budgets are set (`disagg.residency.ArenaResidency`); `acquire` gives
  `ArenaWeights` (where its tensors sit: the arena step reads them there).
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence, Union

from crosspool_jax.disagg.residency import ArenaResidency
from crosspool_jax.engine.step_plan import ArenaWeights, PlacedWeights
from crosspool_jax.weights import WeightsPool
from crosspool_jax.weights.pool import WeightsPoolStats


class PlacedResidency:
    """Per placed device, an attention pool and a weights pool; each model in its device's pair."""

    def __init__(self, attention_pools: Sequence[WeightsPool], weights_pools: Sequence[WeightsPool],
                 model_devices: Mapping[str, int]):
        self.attention_pools = list(attention_pools)
        self.weights_pools = list(weights_pools)
        self.model_devices = model_devices           # model -> index of its device (the registry fills it)

    def register(self, name: str, kv_params: dict, ffn_params: dict) -> None:
        attention, weights = self._pools_of(name)
        attention.register(name, kv_params)
        weights.register(name, ffn_params)

    def _pools_of(self, name: str) -> tuple[WeightsPool, WeightsPool]:
        d = self.model_devices[name]
        return self.attention_pools[d], self.weights_pools[d]

    def prefetch(self, name: str) -> None:
        for pool in self._pools_of(name):
            pool.prefetch(name)

    def acquire(self, name: str) -> PlacedWeights:
        attention, weights = self._pools_of(name)
        kv_params = attention.acquire(name)
        try:
            return PlacedWeights(kv_params, weights.acquire(name))
        except Exception:
            attention.release(name)
            raise

    def release(self, name: str) -> None:
        attention, weights = self._pools_of(name)
        weights.release(name)
        attention.release(name)

    def is_resident(self, name: str) -> bool:
        return all(pool.is_resident(name) for pool in self._pools_of(name))

    def fit_together(self, names) -> bool:
        names = set(names)
        for pools in (self.weights_pools, self.attention_pools):
            for d, pool in enumerate(pools):
                if pool.budget_bytes is not None and sum(
                        pool.model_bytes(n) for n in names if self.model_devices[n] == d) > pool.budget_bytes:
                    return False
        return True

    @property
    def has_budgets(self) -> bool:
        return any(p.budget_bytes is not None for p in self.weights_pools + self.attention_pools)

    def pool_stats(self) -> list[WeightsPoolStats]:
        return [p.stats() for p in self.attention_pools + self.weights_pools]

    def swap_details(self, name: str) -> dict:
        """Extra per-model statistics (none: the pools' counters are per device)."""
        return {}


class ArenaSlots:
    """The CrossPool arena's model slots (`ArenaResidency`), handing out `ArenaWeights`."""

    def __init__(self, residency: ArenaResidency):
        self.residency = residency

    @property
    def arena(self):
        return self.residency.arena

    def prefetch(self, name: str) -> None:
        self.residency.prefetch(name)

    def acquire(self, name: str) -> ArenaWeights:
        bases = self.residency.acquire(name)
        return ArenaWeights(self.residency.arena.layout.model(name).offsets(bases))

    def release(self, name: str) -> None:
        self.residency.release(name)

    def is_resident(self, name: str) -> bool:
        return self.residency.is_resident(name)

    def fit_together(self, names) -> bool:
        return all(len(set(names)) <= pool.region.num_slots for pool in self.residency.pools.values())

    @property
    def has_budgets(self) -> bool:
        return bool(self.residency.pools)

    def pool_stats(self) -> list[WeightsPoolStats]:
        return list(self.residency.stats().values())

    def swap_details(self, name: str) -> dict:
        """With budgeted regions: the last swap-in seconds of each role ("kv": attention side,
        "w": experts)."""
        if not self.residency.pools:
            return {}
        return {"last_swap_in_seconds": {role: st.last_swap_in_seconds.get(name)
                                         for role, st in self.residency.stats().items()}}


Residency = Union[PlacedResidency, ArenaSlots]

__all__ = ["ArenaSlots", "PlacedResidency", "Residency"]
