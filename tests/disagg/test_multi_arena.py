"""Several models in one arena: shared KV pages, each model's own slots, one program per model.

Steps of two models alternate on the same arena (donated each time) and each gives the
dense forward's logits, its sequences on its home KV device (the one holding its attention
side); only pages are written; no slot overlaps another or a usable page on any row; a model
the disaggregated step cannot run is refused by name.
"""
import os

import numpy as np
import pytest

from crosspool_jax.disagg import (Arena, build_disagg_inputs, build_multi_arena, disagg_step,
                                  make_multi_layout)
from crosspool_jax.models import ModelConfig
from disagg_tiny import PAGE_ELEMS, check_and_advance, make_seqs, model, next_chunks

PAGES = 64                       # each model's sequences take pages from its own half


def _no_overlap(slots, page_spans):
    spans = sorted([(s.offset, s.offset + s.size, s.name) for s in slots if not s.name.startswith("pages/")]
                   + [(lo, hi, "pages") for lo, hi in page_spans])
    for (a0, a1, an), (b0, b1, bn) in zip(spans, spans[1:]):
        assert a1 <= b0, (an, bn)


@pytest.mark.parametrize("n_kv,n_w,M", [(2, 2, 2), (1, 1, 1)])
def test_two_models_share_one_arena(n_kv, n_w, M):
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"random seed {seed}")
    rng = np.random.default_rng(seed)
    names = ("qwen3_moe", "mixtral")
    models = {n: model(n, 3) for n in names}
    layout = make_multi_layout({n: m[0] for n, m in models.items()}, n_kv=n_kv, n_w=n_w,
                               pages_per_device=PAGES, page_elems=PAGE_ELEMS)
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
                                        G=layout.model(n).tokens_per_page) if s.device in layout.homes(n)]
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
