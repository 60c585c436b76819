"""The OpenAI-compatible HTTP server: `build_app` over an `AsyncEngine` (the engine's own
thread), `ServerConfig` (options and limits), `ServerMetrics` (Prometheus), request models in
`protocol`, bodies in `responses` and `generation`, `GracefulServer` (shutdown) in `lifecycle`.
`python -m crosspool_jax.serve` is the binary."""
from crosspool_jax.server.app import build_app
from crosspool_jax.server.async_engine import AsyncEngine, Overloaded, StreamEvent, SubRequest
from crosspool_jax.server.config import ServerConfig
from crosspool_jax.server.lifecycle import GracefulServer
from crosspool_jax.server.metrics import ServerMetrics
from crosspool_jax.server.protocol import ApiError

__all__ = ["ApiError", "AsyncEngine", "GracefulServer", "Overloaded", "ServerConfig", "ServerMetrics",
           "StreamEvent", "SubRequest", "build_app"]
