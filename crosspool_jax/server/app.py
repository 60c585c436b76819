"""The FastAPI application: OpenAI routes over an `AsyncEngine`, plus `/health` and `/metrics`.

A generation route parses and validates the body (`protocol`), checks the model, submits one
engine request per prompt to the `AsyncEngine`, and waits until the engine thread has
accepted all of them, so that errors found by the engine (`add_request`'s ValueError: prompt
too long, ...) are still answered with a proper status. Then it either collects the events
into one response or streams them as server-sent events. A client that goes away aborts its
engine requests; every finished request is counted by model and HTTP status.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
import uuid
from typing import AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from crosspool_jax.server import protocol, responses
from crosspool_jax.server.async_engine import AsyncEngine, Overloaded, StreamEvent, SubRequest
from crosspool_jax.server.metrics import ServerMetrics
from crosspool_jax.server.protocol import ApiError
from crosspool_jax.server.sse import DONE, EventStreamResponse, encode_event

log = logging.getLogger(__name__)


def build_app(engine: AsyncEngine, metrics: ServerMetrics, *, api_key: Optional[str] = None,
              manage_engine: bool = True) -> FastAPI:
    """The HTTP app. With `manage_engine`, the app's lifespan starts and stops the engine thread."""

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        if manage_engine:
            engine.start()
        try:
            yield
        finally:
            if manage_engine:
                await asyncio.to_thread(engine.shutdown)

    app = FastAPI(title="crosspool-jax", lifespan=lifespan)
    routes = _Routes(engine, metrics, api_key)

    @app.exception_handler(Exception)
    async def _unhandled(_request: Request, exc: Exception):
        log.exception("unhandled error")
        return JSONResponse(ApiError(500, f"internal error: {type(exc).__name__}").body(),
                            status_code=500)

    app.add_api_route("/health", routes.health, methods=["GET"])
    app.add_api_route("/metrics", routes.metrics, methods=["GET"])
    app.add_api_route("/v1/models", routes.models, methods=["GET"])
    app.add_api_route("/v1/completions", routes.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", routes.chat_completions, methods=["POST"])
    return app


class _Routes:
    """Route handlers sharing the engine, the metrics and the API key."""

    def __init__(self, engine: AsyncEngine, metrics: ServerMetrics, api_key: Optional[str]):
        self.engine = engine
        self.metrics_ = metrics
        self.api_key = api_key
        self.created = int(time.time())

    # ------------------------------------------------------------------ plain routes
    async def health(self) -> Response:
        if self.engine.healthy:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unhealthy"}, status_code=503)

    async def metrics(self) -> Response:
        body, content_type = self.metrics_.render()
        return Response(content=body, media_type=content_type)

    async def models(self, request: Request) -> Response:
        try:
            self._check_auth(request)
        except ApiError as e:
            return self._error(e, "")
        stats = self.engine.stats_snapshot()
        per_model = getattr(stats, "models", None) or {}
        data = [responses.model_card(m, self.created, self.engine.max_model_len(m),
                                     per_model.get(m, {}).get("resident") if per_model else None,
                                     per_model.get(m, {}).get("device"))
                for m in self.engine.model_names]
        return JSONResponse({"object": "list", "data": data})

    # ------------------------------------------------------------------ generation
    async def completions(self, request: Request) -> Response:
        model = ""
        try:
            self._check_auth(request)
            body = protocol.parse_json_body(await request.body())
            req = protocol.parse_completion_request(body)
            model = self._check_model(req.model)
            base = f"cmpl-{uuid.uuid4().hex}"
            subs = [SubRequest(f"{base}-{i}", model, p, req.params) for i, p in enumerate(req.prompts)]
            sink, early = await self._start(subs)
        except ApiError as e:
            return self._error(e, model)
        gen = _Generation(base, model, subs, sink, early, self.engine.get_tokenizer(model),
                          req.return_token_ids)
        if req.stream:
            return self._stream(gen, gen.completion_chunks(req.include_usage, req.logprobs))
        return await self._collect(request, gen, lambda: gen.completion_body(req.logprobs))

    async def chat_completions(self, request: Request) -> Response:
        model = ""
        try:
            self._check_auth(request)
            body = protocol.parse_json_body(await request.body())
            req = protocol.parse_chat_request(body)
            model = self._check_model(req.model)
            prompt_ids = self._render_chat(model, req.messages)
            base = f"chatcmpl-{uuid.uuid4().hex}"
            subs = [SubRequest(f"{base}-0", model, prompt_ids, req.params)]
            sink, early = await self._start(subs)
        except ApiError as e:
            return self._error(e, model)
        top = req.top_logprobs if req.logprobs else None
        gen = _Generation(base, model, subs, sink, early, self.engine.get_tokenizer(model),
                          req.return_token_ids)
        if req.stream:
            return self._stream(gen, gen.chat_chunks(req.include_usage, top))
        return await self._collect(request, gen, lambda: gen.chat_body(top))

    # ------------------------------------------------------------------ helpers
    def _check_auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                 self.api_key.encode()):
            raise ApiError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                           code="invalid_api_key")

    def _check_model(self, model: str) -> str:
        if model not in self.engine.model_names:
            raise ApiError(404, f"model {model!r} is not served here; served models: "
                                f"{', '.join(self.engine.model_names)}",
                           param="model", code="model_not_found")
        return model

    def _render_chat(self, model: str, messages: list[dict]) -> list[int]:
        tokenizer = self.engine.get_tokenizer(model)
        if tokenizer is None:
            raise ApiError(400, f"model {model!r} has no tokenizer, so chat is unavailable; "
                                "use /v1/completions with token-id prompts", param="model")
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            ids = list(tokenizer.encode(text, add_special_tokens=False))
        except Exception as e:  # noqa: BLE001 - a template that rejects these messages
            raise ApiError(400, f"could not apply the chat template of {model!r}: {e}",
                           param="messages") from None
        if not ids:
            raise ApiError(400, "the rendered chat prompt is empty", param="messages")
        return ids

    async def _start(self, subs: list[SubRequest]) -> tuple[asyncio.Queue, list[StreamEvent]]:
        """Submit and wait until the engine accepted every sub-request (or one failed)."""
        sink: asyncio.Queue = asyncio.Queue()
        try:
            self.engine.submit(subs, sink)
        except Overloaded as e:
            raise ApiError(429, str(e), code="overloaded") from None
        except RuntimeError as e:
            raise ApiError(503, str(e)) from None
        pending = {s.request_id for s in subs}
        early: list[StreamEvent] = []
        while pending:
            event = await sink.get()
            if event.kind == "accepted":
                pending.discard(event.request_id)
            elif event.kind == "error":
                for s in subs:
                    self.engine.abort(s.request_id)
                raise ApiError(event.status, event.error or "request failed",
                               param="prompt" if event.status == 400 else None)
            else:
                early.append(event)
        return sink, early

    def _stream(self, gen: "_Generation", chunks: AsyncIterator[bytes]) -> Response:
        def on_close(completed: bool) -> None:
            if not completed or not gen.finished:
                gen.abort(self.engine)
                self.metrics_.count_request(gen.model, 499)
            else:
                self.metrics_.count_request(gen.model, gen.status)

        return EventStreamResponse(chunks, on_close)

    async def _collect(self, request: Request, gen: "_Generation", build) -> Response:
        collector = asyncio.ensure_future(gen.run_to_end())
        watcher = asyncio.ensure_future(_wait_disconnect(request))
        try:
            done, _ = await asyncio.wait({collector, watcher}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # e.g. the graceful-shutdown timeout ran out
            gen.abort(self.engine)
            self.metrics_.count_request(gen.model, 499)
            raise
        finally:
            for task in (collector, watcher):
                if not task.done():
                    task.cancel()
        if collector not in done:
            gen.abort(self.engine)
            self.metrics_.count_request(gen.model, 499)
            return self._error(ApiError(499, "client disconnected"), None)
        try:
            collector.result()
            body = build()
        except ApiError as e:
            gen.abort(self.engine)
            return self._error(e, gen.model)
        self.metrics_.count_request(gen.model, 200)
        return JSONResponse(body)

    def _error(self, e: ApiError, model: Optional[str]) -> Response:
        if model is not None:
            self.metrics_.count_request(model if model in self.engine.model_names else "", e.status)
        return JSONResponse(e.body(), status_code=e.status)


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class _Generation:
    """The events of one HTTP request's engine requests, turned into OpenAI bodies."""

    def __init__(self, base_id: str, model: str, subs: list[SubRequest], sink: asyncio.Queue,
                 early: list[StreamEvent], tokenizer, return_token_ids: bool = False):
        self.id = base_id
        self.model = model
        self.subs = subs
        self.n = subs[0].params.n
        self.sink = sink
        self.early = list(early)
        self.tokenizer = tokenizer
        self.return_token_ids = return_token_ids
        self.created = int(time.time())
        self.sub_index = {s.request_id: i for i, s in enumerate(subs)}
        self.prompt_tokens = {s.request_id: 0 for s in subs}
        self.states = {i * self.n + j: responses.ChoiceState(i * self.n + j)
                       for i in range(len(subs)) for j in range(self.n)}
        self.unfinished = {s.request_id for s in subs}
        self.status = 200

    @property
    def finished(self) -> bool:
        return not self.unfinished

    def abort(self, engine: AsyncEngine) -> None:
        for rid in self.unfinished:
            engine.abort(rid)

    def usage(self) -> dict:
        return responses.usage(sum(self.prompt_tokens.values()),
                               sum(len(s.token_ids) for s in self.states.values()))

    async def events(self) -> AsyncIterator[StreamEvent]:
        """Events until every sub-request finished; raises ApiError for a failed one."""
        while self.unfinished:
            event = self.early.pop(0) if self.early else await self.sink.get()
            if event.request_id not in self.unfinished:
                continue
            if event.kind == "error":
                self.unfinished.discard(event.request_id)
                self.status = event.status
                raise ApiError(event.status, event.error or "request failed")
            self.prompt_tokens[event.request_id] = event.num_prompt_tokens
            if event.finished:
                self.unfinished.discard(event.request_id)
            yield event

    def _ids(self, token_ids: list[int]) -> Optional[list[int]]:
        return list(token_ids) if self.return_token_ids else None

    def _choice_index(self, event: StreamEvent, choice_index: int) -> int:
        return self.sub_index[event.request_id] * self.n + choice_index

    async def run_to_end(self) -> None:
        async for event in self.events():
            for c in event.choices:
                self.states[self._choice_index(event, c.index)].add(c)

    # ---------------------------------------------------------------- whole bodies
    def completion_body(self, logprobs_k: Optional[int]) -> dict:
        choices = []
        for idx in sorted(self.states):
            s = self.states[idx]
            lps = (responses.completion_logprobs(self.tokenizer, s.token_ids, s.logprobs,
                                                 logprobs_k, 0)
                   if logprobs_k is not None else None)
            choices.append(responses.completion_choice(idx, s.text, lps, s.finish_reason,
                                                       s.stop_reason, self._ids(s.token_ids)))
        return responses.completion_body(self.id, self.created, self.model, choices,
                                         self.usage(), chunk=False)

    def chat_body(self, top_logprobs: Optional[int]) -> dict:
        choices = []
        for idx in sorted(self.states):
            s = self.states[idx]
            lps = (responses.chat_logprobs(self.tokenizer, s.token_ids, s.logprobs, top_logprobs)
                   if top_logprobs is not None else None)
            choices.append(responses.chat_choice(idx, s.text, lps, s.finish_reason,
                                                 self._ids(s.token_ids)))
        return responses.chat_body(self.id, self.created, self.model, choices, self.usage())

    # ---------------------------------------------------------------- streams
    async def completion_chunks(self, include_usage: bool,
                                logprobs_k: Optional[int]) -> AsyncIterator[bytes]:
        try:
            async for event in self.events():
                choices = []
                for c in event.choices:
                    idx = self._choice_index(event, c.index)
                    state = self.states[idx]
                    lps = None
                    if logprobs_k is not None and c.logprobs:
                        lps = responses.completion_logprobs(self.tokenizer, c.token_ids,
                                                            c.logprobs, logprobs_k, len(state.text))
                    state.add(c)
                    if c.text or c.token_ids or c.finish_reason is not None:
                        choices.append(responses.completion_choice(
                            idx, c.text, lps, c.finish_reason, c.stop_reason,
                            self._ids(c.token_ids)))
                if choices:
                    yield encode_event(responses.completion_body(
                        self.id, self.created, self.model, choices, None, chunk=True))
            if include_usage:
                yield encode_event(responses.completion_body(
                    self.id, self.created, self.model, [], self.usage(), chunk=True))
        except ApiError as e:
            yield encode_event(e.body())
        except Exception as e:  # noqa: BLE001 - a bug here must end the stream, not hang it
            log.exception("stream of %s failed", self.id)
            self.status = 500
            yield encode_event(ApiError(500, f"internal error: {type(e).__name__}").body())
        yield DONE

    async def chat_chunks(self, include_usage: bool,
                          top_logprobs: Optional[int]) -> AsyncIterator[bytes]:
        try:
            first = [responses.chat_chunk_choice(i, {"role": "assistant", "content": ""}, None, None)
                     for i in sorted(self.states)]
            yield encode_event(responses.chat_chunk(self.id, self.created, self.model, first))
            async for event in self.events():
                choices = []
                for c in event.choices:
                    idx = self._choice_index(event, c.index)
                    self.states[idx].add(c)
                    lps = None
                    if top_logprobs is not None and c.logprobs:
                        lps = responses.chat_logprobs(self.tokenizer, c.token_ids, c.logprobs,
                                                      top_logprobs)
                    if c.text or c.token_ids or c.finish_reason is not None:
                        delta = {"content": c.text} if c.text else {}
                        choices.append(responses.chat_chunk_choice(
                            idx, delta, lps, c.finish_reason, self._ids(c.token_ids)))
                if choices:
                    yield encode_event(responses.chat_chunk(self.id, self.created, self.model,
                                                            choices))
            if include_usage:
                yield encode_event(responses.chat_chunk(self.id, self.created, self.model, [],
                                                        self.usage()))
        except ApiError as e:
            yield encode_event(e.body())
        except Exception as e:  # noqa: BLE001 - a bug here must end the stream, not hang it
            log.exception("stream of %s failed", self.id)
            self.status = 500
            yield encode_event(ApiError(500, f"internal error: {type(e).__name__}").body())
        yield DONE
