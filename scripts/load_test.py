"""Bounded loopback load test of a running `python -m crosspool_jax.serve`.

    python scripts/load_test.py --url http://127.0.0.1:8000 --num_requests 200 --concurrency 32

Sends `num_requests` streaming completions (token-id prompts of random lengths, so models
without a tokenizer work too) spread uniformly over the served models, at most `concurrency`
at a time; a `disconnect_fraction` of the clients hang up after a few chunks. Then it checks
that every non-cancelled request completed, that the server is healthy, and that the KV pool
drains back to zero pages (read from /metrics), and prints requests/s, TTFT and TBT P50/P99.
`--malformed_fraction 0.1` mixes in malformed requests (out-of-range sampling values, unknown
fields, bad prompts, context overflows: `MALFORMED`) beside the same well-formed ones: each must
be refused with a 4xx, and the well-formed requests' token ids (`LoadReport.outputs`) must equal
a run without them. Exit status 1 if any check fails. `run_load()` is the same thing as a
function (the tests call it with small numbers).
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import statistics
import sys
import time
from typing import Optional

import httpx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from crosspool_jax.bench.http_client import EngineSample, completion_body, stream_completion  # noqa: E402
from crosspool_jax.bench.latency import StreamTiming, percentile  # noqa: E402


@dataclasses.dataclass
class LoadReport:
    wall_s: float
    completed: int
    cancelled: int
    failed: list[str]
    ttft_s: list[float]
    tbt_s: list[float]  # per completed request: its mean gap, (last token - first) / (tokens - 1)
    completion_tokens: int
    healthy: bool
    kv_pages_used: dict[str, float]
    outputs: dict[int, list[int]] = dataclasses.field(default_factory=dict)  # well-formed request -> token ids
    malformed_refused: int = 0

    @property
    def ok(self) -> bool:
        return not self.failed and self.healthy and not any(self.kv_pages_used.values())

    def summary(self) -> str:
        def pct(xs, q):
            value = percentile(xs, q)
            return float("nan") if value is None else value

        done = self.completed + self.cancelled
        lines = [
            f"requests: {self.completed} completed, {self.cancelled} cancelled, "
            f"{len(self.failed)} failed in {self.wall_s:.2f} s -> {done / self.wall_s:.2f} req/s, "
            f"{self.completion_tokens / self.wall_s:.1f} generated tok/s (completed requests)",
            f"TTFT ms: P50 {1e3 * pct(self.ttft_s, 50):.1f}  P99 {1e3 * pct(self.ttft_s, 99):.1f}"
            f"  mean {1e3 * (statistics.fmean(self.ttft_s) if self.ttft_s else float('nan')):.1f}",
            f"TBT ms:  P50 {1e3 * pct(self.tbt_s, 50):.2f}  P99 {1e3 * pct(self.tbt_s, 99):.2f}",
            f"server healthy: {self.healthy}; KV pages used after drain: {self.kv_pages_used}",
        ]
        lines += [f"FAILED: {f}" for f in self.failed[:10]]
        return "\n".join(lines)


# Malformed bodies (the model is filled in): every one must be refused with a 4xx, none may hurt
# a neighbour. Values that overflow int32, unknown fields, unsupported features, bad prompts.
MALFORMED: list[dict] = [
    {"prompt": [5, 6], "max_tokens": 3, "top_k": 2 ** 31},
    {"prompt": [5, 6], "max_tokens": 3, "min_tokens": 2 ** 31},
    {"prompt": [5, 6], "max_tokens": 3, "stop_token_ids": [2 ** 31]},
    {"prompt": [5, 6], "max_tokens": 3, "stop_token_ids": [10 ** 7]},
    {"prompt": [10 ** 7], "max_tokens": 3},
    {"prompt": 5, "max_tokens": 3},
    {"prompt": [5, 6], "max_token": 3},
    {"prompt": [5, 6], "max_tokens": 10 ** 9},
    {"prompt": [5, 6], "n": 10 ** 6},
    {"prompt": [5, 6], "temperature": -1},
    {"prompt": [5, 6], "response_format": {"type": "json_object"}},
    {"prompt": "\ud800"},
]


def kv_pages_used(metrics_text: str) -> dict[str, float]:
    """crosspool_kv_pages_used{model="..."} values of a /metrics page."""
    return EngineSample.parse(metrics_text).kv_pages_used_by_model


async def _malformed(client: httpx.AsyncClient, model: str, body: dict, report: LoadReport) -> None:
    try:
        # json.dumps escapes a lone surrogate ("\\ud800"), which is how a client can send one
        r = await client.post("/v1/completions", content=json.dumps({"model": model, **body}).encode(),
                              headers={"content-type": "application/json"})
    except httpx.HTTPError as e:
        report.failed.append(f"malformed {body}: {type(e).__name__}: {e}")
        return
    if 400 <= r.status_code < 500 and "error" in r.json():
        report.malformed_refused += 1
    else:
        report.failed.append(f"malformed {body}: HTTP {r.status_code} {r.text[:200]!r}")


async def _one(client: httpx.AsyncClient, index: int, model: str, prompt: list[int], max_tokens: int,
               cancel_after: Optional[int], report: LoadReport) -> None:
    timing = StreamTiming(sent=time.perf_counter())
    body = completion_body(model, prompt, max_tokens, ignore_eos=False)   # EOS may end it early
    outcome = await stream_completion(client, body, timing, cancel_after=cancel_after)
    if outcome.status == "cancelled":
        report.cancelled += 1
        return
    if outcome.status == "failed":
        report.failed.append(f"{model}: {outcome.error}")
        return
    report.completed += 1
    report.outputs[index] = outcome.token_ids
    report.completion_tokens += outcome.completion_tokens
    if timing.chunks:
        report.ttft_s.append(timing.ttft())
        gaps = timing.tbt_gaps()
        if gaps:
            report.tbt_s.append(statistics.fmean(gaps))


async def _run(url: str, *, num_requests: int, concurrency: int, max_tokens: tuple[int, int],
               prompt_len: tuple[int, int], disconnect_fraction: float, seed: int,
               api_key: Optional[str], timeout_s: float, models: Optional[list[str]],
               malformed_fraction: float = 0.0) -> LoadReport:
    rng = random.Random(seed)
    bad_rng = random.Random(seed + 1)           # the well-formed requests do not depend on it
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout_s,
                                 limits=limits) as client:
        if not models:
            models = [m["id"] for m in (await client.get("/v1/models")).json()["data"]]
        report = LoadReport(0.0, 0, 0, [], [], [], 0, False, {})
        sem = asyncio.Semaphore(concurrency)

        jobs = []
        for i in range(num_requests):
            model = models[i % len(models)]
            prompt = [rng.randrange(3, 100) for _ in range(rng.randint(*prompt_len))]
            n_tokens = rng.randint(*max_tokens)
            cancel = rng.randint(1, 3) if rng.random() < disconnect_fraction else None
            jobs.append(_one(client, i, model, prompt, n_tokens, cancel, report))
            if bad_rng.random() < malformed_fraction:
                jobs.append(_malformed(client, model, bad_rng.choice(MALFORMED), report))

        async def job(coro):
            async with sem:
                await coro

        t0 = time.perf_counter()
        await asyncio.gather(*(job(c) for c in jobs))
        report.wall_s = time.perf_counter() - t0
        deadline = time.monotonic() + 10
        while True:  # cancelled requests are aborted asynchronously: let the pool drain
            report.kv_pages_used = kv_pages_used((await client.get("/metrics")).text)
            if not any(report.kv_pages_used.values()) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        report.healthy = (await client.get("/health")).status_code == 200
        return report


def run_load(url: str, *, num_requests: int = 200, concurrency: int = 32,
             max_tokens: tuple[int, int] = (4, 64), prompt_len: tuple[int, int] = (4, 128),
             disconnect_fraction: float = 0.2, seed: int = 0, api_key: Optional[str] = None,
             timeout_s: float = 600.0, models: Optional[list[str]] = None,
             malformed_fraction: float = 0.0) -> LoadReport:
    return asyncio.run(_run(url, num_requests=num_requests, concurrency=concurrency,
                            max_tokens=max_tokens, prompt_len=prompt_len,
                            disconnect_fraction=disconnect_fraction, seed=seed, api_key=api_key,
                            timeout_s=timeout_s, models=models, malformed_fraction=malformed_fraction))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--num_requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--min_tokens", type=int, default=4)
    parser.add_argument("--max_tokens", type=int, default=64)
    parser.add_argument("--min_prompt", type=int, default=4)
    parser.add_argument("--max_prompt", type=int, default=128)
    parser.add_argument("--disconnect_fraction", type=float, default=0.2)
    parser.add_argument("--malformed_fraction", type=float, default=0.0)
    parser.add_argument("--models", default="", help="comma-separated; default: all served")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--api_key", default=None)
    parser.add_argument("--timeout_s", type=float, default=600.0)
    args = parser.parse_args()
    report = run_load(args.url, num_requests=args.num_requests, concurrency=args.concurrency,
                      max_tokens=(args.min_tokens, args.max_tokens),
                      prompt_len=(args.min_prompt, args.max_prompt),
                      disconnect_fraction=args.disconnect_fraction, seed=args.seed,
                      api_key=args.api_key, timeout_s=args.timeout_s,
                      models=[m for m in args.models.split(",") if m] or None,
                      malformed_fraction=args.malformed_fraction)
    print(report.summary())
    if args.malformed_fraction:
        print(f"malformed requests refused with a 4xx: {report.malformed_refused}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
