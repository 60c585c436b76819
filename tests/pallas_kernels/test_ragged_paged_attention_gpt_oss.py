"""GPT-OSS's attention options on the kernels: attention sinks (a learnt logit per head in every
softmax denominator) and a traced per-layer sliding window, on the GPU kernel (Pallas interpret
mode) and the TPU kernel (TPU interpret mode) against the reference, in mixed prefill + decode
batches with soft caps, page offsets and KV splits; the "auto" policy; a `gpu`-marked class at
GPT-OSS-20B's shapes; the benchmark rows' byte count. Inputs and NaN poison as
test_ragged_paged_attention.py's `make_case`, on a fresh seed per run (printed).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.ragged_paged_attention import (ragged_paged_attention,
                                                   ragged_paged_attention_reference, tuning)
from pallas_kernels.ragged_paged_attention.gpu import ragged_paged_attention_gpu
from tests.pallas_kernels.test_ragged_paged_attention import (DECODE, GPU_TOL, MIXED, TOL, _has_gpu,
                                                              assert_close, fresh_seed, loop_attention,
                                                              make_case, record_backends, windows_of_one_buffer)


def sink_values(seed, N):
    """Sinks per head from large negative (no effect) through O(1) to large positive (the sink
    takes most of the softmax mass), shuffled over the heads."""
    base = np.array([-30.0, -4.0, -0.5, 0.0, 0.7, 2.5, 6.0, 25.0])
    rng = np.random.default_rng(seed)
    vals = np.resize(base, N) + 0.1 * rng.standard_normal(N)
    return jnp.asarray(rng.permutation(vals), jnp.float32)


class TestKernelsInterpret:
    """gpu.py in interpret mode with GPT-OSS's options: sinks (one per query head, large and
    small), a traced window that cuts pages (G = 16, windows 5, 20, 37), soft caps, page
    offsets, KV splits, in mixed prefill + decode batches; against the reference. The TPU
    kernel (TPU interpret mode) on the same options."""

    @pytest.mark.parametrize("window,soft_cap,cfg", [
        (5, None, None),                                                       # tuned tiling
        (20, 4.0, tuning.BlockConfig(q_tokens=2, block_k=8, num_splits=3)),    # items by XLA, sub-page
        (37, None, tuning.BlockConfig(q_tokens=2, block_k=16, num_splits=4, heads_fastest=True,
                                      row_gather=True, mask_v_load=True, items_in_kernel=True)),
        (None, None, tuning.BlockConfig(q_tokens=8, block_k=32, num_splits=1, row_gather=True)),
    ])
    def test_mixed_batch_matches_reference(self, window, soft_cap, cfg):
        seed = fresh_seed("sinks+window")
        args = make_case(seed, *MIXED, N=8, K=2, H=64, G=16, S_cap=8, T_pad=3)
        sinks = sink_values(seed, 8)
        win = None if window is None else jnp.int32(window)
        kw = dict(sm_scale=0.15, soft_cap=soft_cap)
        if cfg is None:
            out = jax.jit(lambda w, s: ragged_paged_attention(*args, sliding_window=w, sinks=s, backend="gpu",
                                                              interpret=True, **kw))(win, sinks)
        else:
            out = ragged_paged_attention_gpu(*args, sliding_window=win, sinks=sinks, interpret=True, config=cfg, **kw)
        ref = ragged_paged_attention_reference(*args, sliding_window=window, sinks=sinks, **kw)
        assert_close(out, ref, TOL[jnp.float32])
        assert np.all(np.asarray(out)[-3:] == 0), "padding rows must be zeros"
        if window is not None:                 # the loop oracle: the window, not just the reference
            assert_close(out, loop_attention(args, sm_scale=0.15, soft_cap=soft_cap, sliding_window=window,
                                             sinks=np.asarray(sinks)), 5e-5)

    def test_decode_splits_bf16_and_sink_dominates(self):
        """Decode with the tuned KV splits (the sink joins split 0 only, merged once), bf16; a
        sink of 25 leaves almost no mass for the keys, a sink of -30 none for itself."""
        seed = fresh_seed("sinks decode")
        args = make_case(seed, *DECODE, N=8, K=2, H=64, G=16, S_cap=6, dtype=jnp.bfloat16)
        assert tuning.gpu_config(T=5, S=6, R=4, H=64, G=16, C=args[4].shape[1] * 16, K=2).num_splits > 1
        sinks = sink_values(seed, 8)
        out = ragged_paged_attention(*args, sinks=sinks, sliding_window=jnp.int32(300), backend="gpu",
                                     interpret=True)
        ref = ragged_paged_attention_reference(*args, sinks=sinks, sliding_window=300)
        assert_close(out, ref, TOL[jnp.bfloat16])
        big = int(np.argmax(np.asarray(sinks)))
        assert float(jnp.max(jnp.abs(ref[:, big].astype(jnp.float32)))) < 1e-3, "sink 25 should dominate"

    def test_traced_window_per_layer_in_a_scan(self):
        """GPT-OSS's alternation: one compiled kernel in a layer scan, windows [9, full]."""
        seed = fresh_seed("scan windows")
        args = make_case(seed, *MIXED, N=4, K=1, H=64, G=16, S_cap=7)
        windows = jnp.asarray([9, 1 << 30], jnp.int32)
        sinks_LN = jnp.stack([sink_values(seed, 4), sink_values(seed + 1, 4)])

        def layer(carry, xs):
            w, s = xs
            return carry, ragged_paged_attention(*args, sliding_window=w, sinks=s, backend="gpu", interpret=True)

        _, outs = jax.jit(lambda ws, ss: jax.lax.scan(layer, 0, (ws, ss)))(windows, sinks_LN)
        for l, window in enumerate((9, None)):
            ref = ragged_paged_attention_reference(*args, sliding_window=window, sinks=sinks_LN[l])
            assert_close(outs[l], ref, TOL[jnp.float32])

    def test_page_offsets_one_buffer(self):
        """Sinks and a traced window over K and V as two windows of one NaN-padded buffer."""
        seed = fresh_seed("sinks offsets")
        plain, one, k_off, v_off = windows_of_one_buffer(
            make_case(seed, *MIXED, N=8, K=2, H=64, G=16, S_cap=6))
        sinks = sink_values(seed, 8)
        out = ragged_paged_attention(*one, sinks=sinks, sliding_window=jnp.int32(20), backend="gpu",
                                     interpret=True, k_page_offset=k_off, v_page_offset=v_off)
        assert_close(out, ragged_paged_attention_reference(*plain, sinks=sinks, sliding_window=20),
                     TOL[jnp.float32])

    @pytest.mark.parametrize("dtype,window", [(jnp.float32, 20), (jnp.bfloat16, 5)])
    def test_tpu_kernel_interpret(self, dtype, window):
        """The TPU kernel (TPU interpret mode) with sinks and a traced window, K and V as two
        windows of one buffer, a mixed batch."""
        seed = fresh_seed("tpu sinks")
        plain, one, k_off, v_off = windows_of_one_buffer(
            make_case(seed, *MIXED, N=8, K=2, H=128, G=16, S_cap=8, T_pad=2, dtype=dtype))
        sinks = sink_values(seed, 8)
        out = jax.jit(lambda w: ragged_paged_attention(*one, sinks=sinks, sliding_window=w, backend="tpu",
                                                       interpret=True, k_page_offset=k_off,
                                                       v_page_offset=v_off))(jnp.int32(window))
        assert_close(out, ragged_paged_attention_reference(*plain, sinks=sinks, sliding_window=window), TOL[dtype])
        assert np.all(np.asarray(out, np.float32)[-2:] == 0)

    def test_auto_policy(self, monkeypatch):
        """On a GPU "auto" runs sinks (from 2 query tokens; one token on the reference) and a
        traced window (as a static one) on the kernel."""
        import pallas_kernels.ragged_paged_attention as rpa
        from pallas_kernels.ragged_paged_attention import gpu
        calls = record_backends(monkeypatch, "gpu", [(gpu, "ragged_paged_attention_gpu")])
        args = make_case(25, *DECODE, N=4, K=2, H=64)
        rpa.ragged_paged_attention(*args, sinks=jnp.zeros(4))
        rpa.ragged_paged_attention(*args, sliding_window=jnp.int32(4))
        rpa.ragged_paged_attention(*make_case(26, *DECODE, N=4, K=2, H=48), sinks=jnp.zeros(4))  # no kernel head dim
        rpa.ragged_paged_attention(*make_case(28, [1], [300], N=4, K=2, H=64), sinks=jnp.zeros(4))  # one token
        assert calls == ["gpu", "gpu", "reference", "reference"]

    def test_auto_on_a_tpu_keeps_sinks_on_the_reference(self, monkeypatch):
        """The TPU kernel's sinks are interpret-tested only: "auto" on a TPU runs them on the reference."""
        import pallas_kernels.ragged_paged_attention as rpa
        calls = record_backends(monkeypatch, "tpu")
        rpa.ragged_paged_attention(*make_case(27, *DECODE, N=4, K=2, H=64), sinks=jnp.zeros(4))
        assert calls == ["reference"]


