"""Scheduler: token budget, chunked prefill mixed with decodes, several models per step,
fairness across models, preemption, rejection, abort, multi-step decode, prefix caching,
static reservation, random workloads; driven by the fake paged model of scheduler_fake.py
(outputs must equal a direct computation). The step policies (weights residency, prefill
bounds, time budget, models in flight) are in test_scheduler_policies.py.
"""
import random

import pytest
from hypothesis import given, settings, strategies as st

from crosspool_jax.engine.request import Request, RequestStatus
from crosspool_jax.engine.scheduler import SchedulerConfig
from crosspool_jax.sampling_params import SamplingParams
from scheduler_fake import (GEOMETRIES, FakeEngine, assert_pool_empty, check_outputs, make_request, make_scheduler,
                            reference_output)


def test_config_and_request_validation():
    with pytest.raises(ValueError, match="SchedulerConfig.max_num_seqs"):
        SchedulerConfig(max_num_seqs=0)
    with pytest.raises(ValueError, match="prompt_token_ids is empty"):
        Request("x", "a", [], SamplingParams())
    with pytest.raises(ValueError, match="max_tokens"):
        Request("x", "a", [1], SamplingParams(), max_tokens=0)
    sched = make_scheduler()
    with pytest.raises(ValueError, match="unknown model 'zzz'"):
        sched.add_request(Request("x", "zzz", [1, 2], SamplingParams()))
    r = Request("x", "a", [5, 6, 7], SamplingParams(max_tokens=None))
    sched.add_request(r)
    assert r.max_tokens == 64 - 3 and r.status == RequestStatus.WAITING
    with pytest.raises(ValueError, match="already in the scheduler"):
        sched.add_request(Request("x", "a", [1], SamplingParams()))
    assert RequestStatus.FINISHED_LENGTH.finish_reason == "length" and not RequestStatus.PREEMPTED.is_finished


def test_budget_chunked_prefill_mixed_with_decodes_and_two_models():
    rng = random.Random(101)
    sched = make_scheduler(max_num_batched_tokens=16, max_decode_steps=1)
    engine = FakeEngine(sched)
    requests = [make_request("a0", "a", 5, rng, arrival=0.0), make_request("b0", "b", 3, rng, arrival=0.1),
                make_request("a-long", "a", 40, rng, arrival=0.2), make_request("b1", "b", 7, rng, arrival=0.3)]
    for r in requests:
        sched.add_request(r)
    engine.run()
    check_outputs(engine, requests)
    outs = engine.outputs
    assert all(0 < o.num_batched_tokens <= 16 for o in outs if not o.is_empty)
    assert all(o.num_batched_tokens == sum(c.num_tokens for c in o.chunks) for o in outs)
    long_chunks = [c for o in outs for c in o.chunks if c.request_id == "a-long" and not c.samples]
    assert len(long_chunks) >= 2                                           # the 40-token prompt was split
    mixed = [o for o in outs if any(c.num_tokens > 1 and not c.samples for c in o.chunks)
             and any(c.num_tokens == 1 and c.samples for c in o.chunks)]
    assert mixed, "no step mixed a prefill chunk with decodes"
    assert any(set(o.chunks_by_model) == {"a", "b"} for o in outs)      # several models in one step
    assert_pool_empty(sched)


