"""One request's stream timing, and the percentiles the benchmarks report.

A streamed request is timed by when it was sent and when each chunk of new tokens arrived
(`StreamTiming.chunks`: (time, number of tokens)); a chunk may carry several tokens (the
engine's multi-step decode, or a server that batches its writes). From that:

- TTFT: first chunk's time minus the send time;
- TBT, every gap between consecutive tokens: a chunk of n tokens arriving g seconds after the
  previous chunk adds n gaps of g/n; the tokens that arrive together with the first one add
  gaps of 0 (the wait for them is in the TTFT). So a request of N tokens has N - 1 gaps and
  they add up to last chunk - first chunk (the server's `crosspool_time_between_tokens_seconds`
  histogram counts the same way);
- end-to-end latency: last chunk's time minus the send time.

`percentile` interpolates linearly between order statistics (numpy's default) and is None for
no samples; `quantiles_ms` is the {p50, p90, p99, max} block of results.json, in ms.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np


@dataclasses.dataclass
class StreamTiming:
    """When a request was sent and when its chunks of tokens arrived (seconds, one clock)."""

    sent: float
    chunks: list[tuple[float, int]] = dataclasses.field(default_factory=list)

    def add(self, t: float, num_tokens: int) -> None:
        if num_tokens > 0:
            self.chunks.append((t, num_tokens))

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.chunks)

    def ttft(self) -> Optional[float]:
        return self.chunks[0][0] - self.sent if self.chunks else None

    def e2e(self) -> Optional[float]:
        return self.chunks[-1][0] - self.sent if self.chunks else None

    def tbt_gaps(self) -> list[float]:
        """Every gap between consecutive tokens (num_tokens - 1 of them)."""
        if not self.chunks:
            return []
        gaps = [0.0] * (self.chunks[0][1] - 1)
        for (t_prev, _), (t, n) in zip(self.chunks, self.chunks[1:]):
            gaps.extend([(t - t_prev) / n] * n)
        return gaps


@dataclasses.dataclass
class StreamOutcome:
    """How a streamed request ended: "completed", "cancelled" (the client hung up on purpose)
    or "failed" (`error` says why); `completion_tokens` as the server counted them, when known;
    `token_ids` the generated ids the stream carried (when the body asked `return_token_ids`)."""

    status: str
    error: Optional[str] = None
    completion_tokens: Optional[int] = None
    token_ids: list = dataclasses.field(default_factory=list)


def percentile(values: Sequence[float], q: float) -> Optional[float]:
    """The q-th percentile (0..100), linear between order statistics; None without samples."""
    if len(values) == 0:
        return None
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


QUANTILES = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("max", 100.0))


def quantiles_ms(values_s: Sequence[float]) -> dict[str, Optional[float]]:
    """{"p50", "p90", "p99", "max"} of seconds, in milliseconds (None without samples)."""
    out = {}
    for key, q in QUANTILES:
        value = percentile(values_s, q)
        out[key] = None if value is None else round(1e3 * value, 4)
    return out
