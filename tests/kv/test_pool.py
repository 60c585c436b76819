"""The KV pool's geometry and in-place writes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crosspool_jax.kv.pool import (KVPool, KVPoolLayout, choose_page_elems, local_page_ids, page_view,
                                   tokens_per_page, write_kv)


def test_page_elems_serve_every_geometry():
    rows = [2 * 16, 4 * 32, 8 * 24]
    elems = choose_page_elems(rows)
    for row in rows:
        assert elems % row == 0
    assert elems // max(rows) >= 16
    assert tokens_per_page(elems, 4, 32) == elems // 128


def test_tokens_per_page_rejects_non_divisible():
    with pytest.raises(ValueError, match="not a multiple"):
        tokens_per_page(100, 3, 16)


def test_layout_from_bytes_and_errors():
    layout = KVPoolLayout.from_bytes(1 << 20, 1024, 2, "bfloat16")
    assert layout.page_bytes == 2 * 1024 * 2
    assert layout.num_pages == 2 * ((1 << 20) // 2 // 4096)
    with pytest.raises(ValueError, match="too small"):
        KVPoolLayout.from_bytes(100, 1024, 1, "float32")
    with pytest.raises(ValueError, match="pages_per_device"):
        KVPoolLayout(16, 0, 1, "float32")


def test_pool_has_independent_buffers_per_device():
    devices = jax.devices()[:4]
    pool = KVPool(KVPoolLayout(64, 8, 4, "float32"), devices)
    assert pool.nbytes == 32 * 2 * 64 * 4
    for d, device in enumerate(devices):
        assert pool.k_buffers[d].shape == pool.v_buffers[d].shape == (8, 64)
        assert pool.k_buffers[d].devices() == pool.v_buffers[d].devices() == {device}
    k, v = pool.take(2)
    assert pool.k_buffers[2] is None and pool.k_buffers[1] is not None
    with pytest.raises(ValueError, match="device 2 are already taken"):
        pool.take(2)
    pool.put(k + 1, v, 2)
    assert float(pool.k_buffers[2].sum()) == 8 * 64 and float(pool.k_buffers[1].sum()) == 0
    with pytest.raises(ValueError, match="device_index must be in \\[0, 4\\)"):
        pool.take(4)
    with pytest.raises(ValueError, match="2 devices"):
        KVPool(KVPoolLayout(64, 8, 2, "float32"), devices)


def test_local_page_ids():
    device, local = local_page_ids([[9, 12], [10, 15]], 8)
    assert device == 1 and local.tolist() == [[1, 4], [2, 7]]
    assert local_page_ids([3], 8)[0] == 0
    with pytest.raises(ValueError, match="lie on devices \\[0, 1\\]"):
        local_page_ids([[1, 9]], 8)


def test_two_models_view_the_same_pages_without_copy():
    buf = jnp.arange(6 * 64, dtype=jnp.float32).reshape(6, 64)
    a = page_view(buf, 2, 8)     # G = 4
    b = page_view(buf, 1, 16)    # G = 4, other geometry
    assert a.shape == (6, 4, 2, 8) and b.shape == (6, 4, 1, 16)
    np.testing.assert_array_equal(np.asarray(a).reshape(6, 64), np.asarray(buf))


def test_write_kv_hits_slots_and_drops_padding():
    rng = np.random.default_rng(0)
    P, G, K, H = 5, 4, 2, 8
    k_pages = jnp.asarray(rng.standard_normal((P, G, K, H)), jnp.float32)
    v_pages = jnp.asarray(rng.standard_normal((P, G, K, H)), jnp.float32)
    k_new = jnp.asarray(rng.standard_normal((3, K, H)), jnp.float32)
    v_new = jnp.asarray(rng.standard_normal((3, K, H)), jnp.float32)
    slots = jnp.array([3 * G + 1, 0 * G + 3, P * G], jnp.int32)   # last one is padding
    k2, v2 = write_kv(k_pages, v_pages, k_new, v_new, slots)
    np.testing.assert_array_equal(k2[3, 1], k_new[0])
    np.testing.assert_array_equal(v2[0, 3], v_new[1])
    untouched = np.ones((P, G), bool)
    untouched[3, 1] = untouched[0, 3] = False
    np.testing.assert_array_equal(np.asarray(k2)[untouched], np.asarray(k_pages)[untouched])


def test_mla_capacity_in_tokens_against_per_head_kv():
    """DeepSeek-V2-Lite caches 576 values per token and layer (latent 512 + rope key 64, half
    in the K buffer, half in the V buffer): bytes per token = the formula, and the same pool
    holds 16 heads x (192 + 128) / 576 = 8.9x the tokens of a per-head K/V layout."""
    from crosspool_jax.models import ModelConfig
    from crosspool_jax.models.random_models import SHAPES
    c = ModelConfig.from_hf_dict(SHAPES["deepseek-v2-lite-27l"])
    assert (c.kv_cache_heads, c.kv_cache_head_dim) == (1, 288)
    assert 2 * c.kv_bytes_per_token_per_layer("bfloat16") == (512 + 64) * 2
    page_elems = choose_page_elems([c.kv_cache_row])
    G = tokens_per_page(page_elems, c.kv_cache_heads, c.kv_cache_head_dim)
    pool_bytes = 1 << 30
    layout = KVPoolLayout.from_bytes(pool_bytes, page_elems, 1, "bfloat16")
    mla_tokens = layout.num_pages // c.num_layers * G
    per_head_values = c.num_heads * (c.qk_head_dim + c.head_dim)           # 16 x (192 + 128) = 5120
    per_head_tokens = pool_bytes // (c.num_layers * per_head_values * 2)
    assert per_head_values == 5120
    assert 8.8 < mla_tokens / per_head_tokens < 8.9 + 1e-9
    assert abs(mla_tokens / per_head_tokens - 5120 / 576) < 0.01
