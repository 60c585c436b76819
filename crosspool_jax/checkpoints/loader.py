"""`load_model`: a Hugging Face folder (or an orbax folder from our converter) -> `LoadedModel`.

Tensors stream one stacked leaf at a time: the leaf's numpy buffer is allocated once in the
target dtype, every checkpoint tensor that belongs to it is copied in (transposed, split into
gate | up columns, placed at its layer/expert index) straight from the memory-mapped file,
then the buffer goes to its placement and is dropped. Every name, shape and dtype is checked
against `tensor_slots` before any data is read. MXFP4-quantised tensors (NAME_blocks +
NAME_scales, GPT-OSS's released experts) are dequantised one tensor at a time as they are
read (`mxfp4.Mxfp4Tensors`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import unflatten_dict

from crosspool_jax.checkpoints.errors import CheckpointError
from crosspool_jax.checkpoints.hf_names import Slot, is_ignorable, tensor_slots
from crosspool_jax.checkpoints.mxfp4 import Mxfp4Tensors
from crosspool_jax.checkpoints.safetensors_io import FLOAT_DTYPES, SafetensorsSet
from crosspool_jax.checkpoints.tokenizer import Tokenizer, load_tokenizer
from crosspool_jax.models import ModelConfig, param_shapes

# None (default device), a Device, a Sharding, or (param_path, shape) -> Sharding.
# param_path is the path inside kv_params or ffn_params joined by "/", e.g. "attn/wq_LDQ".
Placement = Union[None, jax.Device, jax.sharding.Sharding, Callable[[str, tuple], Any]]
PARAM_DTYPES = ("float32", "bfloat16", "float16")
ORBAX_MARKER = "crosspool_orbax.json"
_MAX_LISTED = 8
_LAYER_RE = re.compile(r"\.layers\.(\d+)\.")


@dataclasses.dataclass
class LoadedModel:
    """A model ready to run: its config, the two param pytrees, generation defaults, tokenizer."""

    name: str
    path: str
    config: ModelConfig
    kv_params: dict
    ffn_params: dict
    generation_config: dict
    tokenizer: Optional[Tokenizer] = None

    @property
    def eos_token_ids(self) -> tuple:
        """EOS ids from config.json, generation_config.json and the tokenizer, deduplicated."""
        ids = list(self.config.eos_token_ids)
        gen = self.generation_config.get("eos_token_id")
        ids += gen if isinstance(gen, list) else ([gen] if gen is not None else [])
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        return tuple(dict.fromkeys(int(i) for i in ids))


def parse_dtype(dtype) -> np.dtype:
    """A parameter dtype name or object -> numpy dtype; ValueError naming `dtype` otherwise."""
    try:
        d = jnp.dtype(dtype)
    except TypeError:
        d = None
    if d is None or d.name not in PARAM_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not a supported parameter dtype (one of {PARAM_DTYPES})")
    return d


def resolve_placement(placement: Placement, param_path: str, shape: tuple):
    """The device_put target for one leaf (None means the default device)."""
    if placement is None or isinstance(placement, (jax.Device, jax.sharding.Sharding)):
        return placement
    if callable(placement):
        return placement(param_path, tuple(shape))
    raise ValueError(f"placement must be None, a jax.Device, a Sharding or a callable, got {placement!r}")


def read_config(path: str) -> tuple[dict, ModelConfig]:
    """(raw config.json dict, ModelConfig) of a folder, with errors naming the file."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint folder {path} does not exist")
    if not os.path.exists(config_path):
        raise CheckpointError(f"missing {config_path}: a checkpoint folder needs config.json")
    try:
        with open(config_path) as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot parse {config_path}: {e}") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{config_path}: must hold a JSON object")
    try:
        return raw, ModelConfig.from_hf_dict(raw)
    except (ValueError, TypeError, KeyError, AttributeError, ZeroDivisionError) as e:
        raise CheckpointError(f"{config_path}: {e}") from e


