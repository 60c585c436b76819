"""The weights pool (parameter pytrees resident on device or swapped to host) and device roles."""
from crosspool_jax.weights.budget import LruBudget, WeightsPoolBusyError
from crosspool_jax.weights.devices import DeviceRoles, place_models, resolve_device_roles
from crosspool_jax.weights.pool import WeightsPool, WeightsPoolStats, leaf_path_str

__all__ = [
    "DeviceRoles", "LruBudget", "WeightsPool", "WeightsPoolBusyError", "WeightsPoolStats",
    "leaf_path_str", "place_models", "resolve_device_roles",
]
