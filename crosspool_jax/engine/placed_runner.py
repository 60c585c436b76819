"""The runner of the shared/static baselines: every model placed on one device, one `StepRunner` per device.

Without a CrossPool device split every device is an independent monolithic pool (the
vLLM-per-GPU / kvcached picture): a model's whole weights and all its KV pages live on the
one device the registry placed it on (`ModelRegistry.model_devices`, the KV manager pins the
model's blocks there), and its step program runs on that device against that device's K/V
buffers. With one device this is the plain single-device engine.

`PlacedRunner.run` has the `StepRunner.run` contract: it turns the chunks' global page ids
(page p on device p // pages_per_device) into the model's device's local ids
(`kv.pool.local_page_ids`), refusing a chunk with a page elsewhere, and hands them to that
device's `StepRunner` (ragged step or multi-step decode). The jitted programs are the same
module-level functions on every device, so a program is traced once per shape and compiled
once per (shape, device); each model uses only its own device's.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

from crosspool_jax.engine.runner import DispatchedStep, DispatchingRunner, RunnerStats, StepRunner
from crosspool_jax.engine.step_plan import ModelStep, PlacedWeights
from crosspool_jax.kv.pool import KVPool, local_page_ids
from crosspool_jax.runtime.shapes import ShapeMenu


class PlacedRunner(DispatchingRunner):
    """Dispatches each model's step to the `StepRunner` of the KV device it is placed on."""

    def __init__(self, pool: KVPool, model_devices: Mapping[str, int], *, attention_backend: str, moe_backend: str,
                 max_decode_steps: int = 1, num_token_slots: int = 1):
        n = pool.layout.num_devices
        for name, d in model_devices.items():
            if not isinstance(d, int) or not 0 <= d < n:
                raise ValueError(f"PlacedRunner: model {name!r} is placed on device index {d!r}, "
                                 f"not one of the pool's {n} devices")
        self.pool = pool
        self.model_devices = dict(model_devices)
        self.runners = [StepRunner(pool, attention_backend=attention_backend, moe_backend=moe_backend,
                                   max_decode_steps=max_decode_steps, device_index=d,
                                   num_token_slots=num_token_slots) for d in range(n)]

    @property
    def stats(self) -> RunnerStats:
        """The devices' counters added up (program keys carry the device: the sum counts distinct ones)."""
        parts = [r.stats for r in self.runners]
        return RunnerStats(compiled_programs=sum(p.compiled_programs for p in parts),
                           steps=sum(p.steps for p in parts), dispatches=sum(p.dispatches for p in parts),
                           decode_tokens_per_dispatch_max=max(p.decode_tokens_per_dispatch_max for p in parts),
                           host_prepare_seconds=sum(p.host_prepare_seconds for p in parts),
                           device_seconds=sum(p.device_seconds for p in parts))

    def dispatch(self, step: ModelStep) -> DispatchedStep:
        """Dispatch one model's step on its device without waiting (`collect` it)."""
        d = self._device_of(step.model)
        return self.runners[d].dispatch(self._local(step, d))

    def dispatch_all(self, steps: Sequence[ModelStep]) -> list[DispatchedStep]:
        """Dispatch one engine step's models: the decodes of models of one architecture on one
        device (equal `StepRunner.lane_key`) as lanes of one program, as many lanes a program as
        the menu's largest lane count, every other step alone. One DispatchedStep per step, in
        order."""
        local = [self._local(s, self._device_of(s.model)) for s in steps]
        groups: dict = {}
        for i, step in enumerate(local):
            d = self._device_of(step.model)
            key = self.runners[d].lane_key(step)
            groups.setdefault((d, key) if key is not None else (d, i), []).append(i)
        out: list = [None] * len(steps)
        for (d, key), members in groups.items():
            width = max(local[members[0]].menu.lane_counts)
            for lo in range(0, len(members), width):
                part = members[lo:lo + width]
                if len(part) == 1:
                    out[part[0]] = self.runners[d].dispatch(local[part[0]])
                else:
                    for i, dispatched in zip(part, self.runners[d].dispatch_lanes([local[i] for i in part])):
                        out[i] = dispatched
        return out

    def _local(self, step: ModelStep, d: int) -> ModelStep:
        """`step` with its chunks' page tables in device d's local page ids."""
        P = self.pool.layout.pages_per_device
        local = []
        for c in step.chunks:
            try:
                device, table = local_page_ids(c.page_table, P)
            except ValueError as e:
                raise ValueError(f"request {c.request.request_id} of model {step.model!r}: {e}") from None
            if device != d:
                raise ValueError(f"request {c.request.request_id} of model {step.model!r} has pages on KV device "
                                 f"{device}; the model is placed on device {d}")
            local.append(dataclasses.replace(c, page_table=table))
        return dataclasses.replace(step, chunks=local)

    def compile_jobs(self, config, menu: ShapeMenu, weights: PlacedWeights, *, model: str) -> list:
        """The model's programs on its device (`StepRunner.compile_jobs`)."""
        return self.runners[self._device_of(model)].compile_jobs(config, menu, weights)

    def _device_of(self, model: str) -> int:
        if model not in self.model_devices:
            raise ValueError(f"PlacedRunner: model {model!r} has no device; placed: {sorted(self.model_devices)}")
        return self.model_devices[model]
