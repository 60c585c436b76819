"""`async_scheduling`: each engine step dispatches the continuation of the step in flight (the
step schedule() would make after it: decodes fed on the device from the token table, prompt
chunks and admissions fed from the host) before collecting it.
Outputs equal the synchronous engine's (greedy and seeded, one and several tokens per dispatch,
lanes, requests stopping at different steps, preemption, penalties that keep steps synchronous),
continuations really run ahead of the host, and an abort in flight, a failing dispatch and a
collect that raises leave the others as they were."""
import numpy as np
import pytest

from crosspool_jax import LLM, SamplingParams
from crosspool_jax.engine.request import Request, RequestStatus
from crosspool_jax.engine.scheduler import Scheduler, SchedulerConfig
from crosspool_jax.kv.allocator import PageAllocator
from crosspool_jax.kv.kv_cache_manager import KVCacheManager, ModelKVGeometry
from failure_injection import fail_collects, poison_dispatch

ENGINE = dict(dtype="float32", kv_pool_bytes=2 << 20, max_num_batched_tokens=64, min_token_bucket=64)
MAX_TOKENS = (9, 3, 12, 1, 7, 10, 2, 11)        # requests stop at different steps


def _greedy(i):
    return SamplingParams(max_tokens=MAX_TOKENS[i], temperature=0.0, ignore_eos=True)


def _seeded(i):
    # request 5 has a penalty: its sampling reads its tokens on the host, so steps stay synchronous
    # while it runs
    return SamplingParams(max_tokens=MAX_TOKENS[i], temperature=0.8, top_p=0.9, seed=3 + i, logprobs=2,
                          ignore_eos=True, repetition_penalty=1.1 if i == 5 else 1.0)


@pytest.fixture(scope="module")
def batch(mixed_model_dirs):
    rng = np.random.default_rng(12)
    names = list(mixed_model_dirs)
    prompts = [rng.integers(1, 250, n).tolist() for n in (5, 17, 30, 9, 40, 3, 22, 11)]
    return prompts, [names[i % len(names)] for i in range(len(prompts))]


def _generate(llm, batch, params):
    prompts, models = batch
    return llm.generate(prompts, [params(i) for i in range(len(prompts))], model=models, use_tqdm=False)


def _tokens(outs):
    for o in outs:
        assert o.error is None and o.finished, o.error
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module", params=[1, 3], ids=["steps1", "steps3"])
def serial(request, mixed_model_dirs, batch):
    steps = request.param
    llm = LLM(mixed_model_dirs, max_decode_steps=steps, async_scheduling=False, **ENGINE)
    long_prompt = list(range(3, 103))                       # 100 tokens: two chunks of the 64-token budget
    long_tokens = _tokens(llm.generate([long_prompt], _greedy(2), model="q0", use_tqdm=False))[0]
    return steps, _tokens(_generate(llm, batch, _greedy)), _generate(llm, batch, _seeded), (long_prompt, long_tokens)


def _record(engine):
    """Log the runner's dispatches and collects; [("dispatch", [chunks]) | ("collect", id)]."""
    runner, log = engine.runner, []
    dispatch_all, collect = runner.dispatch_all, runner.collect

    def dispatching(steps):
        out = dispatch_all(steps)
        log.append(("dispatch", [c for s in steps for c in s.chunks], [id(d) for d in out]))
        return out

    def collecting(step):
        log.append(("collect", id(step)))
        return collect(step)

    runner.dispatch_all, runner.collect = dispatching, collecting
    return log


