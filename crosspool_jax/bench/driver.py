"""The open-loop driver: every request of a trace is sent at its arrival time, whatever the
server's state, and streamed; the engine's state is sampled on the side.

`drive(requests, backend)` waits until `start + arrival_s` for each request (on a `Clock`),
starts it as its own task and moves on: a slow or overloaded server makes requests pile up,
it never delays the next send (the lag of each send behind its arrival time is recorded).
Each request asks for exactly its trace's output length (`max_tokens`, EOS ignored, greedy)
with a prompt of its trace's length: seeded random token ids (`prompt_ids`), different for
every request so that no prefix cache hit shortens a prefill. After the last arrival the
driver waits up to `drain_timeout_s` for the requests still running, then cancels them (they
count as unfinished). Meanwhile it probes the engine every `sample_interval_s` (KV pages in
use by model, preemptions, swaps, compiles).

Backends: `InProcessBackend` (an `AsyncEngine` in this process, no HTTP) and `HttpBackend` (a
running server, streaming /v1/completions through httpx, probing /metrics). Both stamp chunk
arrivals with the driver's clock, so a `VirtualClock` and a fake backend test the driver
without waiting.
"""
from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Callable, Optional, Protocol, Sequence

import numpy as np

from crosspool_jax.bench.http_client import EngineSample
from crosspool_jax.bench.latency import StreamOutcome, StreamTiming
from crosspool_jax.bench.traces import TraceRequest

FIRST_TOKEN_ID = 3          # ids below are often BOS/EOS/PAD: prompts avoid them


class Clock(Protocol):
    def now(self) -> float: ...

    async def sleep_until(self, t: float) -> None: ...


class MonotonicClock:
    """The host's monotonic clock (seconds)."""

    def now(self) -> float:
        return time.perf_counter()

    async def sleep_until(self, t: float) -> None:
        delay = t - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)


class VirtualClock:
    """A clock that jumps to whatever time is waited for (tests)."""

    def __init__(self, t: float = 0.0):
        self.t = t

    def now(self) -> float:
        return self.t

    async def sleep_until(self, t: float) -> None:
        self.t = max(self.t, t)
        await asyncio.sleep(0)


class Backend(Protocol):
    description: str

    def max_model_len(self) -> dict[str, int]: ...

    def token_id_limit(self, model: str) -> int: ...

    async def send(self, request_id: str, model: str, prompt: list[int], max_tokens: int,
                   timing: StreamTiming, clock: Callable[[], float]) -> StreamOutcome: ...

    async def probe(self) -> EngineSample: ...


@dataclasses.dataclass
class RequestResult:
    """One trace request as sent: `timing` on the driver's clock, relative to the run's start."""

    index: int
    request: TraceRequest
    timing: StreamTiming
    status: str = "pending"            # completed | failed | unfinished
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.status == "completed"


@dataclasses.dataclass
class RunRecord:
    """What one driven trace produced."""

    results: list[RequestResult]
    samples: list[EngineSample]
    before: EngineSample
    after: EngineSample
    duration_s: float                  # start to the last token (or the drain cut-off)
    max_send_lag_s: float


def prompt_ids(seed: int, index: int, length: int, limit: int) -> list[int]:
    """The seeded prompt of request `index`: `length` ids in [FIRST_TOKEN_ID, limit)."""
    rng = np.random.default_rng([seed, index])
    return rng.integers(FIRST_TOKEN_ID, max(limit, FIRST_TOKEN_ID + 1), length).tolist()


async def drive(requests: Sequence[TraceRequest], backend: Backend, *, clock: Optional[Clock] = None,
                sample_interval_s: float = 0.25, drain_timeout_s: float = 300.0, prompt_seed: int = 0,
                run_id: str = "run", progress: bool = False, label: str = "") -> RunRecord:
    """Send `requests` (sorted by arrival) open-loop through `backend`; see the module docstring."""
    clock = clock or MonotonicClock()
    before = await backend.probe()
    start = clock.now()
    results = [RequestResult(i, r, StreamTiming(sent=float("nan"))) for i, r in enumerate(requests)]
    samples: list[EngineSample] = []
    bar = _progress(len(results), label, progress)
    now_rel = lambda: clock.now() - start                  # noqa: E731 - every stamp is relative

    async def one(res: RequestResult, ids: list[int]) -> None:
        r = res.request
        try:
            outcome = await backend.send(f"{run_id}-{res.index}", r.model, ids, r.output_tokens,
                                         res.timing, now_rel)
        except asyncio.CancelledError:
            res.status, res.error = "unfinished", f"still running {drain_timeout_s:g} s after the last arrival"
            raise
        except Exception as e:  # noqa: BLE001 - one request's failure is a result, not a crash
            outcome = StreamOutcome("failed", f"{type(e).__name__}: {e}")
        res.status, res.error = outcome.status, outcome.error
        if outcome.status == "completed" and res.timing.num_tokens != r.output_tokens:
            res.status = "failed"
            res.error = f"streamed {res.timing.num_tokens} tokens, asked for {r.output_tokens}"
        bar.update(1)

    async def sample_loop() -> None:
        while True:
            sample = await backend.probe()
            sample.t = now_rel()
            samples.append(sample)
            await asyncio.sleep(sample_interval_s)

    sampler = asyncio.create_task(sample_loop())
    tasks, max_lag = [], 0.0
    try:
        for res in results:
            r = res.request
            ids = prompt_ids(prompt_seed, res.index, r.prompt_tokens, backend.token_id_limit(r.model))
            await clock.sleep_until(start + r.arrival_s)
            res.timing.sent = now_rel()
            max_lag = max(max_lag, res.timing.sent - r.arrival_s)
            tasks.append(asyncio.create_task(one(res, ids)))
            await asyncio.sleep(0)                         # the request goes out before the next wait
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=drain_timeout_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
    finally:
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
        bar.close()
    last_token = max((res.timing.chunks[-1][0] for res in results if res.timing.chunks), default=0.0)
    last_arrival = max((r.arrival_s for r in requests), default=0.0)
    after = await backend.probe()
    after.t = now_rel()
    return RunRecord(results, samples, before, after, max(last_token, last_arrival), max_lag)