def test_fairness_round_robin_across_models():
    rng = random.Random(202)
    sched = make_scheduler(pages_per_device=400, max_num_batched_tokens=32, max_decode_steps=1)
    burst = [make_request(f"a{i}", "a", 30, rng, max_tokens=4, arrival=float(i)) for i in range(6)]
    late = make_request("b-late", "b", 10, rng, max_tokens=4, arrival=100.0)
    for r in burst + [late]:
        sched.add_request(r)
    engine = FakeEngine(sched)
    first = engine.step()
    # FCFS alone would give a0 and a1 the whole budget; the turn rule admits b's head too.
    assert [c.request_id for c in first.chunks] == ["a0", "b-late"]
    assert sched.num_waiting() == 5
    second = engine.step()                    # running first (a0's decode, b's chunk), then a1
    assert [c.request_id for c in second.chunks] == ["a0", "a1", "b-late"]
    engine.run()
    check_outputs(engine, burst + [late])
    # b's request finished before most of a's burst even started.
    started = {}
    for i, o in enumerate(engine.outputs):
        for c in o.chunks:
            started.setdefault(c.request_id, i)
    assert sum(started[r.request_id] > started["b-late"] for r in burst) >= 4
    assert_pool_empty(sched)


def test_request_blocked_on_pages_is_not_overtaken_by_later_ones():
    rng = random.Random(303)
    # model a: 2 pages per block of 4 tokens; 24 pages = 12 blocks = 48 tokens.
    sched = make_scheduler(pages_per_device=24, max_num_batched_tokens=64, max_decode_steps=1, caching=False)
    hog = make_request("hog", "a", 30, rng, max_tokens=3, arrival=0.0)    # 8 blocks
    sched.add_request(hog)
    engine = FakeEngine(sched)
    engine.step()
    big = make_request("big", "a", 20, rng, max_tokens=2, arrival=1.0)    # needs 5 blocks, 4 free
    early = make_request("early", "b", 1, rng, max_tokens=2, arrival=0.5)  # arrived before big: may go
    small = make_request("small", "b", 3, rng, max_tokens=2, arrival=2.0)  # would fit (2 blocks x 3 pages)
    for r in (big, early, small):
        sched.add_request(r)
    out = engine.step()
    ids = {c.request_id for c in out.chunks}
    assert "early" in ids and "big" not in ids and "small" not in ids
    engine.run()
    check_outputs(engine, [hog, big, small, early])
    first_step = {}
    for i, o in enumerate(engine.outputs):
        for c in o.chunks:
            first_step.setdefault(c.request_id, i)
    assert first_step["big"] <= first_step["small"]
    assert_pool_empty(sched)


def test_preemption_when_pool_too_small_all_finish_unchanged():
    rng = random.Random(404)
    # 24 pages: model a holds 12 blocks (48 tokens), model b 8 blocks (16 tokens); each request
    # fits alone, all together do not.
    sched = make_scheduler(pages_per_device=24, max_num_batched_tokens=24, max_decode_steps=4)
    requests = [make_request(f"{m}{i}", m, rng.randrange(3, 9), rng,
                             max_tokens=rng.randrange(6, 12) if m == "a" else rng.randrange(4, 9),
                             arrival=i * 0.1) for i, m in enumerate("ababab")]
    for r in requests:
        sched.add_request(r)
    engine = FakeEngine(sched, stop_at_eos=False)
    engine.run()
    check_outputs(engine, requests, stop_at_eos=False)
    assert sched.num_preemptions > 0
    assert sum(r.num_preemptions for r in requests) == sched.num_preemptions
    preempted = [rid for o in engine.outputs for rid in o.preempted]
    assert len(preempted) == sched.num_preemptions
    # the victim is always the latest-arrived running request: never the oldest one, and
    # never one that arrived before a request scheduled in the same step.
    assert "a0" not in preempted
    arrival = {r.request_id: r.arrival_time for r in requests}
    for o in engine.outputs:
        for rid in o.preempted:
            assert all(arrival[rid] > arrival[c.request_id] for c in o.chunks)
    assert_pool_empty(sched)


