"""Prefill attention on Hopper (prefill_mgpu.py, backend="mgpu") and its benchmark rows
(bench.bench_prefill).

On this CPU: the benchmark's prefill rows at a toy shape through the reference and their FLOP
count; what the kernel does not take (`kernel_problem`, the seam's ValueError, the config's
checks); the block layout (`block_table`) and each compute warpgroup's page counts
(`warpgroup_pages`) against plain Python walks; that the kernel lowers for CUDA to one Mosaic GPU
custom call under each schedule; one ragged case run by Mosaic GPU's interpreter against the
reference (the one-warpgroup schedule; the interpreter runs the kernel's products as plain dots:
prefill_mgpu.py's docstring); and the chunked reference the GPU tests compare against. On a GPU
(`gpu`-marked, CROSSPOOL_TEST_ON_GPU=1, scripts/run_prefill_gpu.sh): the compiled kernel
against the reference on ragged prompts, prefix-cached chunks beside decode tokens under every
schedule, GQA 32/8, 32/4, 16/4 and 8/8, head dim 64 and pages of 128, page offsets.

Inputs are fresh random normals (never zeros), page tables shuffled; pages no sequence owns
and the slots of each last page past its kv_len are NaN, so any leak shows. Tolerance: bf16
2e-2 max abs error against the reference, as test_ragged_paged_attention.py argues (the
kernel rounds the probabilities to bf16 before the P.V product, both round the output).
"""
from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.ragged_paged_attention import (bench, prefill_mgpu, ragged_paged_attention,
                                                   ragged_paged_attention_reference)
from tests.pallas_kernels.test_ragged_paged_attention import assert_close, loop_attention, make_case

TOL = 2e-2


def _one_call(f, *args):
    """A stand-in for bench._time: what is checked is the rows, not the timer."""
    jax.block_until_ready(f(*args))
    return 1e-3, "host"


def test_causal_flop_counts_only_the_visible_pairs():
    # 3 queries at the end of 5 keys see 3, 4 and 5 keys; a full prefill of 4 sees 1+2+3+4
    assert bench.causal_pairs([3], [5]) == 3 + 4 + 5
    assert bench.causal_pairs([4, 1], [4, 7]) == 10 + 7
    assert bench.causal_flop([4], [4], n_heads=2, head_dim=8) == 4 * 2 * 8 * 10


def test_prefill_benchmark_rows_on_cpu(monkeypatch):
    """The prefill rows at a toy shape through the reference (1 and 2 sequences, GQA 4/2),
    each with its TFLOP/s of the visible pairs and its share of the matmul rate; the
    matmul rate row from a small dot."""
    monkeypatch.setattr(bench, "_time", _one_call)
    rows = []
    rate = bench.matmul_tflops(rows, n=64)
    assert rows[0]["section"] == "ceiling" and rows[0]["impl"] == "xla_dot"
    assert abs(rate - 2 * 64 ** 3 / 1e-3 / 1e12) < 1e-12
    bench.bench_prefill(rows, matmul_tflops=2.0, shapes=[(1, 40), (2, 24)], heads=((4, 2),),
                        G=16, backends=("reference",), head_dim=16)
    pre = [r for r in rows if r["section"] == "prefill"]
    assert len(pre) == 2 and all(r["impl"] == "reference" for r in pre)
    for r in pre:
        n, tokens = (1, 40) if r["shape"].startswith("1x40") else (2, 24)
        n_heads = int(r["shape"].split("N=")[1].split()[0])
        flop = 4 * n_heads * 16 * n * tokens * (tokens + 1) // 2
        assert abs(r["TFLOPs"] - flop / 1e-3 / 1e12) < 1e-9
        assert abs(r["frac_matmul"] - r["TFLOPs"] / 2.0) < 1e-12


def _shapes(T=8, N=4, K=2, H=128, G=64, dtype=jnp.bfloat16, P=4):
    return jax.ShapeDtypeStruct((T, N, H), dtype), jax.ShapeDtypeStruct((P, G, K, H), dtype)


