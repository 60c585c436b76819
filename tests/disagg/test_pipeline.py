"""The one-program disaggregated step against the dense whole-sequence forward.

For each split and micro-batch count: three ragged steps (chunked prefill, then prefill
chunks mixed with decodes, then decodes) through the arena give the logits of
`models.dense_logits` on the full sequences, only KV rows' pages change, and weight rows
stay bit-identical. Every family: per-head K/V, MLA (the pages hold latent + rope key rows;
with and without the query LoRA) and GPT-OSS (sinks, sliding / full layers, biases, the
clamped SwiGLU).
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crosspool_jax.disagg import build_arena, build_disagg_inputs, disagg_step, make_layout, schedule
from crosspool_jax.disagg.pipeline import p2p_rounds
from crosspool_jax.disagg.report import no_exchange
from disagg_tiny import (PAGE_ELEMS, PAGES_PER_DEVICE, check_and_advance, make_seqs, model, next_chunks,
                         page_elems, reference_last_logits)

# Each case compiles its own step program, so each runs once: every split (1+1, 2+2, 4+4, 6+2,
# 2+4), one and two micro-batches on single- and multi-device splits, both exchanges on an even
# and an uneven split, every FFN sharding (expert-parallel, expert groups x ways over F,
# tensor-parallel over F, a dense layer). 1+1 with M=1 is the dense-layer model's case, M=1 on
# several devices 4+4's, 2+4's and 6+2's, 4+4 with M=2 Mixtral's.
@pytest.mark.parametrize("name,n_kv,n_w,M,exchange", [
    ("qwen3_moe", 1, 1, 2, "p2p"), ("qwen3_moe", 2, 2, 2, "p2p"), ("qwen3_moe", 4, 4, 1, "p2p"),
    ("qwen3_moe", 6, 2, 1, "p2p"), ("qwen3_moe", 6, 2, 2, "p2p"),
    ("qwen3_moe", 6, 2, 2, "collective"), ("qwen3_moe", 4, 4, 1, "collective"),
    ("qwen2_moe", 2, 4, 2, "p2p"),   # 6 experts on 4 devices: 2 expert groups x 2 ways over F; shared expert
    ("mixtral", 4, 4, 2, "p2p"),     # 3 experts on 4 devices: tensor-parallel over F; sliding window
    # layers moe, dense, moe: the dense layer's F split over the weight devices, MoE stack index != layer
    ("qwen2_moe_dense", 1, 1, 1, "p2p"), ("qwen2_moe_dense", 2, 2, 2, "p2p"),
    ("qwen2_moe_dense", 2, 4, 1, "p2p"),
    ("qwen3_moe", 2, 2, 3, "p2p"),   # three micro-batches, as lanes: the program and each one's offsets
    # MLA: the pages hold the latent + rope key row (K = 1); with the query LoRA and a dense
    # layer 0, and without it (attention biases, sigmoid routing with a choice bias)
    ("deepseek_v2", 1, 1, 2, "p2p"), ("glm4_moe_lite", 2, 2, 1, "p2p"),
    # GPT-OSS: sinks, sliding / full layers, biases, clamped SwiGLU; 4 weight devices: 2 expert
    # groups x 2 ways over F (b1 split with w1's columns, b2 on one device of each pair)
    ("gpt_oss", 2, 4, 2, "p2p"),
])
def test_steps_match_dense_forward(name, n_kv, n_w, M, exchange):
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"random seed {seed}")
    rng = np.random.default_rng(seed)
    config, kv, ffn = model(name, 0)
    layout = make_layout(config, n_kv=n_kv, n_w=n_w, pages_per_device=PAGES_PER_DEVICE, page_elems=page_elems(config))
    arena = build_arena(kv, ffn, layout)
    before = np.asarray(arena)
    seqs = make_seqs(rng, n_kv, config.num_layers, config.vocab_size, G=layout.tokens_per_page,
                     empty_device=(n_kv == 6), max_seqs=min(3, PAGES_PER_DEVICE // (4 * config.num_layers)))
    for step in range(3):
        chunks, owners = next_chunks(seqs, n_kv, max_chunk=5)
        if step == 1:                  # prefill chunks and decodes in one batch
            sizes = {c.num_tokens for per_dev in chunks for c in per_dev}
            assert 1 in sizes or len(sizes) > 1
        inputs, logit_rows = build_disagg_inputs(chunks, layout=layout, num_layers=config.num_layers,
                                                 num_microbatches=M, min_tokens=16, min_seqs=4)
        assert inputs.token_ids_T.shape == (n_kv, M, 16)
        lanes = dict(layout=layout.program, offsets=np.stack([layout.offsets()] * M)) if M > 2 else dict(layout=layout)
        arena, logits = disagg_step(arena, inputs, config=config, num_microbatches=M, exchange=exchange, **lanes)
        logits = np.asarray(logits)
        assert logits.shape == (n_kv, M * 4, config.vocab_size)
        err = check_and_advance(logits, owners, logit_rows, rng, config, kv, ffn)
        assert err < 1e-5, f"step {step}: relative error {err}"
    after = np.asarray(arena)
    np.testing.assert_array_equal(after[n_kv:], before[n_kv:])        # weight rows untouched
    for d in range(n_kv):
        pages = np.zeros(layout.arena_elems, bool)
        for lo, hi in layout.page_spans(d):
            pages[lo:hi] = True
        np.testing.assert_array_equal(after[d, ~pages], before[d, ~pages])     # only pages are written
        assert after[d, pages].any() == any(s.device == d for s in seqs)


def test_schedule_table():
    assert schedule(2, 2) == [(0, (0, 0), None), (1, (0, 1), (0, 0)), (2, (1, 0), (0, 1)),
                              (3, (1, 1), (1, 0)), (4, None, (1, 1))]
    assert schedule(2, 1) == [(0, (0, 0), (0, 0)), (1, (1, 0), (1, 0))]
    assert p2p_rounds(1, 1) == [[(0, 0)]]
    for n_kv, n_w in ((2, 2), (4, 4), (6, 2), (2, 6), (3, 5)):
        rounds = p2p_rounds(n_kv, n_w)
        assert len(rounds) == max(n_kv, n_w)
        assert sorted(p for r in rounds for p in r) == [(k, w) for k in range(n_kv) for w in range(n_w)]
        for r in rounds:                          # a device sends and receives at most once per round
            assert len({k for k, _ in r}) == len(r) == len({w for _, w in r})


def test_bad_inputs_raise():
    config, kv, ffn = model("qwen3_moe", 0)
    layout = make_layout(config, n_kv=2, n_w=2, pages_per_device=PAGES_PER_DEVICE, page_elems=PAGE_ELEMS)
    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    seqs = make_seqs(rng, 2, config.num_layers, config.vocab_size)
    chunks, _ = next_chunks(seqs, 2, max_chunk=5)
    with pytest.raises(ValueError, match="KV devices"):
        build_disagg_inputs(chunks[:1], layout=layout, num_layers=config.num_layers, num_microbatches=2)
    with pytest.raises(ValueError, match="num_microbatches"):
        build_disagg_inputs(chunks, layout=layout, num_layers=config.num_layers, num_microbatches=0)
    with pytest.raises(ValueError, match="microbatches of KV device 0"):
        build_disagg_inputs(chunks, layout=layout, num_layers=config.num_layers, num_microbatches=2,
                            microbatches=[[[0], []], [[], []]])          # device 0's chunks not all placed
    inputs, _ = build_disagg_inputs(chunks, layout=layout, num_layers=config.num_layers, num_microbatches=1)
    arena = build_arena(kv, ffn, layout)
    with pytest.raises(ValueError, match="expected \\(n_kv, num_microbatches\\)"):
        disagg_step(arena, inputs, layout=layout, config=config, num_microbatches=2)
    with pytest.raises(ValueError, match="offsets have shape"):
        disagg_step(arena, inputs, layout=layout.program, config=config, num_microbatches=1,
                    offsets=np.stack([layout.offsets()] * 2))                # 2 lanes' offsets, 1 micro-batch


def test_bfloat16_arena_step_close_to_float32():
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"random seed {seed}")
    rng = np.random.default_rng(seed)
    config, kv, ffn = model("qwen3_moe", 0)
    layout = make_layout(config, n_kv=2, n_w=2, pages_per_device=PAGES_PER_DEVICE, page_elems=PAGE_ELEMS,
                         dtype=jnp.bfloat16)
    arena = build_arena(kv, ffn, layout)
    assert arena.dtype == jnp.bfloat16
    seqs = make_seqs(rng, 2, config.num_layers, config.vocab_size)
    chunks, owners = next_chunks(seqs, 2, max_chunk=5)
    inputs, logit_rows = build_disagg_inputs(chunks, layout=layout, num_layers=config.num_layers,
                                             num_microbatches=2, min_tokens=16, min_seqs=4)
    arena, logits = disagg_step(arena, inputs, layout=layout, config=config, num_microbatches=2)
    assert arena.dtype == jnp.bfloat16 and logits.dtype == jnp.float32
    got = np.stack([np.asarray(logits)[d, r] for d in range(2) for r in logit_rows[d]])
    want = reference_last_logits(config, kv, ffn, [s.tokens[:end] for d in range(2) for s, end in owners[d]])
    assert np.abs(got - want).max() / np.abs(want).max() < 5e-2


def test_arena_is_updated_in_place():
    """The step's scratch memory does not grow with the KV pool: no copy of the arena row."""
    config, kv, ffn = model("qwen3_moe", 0)
    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    seqs = make_seqs(rng, 2, config.num_layers, config.vocab_size)
    chunks, _ = next_chunks(seqs, 2, max_chunk=5)
    temp = {}
    for pages in (PAGES_PER_DEVICE, 64 * PAGES_PER_DEVICE):
        layout = make_layout(config, n_kv=2, n_w=2, pages_per_device=pages, page_elems=PAGE_ELEMS)
        inputs, _ = build_disagg_inputs(chunks, layout=layout, num_layers=config.num_layers,
                                        num_microbatches=2, min_tokens=16, min_seqs=4)
        arena = jax.ShapeDtypeStruct((4, layout.arena_elems), jnp.float32, sharding=layout.sharding())
        compiled = disagg_step.lower(arena, inputs, layout=layout, config=config, num_microbatches=2).compile()
        temp[pages] = compiled.memory_analysis().temp_size_in_bytes
        row_bytes = layout.arena_elems * 4
    assert temp[64 * PAGES_PER_DEVICE] - temp[PAGES_PER_DEVICE] < row_bytes // 4, (temp, row_bytes)


