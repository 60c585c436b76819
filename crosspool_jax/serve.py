"""crosspool-serve: an OpenAI-compatible HTTP server for many Mixture-of-Experts models on one port.

    crosspool-serve --model mixtral=/path/to/hf_dir --model olmoe=/path/to/other --port 8000
    (or: python -m crosspool_jax.serve ...)

Every model is served from one engine: one global paged KV pool, a weights pool that swaps
cold models' expert weights to host memory, routing by the request's "model" field. Routes:
/v1/completions, /v1/chat/completions (streaming by server-sent events), /v1/models,
/tokenize, /detokenize, /version, /health and /metrics (Prometheus). With no --model it
serves the small models shipped in the repository's checkpoints/.

SIGTERM or Ctrl-C stops accepting connections and lets open requests finish for up to
--shutdown_timeout_s; then each gets an error (a stream an error event and [DONE]) and the
process exits 0. During start-up (loading, warm-up) it exits at once.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import time
from typing import Optional

from absl import flags

from crosspool_jax import config_flags
from crosspool_jax.config_flags import parse_bytes, parse_devices  # noqa: F401 (re-exported)
from crosspool_jax.engine.config import EngineConfig
from crosspool_jax.model_specs import models_from_specs, parse_models, shipped_models  # noqa: F401 (re-exported)
from crosspool_jax.server.config import ServerConfig

PROG = "crosspool-serve"
FLAGS = flags.FlagValues()
flags.DEFINE_multi_string("model", [], "A served model as NAME=PATH. PATH is a Hugging Face model folder or "
                          "an orbax checkpoint written by `python -m crosspool_jax.checkpoints convert`. Unset: "
                          "every model folder under the repository's checkpoints/.",
                          flag_values=FLAGS)
SERVER_FLAGS = config_flags.define_flags(ServerConfig, flag_values=FLAGS)
ENGINE_FLAGS = config_flags.define_flags(EngineConfig, skip=("models",), flag_values=FLAGS)


def help_text() -> str:
    return config_flags.format_help(
        f"{PROG} [--model NAME=PATH ...] [options]", __doc__.split("\n\n", 1)[0] + "\n\n" +
        __doc__.split("\n\n", 2)[2],
        [("Models", ["model"]), ("Server options", SERVER_FLAGS), ("Engine options", ENGINE_FLAGS)], FLAGS)


def engine_options(flag_values=FLAGS) -> dict:
    """The engine flags given on the command line as `EngineConfig` keywords (the engine's own
    defaults apply to the rest)."""
    return config_flags.config_kwargs(EngineConfig, skip=("models",), flag_values=flag_values,
                                      only_present=True)


def server_config(flag_values=FLAGS) -> ServerConfig:
    return ServerConfig(**config_flags.config_kwargs(ServerConfig, flag_values=flag_values))


def warm_up(engine, *, progress: bool = False, variants=None) -> dict:
    """Compile every program the engine may run while serving (`LLMEngine.warm_up`, `variants`
    as there), with a progress bar over the models; returns the engine's summary (programs,
    compiles, seconds)."""
    bar = None
    if progress:
        from tqdm.auto import tqdm  # noqa: PLC0415
        bar = tqdm(total=len(engine.model_names), desc="warm-up", unit="model")

    def done(name, _i, _total):
        if bar is not None:
            bar.set_postfix_str(name)
            bar.update(1)

    try:
        return engine.warm_up(progress=done, variants=variants)
    finally:
        if bar is not None:
            bar.close()


def _exit_during_start_up(signum, _frame):
    # Nothing is in flight while models load or compile; leaving at once avoids unwinding
    # through XLA's compiler threads (which can crash the interpreter on the way out).
    name = signal.Signals(signum).name
    os.write(2, f"{PROG}: {name} during start-up; exiting\n".encode())
    os._exit(0 if signum == signal.SIGTERM else 128 + signum)


def main(argv: Optional[list[str]] = None) -> int:
    config_flags.parse_command_line(FLAGS, list(sys.argv if argv is None else argv), prog=PROG,
                                    help_text=help_text)
    signal.signal(signal.SIGTERM, _exit_during_start_up)
    signal.signal(signal.SIGINT, _exit_during_start_up)
    try:
        server = server_config()
        api_key = server.resolved_api_key()
        models = models_from_specs(FLAGS.model)
        options = engine_options()
        EngineConfig(models=models, **options)          # every option checked before anything loads
    except ValueError as e:
        config_flags.usage_error(PROG, str(e))
    level = getattr(logging, server.log_level.upper())
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level)
    log = logging.getLogger("crosspool_jax.serve")

    import uvicorn  # noqa: PLC0415 - keep --help fast

    from crosspool_jax.runtime.compiles import prefer_fast_cpu_compiles, use_compilation_cache  # noqa: PLC0415

    if prefer_fast_cpu_compiles():                      # before JAX starts its backends
        log.info("CPU run: XLA_FLAGS=%s (faster compiles)", os.environ["XLA_FLAGS"])
    use_compilation_cache(server.compilation_cache_dir)

    from crosspool_jax.engine import LLMEngine  # noqa: PLC0415
    from crosspool_jax.server import AsyncEngine, GracefulServer, ServerMetrics, build_app  # noqa: PLC0415

    log.info("loading %d model(s): %s; engine options %s", len(models),
             ", ".join(f"{k}={v}" for k, v in models.items()), options)
    t0 = time.perf_counter()
    try:
        engine = LLMEngine.from_options(models, **options)
    except ValueError as e:  # a bad checkpoint: say which, without a traceback
        config_flags.usage_error(PROG, f"cannot start the engine: {e}")
    log.info("loaded in %.1f s", time.perf_counter() - t0)
    if server.warmup:
        log.info("warm-up: compiling every step program of each model (--nowarmup skips this; the "
                 "compilation cache in %s makes the next start fast)", server.compilation_cache_dir or "(off)")
        done = warm_up(engine, progress=level <= logging.INFO)
        log.info("warm-up: %d programs, %d compiles, %.1f s", done["programs"], done["compiles"], done["seconds"])
    metrics = ServerMetrics()
    async_engine = AsyncEngine(engine, metrics=metrics, max_queue=server.max_queue)
    web = build_app(async_engine, metrics, server)
    config = uvicorn.Config(web, host=server.host, port=server.port, log_level=server.log_level,
                            lifespan="on")
    http = GracefulServer(config, grace_s=server.shutdown_timeout_s, on_grace_expired=async_engine.stop)
    # uvicorn handles SIGTERM/SIGINT itself (graceful shutdown), then restores these handlers and
    # re-raises the signal into them: no-ops, so the process ends normally with status 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    signal.signal(signal.SIGINT, lambda *_: None)
    log.info("serving %s on http://%s:%d%s", ", ".join(async_engine.model_names), server.host,
             server.port, " (API key required)" if api_key else "")
    http.run()
    async_engine.shutdown()
    log.info("server stopped")
    return 0


def run() -> None:
    """The `crosspool-serve` console command."""
    sys.exit(main())


if __name__ == "__main__":
    run()