def test_outputs_equal_the_synchronous_engine_and_steps_run_ahead(mixed_model_dirs, batch, serial):
    steps, greedy, seeded, _ = serial
    llm = LLM(mixed_model_dirs, max_decode_steps=steps, async_scheduling=True, **ENGINE)
    log = _record(llm.engine)
    assert _tokens(_generate(llm, batch, _greedy)) == greedy
    # continuations were dispatched, fed from the device, while the step before them was not collected
    # (prompt chunks and admissions among them: fed from the host)
    pending, ahead, fed, prefills_ahead = set(), 0, 0, 0
    for entry in log:
        if entry[0] == "dispatch":
            fed += sum(c.device_token for c in entry[1])
            ahead += bool(pending) and any(c.device_token for c in entry[1])
            prefills_ahead += bool(pending) and any(c.num_tokens > 1 for c in entry[1])
            pending |= set(entry[2])
        else:
            pending.discard(entry[1])
    assert fed >= 10 and ahead >= 3 and prefills_ahead >= 1, (fed, ahead, prefills_ahead)
    assert llm.engine.stats().continuations >= ahead
    got = _generate(llm, batch, _seeded)
    assert _tokens(got) == _tokens(seeded)
    for g, w in zip(got, seeded):
        assert len(g.outputs[0].logprobs) == len(w.outputs[0].logprobs)
        for lg, lw in zip(g.outputs[0].logprobs, w.outputs[0].logprobs):
            assert lg.keys() == lw.keys()
            assert all(abs(lg[t].logprob - lw[t].logprob) < 1e-4 for t in lg)
    engine = llm.engine
    stats = engine.stats()
    assert engine._in_flight is None and not engine.has_unfinished_requests()
    assert stats.kv_pages_free == stats.kv_pages_total


def test_requests_arriving_while_steps_run_ahead(mixed_model_dirs, batch, serial):
    """Requests added between steps, as the server adds them, join the steps that run ahead
    (admitted into continuations; a long prompt's chunks continued there): every output
    equals the synchronous engine's."""
    steps, greedy, _, (long_prompt, long_tokens) = serial
    prompts, models = batch
    llm = LLM(mixed_model_dirs, max_decode_steps=steps, async_scheduling=True, **ENGINE)
    engine, log = llm.engine, _record(llm.engine)
    arrivals = [(f"r{i}", models[i], prompts[i], _greedy(i)) for i in range(len(prompts))]
    arrivals.insert(3, ("long", "q0", long_prompt, _greedy(2)))
    done, num_steps = {}, 0
    while arrivals or engine.has_unfinished_requests():
        if arrivals and num_steps % 2 == 0:
            engine.add_request(*arrivals.pop(0))
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        num_steps += 1
    assert [done[f"r{i}"] for i in range(len(prompts))] == greedy and done["long"] == long_tokens
    pending, admitted_ahead = set(), 0
    for entry in log:
        if entry[0] == "dispatch":
            admitted_ahead += bool(pending) and any(c.start == 0 for c in entry[1])
            pending |= set(entry[2])
        else:
            pending.discard(entry[1])
    assert admitted_ahead >= 3 and engine.stats().continuations >= 5
    stats = engine.stats()
    assert stats.kv_pages_free == stats.kv_pages_total and engine._in_flight is None


@pytest.mark.parametrize("seed", [0, 1])
def test_random_arrivals_on_a_small_pool_equal_the_synchronous_engine(mixed_model_dirs, seed):
    """Requests of random lengths (prompts chunked over steps among them), token budgets, stop
    ids and n arrive between steps of engines whose pool is small enough to preempt: the
    async engine's outputs equal the synchronous engine's, request by request."""
    rng = np.random.default_rng(seed)
    names = list(mixed_model_dirs)
    arrivals = []
    for i in range(10):
        prompt = rng.integers(1, 250, int(rng.integers(3, 80))).tolist()
        params = SamplingParams(max_tokens=int(rng.integers(1, 40)), temperature=0.0 if i % 3 else 0.7,
                                seed=11 + i, n=2 if i == 4 else 1, ignore_eos=True,
                                stop_token_ids=[int(rng.integers(1, 250))] if i % 4 == 1 else None)
        arrivals.append((int(rng.integers(0, 6)), f"r{i}", names[int(rng.integers(len(names)))], prompt, params))
    arrivals.sort(key=lambda a: a[0])

    def serve(async_scheduling):
        llm = LLM(mixed_model_dirs, max_decode_steps=3, async_scheduling=async_scheduling,
                  **{**ENGINE, "kv_pool_bytes": 48 << 10})               # 12 pages: preemptions
        engine, done, left, step = llm.engine, {}, list(arrivals), 0
        while left or engine.has_unfinished_requests():
            while left and left[0][0] <= step:
                engine.add_request(*left.pop(0)[1:])
            for out in engine.step():
                if out.finished:
                    assert out.error is None, out.error
                    done[out.request_id] = [c.token_ids for c in out.outputs]
            step += 1
        stats = engine.stats()
        assert stats.kv_pages_free == stats.kv_pages_total and engine._in_flight is None
        return done, stats

    want, sync_stats = serve(False)
    got, stats = serve(True)
    assert got == want and len(got) == len(arrivals)
    assert stats.continuations > 0 and stats.num_preemptions > 0 and sync_stats.num_preemptions > 0


