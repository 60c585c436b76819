"""The engine end to end on tiny random checkpoints of every family, against transformers.

Greedy float32 generation must equal transformers' `generate` token for token, in one
mixed batch of several models; outputs must not depend on the batch a prompt runs in,
on chunked prefill, on multi-step decode, on page size, or on preemption.
"""
import numpy as np
import pytest

from crosspool_jax import LLM, SamplingParams
from crosspool_jax.checkpoints.tiny_models import transformers_greedy

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "llama", "qwen3"]
MAX_TOKENS = 6
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
# One token bucket (64) and prompts under 58 tokens keep every model at one ragged and one
# decode program, shared by the engines of the tests that use the same pool size (CPU
# compile time dominates these tests).
ENGINE = dict(kv_pool_bytes=2 << 20, max_num_batched_tokens=64, min_token_bucket=64, max_decode_steps=4)


@pytest.fixture(scope="module")
def model_dirs(tiny_model_dirs):
    return {f: tiny_model_dirs[f] for f in FAMILIES}


@pytest.fixture(scope="module")
def llm(model_dirs):
    return LLM(model_dirs, dtype="float32", **ENGINE)


def _prompts(seed, lengths, vocab=250):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, n).tolist() for n in lengths]


def test_greedy_matches_transformers_in_one_mixed_batch(llm, model_dirs):
    lengths = [1, 5, 17, 40, 3, 56, 33, 50]      # several prompts per step: chunked prefill
    prompts = _prompts(0, lengths)
    models = [FAMILIES[i % len(FAMILIES)] for i in range(len(prompts))]
    outs = llm.generate(prompts, GREEDY, model=models)
    for prompt, name, out in zip(prompts, models, outs):
        assert out.error is None
        assert out.outputs[0].finish_reason == "length"
        want = transformers_greedy(model_dirs[name], prompt, MAX_TOKENS)
        assert out.outputs[0].token_ids == want, (name, len(prompt))


def test_batch_invariance(llm):
    prompts = _prompts(1, [9, 23, 4, 31, 12])
    target = prompts[0]
    alone = llm.generate([target], GREEDY, model="mixtral")[0].outputs[0].token_ids
    same_model = llm.generate(prompts, GREEDY, model="mixtral")[0].outputs[0].token_ids
    mixed = llm.generate(prompts, GREEDY, model=["mixtral", "olmoe", "qwen3_moe", "mixtral", "llama"])
    assert alone == same_model == mixed[0].outputs[0].token_ids


def test_paged_logprobs_equal_full_forward(model_dirs):
    """Incremental decoding through the paged pool gives the full forward's log-probs,
    with pages that do (G=4) and do not (G=5) divide the lengths."""
    import jax.numpy as jnp

    from crosspool_jax.checkpoints import load_model
    from crosspool_jax.models import dense_logits

    path = model_dirs["qwen3_moe"]
    prompt = _prompts(2, [12])[0]
    m = load_model(path, dtype="float32")
    row = m.config.num_kv_heads * m.config.head_dim
    for G in (4, 5):
        llm = LLM({"q": path}, dtype="float32", kv_pool_bytes=1 << 20, page_elems=G * row,
                  max_num_batched_tokens=8, min_token_bucket=8, max_decode_steps=3)
        params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=3)
        out = llm.generate([prompt], params)[0].outputs[0]
        full = prompt + out.token_ids                # the full forward: one jitted program
        logits = dense_logits(m.kv_params, m.ffn_params, m.config, jnp.asarray(full, jnp.int32),
                              jnp.zeros(len(full), jnp.int32), jnp.arange(len(full), dtype=jnp.int32))
        logp = np.asarray(jax_log_softmax(logits))
        for i, (tok, lps) in enumerate(zip(out.token_ids, out.logprobs)):
            row_lp = logp[len(prompt) - 1 + i]
            assert abs(lps[tok].logprob - row_lp[tok]) < 1e-4
            top = sorted(((lp.rank, tid) for tid, lp in lps.items() if lp.rank is not None))
            assert [tid for _, tid in top] == list(np.argsort(-row_lp)[:3])


def jax_log_softmax(x):
    import jax
    return jax.nn.log_softmax(x, axis=-1)