def test_preempted_request_keeps_outputs_and_recomputes_them():
    rng = random.Random(505)
    sched = make_scheduler(pages_per_device=12, max_num_batched_tokens=32, max_decode_steps=1, caching=False)
    # 12 pages = 6 blocks of model a: old grows to 21 tokens (the whole pool), new holds 3 blocks.
    old = make_request("old", "a", 6, rng, max_tokens=16, arrival=0.0)
    new = make_request("new", "a", 9, rng, max_tokens=8, arrival=1.0)
    sched.add_request(old)
    sched.add_request(new)
    engine = FakeEngine(sched, stop_at_eos=False)
    for _ in range(50):
        if new.num_preemptions:
            break
        engine.step()
    assert new.status == RequestStatus.PREEMPTED and new.num_computed_tokens == 0
    kept = list(new.output_token_ids)
    assert kept and sched.kv.blocks_of(new) == []
    engine.run()
    assert new.output_token_ids[:len(kept)] == kept
    resumed = [c for o in engine.outputs for c in o.chunks if c.request_id == "new" and c.start == 0]
    assert resumed[-1].token_ids[:9 + len(kept)] == new.prompt_token_ids + kept
    check_outputs(engine, [old, new], stop_at_eos=False)
    assert_pool_empty(sched)


def test_rejections_while_others_finish():
    rng = random.Random(606)
    sched = make_scheduler(pages_per_device=20, max_num_batched_tokens=32, max_decode_steps=1)
    too_long = make_request("too-long", "b", 49, rng)                      # b's max_model_len is 48
    too_big = make_request("too-big", "a", 41, rng)                        # 11 blocks x 2 pages > 20
    grows_too_big = make_request("grows", "a", 38, rng, max_tokens=20, arrival=5.0)  # 10 blocks, then 11
    fine = [make_request(f"ok{i}", "ab"[i % 2], 5, rng, max_tokens=3) for i in range(3)]
    for r in [too_long, too_big] + fine:
        sched.add_request(r)
    assert too_long.status == RequestStatus.FINISHED_ERROR
    assert "prompt of 49 tokens is longer than model 'b'" in too_long.error and "48" in too_long.error
    assert "prompt of 41 tokens" in too_big.error and "whole KV pool" in too_big.error
    assert sched.has_unfinished() and sched.get_request("too-long") is None
    engine = FakeEngine(sched)
    first = engine.step()
    assert dict(first.rejected) == {"too-long": too_long.error, "too-big": too_big.error}
    engine.run()
    check_outputs(engine, fine)
    sched.add_request(grows_too_big)
    engine.run()
    assert grows_too_big.status == RequestStatus.FINISHED_ERROR
    assert "needs 22 pages, more than the whole KV pool" in grows_too_big.error
    assert any(("grows", grows_too_big.error) in o.rejected for o in engine.outputs)
    assert_pool_empty(sched)


def test_abort_frees_pages_at_once_and_is_idempotent():
    rng = random.Random(707)
    sched = make_scheduler(max_num_batched_tokens=64, max_decode_steps=1)
    running = make_request("run", "a", 10, rng, arrival=0.0)
    other = make_request("other", "b", 6, rng, arrival=0.1)
    sched.add_request(running)
    sched.add_request(other)
    engine = FakeEngine(sched)
    engine.step()
    assert sched.kv.pages_used_by_model() == {"a": 6, "b": 9}
    out = sched.schedule()                   # both scheduled; abort before the update
    sched.abort_request("run")
    assert running.status == RequestStatus.FINISHED_ABORTED
    assert sched.kv.pages_used_by_model()["a"] == 0 and sched.num_running() == 1
    sched.update_from_output(out, {"run": [5], "other": [6]})   # the aborted one is skipped
    assert running.output_token_ids != [] and len(running.output_token_ids) == 1
    assert other.output_token_ids[-1] == 6
    sched.abort_request("run")               # idempotent
    sched.abort_request("never-seen")
    waiting = make_request("wait", "a", 4, rng)
    sched.add_request(waiting)
    sched.abort_request("wait")
    assert sched.num_waiting() == 0 and waiting.status == RequestStatus.FINISHED_ABORTED
    with pytest.raises(ValueError, match="FINISHED_"):
        sched.finish_request("other", RequestStatus.RUNNING)
    sched.abort_request("other")
    assert not sched.has_unfinished()
    assert_pool_empty(sched)