def test_requests_sharing_a_prefix_in_flight_hit_the_cache(mixed_model_dirs):
    """Requests arriving while the first of them prefills a shared 48-token prefix hit the
    prefix cache as in the synchronous engine (the blocks in flight are registered for the
    continuation), with equal outputs."""
    rng = np.random.default_rng(5)
    shared = rng.integers(1, 250, 48).tolist()
    arrivals = [(f"p{i}", "q0", shared + rng.integers(1, 250, 3 + i).tolist(),
                 SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)) for i in range(5)]

    def serve(async_scheduling):
        llm = LLM(mixed_model_dirs, max_decode_steps=1, async_scheduling=async_scheduling, **ENGINE)
        engine, done, left = llm.engine, {}, list(arrivals)
        while left or engine.has_unfinished_requests():
            if left:
                engine.add_request(*left.pop(0))
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out.outputs[0].token_ids
        return done, engine.stats()

    want, sync_stats = serve(False)
    got, stats = serve(True)
    assert got == want and stats.continuations > 0
    assert stats.prefix_cache_hits == sync_stats.prefix_cache_hits >= 4 * 48 - 16, (stats, sync_stats)


def test_stop_strings_and_stop_ids_end_a_request_that_ran_ahead(mixed_model_dirs, batch):
    """A request stopping on a stop id or a stop string in the step in flight gets nothing of
    its continuation: its output equals the synchronous engine's."""
    prompts, models = batch
    sync = LLM(mixed_model_dirs, max_decode_steps=1, async_scheduling=False, **ENGINE)
    base = sync.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True), model=models,
                         use_tqdm=False)
    # each request stops at its 4th token (a stop id) or after the text of its first 5 (a stop string)
    by_id = [SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=[o.outputs[0].token_ids[3]])
             for o in base]
    by_text = [SamplingParams(max_tokens=12, temperature=0.0, stop=[o.outputs[0].text[-3:]] if o.outputs[0].text
                              else None) for o in base]
    async_llm = LLM(mixed_model_dirs, max_decode_steps=1, async_scheduling=True, **ENGINE)
    for params in (by_id, by_text):
        want = sync.generate(prompts, params, model=models, use_tqdm=False)
        got = async_llm.generate(prompts, params, model=models, use_tqdm=False)
        assert [(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason) for o in got] == \
            [(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason) for o in want]
    stats = async_llm.engine.stats()
    assert stats.kv_pages_free == stats.kv_pages_total


def test_preemption_and_an_abort_in_flight(mixed_model_dirs, batch, serial):
    """A pool of a few blocks preempts (outputs unchanged); a request aborted while its step is
    in flight gets no further output and the others finish as the synchronous engine's."""
    steps, greedy, _, _ = serial
    prompts, models = batch
    small = LLM(mixed_model_dirs, max_decode_steps=steps, async_scheduling=True,
                **{**ENGINE, "kv_pool_bytes": 40 << 10})   # 10 pages
    assert _tokens(_generate(small, batch, _greedy)) == greedy
    assert small.engine.stats().num_preemptions > 0
    llm = LLM(mixed_model_dirs, max_decode_steps=steps, async_scheduling=True, **ENGINE)
    engine = llm.engine
    for i, (p, m) in enumerate(zip(prompts, models)):
        engine.add_request(f"r{i}", m, p, _greedy(i))
    victim = None
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id != victim
            if out.finished:
                done[out.request_id] = out
        flight = engine._in_flight
        if victim is None and flight is not None and any(c.device_token for c in flight.out.chunks):
            victim = next(c.request.request_id for c in flight.out.chunks if c.device_token)
            engine.abort_request(victim)
    assert victim is not None and victim not in done
    assert engine._in_flight is None
    keep = [i for i in range(len(prompts)) if f"r{i}" != victim]
    assert [done[f"r{i}"].outputs[0].token_ids for i in keep] == [greedy[i] for i in keep]
    stats = engine.stats()
    assert stats.kv_pages_free == stats.kv_pages_total


