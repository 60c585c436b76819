"""The arena layout and builder: what each role's rows hold, the expert split rule, bad splits."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crosspool_jax.disagg import build_arena, expert_shard, expert_split, host_rows, make_layout
from crosspool_jax.models import ModelConfig
from disagg_tiny import PAGE_ELEMS, PAGES_PER_DEVICE, QWEN3_MOE, model, page_elems


@pytest.mark.parametrize("n_kv,n_w", [(1, 1), (2, 2), (4, 4), (6, 2)])
def test_roles_hold_only_their_tensors(n_kv, n_w):
    config, kv, ffn = model("qwen3_moe", 1)
    layout = make_layout(config, n_kv=n_kv, n_w=n_w, pages_per_device=PAGES_PER_DEVICE, page_elems=PAGE_ELEMS)
    kv_names = [s.name for s in layout.kv_slots]
    w_names = [s.name for s in layout.w_slots]
    # the FFN's input norm and router sit with the attention side (the KV device sends x and
    # the router logits), the experts on the weight devices
    assert [n for n in kv_names if n.startswith("moe/")] == ["moe/norm_LD", "moe/router_LDE"]
    assert not [n for n in w_names if n.startswith(("pages/", "attn/", "embed/", "final/"))]
    assert not {"moe/norm_LD", "moe/router_LDE"} & set(w_names)
    assert {"pages/k_PX", "pages/v_PX", "embed/embedding_VD", "attn/wq_LDQ"} <= set(kv_names)
    assert [layout.role_of(d) for d in range(n_kv + n_w)] == ["kv"] * n_kv + ["w"] * n_w
    # experts split: each weight device holds E / n_w of them (8 experts: expert-parallel)
    E = config.num_experts
    assert layout.slot("w", "moe/w1_LEDF2").shape[1] == E // n_w
    # every KV device holds at least the pages asked for, the weight devices what their rows
    # have beyond the experts; no tensor overlaps another or a usable page
    assert min(layout.device_pages[:n_kv]) >= PAGES_PER_DEVICE
    for d in range(n_kv + n_w):
        own = [s for s in layout.slots(layout.role_of(d)) if not s.name.startswith("pages/")]
        spans = sorted([(s.offset, s.offset + s.size) for s in own] + layout.page_spans(d))
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])) and spans[-1][1] <= layout.arena_elems


def test_rows_hold_the_right_values_and_shards_reassemble():
    config, kv, ffn = model("qwen2_moe", 2)           # 6 experts on 4 weight devices: ep=2, tp=2
    layout = make_layout(config, n_kv=2, n_w=4, pages_per_device=8, page_elems=PAGE_ELEMS)
    assert (layout.ep, layout.tp) == (2, 2)
    arena = build_arena(kv, ffn, layout)
    assert arena.shape == (6, layout.arena_elems)
    assert [s.device.id for s in sorted(arena.addressable_shards, key=lambda s: s.index[0].start)] == \
        list(layout.device_ids)
    rows = np.asarray(arena)
    for d in range(2):               # KV rows: attention side with the FFN norms and routers, zero pages
        np.testing.assert_array_equal(layout.view(rows[d], "kv", "attn/wq_LDQ"), kv["attn"]["wq_LDQ"])
        np.testing.assert_array_equal(layout.view(rows[d], "kv", "moe/router_LDE"), ffn["moe"]["router_LDE"])
        assert not any(rows[d, lo:hi].any() for lo, hi in layout.page_spans(d))
    E, F = config.num_experts, config.moe_intermediate_size
    w1 = np.zeros((config.num_layers, E, config.hidden_size, 2 * F), np.float32)
    w2 = np.zeros((config.num_layers, E, F, config.hidden_size), np.float32)
    sw2 = []
    for j in range(4):
        row = rows[2 + j]
        experts, cols = expert_shard(layout, j, E, F)
        local_w1 = layout.view(row, "w", "moe/w1_LEDF2")
        w1[:, experts, :, cols] = local_w1[..., :F // 2]
        w1[:, experts, :, F + cols.start:F + cols.stop] = local_w1[..., F // 2:]
        w2[:, experts, cols] = layout.view(row, "w", "moe/w2_LEFD")
        sw2.append(layout.view(row, "w", "moe/shared_w2_LFD"))
    np.testing.assert_array_equal(w1, ffn["moe"]["w1_LEDF2"])
    np.testing.assert_array_equal(w2, ffn["moe"]["w2_LEFD"])
    np.testing.assert_array_equal(np.concatenate(sw2, axis=1), ffn["moe"]["shared_w2_LFD"])
    # shifted params make the roles' values disjoint: no expert value in a KV row (but the
    # FFN norms and routers), no attention/embedding value in a weight row
    shifted = build_arena(jax.tree_util.tree_map(lambda a: a - 100.0, kv),
                          jax.tree_util.tree_map(lambda a: a + 100.0, ffn), layout)
    rows = np.asarray(shifted)
    routing = np.zeros(layout.arena_elems, bool)
    for s in layout.kv_slots:
        if s.name.startswith("moe/"):
            routing[s.offset:s.offset + s.size] = True
    assert rows[:2, ~routing].max() < 50 and (rows[:2] < -50).any() and rows[:2, routing].min() > 50
    assert rows[2:].min() > -50 and (rows[2:] > 50).any()


def test_dense_layers_are_split_over_f_and_reassemble():
    """A model with dense and MoE layers: each weight row holds its contiguous block of the dense
    F ([gate | up] aligned, down rows), the FFN norms and routers on the KV rows; the blocks give back the stack."""
    config, kv, ffn = model("qwen2_moe_dense", 2)      # layers moe, dense, moe; dense F = 32
    n_w, F, D = 4, config.intermediate_size, config.hidden_size
    layout = make_layout(config, n_kv=2, n_w=n_w, pages_per_device=8, page_elems=PAGE_ELEMS)
    assert layout.slot("w", "dense/w1_LDF2").shape == (1, D, 2 * F // n_w)
    assert layout.slot("w", "dense/w2_LFD").shape == (1, F // n_w, D)
    assert layout.slot("w", "moe/w1_LEDF2").shape[0] == 2              # the MoE stack: 2 layers
    assert [s.name for s in layout.kv_slots if s.name.startswith(("moe/", "dense/"))] == [
        "moe/norm_LD", "moe/router_LDE", "dense/norm_LD"]          # the FFN inputs: on the KV side
    spans = sorted((s.offset, s.offset + s.size) for s in layout.w_slots)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    rows = np.asarray(build_arena(kv, ffn, layout))
    gate, up, w2 = [], [], []
    for j in range(n_w):
        row = rows[2 + j]
        w1_j = layout.view(row, "w", "dense/w1_LDF2")
        gate.append(w1_j[..., :F // n_w])
        up.append(w1_j[..., F // n_w:])
        w2.append(layout.view(row, "w", "dense/w2_LFD"))
    for d in range(2):
        np.testing.assert_array_equal(layout.view(rows[d], "kv", "dense/norm_LD"), ffn["dense"]["norm_LD"])
        np.testing.assert_array_equal(layout.view(rows[d], "kv", "moe/router_LDE"), ffn["moe"]["router_LDE"])
    np.testing.assert_array_equal(np.concatenate(gate + up, axis=-1), ffn["dense"]["w1_LDF2"])
    np.testing.assert_array_equal(np.concatenate(w2, axis=1), ffn["dense"]["w2_LFD"])
    with pytest.raises(ValueError, match=r"ffn_params must hold the stacks \['dense', 'moe'\]"):
        build_arena(kv, {"moe": ffn["moe"]}, layout)


def test_gpt_oss_and_mla_leaves_have_homes_and_biases_reassemble():
    """GPT-OSS's sinks and o bias sit with the attention side, its router bias with the router
    (the KV device computes the router logits); on 4 weight devices (6 experts: ep=2, tp=2) b1
    is split with w1's [gate | up] columns and b2 sits on the first device of each expert
    group (zero on the other: the shards' sum adds it once). An MLA model's pages hold G tokens
    of its latent + rope key row (kv_cache_row per half), its projections on the KV rows."""
    config, kv, ffn = model("gpt_oss", 2)
    layout = make_layout(config, n_kv=2, n_w=4, pages_per_device=8, page_elems=page_elems(config))
    assert (layout.ep, layout.tp) == (2, 2)
    kv_names, w_names = {s.name for s in layout.kv_slots}, {s.name for s in layout.w_slots}
    assert {"attn/sinks_LN", "attn/bo_LD", "attn/bq_LQ", "moe/router_bias_LE"} <= kv_names
    assert {"moe/b1_LEF2", "moe/b2_LED"} <= w_names and not {"moe/router_bias_LE", "attn/sinks_LN"} & w_names
    rows = np.asarray(build_arena(kv, ffn, layout))
    for d in range(2):
        np.testing.assert_array_equal(layout.view(rows[d], "kv", "attn/sinks_LN"), kv["attn"]["sinks_LN"])
        np.testing.assert_array_equal(layout.view(rows[d], "kv", "moe/router_bias_LE"), ffn["moe"]["router_bias_LE"])
    E, F = config.num_experts, config.moe_intermediate_size
    b1 = np.zeros((config.num_layers, E, 2 * F), np.float32)
    b2 = np.zeros((config.num_layers, E, config.hidden_size), np.float32)
    for j in range(4):
        experts, cols = expert_shard(layout, j, E, F)
        local_b1 = layout.view(rows[2 + j], "w", "moe/b1_LEF2")
        b1[:, experts, cols] = local_b1[..., :F // 2]
        b1[:, experts, F + cols.start:F + cols.stop] = local_b1[..., F // 2:]
        local_b2 = layout.view(rows[2 + j], "w", "moe/b2_LED")
        assert local_b2.any() == (j % layout.tp == 0)
        b2[:, experts] += local_b2
    np.testing.assert_array_equal(b1, ffn["moe"]["b1_LEF2"])
    np.testing.assert_array_equal(b2, ffn["moe"]["b2_LED"])

    config = model("deepseek_v2", 2)[0]
    layout = make_layout(config, n_kv=1, n_w=1, pages_per_device=8, page_elems=page_elems(config))
    assert config.kv_cache_row == (config.kv_lora_rank + config.qk_rope_head_dim) // 2 == 10
    assert layout.tokens_per_page == 4 and layout.page_elems == 4 * config.kv_cache_row
    mla = {"attn/wq_a_LDA", "attn/wq_b_LANI", "attn/wkv_a_LDRY", "attn/wkv_b_LRNU", "attn/kv_a_norm_LR"}
    assert mla <= {s.name for s in layout.kv_slots}


def test_expert_split_rule():
    assert expert_split(8, 4) == (4, 1)      # expert-parallel
    assert expert_split(3, 4) == (1, 4)      # tensor-parallel over F
    assert expert_split(6, 4) == (2, 2)      # both
    assert expert_split(64, 6) == (2, 3)


def test_bfloat16_arena():
    config, kv, ffn = model("qwen3_moe", 1)
    layout = make_layout(config, n_kv=1, n_w=1, pages_per_device=4, page_elems=PAGE_ELEMS, dtype=jnp.bfloat16)
    rows = host_rows(kv, ffn, layout)
    assert rows[0].dtype == jnp.bfloat16 and layout.dtype == "bfloat16"
    np.testing.assert_array_equal(layout.view(rows[0], "kv", "moe/router_LDE"),
                                  np.asarray(ffn["moe"]["router_LDE"]).astype(jnp.bfloat16))


@pytest.mark.parametrize("n_kv,n_w,match", [
    (6, 4, "only 8 device"), (0, 2, "n_kv must be a positive"), (2, 0, "n_w must be a positive"),
    (-1, 2, "n_kv must be a positive")])
def test_bad_splits_raise(n_kv, n_w, match):
    config, _, _ = model("qwen3_moe", 1)
    assert len(jax.devices()) == 8
    with pytest.raises(ValueError, match=match):
        make_layout(config, n_kv=n_kv, n_w=n_w, pages_per_device=4)


def test_unsplittable_models_raise():
    bad_f = ModelConfig.from_hf_dict(dict(QWEN3_MOE, num_experts=3, moe_intermediate_size=10))
    with pytest.raises(ValueError, match="moe_intermediate_size F=10 must be divisible"):
        make_layout(bad_f, n_kv=2, n_w=4, pages_per_device=4)
    mixed = ModelConfig.from_hf_dict(dict(QWEN3_MOE, mlp_only_layers=[0], intermediate_size=30))
    make_layout(mixed, n_kv=1, n_w=2, pages_per_device=4)                     # dense F = 30 splits in 2
    with pytest.raises(ValueError, match="intermediate_size F=30 of the dense FFN layers must be divisible "
                                         "by the weight devices n_w=4"):
        make_layout(mixed, n_kv=1, n_w=4, pages_per_device=4)
    config, _, _ = model("qwen3_moe", 1)
    with pytest.raises(ValueError, match="pages_per_device"):
        make_layout(config, n_kv=1, n_w=1, pages_per_device=0)


def test_kernel_views_are_whole_rows_at_aligned_offsets():
    """The kernels get whole rows, never slices: the row divides into pages and into every
    in-place stack's [*, N] rows (expert stacks on the weight rows; projections, routers and
    dense matrices on both), V pages start on a page, each stack on a multiple of its N, and a
    budgeted region's slots are multiples of every N of its role (a shifted model stays
    aligned). The views read the same values as the plain slot views, also through a bound
    (slot-shifted) layout."""
    from crosspool_jax.disagg import make_multi_layout
    from crosspool_jax.disagg.layout import ALIGN
    from crosspool_jax.models.transformer import reads_in_place
    configs = {n: model(n, i)[0] for i, n in enumerate(("qwen3_moe", "mixtral", "qwen2_moe_dense", "deepseek_v2"))}
    for budget in (None, 1 << 30):
        multi = make_multi_layout(configs, n_kv=1, n_w=2, pages_per_device=PAGES_PER_DEVICE,
                                  page_elems=math.lcm(*(page_elems(c) for c in configs.values())),
                                  weights_pool_bytes=budget, attention_pool_bytes=budget)
        for name in multi.names:
            lay, c = multi.model(name), configs[name]
            assert lay.arena_elems % lay.page_elems == 0
            assert lay.slot("kv", "pages/v_PX").offset % lay.page_elems == 0
            row = jnp.asarray(np.random.default_rng(0).standard_normal(lay.arena_elems), jnp.float32)
            pages, k0, v0 = lay.kernel_pages(row, c.kv_cache_heads, c.kv_cache_head_dim)
            for off, slot in ((k0, "pages/k_PX"), (v0, "pages/v_PX")):
                want = lay.view(row, "kv", slot).reshape(-1, *pages.shape[1:])
                np.testing.assert_array_equal(pages[off:off + lay.pages_per_device], want)
            stacks = [(role, s) for role, s in lay.own_slots if reads_in_place(s.name, s.shape)]
            assert {"kv", "w"} == {role for role, _ in stacks}, name
            for role, s in stacks:
                region, N = multi.region(role), s.shape[-1]
                assert (region is None) == (budget is None)
                assert lay.arena_elems % N == 0 and s.offset % N == 0, (name, s.name)
                if region is not None:
                    assert region.slot_elems % N == 0
                last = s.shape[0] - 1                  # the stack's last layer (some stacks have one)
                want = lay.view(row, role, s.name)[last]
                np.testing.assert_array_equal(lay.layer_rows(row, role, s.name, last).materialize().reshape(want.shape),
                                              want)
                if region is not None and region.num_slots > 1:
                    shift = region.shift_units(1)
                    bound = lay.bind(jnp.asarray(lay.offsets([shift, 0] if role == "kv" else [0, shift])))
                    want = bound.view(row, role, s.name)[last]
                    np.testing.assert_array_equal(
                        bound.layer_rows(row, role, s.name, last).materialize().reshape(want.shape), want)
                    assert shift * ALIGN % N == 0
