"""Budgeted arena regions: models swapped in and out of slots, steps read them where they land.

Three models on a 2+2 split with one weights slot and two attention slots: steps of every
model in turn give the dense forward's logits while the models move between slots (one
compiled program per model shape, the arena's buffers never change), a model in use is never
evicted, writes wait while a step holds the arena, budgets below the largest model are
refused by name, and the KV rows' spare tail becomes pages.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crosspool_jax.disagg import build_disagg_inputs, disagg_step, make_multi_layout
from crosspool_jax.disagg.arena import region_payloads
from crosspool_jax.disagg.residency import build_residency
from crosspool_jax.weights import WeightsPoolBusyError
from disagg_tiny import PAGE_ELEMS, PAGES_PER_DEVICE, check_and_advance, make_seqs, model, next_chunks

# two models of one shape (one compiled step program serves both, whatever slot) and Mixtral
NAMES = ("qwen3_moe", "mixtral", "qwen3_moe_b")
N_KV = N_W = 2


def _models():
    return {n: model(n.removesuffix("_b"), 6 if n.endswith("_b") else 5) for n in NAMES}


PAGES = len(NAMES) * PAGES_PER_DEVICE      # each model's sequences take their own PAGES_PER_DEVICE


def _slot_elems(models, role):
    full = make_multi_layout({n: m[0] for n, m in models.items()}, n_kv=N_KV, n_w=N_W,
                             pages_per_device=PAGES, page_elems=PAGE_ELEMS)
    return max(full.region_elems(n, role) for n in models)


def _layout(models, w_slots, kv_slots):
    """Budgets (float32 bytes over the role's devices) of exactly that many slots."""
    return make_multi_layout({n: m[0] for n, m in models.items()}, n_kv=N_KV, n_w=N_W,
                             pages_per_device=PAGES, page_elems=PAGE_ELEMS,
                             weights_pool_bytes=w_slots * N_W * _slot_elems(models, "w") * 4,
                             attention_pool_bytes=kv_slots * N_KV * _slot_elems(models, "kv") * 4)


def _pointers(arena):
    return [s.data.unsafe_buffer_pointer() for s in arena.array.addressable_shards]


def test_steps_read_models_wherever_they_are_swapped_in():
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"random seed {seed}")
    rng = np.random.default_rng(seed)
    models = _models()
    layout = _layout(models, w_slots=1, kv_slots=2)
    assert (layout.w_region.num_slots, layout.kv_region.num_slots) == (1, 2)
    res = build_residency({n: m[1:] for n, m in models.items()}, layout)
    assert [res.is_resident(n) for n in NAMES] == [True, False, False]      # 1 weights slot: the first
    pointers = _pointers(res.arena)
    seqs = {}
    for i, n in enumerate(NAMES):
        config = models[n][0]
        seqs[n] = make_seqs(rng, N_KV, config.num_layers, config.vocab_size, G=layout.model(n).tokens_per_page)
        for s in seqs[n]:                    # disjoint pages per model
            s.page_table = s.page_table + i * PAGES_PER_DEVICE
    seen_bases, programs = {n: set() for n in NAMES}, []
    for step in range(3):
        for n in NAMES:
            config, kv, ffn = models[n]
            view = layout.model(n)
            chunks, owners = next_chunks(seqs[n], N_KV, max_chunk=5)
            inputs, logit_rows = build_disagg_inputs(chunks, layout=view, num_layers=config.num_layers,
                                                     num_microbatches=2, min_tokens=16, min_seqs=4)
            bases = res.acquire(n)
            try:
                out, logits = disagg_step(res.arena.take(), inputs, layout=view.program, config=config,
                                          num_microbatches=2, offsets=view.offsets(bases))
                res.arena.put(out)
            finally:
                res.release(n)
            seen_bases[n].add(tuple(bases.tolist()))
            err = check_and_advance(logits, owners, logit_rows, rng, config, kv, ffn)
            assert err < 1e-5, f"{n} step {step} at bases {bases}: relative error {err}"
        programs.append(disagg_step._cache_size())
    # the models really moved: some model ran from two different attention slots
    assert any(len({b[0] for b in s}) > 1 for s in seen_bases.values()), seen_bases
    assert programs[0] == programs[-1], programs           # one program per model shape, whatever its slot
    stats = res.stats()
    assert stats["w"].swaps_in == 3 * 3 - 1 and stats["w"].swaps_out == 3 * 3 - 1
    assert stats["kv"].swaps_in > 0 and stats["kv"].bytes_swapped_in > 0 and stats["w"].swap_in_seconds > 0
    assert _pointers(res.arena) == pointers                 # written in place: never a new arena buffer


