"""Orbax checkpoints of our param pytrees: `convert` a Hugging Face folder, `restore` with shardings.

Layout of a converted folder:
    crosspool_orbax.json   marker: {"format": "crosspool-orbax", "version": 1, "dtype": ...}
    params/                orbax StandardCheckpointer tree {"kv": kv_params, "ffn": ffn_params}
    config.json, generation_config.json, tokenizer files   copied from the source
`load_model` recognises the marker and calls `restore`.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax.traverse_util import flatten_dict, unflatten_dict

from crosspool_jax.checkpoints.errors import CheckpointError
from crosspool_jax.checkpoints.loader import (ORBAX_MARKER, LoadedModel, Placement, load_hf_params,
                                              parse_dtype, read_config, read_generation_config,
                                              resolve_placement)
from crosspool_jax.checkpoints.safetensors_io import SafetensorsSet
from crosspool_jax.checkpoints.tokenizer import load_tokenizer
from crosspool_jax.models import param_shapes

FORMAT = "crosspool-orbax"
VERSION = 1
COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "chat_template.jinja")
_ST_TO_DTYPE = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def _source_dtype(src: str) -> str:
    """The checkpoint's own float dtype when all tensors share one we support, else float32."""
    st = SafetensorsSet(src)
    kinds = {st.info(name)[0] for name in st.keys()}
    return _ST_TO_DTYPE[kinds.pop()] if len(kinds) == 1 and next(iter(kinds)) in _ST_TO_DTYPE else "float32"


def convert(src_hf_dir: str, dst_dir: str, *, dtype: Optional[str] = None) -> str:
    """Write an orbax folder from a Hugging Face folder (params staged on the host CPU).

    dtype None keeps the checkpoint's own dtype. Refuses to overwrite a non-empty dst_dir.
    """
    src_hf_dir, dst_dir = os.fspath(src_hf_dir), os.path.abspath(os.fspath(dst_dir))
    _, config = read_config(src_hf_dir)
    dtype = parse_dtype(dtype or _source_dtype(src_hf_dir)).name
    if os.path.isdir(dst_dir) and os.listdir(dst_dir):
        raise CheckpointError(f"destination {dst_dir} exists and is not empty")
    os.makedirs(dst_dir, exist_ok=True)
    cpu = jax.devices("cpu")[0]
    kv_params, ffn_params = load_hf_params(src_hf_dir, config, dtype=dtype, kv_placement=cpu,
                                           ffn_placement=cpu)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(dst_dir, "params"), {"kv": kv_params, "ffn": ffn_params})
        ckptr.wait_until_finished()
    for name in COPIED_FILES:
        if os.path.exists(os.path.join(src_hf_dir, name)):
            shutil.copyfile(os.path.join(src_hf_dir, name), os.path.join(dst_dir, name))
    with open(os.path.join(dst_dir, ORBAX_MARKER), "w") as f:
        json.dump({"format": FORMAT, "version": VERSION, "dtype": dtype,
                   "source": os.path.abspath(src_hf_dir)}, f, indent=1)
    return dst_dir


def _as_sharding(target) -> jax.sharding.Sharding:
    if target is None:
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if isinstance(target, jax.Device):
        return jax.sharding.SingleDeviceSharding(target)
    if isinstance(target, jax.sharding.Sharding):
        return target
    raise ValueError(f"a placement callable must return a Sharding or Device, got {target!r}")


def _abstract_tree(shapes: dict, dtype, placement: Placement) -> dict:
    """The nested shapes dict as `jax.ShapeDtypeStruct`s, each placed by its "a/b/c" path."""
    return unflatten_dict({
        path: jax.ShapeDtypeStruct(shape, dtype,
                                   sharding=_as_sharding(resolve_placement(placement, "/".join(path), shape)))
        for path, shape in flatten_dict(shapes).items()})


def restore(path: str, *, dtype="bfloat16", kv_placement: Placement = None,
            ffn_placement: Placement = None, name: Optional[str] = None) -> LoadedModel:
    """Restore a converted folder straight into the target dtype and shardings."""
    path = os.fspath(path)
    marker_path = os.path.join(path, ORBAX_MARKER)
    try:
        with open(marker_path) as f:
            marker = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read orbax marker {marker_path}: {e}") from e
    if marker.get("format") != FORMAT or marker.get("version") != VERSION:
        raise CheckpointError(f"{marker_path}: unknown format {marker.get('format')!r} "
                              f"version {marker.get('version')!r} (expected {FORMAT!r} {VERSION})")
    params_dir = os.path.join(path, "params")
    if not os.path.isdir(params_dir):
        raise CheckpointError(f"missing {params_dir}: the orbax params of this checkpoint")
    np_dtype = parse_dtype(dtype)
    _, config = read_config(path)
    kv_shapes, ffn_shapes = param_shapes(config)
    target = {"kv": _abstract_tree(kv_shapes, np_dtype, kv_placement),
              "ffn": _abstract_tree(ffn_shapes, np_dtype, ffn_placement)}
    with ocp.StandardCheckpointer() as ckptr:
        try:
            params = ckptr.restore(params_dir, target)
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{params_dir} does not match {os.path.join(path, 'config.json')}: {e}") from e
    for leaf, want in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(target)):
        if leaf.shape != want.shape or np.dtype(leaf.dtype) != np_dtype:
            raise CheckpointError(f"{params_dir}: restored leaf {leaf.shape} {leaf.dtype} != expected "
                                  f"{want.shape} {np_dtype}")
    return LoadedModel(name=name or os.path.basename(os.path.normpath(path)), path=path, config=config,
                       kv_params=params["kv"], ffn_params=params["ffn"],
                       generation_config=read_generation_config(path), tokenizer=load_tokenizer(path))
