"""Server-sent events: encoding, and a response that notices a client going away.

`EventStreamResponse` sends the events of an async iterator while it listens for the
client's `http.disconnect`; whichever ends first stops the other, and `on_close(completed)`
runs exactly once afterwards, so a request whose client left is aborted at once (and its KV
pages freed) instead of whenever the abandoned generator is garbage collected.
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import AsyncIterator, Callable

from starlette.responses import Response

log = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"


def encode_event(payload: dict) -> bytes:
    """One `data:` event carrying a JSON object."""
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


class EventStreamResponse(Response):
    """A `text/event-stream` response over `events`; calls `on_close(completed: bool)` once."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], on_close: Callable[[bool], None]):
        # Like starlette's StreamingResponse: no body attribute, hence no Content-Length.
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._events = events
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        completed = False
        sender = asyncio.ensure_future(self._send_all(send))
        listener = asyncio.ensure_future(self._wait_disconnect(receive))
        try:
            done, _ = await asyncio.wait({sender, listener}, return_when=asyncio.FIRST_COMPLETED)
            if sender in done:
                completed = sender.exception() is None
                if not completed:
                    log.info("stream ended early: %r", sender.exception())
        finally:
            for task in (sender, listener):
                if not task.done():
                    task.cancel()
            await asyncio.gather(sender, listener, return_exceptions=True)
            await self._close_events()
            self._on_close(completed)

    async def _send_all(self, send) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        async for chunk in self._events:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    @staticmethod
    async def _wait_disconnect(receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return

    async def _close_events(self) -> None:
        aclose = getattr(self._events, "aclose", None)
        if aclose is not None:
            try:
                await aclose()
            except Exception:  # noqa: BLE001 - closing must not mask the real outcome
                log.exception("closing the event stream failed")
