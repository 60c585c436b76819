"""`Generation`: the events of one HTTP request's engine requests, turned into OpenAI bodies
(whole, or as server-sent event chunks).

Streams carry one token per chunk, as vLLM's do: a multi-step decode hands over several
tokens of a choice at once, and `split_delta` cuts them into single-token pieces (each
token's text decoded from a short window of the tokens before it; any text that cannot be
assigned to one token, such as an unfinished UTF-8 character, moves to a later piece, so the
pieces' texts always add up to the engine's text)."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator, Optional

from crosspool_jax.server import responses
from crosspool_jax.server.async_engine import AsyncEngine, ChoiceDelta, StreamEvent, SubRequest
from crosspool_jax.server.protocol import ApiError
from crosspool_jax.server.sse import DONE, encode_event

log = logging.getLogger(__name__)
_DECODE_WINDOW = 4           # tokens before a piece decoded with it (spaces and merges depend on them)


def split_delta(delta: ChoiceDelta, prev_ids: list[int], tokenizer) -> list[ChoiceDelta]:
    """One ChoiceDelta per token of `delta` (prev_ids: the choice's tokens before it)."""
    ids = delta.token_ids
    if len(ids) <= 1:
        return [delta]
    pieces = _token_texts(tokenizer, prev_ids, ids)
    out, pos = [], 0
    for j, tid in enumerate(ids):
        last = j == len(ids) - 1
        if last:
            text = delta.text[pos:]
        else:
            text = pieces[j] if pieces and delta.text.startswith(pieces[j], pos) else ""
            pos += len(text)
        lps = [delta.logprobs[j]] if delta.logprobs and j < len(delta.logprobs) else None
        out.append(ChoiceDelta(delta.index, text, [tid], lps, delta.finish_reason if last else None,
                               delta.stop_reason if last else None))
    return out


def _token_texts(tokenizer, prev_ids: list[int], ids: list[int]) -> Optional[list[str]]:
    if tokenizer is None:
        return None
    window = list(prev_ids[-_DECODE_WINDOW:])
    try:
        texts = [tokenizer.decode(window + ids[:j]) for j in range(len(ids) + 1)]
    except Exception:  # noqa: BLE001 - a token the tokenizer cannot spell: text goes to the last piece
        return None
    return [texts[j + 1][len(texts[j]):] if texts[j + 1].startswith(texts[j]) else ""
            for j in range(len(ids))]


class Generation:
    """The events of one HTTP request's engine requests, turned into OpenAI bodies."""

    def __init__(self, base_id: str, model: str, subs: list[SubRequest], sink: asyncio.Queue,
                 early: list[StreamEvent], tokenizer, return_token_ids: bool = False,
                 echo: Optional[list[str]] = None, continuous_usage: bool = False,
                 prompt_logprobs: Optional[int] = None):
        """echo: per sub-request, prompt text that each of its choices starts with (completions'
        `echo`); continuous_usage: every stream chunk carries the usage so far; prompt_logprobs:
        the k of the request's `prompt_logprobs` (each body then carries them)."""
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
        self.echo = echo
        self.continuous_usage = continuous_usage
        self.prompt_logprobs_k = prompt_logprobs
        self.prompt_logprobs: dict[str, list] = {}       # sub-request id -> RequestOutput.prompt_logprobs

    def _echo(self, idx: int) -> str:
        return self.echo[idx // self.n] if self.echo is not None else ""

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
            if event.prompt_logprobs is not None:
                self.prompt_logprobs[event.request_id] = event.prompt_logprobs
            if event.finished:
                self.unfinished.discard(event.request_id)
            yield event

    def _running_usage(self) -> Optional[dict]:
        return self.usage() if self.continuous_usage else None

    def _ids(self, token_ids: list[int]) -> Optional[list[int]]:
        return list(token_ids) if self.return_token_ids else None

    def _choice_index(self, event: StreamEvent, choice_index: int) -> int:
        return self.sub_index[event.request_id] * self.n + choice_index

    async def pieces(self) -> AsyncIterator[tuple[int, ChoiceDelta, int]]:
        """(choice index, delta of at most one token, the choice's text length before it) in
        order; the states are updated."""
        async for event in self.events():
            for c in event.choices:
                idx = self._choice_index(event, c.index)
                state = self.states[idx]
                for piece in split_delta(c, state.token_ids, self.tokenizer):
                    text_offset = len(state.text)
                    state.add(piece)
                    yield idx, piece, text_offset

    async def run_to_end(self) -> None:
        async for event in self.events():
            for c in event.choices:
                self.states[self._choice_index(event, c.index)].add(c)

    # ---------------------------------------------------------------- whole bodies
    def _prompt_of(self, idx: int) -> tuple[list[int], list]:
        """(prompt token ids, prompt logprobs from the engine) of choice idx's sub-request."""
        sub = self.subs[idx // self.n]
        return list(sub.prompt), self.prompt_logprobs.get(sub.request_id) or [None] * len(sub.prompt)

    def _prompt_logprobs_body(self, idx: int) -> Optional[list]:
        if self.prompt_logprobs_k is None:
            return None
        return responses.prompt_logprobs(*self._prompt_of(idx), self.prompt_logprobs_k)

    def completion_body(self, logprobs_k: Optional[int]) -> dict:
        """The whole completion; with echo and logprobs, each choice's logprobs start with the
        prompt's."""
        choices = []
        for idx in sorted(self.states):
            s = self.states[idx]
            echo = self._echo(idx)
            lps = None
            if logprobs_k is not None:
                lps = responses.completion_logprobs(self.tokenizer, s.token_ids, s.logprobs, logprobs_k, len(echo))
                if self.echo is not None:
                    lps = responses.join_logprobs(
                        responses.echo_logprobs(self.tokenizer, *self._prompt_of(idx), logprobs_k), lps)
            choices.append(responses.completion_choice(idx, echo + s.text, lps, s.finish_reason, s.stop_reason,
                                                       self._ids(s.token_ids), self._prompt_logprobs_body(idx)))
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
        return responses.chat_body(self.id, self.created, self.model, choices, self.usage(),
                                   self._prompt_logprobs_body(0))

    # ---------------------------------------------------------------- streams
    def completion_chunks(self, include_usage: bool, logprobs_k: Optional[int]) -> AsyncIterator[bytes]:
        """The SSE events of a streamed completion, ending with [DONE]."""
        return self._ended(self._completion_events(include_usage, logprobs_k))

    def chat_chunks(self, include_usage: bool, top_logprobs: Optional[int]) -> AsyncIterator[bytes]:
        """The SSE events of a streamed chat completion, ending with [DONE]."""
        return self._ended(self._chat_events(include_usage, top_logprobs))

    async def _ended(self, events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """`events`, then [DONE]; an error ends the stream with an error event (a bug too: logged,
        status 500), never a hang."""
        try:
            async for event in events:
                yield event
        except ApiError as e:
            yield encode_event(e.body())
        except Exception as e:  # noqa: BLE001 - a bug here must end the stream, not hang it
            log.exception("stream of %s failed", self.id)
            self.status = 500
            yield encode_event(ApiError(500, f"internal error: {type(e).__name__}").body())
        finally:
            await events.aclose()              # a client that left closes the inner stream at once
        yield DONE

    async def _completion_events(self, include_usage: bool, logprobs_k: Optional[int]) -> AsyncIterator[bytes]:
        """With echo, each choice's first chunk is its prompt (with the prompt's logprobs when
        logprobs are asked: they come with the request's first event)."""
        echoed: set[int] = set()
        async for idx, c, text_offset in self.pieces():
            if self.echo is not None and idx not in echoed:
                echoed.add(idx)
                lps = (responses.echo_logprobs(self.tokenizer, *self._prompt_of(idx), logprobs_k)
                       if logprobs_k is not None else None)
                choice = responses.completion_choice(idx, self._echo(idx), lps, None, None, None)
                yield encode_event(responses.completion_body(self.id, self.created, self.model, [choice],
                                                             None, chunk=True))
            if not (c.text or c.token_ids or c.finish_reason is not None):
                continue
            lps = None
            if logprobs_k is not None and c.logprobs:
                lps = responses.completion_logprobs(self.tokenizer, c.token_ids, c.logprobs,
                                                    logprobs_k, len(self._echo(idx)) + text_offset)
            choice = responses.completion_choice(idx, c.text, lps, c.finish_reason, c.stop_reason,
                                                 self._ids(c.token_ids))
            yield encode_event(responses.completion_body(self.id, self.created, self.model, [choice],
                                                         self._running_usage(), chunk=True))
        if include_usage:
            yield encode_event(responses.completion_body(
                self.id, self.created, self.model, [], self.usage(), chunk=True))


    async def _chat_events(self, include_usage: bool, top_logprobs: Optional[int]) -> AsyncIterator[bytes]:
        first = [responses.chat_chunk_choice(i, {"role": "assistant", "content": ""}, None, None)
                 for i in sorted(self.states)]
        yield encode_event(responses.chat_chunk(self.id, self.created, self.model, first))
        async for idx, c, _ in self.pieces():
            if not (c.text or c.token_ids or c.finish_reason is not None):
                continue
            lps = None
            if top_logprobs is not None and c.logprobs:
                lps = responses.chat_logprobs(self.tokenizer, c.token_ids, c.logprobs, top_logprobs)
            delta = {"content": c.text} if c.text else {}
            choice = responses.chat_chunk_choice(idx, delta, lps, c.finish_reason, self._ids(c.token_ids))
            yield encode_event(responses.chat_chunk(self.id, self.created, self.model, [choice],
                                                    self._running_usage()))
        if include_usage:
            yield encode_event(responses.chat_chunk(self.id, self.created, self.model, [],
                                                    self.usage()))