def test_multi_step_decode_schedules_and_allocates_up_front():
    rng = random.Random(808)
    sched = make_scheduler(max_num_batched_tokens=64, max_decode_steps=4)
    r1 = make_request("r1", "a", 6, rng, max_tokens=20)
    r2 = make_request("r2", "b", 5, rng, max_tokens=20)
    sched.add_request(r1)
    sched.add_request(r2)
    engine = FakeEngine(sched, stop_at_eos=False)
    first = engine.step()                     # prefills: one step each
    assert first.num_steps == 1 and all(c.num_tokens > 1 for c in first.chunks)
    second = sched.schedule()
    assert second.num_steps == 4 and all(c.num_steps == 4 and c.num_tokens == 1 for c in second.chunks)
    for c in second.chunks:                   # pages for all 4 steps are already there
        g = GEOMETRIES[c.request.model]
        assert len(c.page_table[0]) == g.num_blocks(c.start + 4)
    # r1 "stopped on device" after 2 tokens, r2 ran all 4.
    sched.update_from_output(second, {"r1": [11, 12], "r2": [21, 22, 23, 24]})
    assert (r1.num_computed_tokens, r1.output_token_ids[-2:]) == (6 + 1 + 1, [11, 12])
    assert (r2.num_computed_tokens, r2.num_tokens) == (5 + 1 + 3, 5 + 1 + 4)
    with pytest.raises(ValueError, match="sampled 5 tokens"):
        out = sched.schedule()
        sched.update_from_output(out, {"r1": [1] * 5, "r2": [1]})


def test_multi_step_limits_and_fallbacks():
    rng = random.Random(909)
    sched = make_scheduler(max_num_batched_tokens=64, max_decode_steps=8, caching=False)
    r1 = make_request("r1", "a", 6, rng, max_tokens=4)
    sched.add_request(r1)
    engine = FakeEngine(sched, stop_at_eos=False)
    engine.step()                                                       # prefill + 1 token
    assert sched.schedule().num_steps == 3                              # 3 tokens left before max_tokens
    # something waiting -> single steps.
    sched2 = make_scheduler(max_num_batched_tokens=8, max_decode_steps=8)
    e2 = FakeEngine(sched2, stop_at_eos=False)
    sched2.add_request(make_request("x", "a", 4, rng, max_tokens=30))
    e2.step()
    sched2.add_request(make_request("y", "a", 20, rng, max_tokens=3))
    assert all(o.num_steps == 1 for o in [e2.step(), e2.step()])
    # max_model_len bounds the steps: b's context ends at 48.
    sched3 = make_scheduler(pages_per_device=80, max_num_batched_tokens=64, max_decode_steps=8, caching=False)
    near_end = make_request("near", "b", 44, rng, max_tokens=40)
    sched3.add_request(near_end)
    e3 = FakeEngine(sched3, stop_at_eos=False)
    e3.step()
    assert near_end.num_tokens == 45 and sched3.schedule().num_steps == 3
    # pool short for the extra steps -> 1 step, and no extra pages taken.
    sched4 = make_scheduler(pages_per_device=4, max_num_batched_tokens=64, max_decode_steps=8, caching=False)
    tight = make_request("tight", "a", 7, rng, max_tokens=10)            # 2 blocks = all 4 pages
    sched4.add_request(tight)
    e4 = FakeEngine(sched4, stop_at_eos=False)
    e4.step()                                                           # 8 tokens now, 7 computed
    out = sched4.schedule()
    assert out.num_steps == 1 and sched4.kv.allocator.num_free() == 0
    assert len(out.chunks[0].page_table[0]) == 2


