"""The runner contract: one model's part of a scheduled step, as the engine hands it to a runner.

`ModelStep` is everything a runner needs to dispatch one model's step program, and nothing
it would have to ignore: the scheduled chunks, their sampling rows and stop ids, the
model's geometry and shape menu, and the typed handle of the model's resident weights
(`PlacedWeights` from the device's weights pools, `ArenaWeights` from the CrossPool arena's
slots), which the engine acquired from the registry and releases once the step is collected.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence, Union

import numpy as np

from crosspool_jax.models.config import ModelConfig
from crosspool_jax.runtime.sampling_metadata import SamplingRow
from crosspool_jax.runtime.shapes import ShapeMenu


@dataclasses.dataclass(frozen=True)
class PlacedWeights:
    """A model placed whole on one device: its parameter pytrees there."""

    kv_params: dict               # embedding, attention layers, final norm / lm head
    ffn_params: dict              # {"moe": ..., "dense": ...}: the kinds the model has


@dataclasses.dataclass(frozen=True)
class ArenaWeights:
    """A model inside the CrossPool arena: where its tensors sit in the rows (the arena step's data)."""

    offsets: np.ndarray           # int32 [tensors]: `ArenaLayout.offsets` (ALIGN units), budgeted slot shift included


Weights = Union[PlacedWeights, ArenaWeights]


@dataclasses.dataclass(frozen=True)
class ModelStep:
    """One model's chunks of a step. chunks[i] samples with rows[i], stops at stop_ids[i] (its
    stop ids and EOS, unless ignore_eos) and may produce at most allowances[i] more tokens;
    num_steps > 1: a multi-step decode (every chunk a single-token decode)."""

    model: str
    config: ModelConfig
    tokens_per_page: int
    menu: ShapeMenu
    weights: Weights
    chunks: Sequence                                  # scheduler.ScheduledChunk
    rows: Sequence[SamplingRow]
    stop_ids: Sequence[Sequence[int]]
    allowances: Sequence[int]
    num_steps: int = 1

    def __post_init__(self):
        n = len(self.chunks)
        if not (len(self.rows) == len(self.stop_ids) == len(self.allowances) == n):
            raise ValueError(f"ModelStep of {self.model!r}: {n} chunks but {len(self.rows)} rows, "
                             f"{len(self.stop_ids)} stop lists and {len(self.allowances)} allowances")
        if self.num_steps < 1:
            raise ValueError(f"ModelStep of {self.model!r}: num_steps must be >= 1, got {self.num_steps}")

    @property
    def max_blocks(self) -> int:
        """Blocks of the longest page table (0 without chunks)."""
        return max((len(c.page_table[0]) for c in self.chunks), default=0)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)