def test_small_pool_preempts_and_outputs_unchanged(model_dirs, llm):
    prompts = _prompts(3, [30, 28, 33, 25, 31, 29])
    want = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, model="olmoe")]
    # about 2.5 requests' worth of pages: the rest must queue or be preempted
    small = LLM({"olmoe": model_dirs["olmoe"]}, dtype="float32", enable_prefix_caching=False,
                **{**ENGINE, "kv_pool_bytes": _pool_bytes_for(llm, "olmoe", tokens=100)})
    outs = small.generate(prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == want
    stats = small.engine.stats()
    assert stats.kv_pages_free == stats.kv_pages_total
    assert stats.num_preemptions > 0          # the pool forced recompute, outputs unchanged


def _pool_bytes_for(llm, model, tokens):
    entry = llm.engine.registry.get(model)
    layout = llm.engine.registry.kv_pool.layout
    blocks = -(-tokens // entry.tokens_per_page)
    return blocks * entry.config.num_layers * layout.page_bytes


def test_too_long_prompts_fail_alone(model_dirs):
    llm = LLM({"mixtral": model_dirs["mixtral"]}, dtype="float32", max_model_len=64, **ENGINE)
    prompts = _prompts(4, [10, 80, 12])
    outs = llm.generate(prompts, GREEDY)
    assert outs[1].error is not None and "too long" in outs[1].error and "64" in outs[1].error
    assert outs[0].error is None and len(outs[0].outputs[0].token_ids) == MAX_TOKENS
    assert outs[2].error is None and len(outs[2].outputs[0].token_ids) == MAX_TOKENS


def test_prompt_larger_than_whole_pool_fails_alone(model_dirs, llm):
    pool = _pool_bytes_for(llm, "llama", tokens=32)
    small = LLM({"llama": model_dirs["llama"]}, dtype="float32", **{**ENGINE, "kv_pool_bytes": pool})
    outs = small.generate(_prompts(5, [8, 50, 9]), GREEDY)
    assert outs[1].error is not None and "pool" in outs[1].error
    assert outs[0].error is None and outs[2].error is None
    assert small.engine.stats().kv_pages_free == small.engine.stats().kv_pages_total


def test_unknown_model_and_bad_params_raise(llm):
    with pytest.raises(ValueError, match="no-such-model"):
        llm.generate([[1, 2]], GREEDY, model="no-such-model")
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="sampling_params"):
        llm.generate([[1, 2], [3]], [GREEDY], model="mixtral")


def test_seeded_sampling_reproducible_and_n_children(llm):
    params = SamplingParams(max_tokens=5, temperature=0.9, top_p=0.9, seed=1234, n=3, ignore_eos=True)
    a = llm.generate([[5, 6, 7]], params, model="qwen2_moe")[0]
    b = llm.generate([[5, 6, 7], [9, 9]], params, model="qwen2_moe")[0]
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    assert len(a.outputs) == 3 and all(len(c.token_ids) == 5 for c in a.outputs)
    assert len({tuple(c.token_ids) for c in a.outputs}) > 1


def test_prefix_cache_shares_pages_and_keeps_outputs(model_dirs):
    path = model_dirs["qwen3"]
    shared = _prompts(6, [40])[0]
    prompts = [shared + [7, 8], shared + [9]]
    plain = LLM({"m": path}, dtype="float32", enable_prefix_caching=False, **ENGINE)
    cached = LLM({"m": path}, dtype="float32", enable_prefix_caching=True, **ENGINE)
    want = [o.outputs[0].token_ids for o in plain.generate(prompts, GREEDY)]
    cached.generate([prompts[0]], GREEDY)                        # fills the cache
    got = [o.outputs[0].token_ids for o in cached.generate(prompts, GREEDY)]
    assert got == want
    from crosspool_jax.engine.request import Request
    probe = Request(request_id="probe", model="m", prompt_token_ids=shared + [1], sampling_params=GREEDY,
                    arrival_time=0.0, max_tokens=MAX_TOKENS)
    blocks, num_cached = cached.engine.kv_manager.get_computed_blocks(probe)
    assert num_cached >= 32 and blocks


def test_stop_token_and_abort(llm):
    base = llm.generate([[3, 4, 5]], GREEDY, model="llama")[0].outputs[0].token_ids
    stop_at = base[2]
    out = llm.generate([[3, 4, 5]], SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0,
                                                    stop_token_ids=[stop_at]), model="llama")[0].outputs[0]
    assert out.token_ids == base[:base.index(stop_at) + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at
    engine = llm.engine
    engine.add_request("abort-me", "llama", [1, 2, 3, 4], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    assert engine.stats().kv_pages_used_by_model["llama"] > 0
    engine.abort_request("abort-me")
    assert engine.stats().kv_pages_used_by_model["llama"] == 0
    assert not engine.has_unfinished_requests()


def test_weights_pool_budget_swaps_models_and_keeps_outputs(model_dirs, llm):
    names = ["mixtral", "qwen2_moe", "olmoe"]
    prompts = _prompts(7, [6, 11, 8, 5, 9, 7])
    models = [names[i % 3] for i in range(len(prompts))]
    want = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, model=models)]
    ffn_bytes = {n: llm.engine.registry.weights.model_bytes(n) for n in names}
    budget = max(ffn_bytes.values()) + min(ffn_bytes.values()) // 2     # one model at a time
    small = LLM({n: model_dirs[n] for n in names}, dtype="float32", weights_pool_bytes=budget, **ENGINE)
    got = [o.outputs[0].token_ids for o in small.generate(prompts, GREEDY, model=models)]
    assert got == want
    stats = small.engine.stats()
    assert stats.swaps_in > 0 and stats.swaps_out > 0
    # the scheduler keeps each step to models that fit together and rotates them: fewer swaps
    # than steps (every step swapped two or three models in before the residency order)
    assert stats.swaps_in < stats.steps, (stats.swaps_in, stats.steps)
    assert sum(m["resident"] for m in stats.models.values()) < len(names)
    assert small.engine.registry.weights.bytes_resident <= budget