@pytest.mark.parametrize("change,problem", [
    (dict(), None),
    (dict(H=64, G=128, dtype=jnp.float16), None),
    (dict(dtype=jnp.float32), "float32"),
    (dict(H=256), "head dim 256"),
    (dict(G=16), "page size 16"),
])
def test_kernel_problem_geometry(change, problem):
    got = prefill_mgpu.kernel_problem(*_shapes(**change))
    assert got == problem if problem is None else problem in got


@pytest.mark.parametrize("option,problem", [
    (dict(soft_cap=30.0), "soft caps"), (dict(sliding_window=128), "sliding windows"),
    (dict(sinks=jnp.zeros(4)), "attention sinks"), (dict(latent_value_dim=64), "MLA"),
])
def test_kernel_problem_options(option, problem):
    assert problem in prefill_mgpu.kernel_problem(*_shapes(), **option)


def test_explicit_mgpu_raises_on_what_it_does_not_take():
    args = make_case(0, [3], [70], N=4, K=2, H=128, G=64, dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="mgpu kernel does not take soft caps"):
        ragged_paged_attention(*args, backend="mgpu", soft_cap=20.0)
    args = make_case(0, [3], [70], N=4, K=2, H=128, G=16, dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="page size 16"):
        ragged_paged_attention(*args, backend="mgpu")
    with pytest.raises(ValueError, match="block_q"):
        prefill_mgpu.PrefillConfig(block_q=32)
    with pytest.raises(ValueError, match="compute_wgs"):
        prefill_mgpu.PrefillConfig(compute_wgs=2)


def test_mgpu_prefill_picks_the_kernel_for_the_prefill_shaped_calls_it_takes():
    """backend="mgpu_prefill" (the engine's opt-in): "mgpu" on a GPU for more query rows than
    sequence slots with options the kernel takes; "auto" for decode-shaped calls, the options
    and geometries it leaves to gpu.py, and off a GPU, where the call gives the reference's
    output."""
    from pallas_kernels.ragged_paged_attention import prefill_backend
    q, k = _shapes(T=128)
    table_S4 = jax.ShapeDtypeStruct((4, 8), jnp.int32)
    assert prefill_backend(q, k, table_S4, on_gpu=True) == "mgpu"
    assert prefill_backend(q, k, table_S4, on_gpu=False) == "auto"
    assert prefill_backend(*_shapes(T=4)[:1], k, table_S4, on_gpu=True) == "auto"     # decode: T <= S
    assert prefill_backend(q, k, table_S4, on_gpu=True, soft_cap=30.0) == "auto"
    assert prefill_backend(*_shapes(T=128, G=16), table_S4, on_gpu=True) == "auto"
    args = make_case(2, [3, 40], [70, 40], N=4, K=2, H=128, G=64, dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(ragged_paged_attention(*args, backend="mgpu_prefill")),
                                  np.asarray(ragged_paged_attention(*args, backend="reference")))


