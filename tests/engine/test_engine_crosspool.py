"""The engine's memory organisations and device splits on 8 simulated devices.

A mixed batch of four models of three MoE families (two Qwen3-MoE with different weights,
Mixtral, OLMoE: `mixed_model_dirs`; Qwen3-MoE caches K*H 32 per token, the others 16, so they
view the shared pages differently) must give the single-device engine's greedy tokens exactly
(float32) in every layout of one table: the CrossPool splits 1+1, 2+2, 6+2 and 4+4 (the
disaggregated step; 4+4 with each attention side on 2 KV devices; each model homed where the
registry's rule puts it, its requests' pages on one of its homes) and the shared/static
baselines on 1, 2 and 4 devices (each model whole on the device the greedy-by-bytes rule
gives it, its requests' pages on it; multi-step decode on every device holding a model); the
pool comes back empty; seeded sampling with logprobs matches too (`SEEDED_LAYOUTS`); prefix
caching is hit.
The other tests serve Mixtral and Qwen3-MoE: a context longer than a KV device runs
sequence-sharded, also off the weight devices' pages; a small pool preempts without changing
outputs; a budgeted arena swaps the models through one slot; static refuses a context that
shared serves on the same devices; unsupported models and options are refused at construction.
"""
from types import SimpleNamespace

import numpy as np
import pytest

from crosspool_jax import LLM, SamplingParams
from crosspool_jax.engine.disagg_runner import DisaggRunner
from crosspool_jax.engine.placed_runner import PlacedRunner
from crosspool_jax.engine.request import Request
from crosspool_jax.runtime.compiles import compile_counter

FAMILIES = ["mixtral", "qwen3_moe"]
MAX_TOKENS = 6
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
ALLOWED = set(range(1, 250, 3)) | {5, 17}
SEEDED = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.9, top_p=0.95, seed=7, logprobs=2, ignore_eos=True,
                        repetition_penalty=1.2, presence_penalty=0.3,          # the token history too
                        allowed_token_ids=sorted(ALLOWED), logit_bias={5: 3.0, 17: -2.0})   # and the logits table
# one token bucket (64) and prompts under 58 tokens: one program shape per model and split
ENGINE = dict(dtype="float32", kv_pool_bytes=2 << 20, max_num_batched_tokens=64, min_token_bucket=64,
              max_decode_steps=4)
# every layout against ONE single-device result (`mixed_expected`): (mode, kv_devices, weight_devices).
# Each split compiles its own programs: one device pair; an even split (2+2: every model's 4
# experts expert-parallel); 6+2 (each model's attention side on a KV device of its own, two KV
# devices homing none); 4+4 (attention_replicas=2: each attention side on a group of 2 KV
# devices, the experts one per weight device). The disaggregated step alone is checked against
# the dense forward in tests/disagg/test_pipeline.py (4+4, 2+4 and 6+2, whose idle KV devices
# and six exchange rounds tests/disagg/test_program_structure.py counts too).
LAYOUTS = [("crosspool", 1, 1), ("crosspool", 2, 2), ("crosspool", 6, 2), ("crosspool", 4, 4),
           ("static", 1, 1), ("shared", 2, 2), ("static", 2, 2), ("shared", 4, 4), ("static", 4, 4)]
# the layouts whose test also samples (seeded, logprobs, penalties): every placed one (their
# devices reuse the single-device engine's programs) and the splits 1+1 and 6+2 (a KV device
# of its own per model); 2+2 and 4+4 check greedy tokens only (~11 s of compiles each)
SEEDED_LAYOUTS = [layout for layout in LAYOUTS if layout[0] != "crosspool"] + [("crosspool", 1, 1), ("crosspool", 6, 2)]
# Where the registry's rules put the four models of `mixed_model_dirs` (q0, mx, ol, q1; the
# premises on their sizes are asserted in the test). shared/static (`weights.place_models`):
# greedy by weight bytes, the largest first onto the device holding the fewest bytes so far
# (ties: the order given, then the lowest device). mx > q0 = q1 > ol with mx < q0 + q1: on 2
# devices mx -> 0, q0 -> 1, q1 -> 1 (its bytes under mx's), ol -> 0 (mx's under q0 + q1); on 4
# each model a device of its own in that order.
PLACED = {1: {"q0": 0, "mx": 0, "ol": 0, "q1": 0}, 2: {"q0": 1, "mx": 0, "ol": 0, "q1": 1},
          4: {"q0": 1, "mx": 0, "ol": 3, "q1": 2}}