def test_failures_stay_with_their_request(mixed_model_dirs, batch, serial, monkeypatch):
    """A dispatch that raises for one request fails that request alone; a collect that raises once
    reruns the step in flight (a continuation fed from the host by then): nothing else changes."""
    steps, greedy, _, _ = serial
    prompts, models = batch
    llm = LLM(mixed_model_dirs, max_decode_steps=steps, async_scheduling=True, **ENGINE)
    runner = llm.engine.runner
    poison_dispatch(monkeypatch, runner, prompts[1])
    outs = _generate(llm, batch, _greedy)
    assert outs[1].error is not None and "OverflowError: poisoned request" in outs[1].error
    assert [o.outputs[0].token_ids for i, o in enumerate(outs) if i != 1] == [t for i, t in enumerate(greedy) if i != 1]
    monkeypatch.undo()
    failures = fail_collects(monkeypatch, runner, 2, when=lambda: llm.engine.scheduler.num_running() >= 4)
    assert _tokens(_generate(llm, batch, _greedy)) == greedy
    assert len(failures) == 2
    stats = llm.engine.stats()
    assert stats.kv_pages_free == stats.kv_pages_total


def test_aborting_the_last_request_collects_its_step_in_flight(mixed_model_dirs):
    """The step in flight of a request aborted while it runs ahead is collected at once: nothing
    stays acquired or in flight, every page is free, and the engine serves on."""
    llm = LLM({"q0": mixed_model_dirs["q0"]}, max_decode_steps=1, async_scheduling=True, **ENGINE)
    engine = llm.engine
    engine.add_request("r", "q0", [5, 6, 7], SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))
    while not (engine._in_flight is not None and any(c.device_token for c in engine._in_flight.out.chunks)):
        engine.step()
    engine.abort_request("r")
    stats = engine.stats()
    assert engine._in_flight is None and not engine.has_unfinished_requests()
    assert stats.kv_pages_free == stats.kv_pages_total
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), use_tqdm=False)
    assert out[0].finished and len(out[0].outputs[0].token_ids) == 4


def test_a_saturated_engine_runs_ahead(mixed_model_dirs, batch, serial):
    """Eight requests on three seats: the ones waiting for a seat do not keep the running ones
    synchronous; outputs equal the synchronous engine's."""
    steps, greedy, _, _ = serial
    llm = LLM(mixed_model_dirs, max_decode_steps=steps, async_scheduling=True, **{**ENGINE, "max_num_seqs": 3})
    assert _tokens(_generate(llm, batch, _greedy)) == greedy
    assert llm.engine.stats().continuations >= 5


@pytest.mark.parametrize("fit", ["all", "one"])
def test_weights_budgets(mixed_model_dirs, batch, serial, fit):
    """Budgets that hold every model run ahead as without them; budgets of one model at a time
    swap models (the residency order picks each step's, no continuation across a swap): outputs
    equal the synchronous engine's either way."""
    steps, greedy, _, _ = serial
    llm = LLM(mixed_model_dirs, max_decode_steps=steps, **ENGINE)
    ffn_bytes = [llm.engine.registry.weights.model_bytes(n) for n in mixed_model_dirs]
    budget = sum(ffn_bytes) if fit == "all" else max(ffn_bytes) + min(ffn_bytes) // 2
    small = LLM(mixed_model_dirs, max_decode_steps=steps, async_scheduling=True, weights_pool_bytes=budget, **ENGINE)
    assert _tokens(_generate(small, batch, _greedy)) == greedy
    stats = small.engine.stats()
    if fit == "all":
        assert stats.continuations > 0 and stats.swaps_out == 0
    else:
        assert stats.swaps_out > 0
    assert stats.kv_pages_free == stats.kv_pages_total and small.engine._in_flight is None


# ----- the scheduler's continuation ----------------------------------------------------------------
def _scheduler(max_decode_steps=4, pages=64, max_model_len=128, max_num_seqs=4):
    kv = KVCacheManager(PageAllocator(pages, 1), enable_prefix_caching=False)
    kv.register_model(ModelKVGeometry("m", num_layers=1, tokens_per_page=4, max_model_len=max_model_len))
    return Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=max_num_seqs,
                                     max_decode_steps=max_decode_steps), kv)


def _request(rid, n_prompt, max_tokens, **params):
    return Request(rid, "m", list(range(1, n_prompt + 1)),
                   SamplingParams(max_tokens=max_tokens, temperature=0.0, **params))