def test_block_table_against_a_python_walk():
    """Blocks of 4 rows over chunks of 1, 3, 4, 5 and 9 tokens (the last two at the end of longer
    contexts), one sequence past num_seqs and 2 padding rows; pages of 2 keys."""
    q_lens, kv_lens, bq, G, pps = [1, 3, 4, 5, 9, 2], [1, 3, 9, 12, 9, 4], 4, 2, 8
    ns = 5
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    T = int(cu[-1]) + 2
    meta, rows, out_rows = jax.jit(functools.partial(
        prefill_mgpu.block_table, T=T, G=G, block_q=bq, pages_per_seq=pps))(
        jnp.asarray(kv_lens, jnp.int32), jnp.asarray(cu), jnp.asarray([ns], jnp.int32))
    meta, rows, out_rows = np.asarray(meta), np.asarray(rows), np.asarray(out_rows)
    assert meta.shape == (prefill_mgpu.max_blocks(T, len(q_lens), bq), 4)
    want = []
    for s in range(ns):
        for start in range(0, q_lens[s], bq):
            pos0 = kv_lens[s] - q_lens[s] + start
            last = min(start + bq, q_lens[s]) - 1 + kv_lens[s] - q_lens[s]     # its last row's position
            want.append([s, pos0, kv_lens[s], -(-(last + 1) // G)])
    assert meta[:len(want)].tolist() == want
    assert (meta[len(want):, 3] == 0).all()                 # blocks past the last walk no page
    t = np.arange(int(cu[ns]))
    np.testing.assert_array_equal(rows[out_rows[t]], t)     # the output gather undoes the q gather
    assert (rows < T).all() and (rows >= 0).all()


@pytest.mark.parametrize("pos,kv_len,n_pages", [(0, 1, 1), (5, 300, 40), (64, 200, 4), (130, 131, 3),
                                                 (127, 2000, 3), (190, 200, 4)])
def test_warpgroup_pages_against_a_python_walk(pos, kv_len, n_pages):
    """A compute warpgroup's 64 rows from `pos`, pages of 64 keys: it walks the pages holding a
    key its last row sees (no more than the block's), and runs unmasked those whose keys every
    one of its rows sees."""
    bq, G = 64, 64
    last = min(pos + bq - 1, kv_len - 1)
    pages = min(n_pages, -(-(last + 1) // G))
    free = sum(1 for j in range(pages) if (j + 1) * G - 1 <= pos and (j + 1) * G <= kv_len)
    got = prefill_mgpu.warpgroup_pages(jnp.int32(pos), jnp.int32(kv_len), jnp.int32(n_pages), bq, G)
    assert [int(x) for x in got] == [pages, free]


def reference_by_chunks(args, rows=256):
    """The reference's output, computed for at most `rows` query rows of one sequence at a time
    (rows a..b of a chunk of q_len over kv_len are a chunk of b - a over kv_len - (q_len - b)),
    so its [T, C, K, H] gather stays small at prompts of thousands of tokens; padding rows 0."""
    q, k, v, kv_lens, table, cu, ns = args
    q, kv_lens, table, cu = (np.asarray(a) for a in (q, kv_lens, table, cu))
    ref = jax.jit(ragged_paged_attention_reference)
    out = np.zeros(q.shape, np.float32)
    for s in range(int(ns[0])):
        q_len = int(cu[s + 1] - cu[s])
        for a in range(0, q_len, rows):
            b = min(a + rows, q_len)
            chunk = np.zeros((rows, *q.shape[1:]), q.dtype)
            chunk[:b - a] = q[cu[s] + a:cu[s] + b]
            got = ref(chunk, k, v, np.asarray([kv_lens[s] - (q_len - b)], np.int32), table[s:s + 1],
                      np.asarray([0, b - a], np.int32), np.asarray([1], np.int32))
            out[cu[s] + a:cu[s] + b] = np.asarray(got[:b - a], np.float32)
    return out


def test_reference_by_chunks_is_the_reference():
    args = make_case(3, [5, 20], [30, 20], N=2, K=1, H=16, G=16, T_pad=2)      # chunks of 5, 16 + 4
    np.testing.assert_allclose(reference_by_chunks(args, rows=16), loop_attention(args),
                               atol=1e-5, rtol=0)


def _lowered_kernels(f, *args) -> list[str]:
    text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    return re.findall(r'custom_call @([\w$.]+)', text)


@pytest.mark.parametrize("H,G,cfg", [
    (128, 64, prefill_mgpu.PrefillConfig()),
    (64, 128, prefill_mgpu.PrefillConfig(block_q=128, num_slots=3)),
    (128, 64, prefill_mgpu.PrefillConfig(warp_specialized=True, compute_wgs=2)),
])
def test_kernel_lowers_for_cuda(H, G, cfg):
    """The whole Mosaic GPU lowering (TMA at page ids read from the table, wgmma, layouts, the
    producer / consumer barriers) runs in Python; the PTX compile happens on the device."""
    args = make_case(1, [5, 70, 1], [200, 70, 90], N=8, K=2, H=H, G=G, S_cap=4, T_pad=3,
                     dtype=jnp.bfloat16)
    f = functools.partial(prefill_mgpu.ragged_paged_attention_mgpu, sm_scale=0.1, config=cfg)
    assert _lowered_kernels(f, *args) == ["mosaic_gpu_v2"]


def _has_gpu_interpreter():
    try:
        prefill_mgpu.gpu_interpreter()
        return True
    except ValueError:
        return False


@pytest.mark.skipif(not _has_gpu_interpreter(), reason="this JAX has no Mosaic GPU interpreter")
def test_interpreted_kernel_matches_reference():
    """A ragged batch in Mosaic GPU's interpreter (2 query heads over 1 kv head): a chunk of 5
    at the end of 130 keys (3 pages), a whole prompt of 66 (two blocks of rows, two pages, the
    second partial); a free table slot, 3 padding rows; NaN in every page slot nobody owns."""
    args = make_case(1, [5, 66], [130, 66], N=2, K=1, H=64, G=64, S_cap=3, T_pad=3,
                     dtype=jnp.bfloat16)
    out = ragged_paged_attention(*args, sm_scale=0.1, backend="mgpu", interpret=True)
    assert_close(out, ragged_paged_attention_reference(*args, sm_scale=0.1), TOL)
    assert not np.asarray(out[-3:], np.float32).any()


def _has_gpu():
    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


# the default, the tilings the benchmark times (bench.PREFILL_MGPU_CONFIGS), one producer + one
# compute warpgroup; the warp-specialised ones last (a hang there leaves the others' results)
CONFIGS = sorted([prefill_mgpu.PrefillConfig(), *bench.PREFILL_MGPU_CONFIGS.values(),
                  prefill_mgpu.PrefillConfig(warp_specialized=True)], key=lambda c: c.warp_specialized)


@pytest.mark.gpu
@pytest.mark.skipif(not _has_gpu(), reason="needs a CUDA GPU")
class TestMgpuCompiled:
    """The compiled kernel on a Hopper GPU against the reference (scripts/run_prefill_gpu.sh)."""

    @pytest.mark.parametrize("N,K", [(32, 8), (32, 4), (8, 8)])
    def test_ragged_prefill(self, N, K):
        """Whole prompts whose lengths straddle pages and blocks, 2 padding rows."""
        lens = [1, 63, 64, 65, 300, 2048]
        args = make_case(60 + N + K, lens, lens, N=N, K=K, H=128, G=64, S_cap=8, T_pad=2,
                         dtype=jnp.bfloat16)
        out = ragged_paged_attention(*args, backend="mgpu")
        assert_close(out, reference_by_chunks(args), TOL)
        assert not np.asarray(out[-2:], np.float32).any()

    @pytest.mark.parametrize("H,G", [(64, 64), (128, 128)])
    def test_geometries_and_page_offsets(self, H, G):
        """Head dim 64 / page 128, and K and V as two windows of one buffer."""
        q_lens, kv_lens = [3, 130, 64], [300, 130, 700]
        q, k, v, *rest = make_case(80 + H + G, q_lens, kv_lens, N=16, K=4, H=H, G=G,
                                   dtype=jnp.bfloat16)
        buf = jnp.concatenate([k, v])
        out = ragged_paged_attention(q, buf, buf, *rest, backend="mgpu", k_page_offset=0,
                                     v_page_offset=k.shape[0])
        assert_close(out, reference_by_chunks((q, k, v, *rest)), TOL)

    @pytest.mark.parametrize("cfg", CONFIGS, ids=str)
    def test_chunks_at_the_end_of_cached_prefixes(self, cfg):
        """Prefill chunks after a cached prefix, mixed with decode tokens (random table fill),
        under each schedule and block size."""
        q_lens = [17, 1, 128, 200, 1, 64]
        kv_lens = [1000, 77, 640, 1500, 4097, 64]
        args = make_case(70 + cfg.rows, q_lens, kv_lens, N=32, K=8, H=128, G=64, T_pad=5,
                         dtype=jnp.bfloat16, table_fill="random")
        out = prefill_mgpu.ragged_paged_attention_mgpu(*args, sm_scale=128 ** -0.5, config=cfg)
        assert_close(out, reference_by_chunks(args), TOL)
