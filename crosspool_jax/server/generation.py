"""`Generation`: the events of one HTTP request's engine requests, turned into OpenAI bodies
(whole, or as server-sent event chunks)."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator, Optional

from crosspool_jax.server import responses
from crosspool_jax.server.async_engine import AsyncEngine, StreamEvent, SubRequest
from crosspool_jax.server.protocol import ApiError
from crosspool_jax.server.sse import DONE, encode_event

log = logging.getLogger(__name__)


class Generation:
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