def test_modes_give_identical_outputs_and_static_caps_each_model(model_dirs, llm):
    names = ["mixtral", "olmoe"]
    prompts = _prompts(8, [7, 12, 9, 5])
    models = [names[i % 2] for i in range(len(prompts))]
    want = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, model=models)]
    for mode in ("crosspool", "shared", "static"):
        engine_llm = LLM({n: model_dirs[n] for n in names}, dtype="float32", mode=mode, **ENGINE)
        got = [o.outputs[0].token_ids for o in engine_llm.generate(prompts, GREEDY, model=models)]
        assert got == want, mode
    caps = engine_llm.engine.registry.static_page_caps()
    total = engine_llm.engine.registry.kv_pool.layout.num_pages
    assert set(caps) == set(names) and sum(caps.values()) <= total
    assert all(c >= total // 2 - 8 for c in caps.values())


def test_impossible_device_options_raise_clearly(model_dirs):
    # crosspool splits and the multi-device shared/static baselines run
    # (tests/engine/test_engine_crosspool.py); shared needs the same devices in both roles
    with pytest.raises(ValueError, match="must select the same devices"):
        LLM({"mixtral": model_dirs["mixtral"]}, dtype="float32", mode="shared", kv_devices=2, weight_devices=4)
    with pytest.raises(ValueError, match="mode"):
        LLM({"mixtral": model_dirs["mixtral"]}, dtype="float32", mode="monolithic")


def test_static_reservation_limits_one_models_context_shared_pool_does_not(model_dirs, llm):
    names = ["mixtral", "olmoe"]
    pool = _pool_bytes_for(llm, "mixtral", tokens=96)
    prompt = _prompts(9, [56])[0]                       # needs more than half of the pool
    outs = {}
    for mode in ("shared", "static"):
        engine_llm = LLM({n: model_dirs[n] for n in names}, dtype="float32", mode=mode,
                         **{**ENGINE, "kv_pool_bytes": pool})
        outs[mode] = engine_llm.generate([prompt], GREEDY, model="mixtral")[0]
    assert outs["shared"].error is None and len(outs["shared"].outputs[0].token_ids) == MAX_TOKENS
    assert outs["static"].error is not None


def test_attention_pool_budget_swaps_the_attention_side(model_dirs, llm):
    names = ["mixtral", "olmoe"]
    prompts = _prompts(10, [6, 9, 7, 5])
    models = [names[i % 2] for i in range(len(prompts))]
    want = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, model=models)]
    attn_bytes = max(llm.engine.registry.attention_weights.model_bytes(n) for n in names)
    small = LLM({n: model_dirs[n] for n in names}, dtype="float32", attention_pool_bytes=attn_bytes, **ENGINE)
    got = [o.outputs[0].token_ids for o in small.generate(prompts, GREEDY, model=models)]
    assert got == want
    pool = small.engine.registry.attention_weights
    assert pool.stats().swaps_in > 0 and pool.bytes_resident <= attn_bytes
    assert small.engine.stats().swaps_in >= pool.stats().swaps_in


def test_tbt_budget_measures_each_models_step_cost_and_keeps_outputs(model_dirs, llm, monkeypatch):
    """tbt_budget_ms: the engine times each model's step program (before its first step, or in
    warm_up), hands the costs to the scheduler, reports them in its stats, and serves the same
    greedy outputs as without a budget (the same shapes: the programs the other tests ran)."""
    prompts = _prompts(8, [3, 50, 9, 40, 5, 30])
    models = [FAMILIES[i % len(FAMILIES)] for i in range(len(prompts))]
    want = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, model=models)]
    budgeted = LLM(model_dirs, dtype="float32", tbt_budget_ms=20.0, **ENGINE)
    got = [o.outputs[0].token_ids for o in budgeted.generate(prompts, GREEDY, model=models)]
    assert got == want
    engine = budgeted.engine
    costs = engine.stats().step_costs
    assert set(costs) == set(FAMILIES) and llm.engine.stats().step_costs == {}
    for name in FAMILIES:
        cost = engine.step_costs[name]
        assert cost.token_buckets == (64,) and cost.measured == (True,) and cost.seconds[0] > 0
        assert costs[name]["bucket_ms"] == {64: pytest.approx(cost.seconds[0] * 1e3)}
        assert costs[name]["prefill_tokens"] == (64 if cost.seconds[0] <= 20e-3 else 0)
    assert engine.scheduler._step_costs == engine.step_costs
    monkeypatch.setattr(engine.runner, "compile_jobs", lambda *args, **kwargs: [])   # compiled above
    done = engine.warm_up()
    assert set(done["step_costs"]) == set(FAMILIES) and done["compiles"] == 0
