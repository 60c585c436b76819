"""Tests of engine.stop_checker: every stop rule, min_tokens, and stop strings across deltas."""
import numpy as np
import pytest

from crosspool_jax.engine.stop_checker import StopDecision, check_stop, find_stop_string
from crosspool_jax.sampling_params import SamplingParams

EOS = 2


def _check(params, ids, text, offset=None, prompt=5, max_model_len=1000, eos=(EOS,)):
    offset = max(0, len(text) - 1) if offset is None else offset
    return check_stop(params, len(ids), ids[-1] if ids else None, offset, text, list(eos), prompt, max_model_len)


def test_eos_stops_unless_ignored():
    d = _check(SamplingParams(), [7, 8, EOS], "abc")
    assert d == StopDecision("stop", None, 3)
    assert _check(SamplingParams(ignore_eos=True), [7, 8, EOS], "abc") is None
    assert _check(SamplingParams(), [7, EOS, 8], "abc") is None  # only the new token counts


def test_stop_token_ids():
    p = SamplingParams(stop_token_ids=[11, 12])
    assert _check(p, [3, 12], "xy") == StopDecision("stop", 12, 2)
    assert _check(p, [12, 3], "xy") is None
    # stop ids still stop when ignore_eos is set.
    assert _check(SamplingParams(stop_token_ids=[11], ignore_eos=True), [11], "x").stop_reason == 11


def test_stop_string_removed_or_kept():
    p = SamplingParams(stop=["END", "\n\n"])
    d = _check(p, [1, 2, 3], "hello END more", offset=6)
    assert d == StopDecision("stop", "END", 6)
    keep = SamplingParams(stop=["END"], include_stop_str_in_output=True)
    assert _check(keep, [1, 2, 3], "hello END more", offset=6).truncate_text_to == 9


def test_stop_string_spanning_deltas_is_found_once():
    p = SamplingParams(stop=["STOP"], max_tokens=100)
    rng = np.random.default_rng(0)
    for _ in range(20):
        text = "".join(rng.choice(list("abS T"), size=rng.integers(0, 12))) + "STOP" + "xyz"
        start = text.index("STOP")
        cuts = sorted(set(rng.integers(1, len(text), size=4).tolist())) + [len(text)]
        prev, found = 0, None
        for n, cut in enumerate(cuts):
            d = _check(p, list(range(100, 101 + n)), text[:cut], offset=prev)
            prev = cut
            if d is not None:
                found = (cut, d)
                break
        cut, d = found
        assert d.stop_reason == "STOP" and d.truncate_text_to == start
        assert cut >= start + 4  # stops at the delta that completes the string, not earlier


def test_stop_string_search_window():
    # Entirely in the old text: not searched again; ending in the new text: found.
    assert find_stop_string(["ab"], "xxabyy", 4) is None
    assert find_stop_string(["ab"], "xxab", 3) == (2, "ab")
    assert find_stop_string(["ab"], "xxab", 4) is None  # nothing new
    # The earliest match wins; on the same start the one listed first.
    assert find_stop_string(["cd", "bc"], "abcde", 1) == (1, "bc")
    assert find_stop_string(["abc", "ab"], "zabc", 1) == (1, "abc")


def test_max_tokens_and_max_model_len():
    p = SamplingParams(max_tokens=3)
    assert _check(p, [5, 6], "ab") is None
    assert _check(p, [5, 6, 7], "abc") == StopDecision("length", None, 3)
    # The context is full at prompt + output == max_model_len.
    q = SamplingParams(max_tokens=None)
    assert _check(q, [5, 6], "ab", prompt=7, max_model_len=10) is None
    assert _check(q, [5, 6, 7], "abc", prompt=7, max_model_len=10).finish_reason == "length"
    # EOS on the last allowed token reports "stop".
    assert _check(p, [5, 6, EOS], "ab").finish_reason == "stop"


def test_min_tokens_holds_every_rule_but_a_full_context():
    p = SamplingParams(min_tokens=3, stop=["x"], stop_token_ids=[9], max_tokens=5)
    assert _check(p, [EOS], "") is None
    assert _check(p, [4, 9], "ab") is None
    assert _check(p, [4, 4], "ax", offset=1) is None
    assert _check(p, [4, 4, EOS], "abc").finish_reason == "stop"
    assert _check(p, [4, 4, 9], "abc").stop_reason == 9
    full = _check(p, [4, 4], "ab", prompt=8, max_model_len=10)
    assert full == StopDecision("length", None, 2)


def test_bad_arguments():
    with pytest.raises(ValueError, match="new_text_offset"):
        check_stop(SamplingParams(), 1, 1, 5, "ab", [EOS], 1, 10)
    with pytest.raises(ValueError, match="finish_reason"):
        StopDecision("done", None, 0)
    assert _check(SamplingParams(), [], "") is None
