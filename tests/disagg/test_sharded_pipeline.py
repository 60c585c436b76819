"""The sequence-sharded step (pages of a sequence on several devices) against the dense forward.

Sequences whose blocks alternate between KV devices (holes on each; home = the device of the
first block), mixed with sequences on one device, go through three ragged steps (chunked
prefill, prefill chunks with decodes, decodes): every step's last-token logits equal
`models.dense_logits` on the full sequences, and only the pages of the devices holding
blocks change. With `spill`, some blocks sit on the weight devices' pages (their rows'
memory beyond the experts): those rows' pages are written, their experts stay put.
"""
import os

import numpy as np
import pytest

from crosspool_jax.disagg import build_arena, build_disagg_inputs, disagg_step, make_layout, make_multi_layout
from crosspool_jax.disagg.inputs import build_sharded_pages
from crosspool_jax.disagg.pages import PageMap
from disagg_tiny import PAGE_ELEMS, PAGES_PER_DEVICE, Chunk, model, page_elems, reference_last_logits


def make_seqs(rng, pm: PageMap, num_layers: int, vocab: int, blocks: int = 5, device_pages=None, spill=False):
    """(tokens, global table [L, blocks]) per sequence: device patterns with holes and one local;
    with `spill`, later blocks on weight devices (ids n_kv...)."""
    n = pm.n_kv
    patterns = [[0, 1, 0, 1, 1], [1, 0, 0, 1, 0], [n - 1] * blocks, [0] * blocks, [1, 1, 0, 0, 1]]
    if spill:
        w0, w_last = n, pm.num_devices - 1
        patterns = [[0, w0, 1, w_last, 1], [1, 0, w0, w0, 0], [n - 1] * blocks, [0] * blocks, [1, w_last, 0, 0, w0]]
    device_pages = device_pages or (pm.pages_per_device,) * pm.num_devices
    free = [list(rng.permutation(device_pages[d])) for d in range(pm.num_devices)]
    seqs = []
    for i, pattern in enumerate(patterns):
        table = np.array([[pm.global_of(d, free[d].pop()) for d in pattern] for _ in range(num_layers)], np.int32)
        length = int(rng.integers(9, 15)) if i < 2 else int(rng.integers(2, 10))
        seqs.append({"tokens": [int(t) for t in rng.integers(0, vocab, length)], "table": table, "computed": 0})
    return seqs


@pytest.mark.parametrize("name,n_kv,n_w,M,spill", [("qwen3_moe", 2, 2, 1, False), ("qwen3_moe", 2, 2, 2, False),
                                                    ("mixtral", 3, 1, 2, False), ("qwen3_moe", 2, 2, 2, True),
                                                    ("mixtral", 3, 1, 1, True),
                                                    # MLA's latent rows; GPT-OSS's sinks (joined after the merge)
                                                    # and per-layer windows, blocks spilled onto weight rows
                                                    ("deepseek_v2", 2, 2, 2, True), ("gpt_oss", 2, 2, 1, True)])
