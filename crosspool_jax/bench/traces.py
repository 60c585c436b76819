"""Trace records: one request each (arrival time, model, prompt and output lengths).

A trace file is JSONL, one object per line:

    {"arrival_s": 0.84, "model": "m3", "prompt_tokens": 1011, "output_tokens": 127}

sorted by arrival. Generated traces name their models `m0, m1, ...`, most popular first;
`map_models` puts trace model names onto the served models, `clip_to_context` fits each
request into its served model's context, `scale_to_rate` stretches or compresses arrival
times to a target mean request rate (same requests, same burst shape), and `describe`
measures a trace (rate, coefficient of variation of the inter-arrival gaps per model,
popularity shares, length medians).
"""
from __future__ import annotations

import collections
import dataclasses
import json
import math
import re
from typing import Iterable, Optional, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class TraceRequest:
    """One request of a trace; arrival_s counts from the trace's start."""

    arrival_s: float
    model: str
    prompt_tokens: int
    output_tokens: int

    def __post_init__(self):
        if not isinstance(self.arrival_s, (int, float)) or not math.isfinite(self.arrival_s) \
                or self.arrival_s < 0:
            raise ValueError(f"arrival_s must be a finite number >= 0, got {self.arrival_s!r}")
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model must be a non-empty string, got {self.model!r}")
        for name in ("prompt_tokens", "output_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")

    def to_json(self) -> dict:
        return {"arrival_s": round(float(self.arrival_s), 6), "model": self.model,
                "prompt_tokens": int(self.prompt_tokens), "output_tokens": int(self.output_tokens)}


FIELDS = ("arrival_s", "model", "prompt_tokens", "output_tokens")


def write_jsonl(requests: Iterable[TraceRequest], path: str) -> int:
    """Write a trace file; returns the number of requests."""
    n = 0
    with open(path, "w") as f:
        for r in requests:
            f.write(json.dumps(r.to_json()) + "\n")
            n += 1
    return n


def from_dict(obj: dict, where: str) -> TraceRequest:
    """A trace record from its JSON object; ValueError names `where` and the problem."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in FIELDS if k not in obj]
    if missing:
        raise ValueError(f"{where}: missing field(s) {', '.join(missing)} (a trace line has "
                         f"{', '.join(FIELDS)})")
    try:
        return TraceRequest(float(obj["arrival_s"]), obj["model"], obj["prompt_tokens"],
                            obj["output_tokens"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None


def read_jsonl(path: str) -> list[TraceRequest]:
    """Read a trace file (blank lines skipped), sorted by arrival."""
    out = []
    with open(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not JSON ({e.msg})") from None
            out.append(from_dict(obj, f"{path}:{lineno}"))
    return sort(out)


def sort(requests: Iterable[TraceRequest]) -> list[TraceRequest]:
    return sorted(requests, key=lambda r: (r.arrival_s, r.model))


def offered_rate(requests: Sequence[TraceRequest]) -> float:
    """Requests per second over the trace's span (its last arrival)."""
    if not requests:
        return 0.0
    span = max(r.arrival_s for r in requests)
    return len(requests) / span if span > 0 else math.inf


def scale_time(requests: Sequence[TraceRequest], factor: float) -> list[TraceRequest]:
    """Every arrival time multiplied by factor (> 0)."""
    if not factor > 0:
        raise ValueError(f"time scale must be > 0, got {factor}")
    return [dataclasses.replace(r, arrival_s=r.arrival_s * factor) for r in requests]


def scale_to_rate(requests: Sequence[TraceRequest], rate: float) -> list[TraceRequest]:
    """The same requests with arrival times scaled so that `offered_rate` is `rate`."""
    if not rate > 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    current = offered_rate(requests)
    if not requests or not math.isfinite(current):
        return list(requests)
    return scale_time(requests, current / rate)


def _model_order(requests: Sequence[TraceRequest]) -> list[str]:
    """Trace model names, most popular first: `m<i>` names by i when every name is one, else
    by request count (ties by name)."""
    counts = collections.Counter(r.model for r in requests)
    if all(re.fullmatch(r"m\d+", name) for name in counts):
        return sorted(counts, key=lambda name: int(name[1:]))
    return sorted(counts, key=lambda name: (-counts[name], name))


