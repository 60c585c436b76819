"""What a decode step launches on the GPU: kernels per token and per layer, and the top ops.

`summarize_kernels` reads the GPU events of a profiler trace taken over decode steps only
(`pallas_kernels.timing.gpu_kernel_events`: (name, start_ns, duration_ns), memcpy and memset
included) and reports them per decoded token: how many kernels, how many per layer, the busy
time (the union of the events' intervals) against the span from the first to the last event,
and the kinds of op that take the most time (`op_kind`: the GPU kernel's name without numeric
suffixes, so every layer's `loop_fusion_12`, `loop_fusion_57`, ... count as one kind). `scripts/profile_decode.py --kernels` prints it.
"""
from __future__ import annotations

import collections
import dataclasses
import re

_SUFFIX = re.compile(r"([._-]\d+)+$")
_BRACKET = re.compile(r"\[(.*)\]$")


def op_kind(name: str) -> str:
    """The kind of a trace event: its GPU kernel's name (in brackets after the HLO op, as
    `gpu_kernel_events` writes it) without numeric suffixes, else its name so stripped:
    "fusion.123 [loop_fusion_7]" -> "loop_fusion", "custom-call.5 [ragged_paged_mla_bk32_ns16]"
    -> "ragged_paged_mla_bk32_ns16", "Memcpy DtoD" stays."""
    kernel = _BRACKET.search(name)
    base = (kernel.group(1) if kernel else name).strip()
    return _SUFFIX.sub("", base) or base


@dataclasses.dataclass
class KernelSummary:
    tokens: int                     # decode tokens (one sequence's token = 1) the events produced
    num_layers: int
    kernels: int                    # events in the trace window
    busy_us: float                  # union of the events' intervals
    span_us: float                  # first event's start to the last event's end
    top: list                       # [(kind, events, total us)], the most time first

    @property
    def kernels_per_token(self) -> float:
        return self.kernels / self.tokens

    @property
    def kernels_per_layer(self) -> float:
        return self.kernels_per_token / self.num_layers

    def lines(self) -> list[str]:
        """The summary as printable lines (per decoded token)."""
        t = self.tokens
        out = [f"GPU kernels over {t} decode tokens: {self.kernels_per_token:.1f} per token, "
               f"{self.kernels_per_layer:.1f} per layer ({self.num_layers} layers); busy "
               f"{self.busy_us / t:.1f} us per token of a {self.span_us / t:.1f} us span",
               f"  {'op kind':48s} {'per token':>10s} {'us/token':>10s} {'share':>7s}"]
        for kind, count, total_us in self.top:
            out.append(f"  {kind[:48]:48s} {count / t:10.2f} {total_us / t:10.2f} "
                       f"{100 * total_us / max(self.busy_us, 1e-9):6.1f}%")
        return out


def busy_ns(events) -> int:
    """The union of the events' intervals, ns: events [(name, start_ns, duration_ns)]."""
    busy, end = 0, None
    for _, start, dur in sorted(events, key=lambda e: e[1]):
        stop = start + dur
        if end is None or start > end:
            busy += dur
            end = stop
        elif stop > end:
            busy += stop - end
            end = stop
    return busy


def summarize_kernels(events, *, tokens: int, num_layers: int, top: int = 15) -> KernelSummary:
    """events: [(name, start_ns, duration_ns)] of a trace over `tokens` decode tokens of a model of
    `num_layers` layers."""
    if tokens < 1 or num_layers < 1:
        raise ValueError(f"summarize_kernels: tokens ({tokens}) and num_layers ({num_layers}) must be >= 1")
    events = sorted(events, key=lambda e: e[1])
    span_ns = (max(s + d for _, s, d in events) - events[0][1]) if events else 0
    by_kind: dict[str, list] = collections.defaultdict(lambda: [0, 0])
    for name, _, dur in events:
        entry = by_kind[op_kind(name)]
        entry[0] += 1
        entry[1] += dur
    ranked = sorted(by_kind.items(), key=lambda kv: -kv[1][1])[:top]
    return KernelSummary(tokens, num_layers, len(events), busy_ns(events) / 1e3, span_ns / 1e3,
                         [(kind, count, ns / 1e3) for kind, (count, ns) in ranked])
