"""Device roles of the engine: which devices hold KV (and attention), which hold FFN weights.

Owns `DeviceRoles`, `resolve_device_roles` (the engine options `mode`, `kv_devices`,
`weight_devices` of ../shared/CROSSPOOL.md), `parse_split` ("2+2"), and the placement of
whole models on devices for the multi-device shared/static baselines (`place_models`). How a
CrossPool split shards the experts over its weight devices is the arena's rule
(`disagg/layout.py`).
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence, Union

import jax
import numpy as np

MODES = ("crosspool", "shared", "static")
DeviceSpec = Union[int, Sequence[Union[jax.Device, int]], None]


@dataclasses.dataclass(frozen=True)
class DeviceRoles:
    """The devices of each pool. mode "shared"/"static" let the roles overlap (every device both)."""

    kv_devices: tuple
    weight_devices: tuple
    mode: str = "crosspool"

    def __post_init__(self):
        object.__setattr__(self, "kv_devices", tuple(self.kv_devices))
        object.__setattr__(self, "weight_devices", tuple(self.weight_devices))
        if self.mode not in MODES:
            raise ValueError(f"DeviceRoles.mode must be one of {MODES} (got {self.mode!r})")
        for field in ("kv_devices", "weight_devices"):
            devs = getattr(self, field)
            if not devs:
                raise ValueError(f"DeviceRoles.{field} must not be empty")
            if len(set(devs)) != len(devs):
                raise ValueError(f"DeviceRoles.{field} lists a device twice: {list(devs)}")
        overlap = set(self.kv_devices) & set(self.weight_devices)
        degenerate = len(self.kv_devices) == 1 and self.kv_devices == self.weight_devices
        if overlap and not degenerate and self.mode == "crosspool":
            raise ValueError(
                f"DeviceRoles: kv_devices and weight_devices overlap on {sorted(d.id for d in overlap)}; "
                "crosspool mode needs disjoint pools (or the same single device in both roles); "
                "use mode='shared' for devices holding both")

    @property
    def is_degenerate(self) -> bool:
        """One device holds both roles."""
        return len(self.kv_devices) == 1 and self.kv_devices == self.weight_devices

    @property
    def all_devices(self) -> tuple:
        """Every device of either role, KV devices first, no repeats."""
        return tuple(dict.fromkeys(self.kv_devices + self.weight_devices))


def _is_count(spec) -> bool:
    return isinstance(spec, (int, np.integer)) and not isinstance(spec, bool)


def _from_list(spec, field: str, devices: list) -> list:
    """An explicit list of devices or device ids, checked against `devices`."""
    if _is_count(spec) or isinstance(spec, (str, bytes)):
        raise ValueError(f"{field} must be a count or a list of devices (got {spec!r})")
    by_id = {d.id: d for d in devices}
    out = []
    for item in spec:
        if _is_count(item):
            if int(item) not in by_id:
                raise ValueError(f"{field}: no device with id {int(item)} (ids: {sorted(by_id)})")
            out.append(by_id[int(item)])
        elif item in devices:
            out.append(item)
        else:
            raise ValueError(f"{field}: device {item!r} is not among the {len(devices)} devices given")
    if not out:
        raise ValueError(f"{field} must not be an empty list")
    return out


def _count(spec, field: str, default: int) -> int:
    n = default if spec is None else int(spec)
    if n < 1:
        raise ValueError(f"{field} must be >= 1 (got {n})")
    return n


def parse_split(spec: str) -> tuple[int, int]:
    """'KV+W' (e.g. '1+1', the scripts' crosspool split flag) -> (n_kv, n_w), both >= 1."""
    kv, sep, w = str(spec).partition("+")
    try:
        n_kv, n_w = int(kv), int(w)
    except ValueError:
        n_kv = n_w = 0
    if not sep or n_kv < 1 or n_w < 1:
        raise ValueError(f"a device split is 'KV+W' with two positive counts (e.g. '1+1'), got {spec!r}")
    return n_kv, n_w


def resolve_device_roles(mode: str, kv_devices: DeviceSpec = None, weight_devices: DeviceSpec = None,
                         devices=None) -> DeviceRoles:
    """Turn the engine options into roles.

    crosspool: the first kv_devices devices hold KV, the next weight_devices devices (those not
      holding KV) hold weights; defaults 1 + 1. On a one-device machine the defaults (or
      counts 1 + 1) give the degenerate case: the single device in both roles. Lists (of
      devices or device ids) are taken as given.
    shared: every chosen device holds weights and KV; a count or list in either option selects
      them (both given must agree); default all devices.
    static: like shared (each model is then placed on one device: `place_models`).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES} (got {mode!r})")
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("no devices given")
    if mode == "crosspool":
        counts = [s is None or _is_count(s) for s in (kv_devices, weight_devices)]
        if len(devices) == 1 and all(counts) and kv_devices in (None, 1) and weight_devices in (None, 1):
            return DeviceRoles((devices[0],), (devices[0],), mode)
        if counts[0]:
            n_kv = _count(kv_devices, "kv_devices", 1)
            if n_kv > len(devices):
                raise ValueError(f"kv_devices={n_kv} asks for more devices than exist ({len(devices)})")
            kv = devices[:n_kv]
        else:
            kv = _from_list(kv_devices, "kv_devices", devices)
        if counts[1]:
            n_w = _count(weight_devices, "weight_devices", 1)
            rest = [d for d in devices if d not in kv]
            if n_w > len(rest):
                raise ValueError(
                    f"kv_devices={len(kv)} + weight_devices={n_w} = {len(kv) + n_w} devices asked, "
                    f"but only {len(devices)} exist")
            weights = rest[:n_w]
        else:
            weights = _from_list(weight_devices, "weight_devices", devices)
        return DeviceRoles(tuple(kv), tuple(weights), mode)
    picks = []
    for spec, field in ((kv_devices, "kv_devices"), (weight_devices, "weight_devices")):
        if spec is None:
            continue
        if _is_count(spec):
            n = _count(spec, field, len(devices))
            if n > len(devices):
                raise ValueError(f"{field}={n} asks for more devices than exist ({len(devices)})")
            picks.append(devices[:n])
        else:
            picks.append(_from_list(spec, field, devices))
    if len(picks) == 2 and picks[0] != picks[1]:
        raise ValueError(
            f"mode={mode!r}: every device holds both roles, so kv_devices ({kv_devices!r}) and "
            f"weight_devices ({weight_devices!r}) must select the same devices")
    chosen = tuple(picks[0] if picks else devices)
    return DeviceRoles(chosen, chosen, mode)


def place_models(model_bytes: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """The multi-device shared/static baselines: each model on ONE device (index in [0, num_devices)).

    Greedy by weight bytes: the largest model first (ties: the order given), each onto the
    device with the fewest bytes placed so far (ties: the lowest index). Balances the weights
    over the devices; with at most num_devices models every model gets a device of its own.
    """
    if not isinstance(num_devices, int) or isinstance(num_devices, bool) or num_devices < 1:
        raise ValueError(f"num_devices must be an integer >= 1 (got {num_devices!r})")
    if not model_bytes:
        raise ValueError("place_models: no models to place")
    for name, nbytes in model_bytes.items():
        if not isinstance(nbytes, (int, np.integer)) or nbytes < 0:
            raise ValueError(f"place_models: model {name!r} has {nbytes!r} bytes, not an integer >= 0")
    load = [0] * num_devices
    out = {}
    for name in sorted(model_bytes, key=lambda n: -model_bytes[n]):     # stable: ties keep the order
        d = min(range(num_devices), key=lambda k: (load[k], k))
        out[name] = d
        load[d] += int(model_bytes[name])
    return {name: out[name] for name in model_bytes}