def test_prefix_caching_skips_shared_blocks_and_outputs_match():
    rng = random.Random(111)
    sched = make_scheduler(max_num_batched_tokens=64, max_decode_steps=1)
    prefix = [rng.randrange(1, 50) for _ in range(12)]
    first = make_request("p1", "a", 0, rng, prompt=prefix + [rng.randrange(1, 50) for _ in range(3)], max_tokens=3)
    sched.add_request(first)
    engine = FakeEngine(sched)
    engine.run()
    second = make_request("p2", "a", 0, rng, prompt=prefix + [rng.randrange(1, 50) for _ in range(5)], max_tokens=3)
    third = make_request("p3", "b", 0, rng, prompt=prefix + [9], max_tokens=3)   # other model: no hit
    sched.add_request(second)
    sched.add_request(third)
    out = engine.step()
    starts = {c.request_id: c.start for c in out.chunks}
    assert starts == {"p2": 12, "p3": 0}
    engine.run()
    check_outputs(engine, [first, second, third])
    assert_pool_empty(sched)


def test_random_workload_on_two_devices_finishes_unchanged():
    rng = random.Random(1212)
    sched = make_scheduler(pages_per_device=24, num_devices=2, max_num_batched_tokens=20, max_num_seqs=5,
                           max_decode_steps=3)
    shared = [rng.randrange(1, 50) for _ in range(8)]
    requests = []
    for i in range(14):
        model = rng.choice("ab")
        head = shared if rng.random() < 0.5 else []
        prompt = head + [rng.randrange(1, 50) for _ in range(rng.randrange(1, 10))]
        requests.append(make_request(f"w{i}", model, 0, rng, prompt=prompt, max_tokens=rng.randrange(2, 10),
                                     arrival=i * 0.01))
    engine = FakeEngine(sched)
    pending = list(requests)
    for step in range(1000):
        if pending and step % 2 == 0:
            sched.add_request(pending.pop(0))
        if not pending and not sched.has_unfinished():
            break
        out = engine.step()
        assert len({c.request_id for c in out.chunks}) == len(out.chunks) <= 5
        assert out.num_batched_tokens <= 20
    check_outputs(engine, requests)
    assert_pool_empty(sched)


def test_prefix_hits_only_blocks_already_computed_during_chunked_prefill():
    rng = random.Random(131)
    sched = make_scheduler(max_num_batched_tokens=10, max_decode_steps=1)
    prompt = [rng.randrange(1, 50) for _ in range(30)]
    r1 = make_request("r1", "a", 0, rng, prompt=prompt, max_tokens=3, arrival=0.0)
    sched.add_request(r1)
    engine = FakeEngine(sched)
    engine.step()                                       # r1 computed 10 of 30 tokens: 2 full blocks
    r2 = make_request("r2", "a", 0, rng, prompt=prompt + [7], max_tokens=3, arrival=1.0)
    sched.add_request(r2)
    blocks, num_cached = sched.kv.get_computed_blocks(r2)
    assert num_cached == 8 and len(blocks) == 2
    engine.run()
    check_outputs(engine, [r1, r2])
    assert_pool_empty(sched)


def test_victim_is_the_latest_arrived_running_request_of_any_model():
    rng = random.Random(141)
    # 14 pages: r0 (a, 2 blocks x 2 pages) + r1 (b, 2 blocks x 3 pages) + r2 (a, 2 x 2) fill the pool.
    sched = make_scheduler(pages_per_device=14, max_num_batched_tokens=64, max_decode_steps=1, caching=False)
    r0 = make_request("r0", "a", 8, rng, max_tokens=6, arrival=0.0)      # grows into a 3rd block next step
    r1 = make_request("r1", "b", 3, rng, max_tokens=4, arrival=1.0)      # needs no new block next step
    r2 = make_request("r2", "a", 7, rng, max_tokens=6, arrival=2.0)
    for r in (r0, r1, r2):
        sched.add_request(r)
    engine = FakeEngine(sched, stop_at_eos=False)
    engine.step()
    assert sched.kv.allocator.num_free() == 0
    out = engine.step()
    assert out.preempted == ["r2"] and r2.status == RequestStatus.PREEMPTED
    assert [c.request_id for c in out.chunks] == ["r0", "r1"] and sched.num_waiting() == 1
    engine.run()
    check_outputs(engine, [r0, r1, r2], stop_at_eos=False)
    assert_pool_empty(sched)