def test_dense_layers_swap_in_with_their_model():
    """Two models with a dense FFN layer (different weights, one shape) share one weights slot:
    each step swaps the other in (its dense shards with its experts) and gives the dense forward."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"random seed {seed}")
    rng = np.random.default_rng(seed)
    models = {"a": model("qwen2_moe_dense", 7), "b": model("qwen2_moe_dense", 8)}
    layout = _layout(models, w_slots=1, kv_slots=1)
    region = layout.w_region
    for n in models:                      # the dense shards sit in the swapped region
        dense = [s for s in layout.model(n).w_slots if s.name.startswith("dense/")]
        assert len(dense) == 2 and all(region.start <= s.offset and s.offset + s.size <= region.offset(0)
                                       + region.slot_elems for s in dense)
    res = build_residency({n: m[1:] for n, m in models.items()}, layout)
    seqs = {}
    for i, n in enumerate(models):
        config = models[n][0]
        seqs[n] = make_seqs(rng, N_KV, config.num_layers, config.vocab_size, G=layout.model(n).tokens_per_page,
                            max_seqs=2)
        for s in seqs[n]:
            s.page_table = s.page_table + i * PAGES_PER_DEVICE
    for step in range(2):
        for n in models:
            config, kv, ffn = models[n]
            chunks, owners = next_chunks(seqs[n], N_KV, max_chunk=5)
            inputs, logit_rows = build_disagg_inputs(chunks, layout=layout.model(n), num_layers=config.num_layers,
                                                     num_microbatches=2, min_tokens=16, min_seqs=4)
            bases = res.acquire(n)
            try:
                out, logits = disagg_step(res.arena.take(), inputs, layout=layout.model(n).program, config=config,
                                          num_microbatches=2, offsets=layout.model(n).offsets(bases))
                res.arena.put(out)
            finally:
                res.release(n)
            err = check_and_advance(logits, owners, logit_rows, rng, config, kv, ffn)
            assert err < 1e-5, f"{n} step {step}: relative error {err}"
    assert res.stats()["w"].swaps_in == 2 * 2 - 1


def test_in_use_model_is_never_evicted_and_taken_arena_defers_writes():
    models = _models()
    layout = _layout(models, w_slots=1, kv_slots=1)
    res = build_residency({n: m[1:] for n, m in models.items()}, layout, use_pinned_host=False)   # numpy copies
    assert not res.pools["w"].pinned
    a, b = NAMES[0], NAMES[1]
    res.acquire(a)
    assert not res.prefetch(b)                              # the only slot is in use
    with pytest.raises(WeightsPoolBusyError, match="in use"):
        res.acquire(b)
    assert res.is_resident(a) and not res.is_resident(b)
    res.release(a)
    array = res.arena.take()                                # a step holds the arena (another thread)
    assert res.prefetch(b)                                  # transfers start, the writes wait
    assert res.is_resident(b) and not res.is_resident(a)
    res.arena.put(array)
    bases = res.acquire(b)                                  # applies them before handing out b
    res.release(b)
    rows = np.asarray(res.arena.array)
    for role, first in (("kv", 0), ("w", N_KV)):
        region = layout.region(role)
        payloads = region_payloads(*models[b][1:], layout.model(b), role)
        start = region.offset(0) + int(bases[0 if role == "kv" else 1]) * 128
        for i, p in enumerate(payloads):
            np.testing.assert_array_equal(rows[first + i, start:start + p.size], p.reshape(-1))


def test_budget_below_the_largest_model_is_refused():
    models = _models()
    configs = {n: m[0] for n, m in models.items()}
    need = N_W * _slot_elems(models, "w") * 4
    with pytest.raises(ValueError, match=f"weights_pool_bytes={need - 1} is smaller than the largest model's "
                                         "FFN shards over the weight devices: model 'qwen3_moe' needs"):
        make_multi_layout(configs, n_kv=N_KV, n_w=N_W, pages_per_device=8, page_elems=PAGE_ELEMS,
                          weights_pool_bytes=need - 1)
    with pytest.raises(ValueError, match="attention_pool_bytes=0 is smaller than the largest model's attention"):
        make_multi_layout(configs, n_kv=N_KV, n_w=N_W, pages_per_device=8, page_elems=PAGE_ELEMS,
                          attention_pool_bytes=0)
    big = make_multi_layout(configs, n_kv=N_KV, n_w=N_W, pages_per_device=8, page_elems=PAGE_ELEMS,
                            weights_pool_bytes=100 * need)
    assert big.w_region.num_slots == len(NAMES)             # never more slots than models


def test_spare_rows_become_pages_on_every_device():
    """One weight device holding both models' experts (its content the deepest): the KV rows'
    memory beyond their attention region is pages, and so is the weight row's beyond its
    experts when the row is longer; the kernel's page limit caps every device."""
    models = _models()
    configs = {n: m[0] for n, m in models.items()}
    kw = dict(n_kv=2, n_w=1, page_elems=PAGE_ELEMS, attention_pool_bytes=2 * 2 * _slot_elems(models, "kv") * 4)
    tight = make_multi_layout(configs, pages_per_device=2, **kw)
    assert tight.depths[2][0] > tight.depths[0][0]                 # the weight row's content is the deepest
    assert min(tight.device_pages[:2]) > 2 and tight.device_pages[2] >= 0
    longer = make_multi_layout(configs, row_elems=tight.arena_elems + 16 * PAGE_ELEMS, **kw)
    assert [p - q for p, q in zip(longer.device_pages, tight.device_pages)] == [8, 8, 8]
    for multi in (tight, longer):
        for d in range(3):
            room0 = multi.half_elems - multi.depths[d][0]
            room1 = multi.arena_elems - multi.half_elems - multi.depths[d][1]
            assert 0 <= multi.unused_elems(d) <= abs(room0 - room1) + 2 * PAGE_ELEMS
    capped = make_multi_layout(configs, row_elems=tight.arena_elems + 16 * PAGE_ELEMS, max_pages_per_device=5, **kw)
    assert capped.device_pages == (5, 5, min(5, longer.device_pages[2]))
    with pytest.raises(ValueError, match="too short"):
        make_multi_layout(configs, row_elems=tight.arena_elems // 4, **kw)


def test_step_with_offsets_updates_the_arena_in_place():
    """Reading the model through traced offsets adds no copy of the row: the step's scratch
    memory does not grow with the KV pool."""
    models = _models()
    config = models["qwen3_moe"][0]
    seqs = make_seqs(np.random.default_rng(0), N_KV, config.num_layers, config.vocab_size)
    chunks, _ = next_chunks(seqs, N_KV, max_chunk=5)
    temp = {}
    for pages in (PAGES_PER_DEVICE, 64 * PAGES_PER_DEVICE):
        layout = make_multi_layout({n: m[0] for n, m in models.items()}, n_kv=N_KV, n_w=N_W,
                                   pages_per_device=pages, page_elems=PAGE_ELEMS,
                                   weights_pool_bytes=N_W * _slot_elems(models, "w") * 4)
        view = layout.model("qwen3_moe")
        inputs, _ = build_disagg_inputs(chunks, layout=view, num_layers=config.num_layers,
                                        num_microbatches=2, min_tokens=16, min_seqs=4)
        arena = jax.ShapeDtypeStruct((N_KV + N_W, layout.arena_elems), jnp.float32, sharding=view.sharding())
        compiled = disagg_step.lower(arena, inputs, layout=view.program, config=config, num_microbatches=2,
                                     offsets=view.offsets()).compile()
        temp[pages] = compiled.memory_analysis().temp_size_in_bytes
        row_bytes = layout.arena_elems * 4
    assert temp[64 * PAGES_PER_DEVICE] - temp[PAGES_PER_DEVICE] < row_bytes // 4, (temp, row_bytes)
