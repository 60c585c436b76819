"""The trace generator: its statistics match the requested ones within sampling error; seeded."""
import math

import numpy as np
import pytest

from crosspool_jax.bench import traces
from crosspool_jax.bench.generator import PROFILES, TraceSpec, generate, warmup_spec, zipf_weights

# A large trace: ~200k requests over 4 models, bursty.
BIG = TraceSpec(num_models=4, rate=100.0, cv=4.0, zipf=1.0, profile="chat", duration_s=2000.0, seed=7,
                long_tail_fraction=0.0)


@pytest.fixture(scope="module")
def big():
    return generate(BIG)


def test_rate_and_zipf_shares_match_within_sampling_error(big):
    # A renewal process of rate r observed T seconds has count variance ~ cv^2 r T.
    weights = zipf_weights(BIG.num_models, BIG.zipf)
    counts = {m: 0 for m in BIG.names()}
    for r in big:
        counts[r.model] += 1
    total_expected = BIG.rate * BIG.duration_s
    sd_total = BIG.cv * math.sqrt(total_expected)
    assert abs(len(big) - total_expected) < 5 * sd_total
    for i, name in enumerate(BIG.names()):
        expected = BIG.rate * weights[i] * BIG.duration_s
        assert abs(counts[name] - expected) < 5 * BIG.cv * math.sqrt(expected), (name, counts[name], expected)
    assert counts["m0"] > counts["m1"] > counts["m3"]          # most popular first


def test_each_models_inter_arrival_cv_matches(big):
    stats = traces.describe(big)["models"]
    # Gamma gaps of shape k: the sample variance's relative error is about sqrt((kurtosis - 1) / n)
    # with kurtosis 3 + 6/k, so the CV's relative error is half that.
    k = 1 / BIG.cv ** 2
    for name, m in stats.items():
        rel_sd = 0.5 * math.sqrt((2 + 6 / k) / m["requests"])
        assert abs(m["cv"] / BIG.cv - 1) < 5 * rel_sd, (name, m)


def test_poisson_when_cv_is_one():
    trace = generate(TraceSpec(num_models=1, rate=50.0, cv=1.0, duration_s=1000.0, seed=3))
    gaps = np.diff([0.0] + [r.arrival_s for r in trace])
    assert abs(np.std(gaps) / np.mean(gaps) - 1.0) < 0.05
    assert abs(np.mean(gaps) - 1 / 50.0) < 5 * (1 / 50.0) / math.sqrt(len(gaps))


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_length_medians_match_the_profile(profile):
    p = PROFILES[profile]
    trace = generate(TraceSpec(num_models=2, rate=200.0, duration_s=100.0, profile=profile, seed=1,
                               long_tail_fraction=0.0))
    n = len(trace)
    # The sample median of a log-normal: log-scale standard error sigma * sqrt(pi / 2n).
    for attr, median, sigma in (("prompt_tokens", p.prompt_median, p.prompt_sigma),
                                ("output_tokens", p.output_median, p.output_sigma)):
        got = np.median([getattr(r, attr) for r in trace])
        tolerance = 5 * sigma * math.sqrt(math.pi / (2 * n)) + 1 / median     # + integer rounding
        assert abs(math.log(got / median)) < tolerance, (attr, got, median)


def test_median_overrides_and_long_tail_fraction():
    spec = TraceSpec(num_models=3, rate=200.0, duration_s=100.0, prompt_len_median=300, output_len_median=40,
                     long_tail_fraction=0.1, long_tail_median=20000, seed=2)
    trace = generate(spec)
    n = len(trace)
    assert abs(np.median([r.output_tokens for r in trace]) / 40 - 1) < 0.05
    # prompts of the 300-median body are almost never above 6000 (e^(ln 20 / 1.0) ~ 1e-3 tail);
    # the tail's 20000-median prompts almost always are
    long = sum(r.prompt_tokens > 6000 for r in trace) / n
    assert abs(long - 0.1) < 5 * math.sqrt(0.1 * 0.9 / n) + 2e-3


def test_same_spec_same_trace_and_other_seed_differs():
    spec = TraceSpec(num_models=3, rate=5.0, cv=4.0, duration_s=60.0, seed=11)
    assert generate(spec) == generate(spec)
    assert generate(spec) != generate(TraceSpec(num_models=3, rate=5.0, cv=4.0, duration_s=60.0, seed=12))


def test_rate_only_rescales_time():
    """Traces differing only in rate are time-scaled copies (same requests, same lengths)."""
    slow = generate(TraceSpec(num_models=3, rate=2.0, cv=3.0, duration_s=200.0, seed=5))
    fast = generate(TraceSpec(num_models=3, rate=4.0, cv=3.0, duration_s=100.0, seed=5))
    assert len(slow) == len(fast) > 50
    for a, b in zip(slow, fast):
        assert (a.model, a.prompt_tokens, a.output_tokens) == (b.model, b.prompt_tokens, b.output_tokens)
        assert a.arrival_s == pytest.approx(2 * b.arrival_s, abs=3e-6)


def test_warmup_spec_is_shorter_same_shape_other_draws():
    spec = TraceSpec(num_models=2, rate=5.0, cv=4.0, duration_s=100.0)
    warm = warmup_spec(spec, 10.0)
    assert (warm.rate, warm.cv, warm.zipf, warm.profile, warm.duration_s) == (5.0, 4.0, 1.0, "chat", 10.0)
    head = [r for r in generate(spec) if r.arrival_s < 10.0]
    assert generate(warm) != head


@pytest.mark.parametrize("kwargs, message", [
    (dict(profile="novel"), "unknown profile 'novel'; known: chat, code, long"),
    (dict(cv=0.0), "cv must be > 0"),
    (dict(num_models=0), "num_models must be an integer >= 1"),
    (dict(long_tail_fraction=1.5), "long_tail_fraction must be in [0, 1]"),
    (dict(num_models=2, model_names=["a"]), "model_names must be 2 distinct names"),
])
def test_bad_spec_names_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        TraceSpec(**kwargs)