def parse_model_map(text: str) -> dict[str, str]:
    """'TRACE=SERVED,TRACE2=SERVED2' -> {TRACE: SERVED}."""
    out: dict[str, str] = {}
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        src, sep, dst = part.partition("=")
        if not sep or not src.strip() or not dst.strip():
            raise ValueError(f"--model_map: expected TRACE_MODEL=SERVED_MODEL, got {part!r}")
        if src.strip() in out:
            raise ValueError(f"--model_map: trace model {src.strip()!r} mapped twice")
        out[src.strip()] = dst.strip()
    return out


def map_models(requests: Sequence[TraceRequest], served: Sequence[str],
               model_map: Optional[dict[str, str]] = None) -> tuple[list[TraceRequest], dict[str, str]]:
    """Put the trace's model names onto served models; returns (requests, {trace: served}).

    Without a map, the trace's models (most popular first) take the served models in the order
    given. ValueError names every trace model left unmapped and every target not served.
    """
    order = _model_order(requests)
    if model_map:
        unmapped = [m for m in order if m not in model_map]
        if unmapped:
            raise ValueError(f"trace model(s) {', '.join(unmapped)} have no entry in --model_map "
                             f"(served: {', '.join(served)})")
        unknown = sorted({v for v in model_map.values() if v not in served})
        if unknown:
            raise ValueError(f"--model_map targets {', '.join(unknown)} are not served "
                             f"(served: {', '.join(served)})")
        mapping = {m: model_map[m] for m in order}
    else:
        if len(order) > len(served):
            raise ValueError(f"the trace has {len(order)} models ({', '.join(order)}) but only "
                             f"{len(served)} are served ({', '.join(served)}): serve more models "
                             f"or pass --model_map TRACE_MODEL=SERVED_MODEL,...")
        mapping = dict(zip(order, served))
    return [dataclasses.replace(r, model=mapping[r.model]) for r in requests], mapping


def clip_to_context(requests: Sequence[TraceRequest], max_model_len: dict[str, int]
                    ) -> tuple[list[TraceRequest], int]:
    """Fit every request into its model's context (prompt + output <= max_model_len): the output
    keeps its length where it can (at most max_model_len - 1), the prompt takes the rest.
    Models missing from `max_model_len` are not clipped. Returns (requests, number clipped)."""
    out, clipped = [], 0
    for r in requests:
        limit = max_model_len.get(r.model)
        if limit is None or r.prompt_tokens + r.output_tokens <= limit:
            out.append(r)
            continue
        if limit < 2:
            raise ValueError(f"model {r.model!r} has max_model_len {limit}: too short for any request")
        output = min(r.output_tokens, limit - 1)
        prompt = min(r.prompt_tokens, limit - output)
        out.append(dataclasses.replace(r, prompt_tokens=prompt, output_tokens=output))
        clipped += 1
    return out, clipped


def describe(requests: Sequence[TraceRequest]) -> dict:
    """A trace's measured statistics: overall rate, per model its share, rate and the coefficient
    of variation of its inter-arrival gaps, and the length medians."""
    by_model: dict[str, list[float]] = collections.defaultdict(list)
    for r in requests:
        by_model[r.model].append(r.arrival_s)
    span = max((r.arrival_s for r in requests), default=0.0)
    models = {}
    for name in _model_order(requests):
        times = np.sort(np.asarray(by_model[name]))
        gaps = np.diff(np.concatenate([[0.0], times]))
        cv = float(np.std(gaps) / np.mean(gaps)) if len(gaps) > 1 and np.mean(gaps) > 0 else None
        models[name] = {"requests": len(times), "share": len(times) / len(requests),
                        "rate": len(times) / span if span > 0 else None, "cv": cv}
    return {"requests": len(requests), "span_s": span, "rate": offered_rate(requests),
            "prompt_tokens_median": float(np.median([r.prompt_tokens for r in requests])) if requests else None,
            "output_tokens_median": float(np.median([r.output_tokens for r in requests])) if requests else None,
            "models": models}
