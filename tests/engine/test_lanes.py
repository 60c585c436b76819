"""Lanes: the decodes of models of one architecture on one device run as ONE program per engine
step (`multi_decode` over a tuple of `DecodeLane`s), and give the tokens each model gives alone;
on the CrossPool split, their steps run as the micro-batches of one arena program.

Two Mixtral models (equal configs, different weights) and a Qwen3-MoE on one device, float32:
the engine with `max_lanes=2` (warmed up first: serving then compiles nothing, lane programs
included) against the engine without lanes, on a mix of greedy, seeded sampled (top-k,
penalties) and logprobs requests with multi-step decode.
"""
import pytest

from crosspool_jax import LLM, SamplingParams
from crosspool_jax.engine.config import EngineConfig
from crosspool_jax.engine.runner import ProgramOutputs
from crosspool_jax.runtime.compiles import compile_counter

ENGINE = dict(dtype="float32", mode="shared", max_num_batched_tokens=16, max_num_seqs=4, max_model_len=48,
              kv_pool_bytes=1 << 20, max_decode_steps=2)


@pytest.fixture(scope="module")
def models(tiny_model_dirs, tmp_path_factory):
    from crosspool_jax.checkpoints.tiny_models import make_tiny_hf_model

    other = tmp_path_factory.mktemp("mixtral_other")
    make_tiny_hf_model("mixtral", str(other), seed=7)            # same architecture, other weights
    return {"a": tiny_model_dirs["mixtral"], "b": str(other), "q": tiny_model_dirs["qwen3_moe"]}


def _mix():
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    sampled = SamplingParams(max_tokens=5, temperature=0.8, top_k=20, presence_penalty=0.4, seed=3, ignore_eos=True)
    scored = SamplingParams(max_tokens=3, temperature=0.0, logprobs=2, ignore_eos=True)
    return [([1, 2, 3, 4], "a", greedy), ([5, 6, 7], "b", greedy), ([8, 9], "q", greedy),
            ([2, 4, 6, 8, 10], "b", sampled), ([3, 1], "a", sampled), ([7, 7, 7], "b", scored)]


def _run(llm, mix=None):
    mix = mix or _mix()
    outs = llm.generate([p for p, _, _ in mix], [params for _, _, params in mix], model=[m for _, m, _ in mix],
                        use_tqdm=False)
    for o in outs:
        assert o.error is None and o.finished
    return [(o.outputs[0].token_ids, [round(lp[t].logprob, 4) for lp, t in
                                      zip(o.outputs[0].logprobs or [], o.outputs[0].token_ids)]) for o in outs]


@pytest.fixture(scope="module")
def alone(models):
    llm = LLM(models, max_lanes=1, **ENGINE)
    return _run(llm), llm.engine.runner.stats


def test_lane_counts_follow_architectures_on_a_device(models):
    llm = LLM(models, max_lanes=3, **ENGINE)
    menus = {name: llm.engine.registry.get(name).menu for name in models}
    assert menus["a"].lane_counts == menus["b"].lane_counts == (1, 2)     # two Mixtrals share one device
    assert menus["q"].lane_counts == (1,)
    spread = LLM(models, max_lanes=3, kv_devices=2, **{**ENGINE, "kv_pool_bytes": 2 << 20})
    devices = spread.engine.registry.model_devices
    for name in ("a", "b"):
        expected = (1, 2) if devices["a"] == devices["b"] else (1,)
        assert spread.engine.registry.get(name).menu.lane_counts == expected


def test_lanes_give_each_models_tokens_in_fewer_programs_and_compile_nothing_after_warm_up(models, alone,
                                                                                            monkeypatch):
    tokens_alone, stats_alone = alone
    assert stats_alone.dispatches == stats_alone.steps               # one program per model step
    llm = LLM(models, max_lanes=2, **ENGINE)
    lowered_for = []                                                  # models whose programs the warm-up built
    compile_jobs = llm.engine.runner.compile_jobs

    def recorded(*args, model="", **kwargs):
        lowered_for.append(model)
        return compile_jobs(*args, model=model, **kwargs)

    monkeypatch.setattr(llm.engine.runner, "compile_jobs", recorded)
    assert llm.engine.warm_up(variants=True)["compiles"] > 0
    assert sorted(lowered_for) == ["a", "q"]                          # b's programs are a's: built once
    fetches = []                                                      # device-to-host fetches of outputs
    host = ProgramOutputs.host

    def counted(self):
        if self._host is None:
            fetches.append(self)
        return host(self)

    monkeypatch.setattr(ProgramOutputs, "host", counted)
    before = compile_counter().count
    tokens = _run(llm)
    assert compile_counter().count == before                          # lane programs were warmed up too
    assert tokens == tokens_alone
    stats = llm.engine.runner.stats
    assert stats.steps == stats_alone.steps
    assert stats.dispatches < stats.steps                             # a's and b's decodes shared programs
    assert llm.engine.stats().dispatches == stats.dispatches
    assert len(fetches) == len(set(map(id, fetches))) == stats.dispatches   # one fetch per program, lanes' too


def test_crosspool_split_runs_one_architectures_models_as_lanes(models, alone):
    """The CrossPool split (1 KV + 1 weight device): the two Mixtrals share one program (their
    places in the arena are its data) and run as its two lanes (lane counts (1, 2) by default,
    on a CPU too: the split's step has two micro-batches anyway), each getting the tokens it gets
    alone on the placed path, in fewer programs than model steps; after the CPU's default warm-up
    (no logprobs variants: the mix leaves its logprobs request out; the test above warms every
    variant of the placed lanes), greedy and sampled requests (penalties, multi-step decode)
    compile nothing."""
    tokens_alone, _ = alone
    llm = LLM(models, mode="crosspool", kv_devices=1, weight_devices=1,
              **{k: v for k, v in ENGINE.items() if k != "mode"})
    menus = {name: llm.engine.registry.get(name).menu for name in models}
    assert menus["a"].lane_counts == menus["b"].lane_counts == (1, 2) and menus["q"].lane_counts == (1,)
    assert llm.engine.warm_up(variants=False)["compiles"] > 0
    mix = [m for m in _mix() if not m[2].logprobs]
    assert len(mix) == len(_mix()) - 1
    before = compile_counter().count
    tokens = _run(llm, mix)
    assert compile_counter().count == before
    assert tokens == [t for t, m in zip(tokens_alone, _mix()) if not m[2].logprobs]
    stats = llm.engine.runner.stats
    assert stats.dispatches < stats.steps


def test_max_lanes_is_validated(models):
    with pytest.raises(ValueError, match="max_lanes"):
        EngineConfig(models=models, max_lanes=0)