def _progress(total: int, label: str, enabled: bool):
    from tqdm.auto import tqdm  # noqa: PLC0415

    return tqdm(total=total, desc=label or "requests", unit="req", disable=not enabled, leave=False)


class InProcessBackend:
    """An `AsyncEngine` of this process (started by the caller); no HTTP in between."""

    def __init__(self, async_engine, vocab_sizes: dict[str, int], *, token_id_max: int = 1000,
                 settle_s: float = 5.0):
        self.engine = async_engine
        self.vocab_sizes = dict(vocab_sizes)
        self.token_id_max = token_id_max
        self.settle_s = settle_s
        self.description = "in-process AsyncEngine"

    def max_model_len(self) -> dict[str, int]:
        return {m: self.engine.max_model_len(m) for m in self.engine.model_names}

    def token_id_limit(self, model: str) -> int:
        return min(self.vocab_sizes.get(model, self.token_id_max), self.token_id_max)

    async def send(self, request_id, model, prompt, max_tokens, timing, clock) -> StreamOutcome:
        from crosspool_jax.sampling_params import SamplingParams  # noqa: PLC0415
        from crosspool_jax.server.async_engine import Overloaded, SubRequest  # noqa: PLC0415

        sink: asyncio.Queue = asyncio.Queue()
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        try:
            self.engine.submit([SubRequest(request_id, model, prompt, params)], sink)
        except Overloaded as e:
            return StreamOutcome("failed", f"overloaded: {e}")
        try:
            while True:
                event = await sink.get()
                if event.kind == "error":
                    return StreamOutcome("failed", event.error)
                if event.kind != "delta":
                    continue
                timing.add(clock(), sum(len(c.token_ids) for c in event.choices))
                if event.finished:
                    return StreamOutcome("completed", completion_tokens=timing.num_tokens)
        except asyncio.CancelledError:
            self.engine.abort(request_id)
            raise

    async def probe(self) -> EngineSample:
        """The engine's latest stats snapshot; compiles from the process's counter (exact now).
        When nothing is in flight, first waits (up to settle_s) for the engine thread's idle
        snapshot, so the counters at the end of a run are final."""
        from crosspool_jax.runtime.compiles import compile_counter  # noqa: PLC0415

        deadline = time.monotonic() + self.settle_s
        while self.engine.num_in_flight == 0 and time.monotonic() < deadline:
            stats = self.engine.stats_snapshot()
            if stats is not None and stats.num_running == 0 and stats.num_waiting == 0:
                break
            await asyncio.sleep(0.02)
        s = self.engine.stats_snapshot()
        return EngineSample(float(getattr(s, "kv_pages_total", 0)),
                            dict(getattr(s, "kv_pages_used_by_model", None) or {}),
                            getattr(s, "num_preemptions", 0), getattr(s, "swaps_in", 0),
                            getattr(s, "swaps_out", 0), compile_counter().count,
                            getattr(s, "num_waiting", 0), getattr(s, "num_running", 0),
                            getattr(s, "engine_steps", 0), getattr(s, "continuations", 0))


class HttpBackend:
    """A running OpenAI-compatible server (this project's; other servers without /metrics or
    `max_model_len` in /v1/models still run, with fewer measures). Use as `async with`."""

    def __init__(self, url: str, *, api_key: Optional[str] = None, timeout_s: float = 3600.0,
                 token_id_max: int = 1000):
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.token_id_max = token_id_max
        self.description = f"HTTP {self.url}"
        self.client = None
        self.models: dict[str, Optional[int]] = {}

    async def __aenter__(self) -> "HttpBackend":
        import httpx  # noqa: PLC0415

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self.client = httpx.AsyncClient(base_url=self.url, headers=headers, timeout=self.timeout_s,
                                        limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        r = await self.client.get("/v1/models")
        r.raise_for_status()
        self.models = {m["id"]: m.get("max_model_len") for m in r.json()["data"]}
        return self

    async def __aexit__(self, *exc) -> None:
        await self.client.aclose()

    def max_model_len(self) -> dict[str, int]:
        return {m: n for m, n in self.models.items() if n}

    def token_id_limit(self, model: str) -> int:
        return self.token_id_max

    async def send(self, request_id, model, prompt, max_tokens, timing, clock) -> StreamOutcome:
        from crosspool_jax.bench.http_client import completion_body, stream_completion  # noqa: PLC0415

        return await stream_completion(self.client, completion_body(model, prompt, max_tokens), timing,
                                       clock=clock)

    async def probe(self) -> EngineSample:
        try:
            r = await self.client.get("/metrics")
            return EngineSample.parse(r.text if r.status_code == 200 else "")
        except Exception:  # noqa: BLE001 - a server without /metrics: zeros
            return EngineSample.parse("")
