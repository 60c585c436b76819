"""Device roles of the engine: which devices hold KV (and attention), which hold FFN weights.

Owns `DeviceRoles`, `resolve_device_roles` (the engine options `mode`, `kv_devices`,
`weight_devices` of ../shared/CROSSPOOL.md), the two meshes (`kv_mesh`, axis "kv";
`weights_mesh`, axis "expert"), the FFN leaf sharding rule `ffn_sharding_for`, and the
placement of whole models on devices for the multi-device shared/static baselines
(`place_models`).

Sharding of FFN leaves over the "expert" axis of size n. Leaves are named by their pytree path
("moe/w1_LEDF2"); the axes come from the name's dimension letters (models/params.py), else
from positions: expert weights `w1 [..., E, D, 2F]`, `w2 [..., E, F, D]`, the leading "..."
being the stacked-layers axis; dense and shared-expert FFNs `[..., D, 2F]`, `[..., F, D]`.

- expert-parallel (EP) when E % n == 0 and E >= n: axis E is split, each device holds E/n whole
  experts;
- otherwise tensor-parallel (TP) over the expert hidden dim F when F % n == 0: w2 is split on
  its F axis, w1 on its 2F axis into n contiguous blocks;
- otherwise replicated. Small leaves (norms, router, shared-expert gate, biases) are replicated.

Gate/up alignment under TP. A contiguous split of the stacked `[gate | up]` 2F axis gives
device i columns [i*2F/n, (i+1)*2F/n): for n=2 device 0 holds all of gate and device 1 all of
up, so `silu(gate) * up` is not local. Two ways out, both supported:

1. store w1 gate/up-interleaved per shard with `interleave_gate_up(w1, n)`: block i of the
   2F axis is `[gate_i | up_i]` where gate_i, up_i are the i-th F/n columns, exactly the rows
   of w2's block i. A shard_map FFN then splits its local block in half and needs one psum
   after w2, no other communication. `deinterleave_gate_up` restores the contract layout.
2. keep the contract layout under plain jit: GSPMD keeps the math exact (sharding never changes
   results) and moves the [T, F] activation halves between devices, which is cheap in decode.

`ffn_sharding_for` returns the same sharding in both cases; the layout is the caller's choice.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Mapping, Optional, Sequence, Union

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

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


def kv_mesh(roles: DeviceRoles) -> Mesh:
    """1-D mesh over the KV devices, axis "kv"."""
    return Mesh(np.array(roles.kv_devices, dtype=object), ("kv",))


def weights_mesh(roles: DeviceRoles) -> Mesh:
    """1-D mesh over the weight devices, axis "expert"."""
    return Mesh(np.array(roles.weight_devices, dtype=object), ("expert",))


def _dims_from_suffix(name: str, ndim: int) -> Optional[list]:
    """["L", "E", "D", "F2"] from a leaf name like "w1_LEDF2" when its letters match ndim."""
    if "_" not in name:
        return None
    suffix = name.rsplit("_", 1)[1]
    dims = re.findall(r"[A-Z][0-9]*", suffix)
    return dims if "".join(dims) == suffix and len(dims) == ndim else None


def _ffn_axes(path: str, shape: tuple, num_experts: Optional[int]):
    """(which, expert_axis, f_axis) of an FFN leaf: which is "w1", "w2" or None (small leaf).

    Axes come from the dimension letters of the leaf name when it carries them ("w1_LEDF2",
    "shared_w2_LFD", as models/params.py names them), else from the position rules
    `[..., E, D, 2F]` / `[..., E, F, D]` (expert weights: E == num_experts at axis -3 and no
    "dense"/"shared" in the path) and `[..., D, 2F]` / `[..., F, D]` (dense and shared FFNs).
    """
    parts = [p for p in path.replace(".", "/").split("/") if p]
    name = parts[-1] if parts else ""
    tokens = name.split("_")
    which = "w1" if "w1" in tokens else "w2" if "w2" in tokens else None
    if which is None or len(shape) < 2:
        return None, None, None
    dims = _dims_from_suffix(name, len(shape))
    if dims is not None:
        e_axis = dims.index("E") if "E" in dims else None
        f_letter = "F2" if which == "w1" else "F"
        f_axis = dims.index(f_letter) if f_letter in dims else None
        return which, e_axis, f_axis
    dense = any(("dense" in p or "shared" in p) for p in parts[:-1]) or "shared" in tokens
    expert = not dense and bool(num_experts) and len(shape) >= 3 and shape[-3] == num_experts
    return which, (len(shape) - 3 if expert else None), (len(shape) - 1 if which == "w1" else len(shape) - 2)


def ffn_sharding_for(path: str, shape: Sequence[int], mesh: Mesh,
                     num_experts: Optional[int]) -> NamedSharding:
    """Placement of one FFN leaf on the weights mesh (rules in the module docstring)."""
    shape = tuple(int(s) for s in shape)
    if "expert" not in mesh.axis_names:
        raise ValueError(f"mesh must have an 'expert' axis (axes: {mesh.axis_names})")
    n = mesh.shape["expert"]
    spec = [None] * len(shape)
    which, e_axis, f_axis = _ffn_axes(path, shape, num_experts)
    if which is None or n == 1:
        return NamedSharding(mesh, PartitionSpec(*spec))
    if e_axis is not None and shape[e_axis] % n == 0 and shape[e_axis] >= n:
        spec[e_axis] = "expert"
    elif f_axis is not None:
        f = shape[f_axis]
        if which == "w1":
            if f % 2:
                raise ValueError(f"FFN leaf {path!r}: the 2F axis of w1 must be even, got shape {shape}")
            f //= 2
        if f % n == 0:
            spec[f_axis] = "expert"
    return NamedSharding(mesh, PartitionSpec(*spec))


def interleave_gate_up(w1, num_shards: int):
    """[..., D, 2F] stacked [gate | up] -> block i of the 2F axis = [gate_i | up_i] (F/n each)."""
    f2 = w1.shape[-1]
    if f2 % (2 * num_shards):
        raise ValueError(f"w1's 2F axis ({f2}) must split into {num_shards} gate/up pairs")
    f = f2 // 2
    gate = w1[..., :f].reshape(*w1.shape[:-1], num_shards, f // num_shards)
    up = w1[..., f:].reshape(*w1.shape[:-1], num_shards, f // num_shards)
    xp = np if isinstance(w1, np.ndarray) else jax.numpy
    return xp.concatenate([gate, up], axis=-1).reshape(w1.shape)


def deinterleave_gate_up(w1, num_shards: int):
    """Inverse of `interleave_gate_up`."""
    f2 = w1.shape[-1]
    if f2 % (2 * num_shards):
        raise ValueError(f"w1's 2F axis ({f2}) must split into {num_shards} gate/up pairs")
    blocks = w1.reshape(*w1.shape[:-1], num_shards, f2 // num_shards)
    half = f2 // num_shards // 2
    gate = blocks[..., :half].reshape(*w1.shape[:-1], f2 // 2)
    up = blocks[..., half:].reshape(*w1.shape[:-1], f2 // 2)
    xp = np if isinstance(w1, np.ndarray) else jax.numpy
    return xp.concatenate([gate, up], axis=-1)


def ffn_sharding_fn(mesh: Mesh, num_experts: Union[int, dict, None]):
    """A `WeightsPool` sharding_fn placing FFN leaves by `ffn_sharding_for`.

    num_experts: one count for every model, or {model_name: count} (None/0: dense model).
    """
    def fn(model: str, path: str, shape: tuple) -> NamedSharding:
        if isinstance(num_experts, dict):
            if model not in num_experts:
                raise ValueError(f"ffn_sharding_fn: no expert count for model {model!r} "
                                 f"(known: {sorted(num_experts)})")
            return ffn_sharding_for(path, shape, mesh, num_experts[model])
        return ffn_sharding_for(path, shape, mesh, num_experts)
    return fn


def replicated_sharding_fn(mesh: Mesh):
    """A `WeightsPool` sharding_fn replicating every leaf over `mesh` (e.g. attention weights on
    the KV devices)."""
    def fn(model: str, path: str, shape: tuple) -> NamedSharding:
        return NamedSharding(mesh, PartitionSpec())
    return fn
