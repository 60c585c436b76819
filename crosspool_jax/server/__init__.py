"""The OpenAI-compatible HTTP server: `build_app` over an `AsyncEngine` (the engine's own
thread), `ServerConfig` (options and limits), `ServerMetrics` (Prometheus), request models in
`protocol`, bodies in `responses` and `generation`, `GracefulServer` (shutdown) in `lifecycle`.
`python -m crosspool_jax.serve` is the binary."""
from crosspool_jax.lazy_exports import lazy_exports

# loaded on first use: `server.config` (the command line's flags and their `--help`) imports
# without the app, the engine or JAX
_EXPORTS = {"build_app": "app", "AsyncEngine": "async_engine", "Overloaded": "async_engine",
            "StreamEvent": "async_engine", "SubRequest": "async_engine", "ServerConfig": "config",
            "GracefulServer": "lifecycle", "ServerMetrics": "metrics", "ApiError": "protocol"}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