@pytest.mark.gpu
@pytest.mark.skipif(not _has_gpu(), reason="needs a CUDA GPU")
class TestGpuKernelCompiled:
    """The compiled Triton kernel with sinks and a traced window (scripts/run_gpu_checks.sh)."""

    @pytest.mark.parametrize("G", [16, 64])
    def test_gpt_oss_shapes(self, G):
        """GPT-OSS-20B's attention (64 query heads over 8 KV heads, head dim 64) compiled, bf16:
        sinks large and small, windows 128 (cutting pages) and full as traced values of one
        jitted call, page offsets into one buffer, long and short contexts, mixed batch."""
        seed = fresh_seed("gpu sinks")
        q_lens = [1, 1, 1, 64, 17, 1, 200, 1]
        kv_lens = [1, G - 1, G + 1, 64, 3000, 4097, 1500, 8000]
        plain, one, k_off, v_off = windows_of_one_buffer(
            make_case(seed, q_lens, kv_lens, N=64, K=8, H=64, G=G, S_cap=10, T_pad=7, dtype=jnp.bfloat16))
        sinks = sink_values(seed, 64)
        run = jax.jit(lambda w: ragged_paged_attention(*one, sinks=sinks, sliding_window=w, backend="gpu",
                                                       k_page_offset=k_off, v_page_offset=v_off))
        for window in (128, None):
            out = run(jnp.int32(1 << 30 if window is None else window))
            ref = ragged_paged_attention_reference(*plain, sinks=sinks, sliding_window=window)
            assert_close(out, ref, GPU_TOL[jnp.bfloat16])


def test_gpt_oss_attention_benchmark_runs_and_counts_the_window():
    """The GPT-OSS rows at a toy mixed shape on CPU (host timer): a windowed query reads its last
    128 keys (a chunk of 3 tokens: 130), a full one its context."""
    from pallas_kernels.ragged_paged_attention import bench
    rows = []
    bench.bench_gpt_oss(rows, copy_gbps=100.0, shapes=[(2, 300, 1, 3, 100)])
    assert [(row["section"], row["impl"]) for row in rows] == [("gpt_oss_attn", "reference")] * 2
    keys = {128: 2 * 128 + 100, None: 2 * 300 + 100}
    for row, window in zip(rows, (128, None)):
        assert abs(row["GBps"] * row["us"] * 1e-6 - keys[window] * 2 * 8 * 64 * 2 / 1e9) < 1e-12
