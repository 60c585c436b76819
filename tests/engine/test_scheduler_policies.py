"""Scheduler step policies: which models share a step when weights budgets hold fewer than all
(residency order), how much prefill a step with decodes takes (`decode_step_prefill_tokens`,
a time budget over the models' measured step costs), one-token steps for multi-token bad
words, and models in flight (`schedule(busy_models=, split_models=)`: the engine's pipelined
steps); driven by the fake paged model of scheduler_fake.py.
"""
import random

import pytest

from crosspool_jax.engine.request import RequestStatus
from crosspool_jax.engine.scheduler import ModelStepCost, Scheduler, SchedulerConfig
from scheduler_fake import (GEOMETRIES, FakeEngine, assert_pool_empty, check_outputs, make_request, make_scheduler,
                            reference_output)


def test_weights_residency_keeps_each_step_to_models_that_fit_together():
    """With weights budgets that hold one model at a time, every step runs one model; the models
    take turns every residency_quantum steps (so a swap per rotation, not per step), both make
    progress while the other still has work, and outputs equal the reference."""
    rng = random.Random(17)
    sched = make_scheduler(caching=False, max_decode_steps=1, residency_quantum=3,
                           fit_together=lambda models: len(models) <= 1)
    engine = FakeEngine(sched, stop_at_eos=False)
    reqs = [make_request(f"{m}{i}", m, 5 + i, rng, max_tokens=12) for i in range(3) for m in ("a", "b")]
    for r in reqs:
        sched.add_request(r)
    engine.run()
    for r in reqs:
        g = GEOMETRIES[r.model]
        assert r.output_token_ids == reference_output(r.model, r.prompt_token_ids, 12, g.max_model_len, False)
    models = [next(iter(out.chunks_by_model)) for out in engine.outputs if out.chunks_by_model]
    assert all(len(out.chunks_by_model) <= 1 for out in engine.outputs)
    switches = sum(x != y for x, y in zip(models, models[1:]))
    assert 2 <= switches <= len(models) // 3 + 1                 # turns, at most one per quantum
    last_a = max(i for i, m in enumerate(models) if m == "a")
    assert any(m == "b" for m in models[:last_a])                # b ran while a still had work
    # without a budget both models share the steps
    free = make_scheduler(caching=False, max_decode_steps=1)
    for r in [make_request(f"{m}{i}", m, 5 + i, rng, max_tokens=4) for i in range(2) for m in ("a", "b")]:
        free.add_request(r)
    assert len(free.schedule().chunks_by_model) == 2


def test_steps_with_decodes_bound_their_prefill_tokens():
    """decode_step_prefill_tokens: once requests decode, a step carries at most that many prefill
    tokens (running chunks and admissions together), so a long prompt arriving later is
    chunked finely; a step without decodes still takes the whole token budget; outputs equal
    the reference."""
    rng = random.Random(4)
    sched = make_scheduler(pages_per_device=256, max_num_batched_tokens=32, max_decode_steps=1,
                           decode_step_prefill_tokens=8)
    engine = FakeEngine(sched, stop_at_eos=False)
    short = [make_request(f"s{i}", "a", 3, rng, max_tokens=12) for i in range(2)]
    for r in short:
        sched.add_request(r)
    assert engine.step().num_batched_tokens == 6           # no decodes yet: whole prompts
    long = [make_request("long", "b", 40, rng, max_tokens=4), make_request("long2", "a", 30, rng, max_tokens=3)]
    for r in long:
        sched.add_request(r)
    engine.run()
    with_decodes = 0
    for out in engine.outputs[1:]:
        decodes = [c for c in out.chunks if c.num_tokens == 1 and c.start >= len(c.request.prompt_token_ids)]
        prefill = sum(c.num_tokens for c in out.chunks if c.start < len(c.request.prompt_token_ids))
        if decodes:
            with_decodes += 1
            assert prefill <= 8, (len(decodes), prefill)
    assert with_decodes >= 5
    check_outputs(engine, short + long, stop_at_eos=False)
    assert_pool_empty(sched)
    with pytest.raises(ValueError, match="decode_step_prefill_tokens"):
        SchedulerConfig(decode_step_prefill_tokens=0)


