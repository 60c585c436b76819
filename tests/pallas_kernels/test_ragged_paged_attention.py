"""Ragged paged attention: the reference against a plain numpy loop, the GPU kernel (Pallas
interpret mode) and the TPU kernel (TPU interpret mode) against the reference, page offsets
(K and V as two windows of one buffer) on every backend, argument validation, the operand
size rule, and a `gpu`-marked class that runs the compiled GPU kernel on bigger shapes and on
a K/V buffer of more than 2**31 elements.

Inputs are fresh random normals (never zeros); page tables are shuffled; pages no sequence
owns, the unused tail slots of each sequence's last page, and the page-table entries past a
sequence's pages (set to -1 or random) are all poison: NaN pages, so any leak shows.

Tolerances (max abs error against the reference, after both are cast to float32):
- float32: 2e-5 on CPU. Both sides accumulate in float32 over at most a few hundred keys;
  the kernel's online softmax and blockwise sums reorder additions, which moves results by
  a few ulps of values of order 1 (outputs are convex combinations of unit normals), so
  ~1e-6 is expected and 2e-5 leaves margin. On the GPU, 1e-4 (Triton's fp32 dot and exp
  differ from XLA's by a few ulps more, over contexts of thousands of keys).
- bfloat16: 2e-2. The inputs are identical bf16 values on both sides and scores accumulate
  in float32, but the kernel rounds the probabilities to bf16 before the P.V product
  (relative error 2^-9 each) and both round the output to bf16 (2^-9 relative of |out| <= ~3),
  so errors of ~1e-2 are normal; a wrong mask or page is off by O(0.1-1).
"""
from __future__ import annotations


import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.ragged_paged_attention import (ragged_paged_attention,
                                                   ragged_paged_attention_reference, tuning)
from pallas_kernels.ragged_paged_attention.gpu import ragged_paged_attention_gpu
from pallas_kernels.ragged_paged_attention.tpu import ragged_paged_attention_tpu

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}
GPU_TOL = {jnp.float32: 1e-4, jnp.bfloat16: 2e-2}


def record_backends(monkeypatch, platform: str, kernels=()) -> list:
    """Make "auto" resolve to `platform` and record which path each call takes: the returned
    list gets "reference" per reference call and "gpu" per call of each kernel in `kernels`
    ((module, function name) pairs, run in interpret mode)."""
    import pallas_kernels.ragged_paged_attention as rpa
    monkeypatch.setattr(rpa, "resolve_backend", lambda backend="auto": platform)
    calls = []

    def recording(tag, fn, **extra):
        return lambda *a, **k: calls.append(tag) or fn(*a, **{**k, **extra})

    monkeypatch.setattr(rpa, "ragged_paged_attention_reference",
                        recording("reference", rpa.ragged_paged_attention_reference))
    for module, name in kernels:
        monkeypatch.setattr(module, name, recording("gpu", getattr(module, name), interpret=True))
    return calls