def _decode_first_requests(rng, a1_prompt):
    return [make_request("a0", "a", 4, rng, max_tokens=8, arrival=0.0),
            make_request("a1", "a", a1_prompt, rng, max_tokens=8, arrival=1.0),
            make_request("b0", "b", 3, rng, max_tokens=6, arrival=2.0)]


def test_decodes_go_before_an_older_requests_prefill_chunks():
    rng = random.Random(151)
    sched = make_scheduler(pages_per_device=200, max_num_batched_tokens=16, max_decode_steps=1)
    requests = _decode_first_requests(rng, a1_prompt=60)
    for r in requests:
        sched.add_request(r)
    engine = FakeEngine(sched, stop_at_eos=False)
    first = engine.step()
    assert [(c.request_id, c.num_tokens) for c in first.chunks] == [("a0", 4), ("a1", 9), ("b0", 3)]
    while not requests[2].is_finished:
        out = engine.step()
        ids = {c.request_id: c for c in out.chunks}
        assert "b0" in ids and ids["b0"].num_tokens == 1            # never stalled by a1's prefill
        if not ids["a1"].samples:
            assert ids["a1"].num_tokens == 16 - len(ids) + 1        # a1 takes what the decodes leave
    engine.run()
    check_outputs(engine, requests, stop_at_eos=False)
    assert_pool_empty(sched)


def test_scheduled_decode_is_unscheduled_when_preempted_for_an_older_prefill():
    rng = random.Random(161)
    # 20 pages; step 2 needs 22: a1's chunk (older) preempts b0 (latest), already scheduled.
    sched = make_scheduler(pages_per_device=20, max_num_batched_tokens=16, max_decode_steps=1, caching=False)
    requests = _decode_first_requests(rng, a1_prompt=24)
    for r in requests:
        sched.add_request(r)
    engine = FakeEngine(sched, stop_at_eos=False)
    engine.step()
    out = engine.step()
    assert out.preempted == ["b0"] and requests[2].status == RequestStatus.PREEMPTED
    assert [(c.request_id, c.num_tokens) for c in out.chunks] == [("a0", 1), ("a1", 14)]
    assert out.num_batched_tokens == 15
    engine.run()
    check_outputs(engine, requests, stop_at_eos=False)
    assert_pool_empty(sched)


