"""`EngineConfig`: every engine option in one validated tree (LLM keywords and server flags map here)."""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

import jax.numpy as jnp

MODES = ("crosspool", "shared", "static")
BACKENDS = ("auto", "reference", "gpu", "tpu")
DeviceSpec = Union[int, Sequence, None]


@dataclasses.dataclass
class EngineConfig:
    """Options of one engine serving many models.

    models: name -> checkpoint folder (Hugging Face or the project's orbax format).
    kv_pool_bytes: the global KV pool, K and V together, over all KV devices; None = a
      fraction (kv_memory_fraction) of the KV devices' free memory where the platform
      reports it, else 256 MiB per KV device.
    weights_pool_bytes: budget of the weights pool; beyond it, the least recently used
      models' FFN pytrees are swapped to host memory. None = no limit. Modes shared/static
      (and one device): a budget PER DEVICE (each device's pool holds the models placed on it).
      Mode crosspool with a device split: over ALL weight devices, as slots of the arena (each
      the size of the largest model's expert shards; disagg/residency.py).
    attention_pool_bytes: the same for the attention side (embeddings, attention weights,
      norms, lm head) on the KV devices (shared/static: per device; a crosspool split: over all
      KV devices, the replicated attention side counted once per device). None = no limit.
    max_model_len: cap on any model's context (prompt + output); None = each model's own.
    min_token_bucket: a step's tokens are padded to a power of two at least this; larger
      values mean fewer compiled step programs and more padding.
    """

    models: dict
    dtype: str = "bfloat16"
    mode: str = "crosspool"
    kv_devices: DeviceSpec = None
    weight_devices: DeviceSpec = None
    kv_pool_bytes: Optional[int] = None
    kv_memory_fraction: float = 0.5
    weights_pool_bytes: Optional[int] = None
    attention_pool_bytes: Optional[int] = None
    page_elems: Optional[int] = None
    max_model_len: Optional[int] = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_decode_steps: int = 8
    min_token_bucket: int = 16
    enable_prefix_caching: bool = True
    attention_backend: str = "auto"
    moe_backend: str = "auto"
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.models, dict) or not self.models:
            raise ValueError("EngineConfig.models must be a non-empty dict of name -> checkpoint path")
        for name in self.models:
            if not isinstance(name, str) or not name:
                raise ValueError(f"EngineConfig.models: model names must be non-empty strings, got {name!r}")
        try:
            self.dtype = jnp.dtype(self.dtype).name
        except TypeError as e:
            raise ValueError(f"EngineConfig.dtype: unknown dtype {self.dtype!r}") from e
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"EngineConfig.dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.mode not in MODES:
            raise ValueError(f"EngineConfig.mode must be one of {MODES}, got {self.mode!r}")
        for name in ("attention_backend", "moe_backend"):
            if getattr(self, name) not in BACKENDS:
                raise ValueError(f"EngineConfig.{name} must be one of {BACKENDS}, got {getattr(self, name)!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_decode_steps", "min_token_bucket"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be an integer >= 1, got {getattr(self, name)!r}")
        for name in ("kv_pool_bytes", "weights_pool_bytes", "attention_pool_bytes", "max_model_len", "page_elems"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"EngineConfig.{name} must be a positive integer or None, got {value!r}")
        for name in ("kv_devices", "weight_devices"):
            _check_devices(name, getattr(self, name))
        if not 0.0 < self.kv_memory_fraction <= 1.0:
            raise ValueError(f"EngineConfig.kv_memory_fraction must be in (0, 1], got {self.kv_memory_fraction}")


def _check_devices(name: str, spec) -> None:
    """None, a count >= 1, or a non-empty list of device indices (>= 0) or jax devices."""
    def is_int(x):
        return isinstance(x, int) and not isinstance(x, bool)

    if spec is None or (is_int(spec) and spec >= 1):
        return
    if isinstance(spec, (list, tuple)) and spec and all(
            (is_int(d) and d >= 0) or hasattr(d, "platform") for d in spec):
        return
    raise ValueError(f"EngineConfig.{name} must be None, a device count >= 1 or a non-empty list of "
                     f"device indices, got {spec!r}")
