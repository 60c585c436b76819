"""ModelConfig parsing and layer plan, param layout, the packed-batch seam, the block split."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crosspool_jax.models import (SUPPORTED_ARCHITECTURES, ModelConfig, attention_block, compute_logits,
                                  dense_causal_attention, dense_logits, ffn_block, forward,
                                  init_random_params, param_bytes, param_shapes, rms_norm)

QWEN3_MOE = {
    "architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 96, "hidden_size": 32,
    "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "num_experts": 8, "num_experts_per_tok": 2,
    "moe_intermediate_size": 16, "intermediate_size": 40, "mlp_only_layers": [2],
    "decoder_sparse_step": 1, "norm_topk_prob": True, "eos_token_id": [5, 6], "bos_token_id": 1,
    "tie_word_embeddings": False,
}


def test_from_hf_dict_reads_fields_and_layer_plan():
    c = ModelConfig.from_hf_dict(QWEN3_MOE)
    assert (c.family, c.head_dim, c.qk_norm, c.top_k, c.num_experts) == ("qwen3_moe", 16, "per_head", 2, 8)
    assert c.eos_token_ids == (5, 6) and c.bos_token_id == 1 and c.sliding_window is None
    assert [c.ffn_kind(l) for l in range(4)] == ["moe", "moe", "dense", "moe"]
    assert [c.ffn_index(l) for l in range(4)] == [0, 1, 0, 2]
    assert c.is_moe and c.ffn_kinds == ("moe", "dense")
    assert c.kv_bytes_per_token_per_layer(jnp.bfloat16) == 2 * 16 * 2
    assert c.kv_bytes_per_token_per_layer("float32") == 2 * 16 * 4
    assert hash(c) == hash(ModelConfig.from_hf_dict(dict(QWEN3_MOE)))


def test_decoder_sparse_step_and_new_style_rope_parameters():
    d = dict(QWEN3_MOE, mlp_only_layers=[], decoder_sparse_step=2)
    del d["rope_theta"]
    d["rope_parameters"] = {"rope_type": "linear", "factor": 4.0, "rope_theta": 5e5}
    c = ModelConfig.from_hf_dict(d)
    assert [c.ffn_kind(l) for l in range(4)] == ["dense", "moe", "dense", "moe"]
    assert c.rope_theta == 5e5 and c.rope_scaling_dict == {"rope_type": "linear", "factor": 4.0}


def test_old_style_rope_scaling_and_dense_llama():
    d = {"architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 32,
         "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 48,
         "rope_theta": 5e5, "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0,
                                              "original_max_position_embeddings": 64}}
    c = ModelConfig.from_hf_dict(d)
    assert c.num_kv_heads == 4 and c.head_dim == 8 and not c.is_moe and c.ffn_kinds == ("dense",)
    assert c.rope_scaling_dict["rope_type"] == "llama3"


def test_unsupported_architecture_lists_supported_ones():
    with pytest.raises(ValueError) as e:
        ModelConfig.from_hf_dict(dict(QWEN3_MOE, architectures=["GPT2LMHeadModel"]))
    assert "GPT2LMHeadModel" in str(e.value)
    for arch in SUPPORTED_ARCHITECTURES:
        assert arch in str(e.value)


@pytest.mark.parametrize("field,value,match", [
    ("num_key_value_heads", 3, "num_kv_heads"),
    ("num_experts_per_tok", 9, "top_k"),
    ("rope_scaling", {"rope_type": "longrope", "factor": 2.0}, "longrope"),
    ("hidden_act", "gelu", "hidden_act"),
])
def test_invalid_configs_name_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf_dict(dict(QWEN3_MOE, **{field: value}))


def test_missing_required_field_is_named():
    d = dict(QWEN3_MOE)
    del d["hidden_size"]
    with pytest.raises(ValueError, match="hidden_size"):
        ModelConfig.from_hf_dict(d)


def test_init_random_params_matches_param_shapes_and_bytes():
    c = ModelConfig.from_hf_dict(QWEN3_MOE)
    kv, ffn = init_random_params(c, jax.random.key(3), jnp.bfloat16)
    kv_shapes, ffn_shapes = param_shapes(c)
    got = jax.tree_util.tree_map(lambda a: tuple(a.shape), (kv, ffn))
    assert got == (kv_shapes, ffn_shapes)
    assert ffn["moe"]["w1_LEDF2"].shape == (3, 8, 32, 32) and ffn["dense"]["w2_LFD"].shape == (1, 40, 32)
    assert kv["attn"]["q_norm_LH"].shape == (4, 16) and "lm_head_DV" in kv["final"]
    n = sum(np.prod(s) for s in jax.tree_util.tree_leaves(
        (kv_shapes, ffn_shapes), is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(i, int) for i in x)))
    assert param_bytes((kv, ffn)) == 2 * n
    assert all(a.dtype == jnp.bfloat16 for a in jax.tree_util.tree_leaves((kv, ffn)))


FWD_CONFIG = dict(QWEN3_MOE, num_hidden_layers=3, mlp_only_layers=[1])   # moe, dense, moe
T = 12


def _random_model(seed, **overrides):
    c = ModelConfig.from_hf_dict(dict(FWD_CONFIG, **overrides))
    return c, init_random_params(c, jax.random.key(seed), jnp.float32)


def _whole(n):
    return jnp.zeros(n, jnp.int32), jnp.arange(n, dtype=jnp.int32)


def _manual_forward(kv, ffn, c, ids, pos, attention_fn, cache):
    """Layer by layer through attention_block / ffn_block, indexing the stacks by hand."""
    x = kv["embed"]["embedding_VD"][ids]
    for l in range(c.num_layers):
        kind, i = c.ffn_kind(l), c.ffn_index(l)
        cache, h = attention_block(jax.tree_util.tree_map(lambda a: a[l], kv["attn"]), c, x, pos, l,
                                   attention_fn, cache)
        x = ffn_block(jax.tree_util.tree_map(lambda a: a[i], ffn[kind]), c, kind, h, moe_backend="reference")
    return cache, rms_norm(x, kv["final"]["norm_D"], c.rms_norm_eps)


def test_two_packed_sequences_match_each_run_alone():
    c, (kv, ffn) = _random_model(7)
    rng = np.random.default_rng(7)
    a, b = rng.integers(0, c.vocab_size, 5), rng.integers(0, c.vocab_size, 7)
    ids = jnp.asarray(np.concatenate([a, b]), jnp.int32)
    seg = jnp.asarray([0] * 5 + [1] * 7, jnp.int32)
    pos = jnp.asarray(list(range(5)) + list(range(7)), jnp.int32)
    packed = np.asarray(dense_logits(kv, ffn, c, ids, seg, pos))
    alone_a = np.asarray(dense_logits(kv, ffn, c, jnp.asarray(a, jnp.int32), *_whole(5)))
    alone_b = np.asarray(dense_logits(kv, ffn, c, jnp.asarray(b, jnp.int32), *_whole(7)))
    scale = np.abs(packed).max()
    assert scale > 0.1
    np.testing.assert_allclose(packed[:5], alone_a, atol=1e-5 * scale)
    np.testing.assert_allclose(packed[5:], alone_b, atol=1e-5 * scale)
    # the segment mask matters: one unsegmented sequence gives different logits for b
    merged = np.asarray(dense_logits(kv, ffn, c, ids, *_whole(T)))
    assert np.abs(merged[5:] - packed[5:]).max() > 1e-3 * scale


def test_blocks_compose_to_forward_and_cache_threads_through():
    c, (kv, ffn) = _random_model(11)
    ids = jnp.asarray(np.random.default_rng(11).integers(0, c.vocab_size, T), jnp.int32)
    seg, pos = _whole(T)
    base = dense_causal_attention(seg, pos)

    def counting_attention(q, k, v, layer_idx, cache):   # cache: per-layer sum of k, proves threading
        out, cache = base(q, k, v, layer_idx, cache)
        return out, cache.at[layer_idx].add(jnp.sum(k))

    cache0 = jnp.zeros(c.num_layers, jnp.float32)
    cache, hidden = jax.jit(forward, static_argnums=(2, 5))(kv, ffn, c, ids, pos, counting_attention, cache0)
    manual_cache, manual_hidden = jax.jit(_manual_forward, static_argnums=(2, 5))(
        kv, ffn, c, ids, pos, counting_attention, cache0)
    logits = compute_logits(kv, c, hidden)
    assert logits.dtype == jnp.float32 and logits.shape == (T, c.vocab_size)
    assert np.all(np.abs(np.asarray(cache)) > 0)
    np.testing.assert_allclose(np.asarray(cache), np.asarray(manual_cache), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(hidden), np.asarray(manual_hidden), rtol=1e-4, atol=1e-5)


def test_scan_path_equals_loop_path():
    """All-MoE model (lax.scan over layers) vs the same weights through the per-layer loop."""
    c, (kv, ffn) = _random_model(5, mlp_only_layers=[])
    assert c.ffn_kinds == ("moe",)
    ids = jnp.asarray(np.random.default_rng(5).integers(0, c.vocab_size, T), jnp.int32)
    seg, pos = _whole(T)
    scanned = np.asarray(dense_logits(kv, ffn, c, ids, seg, pos))
    _, hidden = jax.jit(_manual_forward, static_argnums=(2, 5))(
        kv, ffn, c, ids, pos, dense_causal_attention(seg, pos), None)
    looped = np.asarray(compute_logits(kv, c, hidden))
    np.testing.assert_allclose(scanned, looped, rtol=1e-4, atol=1e-4 * np.abs(looped).max())


def test_sliding_window_limits_attention():
    c, (kv, ffn) = _random_model(9)
    cw = dataclasses.replace(c, sliding_window=3)
    ids = jnp.asarray(np.random.default_rng(9).integers(0, c.vocab_size, T), jnp.int32)
    full = np.asarray(dense_logits(kv, ffn, c, ids, *_whole(T)))
    windowed = np.asarray(dense_logits(kv, ffn, cw, ids, *_whole(T)))
    np.testing.assert_allclose(windowed[:3], full[:3], rtol=1e-5, atol=1e-5)   # window not yet binding
    assert np.abs(windowed[3:] - full[3:]).max() > 1e-4


def test_moe_backend_goes_through_the_kernel_dispatcher():
    c, (kv, ffn) = _random_model(13, mlp_only_layers=[])
    ids = jnp.asarray(np.random.default_rng(13).integers(0, c.vocab_size, T), jnp.int32)
    ref = np.asarray(dense_logits(kv, ffn, c, ids, *_whole(T)))
    auto = np.asarray(dense_logits(kv, ffn, c, ids, *_whole(T), moe_backend="auto"))   # reference on CPU
    np.testing.assert_allclose(auto, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    with pytest.raises(ValueError, match="backend"):
        dense_logits(kv, ffn, c, ids, *_whole(T), moe_backend="no-such-backend")


def test_benchmark_shapes_parse_and_match_published_sizes():
    """Every random-weight benchmark shape is a valid config; the full-depth ones have the
    parameter counts their model cards give (DeepSeek-V2-Lite: 15.7B; GLM-4.7-Flash: 30B-A3B,
    its multi-token-prediction layer not counted; GPT-OSS-20B: 20.9B)."""
    from crosspool_jax.models import ModelConfig
    from crosspool_jax.models.params import side_bytes
    from crosspool_jax.models.random_models import SHAPES
    params = {name: sum(side_bytes(ModelConfig.from_hf_dict(d), "float32")) // 4 for name, d in SHAPES.items()}
    assert abs(params["deepseek-v2-lite-27l"] / 1e9 - 15.7) < 0.05
    assert abs(params["glm-4.7-flash-47l"] / 1e9 - 30) < 0.1
    assert abs(params["gpt-oss-20b-24l"] / 1e9 - 20.91) < 0.01