def read_generation_config(path: str) -> dict:
    gen_path = os.path.join(path, "generation_config.json")
    if not os.path.exists(gen_path):
        return {}
    try:
        with open(gen_path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot parse {gen_path}: {e}") from e


def _expected_hf_shape(slot: Slot, leaf_shape: tuple) -> tuple:
    rest = list(leaf_shape[len(slot.index):])
    if slot.cols is not None:
        rest[-1] = slot.cols[1] - slot.cols[0]
    return tuple(reversed(rest)) if slot.transpose else tuple(rest)


def _listing(names) -> str:
    names = sorted(names)
    more = f" (and {len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else ""
    return ", ".join(repr(n) for n in names[:_MAX_LISTED]) + more


def _leaf_shape(shapes: tuple[dict, dict], slot: Slot) -> tuple:
    node = shapes[0] if slot.tree == "kv" else shapes[1]
    for key in slot.path:
        node = node[key]
    return node


def check_tensors(st: SafetensorsSet | Mxfp4Tensors, config: ModelConfig, path: str) -> dict[str, Slot]:
    """Names, shapes and dtypes of the checkpoint against the config; returns the slots."""
    names = set(st.keys())
    layers = {int(m.group(1)) for m in map(_LAYER_RE.search, names) if m}
    if layers and config.num_layers > max(layers) + 1:    # before building a slot per tensor
        raise CheckpointError(f"{path}: config.json says num_hidden_layers={config.num_layers} but the "
                              f"weights hold layers 0..{max(layers)} only")
    slots = tensor_slots(config)
    missing = set(slots) - names
    if missing:
        raise CheckpointError(f"{path}: missing tensors {_listing(missing)} "
                              f"(expected for {config.architecture})")
    unexpected = {n for n in names - set(slots) if not is_ignorable(n, config)}
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensors {_listing(unexpected)} "
                              f"(not part of {config.architecture} with this config.json)")
    shapes = param_shapes(config)
    for name, slot in slots.items():
        dtype_name, shape = st.info(name)
        expected = _expected_hf_shape(slot, _leaf_shape(shapes, slot))
        if shape != expected:
            raise CheckpointError(f"tensor {name!r} in {st.file_of(name)} has shape {shape}, "
                                  f"expected {expected} from config.json")
        if dtype_name not in FLOAT_DTYPES:
            raise CheckpointError(f"tensor {name!r} in {st.file_of(name)} has dtype {dtype_name}, "
                                  f"which cannot be cast to a floating parameter dtype")
    return slots


def _fill(buf: np.ndarray, slot: Slot, tensor: np.ndarray) -> None:
    if slot.transpose:
        tensor = tensor.T
    if slot.interleaved:
        tensor = np.concatenate([tensor[..., 0::2], tensor[..., 1::2]], axis=-1)
    target = buf[slot.index] if slot.index else buf
    if slot.cols is not None:
        target[..., slot.cols[0]:slot.cols[1]] = tensor
    else:
        target[...] = tensor


def load_hf_params(path: str, config: ModelConfig, *, dtype="bfloat16",
                   kv_placement: Placement = None, ffn_placement: Placement = None):
    """(kv_params, ffn_params) from the safetensors of a Hugging Face folder, one leaf at a time."""
    np_dtype = parse_dtype(dtype)
    st = Mxfp4Tensors(SafetensorsSet(path))       # MXFP4 blocks + scales read as float32 tensors
    slots = check_tensors(st, config, path)
    shapes = param_shapes(config)
    by_leaf: dict[tuple, list[str]] = {}
    for name, slot in slots.items():
        by_leaf.setdefault((slot.tree, slot.path), []).append(name)
    flat = {"kv": {}, "ffn": {}}                  # leaf path tuple -> placed array, per tree
    for (tree, leaf_path), names in by_leaf.items():
        shape = _leaf_shape(shapes, slots[names[0]])
        buf = np.empty(shape, np_dtype)
        for name in names:
            _fill(buf, slots[name], st.get(name))
        placement = kv_placement if tree == "kv" else ffn_placement
        target = resolve_placement(placement, "/".join(leaf_path), shape)
        flat[tree][leaf_path] = jax.device_put(buf, target)
        del buf
    return unflatten_dict(flat["kv"]), unflatten_dict(flat["ffn"])


def load_model(path: str, *, dtype="bfloat16", kv_placement: Placement = None,
               ffn_placement: Placement = None, name: Optional[str] = None) -> LoadedModel:
    """Load a Hugging Face folder or an orbax folder written by `convert` (detected by its marker)."""
    path = os.fspath(path)
    if os.path.exists(os.path.join(path, ORBAX_MARKER)):
        from crosspool_jax.checkpoints.orbax_io import restore
        return restore(path, dtype=dtype, kv_placement=kv_placement, ffn_placement=ffn_placement,
                       name=name)
    parse_dtype(dtype)
    _, config = read_config(path)
    generation_config = read_generation_config(path)
    kv_params, ffn_params = load_hf_params(path, config, dtype=dtype, kv_placement=kv_placement,
                                           ffn_placement=ffn_placement)
    return LoadedModel(name=name or os.path.basename(os.path.normpath(path)), path=path, config=config,
                       kv_params=kv_params, ffn_params=ffn_params,
                       generation_config=generation_config, tokenizer=load_tokenizer(path))
