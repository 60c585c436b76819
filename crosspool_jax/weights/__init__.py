"""The weights pool (parameter pytrees resident on device or swapped to host) and device roles."""
from crosspool_jax.weights.budget import LruBudget, WeightsPoolBusyError
from crosspool_jax.weights.devices import (
    DeviceRoles,
    deinterleave_gate_up,
    ffn_sharding_fn,
    ffn_sharding_for,
    interleave_gate_up,
    kv_mesh,
    place_models,
    replicated_sharding_fn,
    resolve_device_roles,
    weights_mesh,
)
from crosspool_jax.weights.pool import WeightsPool, WeightsPoolStats, leaf_path_str

__all__ = [
    "DeviceRoles", "LruBudget", "WeightsPool", "WeightsPoolBusyError", "WeightsPoolStats",
    "deinterleave_gate_up", "ffn_sharding_fn", "ffn_sharding_for",
    "interleave_gate_up", "kv_mesh", "leaf_path_str", "place_models", "replicated_sharding_fn",
    "resolve_device_roles", "weights_mesh",
]
