"""The benchmarks' HTTP side: one streamed completion, and scrapes of the server's /metrics.

`stream_completion` posts one streaming `/v1/completions` request through an `httpx.AsyncClient`
and records each chunk of new tokens into a `latency.StreamTiming`. It asks for
`return_token_ids` (the server's extension, as in vLLM) so a chunk's token count is exact even
for models without a tokenizer; a server that ignores it is counted one token per chunk whose
choice moved. `stream_options.include_usage` gives the final token count.

`parse_metrics` reads a Prometheus text page into {metric name: {labels: value}};
`EngineSample.parse` picks out the crosspool series the benchmarks use.
"""
from __future__ import annotations

import dataclasses
import json
import re
import time
from typing import Callable, Optional

import httpx

from crosspool_jax.bench.latency import StreamOutcome, StreamTiming


def completion_body(model: str, prompt: list[int], max_tokens: int, **extra) -> dict:
    """A streaming greedy completion of exactly `max_tokens` tokens (EOS ignored)."""
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
            "return_token_ids": True, **extra}


def _chunk_tokens(choice: dict) -> int:
    ids = choice.get("token_ids")
    if ids is not None:
        return len(ids)
    return 1 if choice.get("text") or choice.get("finish_reason") is None else 0


async def stream_completion(client: httpx.AsyncClient, body: dict, timing: StreamTiming, *,
                            clock: Callable[[], float] = time.perf_counter,
                            cancel_after: Optional[int] = None) -> StreamOutcome:
    """POST `body` to /v1/completions and stream it; chunk times go into `timing` (stamped by
    `clock`). `cancel_after`: hang up after that many chunks with tokens."""
    usage = None
    chunks = 0
    token_ids: list[int] = []
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                text = (await r.aread())[:300]
                return StreamOutcome("failed", f"HTTP {r.status_code} {text!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    return StreamOutcome("failed", str(event["error"].get("message", event["error"])))
                if event.get("usage"):
                    usage = event["usage"]
                for choice in event.get("choices") or ():
                    token_ids += choice.get("token_ids") or []
                n = sum(_chunk_tokens(c) for c in event.get("choices") or ())
                if n:
                    timing.add(clock(), n)
                    chunks += 1
                    if cancel_after is not None and chunks >= cancel_after:
                        return StreamOutcome("cancelled")   # leaving the block hangs up
    except httpx.HTTPError as e:
        return StreamOutcome("failed", f"{type(e).__name__}: {e}")
    if usage is None:
        return StreamOutcome("failed", "stream ended without usage")
    return StreamOutcome("completed", completion_tokens=int(usage["completion_tokens"]), token_ids=token_ids)


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> dict[str, dict[tuple, float]]:
    """{name: {((label, value), ...): sample}} of a Prometheus text exposition."""
    out: dict[str, dict[tuple, float]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            continue
        labels = tuple(sorted(_LABEL.findall(m.group(2) or "")))
        try:
            out.setdefault(m.group(1), {})[labels] = float(m.group(3))
        except ValueError:
            continue
    return out


def labelled(series: dict[tuple, float], label: str) -> dict[str, float]:
    """{value of `label`: sample} of one metric's series."""
    return {dict(labels).get(label, ""): value for labels, value in series.items()}


@dataclasses.dataclass
class EngineSample:
    """The engine's state at `t` (seconds since a run's start; counters cumulative): from its
    stats snapshot in process, or from one /metrics page (`parse`; 0 where the server does
    not export a series)."""

    kv_pages_total: float
    kv_pages_used_by_model: dict[str, float]
    preemptions: float
    swaps_in: float
    swaps_out: float
    compiles: float
    waiting: float = 0.0
    running: float = 0.0
    engine_steps: float = 0.0           # engine steps that scheduled work
    continuations: float = 0.0          # engine steps dispatched before the previous one's tokens were in
    t: float = 0.0

    @property
    def kv_pages_used(self) -> float:
        return float(sum(self.kv_pages_used_by_model.values()))

    @classmethod
    def parse(cls, text: str, namespace: str = "crosspool") -> "EngineSample":
        m = parse_metrics(text)

        def one(name: str) -> float:
            return sum(m.get(f"{namespace}_{name}", {}).values())

        return cls(kv_pages_total=one("kv_pages_total"),
                   kv_pages_used_by_model=labelled(m.get(f"{namespace}_kv_pages_used", {}), "model"),
                   preemptions=one("preemptions_total"), swaps_in=one("swaps_in_total"),
                   swaps_out=one("swaps_out_total"), compiles=one("xla_compiles_total"),
                   waiting=one("queue_depth"), running=one("requests_running"), engine_steps=one("engine_steps_total"),
                   continuations=one("async_continuations_total"))