def test_sharded_steps_match_dense_forward(name, n_kv, n_w, M, spill):
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"random seed {seed}")
    rng = np.random.default_rng(seed)
    config, kv, ffn = model(name, 0)
    X = page_elems(config)
    short = make_layout(config, n_kv=n_kv, n_w=n_w, pages_per_device=PAGES_PER_DEVICE, page_elems=X)
    # rows 2 * PAGES_PER_DEVICE pages longer than the KV devices need: the weight rows hold pages
    layout = make_multi_layout({"": config}, n_kv=n_kv, n_w=n_w, page_elems=X,
                               row_elems=short.arena_elems + 2 * PAGES_PER_DEVICE * X,
                               attention_replicas=n_kv).model("")
    assert min(layout.device_pages) >= PAGES_PER_DEVICE
    pm, G = PageMap(layout.pages_per_device, n_kv, n_w), layout.tokens_per_page
    arena = build_arena(kv, ffn, layout)
    before = np.asarray(arena)
    seqs = make_seqs(rng, pm, config.num_layers, config.vocab_size, device_pages=layout.device_pages, spill=spill)
    assert {pm.home(s["table"]) for s in seqs} == {0, 1, n_kv - 1}
    for step in range(3):
        local, glob, owners = [[] for _ in range(n_kv)], [[] for _ in range(n_kv)], [[] for _ in range(n_kv)]
        for s in seqs:
            end = min(len(s["tokens"]), s["computed"] + 5)
            ids = np.array(s["tokens"][s["computed"]:end], np.int32)
            h = pm.home(s["table"])
            local[h].append(Chunk(ids, s["computed"], pm.local_of(s["table"])))
            glob[h].append(Chunk(ids, s["computed"], s["table"]))
            owners[h].append((s, end))
        inputs, logit_rows = build_disagg_inputs(local, layout=layout, num_layers=config.num_layers,
                                                 num_microbatches=M, min_tokens=16, min_seqs=4)
        sharded = build_sharded_pages(glob, inputs, page_map=pm, tokens_per_page=G, num_microbatches=M)
        assert sharded.slots_LT.shape == (n_kv + n_w, M, config.num_layers, n_kv * 16)
        arena, logits = disagg_step(arena, inputs, sharded, layout=layout, config=config, num_microbatches=M)
        logits = np.asarray(logits)
        got, prefixes = [], []
        for d in range(n_kv):
            for (s, end), row in zip(owners[d], logit_rows[d]):
                got.append(logits[d, row])
                prefixes.append(s["tokens"][:end])
                s["computed"] = end
                if end == len(s["tokens"]):
                    s["tokens"].append(int(rng.integers(0, config.vocab_size)))
        want = reference_last_logits(config, kv, ffn, prefixes)
        err = float(np.abs(np.stack(got) - want).max() / np.abs(want).max())
        assert err < 1e-5, f"step {step}: relative error {err}"
    after = np.asarray(arena)
    # the devices of the blocks a sequence wrote (its table may reach past its tokens)
    holders = {int(d) for s in seqs for d in pm.device_of(s["table"][:, :-(-s["computed"] // G)]).reshape(-1)}
    assert (max(holders) >= n_kv) == spill
    for d in range(n_kv + n_w):
        pages = np.zeros(layout.arena_elems, bool)
        for lo, hi in layout.page_spans(d):
            pages[lo:hi] = True
        np.testing.assert_array_equal(after[d, ~pages], before[d, ~pages])    # attention sides, experts
        assert after[d, pages].any() == (d in holders)


def test_build_sharded_pages_places_each_token_and_block_on_its_device():
    config, _, _ = model("qwen3_moe", 0)
    layout = make_layout(config, n_kv=2, n_w=2, pages_per_device=PAGES_PER_DEVICE, page_elems=PAGE_ELEMS)
    pm, G, P = PageMap(PAGES_PER_DEVICE, 2), layout.tokens_per_page, PAGES_PER_DEVICE
    table = np.array([[3, P + 5, 7], [4, P + 6, 8]], np.int32)       # blocks on devices 0, 1, 0
    chunk = Chunk(np.arange(6, dtype=np.int32), 2, table)            # positions 2..7: blocks 0 and 1
    inputs, _ = build_disagg_inputs([[Chunk(chunk.token_ids, 2, pm.local_of(table))], []], layout=layout,
                                    num_layers=2, num_microbatches=1, min_tokens=8, min_seqs=2)
    sp = build_sharded_pages([[chunk], []], inputs, page_map=pm, tokens_per_page=G, num_microbatches=1)
    T = inputs.token_ids_T.shape[2]
    assert sp.seq_T[0, :6].tolist() == [0] * 6 and (sp.seq_T[0, 6:] == -1).all()
    drop = P * G
    assert sp.slots_LT[0, 0, 0, :6].tolist() == [3 * G + 2, 3 * G + 3] + [drop] * 4
    assert sp.slots_LT[1, 0, 1, :6].tolist() == [drop] * 2 + [6 * G + i for i in range(4)]
    assert (sp.slots_LT[:, :, :, 6:] == drop).all() and sp.slots_LT.shape[-1] == 2 * T
    assert sp.blocks_SB[0, 0, 0].tolist()[:2] == [0, 2] and sp.pages_LSB[0, 0, :, 0, :2].tolist() == [[3, 7], [4, 8]]
    assert sp.blocks_SB[1, 0, 0].tolist()[:2] == [1, -1] and sp.pages_LSB[1, 0, :, 0, 0].tolist() == [5, 6]
    assert (sp.blocks_SB[:, :, 1:] == -1).all()
    with pytest.raises(ValueError, match="outside the pool"):
        build_sharded_pages([[Chunk(chunk.token_ids, 2, table + 2 * P)], []], inputs, page_map=pm,
                            tokens_per_page=G, num_microbatches=1)