def _run(sched, out, tokens_per_chunk=None):
    """Accept `out` as if every chunk sampled all its tokens (7s)."""
    sampled = {c.request_id: [7] * (c.num_steps if tokens_per_chunk is None else tokens_per_chunk)
               for c in out.chunks if c.samples}
    sched.update_from_output(out, sampled)


def test_continuation_is_the_decode_schedule_would_make():
    sched = _scheduler()
    a, b = _request("a", 5, 20), _request("b", 3, 6)
    sched.add_request(a)
    sched.add_request(b)
    first = sched.schedule()                                # both prompts, one token each sampled
    assert [c.token_slot for c in first.chunks] == [a.token_slot, b.token_slot] and a.token_slot != b.token_slot
    sched._fit_together = lambda models: models == {"m"}    # weights budgets that hold the model
    follow = sched.schedule_continuation(first)             # before first's results are in
    chunks = {c.request_id: c for c in follow.chunks}
    assert chunks["a"].start == 5 and chunks["b"].start == 3      # the position of the token first samples
    assert all(c.device_token and c.num_tokens == 1 and c.samples and c.token_ids == [-1] for c in follow.chunks)
    assert {c.num_steps for c in follow.chunks} == {4}
    assert chunks["a"].num_outputs_before == 1 and chunks["b"].num_outputs_before == 1
    _run(sched, first)
    assert all(sched.is_current(c) for c in follow.chunks)       # first's results make it current
    # b has 1 + 4 = 5 of its 6 tokens after `follow`: the next continuation gives it one step, so all get 1
    nxt = sched.schedule_continuation(follow)
    assert {c.num_steps for c in nxt.chunks} == {1}
    _run(sched, follow)
    assert a.num_computed_tokens == nxt.chunks[0].start
    # a request that its step in flight takes to max_tokens is left out of the continuation
    last = sched.schedule_continuation(nxt)
    assert [c.request_id for c in last.chunks] == ["a"]
    _run(sched, nxt)
    sched.finish_request("b", RequestStatus.FINISHED_LENGTH)
    assert b.token_slot == -1 and not sched.is_current(next(c for c in nxt.chunks if c.request_id == "b"))


def test_continuation_admits_waiting_requests_and_continues_prefills():
    """The step after a chunked prefill in flight: the prompt's next chunk (fed from the host)
    beside the waiting requests schedule() would admit; the scheduler's state is as it was
    after it, and the step after that decodes both from the token table."""
    sched = _scheduler()
    a, b = _request("a", 80, 20), _request("b", 5, 20)
    sched.add_request(a)
    sched.add_request(b)
    out = sched.schedule()                                 # a's first 64 tokens: the whole budget
    assert [(c.request_id, c.start, c.num_tokens, c.samples) for c in out.chunks] == [("a", 0, 64, False)]
    follow = sched.schedule_continuation(out)
    chunks = {c.request_id: c for c in follow.chunks}
    assert (chunks["a"].start, chunks["a"].num_tokens, chunks["a"].samples) == (64, 16, True)
    assert chunks["a"].token_ids == a.prompt_token_ids[64:] and not chunks["a"].device_token
    assert (chunks["b"].start, chunks["b"].num_tokens, chunks["b"].token_ids) == (0, 5, b.prompt_token_ids)
    assert a.num_computed_tokens == 0 and a.output_token_ids == [] and b.status == RequestStatus.RUNNING
    assert not sched.is_current(chunks["a"])
    _run(sched, out)
    assert all(sched.is_current(c) for c in follow.chunks)
    sched.add_request(_request("c", 3, 20))
    nxt = sched.schedule_continuation(follow)               # a and b decode, c is admitted
    got = {c.request_id: (c.start, c.token_ids, c.device_token, c.num_steps) for c in nxt.chunks}
    assert got == {"a": (80, [-1], True, 1), "b": (5, [-1], True, 1), "c": (0, [1, 2, 3], False, 1)}
    assert a.output_token_ids == [] and b.output_token_ids == []
    _run(sched, follow)
    assert a.output_token_ids == [7] and all(sched.is_current(c) for c in nxt.chunks)
    last = sched.schedule_continuation(nxt)                 # all decode, nothing waits: several steps
    assert {c.num_steps for c in last.chunks} == {4} and all(c.device_token for c in last.chunks)
    assert [c.num_outputs_before for c in last.chunks] == [2, 2, 1]


