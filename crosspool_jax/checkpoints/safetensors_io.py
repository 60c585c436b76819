"""Read-only, memory-mapped safetensors access: one file or a sharded set with an index.

The header is parsed directly (8-byte little-endian length, then JSON) so that every dtype,
bfloat16 included, comes back as a numpy view of the mapped file without a copy; a tensor is
only read when `get` is called and the caller copies it into its destination.
"""
from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

from crosspool_jax.checkpoints.errors import CheckpointError

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
INDEX_NAME = "model.safetensors.index.json"


class SafetensorsFile:
    """One .safetensors file: names, (dtype, shape) per name, zero-copy reads."""

    def __init__(self, path: str):
        self.path = path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > size - 8:
                    raise CheckpointError(f"safetensors header of {path} claims {n} bytes but the file "
                                          f"has {size} bytes: the file is truncated or not safetensors")
                header = json.loads(f.read(n))
        except (OSError, struct.error, ValueError) as e:
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"cannot read safetensors header of {path}: {e}") from e
        if not isinstance(header, dict):
            raise CheckpointError(f"safetensors header of {path} is not a JSON object")
        header.pop("__metadata__", None)
        data_size = size - 8 - n
        for name, entry in header.items():
            _check_entry(path, name, entry, data_size)
        self._header = header
        self._data_start = 8 + n
        self._mmap = None

    def keys(self) -> list[str]:
        return list(self._header)

    def info(self, name: str) -> tuple[str, tuple]:
        entry = self._header[name]
        return entry["dtype"], tuple(entry["shape"])

    def get(self, name: str) -> np.ndarray:
        dtype_name, shape = self.info(name)
        if dtype_name not in _DTYPES:
            raise CheckpointError(f"tensor {name!r} in {self.path} has unknown dtype {dtype_name}")
        start, stop = self._header[name]["data_offsets"]
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        raw = self._mmap[self._data_start + start:self._data_start + stop]
        return raw.view(_DTYPES[dtype_name]).reshape(shape)


def _check_entry(path: str, name: str, entry, data_size: int) -> None:
    """One tensor's header entry: known dtype, shape, and a byte range inside the file that
    holds exactly shape x itemsize bytes."""
    def bad(why):
        raise CheckpointError(f"tensor {name!r} in {path}: {why}")

    if not isinstance(entry, dict):
        bad("header entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in _DTYPES:
        bad(f"unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        bad(f"shape {shape!r} is not a list of sizes")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets) or not 0 <= offsets[0] <= offsets[1]):
        bad(f"data_offsets {offsets!r} are not [start, end]")
    if offsets[1] > data_size:
        bad(f"its data ends at byte {offsets[1]} but the file holds {data_size} data bytes: "
            "the file is truncated")
    expected = int(np.prod(shape, dtype=np.int64)) * _DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != expected:
        bad(f"{offsets[1] - offsets[0]} data bytes for shape {tuple(shape)} of {dtype} "
            f"({expected} expected)")


def _inside(folder: str, name) -> str:
    """The path of an index's weights file, which must lie inside the checkpoint folder."""
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{INDEX_NAME} in {folder}: weight_map values must be file names, got {name!r}")
    root = os.path.realpath(folder)
    path = os.path.realpath(os.path.join(folder, name))
    if os.path.commonpath([root, path]) != root:
        raise CheckpointError(f"{INDEX_NAME} in {folder} points to {name!r}, outside the checkpoint folder")
    return name


class SafetensorsSet:
    """All weights of a Hugging Face folder: model.safetensors, or shards listed by the index."""

    def __init__(self, folder: str):
        index_path = os.path.join(folder, INDEX_NAME)
        if os.path.exists(index_path):
            try:
                with open(index_path) as f:
                    weight_map = json.load(f)["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise CheckpointError(f"cannot read weight_map from {index_path}: {e}") from e
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"weight_map in {index_path} is not an object")
            files = sorted({_inside(folder, name) for name in weight_map.values()})
            for name in files:
                if not os.path.exists(os.path.join(folder, name)):
                    raise CheckpointError(f"weights file {name} listed in {index_path} is missing")
        else:
            files = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
            if not files:
                raise CheckpointError(f"no *.safetensors weights found in {folder}")
        self.files = {name: SafetensorsFile(os.path.join(folder, name)) for name in files}
        self._where = {}
        for fname, st in self.files.items():
            for key in st.keys():
                if key in self._where:
                    raise CheckpointError(f"tensor {key!r} appears in both {self._where[key]} and {fname}")
                self._where[key] = fname

    def keys(self) -> list[str]:
        return list(self._where)

    def file_of(self, name: str) -> str:
        return self._where[name]

    def info(self, name: str) -> tuple[str, tuple]:
        return self.files[self._where[name]].info(name)

    def get(self, name: str) -> np.ndarray:
        return self.files[self._where[name]].get(name)