COSTS = {"a": ModelStepCost((4, 8, 16, 32), (1e-3, 2e-3, 4e-3, 8e-3)),       # model b costs twice a's
         "b": ModelStepCost((4, 8, 16, 32), (2e-3, 4e-3, 8e-3, 16e-3))}


def _decode_and_prefill(out):
    """(decode chunks, prefill tokens, {model: tokens}, {model: largest prefill chunk}) of one step."""
    decodes = [c for c in out.chunks if c.num_tokens == 1 and c.start >= len(c.request.prompt_token_ids)]
    prefill = [c for c in out.chunks if c.start < len(c.request.prompt_token_ids)]
    tokens = {m: sum(c.num_tokens for c in model_chunks) for m, model_chunks in out.chunks_by_model.items()}
    largest = {m: max((c.num_tokens for c in prefill if c.request.model == m), default=0) for m in COSTS}
    return decodes, sum(c.num_tokens for c in prefill), tokens, largest


def _run_with_budget(budget_s, rng, **config):
    sched = make_scheduler(pages_per_device=256, max_num_batched_tokens=32, max_decode_steps=1,
                           tbt_budget_s=budget_s, **config)
    sched.set_step_costs(COSTS)
    engine = FakeEngine(sched, stop_at_eos=False)
    first = [make_request("s0", "a", 3, rng, max_tokens=12), make_request("s1", "a", 3, rng, max_tokens=12),
             make_request("long0", "b", 40, rng, max_tokens=4)]
    for r in first:
        sched.add_request(r)
    out = engine.step()              # no decodes yet: the whole token budget, over the time budget
    assert out.num_batched_tokens == 32 and sum(COSTS[m].at(n) for m, n in _decode_and_prefill(out)[2].items()) > budget_s
    later = [make_request("long1", "a", 30, rng, max_tokens=3), make_request("long2", "b", 40, rng, max_tokens=4)]
    for r in later:
        sched.add_request(r)
    engine.run()
    check_outputs(engine, first + later, stop_at_eos=False)
    assert_pool_empty(sched)
    return [_decode_and_prefill(out) for out in engine.outputs[1:]]


def test_a_time_budget_sizes_the_prefill_of_steps_with_decodes_by_each_models_cost():
    """tbt_budget_s with step costs: a step that carries decodes takes the prefill tokens that
    keep the sum of its models' program times (at their buckets) within the budget, so the
    cheaper model's chunks are larger; a step without decodes takes the whole token budget;
    when the decodes alone exceed the budget a step still advances the smallest bucket of
    prefill; an explicit decode_step_prefill_tokens wins; outputs equal the reference."""
    budget = 7e-3
    steps = _run_with_budget(budget, random.Random(5))
    with_decodes = [step[1:] for step in steps if step[0]]
    assert len(with_decodes) >= 5
    for prefill, tokens, _ in with_decodes:
        assert sum(COSTS[m].at(n) for m, n in tokens.items()) <= budget or prefill <= 4, tokens
    largest = {m: max(step[2][m] for step in with_decodes) for m in COSTS}
    assert largest["a"] > 8 and 4 < largest["b"] <= 8, largest  # the budget, not the floor, sized them
    # decodes alone over the budget: the smallest bucket of prefill per step, and everything finishes
    for decodes, prefill, _, _ in _run_with_budget(0.5e-3, random.Random(5)):
        assert not decodes or prefill <= 4
    # decode_step_prefill_tokens wins over the time budget
    capped = [p for decodes, p, _, _ in _run_with_budget(0.5e-3, random.Random(5), decode_step_prefill_tokens=8)
              if decodes]
    assert max(capped) == 8
    with pytest.raises(ValueError, match="tbt_budget_s"):
        SchedulerConfig(tbt_budget_s=0)
    with pytest.raises(ValueError, match="no step cost for model"):
        make_scheduler().set_step_costs({"a": COSTS["a"]})
    with pytest.raises(ValueError, match="non-decreasing"):
        ModelStepCost((4, 8), (2e-3, 1e-3))
    assert (COSTS["b"].at(0), COSTS["b"].at(5), COSTS["b"].most_tokens_within(9e-3)) == (0.0, 4e-3, 16)