# crosspool (`disagg.layout._assign_homes`): the same greedy by attention-side size over groups of
# attention_replicas consecutive KV devices: q0 = q1 > ol > mx, so q0 -> group 0, q1 -> group 1,
# ol -> group 0 (equal loads: the lowest), mx -> the group holding less; 6+2: one device each.
HOMES = {1: {"q0": (0,), "mx": (0,), "ol": (0,), "q1": (0,)}, 2: {"q0": (0,), "mx": (1,), "ol": (0,), "q1": (1,)},
         6: {"q0": (0,), "mx": (3,), "ol": (2,), "q1": (1,)},
         4: {"q0": (0, 1), "mx": (2, 3), "ol": (0, 1), "q1": (2, 3)}}


@pytest.fixture(scope="module")
def model_dirs(tiny_model_dirs):
    return {f: tiny_model_dirs[f] for f in FAMILIES + ["llama"]}


@pytest.fixture(scope="module")
def shared(model_dirs):
    return LLM({f: model_dirs[f] for f in FAMILIES}, mode="shared", **ENGINE)


def _prompts(seed):
    # a fixed seed: greedy tokens are compared exactly across two summation orders (expert
    # shards vs one device), so a random near-tie could flip an argmax in some run
    rng = np.random.default_rng(seed)
    lengths = [5, 17, 40, 3, 30, 9, 52, 24]
    return [rng.integers(1, 250, n).tolist() for n in lengths]


@pytest.fixture(scope="module")
def batch():
    """Mixtral and Qwen3-MoE alternating; prompt 5 shares a full block (G=32 for Mixtral) with prompt 2."""
    prompts = _prompts(1234)
    models = [FAMILIES[i % 2] for i in range(len(prompts))]
    prompts[5] = prompts[2][:36] + prompts[5]
    models[5] = models[2]
    return prompts, models


@pytest.fixture(scope="module")
def expected(shared, batch):
    """The single-device engine's greedy tokens and seeded outputs (computed once)."""
    prompts, models = batch
    return _tokens(shared.generate(prompts, GREEDY, model=models)), shared.generate(prompts, SEEDED, model=models)


@pytest.fixture(scope="module")
def mixed_batch(mixed_model_dirs):
    """The four models in turn, but prompt 5 is OLMoE's, as prompt 2, with whom it shares a full
    block (G=32 for OLMoE): Mixtral one request, OLMoE three."""
    names = list(mixed_model_dirs)
    prompts = _prompts(1234)
    models = [names[i % len(names)] for i in range(len(prompts))]
    prompts[5] = prompts[2][:36] + prompts[5]
    models[5] = models[2]
    return prompts, models


@pytest.fixture(scope="module")
def mixed(mixed_model_dirs):
    return LLM(mixed_model_dirs, mode="shared", **ENGINE)


@pytest.fixture(scope="module")
def mixed_expected(mixed, mixed_batch):
    """The single-device engine's greedy tokens and seeded outputs of the four-model batch."""
    prompts, models = mixed_batch
    return _tokens(mixed.generate(prompts, GREEDY, model=models)), mixed.generate(prompts, SEEDED, model=models)


