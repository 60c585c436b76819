"""Tests of runtime.shapes: the finite program shapes of a model and how a step picks one."""
import pytest

from crosspool_jax.runtime.shapes import MIN_SEQS, DecodeShape, ShapeMenu, StepShape


def _menu(**kw):
    args = dict(max_num_batched_tokens=512, max_num_seqs=64, max_blocks_per_seq=256, max_model_len=4096)
    args.update(kw)
    return ShapeMenu.build(**args)


def test_buckets_follow_the_engine_limits():
    menu = _menu()
    assert menu.token_buckets == (16, 64, 256, 512)
    assert menu.decode_seq_buckets == (MIN_SEQS, 32, 64)
    assert menu.page_buckets == (4, 32, 256)
    assert menu.history_buckets == (4096,)
    assert menu.logprob_variants == (0, 20)
    assert len(menu.ragged_shapes()) == 4 * 3 and len(menu.decode_shapes()) == 3 * 3


def test_a_step_pads_to_the_smallest_shape_that_fits():
    menu = _menu()
    assert menu.ragged(17, 3, 5) == StepShape(64, 64, 32)
    assert menu.ragged(1, 1, 1) == StepShape(16, 16, 4)
    assert menu.decode(9, 33) == DecodeShape(32, 256)
    with pytest.raises(ValueError, match="tokens of a step = 513"):
        menu.ragged(513, 1, 1)
    with pytest.raises(ValueError, match="sequences of a step = 17 exceed the 16 rows"):
        menu.ragged(16, 17, 1)
    with pytest.raises(ValueError, match="page-table blocks"):
        menu.decode(1, 257)


def test_sampling_variants_and_the_greedy_program():
    menu = _menu(max_logprobs=5)
    assert menu.sampling_variants() == [(0, False), (0, True), (5, False), (5, True)]
    assert menu.all_greedy(True) and not menu.all_greedy(False)
    assert menu.num_logprobs(0) == 0 and menu.num_logprobs(2) == 5
    with pytest.raises(ValueError, match="logprobs = 6 exceeds max_logprobs = 5"):
        menu.num_logprobs(6)
    cpu = _menu(max_logprobs=5, greedy_programs=False)     # no argmax-only programs: greedy steps run the general one
    assert cpu.sampling_variants() == [(0, False), (5, False)]
    assert not cpu.all_greedy(True)


def test_bad_limits_are_refused_by_name():
    with pytest.raises(ValueError, match="max_num_seqs must be an integer >= 1"):
        _menu(max_num_seqs=0)
    with pytest.raises(ValueError, match="max_logprobs must be an integer >= 0"):
        _menu(max_logprobs=-1)