def test_requests_by_model_and_one_token_steps_for_bad_words_of_several_tokens():
    """Per-model (running, waiting) counts; a request whose banned ids follow its last tokens
    (a bad word of two tokens) keeps every step at one token, and prompt_logprobs skips the
    prefix cache."""
    rng = random.Random(7)
    sched = make_scheduler(max_num_batched_tokens=64, max_num_seqs=2, max_decode_steps=4)
    a0, a1, b0 = (make_request(r, m, 5, rng) for r, m in (("a0", "a", ), ("a1", "a"), ("b0", "b")))
    for r in (a0, a1, b0):
        sched.add_request(r)
    assert sched.requests_by_model() == {"a": (0, 2), "b": (0, 1)}
    engine = FakeEngine(sched)
    engine.step()
    assert sched.requests_by_model() == {"a": (1, 1), "b": (1, 0)}          # max_num_seqs=2, models take turns
    engine.run()
    assert sched.requests_by_model() == {"a": (0, 0), "b": (0, 0)}

    sched = make_scheduler(max_num_batched_tokens=64, max_decode_steps=4)
    plain, banned = make_request("p", "a", 5, rng), make_request("w", "a", 5, rng)
    banned.bad_words_ids = [[3], [4, 5]]
    assert banned.needs_host_per_token and not plain.needs_host_per_token
    for r in (plain, banned):
        sched.add_request(r)
    sched.update_from_output(sched.schedule(), {"p": [9], "w": [9]})          # the prompts
    out = sched.schedule()                                                       # two decodes: one token
    assert out.num_steps == 1 and len(out.chunks_by_model["a"]) == 2
    sched.update_from_output(out, {"p": [9], "w": [4]})
    sched.finish_request("w", RequestStatus.FINISHED_ABORTED)
    assert sched.schedule().num_steps == 4                                       # the plain one alone: 4


def test_busy_models_wait_and_split_steps_alternate_halves():
    """schedule(busy_models=): a busy model's queue is not admitted from and its running requests
    are not scheduled, without holding back the others' multi-step decode; split_models: a step
    takes ceil(W/2) of the W models with work, the least recently scheduled first. A chunk whose
    request moved on since it was scheduled is not current."""
    rng = random.Random(5)
    sched = make_scheduler(caching=False, max_decode_steps=4)
    for r in [make_request(f"{m}{i}", m, 5, rng, max_tokens=9) for i in range(2) for m in ("a", "b")]:
        sched.add_request(r)
    out = sched.schedule(busy_models=frozenset({"b"}))
    assert set(out.chunks_by_model) == {"a"} and sched.requests_by_model()["b"] == (0, 2)
    sched.update_from_output(out, {c.request.request_id: [1] for c in out.chunks})
    out = sched.schedule(busy_models=frozenset({"a"}))        # b's prefills while a is in flight
    assert set(out.chunks_by_model) == {"b"}
    sched.update_from_output(out, {c.request.request_id: [1] for c in out.chunks})
    out = sched.schedule(busy_models=frozenset({"b"}))        # a's decodes, b running but busy: multi-step
    assert set(out.chunks_by_model) == {"a"} and all(c.num_steps == 4 for c in out.chunks)
    stale = out.chunks[0]
    assert sched.is_current(stale)
    sched.update_from_output(out, {c.request.request_id: [1] * 4 for c in out.chunks})
    assert not sched.is_current(stale)
    # split: two models with work, one per step, alternating; outputs as the reference
    split = make_scheduler(caching=False, max_decode_steps=1)
    engine = FakeEngine(split, stop_at_eos=False)
    reqs = [make_request(f"{m}{i}", m, 4 + i, rng, max_tokens=6) for i in range(2) for m in ("a", "b")]
    for r in reqs:
        split.add_request(r)
    engine.sched.schedule = lambda: Scheduler.schedule(split, split_models=True)
    engine.run()
    models = [set(out.chunks_by_model) for out in engine.outputs if out.chunks_by_model]
    assert all(len(m) == 1 for m in models) and all(x != y for x, y in zip(models, models[1:]))
    for r in reqs:
        assert r.output_token_ids == reference_output(r.model, r.prompt_token_ids, 6,
                                                      GEOMETRIES[r.model].max_model_len, False)
