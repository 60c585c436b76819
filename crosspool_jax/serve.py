"""`python -m crosspool_jax.serve`: the OpenAI-compatible HTTP server for many models on one port.

    python -m crosspool_jax.serve --model mixtral-tiny=/path/to/hf_dir --model olmoe-tiny=/p2
        --host 127.0.0.1 --port 8000 --dtype float32 --kv_pool_bytes 2GiB   (one command line)

With no --model it serves every model folder (one holding config.json) under the repository's
checkpoints/. absl flags are mapped into `LLMEngine.from_options` keywords in one place,
`engine_options()`; only flags given on the command line are passed, so the engine's own
defaults apply to the rest. SIGTERM (or Ctrl-C) stops accepting connections, lets in-flight
requests finish for up to --shutdown_timeout_s, aborts the rest, and exits 0.
"""
from __future__ import annotations

import logging
import re
import os
import signal
import sys
from typing import Union

from absl import app, flags

from crosspool_jax.model_specs import models_from_specs, parse_models, shipped_models  # noqa: F401 (re-exported)

FLAGS = flags.FLAGS

flags.DEFINE_multi_string("model", [], "A served model as NAME=PATH (repeatable). PATH is a "
                          "Hugging Face model folder or an orbax checkpoint. None: every model "
                          "folder under the repository's checkpoints/.")
flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
flags.DEFINE_integer("port", 8000, "Port to listen on.")
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
flags.DEFINE_integer("seed", None, "Engine seed for requests that give none.")
flags.DEFINE_integer("max_queue", 1024, "Most unfinished requests the server holds; beyond "
                     "it new requests get HTTP 429.", lower_bound=1)
flags.DEFINE_string("api_key", None, "If set, /v1/* requests need 'Authorization: Bearer KEY'.")
flags.DEFINE_float("shutdown_timeout_s", 30.0, "On SIGTERM, how long in-flight requests may "
                   "run before they are aborted.", lower_bound=0.0)
flags.DEFINE_bool("warmup", True, "Before accepting requests, compile every step program a "
                  "request can need (every shape of every model's menu, every sampling variant), so "
                  "nothing compiles while serving.")
flags.DEFINE_string("compilation_cache_dir", os.path.join(os.path.expanduser("~"), ".cache", "crosspool_jax",
                                                          "jax_cache"),
                    "JAX persistent compilation cache folder: compiled step programs are kept there "
                    "and reused by the next start ('' turns it off).")
flags.DEFINE_enum("log_level", "info", ["debug", "info", "warning", "error"],
                  "Log level of the server and of uvicorn.")

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


def _flag_values() -> dict:
    return {name: FLAGS[name].value for name in (
        "dtype", "mode", "kv_devices", "weight_devices", "kv_pool_bytes", "weights_pool_bytes",
        "attention_pool_bytes", "max_model_len", "max_num_seqs", "max_num_batched_tokens",
        "max_decode_steps", "seed")}


def warm_up(engine, log) -> dict:
    """Compile every program the engine may run while serving (`LLMEngine.warm_up`), logging
    each model as it is done; returns the engine's summary."""
    import time  # noqa: PLC0415
    t0 = time.perf_counter()

    def progress(name, done, total):
        log.info("warm-up: %s ready (%d/%d models, %.1f s)", name, done, total, time.perf_counter() - t0)

    return engine.warm_up(progress=progress)


def _exit_now(signum, _frame):
    raise SystemExit(0)


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    level = getattr(logging, FLAGS.log_level.upper())
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level)
    log = logging.getLogger("crosspool_jax.serve")
    # Nothing is in flight while the models load: a SIGTERM then simply exits 0.
    signal.signal(signal.SIGTERM, _exit_now)

    try:
        models = models_from_specs(FLAGS.model)
        options = engine_options(_flag_values())
    except ValueError as e:
        raise app.UsageError(str(e))
    if not models:
        raise app.UsageError("no models: pass --model NAME=PATH (no model folder found under "
                             "checkpoints/)")

    import uvicorn  # noqa: PLC0415 - keep --help fast

    if FLAGS.compilation_cache_dir:
        import jax  # noqa: PLC0415
        jax.config.update("jax_compilation_cache_dir", FLAGS.compilation_cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

    from crosspool_jax.engine import LLMEngine  # noqa: PLC0415
    from crosspool_jax.server import AsyncEngine, ServerMetrics, build_app  # noqa: PLC0415

    log.info("loading %d model(s): %s; engine options %s", len(models),
             ", ".join(f"{k}={v}" for k, v in models.items()), options)
    try:
        engine = LLMEngine.from_options(models, **options)
    except ValueError as e:  # a bad option or checkpoint: say which, without a traceback
        raise app.UsageError(f"cannot start the engine: {e}")
    if FLAGS.warmup:
        log.info("warm-up: compiling every step program of %d model(s) (a persistent compilation cache "
                 "makes the next start fast: --compilation_cache_dir)", len(models))
        done = warm_up(engine, log)
        log.info("warm-up: %d programs, %d compiles, %.1f s", done["programs"], done["compiles"], done["seconds"])
    metrics = ServerMetrics()
    async_engine = AsyncEngine(engine, metrics=metrics, max_queue=FLAGS.max_queue)
    web = build_app(async_engine, metrics, api_key=FLAGS.api_key)
    config = uvicorn.Config(web, host=FLAGS.host, port=FLAGS.port, log_level=FLAGS.log_level,
                            lifespan="on", timeout_graceful_shutdown=FLAGS.shutdown_timeout_s)
    server = uvicorn.Server(config)
    # uvicorn handles SIGTERM/SIGINT itself (graceful shutdown), then restores these handlers and
    # re-raises the signal into them: no-ops, so the process ends normally with status 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    signal.signal(signal.SIGINT, lambda *_: None)
    log.info("serving %s on http://%s:%d", ", ".join(async_engine.model_names), FLAGS.host,
             FLAGS.port)
    server.run()
    async_engine.shutdown()
    log.info("server stopped")
    return 0


def run() -> None:
    app.run(main)


if __name__ == "__main__":
    sys.exit(run())