def test_continuation_admits_with_hits_on_the_blocks_in_flight():
    kv = KVCacheManager(PageAllocator(64, 1), enable_prefix_caching=True)
    kv.register_model(ModelKVGeometry("m", num_layers=1, tokens_per_page=4, max_model_len=128))
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=4, max_decode_steps=4), kv)
    sched.add_request(_request("a", 40, 10))               # prompt 1..40
    out = sched.schedule()                                  # its whole prompt, in flight
    sched.add_request(Request("b", "m", list(range(1, 33)) + [99, 98], SamplingParams(max_tokens=4)))
    follow = sched.schedule_continuation(out)               # b shares a's first 8 blocks
    chunk = next(c for c in follow.chunks if c.request_id == "b")
    assert (chunk.start, chunk.num_tokens, chunk.token_ids) == (32, 2, [99, 98])
    assert (sched.prefix_cache_queries, sched.prefix_cache_hits) == (40 + 34, 32)


def test_requests_waiting_for_a_seat_do_not_stop_continuations():
    """With every seat taken the waiting requests are not admitted: continuations go on, one
    token per dispatch (as schedule() while requests wait); a seat freed admits the next."""
    sched = _scheduler(max_num_seqs=2)
    for rid in "abc":
        sched.add_request(_request(rid, 5, 20))
    out = sched.schedule()
    assert sched.num_running() == 2 and sched.num_waiting() == 1
    follow = sched.schedule_continuation(out)
    assert sorted(c.request_id for c in follow.chunks) == ["a", "b"] and {c.num_steps for c in follow.chunks} == {1}
    _run(sched, out)
    sched.finish_request("a", RequestStatus.FINISHED_STOPPED)     # a seat frees
    nxt = sched.schedule_continuation(follow)
    assert sorted((c.request_id, c.device_token) for c in nxt.chunks) == [("b", True), ("c", False)]


def test_a_short_pool_leaves_the_next_step_to_schedule():
    """When a running request's next tokens do not fit the pool, no continuation is made (a
    preemption would drop results in flight) and every request is as it was."""
    sched = _scheduler(pages=6)                             # 6 pages of 4 tokens
    a, b = _request("a", 12, 30), _request("b", 12, 30)
    sched.add_request(a)
    sched.add_request(b)
    out = sched.schedule()                                  # 3 + 3 pages: the pool is full
    before = [(r.num_computed_tokens, list(r.output_token_ids), r.status) for r in (a, b)]
    follow = sched.schedule_continuation(out)               # a 13th token needs a 4th page
    assert follow is None and sched.num_preemptions == 0
    assert [(r.num_computed_tokens, list(r.output_token_ids), r.status) for r in (a, b)] == before
    _run(sched, out)
    nxt = sched.schedule()                                  # schedule() preempts b for a
    assert nxt.preempted == ["b"] and [c.request_id for c in nxt.chunks] == ["a"]


@pytest.mark.parametrize("case", ["penalty", "not_current", "pool", "residency"])
def test_no_continuation_where_the_next_step_needs_the_results(case):
    sched = _scheduler(pages=6 if case == "pool" else 64)
    a = _request("a", 5, 30, **({"repetition_penalty": 1.2} if case == "penalty" else {}))
    sched.add_request(a)
    out = sched.schedule()
    if case == "not_current":
        sched.abort_request("a")
    if case == "residency":         # weights budgets that cannot hold the running requests' models at once
        sched._fit_together = lambda models: False
    if case == "pool":          # 6 pages of 4 tokens: run a until its step in flight fills them
        while out.chunks[0].start + out.chunks[0].num_steps < 24:
            _run(sched, out)
            out = sched.schedule()
    assert sched.schedule_continuation(out) is None


def test_device_time_counts_overlapping_steps_once():
    """Steps in flight at once (a continuation beside the step it follows) add their union."""
    from crosspool_jax.engine.runner import RunnerStats

    stats = RunnerStats()
    stats.count_device_time(0.0, 2.0)
    stats.count_device_time(1.0, 3.0)              # overlaps the first by 1 s
    stats.count_device_time(5.0, 6.0)              # after an idle gap
    stats.count_device_time(5.5, 5.8)              # inside the last one
    assert stats.device_seconds == 4.0
