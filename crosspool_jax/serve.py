"""`python -m crosspool_jax.serve`: the OpenAI-compatible HTTP server for many models on one port.

    python -m crosspool_jax.serve --model mixtral-tiny=/path/to/hf_dir --model olmoe-tiny=/p2
        --host 127.0.0.1 --port 8000 --dtype float32 --kv_pool_bytes 2GiB   (one command line)

With no --model it serves every model folder (one holding config.json) under the repository's
checkpoints/. absl flags are mapped into `LLMEngine.from_options` keywords in one place,
`serving_flags.engine_options()`; only flags given on the command line are passed, so the engine's own
defaults apply to the rest. SIGTERM (or Ctrl-C) stops accepting connections, lets in-flight
requests finish for up to --shutdown_timeout_s, aborts the rest, and exits 0.
"""
from __future__ import annotations

import logging
import signal
import sys

from absl import app, flags

from crosspool_jax.model_specs import models_from_specs, parse_models, shipped_models  # noqa: F401 (re-exported)
from crosspool_jax import serving_flags
from crosspool_jax.serving_flags import (engine_options, flag_values, parse_bytes,  # noqa: F401 (re-exported)
                                         parse_devices, use_compilation_cache)

FLAGS = flags.FLAGS
flags.adopt_module_key_flags(serving_flags)     # --help lists them with the server's own

# --model, the engine options, --max_queue and --compilation_cache_dir: crosspool_jax/serving_flags.py
flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
flags.DEFINE_integer("port", 8000, "Port to listen on.")
flags.DEFINE_string("api_key", None, "If set, /v1/* requests need 'Authorization: Bearer KEY'.")
flags.DEFINE_float("shutdown_timeout_s", 30.0, "On SIGTERM, how long in-flight requests may "
                   "run before they are aborted.", lower_bound=0.0)
flags.DEFINE_bool("warmup", True, "Before accepting requests, compile every step program a "
                  "request can need (every shape of every model's menu, every sampling variant), so "
                  "nothing compiles while serving.")
flags.DEFINE_enum("log_level", "info", ["debug", "info", "warning", "error"],
                  "Log level of the server and of uvicorn.")


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
        options = engine_options(flag_values())
    except ValueError as e:
        raise app.UsageError(str(e))
    if not models:
        raise app.UsageError("no models: pass --model NAME=PATH (no model folder found under "
                             "checkpoints/)")

    import uvicorn  # noqa: PLC0415 - keep --help fast

    use_compilation_cache(FLAGS.compilation_cache_dir)

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
