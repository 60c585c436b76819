"""Tests of SamplingParams validation: every invalid field raises ValueError naming it."""
import numpy as np
import pytest

from crosspool_jax.sampling_params import SamplingParams

_INVALID = [
    ("n", 0), ("n", 1.5), ("n", True),
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", float("inf")),
    ("temperature", "hot"),
    ("top_p", 0.0), ("top_p", 1.01), ("top_p", float("nan")),
    ("top_k", -2), ("top_k", 2.5),
    ("min_p", -0.01), ("min_p", 1.5),
    ("presence_penalty", 2.5), ("presence_penalty", -2.01),
    ("frequency_penalty", -3.0), ("frequency_penalty", float("nan")),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0),
    ("n", 2 ** 31), ("top_k", 2 ** 31), ("min_tokens", 2 ** 31), ("max_tokens", 2 ** 31),
    ("stop_token_ids", [2 ** 31]), ("seed", 2 ** 64), ("stop", ["\ud800"]),
    ("truncate_prompt_tokens", 0), ("truncate_prompt_tokens", 1.5),
    ("prompt_logprobs", -1), ("prompt_logprobs", 21), ("prompt_logprobs", 1.0),
    ("logit_bias", {"1": 2.0}), ("logit_bias", {1: float("nan")}), ("logit_bias", {-1: 1.0}),
    ("logit_bias", [1, 2]), ("logit_bias", {i: 1.0 for i in range(129)}),
    ("allowed_token_ids", []), ("allowed_token_ids", [1.5]), ("allowed_token_ids", [-3]),
    ("allowed_token_ids", list(range(129))), ("allowed_token_ids", 5),
    ("bad_words", ["x", " "]), ("bad_words", "x"), ("bad_words", ["a" * 257]), ("bad_words", ["w"] * 65),
    ("max_tokens", 0), ("max_tokens", 3.0),
    ("min_tokens", -1), ("min_tokens", 1.0),
    ("seed", 1.5), ("seed", "7"),
    ("logprobs", -1), ("logprobs", 21), ("logprobs", 2.0),
    ("stop", ""), ("stop", ["ok", ""]), ("stop", 5), ("stop", ["ok", 3]),
    ("stop_token_ids", [-1]), ("stop_token_ids", ["a"]), ("stop_token_ids", 7),
    ("ignore_eos", 1), ("include_stop_str_in_output", "yes"), ("skip_special_tokens", None),
    ("output_kind", 1), ("output_kind", "DELTA"),
]


@pytest.mark.parametrize("field,value", _INVALID)
def test_invalid_field_raises_naming_it(field, value):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field}:"):
        SamplingParams(**{field: value})


def test_vllm_logits_processor_fields_accepted():
    sp = SamplingParams(prompt_logprobs=0, logit_bias={3: -100.0, 7: 2.5}, allowed_token_ids=list(range(128)),
                        bad_words=["w"] * 64)
    assert sp.has_logits_processors and sp.prompt_logprobs == 0
    assert not SamplingParams().has_logits_processors


def test_min_tokens_above_max_tokens():
    with pytest.raises(ValueError, match=r"SamplingParams\.min_tokens:.*max_tokens"):
        SamplingParams(min_tokens=5, max_tokens=4)


def test_valid_params_normalised():
    rng = np.random.default_rng(0)
    t, p = float(rng.uniform(0.1, 2)), float(rng.uniform(0.1, 1))
    sp = SamplingParams(temperature=t, top_p=p, top_k=-1, stop="###", stop_token_ids=(np.int64(4), 9),
                        seed=int(rng.integers(1 << 40)), max_tokens=None, min_tokens=3, logprobs=0,
                        repetition_penalty=1.2)
    assert sp.stop == ["###"] and sp.stop_token_ids == [4, 9]
    assert not sp.greedy and sp.needs_penalties
    assert SamplingParams(temperature=0).greedy and not SamplingParams().needs_penalties
    assert SamplingParams(stop=None, stop_token_ids=None).stop == []


def test_int32_edges_accepted_and_vllm_values():
    sp = SamplingParams(top_k=2 ** 31 - 1, min_tokens=2 ** 31 - 1, max_tokens=None,
                        stop_token_ids=[2 ** 31 - 1], repetition_penalty=3.0, seed=2 ** 64 - 1)
    assert sp.top_k == 2 ** 31 - 1 and sp.repetition_penalty == 3.0


def test_values_changed_after_construction_are_caught_by_validate():
    sp = SamplingParams()
    sp.top_k = 2 ** 31
    with pytest.raises(ValueError, match=r"SamplingParams\.top_k:"):
        sp.validate()


def test_stop_holdback_is_the_longest_stop_string_less_one():
    assert SamplingParams().stop_holdback == 0
    assert SamplingParams(stop=["ab", "wxyz"]).stop_holdback == 3
