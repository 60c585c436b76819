"""Several models in one arena: shared KV pages, each model's own slots, one program per architecture.

Steps of two models alternate on the same arena (donated each time) and each gives the
dense forward's logits, its sequences on its home KV device (the one holding its attention
side); only pages are written; no slot overlaps another or a usable page on any row; two
models of one architecture run as lanes of one program; a model the disaggregated step cannot
run is refused by name.
"""
import os

import numpy as np
import pytest

from crosspool_jax.disagg import (Arena, build_disagg_inputs, build_multi_arena, disagg_step,
                                  make_multi_layout)
from crosspool_jax.models import ModelConfig
from crosspool_jax.runtime.shapes import StepShape
from disagg_tiny import PAGE_ELEMS, check_and_advance, make_seqs, model, next_chunks

PAGES = 64                       # each model's sequences take pages from its own half


def _max_seqs(config) -> int:
    """Sequences per device whose 4 blocks per layer fit in its model's half of the pages."""
    return min(3, PAGES // 2 // (4 * config.num_layers))


def _no_overlap(slots, page_spans):
    spans = sorted([(s.offset, s.offset + s.size, s.name) for s in slots if not s.name.startswith("pages/")]
                   + [(lo, hi, "pages") for lo, hi in page_spans])
    for (a0, a1, an), (b0, b1, bn) in zip(spans, spans[1:]):
        assert a1 <= b0, (an, bn)


# an MLA model (pages of latent + rope key rows, 10 values per half) beside a GPT-OSS one
# (per-head K/V rows of 16): one page size for both (`choose_page_elems`), G per model
@pytest.mark.parametrize("names,n_kv,n_w,M", [(("qwen3_moe", "mixtral"), 2, 2, 2), (("qwen3_moe", "mixtral"), 1, 1, 1),
                                              (("deepseek_v2", "gpt_oss"), 2, 2, 2)])
def test_two_models_share_one_arena(names, n_kv, n_w, M):
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"random seed {seed}")
    rng = np.random.default_rng(seed)
    models = {n: model(n, 3) for n in names}
    per_head = all(not m[0].is_mla for m in models.values())
    layout = make_multi_layout({n: m[0] for n, m in models.items()}, n_kv=n_kv, n_w=n_w,
                               pages_per_device=PAGES, page_elems=PAGE_ELEMS if per_head else None)
    assert layout.names == list(names)
    assert [len(layout.homes(n)) for n in names] == [1, 1]
    first = layout.first
    for d in range(n_kv + n_w):
        if d < n_kv:
            _no_overlap([s for n in names if d in layout.homes(n) for s in layout.model(n).kv_slots],
                        first.page_spans(d))
        else:
            _no_overlap([s for n in names for s in layout.model(n).w_slots], first.page_spans(d))
    arena = Arena(layout, build_multi_arena({n: m[1:] for n, m in models.items()}, layout))
    before = np.asarray(arena.array)
    seqs = {}
    for i, n in enumerate(names):
        config = models[n][0]
        seqs[n] = [s for s in make_seqs(rng, n_kv, config.num_layers, config.vocab_size,
                                        G=layout.model(n).tokens_per_page, max_seqs=_max_seqs(config))
                   if s.device in layout.homes(n)]
        assert seqs[n] or n_kv > 1
        for s in seqs[n]:
            s.page_table = s.page_table + i * (PAGES // 2)      # disjoint halves of each device's pages
    for step in range(3):
        for n in names:
            config, kv, ffn = models[n]
            view = layout.model(n)
            chunks, owners = next_chunks(seqs[n], n_kv, max_chunk=5)
            inputs, logit_rows = build_disagg_inputs(chunks, layout=view, num_layers=config.num_layers,
                                                     num_microbatches=M, min_tokens=16, min_seqs=4)
            out, logits = disagg_step(arena.take(), inputs, layout=view, config=config, num_microbatches=M)
            arena.put(out)
            logits = np.asarray(logits)
            err = check_and_advance(logits, owners, logit_rows, rng, config, kv, ffn)
            assert err < 1e-5, f"{n} step {step}: relative error {err}"
    after = np.asarray(arena.array)
    np.testing.assert_array_equal(after[n_kv:], before[n_kv:])
    for d in range(n_kv):
        pages = np.zeros(layout.arena_elems, bool)
        for lo, hi in first.page_spans(d):
            pages[lo:hi] = True
        np.testing.assert_array_equal(after[d, ~pages], before[d, ~pages])


@pytest.mark.parametrize("family,other", [("mixtral", "qwen3_moe"), ("gpt_oss", "deepseek_v2")])
def test_models_of_one_architecture_run_as_lanes_of_one_program(family, other):
    """Two Mixtrals (or GPT-OSS models: their sinks and biases read at each lane's offsets; other
    weights) and a Qwen3-MoE (or an MLA model) in one arena over 2 + 2 devices: the two of one
    architecture have one `program` (their offsets differ), and their steps run as the two lanes
    of ONE `disagg_step` (micro-batch m = model m, read at its offsets; their homes may differ),
    each lane's logits equal to its own model's dense forward, in either lane order, by one
    compiled program."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"random seed {seed}")
    rng = np.random.default_rng(seed)
    n_kv, n_w = 2, 2
    models = {"a": model(family, 3), "b": model(family, 4), "q": model(other, 5)}
    layout = make_multi_layout({n: m[0] for n, m in models.items()}, n_kv=n_kv, n_w=n_w,
                               pages_per_device=PAGES, page_elems=None if models["q"][0].is_mla else PAGE_ELEMS)
    program = layout.model("a").program
    assert layout.model("b").program == program and layout.model("q").program != program
    assert not np.array_equal(layout.model("a").offsets(), layout.model("b").offsets())
    arena = Arena(layout, build_multi_arena({n: m[1:] for n, m in models.items()}, layout))
    config = models["a"][0]
    seqs = {}
    for i, n in enumerate(("a", "b")):
        seqs[n] = [s for s in make_seqs(rng, n_kv, config.num_layers, config.vocab_size,
                                        G=program.tokens_per_page, max_seqs=_max_seqs(config))
                   if s.device in layout.homes(n)]
        for s in seqs[n]:
            s.page_table = s.page_table + i * (PAGES // 2)      # disjoint halves of each device's pages
    compiled = []
    for step, order in enumerate([("a", "b"), ("b", "a"), ("a", "b")]):
        local, groups, lanes = [[] for _ in range(n_kv)], [[[], []] for _ in range(n_kv)], []
        for m, n in enumerate(order):
            chunks, owners = next_chunks(seqs[n], n_kv, max_chunk=5)
            positions = [[] for _ in range(n_kv)]
            for d in range(n_kv):
                for c in chunks[d]:
                    groups[d][m].append(len(local[d]))
                    positions[d].append(len(local[d]))
                    local[d].append(c)
            lanes.append((n, owners, positions))
        inputs, logit_rows = build_disagg_inputs(local, layout=program, num_layers=config.num_layers,
                                                 num_microbatches=2, shape=StepShape(16, 4, 4), microbatches=groups)
        offsets = np.stack([layout.model(n).offsets() for n in order])
        out, logits = disagg_step(arena.take(), inputs, layout=program, config=config, num_microbatches=2,
                                  offsets=offsets)
        arena.put(out)
        compiled.append(disagg_step._cache_size())
        for n, owners, positions in lanes:
            rows = [[logit_rows[d][i] for i in positions[d]] for d in range(n_kv)]
            err = check_and_advance(logits, owners, rows, rng, config, *models[n][1:])
            assert err < 1e-5, f"{n} in lanes {order} step {step}: relative error {err}"
    assert compiled[0] == compiled[-1], compiled          # one program, whatever the lanes' models and order


def test_unsupported_model_is_named():
    dense = ModelConfig.from_hf_dict({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 32, "intermediate_size": 18,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 1e4,
        "rms_norm_eps": 1e-6})
    configs = {"moe": model("qwen3_moe", 0)[0], "my-llama": dense}
    make_multi_layout(configs, n_kv=1, n_w=2, pages_per_device=8)           # dense layers: F split in 2
    with pytest.raises(ValueError, match="model 'my-llama' cannot run on the disaggregated step: "
                                         "intermediate_size F=18 .* divisible by the weight devices n_w=4"):
        make_multi_layout(configs, n_kv=1, n_w=4, pages_per_device=8)
    with pytest.raises(ValueError, match="no model named 'x'"):
        make_multi_layout({"moe": configs["moe"]}, n_kv=1, n_w=1, pages_per_device=8).model("x")