def _tokens(outs):
    for o in outs:
        assert o.error is None and o.finished
        assert o.outputs[0].finish_reason == "length"
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("mode,n_kv,n_w", LAYOUTS)
def test_layout_matches_single_device_engine(mixed_model_dirs, mixed, mixed_batch, mixed_expected, mode, n_kv, n_w):
    prompts, models = mixed_batch
    names = list(mixed_model_dirs)
    want, want_seeded = mixed_expected
    placed = mode != "crosspool"
    # shared/static: the reference's pages per device, so device 0 reuses its compiled programs
    # crosspool 4+4: each attention side on a group of 2 KV devices (attention_replicas)
    options = ({**ENGINE, "kv_pool_bytes": n_kv * ENGINE["kv_pool_bytes"]} if placed
               else {**ENGINE, "attention_replicas": 2 if n_kv == 4 else 1})
    llm = LLM(mixed_model_dirs, mode=mode, kv_devices=n_kv, weight_devices=n_w, **options)
    engine = llm.engine
    registry = engine.registry
    if placed:
        # each model whole on one device, placed by its weight bytes (`PLACED`)
        assert isinstance(engine.runner, PlacedRunner) and registry.arena is None
        size = {m: s["weights_bytes"] for m, s in registry.model_stats().items()}
        assert size["mx"] > size["q0"] == size["q1"] > size["ol"] and size["mx"] < size["q0"] + size["q1"]
        assert registry.model_devices == PLACED[n_kv]
        assert {m: s["device"] for m, s in registry.model_stats().items()} == {
            m: registry.kv_devices[d].id for m, d in registry.model_devices.items()}
        assert registry.kv_layout.pages_per_device == mixed.engine.registry.kv_layout.pages_per_device
    else:
        # each model's attention side on its home group, by its size (`HOMES`)
        assert isinstance(engine.runner, DisaggRunner)
        assert registry.kv_pool is None and registry.arena.layout.n_kv == n_kv
        size = {m: registry.arena.layout.region_elems(m, "kv") for m in names}
        assert size["q0"] == size["q1"] > size["ol"] > size["mx"]
        assert registry.model_homes == HOMES[n_kv]
    # first step by hand: every request's pages on one KV device: its model's device when
    # placed, else one of its model's home KV devices (those holding its attention side)
    for i, (p, m) in enumerate(zip(prompts, models)):
        engine.add_request(f"r{i}", m, p, GREEDY)
    engine.step()
    homes = []
    for i in range(len(prompts)):
        req = engine.scheduler.get_request(f"r{i}")
        devices = {b.device for b in engine.kv_manager.blocks_of(req)}
        assert len(devices) <= 1
        if placed:
            assert devices <= {registry.model_devices[models[i]]}
        else:
            assert devices <= set(registry.model_homes[models[i]])
        homes += list(devices)
    # every device holding a model (placed) or homing one (crosspool) holds requests: a request
    # starts on the one of its model's homes with the most free pages, so 4+4's first requests
    # spread over both devices of each group
    assert set(homes) == (set(registry.model_devices.values()) if placed
                          else set().union(*registry.model_homes.values())), homes
    used = engine.stats().kv_pages_used_by_model
    assert all(used[m] > 0 for m in names)
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
    # through the API again (cache hits on their devices): seeded sampling with logprobs gives
    # the single-device engine's tokens and logprobs (on the splits of SEEDED_LAYOUTS: its
    # sampling programs compile per split; the others run the greedy batch again)
    if (mode, n_kv, n_w) not in SEEDED_LAYOUTS:
        assert _tokens(llm.generate(prompts, GREEDY, model=models)) == want
    else:
        got_seeded = llm.generate(prompts, SEEDED, model=models)
        assert _tokens(got_seeded) == _tokens(want_seeded)
        assert set(sum(_tokens(got_seeded), [])) <= ALLOWED
        for g, w in zip(got_seeded, want_seeded):
            for lg, lw in zip(g.outputs[0].logprobs, w.outputs[0].logprobs):
                assert lg.keys() == lw.keys()
                assert all(abs(lg[t].logprob - lw[t].logprob) < 1e-4 for t in lg)
    stats = engine.stats()
    assert stats.kv_pages_free == stats.kv_pages_total
    assert stats.kv_pages_used_by_model == {m: 0 for m in names}
    assert stats.num_running == stats.num_waiting == 0
    # bucketed shapes keep the programs few: placed, at most 4 per model (a device's program
    # keys name the model); the split, with its multi-step decode programs, at most 6 per
    # architecture (q0 and q1 run the same programs, their weights' offsets are data)
    assert stats.compiled_programs <= (4 * len(names) if placed else 6 * 3)
    if not placed:         # decode ran max_decode_steps tokens per dispatch on the split too
        assert engine.runner.stats.decode_tokens_per_dispatch_max == ENGINE["max_decode_steps"]
    if placed:
        # each device's buffers stayed on it; only the devices holding a model were written;
        # multi-step decode ran on every device holding a model
        pool = registry.kv_pool
        for d, device in enumerate(registry.kv_devices):
            assert pool.k_buffers[d].devices() == {device}
            assert bool(np.any(np.asarray(pool.k_buffers[d]))) == (d in registry.model_devices.values())
        for d in set(registry.model_devices.values()):
            assert engine.runner.runners[d].stats.decode_tokens_per_dispatch_max == ENGINE["max_decode_steps"]