def test_no_exchange_moves_nothing_and_is_for_timing_only():
    """The benchmarks' `report.no_exchange` compiles the same step without a single transfer (no
    collective in the program): the FFN outputs never reach the KV devices, so its logits are
    wrong by design."""
    config, kv, ffn = model("qwen3_moe", 0)
    layout = make_layout(config, n_kv=2, n_w=2, pages_per_device=PAGES_PER_DEVICE, page_elems=PAGE_ELEMS)
    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    seqs = make_seqs(rng, 2, config.num_layers, config.vocab_size)
    chunks, _ = next_chunks(seqs, 2, max_chunk=5)
    inputs, _ = build_disagg_inputs(chunks, layout=layout, num_layers=config.num_layers, num_microbatches=2,
                                    min_tokens=16, min_seqs=4)
    with pytest.raises(ValueError, match="exchange must be one of"):
        disagg_step(build_arena(kv, ffn, layout), inputs, layout=layout, config=config, num_microbatches=2,
                    exchange="nothing")
    logits, texts = {}, {}
    for exchange in ("p2p", "none"):
        factory = no_exchange if exchange == "none" else exchange
        arena = build_arena(kv, ffn, layout)
        texts[exchange] = disagg_step.lower(arena, inputs, layout=layout, config=config, num_microbatches=2,
                                            exchange=factory).as_text()
        _, out = disagg_step(arena, inputs, layout=layout, config=config, num_microbatches=2, exchange=factory)
        logits[exchange] = np.asarray(out)
    assert "collective_permute" in texts["p2p"]
    assert not any(op in texts["none"] for op in ("collective_permute", "all_gather", "all_reduce", "reduce_scatter"))
    assert logits["none"].shape == logits["p2p"].shape and np.isfinite(logits["none"]).all()
    assert not np.allclose(logits["none"], logits["p2p"], atol=1e-3)
