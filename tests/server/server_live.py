"""Test helpers: uvicorn in a background thread on a free loopback port, a live server over
the fake engine, random prompts."""
from __future__ import annotations

import dataclasses
import random
import socket
import string
import threading
import time

import uvicorn

from crosspool_jax.server import AsyncEngine, GracefulServer, ServerConfig, ServerMetrics, build_app
from server_fake_engine import FakeEngine


class LiveServer:
    def __init__(self, app, *, timeout_graceful_shutdown: float = 5.0, on_grace_expired=None):
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on")
        self.server = GracefulServer(config, grace_s=timeout_graceful_shutdown,
                                     on_grace_expired=on_grace_expired or (lambda: None))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]},
                                        daemon=True)

    def __enter__(self) -> "LiveServer":
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self._thread.join(30)
        self._sock.close()


@dataclasses.dataclass
class FakeServer:
    """A live server over a `FakeEngine`, with handles on its parts."""

    url: str
    engine: FakeEngine
    async_engine: AsyncEngine
    metrics: ServerMetrics

    def wait_idle(self, timeout_s: float = 10.0) -> None:
        """Until the engine holds no request and the server none in flight."""
        deadline = time.monotonic() + timeout_s
        while self.engine.requests or self.async_engine.num_in_flight:
            assert time.monotonic() < deadline, "requests still in flight"
            time.sleep(0.01)


def start_fake_server(*, step_s: float = 0.002, max_queue: int = 64, shutdown_timeout_s: float = 5.0,
                      tokens_per_step: int = 1, **config) -> tuple[LiveServer, FakeServer]:
    """A live server over a new FakeEngine; `config`: more `ServerConfig` fields."""
    engine = FakeEngine(step_s=step_s, tokens_per_step=tokens_per_step)
    metrics = ServerMetrics()
    async_engine = AsyncEngine(engine, metrics=metrics, max_queue=max_queue, stats_interval_s=0.01)
    app = build_app(async_engine, metrics, ServerConfig(max_queue=max_queue, **config))
    live = LiveServer(app, timeout_graceful_shutdown=shutdown_timeout_s,
                      on_grace_expired=async_engine.stop).__enter__()
    return live, FakeServer(live.url, engine, async_engine, metrics)


def random_text(rng: random.Random, lo: int = 3, hi: int = 20) -> str:
    return "".join(rng.choice(string.ascii_letters + " ") for _ in range(rng.randint(lo, hi)))