def _run_recording_groups(engine, requests):
    """Step `requests` ({id: (model, prompt)}) to the end; -> (outputs by id, per step the
    runner's groups: (sharded, sequences per KV device, KV devices of each request's blocks))."""
    runner, groups = engine.runner, []
    group = runner.group_by_device

    def recording(model_name, chunks):
        g = group(model_name, chunks)
        devices = {c.request.request_id: {b.device for b in engine.kv_manager.blocks_of(c.request)} for c in chunks}
        groups.append((g.sharded, [len(x) for x in g.local], devices))
        return g

    runner.group_by_device = recording
    try:
        for rid, (m, p) in requests.items():
            engine.add_request(rid, m, p, GREEDY)
        got = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    got[out.request_id] = out
    finally:
        del runner.group_by_device
    return got, groups


def test_contexts_larger_than_one_kv_device_match_single_device_engine(model_dirs, shared, batch, expected):
    """2 KV devices with at least 8 pages each (and the weight devices' rows' pages): a Qwen3
    prompt one block longer than its home KV device holds (G=16, 2 pages a block) spills onto
    another device and runs sequence-sharded: alone (M=1, its prefill chunked across the
    spill), then beside two short Qwen3 requests (M=2: a sharded and one-device sequences in
    one step; they start off their full home), then the whole batch with three 300-token
    prompts (preemption). Greedy tokens equal the single-device engine's."""
    prompts, models = batch
    llm = LLM({f: model_dirs[f] for f in FAMILIES}, mode="crosspool", kv_devices=2, weight_devices=2,
              enable_prefix_caching=False, attention_backend="reference", moe_backend="reference",
              **{**ENGINE, "kv_pool_bytes": 2 * 8 * 2 * 512 * 4})
    engine = llm.engine
    assert (engine.runner.attention_backend, engine.runner.moe_backend) == ("reference", "reference")
    usable = engine.registry.kv_layout.usable_pages
    home = engine.registry.model_homes["qwen3_moe"][0]
    assert min(usable[:2]) >= 8 and len(usable) == 4
    assert engine.kv_manager.max_request_tokens("qwen3_moe") == sum(p // 2 for p in usable) * 16   # the whole pool
    rng = np.random.default_rng(99)
    long_prompt = rng.integers(1, 250, usable[home] // 2 * 16 + 10).tolist()
    longer = [rng.integers(1, 250, 300).tolist() for _ in range(3)]           # 3 x 19 blocks > the pool
    want = dict(zip([f"r{i}" for i in range(len(prompts))], expected[0]))
    for rid, p in [("long", long_prompt), ("x0", longer[0]), ("x1", longer[1]), ("x2", longer[2])]:
        want[rid] = _tokens(shared.generate([p], GREEDY, model="qwen3_moe"))[0]
    got, groups = _run_recording_groups(engine, {"long": ("qwen3_moe", long_prompt)})
    assert _tokens([got["long"]]) == [want["long"]]
    assert groups[-1][0] and len(groups[-1][2]["long"]) >= 2 and home in groups[-1][2]["long"]
    assert not groups[0][0] and groups[0][2]["long"] == {home}   # the first chunk (4 blocks) fit its home
    assert max(max(n) for _, n, _ in groups) == 1                # one sequence: M = 1
    assert models[1] == models[3] == "qwen3_moe"
    got, groups = _run_recording_groups(engine, {"long": ("qwen3_moe", long_prompt),
                                                 "r1": ("qwen3_moe", prompts[1]), "r3": ("qwen3_moe", prompts[3])})
    assert {r: _tokens([o])[0] for r, o in got.items()} == {r: want[r] for r in ("long", "r1", "r3")}
    mixed = [devices for sharded, n, devices in groups
             if sharded and max(n) >= 2 and any(len(d) == 1 for d in devices.values())]
    assert mixed, f"no step ran a sharded sequence beside one-device sequences in two micro-batches: {groups}"
    requests = {f"r{i}": (m, p) for i, (p, m) in enumerate(zip(prompts, models))}
    requests.update({f"x{i}": ("qwen3_moe", p) for i, p in enumerate(longer)})
    got, _ = _run_recording_groups(engine, requests)
    assert {r: _tokens([o])[0] for r, o in got.items()} == {r: want[r] for r in requests}
    stats = engine.stats()
    assert stats.num_preemptions > 0
    assert stats.kv_pages_free == stats.kv_pages_total
    # the runner groups a chunk on its first block's device and marks the step sharded
    P = engine.registry.kv_layout.pages_per_device
    req = Request("spread", "mixtral", prompts[0], GREEDY)
    chunk = SimpleNamespace(request=req, start=0, num_tokens=5, token_ids=prompts[0][:5],
                            page_table=[[P + 1, 1], [P + 2, 2]])       # device 1, then device 0 (P pages each)
    g = engine.runner.group_by_device("mixtral", [chunk])
    assert g.sharded and g.where == [(1, 0)] and g.local[1][0].page_table.tolist() == [[1, 1], [2, 2]]
    with pytest.raises(ValueError, match=f"request spread of model 'mixtral': page ids \\[{4 * P + 1}\\] are outside"):
        engine.runner.group_by_device("mixtral", [SimpleNamespace(**{**vars(chunk), "page_table": [[4 * P + 1, 1], [P + 2, 2]]})])
    # a request that found its home full started elsewhere (here a weight device): its model's home runs it
    assert engine.registry.model_homes["mixtral"] == (1,)
    g = engine.runner.group_by_device("mixtral", [SimpleNamespace(**{**vars(chunk), "page_table": [[2 * P + 1, 1], [P + 2, 2]]})])
    assert g.sharded and g.where == [(1, 0)] and g.global_[1][0].page_table.tolist() == [[2 * P + 1, 1], [P + 2, 2]]


def test_requests_spill_onto_the_weight_devices_pages(model_dirs, shared):
    """`arena_bytes` rows on 2 KV + 2 weight devices: every device's memory beyond its weights
    is pages (the weight devices' too), each model's attention side sits on one KV device,
    where its requests start. A 230-token Qwen3 prompt fills its home, spills over the other
    KV device onto a weight device's pages (sequence-sharded steps there); greedy tokens equal
    the single-device engine's, nothing compiles after the warm-up (the sequence-sharded
    programs are warmed up too) and the pool comes back whole."""
    from crosspool_jax.checkpoints.loader import read_config
    from crosspool_jax.disagg.layout import make_multi_layout
    import jax

    prompt = np.random.default_rng(7).integers(1, 250, 230).tolist()
    want = _tokens(shared.generate([prompt], GREEDY, model="qwen3_moe"))
    configs = {f: read_config(model_dirs[f])[1] for f in FAMILIES}
    probe = make_multi_layout(configs, n_kv=2, n_w=2, pages_per_device=8, devices=jax.devices()[:4])
    # one token per dispatch (a sharded step decodes one at a time anyway): the warm-up skips the
    # multi-step decode programs
    options = {**{k: v for k, v in ENGINE.items() if k != "kv_pool_bytes"}, "max_decode_steps": 1}
    llm = LLM({f: model_dirs[f] for f in FAMILIES}, mode="crosspool", kv_devices=2, weight_devices=2,
              arena_bytes=probe.arena_elems * 4, enable_prefix_caching=False, **options)
    engine = llm.engine
    layout = engine.registry.arena.layout
    assert layout.arena_elems == probe.arena_elems and all(p > 0 for p in layout.device_pages[2:])
    assert sorted(engine.registry.model_homes.values()) == [(0,), (1,)]
    assert engine.stats().kv_pages_total == sum(layout.device_pages)
    home = engine.registry.model_homes["qwen3_moe"][0]
    assert engine.kv_manager.max_request_tokens("qwen3_moe") == sum(p // 2 for p in layout.device_pages) * 16
    assert engine.warm_up()["compiles"] > 0
    before = compile_counter().count
    got, groups = _run_recording_groups(engine, {"long": ("qwen3_moe", prompt)})
    assert compile_counter().count == before
    assert _tokens([got["long"]]) == want
    assert groups[0][2]["long"] == {home}                       # it starts on its model's home
    held = set().union(*(devices["long"] for _, _, devices in groups))
    assert held & {2, 3} and groups[-1][0], f"the request never reached a weight device's pages: {held}"
    stats = engine.stats()
    assert stats.kv_pages_free == stats.kv_pages_total


def test_refused_at_construction(model_dirs):
    with pytest.raises(ValueError, match="model 'dense' cannot run on the disaggregated step: intermediate_size"):
        LLM({"dense": model_dirs["llama"]}, mode="crosspool", kv_devices=2, weight_devices=5, **ENGINE)
    with pytest.raises(ValueError, match="weights_pool_bytes=1024 is smaller than the largest model's FFN "
                                         "shards over the weight devices: model 'mixtral' needs"):
        LLM({"mixtral": model_dirs["mixtral"]}, mode="crosspool", kv_devices=1, weight_devices=1,
            weights_pool_bytes=1 << 10, **ENGINE)


def test_dense_ffn_layers_on_a_crosspool_split_match_single_device_engine(batch, tmp_path):
    """Qwen2-MoE with a dense FFN layer between two MoE layers (as the shipped qwen2-moe-tiny):
    on a 2+2 split (dense F and shared expert split over both weight devices, the experts
    expert-parallel) its greedy tokens are the single-device engine's."""
    from crosspool_jax.checkpoints.tiny_models import make_tiny_hf_model
    make_tiny_hf_model("qwen2_moe", str(tmp_path), seed=104, num_hidden_layers=3, mlp_only_layers=[1])
    prompts = batch[0][:4]
    single = LLM({"q": str(tmp_path)}, mode="shared", **ENGINE)
    assert [single.engine.registry.get("q").config.ffn_kind(l) for l in range(3)] == ["moe", "dense", "moe"]
    want = _tokens(single.generate(prompts, GREEDY))
    split = LLM({"q": str(tmp_path)}, mode="crosspool", kv_devices=2, weight_devices=2, **ENGINE)
    assert isinstance(split.engine.runner, DisaggRunner)
    assert split.engine.registry.arena.layout.model("q").has("w", "dense/w1_LDF2")
    assert _tokens(split.generate(prompts, GREEDY)) == want


def test_static_refuses_a_context_that_shared_serves_on_two_devices(model_dirs, tiny_model_dirs, shared):
    # three models on two devices: Mixtral alone on device 0, Qwen3-MoE and OLMoE share device 1
    dirs = {f: tiny_model_dirs[f] for f in FAMILIES + ["olmoe"]}
    prompt = np.random.default_rng(5).integers(1, 250, 56).tolist()    # 4 blocks of 16 tokens: 8 pages
    pool = 2 * 12 * 2 * 512 * 4           # 12 pages of 512 float32 elements per device, K and V
    outs = {}
    for mode in ("shared", "static"):
        llm = LLM(dirs, mode=mode, kv_devices=2, weight_devices=2, **{**ENGINE, "kv_pool_bytes": pool})
        registry = llm.engine.registry
        assert registry.model_devices == {"mixtral": 0, "qwen3_moe": 1, "olmoe": 1}
        assert registry.kv_layout.pages_per_device == 12
        outs[mode] = llm.generate([prompt], GREEDY, model="qwen3_moe")[0]
    # static: each model owns an equal share of ITS device's pages (whole blocks of 2 layers)
    assert registry.static_page_caps() == {"mixtral": 12, "qwen3_moe": 6, "olmoe": 6}
    want = shared.generate([prompt], GREEDY, model="qwen3_moe")[0].outputs[0].token_ids
    assert outs["shared"].error is None and outs["shared"].outputs[0].token_ids == want
    assert "of model 'qwen3_moe'" in outs["static"].error and "max_pages 6" in outs["static"].error
    assert "12 pages on KV device 1, where the model is placed" in outs["static"].error


def test_placed_modes_refuse_impossible_options(model_dirs):
    with pytest.raises(ValueError, match="must select the same devices"):
        LLM({"mixtral": model_dirs["mixtral"]}, mode="static", kv_devices=2, weight_devices=4, **ENGINE)
    # weights_pool_bytes is a per-device budget in shared/static: a model's FFN side must fit one device
    with pytest.raises(ValueError, match="model 'mixtral' needs 148736 bytes for its FFN side.*"
                                         "weights_pool_bytes=100000 \\(a per-device budget"):
        LLM({"mixtral": model_dirs["mixtral"]}, mode="shared", kv_devices=2, weights_pool_bytes=100000, **ENGINE)
    with pytest.raises(ValueError, match="model 'qwen3_moe' needs 115328 bytes for its attention side"):
        LLM({"qwen3_moe": model_dirs["qwen3_moe"]}, mode="static", kv_devices=4, attention_pool_bytes=1 << 16,
            **ENGINE)


def _one_slot_bytes(model_dirs, role, n_kv=2, n_w=2):
    """float32 bytes of the largest model's region of a role over its devices: a budget of one slot."""
    from crosspool_jax.checkpoints.loader import read_config
    from crosspool_jax.disagg.layout import make_multi_layout
    configs = {f: read_config(model_dirs[f])[1] for f in FAMILIES}
    layout = make_multi_layout(configs, n_kv=n_kv, n_w=n_w, pages_per_device=8)
    return max(layout.region_elems(f, role) for f in FAMILIES) * (n_kv if role == "kv" else n_w) * 4


@pytest.mark.parametrize("option,role", [("weights_pool_bytes", "w"), ("attention_pool_bytes", "kv")])
def test_budgeted_arena_swaps_models_and_outputs_unchanged(model_dirs, batch, expected, option, role):
    """A 2+2 split whose weights (resp. attention) budget holds one model: the two families
    take turns in one slot of the arena, every request completes with the single-device
    engine's greedy tokens, the swap counters move, and the arena's buffers never change."""
    prompts, models = batch
    llm = LLM({f: model_dirs[f] for f in FAMILIES}, mode="crosspool", kv_devices=2, weight_devices=2,
              **{option: _one_slot_bytes(model_dirs, role)}, **ENGINE)
    registry = llm.engine.registry
    assert registry.arena.layout.region(role).num_slots == 1
    assert [registry.is_resident(f) for f in FAMILIES] == [True, False]
    pointers = [s.data.unsafe_buffer_pointer() for s in registry.arena.array.addressable_shards]
    assert _tokens(llm.generate(prompts, GREEDY, model=models)) == expected[0]
    swaps = registry.weights_stats()
    assert swaps.swaps_in >= 2 and swaps.swaps_out >= 2
    assert swaps.bytes_swapped_in > 0 and swaps.swap_in_seconds > 0 and swaps.swap_in_bytes_per_second > 0
    stats = llm.engine.stats()
    assert (stats.swaps_in, stats.swaps_out) == (swaps.swaps_in, swaps.swaps_out)
    assert sum(m["resident"] for m in stats.models.values()) == 1
    assert any(m["last_swap_in_seconds"][role] for m in stats.models.values())
    assert [s.data.unsafe_buffer_pointer() for s in registry.arena.array.addressable_shards] == pointers
    # admission prefetches: the model that is out comes in before any step runs
    cold = next(f for f in FAMILIES if not registry.is_resident(f))
    llm.engine.add_request("cold", cold, prompts[0], GREEDY)
    assert registry.is_resident(cold) and registry.weights_stats().swaps_in == swaps.swaps_in + 1
    llm.engine.abort_request("cold")
