"""The OpenAI-compatible HTTP server: `build_app` over an `AsyncEngine` (the engine's own
thread), `ServerConfig` (options and limits), `ServerMetrics` (Prometheus), request models in
`protocol`, bodies in `responses` and `generation`, `GracefulServer` (shutdown) in `lifecycle`.
`python -m crosspool_jax.serve` is the binary."""
import importlib

_EXPORTS = {"build_app": "app", "AsyncEngine": "async_engine", "Overloaded": "async_engine",
            "StreamEvent": "async_engine", "SubRequest": "async_engine", "ServerConfig": "config",
            "GracefulServer": "lifecycle", "ServerMetrics": "metrics", "ApiError": "protocol"}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    """The exports load on first use (PEP 562): `server.config` (the command line's flags and
    their `--help`) imports without the app, the engine or JAX."""
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"crosspool_jax.server.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
