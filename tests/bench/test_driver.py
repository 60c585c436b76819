"""The open-loop driver sends at the trace's times; TTFT/TBT are exact on hand-made streams;
results follow from hand-made records; both backends stream every token of a fake engine."""
import asyncio
import json
import os
import sys

import httpx
import pytest

from crosspool_jax.bench import results as results_lib
from crosspool_jax.bench.driver import (EngineSample, HttpBackend, InProcessBackend, RequestResult,
                                        RunRecord, VirtualClock, drive, prompt_ids)
from crosspool_jax.bench.http_client import completion_body, stream_completion
from crosspool_jax.bench.latency import StreamOutcome, StreamTiming, percentile, quantiles_ms
from crosspool_jax.bench.traces import TraceRequest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "server"))
from server_fake_engine import FakeEngine  # noqa: E402
from server_live import start_fake_server  # noqa: E402

TRACE = [TraceRequest(0.0, "a", 4, 3), TraceRequest(0.25, "b", 7, 1), TraceRequest(0.25, "a", 2, 2),
         TraceRequest(3.5, "b", 5, 4), TraceRequest(10.125, "a", 9, 2)]


class ScriptedBackend:
    """Streams each request's tokens at once; records when (on the driver's clock) it was sent."""

    description = "scripted"

    def __init__(self, hang_model=None):
        self.sent = []
        self.cancelled = []
        self.hang_model = hang_model
        self.probes = 0

    def max_model_len(self):
        return {}

    def token_id_limit(self, model):
        return 50

    async def send(self, request_id, model, prompt, max_tokens, timing, clock):
        self.sent.append((request_id, model, prompt, max_tokens, clock()))
        if model == self.hang_model:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled.append(request_id)
                raise
        timing.add(clock(), max_tokens)
        return StreamOutcome("completed", completion_tokens=max_tokens)

    async def probe(self):
        self.probes += 1
        return EngineSample(kv_pages_total=100, kv_pages_used_by_model={"a": 2.0, "b": 1.0},
                            preemptions=self.probes, swaps_in=0, swaps_out=0, compiles=5 * self.probes)


def test_sends_at_the_trace_arrival_times_with_the_trace_lengths():
    backend, clock = ScriptedBackend(), VirtualClock(100.0)
    record = asyncio.run(drive(TRACE, backend, clock=clock, prompt_seed=3, sample_interval_s=0.01))
    assert [s[4] for s in backend.sent] == [r.arrival_s for r in TRACE]      # relative to the start, exact
    assert [(s[1], len(s[2]), s[3]) for s in backend.sent] == [(r.model, r.prompt_tokens, r.output_tokens)
                                                               for r in TRACE]
    assert backend.sent[0][2] == prompt_ids(3, 0, 4, 50)
    assert len({tuple(s[2]) for s in backend.sent}) == len(TRACE)             # no shared prefixes
    assert all(3 <= t < 50 for s in backend.sent for t in s[2])
    assert record.max_send_lag_s == 0.0 and record.duration_s == 10.125
    assert [r.status for r in record.results] == ["completed"] * len(TRACE)


def test_requests_still_running_after_the_drain_timeout_are_cancelled():
    backend = ScriptedBackend(hang_model="b")
    record = asyncio.run(drive(TRACE, backend, clock=VirtualClock(), drain_timeout_s=0.05))
    status = {r.index: r.status for r in record.results}
    assert status == {0: "completed", 1: "unfinished", 2: "completed", 3: "unfinished", 4: "completed"}
    assert sorted(backend.cancelled) == ["run-1", "run-3"]


def test_ttft_and_every_gap_on_a_hand_made_stream():
    timing = StreamTiming(sent=1.0, chunks=[(1.5, 2), (1.75, 1), (2.5, 3)])
    assert timing.ttft() == 0.5 and timing.e2e() == 1.5 and timing.num_tokens == 6
    assert timing.tbt_gaps() == [0.0, 0.25, 0.25, 0.25, 0.25]
    assert StreamTiming(sent=0.0).tbt_gaps() == [] and StreamTiming(sent=0.0).ttft() is None
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5 and percentile([], 99) is None
    assert quantiles_ms([0.001, 0.002, 0.003]) == {"p50": 2.0, "p90": 2.8, "p99": 2.98, "max": 3.0}


