"""The FastAPI application: OpenAI routes over an `AsyncEngine`, vLLM's `/tokenize`,
`/detokenize` and `/version`, plus `/health` and `/metrics`.

A generation route reads the body within the limits of `ServerConfig` (size, JSON depth,
time), validates it (`protocol`: pydantic models, 400 naming the field), checks the model,
tokenizes in a worker pool (prompt text above the character limit is refused before any
tokenizer runs, so neither the event loop nor the engine thread ever waits on a large
input), checks lengths against the model's context (vLLM's 400 for `max_tokens` past it),
submits one engine request per prompt to the `AsyncEngine`, and waits until the engine
thread has accepted all of them, so that errors found by the engine (`add_request`'s
ValueError) are still answered with a proper status. Then it either collects the events into
one response or streams them as server-sent events. A client that goes away aborts its
engine requests; every finished request is counted by model and HTTP status.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hmac
import logging
import time
import uuid
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

import crosspool_jax
from crosspool_jax.server import protocol, responses
from crosspool_jax.server.async_engine import AsyncEngine, Overloaded, StreamEvent, SubRequest
from crosspool_jax.server.config import ServerConfig
from crosspool_jax.server.generation import Generation
from crosspool_jax.server.metrics import ServerMetrics
from crosspool_jax.server.protocol import ApiError
from crosspool_jax.server.sse import EventStreamResponse

log = logging.getLogger(__name__)
_PARSE_IN_POOL_BYTES = 256 << 10         # larger bodies are parsed off the event loop
_OPEN_PATHS = ("/health", "/metrics", "/version")


def build_app(engine: AsyncEngine, metrics: ServerMetrics, config: Optional[ServerConfig] = None, *,
              manage_engine: bool = True) -> FastAPI:
    """The HTTP app. With `manage_engine`, the app's lifespan starts and stops the engine thread."""
    config = config or ServerConfig()
    pool = concurrent.futures.ThreadPoolExecutor(config.tokenizer_workers,
                                                 thread_name_prefix="crosspool-tokenize")

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        if manage_engine:
            engine.start()
        try:
            yield
        finally:
            if manage_engine:
                await asyncio.to_thread(engine.shutdown)
            pool.shutdown(wait=False, cancel_futures=True)

    docs = config.enable_docs
    app = FastAPI(title="crosspool-jax", version=crosspool_jax.__version__, lifespan=lifespan,
                  docs_url="/docs" if docs else None, redoc_url=None,
                  openapi_url="/openapi.json" if docs else None)
    routes = _Routes(engine, metrics, config, pool)

    @app.exception_handler(Exception)
    async def _unhandled(_request: Request, exc: Exception):
        log.exception("unhandled error")
        return JSONResponse(ApiError(500, f"internal error: {type(exc).__name__}").body(),
                            status_code=500)

    app.add_api_route("/health", routes.health, methods=["GET"])
    app.add_api_route("/metrics", routes.metrics, methods=["GET"])
    app.add_api_route("/version", routes.version, methods=["GET"])
    app.add_api_route("/v1/models", routes.models, methods=["GET"])
    app.add_api_route("/v1/completions", routes.completions, methods=["POST"],
                      openapi_extra=_schema(protocol.CompletionBody))
    app.add_api_route("/v1/chat/completions", routes.chat_completions, methods=["POST"],
                      openapi_extra=_schema(protocol.ChatBody))
    app.add_api_route("/tokenize", routes.tokenize, methods=["POST"],
                      openapi_extra=_schema(protocol.TokenizeBody))
    app.add_api_route("/detokenize", routes.detokenize, methods=["POST"],
                      openapi_extra=_schema(protocol.DetokenizeBody))
    api_key = config.resolved_api_key()
    if api_key is not None:
        app.add_middleware(_ApiKeyMiddleware, api_key=api_key, metrics=metrics)
    return app


