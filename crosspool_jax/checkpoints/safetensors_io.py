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
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
        except (OSError, struct.error, ValueError) as e:
            raise CheckpointError(f"cannot read safetensors header of {path}: {e}") from e
        header.pop("__metadata__", None)
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
            files = sorted(set(weight_map.values()))
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
