"""CrossPool disaggregation prototype: KV devices and weight devices in ONE step program.

`layout.py` (what sits where in each device's arena row), `arena.py` (packing a model into the
arena), `inputs.py` (per-device, per-micro-batch step inputs), `pipeline.py` (the jitted
ping-pong step), `report.py` (bytes moved per layer, CPU step times).
"""
from crosspool_jax.disagg.arena import build_arena, expert_shard, host_rows
from crosspool_jax.disagg.inputs import build_disagg_inputs, split_microbatches
from crosspool_jax.disagg.layout import AXIS, ArenaLayout, Slot, expert_split, make_layout
from crosspool_jax.disagg.pipeline import disagg_step, num_stages, schedule

__all__ = ["AXIS", "ArenaLayout", "Slot", "build_arena", "build_disagg_inputs", "disagg_step",
           "expert_shard", "expert_split", "host_rows", "make_layout", "num_stages", "schedule",
           "split_microbatches"]
