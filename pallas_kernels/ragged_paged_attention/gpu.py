"""Ragged paged attention for CUDA GPUs: a Pallas kernel through the Triton lowering.

Why the Triton lowering (the one place the choice is made: `_compiler_params`): it is the
lowering we can make both correct and fast in the time we have. It runs under Pallas'
interpret mode on a CPU, so every test of this file runs without a GPU, and it lowers on
JAX 0.10 and 0.11 alike (deprecated in 0.11, still working). Decode attention is a
bandwidth problem: what matters is keeping enough independent page loads in flight, which
Triton's software pipeliner does for us (num_stages). Mosaic GPU (wgmma, TMA,
emit_pipeline) would buy tensor-core throughput for long prefill chunks, but it cannot be
interpreted on a CPU and paged (gathered) KV does not map onto TMA tiles without a
per-page descriptor; that is the next step if prefill becomes the bottleneck.
Measured on an H200 with JAX 0.11.2 (RESULTS.md): 0.96-1.81x JAX's Pallas GPU
`paged_attention` on decode, 25-65% of the copy ceiling at context >= 4k and batch >= 8
(the issue's targets, 2x and 70%, are not met yet; RESULTS.md says what limits it).

Layout and grid. The engine's pool [P, G, K, H] is viewed as [P, G, K*H] (a free reshape);
one program handles one work item (<= BQ query tokens of one sequence, see work.py), one KV
head, and one KV split: grid (W, K, num_splits). The R query heads that share the KV head
and the BQ tokens are packed into the rows of one tile (rows = BQ * R padded to a power of
two, at least 16 for tl.dot), so a decode batch of one sequence still fills the tile and
reads each K/V page once per KV head. The inner loop walks the item's key range in steps of
`block_k` keys (several pages gathered through the page table, or a slice of one page),
with an online softmax in float32. With num_splits > 1 each program covers an equal share
of its item's blocks and writes an unnormalised partial plus its log-sum-exp; the partials
are merged in jnp (flash-decoding). Key columns outside [kv_lo, kv_hi) are masked in the
scores and zeroed in V, so unused or freed pages (any bits, NaN included) never reach the
output; page ids are clamped into the pool so no read leaves it.

Padding rows of q (past cu_q_lens[num_seqs]) come back as zeros, as in the reference.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.ragged_paged_attention import tuning, work

_MASK = -1e30


def _compiler_params(cfg: tuning.BlockConfig):
    cls = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")
    return cls(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _kernel(items_ref, q_ref, k_ref, v_ref, pt_ref, o_ref, *lse_refs, sm_scale, soft_cap,
            sliding_window, R, Rp, BK, G, pages_per_seq, num_pages, num_splits, precision):
    # items_ref [8] int32; q_ref [M, H]; k_ref/v_ref [P, G, H] (one KV head's columns);
    # pt_ref [S * pages_per_seq + pad] int32; o_ref [M, H]; lse_ref [M]
    M, H = q_ref.shape
    sp = pl.program_id(2)
    seq = items_ref[work.SEQ]
    nq = items_ref[work.NQ]
    pos0 = items_ref[work.POS0]
    lo = items_ref[work.KV_LO]
    hi = items_ref[work.KV_HI]
    blk_lo = lo // BK
    blk_hi = (hi + BK - 1) // BK
    per = (blk_hi - blk_lo + num_splits - 1) // num_splits
    b0 = blk_lo + sp * per
    b1 = jnp.minimum(b0 + per, blk_hi)

    q = q_ref[...]
    r = jnp.arange(M, dtype=jnp.int32)
    tok = r // Rp
    row_ok = (tok < nq) & (r % Rp < R)
    pos_r = pos0 + tok
    table0 = seq * pages_per_seq

    def load_kv(b):
        if BK >= G:
            ppb = BK // G
            pages = pt_ref[pl.ds(table0 + b * ppb, ppb)]
            pages = jnp.minimum(jnp.maximum(pages, 0), num_pages - 1)
            k = k_ref[pages].reshape(BK, H)
            v = v_ref[pages].reshape(BK, H)
        else:
            page = pt_ref[table0 + (b * BK) // G]
            page = jnp.minimum(jnp.maximum(page, 0), num_pages - 1)
            off = pl.multiple_of((b * BK) % G, BK)
            k = k_ref[page, pl.ds(off, BK), :]
            v = v_ref[page, pl.ds(off, BK), :]
        return k, v

    def body(b, carry):
        m_prev, l_prev, acc_prev = carry
        k, v = load_kv(b)
        s = plgpu.dot(q, k, trans_b=True, precision=precision) * sm_scale      # [M, BK] f32
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        c = b * BK + jnp.arange(BK, dtype=jnp.int32)
        col_ok = (c >= lo) & (c < hi)
        mask = row_ok[:, None] & col_ok[None, :] & (c[None, :] <= pos_r[:, None])
        if sliding_window is not None:
            mask = mask & (c[None, :] > pos_r[:, None] - sliding_window)
        s = jnp.where(mask, s, _MASK)
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
        alpha = jnp.exp(m_prev - m_new)
        p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
        l_new = alpha * l_prev + jnp.sum(p, axis=1)
        v = jnp.where(col_ok[:, None], v, jnp.zeros_like(v))
        pv = plgpu.dot(p.astype(v.dtype), v, precision=precision)
        return m_new, l_new, alpha[:, None] * acc_prev + pv

    m0 = jnp.full((M,), _MASK, jnp.float32)
    l0 = jnp.zeros((M,), jnp.float32)
    acc0 = jnp.zeros((M, H), jnp.float32)
    m, l, acc = lax.fori_loop(b0, b1, body, (m0, l0, acc0))
    l_safe = jnp.where(l > 0, l, 1.0)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    if lse_refs:
        (lse_ref,) = lse_refs
        lse_ref[...] = jnp.where(l > 0, m + jnp.log(l_safe), _MASK)


@functools.partial(jax.jit, static_argnames=("sm_scale", "soft_cap", "sliding_window",
                                             "interpret", "config"))
def ragged_paged_attention_gpu(q_TNH, k_pages_PGKH, v_pages_PGKH, kv_lens_S, page_indices_SP,
                               cu_q_lens_S1, num_seqs, *, sm_scale, soft_cap=None,
                               sliding_window=None, interpret=False, config=None):
    """The GPU kernel; arguments as `ragged_paged_attention` (validated there).

    `config` (a tuning.BlockConfig) overrides the tuning table, for benchmarks and tests.
    """
    T, N, H = q_TNH.shape
    P, G, K, _ = k_pages_PGKH.shape
    S, pages_per_seq = page_indices_SP.shape
    R = N // K
    Rp = tuning.next_pow2(R)
    cfg = config or tuning.gpu_config(T=T, S=S, R=R, H=H, G=G, C=pages_per_seq * G, K=K,
                                      itemsize=k_pages_PGKH.dtype.itemsize)
    BQ, BK, NS = cfg.q_tokens, cfg.block_k, cfg.num_splits
    M = BQ * Rp
    q_WKMH, items_W8, first_S = work.pack_queries(q_TNH, K, Rp, kv_lens_S, cu_q_lens_S1, num_seqs,
                                                  q_tokens=BQ, sliding_window=sliding_window)
    W = items_W8.shape[0]
    k_PGQ = k_pages_PGKH.reshape(P, G, K * H)
    v_PGQ = v_pages_PGKH.reshape(P, G, K * H)
    pad = max(1, BK // G)
    table = jnp.pad(page_indices_SP.reshape(-1), (0, pad))
    precision = lax.Precision.HIGHEST if q_TNH.dtype == jnp.float32 else None

    kernel = functools.partial(
        _kernel, sm_scale=sm_scale, soft_cap=soft_cap, sliding_window=sliding_window, R=R,
        Rp=Rp, BK=BK, G=G, pages_per_seq=pages_per_seq, num_pages=P, num_splits=NS,
        precision=precision)
    o_dtype = q_TNH.dtype if NS == 1 else jnp.float32
    out_shape = [jax.ShapeDtypeStruct((NS, W, K, M, H), o_dtype)]
    out_specs = [pl.BlockSpec((None, None, None, M, H), lambda w, h, s: (s, w, h, 0, 0))]
    if NS > 1:
        out_shape.append(jax.ShapeDtypeStruct((NS, W, K, M), jnp.float32))
        out_specs.append(pl.BlockSpec((None, None, None, M), lambda w, h, s: (s, w, h, 0)))
    outs = pl.pallas_call(
        kernel,
        grid=(W, K, NS),
        in_specs=[
            pl.BlockSpec((None, work.ITEM_COLS), lambda w, h, s: (w, 0)),
            pl.BlockSpec((None, None, M, H), lambda w, h, s: (w, h, 0, 0)),
            pl.BlockSpec((P, G, H), lambda w, h, s: (0, 0, h)),
            pl.BlockSpec((P, G, H), lambda w, h, s: (0, 0, h)),
            pl.BlockSpec(table.shape, lambda w, h, s: (0,)),
        ],
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=interpret,
        compiler_params=_compiler_params(cfg),
        name=f"ragged_paged_attention_bq{BQ}_bk{BK}_ns{NS}",
    )(items_W8, q_WKMH, k_PGQ, v_PGQ, table)
    if NS == 1:
        o_WKMH = outs[0][0]
    else:
        o_SWKMH, lse_SWKM = outs
        mx = jnp.max(lse_SWKM, axis=0)
        wgt = jnp.exp(lse_SWKM - mx[None])
        o_WKMH = (jnp.sum(wgt[..., None] * o_SWKMH, axis=0)
                  / jnp.sum(wgt, axis=0)[..., None]).astype(q_TNH.dtype)
    o_WBKRH = o_WKMH.reshape(W, K, BQ, Rp, H)[:, :, :, :R].transpose(0, 2, 1, 3, 4)
    out_TKRH = work.scatter_outputs(o_WBKRH, first_S, cu_q_lens_S1, num_seqs, T=T)
    return out_TKRH.reshape(T, N, H)