def _schema(model) -> dict:
    """The body model's JSON schema for /openapi.json (the routes read the body themselves)."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": model.model_json_schema(ref_template="#/components/schemas/{model}")}}}}


class _ApiKeyMiddleware:
    """Every path but /health, /metrics and /version needs 'Authorization: Bearer <key>'."""

    def __init__(self, app, *, api_key: str, metrics: ServerMetrics):
        self.app = app
        self.key = api_key.encode()
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in _OPEN_PATHS:
            return await self.app(scope, receive, send)
        header = dict(scope.get("headers") or ()).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
            return await self.app(scope, receive, send)
        self.metrics.count_request("", 401)
        error = ApiError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                         code="invalid_api_key")
        await JSONResponse(error.body(), status_code=401)(scope, receive, send)


class _ClientGone(Exception):
    """The client closed the connection before its request body arrived."""


class _Routes:
    """Route handlers sharing the engine, the metrics, the limits and the worker pool."""

    def __init__(self, engine: AsyncEngine, metrics: ServerMetrics, config: ServerConfig,
                 pool: concurrent.futures.Executor):
        self.engine = engine
        self.metrics_ = metrics
        self.config = config
        self.pool = pool
        self.created = int(time.time())

    # ------------------------------------------------------------------ plain routes
    async def health(self) -> Response:
        if self.engine.healthy:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unhealthy"}, status_code=503)

    async def metrics(self) -> Response:
        body, content_type = self.metrics_.render()
        return Response(content=body, media_type=content_type)

    async def version(self) -> Response:
        return JSONResponse({"version": crosspool_jax.__version__})

    async def models(self) -> Response:
        stats = self.engine.stats_snapshot()
        per_model = getattr(stats, "models", None) or {}
        data = [responses.model_card(m, self.created, self.engine.max_model_len(m),
                                     per_model.get(m, {}).get("resident") if per_model else None,
                                     per_model.get(m, {}).get("device"))
                for m in self.engine.model_names]
        return JSONResponse({"object": "list", "data": data})

    async def tokenize(self, request: Request) -> Response:
        model = ""
        try:
            body = await self._read_json(request)
            model = self._label(body)
            req: protocol.TokenizeBody = protocol.validate_body(protocol.TokenizeBody, body)
            model = self._check_model(req.model)
            tokenizer = self._tokenizer(model, "prompt")
            if (req.prompt is None) == (req.messages is None):
                raise ApiError(400, "give exactly one of 'prompt' and 'messages'", param="prompt")
            if req.messages is not None:
                messages = protocol.message_dicts(req.messages)
                ids = await self._render_chat(model, messages, req.add_generation_prompt)
            else:
                ids = await self._encode(model, self._text(req.prompt), req.add_special_tokens)
            out = {"count": len(ids), "max_model_len": self.engine.max_model_len(model), "tokens": ids}
            if req.return_token_strs:
                out["token_strs"] = [responses.token_text(tokenizer, t) for t in ids]
        except _ClientGone:
            return self._gone(model)
        except ApiError as e:
            return self._error(e, model)
        self.metrics_.count_request(model, 200)
        return JSONResponse(out)

    async def detokenize(self, request: Request) -> Response:
        model = ""
        try:
            body = await self._read_json(request)
            model = self._label(body)
            req: protocol.DetokenizeBody = protocol.validate_body(protocol.DetokenizeBody, body)
            model = self._check_model(req.model)
            tokenizer = self._tokenizer(model, "model")
            loop = asyncio.get_running_loop()
            try:
                text = await loop.run_in_executor(self.pool, tokenizer.decode, req.tokens)
            except Exception as e:  # noqa: BLE001 - ids the tokenizer cannot spell
                raise ApiError(400, f"cannot detokenize: {e}", param="tokens") from None
        except _ClientGone:
            return self._gone(model)
        except ApiError as e:
            return self._error(e, model)
        self.metrics_.count_request(model, 200)
        return JSONResponse({"prompt": text})

    # ------------------------------------------------------------------ generation
    async def completions(self, request: Request) -> Response:
        model = ""
        try:
            body = await self._read_json(request)
            model = self._label(body)
            req = protocol.parse_completion_request(body)
            model = self._check_model(req.model)
            self._check_n(req.params.n)
            prompts = [await self._prompt_ids(model, p, req.params) for p in req.prompts]
            echo = ([await self._echo_text(model, p, ids, req.params) for p, ids in zip(req.prompts, prompts)]
                    if req.echo else None)
            base = f"cmpl-{uuid.uuid4().hex}"
            subs = [SubRequest(f"{base}-{i}", model, ids, req.params) for i, ids in enumerate(prompts)]
            sink, early = await self._start(subs)
        except _ClientGone:
            return self._gone(model)
        except ApiError as e:
            return self._error(e, model)
        gen = Generation(base, model, subs, sink, early, self.engine.get_tokenizer(model),
                         req.return_token_ids, echo=echo, continuous_usage=req.continuous_usage,
                         prompt_logprobs=req.prompt_logprobs)
        if req.stream:
            return self._stream(gen, gen.completion_chunks(req.include_usage, req.logprobs))
        return await self._collect(request, gen, lambda: gen.completion_body(req.logprobs))

    async def chat_completions(self, request: Request) -> Response:
        model = ""
        try:
            body = await self._read_json(request)
            model = self._label(body)
            req = protocol.parse_chat_request(body)
            model = self._check_model(req.model)
            self._check_n(req.params.n)
            self._tokenizer(model, "model")
            ids = await self._render_chat(model, req.messages, req.add_generation_prompt)
            ids = self._check_lengths(model, ids, req.params)
            base = f"chatcmpl-{uuid.uuid4().hex}"
            subs = [SubRequest(f"{base}-0", model, ids, req.params)]
            sink, early = await self._start(subs)
        except _ClientGone:
            return self._gone(model)
        except ApiError as e:
            return self._error(e, model)
        top = req.top_logprobs if req.logprobs else None
        gen = Generation(base, model, subs, sink, early, self.engine.get_tokenizer(model),
                         req.return_token_ids, continuous_usage=req.continuous_usage,
                         prompt_logprobs=req.prompt_logprobs)
        if req.stream:
            return self._stream(gen, gen.chat_chunks(req.include_usage, top))
        return await self._collect(request, gen, lambda: gen.chat_body(top))

    # ------------------------------------------------------------------ reading a request
    async def _read_json(self, request: Request) -> dict:
        """The body as a JSON object within the size, depth and time limits (ApiError if not)."""
        limit = self.config.max_body_bytes
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise ApiError(400, f"request body of {int(length)} bytes is larger than the server's "
                                f"limit of {limit} bytes (max_body_bytes)", code="request_too_large")
        chunks, size = [], 0

        async def read():
            nonlocal size
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ApiError(400, f"request body is larger than the server's limit of {limit} "
                                        "bytes (max_body_bytes)", code="request_too_large")
                chunks.append(chunk)

        try:
            await asyncio.wait_for(read(), self.config.body_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {self.config.body_timeout_s:g} s",
                           code="request_timeout") from None
        except ClientDisconnect:
            raise _ClientGone() from None
        raw = b"".join(chunks)
        if len(raw) > _PARSE_IN_POOL_BYTES:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.pool, lambda: protocol.parse_json_body(
                raw, max_depth=self.config.max_json_depth))
        return protocol.parse_json_body(raw, max_depth=self.config.max_json_depth)

    def _label(self, body: dict) -> str:
        """The metrics label of a request: its model when that is served, else ""."""
        model = body.get("model")
        return model if isinstance(model, str) and model in self.engine.model_names else ""

    @staticmethod
    def _text(text: str) -> str:
        try:
            return protocol.check_text(text, "prompt")
        except ValueError as e:
            raise ApiError(400, str(e), param="prompt") from None

    def _check_model(self, model: str) -> str:
        if model not in self.engine.model_names:
            raise ApiError(404, f"model {model!r} is not served here; served models: "
                                f"{', '.join(self.engine.model_names)}",
                           param="model", code="model_not_found")
        return model

    def _check_n(self, n: int) -> None:
        if n > self.config.max_n:
            raise ApiError(400, f"n={n} is more than this server allows (max_n={self.config.max_n})",
                           param="n")

    def _tokenizer(self, model: str, param: str):
        tokenizer = self.engine.get_tokenizer(model)
        if tokenizer is None:
            raise ApiError(400, f"model {model!r} has no tokenizer, so text and chat are unavailable; "
                                "use /v1/completions with token-id prompts", param=param)
        return tokenizer

    def _check_chars(self, model: str, n_chars: int, what: str, param: str) -> None:
        limit = self.config.prompt_char_limit(self.engine.max_model_len(model))
        if n_chars > limit:
            raise ApiError(400, f"{what} of {n_chars} characters is longer than the {limit} characters "
                                f"the server tokenizes for model {model!r} (max_prompt_chars)",
                           param=param, code="prompt_too_long")

    async def _encode(self, model: str, text: str, add_special_tokens: bool = True) -> list[int]:
        self._check_chars(model, len(text), "prompt", "prompt")
        tokenizer = self.engine.get_tokenizer(model)
        loop = asyncio.get_running_loop()
        try:
            return list(await loop.run_in_executor(self.pool, tokenizer.encode, text, add_special_tokens))
        except Exception as e:  # noqa: BLE001 - text this tokenizer cannot take
            raise ApiError(400, f"cannot tokenize the prompt: {e}", param="prompt") from None

    async def _prompt_ids(self, model: str, prompt, params) -> list[int]:
        if isinstance(prompt, str):
            self._tokenizer(model, "prompt")
            ids = await self._encode(model, prompt)
        else:
            ids = list(prompt)
        return self._check_lengths(model, ids, params)

    async def _echo_text(self, model: str, prompt, ids: list[int], params) -> str:
        """The prompt as text, for `echo` (token-id prompts and truncated prompts are decoded)."""
        if isinstance(prompt, str) and params.truncate_prompt_tokens is None:
            return prompt
        tokenizer = self._tokenizer(model, "echo")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, tokenizer.decode, ids)

    def _check_lengths(self, model: str, ids: list[int], params) -> list[int]:
        """The prompt (truncated as asked) against the context: vLLM's 400s."""
        if params.truncate_prompt_tokens is not None:
            ids = ids[-params.truncate_prompt_tokens:]
        limit = self.engine.max_model_len(model)
        if not ids:
            raise ApiError(400, "the prompt is empty: at least one token is needed", param="prompt")
        if len(ids) >= limit:
            raise ApiError(400, f"prompt of {len(ids)} tokens is too long for model {model!r}: its "
                                f"maximum context length is {limit} tokens (prompt + at least one new "
                                "token)", param="prompt", code="context_length_exceeded")
        if params.max_tokens is not None and len(ids) + params.max_tokens > limit:
            raise ApiError(400, f"this model's maximum context length is {limit} tokens; however, you "
                                f"requested {len(ids) + params.max_tokens} tokens ({len(ids)} in the "
                                f"prompt, {params.max_tokens} in the completion). Reduce the prompt or "
                                "max_tokens", param="max_tokens", code="context_length_exceeded")
        return ids

    async def _render_chat(self, model: str, messages: list[dict], add_generation_prompt: bool) -> list[int]:
        tokenizer = self.engine.get_tokenizer(model)
        self._check_chars(model, sum(len(m.get("content") or "") for m in messages), "the messages",
                          "messages")

        def render() -> str:
            return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)

        loop = asyncio.get_running_loop()
        try:
            text = await loop.run_in_executor(self.pool, render)
        except Exception as e:  # noqa: BLE001 - a template that rejects these messages
            raise ApiError(400, f"could not apply the chat template of {model!r}: {e}",
                           param="messages") from None
        self._check_chars(model, len(text), "the rendered chat prompt", "messages")
        try:
            ids = list(await loop.run_in_executor(self.pool, tokenizer.encode, text, False))
        except Exception as e:  # noqa: BLE001
            raise ApiError(400, f"cannot tokenize the chat prompt: {e}", param="messages") from None
        if not ids:
            raise ApiError(400, "the rendered chat prompt is empty", param="messages")
        return ids

    # ------------------------------------------------------------------ running a request
    async def _start(self, subs: list[SubRequest]) -> tuple[asyncio.Queue, list[StreamEvent]]:
        """Submit and wait until the engine accepted every sub-request (or one failed)."""
        sink: asyncio.Queue = asyncio.Queue()
        try:
            self.engine.submit(subs, sink)
        except Overloaded as e:
            raise ApiError(429, str(e), code="overloaded") from None
        except ValueError as e:
            raise ApiError(400, str(e), param="n", code="request_too_large") from None
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

    def _stream(self, gen: Generation, chunks) -> Response:
        def on_close(completed: bool) -> None:
            if not completed or not gen.finished:
                gen.abort(self.engine)
                self.metrics_.count_request(gen.model, 499)
            else:
                self.metrics_.count_request(gen.model, gen.status)

        return EventStreamResponse(chunks, on_close)

    async def _collect(self, request: Request, gen: Generation, build) -> Response:
        collector = asyncio.ensure_future(gen.run_to_end())
        watcher = asyncio.ensure_future(_wait_disconnect(request))
        try:
            done, _ = await asyncio.wait({collector, watcher}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # uvicorn's backstop after the shutdown grace
            gen.abort(self.engine)
            self.metrics_.count_request(gen.model, 499)
            raise
        finally:
            for task in (collector, watcher):
                if not task.done():
                    task.cancel()
        if collector not in done:
            gen.abort(self.engine)
            return self._gone(gen.model)
        try:
            collector.result()
            body = build()
        except ApiError as e:
            gen.abort(self.engine)
            return self._error(e, gen.model)
        self.metrics_.count_request(gen.model, 200)
        return JSONResponse(body)

    def _gone(self, model: str) -> Response:
        """The client left: nobody reads the answer; count it, log nothing."""
        self.metrics_.count_request(model, 499)
        return Response(status_code=499)

    def _error(self, e: ApiError, model: str) -> Response:
        self.metrics_.count_request(model, e.status)
        return JSONResponse(e.body(), status_code=e.status)


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
