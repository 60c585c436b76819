"""Seeded synthetic traces of many models: Zipf popularity, Gamma arrivals, length profiles.

- Popularity: model i (0-based, `m<i>`) gets the share w_i = (i+1)^-a / sum_j (j+1)^-a of the
  total request rate (a = `zipf`; 0 is uniform).
- Arrivals: each model is a renewal process whose inter-arrival gaps are Gamma-distributed
  with mean 1 / (rate * w_i) and coefficient of variation `cv` (shape 1/cv^2): cv 1 is Poisson,
  larger cv clusters requests into bursts separated by long idle stretches (BurstGPT measured
  bursty traffic well above 1).
- Lengths: log-normal around a named profile's medians (below); a `long_tail_fraction` of the
  requests draw their prompt around `long_tail_median` instead (long-context requests).

Each model's arrivals and lengths come from their own random stream (numpy `SeedSequence`
spawned from `seed`), so the same spec gives the same trace, and traces that differ only in
`rate` are time-scaled copies of each other up to where `duration_s` cuts them.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from crosspool_jax.bench.traces import TraceRequest, sort

MAX_PROMPT_TOKENS = 1 << 17
MAX_OUTPUT_TOKENS = 1 << 14


@dataclasses.dataclass(frozen=True)
class LengthProfile:
    """Log-normal prompt and output lengths (median, sigma of the log) and the long-context tail."""

    prompt_median: int
    output_median: int
    prompt_sigma: float
    output_sigma: float
    long_tail_fraction: float
    long_tail_median: int
    long_tail_sigma: float = 0.3
    about: str = ""


PROFILES = {
    "chat": LengthProfile(1020, 129, 1.0, 0.8, 0.02, 16384,
                          about="like Azure's conversation trace: prompt median ~1,020, output ~129"),
    "code": LengthProfile(1500, 13, 0.8, 1.0, 0.02, 16384,
                          about="like Azure's code trace: prompt median ~1,500, output ~13"),
    "long": LengthProfile(7000, 180, 0.55, 0.6, 0.05, 32768,
                          about="like Mooncake: prompt mean ~8k (median 7,000), output ~180"),
}


def zipf_weights(num_models: int, exponent: float) -> np.ndarray:
    """Popularity shares of models 0..n-1 (most popular first), summing to 1."""
    w = np.arange(1, num_models + 1, dtype=np.float64) ** -float(exponent)
    return w / w.sum()


@dataclasses.dataclass(frozen=True)
class TraceSpec:
    """What `generate` draws. rate: requests/s over all models; cv: each model's inter-arrival
    coefficient of variation; None medians/fraction: the profile's."""

    num_models: int = 8
    rate: float = 4.0
    cv: float = 1.0
    zipf: float = 1.0
    profile: str = "chat"
    duration_s: float = 600.0
    seed: int = 0
    prompt_len_median: Optional[int] = None
    output_len_median: Optional[int] = None
    long_tail_fraction: Optional[float] = None
    long_tail_median: Optional[int] = None
    model_names: Optional[Sequence[str]] = None

    def __post_init__(self):
        if self.profile not in PROFILES:
            raise ValueError(f"unknown profile {self.profile!r}; known: {', '.join(PROFILES)}")
        if not isinstance(self.num_models, int) or self.num_models < 1:
            raise ValueError(f"num_models must be an integer >= 1, got {self.num_models!r}")
        for name in ("rate", "cv", "duration_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not self.zipf >= 0:
            raise ValueError(f"zipf must be >= 0, got {self.zipf!r}")
        for name in ("prompt_len_median", "output_len_median", "long_tail_median"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value!r}")
        if self.long_tail_fraction is not None and not 0 <= self.long_tail_fraction <= 1:
            raise ValueError(f"long_tail_fraction must be in [0, 1], got {self.long_tail_fraction!r}")
        if self.model_names is not None and (len(self.model_names) != self.num_models
                                             or len(set(self.model_names)) != self.num_models):
            raise ValueError(f"model_names must be {self.num_models} distinct names, got "
                             f"{list(self.model_names)}")

    def lengths(self) -> LengthProfile:
        """The profile with this spec's overrides applied."""
        base = PROFILES[self.profile]
        overrides = {k: v for k, v in (("prompt_median", self.prompt_len_median),
                                       ("output_median", self.output_len_median),
                                       ("long_tail_fraction", self.long_tail_fraction),
                                       ("long_tail_median", self.long_tail_median)) if v is not None}
        return dataclasses.replace(base, **overrides)

    def names(self) -> list[str]:
        return list(self.model_names) if self.model_names else [f"m{i}" for i in range(self.num_models)]


def _arrivals(rng: np.random.Generator, rate: float, cv: float, duration_s: float) -> np.ndarray:
    """Arrival times in [0, duration_s) of a renewal process with Gamma gaps (mean 1/rate, CV cv)."""
    shape = 1.0 / (cv * cv)
    scale = 1.0 / (rate * shape)
    times: list[np.ndarray] = []
    t = 0.0
    batch = int(rate * duration_s * 1.1) + 16
    while t < duration_s:
        gaps = rng.gamma(shape, scale, size=batch)
        chunk = t + np.cumsum(gaps)
        times.append(chunk)
        t = float(chunk[-1])
    out = np.concatenate(times) if times else np.zeros(0)
    return out[out < duration_s]


def _lognormal(rng: np.random.Generator, median: float, sigma: float, size: int, cap: int) -> np.ndarray:
    x = np.rint(median * np.exp(sigma * rng.standard_normal(size)))
    return np.clip(x, 1, cap).astype(np.int64)


def generate(spec: TraceSpec) -> list[TraceRequest]:
    """The trace `spec` describes, sorted by arrival."""
    profile = spec.lengths()
    weights = zipf_weights(spec.num_models, spec.zipf)
    names = spec.names()
    streams = np.random.SeedSequence(spec.seed).spawn(spec.num_models)
    out: list[TraceRequest] = []
    for i, (name, stream) in enumerate(zip(names, streams)):
        arrival_rng, length_rng = (np.random.default_rng(s) for s in stream.spawn(2))
        times = _arrivals(arrival_rng, spec.rate * weights[i], spec.cv, spec.duration_s)
        n = len(times)
        # Draw lengths in blocks of a fixed size so that request j of a model gets the same
        # lengths whatever the rate (a faster trace only appends requests).
        prompts, outputs = [], []
        block = 1024
        for _ in range(-(-n // block)):
            body = _lognormal(length_rng, profile.prompt_median, profile.prompt_sigma, block, MAX_PROMPT_TOKENS)
            outputs.append(_lognormal(length_rng, profile.output_median, profile.output_sigma, block,
                                      MAX_OUTPUT_TOKENS))
            in_tail = length_rng.random(block) < profile.long_tail_fraction
            tail = _lognormal(length_rng, profile.long_tail_median, profile.long_tail_sigma, block,
                              MAX_PROMPT_TOKENS)
            prompts.append(np.where(in_tail, tail, body))
        prompt = np.concatenate(prompts)[:n] if n else np.zeros(0, np.int64)
        output = np.concatenate(outputs)[:n] if n else np.zeros(0, np.int64)
        out.extend(TraceRequest(round(float(t), 6), name, int(p), int(o))
                   for t, p, o in zip(times, prompt, output))
    return sort(out)


def warmup_spec(spec: TraceSpec, duration_s: float) -> TraceSpec:
    """A shorter trace of the same shape (rates, CV, popularity, lengths) with other draws."""
    return dataclasses.replace(spec, duration_s=duration_s, seed=spec.seed + 1_000_003)
