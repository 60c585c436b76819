"""`AsyncEngine`: runs an `LLMEngine` in its own thread and feeds asyncio queues.

How a request flows:

1. An HTTP handler (on the asyncio event loop) calls `submit(...)` with one or more
   `SubRequest`s and one `asyncio.Queue` (the sink). `submit` only counts the requests'
   sequences (`n` per request) against `max_queue` (raising `Overloaded` beyond it) and puts
   an "add" command on a thread-safe command queue; it never touches the engine, which is
   not thread-safe. Prompts arrive tokenized (the app tokenizes in its worker pool), so the
   engine thread never spends long on one request.
2. The engine thread drains the command queue at the top of each loop iteration: it calls
   `engine.add_request` (a `ValueError` comes back to the sink as an error event; success as
   an "accepted" event) and `engine.abort_request` for aborts. When the engine has nothing to
   do, the thread sleeps on a condition variable until a command arrives.
3. Otherwise it calls `engine.step()`. Requests are added with `RequestOutputKind.DELTA`, so
   each output holds only what is new since the last one (text, token ids, logprobs per
   choice; the engine holds back text a stop string may still cut) in lists of its own, which
   the HTTP side reads while the engine goes on; the thread turns each into a `StreamEvent`.
   Events reach the sink through `loop.call_soon_threadsafe(sink.put_nowait, event)`.
4. It records time to first token and time between tokens, and publishes an `EngineStats`
   snapshot (at most every `stats_interval_s` while busy, and whenever it goes idle) that
   `/metrics` and `/v1/models` read without touching the engine.

A request leaves the engine thread's books when it finishes, fails, or is aborted; only then
do its sequences stop counting against `max_queue`. `stop()` (the server's shutdown grace
ran out) ends every live request with an error event.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading
import time
from typing import Optional, Union

from crosspool_jax.sampling_params import RequestOutputKind, SamplingParams
from crosspool_jax.server.metrics import ServerMetrics

log = logging.getLogger(__name__)


class Overloaded(Exception):
    """The server already holds `max_queue` unfinished requests."""


@dataclasses.dataclass(frozen=True)
class SubRequest:
    """One engine request: an id unique in the server, its model, prompt and sampling."""

    request_id: str
    model: str
    prompt: Union[str, list[int]]
    params: SamplingParams

    def __post_init__(self):
        if not self.request_id:
            raise ValueError("SubRequest.request_id: must be a non-empty string")
        if not self.model:
            raise ValueError("SubRequest.model: must be a non-empty string")
        if not isinstance(self.params, SamplingParams):
            raise ValueError(f"SubRequest.params: must be SamplingParams, got "
                             f"{type(self.params).__name__}")


@dataclasses.dataclass
class ChoiceDelta:
    """What is new in one completion since the previous event."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: Optional[list[dict]]  # one {token_id: Logprob} per new token, when asked for
    finish_reason: Optional[str]
    stop_reason: Optional[object]


@dataclasses.dataclass
class StreamEvent:
    """One message from the engine thread about one request.

    kind "accepted": the engine took the request; "delta": progress (choices); "error": the
    request failed alone (`error` says why, `status` is the HTTP status it maps to).
    prompt_logprobs: the request's `RequestOutput.prompt_logprobs`, on its first delta only.
    """

    request_id: str
    kind: str
    num_prompt_tokens: int = 0
    choices: list[ChoiceDelta] = dataclasses.field(default_factory=list)
    finished: bool = False
    error: Optional[str] = None
    status: int = 200
    prompt_logprobs: Optional[list] = None


@dataclasses.dataclass
class _Live:
    """Engine-thread bookkeeping of one request."""

    sub: SubRequest
    sink: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    t_arrival: float
    token_len: dict[int, int] = dataclasses.field(default_factory=dict)   # tokens so far, per choice
    finish_reasons: dict[int, str] = dataclasses.field(default_factory=dict)
    t_first_token: Optional[float] = None
    t_last_token: Optional[float] = None
    prompt_logprobs_sent: bool = False

    @property
    def weight(self) -> int:
        """Sequences it counts against max_queue."""
        return self.sub.params.n