def make_case(seed, q_lens, kv_lens, *, N=8, K=2, H=64, G=16, S_cap=None, T_pad=0,
              dtype=jnp.float32, table_fill="neg1", extra_pages=6):
    """Random paged inputs; returns (args tuple, dense numpy K/V per sequence for the loop)."""
    rng = np.random.default_rng(seed)
    n = len(q_lens)
    S = S_cap or n
    pps = max(-(-l // G) for l in kv_lens) + 1
    need = sum(-(-l // G) for l in kv_lens)
    P = need + extra_pages
    perm = rng.permutation(P)
    table = np.full((S, pps), -1, np.int32)
    if table_fill == "random":
        table = rng.integers(0, P, (S, pps)).astype(np.int32)
    k = rng.standard_normal((P, G, K, H)).astype(np.float32)
    v = rng.standard_normal((P, G, K, H)).astype(np.float32)
    owned = set()
    used = 0
    for s, length in enumerate(kv_lens):
        m = -(-length // G)
        table[s, :m] = perm[used:used + m]
        owned.update(perm[used:used + m].tolist())
        used += m
    poison = np.ones(P, bool)
    poison[list(owned)] = False
    k[poison] = np.nan
    v[poison] = np.nan
    for s, length in enumerate(kv_lens):             # tail slots of the last page
        if length % G:
            last = table[s, -(-length // G) - 1]
            k[last, length % G:] = np.nan
            v[last, length % G:] = np.nan
    T = sum(q_lens) + T_pad
    q = rng.standard_normal((T, N, H)).astype(np.float32)
    cu = np.zeros(S + 1, np.int32)
    cu[1:n + 1] = np.cumsum(q_lens)
    cu[n + 1:] = cu[n]
    kl = np.zeros(S, np.int32)
    kl[:n] = kv_lens
    args = (jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype), jnp.asarray(kl),
            jnp.asarray(table), jnp.asarray(cu), jnp.asarray([n], jnp.int32))
    return args


def loop_attention(args, *, sm_scale=None, soft_cap=None, sliding_window=None, sinks=None):
    """A float64 numpy loop over sequences, tokens and heads: the reference's own oracle
    (sinks: a logit per head added to each softmax denominator)."""
    q, k, v, kl, table, cu, ns = [np.asarray(a, np.float64) if a.dtype != jnp.int32
                                  else np.asarray(a) for a in args]
    T, N, H = q.shape
    _, G, K, _ = k.shape
    scale = H ** -0.5 if sm_scale is None else sm_scale
    out = np.zeros((T, N, H))
    for s in range(int(ns[0])):
        q_len, kv_len = cu[s + 1] - cu[s], kl[s]
        pages = table[s, :-(-kv_len // G)]
        ks = k[pages].reshape(-1, K, H)[:kv_len]
        vs = v[pages].reshape(-1, K, H)[:kv_len]
        for i in range(q_len):
            pos = kv_len - q_len + i
            lo = 0 if sliding_window is None else max(0, pos - sliding_window + 1)
            for h in range(N):
                sc = ks[lo:pos + 1, h // (N // K)] @ q[cu[s] + i, h] * scale
                if soft_cap is not None:
                    sc = soft_cap * np.tanh(sc / soft_cap)
                m = sc.max() if sinks is None else max(sc.max(), float(sinks[h]))
                p = np.exp(sc - m)
                denom = p.sum() + (0.0 if sinks is None else np.exp(float(sinks[h]) - m))
                out[cu[s] + i, h] = p @ vs[lo:pos + 1, h // (N // K)] / denom
    return out


def assert_close(out, ref, tol):
    out = np.asarray(jnp.asarray(out, jnp.float32))
    ref = np.asarray(jnp.asarray(ref, jnp.float32))
    assert not np.isnan(out).any(), "NaN leaked into the output"
    np.testing.assert_allclose(out, ref, atol=tol, rtol=0)


# q_lens / kv_lens with G=16: lengths 1, G-1, G, G+1 and long; decode, prefill and chunks
MIXED = ([1, 1, 16, 3, 9, 1], [1, 15, 16, 17, 70, 130])
DECODE = ([1] * 5, [1, 15, 17, 300, 1100])
PREFILL = ([7, 16, 33], [7, 16, 40])


class TestReference:
    @pytest.mark.parametrize("soft_cap,window", [(None, None), (4.0, 5)])
    def test_matches_numpy_loop(self, soft_cap, window):
        args = make_case(1, *MIXED, N=8, K=2, H=32, S_cap=8, T_pad=3)
        ref = ragged_paged_attention_reference(*args, soft_cap=soft_cap, sliding_window=window)
        assert_close(ref, loop_attention(args, soft_cap=soft_cap, sliding_window=window), 1e-5)
        assert np.all(np.asarray(ref)[-3:] == 0), "padding rows must be zeros"

    def test_auto_on_cpu_is_reference(self):
        args = make_case(2, *DECODE, N=4, K=4, H=64)
        out = ragged_paged_attention(*args)          # auto -> reference on CPU
        np.testing.assert_array_equal(np.asarray(out),
                                      np.asarray(ragged_paged_attention_reference(*args)))


def loop_latent_attention(args, *, latent_value_dim, sm_scale):
    """MLA's absorbed attention as a float64 numpy loop: each token's cached row is its K page
    row then its V page row (one head); the scores read the whole row, the values its first
    latent_value_dim entries."""
    q, k, v, kl, table, cu, ns = [np.asarray(a, np.float64) if a.dtype != jnp.int32
                                  else np.asarray(a) for a in args]
    T, N, _ = q.shape
    G = k.shape[1]
    out = np.zeros((T, N, latent_value_dim))
    for s in range(int(ns[0])):
        q_len, kv_len = cu[s + 1] - cu[s], kl[s]
        pages = table[s, :-(-kv_len // G)]
        rows = np.concatenate([k[pages].reshape(-1, k.shape[-1]), v[pages].reshape(-1, v.shape[-1])],
                              axis=-1)[:kv_len]
        for i in range(q_len):
            pos = kv_len - q_len + i
            for h in range(N):
                sc = rows[:pos + 1] @ q[cu[s] + i, h] * sm_scale
                p = np.exp(sc - sc.max())
                out[cu[s] + i, h] = p @ rows[:pos + 1, :latent_value_dim] / p.sum()
    return out


def latent_case(seed, q_lens, kv_lens, *, N=4, half=20, **kw):
    """make_case with one KV head of `half` dims per buffer and a fresh q of the whole row."""
    q, k, v, *rest = make_case(seed, q_lens, kv_lens, N=N, K=1, H=half, **kw)
    q = jnp.asarray(np.random.default_rng(seed + 1).standard_normal((q.shape[0], N, 2 * half)), q.dtype)
    return (q, k, v, *rest)


class TestSinksAndTracedWindow:
    """GPT-OSS: a sink logit per head; a per-layer window arrives traced inside a scan."""

    def test_sinks_match_numpy_loop(self):
        args = make_case(21, *MIXED, N=8, K=2, H=32, S_cap=8, T_pad=3)
        sinks = jnp.asarray(np.random.default_rng(22).standard_normal(8) * 2, jnp.float32)
        out = ragged_paged_attention(*args, sinks=sinks, sliding_window=5)
        assert_close(out, loop_attention(args, sinks=np.asarray(sinks), sliding_window=5), 1e-5)
        assert np.all(np.asarray(out)[-3:] == 0), "padding rows must be zeros"

    def test_traced_window_equals_static_window(self):
        args = make_case(23, *MIXED, N=4, K=2, H=32)
        windows = jnp.asarray([7, 1 << 30], jnp.int32)
        per_layer = jax.jit(lambda i: ragged_paged_attention(*args, sliding_window=windows[i]))
        assert_close(per_layer(0), loop_attention(args, sliding_window=7), 1e-5)
        assert_close(per_layer(1), loop_attention(args), 1e-5)

    def test_sinks_shape_is_checked(self):
        args = make_case(24, *DECODE, N=4, K=4, H=64)
        with pytest.raises(ValueError, match=r"sinks must be a float array \[N\]"):
            ragged_paged_attention(*args, sinks=jnp.zeros(3))


def fresh_seed(what: str) -> int:
    """A fresh seed per run, printed (pytest shows it with a failure) so a failure replays."""
    seed = int(np.random.SeedSequence().entropy % (1 << 31))
    print(f"{what}: seed {seed}")
    return seed


class TestLatentAttention:
    """MLA (latent_value_dim): the cached row split over the K and V pages, one head."""

    @pytest.mark.parametrize("value_dim", [32, 20, 7])
    def test_matches_numpy_loop(self, value_dim):
        args = latent_case(11, *MIXED, S_cap=8, T_pad=3)
        out = ragged_paged_attention(*args, sm_scale=0.3, latent_value_dim=value_dim)   # auto: the reference
        assert out.shape == (args[0].shape[0], 4, value_dim)
        assert_close(out, loop_latent_attention(args, latent_value_dim=value_dim, sm_scale=0.3), 1e-5)
        assert np.all(np.asarray(out)[-3:] == 0), "padding rows must be zeros"

    def test_geometry_is_checked_and_kernels_refuse(self):
        args = latent_case(12, *DECODE)
        with pytest.raises(ValueError, match="latent_value_dim must be an int"):
            ragged_paged_attention(*args, latent_value_dim=41)
        with pytest.raises(ValueError, match="one KV head"):
            ragged_paged_attention(*make_case(3, *DECODE, N=4, K=2, H=64), latent_value_dim=32)
        with pytest.raises(ValueError, match="narrower than 16"):        # halves of 20: pieces of 4 and 8
            ragged_paged_attention(*args, latent_value_dim=32, backend="gpu", interpret=True)
        with pytest.raises(ValueError, match="tpu kernel does not run MLA"):
            ragged_paged_attention(*args, latent_value_dim=32, backend="tpu", interpret=True)

    @pytest.mark.parametrize("lengths,window,splits", [(MIXED, None, 1), (DECODE, 40, 3)])
    def test_gpu_kernel_interpret_matches_reference(self, lengths, window, splits):
        """mla_gpu.py in interpret mode: halves of 32, 48 value columns (pieces 32 | 16 | 16),
        mixed prefill + decode, a sliding window, KV splits merged by log-sum-exp, NaN poison
        in every unowned slot."""
        from pallas_kernels.ragged_paged_attention.mla_gpu import ragged_paged_mla_gpu
        args = latent_case(13, *lengths, N=4, half=32, S_cap=8, T_pad=3)
        out = ragged_paged_mla_gpu(*args, sm_scale=0.2, sliding_window=window, latent_value_dim=48,
                                   interpret=True, block_k=16, num_splits=splits)
        ref = ragged_paged_attention_reference(*args, sm_scale=0.2, sliding_window=window, latent_value_dim=48)
        assert_close(out, ref, 2e-5)
        assert np.all(np.asarray(out)[-3:] == 0), "padding rows must be zeros"


    @pytest.mark.parametrize("v_first,window,splits", [(False, None, 1), (True, 30, 3)])
    def test_gpu_kernel_page_offsets(self, v_first, window, splits):
        """mla_gpu.py with the row's halves as two windows of ONE buffer (NaN elsewhere, a garbage
        id in each sequence's unused last table slot), as the crosspool split passes its arena
        row: equals the reference on separate K/V pages, and the kernel's own plain call."""
        from pallas_kernels.ragged_paged_attention.mla_gpu import ragged_paged_mla_gpu
        seed = fresh_seed("mla offsets")
        plain, one, k_off, v_off = windows_of_one_buffer(
            latent_case(seed, *MIXED, N=4, half=32, S_cap=8, T_pad=3), v_first=v_first)
        kw = dict(sm_scale=0.2, sliding_window=window, latent_value_dim=48)
        run = functools.partial(ragged_paged_mla_gpu, interpret=True, block_k=16, num_splits=splits, **kw)
        out = run(*one, k_page_offset=k_off, v_page_offset=v_off)
        assert_close(out, ragged_paged_attention_reference(*plain, **kw), 2e-5)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(run(*plain)))
        assert np.all(np.asarray(out)[-3:] == 0), "padding rows must be zeros"

    def test_seam_passes_page_offsets_to_the_gpu_kernel(self):
        """ragged_paged_attention(latent_value_dim=, backend="gpu") with offsets equals the
        reference with the same offsets."""
        seed = fresh_seed("mla seam offsets")
        _, one, k_off, v_off = windows_of_one_buffer(latent_case(seed, *DECODE, N=4, half=32))
        kw = dict(sm_scale=0.2, latent_value_dim=64, k_page_offset=k_off, v_page_offset=v_off)
        out = ragged_paged_attention(*one, backend="gpu", interpret=True, **kw)
        assert_close(out, ragged_paged_attention(*one, **kw), 2e-5)
        with pytest.raises(ValueError, match="MLA kernel does not run attention sinks"):
            ragged_paged_attention(*one, backend="gpu", interpret=True, sinks=jnp.zeros(4), **kw)

    def test_auto_policy_on_a_gpu(self, monkeypatch):
        """"auto" on a GPU: decode-shaped MLA (at most one query token per sequence slot) of 2
        tokens or more on the kernel; one token, a prefill-shaped call and a row whose column
        pieces the kernel cannot tile on the reference."""
        import pallas_kernels.ragged_paged_attention as rpa
        from pallas_kernels.ragged_paged_attention import mla_gpu
        calls = record_backends(monkeypatch, "gpu", [(mla_gpu, "ragged_paged_mla_gpu")])
        seed = fresh_seed("mla auto")
        decode = latent_case(seed, *DECODE, N=4, half=32)
        got = rpa.ragged_paged_attention(*decode, sm_scale=0.2, latent_value_dim=64)
        assert_close(got, ragged_paged_attention_reference(*decode, sm_scale=0.2, latent_value_dim=64), 2e-5)
        rpa.ragged_paged_attention(*latent_case(seed + 1, *MIXED, N=4, half=32), sm_scale=0.2, latent_value_dim=64)
        rpa.ragged_paged_attention(*latent_case(seed + 2, *DECODE, N=4, half=40), sm_scale=0.2,
                                   latent_value_dim=72)          # pieces 32 | 8 | ...: narrower than 16
        rpa.ragged_paged_attention(*latent_case(seed + 3, [1], [300], N=4, half=32), sm_scale=0.2,
                                   latent_value_dim=64)          # one token
        assert calls == ["gpu", "reference", "reference", "reference"]


class TestGpuKernelInterpret:
    """The Triton-lowered kernel under Pallas' interpret mode."""

    @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
    def test_mixed_batch_padding_and_capacity(self, dtype):
        args = make_case(3, *MIXED, N=8, K=2, H=64, G=16, S_cap=9, T_pad=5, dtype=dtype)
        out = ragged_paged_attention(*args, backend="gpu", interpret=True)
        assert_close(out, ragged_paged_attention_reference(*args), TOL[dtype])
        assert np.all(np.asarray(out, np.float32)[-5:] == 0), "padding rows must be zeros"

    @pytest.mark.parametrize("R,H,G", [(1, 64, 32), (4, 128, 16), (8, 64, 64), (4, 256, 128)])
    def test_gqa_head_dims_page_sizes(self, R, H, G):
        q_lens, kv_lens = [1, 5, 1], [G - 1, G + 1, 2 * G + 3]
        args = make_case(10 + R + H + G, q_lens, kv_lens, N=2 * R, K=2, H=H, G=G, S_cap=4,
                         table_fill="random")
        out = ragged_paged_attention(*args, backend="gpu", interpret=True)
        assert_close(out, ragged_paged_attention_reference(*args), TOL[jnp.float32])

    def test_decode_only_uses_split_kv(self):
        args = make_case(4, *DECODE, N=8, K=2, H=64, G=16, S_cap=6)
        T, S, C = 5, 6, args[4].shape[1] * 16
        assert tuning.gpu_config(T=T, S=S, R=4, H=64, G=16, C=C, K=2).num_splits > 1
        out = ragged_paged_attention(*args, backend="gpu", interpret=True)
        assert_close(out, ragged_paged_attention_reference(*args), TOL[jnp.float32])

    def test_prefill_only(self):
        args = make_case(5, *PREFILL, N=4, K=1, H=64, G=16)
        out = ragged_paged_attention(*args, backend="gpu", interpret=True)
        assert_close(out, ragged_paged_attention_reference(*args), TOL[jnp.float32])

    @pytest.mark.parametrize("soft_cap,window", [(3.0, None), (5.0, 9)])
    def test_soft_cap_and_sliding_window(self, soft_cap, window):
        args = make_case(6, *MIXED, N=8, K=2, H=64, G=16, S_cap=6)
        kw = dict(soft_cap=soft_cap, sliding_window=window, sm_scale=0.2)
        out = ragged_paged_attention(*args, backend="gpu", interpret=True, **kw)
        assert_close(out, ragged_paged_attention_reference(*args, **kw), TOL[jnp.float32])

    @pytest.mark.parametrize("cfg", [
        tuning.BlockConfig(q_tokens=2, block_k=8, num_splits=3),    # sub-page blocks
        tuning.BlockConfig(q_tokens=8, block_k=64, num_splits=4),   # several pages per block
        # one pool row per key, V zeroed by a masked load, heads-fastest grid
        tuning.BlockConfig(q_tokens=2, block_k=8, num_splits=3, heads_fastest=True,
                           row_gather=True, mask_v_load=True),
        tuning.BlockConfig(q_tokens=8, block_k=64, num_splits=1, row_gather=True),
        # items derived in the kernel, with splits and without
        tuning.BlockConfig(q_tokens=2, block_k=16, num_splits=4, row_gather=True,
                           items_in_kernel=True),
        tuning.BlockConfig(q_tokens=8, block_k=32, num_splits=1, heads_fastest=True,
                           items_in_kernel=True),
    ])
    def test_explicit_tilings(self, cfg):
        args = make_case(7, *MIXED, N=8, K=2, H=64, G=16, S_cap=6)
        out = ragged_paged_attention_gpu(*args, sm_scale=0.125, sliding_window=40,
                                         interpret=True, config=cfg)
        ref = ragged_paged_attention_reference(*args, sm_scale=0.125, sliding_window=40)
        assert_close(out, ref, TOL[jnp.float32])

    def test_block_config_rejects_bad_flags(self):
        with pytest.raises(ValueError, match="mask_v_load needs row_gather"):
            tuning.BlockConfig(q_tokens=1, block_k=16, mask_v_load=True)
        with pytest.raises(ValueError, match="heads_fastest must be a bool"):
            tuning.BlockConfig(q_tokens=1, block_k=16, heads_fastest=1)

    def test_no_live_sequences_gives_zeros(self):
        q, k, v, kl, table, cu, _ = make_case(8, *MIXED, N=8, K=2, H=64, G=16)
        out = ragged_paged_attention(q, k, v, kl, table, cu, jnp.asarray([0], jnp.int32),
                                     backend="gpu", interpret=True)
        assert np.all(np.asarray(out) == 0)


class TestTpuKernelInterpret:
    """The Mosaic TPU kernel under the TPU interpret mode (no TPU is lent)."""

    def test_mixed_gqa4_f32(self):
        args = make_case(20, *MIXED, N=8, K=2, H=128, G=16, S_cap=8, T_pad=2)
        out = ragged_paged_attention(*args, backend="tpu", interpret=True)
        assert_close(out, ragged_paged_attention_reference(*args), TOL[jnp.float32])
        assert np.all(np.asarray(out)[-2:] == 0)

    def test_bf16_gqa8_soft_cap_window(self):
        args = make_case(21, [1, 4, 1], [33, 40, 64], N=8, K=1, H=64, G=32,
                         dtype=jnp.bfloat16, table_fill="random")
        kw = dict(soft_cap=4.0, sliding_window=20)
        out = ragged_paged_attention(*args, backend="tpu", interpret=True, **kw)
        assert_close(out, ragged_paged_attention_reference(*args, **kw), TOL[jnp.bfloat16])

    def test_decode_mha_head_dim_256(self):
        args = make_case(22, [1, 1, 1], [1, 17, 60], N=2, K=2, H=256, G=16, S_cap=5)
        out = ragged_paged_attention_tpu(*args, sm_scale=0.1, interpret=True)
        assert_close(out, ragged_paged_attention_reference(*args, sm_scale=0.1),
                     TOL[jnp.float32])


def windows_of_one_buffer(args, *, v_first=False, gaps=(3, 2, 4)):
    """The case of `args` with K and V as two windows of ONE buffer whose other pages are NaN
    (gaps: NaN pages before, between and after the windows), and a garbage id 2**31 - 1 in
    every sequence's last (unused) page-table slot.
    -> (plain args, buffer args, k_page_offset, v_page_offset)."""
    q, k, v, kl, table, cu, ns = args
    table = table.at[:, -1].set(2 ** 31 - 1)
    P, G, K, H = k.shape
    nan = [jnp.full((n, G, K, H), jnp.nan, k.dtype) for n in gaps]
    first, second = (v, k) if v_first else (k, v)
    buf = jnp.concatenate([nan[0], first, nan[1], second, nan[2]])
    offsets = (gaps[0], gaps[0] + P + gaps[1])
    k_off, v_off = offsets[::-1] if v_first else offsets
    return (q, k, v, kl, table, cu, ns), (q, buf, buf, kl, table, cu, ns), k_off, v_off


class TestPageOffsets:
    """k_page_offset / v_page_offset: page id p's K is k_pages[p + k_page_offset], its V
    v_pages[p + v_page_offset]. Each backend on one buffer holding both windows (NaN elsewhere)
    must equal the plain call on separate K/V arrays, bit for bit."""

    def test_reference(self):
        plain, one, k_off, v_off = windows_of_one_buffer(
            make_case(80, *MIXED, N=8, K=2, H=32, S_cap=8, T_pad=3))
        out = ragged_paged_attention(*one, backend="reference", k_page_offset=k_off,
                                     v_page_offset=v_off)
        ref = ragged_paged_attention(*plain, backend="reference")
        assert not np.isnan(np.asarray(out)).any()
        np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))

    @pytest.mark.parametrize("cfg", [
        None,                                                          # tuned: row_gather
        tuning.BlockConfig(q_tokens=8, block_k=64, num_splits=4),      # whole pages [P, G, K*H]
        tuning.BlockConfig(q_tokens=2, block_k=8, num_splits=3),       # a slice of one page
    ])
    def test_gpu_kernel_interpret(self, cfg):
        plain, one, k_off, v_off = windows_of_one_buffer(
            make_case(81, *MIXED, N=8, K=2, H=64, G=16, S_cap=6))
        if cfg is None:
            run = functools.partial(ragged_paged_attention, backend="gpu", interpret=True)
        else:
            run = functools.partial(ragged_paged_attention_gpu, sm_scale=0.125, interpret=True,
                                    config=cfg)
        out = run(*one, k_page_offset=k_off, v_page_offset=v_off)
        assert_close(out, ragged_paged_attention_reference(*plain, sm_scale=0.125), TOL[jnp.float32])
        np.testing.assert_array_equal(np.asarray(out), np.asarray(run(*plain)))

    def test_tpu_kernel_interpret_v_window_first(self):
        plain, one, k_off, v_off = windows_of_one_buffer(
            make_case(82, *MIXED, N=8, K=2, H=128, G=16, S_cap=8, T_pad=2), v_first=True)
        assert v_off < k_off
        out = ragged_paged_attention(*one, backend="tpu", interpret=True, k_page_offset=k_off,
                                     v_page_offset=v_off)
        assert_close(out, ragged_paged_attention_reference(*plain), TOL[jnp.float32])
        np.testing.assert_array_equal(
            np.asarray(out), np.asarray(ragged_paged_attention(*plain, backend="tpu", interpret=True)))

    @pytest.mark.parametrize("kw,match", [
        (dict(k_page_offset=-1), "k_page_offset must be a non-negative int"),
        (dict(v_page_offset=2.0), "v_page_offset must be a non-negative int"),
        (dict(v_page_offset=True), "v_page_offset must be a non-negative int"),
        (dict(k_page_offset=jnp.int32(1)), "k_page_offset must be a non-negative int"),
        (dict(v_page_offset=8), "v_page_offset=8 leaves no page of the 8-page buffer"),
    ])
    def test_bad_offsets_raise(self, kw, match):
        args = make_case(83, [1, 2], [3, 5], N=4, K=2, H=64, G=16, extra_pages=6)   # P = 8
        for backend in ("reference", "gpu"):
            with pytest.raises(ValueError, match=match):
                ragged_paged_attention(*args, backend=backend, interpret=True, **kw)

    def test_numpy_int_offsets_accepted(self):
        plain, one, k_off, v_off = windows_of_one_buffer(make_case(84, [1, 2], [3, 5], N=4, K=2, H=64))
        out = ragged_paged_attention(*one, backend="reference", k_page_offset=np.int64(k_off),
                                     v_page_offset=np.int32(v_off))
        np.testing.assert_array_equal(np.asarray(out),
                                      np.asarray(ragged_paged_attention(*plain, backend="reference")))


class TestValidation:
    def _args(self):
        return make_case(30, [1, 2], [3, 5], N=4, K=2, H=64, G=16)

    @pytest.mark.parametrize("change,match", [
        (lambda a: (a[0][0],) + a[1:], "q must have rank 3"),
        (lambda a: (a[0].astype(jnp.int32),) + a[1:], "q must be float32"),
        (lambda a: (a[0][:, :3],) + a[1:], "divisible by KV heads"),
        (lambda a: a[:3] + (a[3].astype(jnp.float32),) + a[4:], "kv_lens must be int32"),
        (lambda a: a[:5] + (a[5][:-1],) + a[6:], "cu_q_lens"),
        (lambda a: a[:2] + (a[2][:, :8],) + a[3:], "v_pages shape"),
    ])
    def test_bad_arguments(self, change, match):
        with pytest.raises(ValueError, match=match):
            ragged_paged_attention(*change(self._args()), backend="reference")

    def test_bad_backend_and_options(self):
        args = self._args()
        with pytest.raises(ValueError, match="backend must be one of"):
            ragged_paged_attention(*args, backend="cuda")
        with pytest.raises(ValueError, match="soft_cap"):
            ragged_paged_attention(*args, soft_cap=-1.0)
        with pytest.raises(ValueError, match="sliding_window"):
            ragged_paged_attention(*args, sliding_window=0)

    def test_numpy_scalars_accepted(self):
        args = self._args()
        out = ragged_paged_attention(*args, sm_scale=np.float32(0.1), soft_cap=np.float64(3.0),
                                     sliding_window=np.int32(4), backend="reference")
        ref = ragged_paged_attention_reference(*args, sm_scale=0.1, soft_cap=3.0,
                                               sliding_window=4)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-6)

    def test_auto_falls_back_to_reference_outside_kernel_geometry(self, monkeypatch):
        import pallas_kernels.ragged_paged_attention as rpa
        monkeypatch.setattr(rpa, "resolve_backend", lambda backend="auto": "gpu")
        args = make_case(33, [1, 3], [5, 20], N=4, K=2, H=32, G=16)   # head dim 32: no kernel
        out = rpa.ragged_paged_attention(*args, backend="auto")
        np.testing.assert_array_equal(np.asarray(out),
                                      np.asarray(ragged_paged_attention_reference(*args)))

    def test_kernel_geometry_limits(self):
        q, k, v, *rest = make_case(31, [1], [5], N=2, K=1, H=96, G=16)
        with pytest.raises(ValueError, match="head dim in"):
            ragged_paged_attention(q, k, v, *rest, backend="gpu", interpret=True)
        q, k, v, *rest = make_case(32, [1], [5], N=2, K=1, H=64, G=8)
        with pytest.raises(ValueError, match="page size"):
            ragged_paged_attention(q, k, v, *rest, backend="tpu", interpret=True)


def _has_gpu():
    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


@pytest.mark.gpu
@pytest.mark.skipif(not _has_gpu(), reason="needs a CUDA GPU")
class TestGpuKernelCompiled:
    """The compiled Triton kernel on a real GPU, bigger shapes (scripts/run_gpu_checks.sh)."""

    @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
    @pytest.mark.parametrize("G", [16, 64])
    def test_mixed_long_contexts(self, dtype, G):
        q_lens = [1, 1, 1, 64, 17, 1, 200, 1]
        kv_lens = [1, G - 1, G + 1, 64, 3000, 4097, 1500, 8000]
        args = make_case(40 + G, q_lens, kv_lens, N=32, K=8, H=128, G=G, S_cap=10, T_pad=7,
                         dtype=dtype)
        out = ragged_paged_attention(*args, backend="gpu")
        assert_close(out, ragged_paged_attention_reference(*args), GPU_TOL[dtype])

    @pytest.mark.parametrize("R,H,G", [(1, 64, 32), (4, 256, 128), (8, 128, 16)])
    def test_geometries_decode_split(self, R, H, G):
        self._decode_split_case(R, H, G, config=None)

    @pytest.mark.parametrize("cfg", [
        tuning.BlockConfig(q_tokens=4, block_k=128, num_splits=8, num_warps=4, num_stages=3,
                           heads_fastest=True, row_gather=True, mask_v_load=True),
        tuning.BlockConfig(q_tokens=16, block_k=64, num_splits=2, num_warps=8, num_stages=3,
                           heads_fastest=True, row_gather=True),
        # the default's flags with 64 splits (B=1 / 32k's count) on short contexts: most
        # splits of an item are empty and merge as nothing
        tuning.BlockConfig(q_tokens=4, block_k=64, num_splits=64, num_warps=4, num_stages=3,
                           heads_fastest=True, row_gather=True, mask_v_load=True,
                           items_in_kernel=True),
    ])
    def test_tiling_options(self, cfg):
        """The BlockConfig options the benchmark sweeps, compiled, on decode and mixed."""
        self._decode_split_case(4, 128, 16, config=cfg)
        q_lens = [1, 1, 64, 17, 1, 200]
        kv_lens = [15, 17, 64, 3000, 4097, 1500]
        args = make_case(60, q_lens, kv_lens, N=32, K=8, H=128, G=16, S_cap=8, T_pad=3,
                         dtype=jnp.bfloat16)
        out = ragged_paged_attention_gpu(*args, sm_scale=128 ** -0.5, config=cfg)
        assert_close(out, ragged_paged_attention_reference(*args), GPU_TOL[jnp.bfloat16])
        assert np.all(np.asarray(out, np.float32)[-3:] == 0), "padding rows must be zeros"

    def test_buffer_over_2_31_elements(self):
        """64-bit addressing: ONE bf16 buffer of 2**31 + 2**26 elements (4.1 GiB, random normals)
        holds a K window and a V window of 2048 pages each in its last 128 MiB, both wholly past
        element 2**31, as the engine passes its arena row (k_pages = v_pages = the buffer). An
        element offset kept in 32 bits would wrap and read far from those pages. Expected: the
        reference on compact copies of the two windows (the same host data, never read back
        from the big buffer). Runs the tuned row_gather kernel with relative page ids (both
        offsets past 2**17 pages), with absolute K page ids (k_page_offset=0), and the
        whole-page [P, G, K*H] view without row_gather."""
        if jax.devices()[0].memory_stats().get("bytes_limit", 0) < 24 << 30:
            pytest.skip("needs ~16 GiB of GPU memory")
        N, K, H, G = 32, 8, 128, 16
        page_elems = G * K * H                                # 2**14
        n = 2048                                              # pages per window
        base = 2 ** 31 // page_elems                          # first page past element 2**31
        q_lens = [1, 1, 64, 17, 1, 200]
        kv_lens = [15, 17, 64, 3000, 4097, 1500]
        need = sum(-(-length // G) for length in kv_lens)
        # k, v [n, G, K, H]: random, NaN in unowned pages and last-page tails (make_case)
        q, k, v, kl, table, cu, ns = make_case(70, q_lens, kv_lens, N=N, K=K, H=H, G=G, S_cap=8,
                                               T_pad=3, dtype=jnp.bfloat16, extra_pages=n - need)
        assert k.shape[0] == n
        fill = jax.jit(lambda key, kv: jnp.concatenate(
            [jax.random.normal(key, (base, G, K, H), jnp.bfloat16), kv]))
        buf = fill(jax.random.key(7), jnp.concatenate([k, v]))   # K window, then V window
        P_buf = buf.shape[0]
        assert buf.size > 2 ** 31 and base * page_elems >= 2 ** 31
        assert (P_buf - base) * page_elems * 2 <= 1 << 30         # the buffer's last GiB
        expected = ragged_paged_attention_reference(q, k, v, kl, table, cu, ns)
        try:
            out = ragged_paged_attention(q, buf, buf, kl, table, cu, ns, backend="gpu",
                                         k_page_offset=base, v_page_offset=base + n)
            assert_close(out, expected, GPU_TOL[jnp.bfloat16])
            absolute = jnp.where(table >= 0, table + base, table)    # -1 stays: clamped, masked
            out = ragged_paged_attention(q, buf, buf, kl, absolute, cu, ns, backend="gpu",
                                         k_page_offset=0, v_page_offset=n)
            assert_close(out, expected, GPU_TOL[jnp.bfloat16])
            cfg = tuning.BlockConfig(q_tokens=8, block_k=64, num_splits=2, num_warps=4,
                                     num_stages=2)
            out = ragged_paged_attention_gpu(q, buf, buf, kl, table, cu, ns, sm_scale=H ** -0.5,
                                             config=cfg, k_page_offset=base,
                                             v_page_offset=base + n)
            assert_close(out, expected, GPU_TOL[jnp.bfloat16])
        finally:
            buf.delete()

    def test_mla_page_offsets_v2_lite_shapes(self):
        """MLA at DeepSeek-V2-Lite's row (halves of 288, 512 value columns, 16 heads) compiled,
        both halves windows of one buffer, decode with KV splits and a mixed batch."""
        seed = fresh_seed("gpu mla offsets")
        for q_lens, kv_lens in (([1] * 4, [1, 700, 2049, 5000]), ([1, 33, 1, 200], [17, 600, 4096, 1200])):
            plain, one, k_off, v_off = windows_of_one_buffer(
                latent_case(seed, q_lens, kv_lens, N=16, half=288, G=16, S_cap=6, T_pad=2, dtype=jnp.bfloat16))
            kw = dict(latent_value_dim=512, sm_scale=192 ** -0.5)
            out = ragged_paged_attention(*one, backend="gpu", k_page_offset=k_off, v_page_offset=v_off, **kw)
            assert_close(out, ragged_paged_attention_reference(*plain, **kw), GPU_TOL[jnp.bfloat16])

    def _decode_split_case(self, R, H, G, config):
        args = make_case(50 + R, [1] * 4, [1, 700, 2049, 5000], N=4 * R, K=4, H=H, G=G,
                         dtype=jnp.bfloat16, table_fill="random")
        kw = dict(soft_cap=30.0, sliding_window=1000)
        if config is None:
            out = ragged_paged_attention(*args, backend="gpu", **kw)
        else:
            out = ragged_paged_attention_gpu(*args, sm_scale=H ** -0.5, config=config, **kw)
            kw["sm_scale"] = H ** -0.5
        assert_close(out, ragged_paged_attention_reference(*args, **kw), GPU_TOL[jnp.bfloat16])


def test_operand_size_rule():
    """validation.py's one rule: the GPU kernel takes a K/V operand of any size (64-bit offsets
    past 4 GiB) as long as its pool rows P * G fit int32; the TPU kernel stays capped at
    2**31 - 1 elements per operand. "auto" falls back to the reference, an explicit backend
    raises naming the limit."""
    from pallas_kernels.ragged_paged_attention.validation import (
        KERNEL_MAX_ROWS, TPU_MAX_OPERAND_ELEMS, kernel_supports, max_pages_for_kernel,
        validate_kernel_geometry)
    q = jax.ShapeDtypeStruct((8, 32, 128), jnp.bfloat16)
    page_elems = 16 * 8 * 128
    fits = max_pages_for_kernel(page_elems, "tpu")
    assert fits * page_elems <= TPU_MAX_OPERAND_ELEMS < (fits + 1) * page_elems
    assert max_pages_for_kernel(page_elems, "gpu") is None
    assert max_pages_for_kernel(page_elems, "reference") is None
    ok = jax.ShapeDtypeStruct((fits, 16, 8, 128), jnp.bfloat16)
    big = jax.ShapeDtypeStruct((4 * fits, 16, 8, 128), jnp.bfloat16)       # 16 GiB of bf16
    assert kernel_supports(q, ok, "tpu") and not kernel_supports(q, big, "tpu")
    assert kernel_supports(q, big, "gpu")
    validate_kernel_geometry(q, ok, "tpu")
    validate_kernel_geometry(q, big, "gpu")
    with pytest.raises(ValueError, match="at most 2147483647 elements per K/V pages operand"):
        validate_kernel_geometry(q, big, "tpu")
    q64 = jax.ShapeDtypeStruct((8, 2, 64), jnp.bfloat16)
    rows_over = jax.ShapeDtypeStruct((KERNEL_MAX_ROWS // 16 + 1, 16, 1, 64), jnp.bfloat16)
    assert not kernel_supports(q64, rows_over, "gpu")
    with pytest.raises(ValueError, match="at most 2147483647 pool rows P [*] G"):
        validate_kernel_geometry(q64, rows_over, "gpu")


def test_mla_decode_benchmark_runs_and_counts_the_latent_bytes():
    """The MLA decode rows of the attention benchmark at a toy shape on CPU (host timer)."""
    from pallas_kernels.ragged_paged_attention import bench
    rows = []
    bench.bench_mla_decode(rows, copy_gbps=100.0, shapes=[(2, 64)])
    assert [row["impl"] for row in rows] == ["reference", "reference_offsets"]     # one buffer + offsets
    for row in rows:
        assert row["section"] == "mla_decode"
        assert abs(row["GBps"] * row["us"] * 1e-6 - 2 * 64 * 576 * 2 / 1e9) < 1e-12


def test_mla_sweep_rows_on_cpu(capsys, monkeypatch):
    """The MLA kernel's tiling sweep at a toy shape in interpret mode: one row per tiling that
    runs (its block_k and num_splits in the note), a tiling that fails (as one too big for the
    GPU's shared memory would) printed and skipped."""
    from pallas_kernels.ragged_paged_attention import bench, mla_gpu
    real = mla_gpu.ragged_paged_mla_gpu

    def kernel(*args, block_k, **kw):
        if block_k == 24:
            raise ValueError("out of shared memory")
        return real(*args, block_k=block_k, **kw)

    monkeypatch.setattr(mla_gpu, "ragged_paged_mla_gpu", kernel)

    def one_call(f, *args):             # what is checked is the rows, not the timer
        jax.block_until_ready(f(*args))
        return 1e-3, "host"

    monkeypatch.setattr(bench, "_time", one_call)
    rows = []
    bench.sweep_mla(rows, copy_gbps=100.0, shapes=[(1, 32)], blocks=(16, 24), splits=(1, 2), interpret=True)
    assert [row["note"] for row in rows] == ["block_k=16 num_splits=1", "block_k=16 num_splits=2"]
    assert all(row["section"] == "mla_sweep" and row["impl"] == "ours_mla" for row in rows)
    assert "mla sweep failed 24" in capsys.readouterr().out
