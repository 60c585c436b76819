"""The OpenAI-compatible HTTP server: `build_app` over an `AsyncEngine` (the engine's own
thread), `ServerMetrics` (Prometheus), request parsing in `protocol`, bodies in `responses`.
`python -m crosspool_jax.serve` is the binary."""
from crosspool_jax.server.app import build_app
from crosspool_jax.server.async_engine import AsyncEngine, Overloaded, StreamEvent, SubRequest
from crosspool_jax.server.metrics import ServerMetrics
from crosspool_jax.server.protocol import ApiError

__all__ = ["ApiError", "AsyncEngine", "Overloaded", "ServerMetrics", "StreamEvent", "SubRequest",
           "build_app"]
