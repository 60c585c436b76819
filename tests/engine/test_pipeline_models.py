"""`pipeline_models`: an engine step dispatches about half of the models with work and collects
the previous step's while the device runs them. Outputs equal the step-by-step engine's (greedy
and seeded placed, greedy on a crosspool split, with preemption), consecutive steps take disjoint
halves, a program is dispatched before the previous step's are read, and an abort in flight, a
failing request and a collect that raises leave the others as they were."""
import numpy as np
import pytest

from crosspool_jax import LLM, SamplingParams
from failure_injection import fail_collects, poison_dispatch

GREEDY = SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=7, temperature=0.8, top_p=0.9, seed=3, logprobs=2, ignore_eos=True,
                        repetition_penalty=1.1)
ENGINE = dict(dtype="float32", kv_pool_bytes=2 << 20, max_num_batched_tokens=64, min_token_bucket=64,
              max_decode_steps=3)


@pytest.fixture(scope="module")
def batch(mixed_model_dirs):
    rng = np.random.default_rng(11)
    names = list(mixed_model_dirs)
    prompts = [rng.integers(1, 250, n).tolist() for n in (5, 17, 30, 9, 40, 3, 22, 11)]
    return prompts, [names[i % len(names)] for i in range(len(prompts))]


@pytest.fixture(scope="module")
def serial(mixed_model_dirs, batch):
    llm = LLM(mixed_model_dirs, **ENGINE)
    prompts, models = batch
    return (_tokens(llm.generate(prompts, GREEDY, model=models, use_tqdm=False)),
            llm.generate(prompts, SEEDED, model=models, use_tqdm=False))


def _tokens(outs):
    for o in outs:
        assert o.error is None and o.finished, o.error
    return [o.outputs[0].token_ids for o in outs]


def _same_seeded(got, want):
    assert _tokens(got) == _tokens(want)
    for g, w in zip(got, want):
        for lg, lw in zip(g.outputs[0].logprobs, w.outputs[0].logprobs):
            assert lg.keys() == lw.keys()
            assert all(abs(lg[t].logprob - lw[t].logprob) < 1e-4 for t in lg)


def _record(engine):
    """Log the runner's dispatches and collects: [("dispatch", models) | ("collect", model)]."""
    runner, log = engine.runner, []
    dispatch_all, collect = runner.dispatch_all, runner.collect

    def dispatching(steps):
        log.append(("dispatch", tuple(s.model for s in steps)))
        out = dispatch_all(steps)
        for s, d in zip(steps, out):
            d.model_name = s.model
        return out

    def collecting(step):
        log.append(("collect", step.model_name))
        return collect(step)

    runner.dispatch_all, runner.collect = dispatching, collecting
    return log


@pytest.mark.parametrize("split", [None, (1, 1)])
def test_outputs_equal_the_serial_engine_and_halves_alternate(mixed_model_dirs, batch, serial, split):
    prompts, models = batch
    opts = {} if split is None else dict(kv_devices=split[0], weight_devices=split[1])
    llm = LLM(mixed_model_dirs, pipeline_models=True, **ENGINE, **opts)
    log = _record(llm.engine)
    assert _tokens(llm.generate(prompts, GREEDY, model=models, use_tqdm=False)) == serial[0]
    dispatches = [set(m) for kind, m in log if kind == "dispatch"]
    # four models with work: two per step, and consecutive steps never share a model
    assert max(len(d) for d in dispatches) == 2
    assert all(not (a & b) for a, b in zip(dispatches, dispatches[1:]))
    # a step is dispatched while the previous step's programs are not read yet
    uncollected, overlapped = set(), 0
    for kind, m in log:
        if kind == "dispatch":
            overlapped += bool(uncollected)
            uncollected |= set(m)
        else:
            uncollected.discard(m)
    assert overlapped >= len(dispatches) // 2
    if split is None:      # seeded sampling placed only: the split's sampling variants cost ~10 s of
        # compiles, and tests/engine/test_lanes.py checks the split's sampled tokens
        _same_seeded(llm.generate(prompts, SEEDED, model=models, use_tqdm=False), serial[1])
    stats = llm.engine.stats()
    assert stats.kv_pages_free == stats.kv_pages_total and not llm.engine.has_unfinished_requests()


def test_preemption_and_an_abort_in_flight(mixed_model_dirs, batch, serial):
    """A pool of a few blocks preempts (greedy outputs unchanged); a request aborted while its
    step is in flight gets no further output and the others finish as the serial engine's."""
    prompts, models = batch
    small = LLM(mixed_model_dirs, pipeline_models=True, **{**ENGINE, "kv_pool_bytes": 48 << 10})   # 12 pages
    assert _tokens(small.generate(prompts, GREEDY, model=models, use_tqdm=False)) == serial[0]
    assert small.engine.stats().num_preemptions > 0
    llm = LLM(mixed_model_dirs, pipeline_models=True, **ENGINE)
    engine = llm.engine
    for i, (p, m) in enumerate(zip(prompts, models)):
        engine.add_request(f"r{i}", m, p, GREEDY)
    engine.step()
    engine.step()
    in_flight = engine._in_flight
    assert in_flight is not None
    victim = next(c.request.request_id for chunks in in_flight.out.chunks_by_model.values() for c in chunks)
    engine.abort_request(victim)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id != victim
            if out.finished:
                done[out.request_id] = out
    assert engine._in_flight is None
    keep = [i for i in range(len(prompts)) if f"r{i}" != victim]
    assert [done[f"r{i}"].outputs[0].token_ids for i in keep] == [serial[0][i] for i in keep]
    stats = engine.stats()
    assert stats.kv_pages_free == stats.kv_pages_total


def test_failures_stay_with_their_request(mixed_model_dirs, batch, serial, monkeypatch):
    """A request whose dispatch raises fails alone (the step falls back to running whole,
    isolated); a collect that raises once reruns the step in flight: nothing else changes."""
    prompts, models = batch
    llm = LLM(mixed_model_dirs, pipeline_models=True, **ENGINE)
    runner = llm.engine.runner
    poison_dispatch(monkeypatch, runner, prompts[1])
    outs = llm.generate(prompts, GREEDY, model=models, use_tqdm=False)
    assert outs[1].error is not None and "OverflowError: poisoned request" in outs[1].error
    assert [o.outputs[0].token_ids for i, o in enumerate(outs) if i != 1] == \
        [t for i, t in enumerate(serial[0]) if i != 1]
    monkeypatch.undo()
    failures = fail_collects(monkeypatch, runner, 1)
    assert _tokens(llm.generate(prompts, GREEDY, model=models, use_tqdm=False)) == serial[0]
    assert failures
    stats = llm.engine.stats()
    assert stats.kv_pages_free == stats.kv_pages_total
