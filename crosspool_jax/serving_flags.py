"""The absl flags of the serving stack that the server and the trace benchmark share.

Importing this module defines them (absl flags are process-wide): `--model NAME=PATH`
(repeatable), every engine option the server exposes, `--max_queue` (the `AsyncEngine`'s
bound) and `--compilation_cache_dir`. `engine_options(flag_values())` maps the given ones
into `LLMEngine.from_options` keywords; flags left unset are not passed, so the engine's own
defaults apply. `python -m crosspool_jax.serve` and `python -m crosspool_jax.bench.trace run`
both read them here, so the same command-line options configure both.
"""
from __future__ import annotations

import os
import re
from typing import Optional, Union

from absl import flags

FLAGS = flags.FLAGS

flags.DEFINE_multi_string("model", [], "A served model as NAME=PATH (repeatable). PATH is a "
                          "Hugging Face model folder or an orbax checkpoint. None: every model "
                          "folder under the repository's checkpoints/.")
flags.DEFINE_string("dtype", None, "Engine dtype (e.g. bfloat16, float32); default: the engine's.")
flags.DEFINE_enum("mode", None, ["crosspool", "shared", "static"],
                  "Memory mode: crosspool (weights pool + KV pool), shared (kvcached-style "
                  "elastic shared KV), static (per-model KV reservation).")
flags.DEFINE_string("kv_devices", None, "KV-pool devices: a count (2) or device indices (0,1).")
flags.DEFINE_string("weight_devices", None, "Weights-pool devices: a count or device indices.")
flags.DEFINE_string("kv_pool_bytes", None, "KV pool budget in bytes (suffixes K/M/G/KiB/MiB/GiB).")
flags.DEFINE_string("weights_pool_bytes", None, "Weights pool budget in bytes; beyond it, "
                    "parameter pytrees are swapped to host memory.")
flags.DEFINE_string("attention_pool_bytes", None, "Budget of the attention side (embeddings, "
                    "attention weights) on the KV device; beyond it, swapped to host memory.")
flags.DEFINE_integer("max_model_len", None, "Context length cap for every model.")
flags.DEFINE_integer("max_num_seqs", None, "Most sequences in one engine step.")
flags.DEFINE_integer("max_num_batched_tokens", None, "Most tokens in one engine step.")
flags.DEFINE_integer("max_decode_steps", None, "Most tokens a decode-only step samples per "
                     "sequence on the device (multi-step decode); 1 turns it off.")
flags.DEFINE_integer("seed", None, "Engine seed for requests that give none (in `bench.trace "
                     "generate/sweep`: the trace's seed, default 0).")
flags.DEFINE_integer("max_queue", 1024, "Most unfinished requests the async engine holds; beyond "
                     "it new requests are refused (HTTP 429 from the server).", lower_bound=1)
flags.DEFINE_string("compilation_cache_dir", os.path.join(os.path.expanduser("~"), ".cache", "crosspool_jax",
                                                          "jax_cache"), "JAX persistent compilation cache folder ('' turns it off): "
                    "compiled step programs are kept there and reused by the next start.")

ENGINE_FLAGS = ("dtype", "mode", "kv_devices", "weight_devices", "kv_pool_bytes", "weights_pool_bytes",
                "attention_pool_bytes", "max_model_len", "max_num_seqs", "max_num_batched_tokens",
                "max_decode_steps", "seed")

_BYTES_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_bytes(text: str, *, name: str) -> int:
    """'1073741824', '512MiB', '2G', '1.5GiB' -> bytes (K/M/G/T and KiB/MiB/... are powers of 1024,
    KB/MB/... of 1000)."""
    m = _BYTES_RE.match(text)
    if not m:
        raise ValueError(f"--{name}: cannot read {text!r} as a byte count (e.g. 4GiB, 512MB)")
    number, unit, suffix = float(m.group(1)), m.group(2).lower(), m.group(3).lower()
    power = "kmgt".index(unit) + 1 if unit else 0
    base = 1000 if suffix == "b" and unit else 1024
    return int(number * base ** power)


def parse_devices(text: str, *, name: str) -> Union[int, list[int]]:
    """'2' -> 2 (a count); '0,1' -> [0, 1] (device indices)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or not all(p.isdigit() for p in parts):
        raise ValueError(f"--{name}: expected a count (2) or device indices (0,1), got {text!r}")
    if len(parts) == 1 and "," not in text:
        return int(parts[0])
    return [int(p) for p in parts]


def engine_options(values: dict) -> dict:
    """Flag values (None = not given) -> `LLMEngine.from_options` keywords. The one mapping."""
    options = {}
    for key in ("dtype", "mode", "max_model_len", "max_num_seqs", "max_num_batched_tokens",
                "max_decode_steps", "seed"):
        if values.get(key) is not None:
            options[key] = values[key]
    for key in ("kv_devices", "weight_devices"):
        if values.get(key) is not None:
            options[key] = parse_devices(values[key], name=key)
    for key in ("kv_pool_bytes", "weights_pool_bytes", "attention_pool_bytes"):
        if values.get(key) is not None:
            options[key] = parse_bytes(values[key], name=key)
    return options


def flag_values() -> dict:
    """The engine flags' current values (None where not given)."""
    return {name: FLAGS[name].value for name in ENGINE_FLAGS}


def use_compilation_cache(folder: Optional[str]) -> None:
    """Point JAX's persistent compilation cache at `folder` (nothing when None)."""
    if not folder:
        return
    import jax  # noqa: PLC0415 - keep --help fast

    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