def _sse(*events):
    return "".join(f"data: {e}\n\n" for e in events).encode()


@pytest.mark.parametrize("chunks, want", [
    # token ids in every chunk (the server's return_token_ids); the usage chunk moves nothing
    (['{"choices": [{"index": 0, "text": "", "token_ids": [5, 6]}]}',
      '{"choices": [{"index": 0, "text": "", "token_ids": [7]}]}',
      '{"choices": [{"index": 0, "text": "", "token_ids": [8, 9, 10], "finish_reason": "length"}]}',
      '{"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 6}}', "[DONE]"],
     StreamOutcome("completed", completion_tokens=6, token_ids=[5, 6, 7, 8, 9, 10])),
])
def test_http_stream_timing_is_exact(chunks, want):
    times = iter([10.5, 10.75, 11.5])

    def handler(request):
        body = json.loads(request.content)
        assert body["return_token_ids"] and body["ignore_eos"] and body["max_tokens"] == 6
        return httpx.Response(200, content=_sse(*chunks))

    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://x") as client:
            timing = StreamTiming(sent=10.0)
            outcome = await stream_completion(client, completion_body("m", [1, 2, 3], 6), timing,
                                              clock=lambda: next(times))
            return outcome, timing

    outcome, timing = asyncio.run(go())
    assert outcome == want
    assert timing.chunks == [(10.5, 2), (10.75, 1), (11.5, 3)]
    assert timing.ttft() == 0.5 and timing.tbt_gaps() == [0.0, 0.25, 0.25, 0.25, 0.25]


@pytest.mark.parametrize("response, error", [
    (httpx.Response(400, json={"error": {"message": "prompt too long"}}), "HTTP 400"),
    (httpx.Response(200, content=_sse('{"error": {"message": "engine step failed"}}', "[DONE]")),
     "engine step failed"),
    (httpx.Response(200, content=_sse('{"choices": [{"index": 0, "text": "x"}]}', "[DONE]")),
     "stream ended without usage"),
])
def test_http_failures_are_reported(response, error):
    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(lambda r: response),
                                     base_url="http://x") as client:
            return await stream_completion(client, completion_body("m", [1], 2), StreamTiming(0.0))

    outcome = asyncio.run(go())
    assert outcome.status == "failed" and error in outcome.error


def _record():
    """Four requests of two models over 4 s: a fast one, a slow first token, a stall, a failure."""
    def res(i, model, sent, chunks, status="completed"):
        out = sum(n for _, n in chunks) or 1
        return RequestResult(i, TraceRequest(sent, model, 5, out), StreamTiming(sent, chunks), status)

    results = [res(0, "a", 0.0, [(0.1, 1), (0.15, 1), (0.2, 1)]),          # TTFT 100 ms, gaps 50 ms
               res(1, "a", 1.0, [(2.5, 1), (2.55, 1)]),                      # TTFT 1500 ms: misses
               res(2, "b", 2.0, [(2.1, 1), (2.3, 1), (2.35, 1)]),            # a 200 ms gap: misses
               res(3, "b", 3.0, [], status="failed")]
    before = EngineSample(t=0.0, kv_pages_total=100, kv_pages_used_by_model={}, preemptions=1, swaps_in=2,
                          swaps_out=0, compiles=40, engine_steps=10, continuations=4)
    after = EngineSample(t=4.0, kv_pages_total=100, kv_pages_used_by_model={}, preemptions=4, swaps_in=3,
                         swaps_out=1, compiles=41, engine_steps=50, continuations=34)
    samples = [EngineSample(100, {"a": a, "b": b}, 0, 0, 0, 40, t=t) for t, a, b in
               ((0.0, 0, 0), (1.0, 3, 0), (2.0, 3, 5))]
    return RunRecord(results, samples, before, after, duration_s=4.0, max_send_lag_s=0.2)


