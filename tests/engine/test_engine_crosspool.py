"""The engine with a CrossPool device split (the disaggregated step) on 8 simulated devices.

A mixed batch of two MoE families (Mixtral: K*H 16, Qwen3-MoE: K*H 32, so they view the
shared pages differently) must give the single-device engine's greedy tokens for splits
1+1, 2+2, 4+4 and 6+2; requests sit on one KV device each and spread over the pool; the
pool comes back empty; seeded sampling with logprobs matches too; a small pool preempts
without changing outputs; prefix caching is hit; unsupported models and weights_pool_bytes
are refused at construction.
"""
from types import SimpleNamespace

import numpy as np
import pytest

from crosspool_jax import LLM, SamplingParams
from crosspool_jax.engine.disagg_runner import DisaggRunner
from crosspool_jax.engine.request import Request

FAMILIES = ["mixtral", "qwen3_moe"]
MAX_TOKENS = 6
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.9, top_p=0.95, seed=7, logprobs=2, ignore_eos=True)
# one token bucket (64) and prompts under 58 tokens: one program shape per model and split
ENGINE = dict(dtype="float32", kv_pool_bytes=2 << 20, max_num_batched_tokens=64, min_token_bucket=64,
              max_decode_steps=4)
SPLITS = [(1, 1), (2, 2), (4, 4), (6, 2)]


@pytest.fixture(scope="module")
def model_dirs(tiny_model_dirs):
    return {f: tiny_model_dirs[f] for f in FAMILIES + ["llama"]}


@pytest.fixture(scope="module")
def shared(model_dirs):
    return LLM({f: model_dirs[f] for f in FAMILIES}, mode="shared", **ENGINE)


@pytest.fixture(scope="module")
def batch():
    # a fixed seed: greedy tokens are compared exactly across two summation orders (expert
    # shards vs one device), so a random near-tie could flip an argmax in some run
    rng = np.random.default_rng(1234)
    lengths = [5, 17, 40, 3, 30, 9, 52, 24]
    prompts = [rng.integers(1, 250, n).tolist() for n in lengths]
    models = [FAMILIES[i % 2] for i in range(len(prompts))]
    prompts[5] = prompts[2][:36] + prompts[5]     # shares a full block (G=32 for Mixtral) with prompt 2
    models[5] = models[2]
    return prompts, models


@pytest.fixture(scope="module")
def expected(shared, batch):
    """The single-device engine's greedy tokens and seeded outputs (computed once)."""
    prompts, models = batch
    return _tokens(shared.generate(prompts, GREEDY, model=models)), shared.generate(prompts, SEEDED, model=models)


def _tokens(outs):
    for o in outs:
        assert o.error is None and o.finished
        assert o.outputs[0].finish_reason == "length"
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("n_kv,n_w", SPLITS)
def test_split_matches_single_device_engine(model_dirs, batch, expected, n_kv, n_w):
    prompts, models = batch
    want, want_seeded = expected
    llm = LLM({f: model_dirs[f] for f in FAMILIES}, mode="crosspool", kv_devices=n_kv, weight_devices=n_w,
              **ENGINE)
    engine = llm.engine
    assert isinstance(engine.runner, DisaggRunner)
    assert engine.registry.kv_pool is None and engine.registry.arena.layout.n_kv == n_kv
    # first step by hand: every request's pages on one KV device, the requests spread
    for i, (p, m) in enumerate(zip(prompts, models)):
        engine.add_request(f"r{i}", m, p, GREEDY)
    engine.step()
    homes = []
    for i in range(len(prompts)):
        req = engine.scheduler.get_request(f"r{i}")
        devices = {b.device for b in engine.kv_manager.blocks_of(req)}
        assert len(devices) <= 1
        homes += list(devices)
    assert len(set(homes)) == min(n_kv, len(homes))
    used = engine.stats().kv_pages_used_by_model
    assert all(used[f] > 0 for f in FAMILIES)
    got = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                got[out.request_id] = out
    assert _tokens([got[f"r{i}"] for i in range(len(prompts))]) == want
    # the finished requests' full blocks stay cached, each chain on one device
    probe = Request("probe", models[2], prompts[2], GREEDY)
    hits, num_cached = engine.kv_manager.get_computed_blocks(probe)
    assert num_cached == 32 and len({b.device for b in hits}) == 1
    # through the API again (cache hits on their devices), seeded sampling with logprobs:
    # the single-device engine's tokens and logprobs
    got_seeded = llm.generate(prompts, SEEDED, model=models)
    assert _tokens(got_seeded) == _tokens(want_seeded)
    for g, w in zip(got_seeded, want_seeded):
        for lg, lw in zip(g.outputs[0].logprobs, w.outputs[0].logprobs):
            assert lg.keys() == lw.keys()
            assert all(abs(lg[t].logprob - lw[t].logprob) < 1e-4 for t in lg)
    stats = engine.stats()
    assert stats.kv_pages_free == stats.kv_pages_total
    assert stats.kv_pages_used_by_model == {f: 0 for f in FAMILIES}
    assert stats.num_running == stats.num_waiting == 0
    assert stats.compiled_programs <= 8


def test_small_pool_preempts_and_outputs_unchanged(model_dirs, batch, expected):
    prompts, models = batch
    want = expected[0]
    # 2 KV devices of 8 pages: a 52-token Qwen3 prompt needs 8 pages of its device
    llm = LLM({f: model_dirs[f] for f in FAMILIES}, mode="crosspool", kv_devices=2, weight_devices=2,
              enable_prefix_caching=False, **{**ENGINE, "kv_pool_bytes": 2 * 8 * 2 * 512 * 4})
    assert llm.engine.registry.kv_layout.pages_per_device == 8
    assert _tokens(llm.generate(prompts, GREEDY, model=models)) == want
    stats = llm.engine.stats()
    assert stats.num_preemptions > 0
    assert stats.kv_pages_free == stats.kv_pages_total
    # a request whose pages span KV devices (spread placement) is refused, not run wrongly
    req = Request("spread", "mixtral", prompts[0], GREEDY)
    chunk = SimpleNamespace(request=req, start=0, num_tokens=5, token_ids=prompts[0][:5],
                            page_table=[[1, 9], [2, 10]])       # device 0 and device 1 (8 pages each)
    with pytest.raises(ValueError, match="pages on KV devices \\[0, 1\\].*sticky"):
        llm.engine.runner.group_by_device("mixtral", [chunk])


def test_refused_at_construction(model_dirs):
    with pytest.raises(ValueError, match="model 'dense' cannot run on the disaggregated step"):
        LLM({"mixtral": model_dirs["mixtral"], "dense": model_dirs["llama"]}, mode="crosspool",
            kv_devices=2, weight_devices=2, **ENGINE)
    with pytest.raises(ValueError, match="weights_pool_bytes"):
        LLM({"mixtral": model_dirs["mixtral"]}, mode="crosspool", kv_devices=1, weight_devices=1,
            weights_pool_bytes=1 << 20, **ENGINE)
    with pytest.raises(ValueError, match="'shared' baseline is not wired in yet"):
        LLM({"mixtral": model_dirs["mixtral"]}, mode="shared", kv_devices=2, **ENGINE)