def test_static_reservation_caps_each_model_and_preempts_within_it():
    rng = random.Random(171)
    # 30 pages reserved as a: 10 (5 blocks = 20 tokens), b: 18 (6 blocks = 12 tokens); b's two
    # requests (at most 3 blocks each) always fit in b's share, a's four do not fit in a's.
    sched = make_scheduler(pages_per_device=30, max_pages={"a": 10, "b": 18}, max_num_batched_tokens=32,
                           max_decode_steps=2)
    a_burst = [make_request(f"a{i}", "a", rng.randrange(4, 8), rng, max_tokens=8, arrival=i * 0.1) for i in range(4)]
    b_late = [make_request(f"b{i}", "b", rng.randrange(2, 4), rng, max_tokens=3, arrival=10.0 + i) for i in range(2)]
    too_big_for_cap = make_request("a-big", "a", 21, rng, max_tokens=2, arrival=0.05)
    for r in a_burst + [too_big_for_cap]:
        sched.add_request(r)
    assert "prompt of 21 tokens" in too_big_for_cap.error and "at most 20 tokens" in too_big_for_cap.error
    assert "max_pages 10" in too_big_for_cap.error
    engine = FakeEngine(sched, stop_at_eos=False)
    engine.step()
    engine.step()
    assert sched.num_waiting() == 2 and sched.kv.exceeds_quota(a_burst[2], a_burst[2].num_tokens)  # a2, a3 wait
    for r in b_late:
        sched.add_request(r)
    out = engine.step()
    assert {"b0", "b1"} <= {c.request_id for c in out.chunks}          # a's cap does not hold b up
    steps = 0
    while sched.has_unfinished():
        out = engine.step()
        steps += 1
        used = sched.kv.pages_used_by_model()
        assert used["a"] <= 10 and used["b"] <= 18
        for rid in out.preempted:
            assert rid.startswith("a")                          # only a's cap ran out
        assert steps < 300
    check_outputs(engine, a_burst + b_late, stop_at_eos=False)
    assert any(r.num_preemptions for r in a_burst)
    assert_pool_empty(sched)


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2 ** 32 - 1))
def test_random_workloads_finish_unchanged_or_fail_for_a_reason(seed):
    """Random pools, budgets, models, arrivals, caps and aborts: every request ends with the
    reference output (a prefix of it if aborted), or is rejected because it cannot fit."""
    rng = random.Random(seed)
    num_devices, pages_per_device = rng.choice([1, 2]), rng.randrange(20, 60)
    half = pages_per_device * num_devices // 2
    caps = rng.choice([None, {"a": half, "b": half}])
    sched = make_scheduler(pages_per_device=pages_per_device, num_devices=num_devices,
                           caching=rng.random() < 0.7, max_pages=caps,
                           max_num_batched_tokens=rng.randrange(4, 40), max_num_seqs=rng.randrange(1, 8),
                           max_decode_steps=rng.randrange(1, 5))
    engine = FakeEngine(sched, stop_at_eos=rng.random() < 0.5)
    heads = [[rng.randrange(1, 50) for _ in range(rng.randrange(1, 12))] for _ in range(2)]
    requests = []
    for i in range(rng.randrange(3, 12)):
        model = rng.choice("ab")
        head = rng.choice(heads + [[]])
        prompt = head + [rng.randrange(1, 50) for _ in range(rng.randrange(1, 20))]
        requests.append(make_request(f"q{i}", model, 0, rng, prompt=prompt, max_tokens=rng.randrange(1, 14),
                                     arrival=float(i)))
    pending, aborted = list(requests), set()
    for step in range(3000):
        if pending and rng.random() < 0.5:
            sched.add_request(pending.pop(0))
        if rng.random() < 0.03:
            live = [r for r in requests if not r.is_finished and r not in pending]
            if live:
                victim = rng.choice(live)
                sched.abort_request(victim.request_id)
                aborted.add(victim.request_id)
        if not pending and not sched.has_unfinished():
            break
        out = engine.step()
        assert out.num_batched_tokens <= sched.config.max_num_batched_tokens
        assert len(out.chunks) <= sched.config.max_num_seqs
        assert len({c.num_steps for c in out.chunks}) <= 1
        if caps:
            used = sched.kv.pages_used_by_model()
            assert used["a"] <= caps["a"] and used["b"] <= caps["b"]
    else:
        raise AssertionError("workload did not finish")
    for r in requests:
        g = GEOMETRIES[r.model]
        reference = reference_output(r.model, r.prompt_token_ids, r.max_tokens, g.max_model_len,
                                     engine.stop_at_eos)
        if r.status == RequestStatus.FINISHED_ERROR:
            assert "pages" in r.error or "max_model_len" in r.error
            needed = min(r.num_prompt_tokens + len(reference) - 1, g.max_model_len)
            assert needed > sched.kv.max_request_tokens(r.model) or r.num_prompt_tokens > g.max_model_len
        elif r.request_id in aborted:
            assert r.status == RequestStatus.FINISHED_ABORTED
            assert r.output_token_ids == reference[:len(r.output_token_ids)]
        else:
            assert r.output_token_ids == reference, r.request_id
    assert_pool_empty(sched)