def test_results_from_a_hand_made_record():
    out = results_lib.build(_record(), results_lib.Slo(ttft_ms=1000, tbt_ms=100), run_info={"mode": "shared"})
    o = out["overall"]
    assert (o["requests"], o["completed"], o["failed"], o["unfinished"]) == (4, 3, 1, 0)
    assert o["slo_attainment"] == 0.25 and o["goodput_rps"] == 0.25
    assert o["throughput_tok_s"] == 8 / 4 and o["request_throughput_rps"] == 3 / 4
    assert o["ttft_ms"]["max"] == pytest.approx(1500.0) and o["tbt_ms"]["max"] == pytest.approx(200.0)
    assert o["tbt_samples"] == 5
    assert (o["compiles_in_window"], o["preemptions"], o["swaps_in"], o["swaps_out"]) == (1, 3, 1, 1)
    assert (o["engine_steps"], o["steps_run_ahead"]) == (40, 30)
    assert o["kv_pages_peak"] == 8 and o["kv_pages_total"] == 100
    assert any("1 XLA compile(s) during the measured window" in n for n in o["notes"])
    assert any("1 request(s) failed" in n for n in o["notes"])
    assert any("behind the trace's arrival times" in n for n in o["notes"])
    assert out["per_model"]["a"]["slo_attainment"] == 0.5 and out["per_model"]["b"]["completed"] == 1
    assert out["kv_pages"]["by_model"]["b"] == [0, 0, 5]
    for block in [o] + list(out["per_model"].values()):
        assert set(block["ttft_ms"]) == set(block["tbt_ms"]) == {"p50", "p90", "p99", "max"}
    assert "| **all** | 4 | 3 |" in results_lib.run_markdown(out)


def test_in_process_backend_streams_every_token_of_a_fake_engine():
    from crosspool_jax.server import AsyncEngine

    engine = FakeEngine(models=("a", "b"), tokenizerless=("a", "b"), tokens_per_step=3)
    async_engine = AsyncEngine(engine, stats_interval_s=0.01)
    async_engine.start()
    try:
        backend = InProcessBackend(async_engine, {"a": 40, "b": 40}, settle_s=1.0)
        trace = [TraceRequest(0.01 * i, "ab"[i % 2], 3 + i, 1 + 2 * i) for i in range(6)]
        record = asyncio.run(drive(trace, backend, sample_interval_s=0.01))
    finally:
        async_engine.shutdown()
    assert [r.status for r in record.results] == ["completed"] * 6
    assert [r.timing.num_tokens for r in record.results] == [r.output_tokens for r in trace]
    assert [len(r.timing.tbt_gaps()) for r in record.results] == [r.output_tokens - 1 for r in trace]
    assert max(n for r in record.results for _, n in r.timing.chunks) == 3     # multi-token chunks


def test_http_backend_against_a_live_server():
    live, server = start_fake_server(tokens_per_step=2)
    try:
        trace = [TraceRequest(0.005 * i, "ab"[i % 2], 2 + i, 1 + i) for i in range(8)]

        async def go():
            async with HttpBackend(server.url) as backend:
                assert backend.max_model_len() == {"alpha": 64, "beta": 64}
                return await drive(trace, backend, sample_interval_s=0.01)

        from crosspool_jax.bench.traces import map_models
        trace = map_models(trace, ["alpha", "beta"])[0]
        record = asyncio.run(go())
    finally:
        live.__exit__(None, None, None)
    assert [r.status for r in record.results] == ["completed"] * 8, [r.error for r in record.results]
    assert [r.timing.num_tokens for r in record.results] == [r.output_tokens for r in trace]
    # the engine's state comes from /metrics: the fake's pool, and its one swap-in (beta, first used)
    assert record.before.kv_pages_total == 1000 and record.before.swaps_in == 0
    assert record.after.swaps_in == 1
    assert record.after.engine_steps > record.before.engine_steps        # crosspool_engine_steps_total