class AsyncEngine:
    """Owns the engine thread; the only object that calls the wrapped `LLMEngine`.

    Model names, context lengths and tokenizers are read once at construction, on the
    caller's thread, before the engine thread starts.
    """

    def __init__(self, engine, *, metrics: Optional[ServerMetrics] = None, max_queue: int = 1024,
                 stats_interval_s: float = 0.1, idle_wait_s: float = 0.5):
        if max_queue < 1:
            raise ValueError(f"AsyncEngine.max_queue: must be >= 1 (got {max_queue})")
        self._engine = engine
        self.metrics = metrics
        self.max_queue = max_queue
        self._stats_interval_s = stats_interval_s
        self._idle_wait_s = idle_wait_s
        self.model_names: list[str] = list(engine.model_names)
        self._max_model_len = {m: int(engine.max_model_len(m)) for m in self.model_names}
        self._tokenizers = {m: engine.get_tokenizer(m) for m in self.model_names}

        self._cv = threading.Condition()
        self._commands: collections.deque = collections.deque()
        self._in_flight = 0
        self._live: dict[str, _Live] = {}
        self._stop = False
        self._thread: Optional[threading.Thread] = None
        self._stats = None
        self._stats_time = 0.0
        self._dead_reason: Optional[str] = None
        if metrics is not None:
            metrics.set_stats_source(lambda: (self._stats, self._in_flight))

    # ----------------------------------------------------------------- any thread
    def max_model_len(self, model: str) -> int:
        return self._max_model_len[model]

    def get_tokenizer(self, model: str):
        return self._tokenizers[model]

    @property
    def num_in_flight(self) -> int:
        return self._in_flight

    def stats_snapshot(self):
        """The latest `EngineStats` the engine thread published (None before the first)."""
        return self._stats

    @property
    def healthy(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._dead_reason is None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="crosspool-engine", daemon=True)
        self._thread.start()

    def submit(self, subs: list[SubRequest], sink: asyncio.Queue) -> None:
        """Queue requests for the engine; events about them arrive on `sink`.

        All or nothing: raises `Overloaded` (nothing queued) if their sequences (`n` each) do
        not fit under `max_queue` beside those in flight, ValueError if they could never fit,
        RuntimeError if the engine thread is not running. Call it from the event loop that
        reads `sink`.
        """
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        weight = sum(sub.params.n for sub in subs)
        if weight > self.max_queue:
            raise ValueError(f"the request needs {weight} sequences (prompts x n), more than the "
                             f"server ever holds (max_queue={self.max_queue})")
        with self._cv:
            if self._stop or not self.healthy:
                raise RuntimeError(f"engine is not running ({self._dead_reason or 'stopped'})")
            if self._in_flight + weight > self.max_queue:
                raise Overloaded(
                    f"server is at capacity ({self._in_flight} unfinished sequences, "
                    f"max_queue={self.max_queue}); retry later")
            self._in_flight += weight
            for sub in subs:
                self._commands.append(("add", _Live(sub=sub, sink=sink, loop=loop, t_arrival=now)))
            self._cv.notify()

    def abort(self, request_id: str) -> None:
        """Abort a request (idempotent, also for finished or unknown ids)."""
        with self._cv:
            self._commands.append(("abort", request_id))
            self._cv.notify()

    def stop(self) -> None:
        """Ask the engine thread to stop without waiting: every live request ends with an
        error event ("the server is shutting down") and is aborted."""
        with self._cv:
            self._stop = True
            self._cv.notify()

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Abort what is still running, stop the engine thread and wait for it."""
        self.stop()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.error("engine thread did not stop within %.1f s", timeout_s)

    # ----------------------------------------------------------------- engine thread
    def _run(self) -> None:
        try:
            self._publish_stats(force=True)
            while True:
                commands, stop = self._take_commands()
                for command in commands:
                    self._apply(command)
                if stop:
                    break
                if not self._engine.has_unfinished_requests():
                    self._publish_stats(force=True)
                    with self._cv:
                        if not self._commands and not self._stop:
                            self._cv.wait(self._idle_wait_s)
                    continue
                self._step()
                self._publish_stats(force=False)
        except BaseException as e:  # the thread must never die silently
            self._dead_reason = f"engine thread crashed: {type(e).__name__}: {e}"
            log.exception("engine thread crashed")
        finally:
            why = self._dead_reason or "the server is shutting down"
            for rid in list(self._live):
                self._finish_with_error(rid, why, status=503, abort=self._dead_reason is None)
            with self._cv:
                for kind, item in self._commands:
                    if kind == "add":
                        self._in_flight -= item.weight
                        self._send(item, StreamEvent(item.sub.request_id, "error", finished=True,
                                                     error=why, status=503))
                self._commands.clear()
            self._publish_stats(force=True)

    def _take_commands(self):
        with self._cv:
            commands = list(self._commands)
            self._commands.clear()
            return commands, self._stop

    def _apply(self, command) -> None:
        kind, item = command
        if kind == "abort":
            live = self._live.pop(item, None)
            try:
                self._engine.abort_request(item)
            except Exception:  # noqa: BLE001 - an abort that fails must not stop the loop
                log.exception("abort_request(%s) failed", item)
            if live is not None:
                self._release(live)
            return
        live: _Live = item
        sub = live.sub
        try:
            self._engine.add_request(sub.request_id, sub.model, sub.prompt,
                                     dataclasses.replace(sub.params, output_kind=RequestOutputKind.DELTA))
        except ValueError as e:
            self._release(live)
            self._send(live, StreamEvent(sub.request_id, "error", finished=True, error=str(e),
                                         status=400))
            return
        except Exception as e:  # noqa: BLE001 - one bad request must not stop the loop
            log.exception("add_request(%s) failed", sub.request_id)
            self._release(live)
            self._send(live, StreamEvent(sub.request_id, "error", finished=True,
                                         error=f"{type(e).__name__}: {e}", status=500))
            return
        self._live[sub.request_id] = live
        self._send(live, StreamEvent(sub.request_id, "accepted"))

    def _step(self) -> None:
        try:
            outputs = self._engine.step()
        except Exception as e:  # noqa: BLE001 - fail the running requests, keep serving
            log.exception("engine.step() failed; failing %d running requests", len(self._live))
            for rid in list(self._live):
                self._finish_with_error(rid, f"engine step failed: {type(e).__name__}: {e}",
                                        status=500, abort=True)
            return
        now = time.monotonic()
        for out in outputs:
            live = self._live.get(out.request_id)
            if live is not None:
                self._deliver(live, out, now)

    def _deliver(self, live: _Live, out, now: float) -> None:
        rid = live.sub.request_id
        if out.error:
            self._finish_with_error(rid, str(out.error), status=400, abort=False)
            return
        choices = []
        for c in out.outputs:                   # deltas (RequestOutputKind.DELTA)
            live.token_len[c.index] = live.token_len.get(c.index, 0) + len(c.token_ids)
            if c.finish_reason is not None:
                live.finish_reasons[c.index] = c.finish_reason
            choices.append(ChoiceDelta(c.index, c.text, c.token_ids, c.logprobs, c.finish_reason, c.stop_reason))
        self._observe_latency(live, out, now)
        event = StreamEvent(rid, "delta", num_prompt_tokens=len(out.prompt_token_ids),
                            choices=choices, finished=bool(out.finished))
        if out.prompt_logprobs is not None and not live.prompt_logprobs_sent:
            event.prompt_logprobs, live.prompt_logprobs_sent = out.prompt_logprobs, True
        if out.finished:
            del self._live[rid]
            self._release(live)
            if self.metrics is not None:
                times = out.metrics or {}
                arrived, scheduled, first = (times.get(k) for k in ("arrival_time", "first_scheduled_time",
                                                                     "first_token_time"))
                first = first if first is not None else live.t_first_token
                self.metrics.observe_finished(
                    live.sub.model, prompt_tokens=len(out.prompt_token_ids),
                    generation_tokens=[live.token_len.get(i, 0) for i in range(live.sub.params.n)],
                    finish_reasons=[live.finish_reasons.get(i) for i in range(live.sub.params.n)],
                    e2e_s=now - live.t_arrival,
                    decode_s=None if first is None else now - first,
                    queue_s=None if arrived is None or scheduled is None else scheduled - arrived,
                    prefill_s=None if scheduled is None or first is None else first - scheduled)
        self._send(live, event)

    def _observe_latency(self, live: _Live, out, now: float) -> None:
        if self.metrics is None:
            return
        # Latency follows the first completion; its new tokens this step count once each.
        new = sum(len(c.token_ids) for c in out.outputs if c.index == 0)
        if new <= 0:
            return
        if live.t_last_token is None:
            live.t_first_token = now
            self.metrics.observe_ttft(live.sub.model, now - live.t_arrival)
            if new > 1:
                self.metrics.observe_tbt(live.sub.model, 0.0, new - 1)
        else:
            self.metrics.observe_tbt(live.sub.model, now - live.t_last_token, new)
        live.t_last_token = now

    def _finish_with_error(self, rid: str, error: str, *, status: int, abort: bool) -> None:
        live = self._live.pop(rid, None)
        if abort:
            try:
                self._engine.abort_request(rid)
            except Exception:  # noqa: BLE001
                log.exception("abort_request(%s) failed", rid)
        if live is None:
            return
        self._release(live)
        self._send(live, StreamEvent(rid, "error", finished=True, error=error, status=status))

    def _release(self, live: _Live) -> None:
        with self._cv:
            self._in_flight -= live.weight

    @staticmethod
    def _send(live: _Live, event: StreamEvent) -> None:
        try:
            live.loop.call_soon_threadsafe(live.sink.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    def _publish_stats(self, *, force: bool) -> None:
        now = time.monotonic()
        if not force and now - self._stats_time < self._stats_interval_s:
            return
        try:
            self._stats = self._engine.stats()
        except Exception:  # noqa: BLE001 - stats are best effort
            log.exception("engine.stats() failed")
        self._stats_time = now
