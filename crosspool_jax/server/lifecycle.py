"""How the server ends: `GracefulServer`, a uvicorn server whose shutdown answers everyone.

On SIGTERM / Ctrl-C uvicorn stops accepting connections and waits for open requests. Here,
when `grace_s` has passed, `on_grace_expired` runs (the async engine's `stop`): every live
request then ends with an error through the app itself, so a stream still gets an error
event and `[DONE]` and a non-streaming request a JSON error. uvicorn's own cancellation
(which would cut streams and answer plain-text 500s) is only a backstop `backstop_s` later.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable

import uvicorn

log = logging.getLogger(__name__)


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, *, grace_s: float, on_grace_expired: Callable[[], None],
                 backstop_s: float = 5.0):
        config.timeout_graceful_shutdown = grace_s + backstop_s
        super().__init__(config)
        self.grace_s = grace_s
        self.on_grace_expired = on_grace_expired

    async def shutdown(self, sockets=None) -> None:
        loop = asyncio.get_running_loop()

        def expire():
            log.warning("shutdown grace of %.1f s is over: ending the requests still open", self.grace_s)
            self.on_grace_expired()

        timer = loop.call_later(self.grace_s, expire)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()
