"""The CrossPool runtime: KV devices and weight devices in ONE step program.

`layout.py` (what sits where in each device's arena row; `make_multi_layout` for several
models sharing each row: pages and the content homed there), `arena.py` (packing models into the arena; `Arena` owns
it), `inputs.py` (per-device, per-micro-batch step inputs), `pipeline.py` (the jitted
ping-pong step), `report.py` (bytes moved per layer, CPU step times). The engine runs it
through `engine/disagg_runner.py` for mode "crosspool" with a device split.
"""
from crosspool_jax.disagg.arena import Arena, build_arena, build_multi_arena, expert_shard, host_rows
from crosspool_jax.disagg.inputs import build_disagg_inputs, split_microbatches
from crosspool_jax.disagg.layout import (AXIS, ArenaLayout, MultiArenaLayout, Slot, expert_split, make_layout,
                                        make_multi_layout)
from crosspool_jax.disagg.pipeline import disagg_step, num_stages, schedule

__all__ = ["AXIS", "Arena", "ArenaLayout", "MultiArenaLayout", "Slot", "build_arena", "build_disagg_inputs",
           "build_multi_arena", "disagg_step", "expert_shard", "expert_split", "host_rows", "make_layout",
           "make_multi_layout", "num_stages", "schedule", "split_microbatches"]
