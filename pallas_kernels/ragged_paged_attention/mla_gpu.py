"""MLA's absorbed attention over the paged pool on CUDA GPUs: a Pallas kernel through the
Triton lowering (the same lowering and conventions as gpu.py), for
`ragged_paged_attention(..., latent_value_dim=R, backend="gpu")`.

What it computes (reference.py's `latent_value_dim`): every token's cached row (latent |
rope key, 2 * Hh values) is split in two halves, the first in k_pages and the second in
v_pages ([P, G, 1, Hh] each); a query row of 2 * Hh values scores against the whole row, and
the values are the row's first R entries; out [T, N, R].

Layout and grid. One program per query token and KV split (grid (T, num_splits)): its N
query heads are the tile's rows (padded to a power of two, at least 16 for tl.dot), so every
key row is read once for all heads; a prefill chunk's tokens each walk their own causal range
(decode is the case it is built for). With num_splits > 1 (the default gives few tokens more
splits: `default_splits`) each program covers an equal share of its token's key blocks and
writes an unnormalised partial and its log-sum-exp, merged in jnp (flash-decoding, as gpu.py). The pool is viewed [P * G, Hh] (free reshapes) and each block of `block_k`
keys is gathered by pool row through the page table. Triton tiles have power-of-two sides
and Hh (288 for DeepSeek-V2-Lite) is not one, so the row is read as a few column pieces of
power-of-two widths (`column_pieces`: 256 + 32 of the K half, 128 + 64 + 32 + 64 of the V
half for V2-Lite), cut where the values end (column R): the scores sum one dot per piece,
the value pieces each keep their own accumulator, and the output is written piece by piece.
Online softmax in float32; key columns outside the token's range are masked in the scores
and zeroed by the loads, so freed pages (NaN included) never reach the output; page ids and
table slots are clamped. Padding rows of q (past cu_q_lens[num_seqs]) come back as zeros.

Page offsets (static, as gpu.py): page id p's K half is pool page p + k_page_offset, its V half
p + v_page_offset, so k_pages and v_pages may be one buffer (the crosspool split passes its
whole arena row); page ids are clamped into [0, P - 1 - max offset] before the offsets are
added, so every read stays in the buffer.

Not yet: a tile of several tokens for prefill chunks, attention sinks and a traced window,
a tuning table (its block size and split count are constants; RESULTS.md has its decode
numbers at DeepSeek-V2-Lite's shapes and what "auto" takes from them).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.pow2 import next_pow2, prev_pow2

_MASK = -1e30
BLOCK_K, NUM_WARPS, NUM_STAGES = 32, 4, 2
TARGET_PROGRAMS, MAX_SPLITS = 256, 16


def default_splits(T: int) -> int:
    """KV splits per token: enough programs to fill a GPU (about TARGET_PROGRAMS) when few
    tokens decode, 1 once T alone gives that many."""
    return max(1, min(MAX_SPLITS, prev_pow2(max(1, TARGET_PROGRAMS // max(T, 1)))))


def column_pieces(half: int, value_dim: int) -> tuple:
    """The cached row's columns [0, 2 * half) as (buffer 0 = K / 1 = V, column in that buffer,
    width, column in the row) pieces of power-of-two widths, none crossing value_dim."""
    cuts = sorted({0, half, min(value_dim, 2 * half), 2 * half})
    pieces = []
    for lo, hi in zip(cuts, cuts[1:]):
        x = lo
        while x < hi:
            w = prev_pow2(hi - x)
            pieces.append((int(x >= half), x - half * int(x >= half), w, x))
            x += w
    return tuple(pieces)


def kernel_problem(half: int, value_dim: int):
    """Why the kernel cannot take this row (None: it can): tl.dot needs pieces >= 16 wide."""
    narrow = [w for _, _, w, _ in column_pieces(half, value_dim) if w < 16]
    if narrow:
        return (f"the cached row's halves of {half} with {value_dim} value columns leave column pieces "
                f"narrower than 16 ({narrow}); tl.dot needs 16")
    return None


def _cols(start, width):
    return start + jnp.arange(width, dtype=jnp.int32)


def _kernel(cu_ref, kvl_ref, ns_ref, q_ref, k_ref, v_ref, pt_ref, o_ref, *lse_refs, sm_scale, sliding_window,
            N, M, BK, G, pages_per_seq, table_len, num_pages, pieces, value_dim, precision, num_splits, out_rows,
            k_page_offset, v_page_offset):
    # cu_ref [S + 1], kvl_ref [S], ns_ref [1] int32; q_ref [T * N, 2 * Hh] (heads of a token
    # adjacent); k_ref / v_ref [P * G, Hh] (one pool row per key); pt_ref [S * pages_per_seq];
    # o_ref [NS * out_rows, value_dim] and, with splits, lse_ref [NS * out_rows]: per split,
    # q's rows then M scratch rows that masked-off tile rows point at.
    t = pl.program_id(0)
    sp = pl.program_id(1)
    T = q_ref.shape[0] // N
    S = kvl_ref.shape[0]
    s = jnp.arange(next_pow2(S), dtype=jnp.int32)
    n = jnp.minimum(ns_ref[0], S)
    ends = cu_ref[jnp.minimum(s + 1, S)]
    seq = jnp.minimum(jnp.sum(((s < n) & (ends <= t)).astype(jnp.int32)), S - 1)
    valid = t < cu_ref[n]
    q_len = cu_ref[seq + 1] - cu_ref[seq]
    pos = kvl_ref[seq] - q_len + (t - cu_ref[seq])          # the token's position in its context
    hi = jnp.where(valid, pos + 1, 0)
    lo = jnp.zeros_like(hi) if sliding_window is None else jnp.maximum(0, pos - sliding_window + 1)
    lo = jnp.minimum(lo, hi)

    r = jnp.arange(M, dtype=jnp.int32)
    row_ok = (r < N) & valid
    q_rows = jnp.minimum(t, T - 1) * N + jnp.minimum(r, N - 1)
    qs = [plgpu.load(q_ref.at[q_rows[:, None], _cols(g, w)[None, :]]) for _, _, w, g in pieces]
    table0 = seq * pages_per_seq
    # page ids clamped so that id + either offset stays in the buffer (gpu.py's rule); each
    # buffer's offset is a constant added to its pool rows
    max_page = num_pages - 1 - max(k_page_offset, v_page_offset)
    row_shift = (k_page_offset * G, v_page_offset * G)

    def body(b, carry):
        m_prev, l_prev, accs = carry
        c = b * BK + jnp.arange(BK, dtype=jnp.int32)
        col_ok = (c >= lo) & (c < hi)
        slots = jnp.minimum(table0 + c // G, table_len - 1)
        pages = jnp.minimum(jnp.maximum(pt_ref[slots], 0), max_page)
        rows = pages * G + c % G                             # < P * G: int32 (validation.py)
        rows_kv = tuple(rows + shift if shift else rows for shift in row_shift)
        kvs = [plgpu.load((k_ref, v_ref)[buf].at[rows_kv[buf][:, None], _cols(col, w)[None, :]],
                          mask=jnp.broadcast_to(col_ok[:, None], (BK, w)), other=0.0)
               for buf, col, w, _ in pieces]
        sc = sum(plgpu.dot(q, kv, trans_b=True, precision=precision) for q, kv in zip(qs, kvs)) * sm_scale
        mask = row_ok[:, None] & col_ok[None, :]
        sc = jnp.where(mask, sc, _MASK)
        m_new = jnp.maximum(m_prev, jnp.max(sc, axis=1))
        alpha = jnp.exp(m_prev - m_new)
        p = jnp.where(mask, jnp.exp(sc - m_new[:, None]), 0.0)
        l_new = alpha * l_prev + jnp.sum(p, axis=1)
        values = [kv for kv, (_, _, _, g) in zip(kvs, pieces) if g < value_dim]
        accs = tuple(alpha[:, None] * acc + plgpu.dot(p.astype(kv.dtype), kv, precision=precision)
                     for acc, kv in zip(accs, values))
        return m_new, l_new, accs

    value_pieces = [(w, g) for _, _, w, g in pieces if g < value_dim]
    m0 = jnp.full((M,), _MASK, jnp.float32)
    l0 = jnp.zeros((M,), jnp.float32)
    acc0 = tuple(jnp.zeros((M, w), jnp.float32) for w, _ in value_pieces)
    blk_lo, blk_hi = lo // BK, (hi + BK - 1) // BK
    per = (blk_hi - blk_lo + num_splits - 1) // num_splits
    b0 = blk_lo + sp * per
    m, l, accs = lax.fori_loop(b0, jnp.minimum(b0 + per, blk_hi), body, (m0, l0, acc0))
    l_safe = jnp.where(l > 0, l, 1.0)
    o_rows = sp * out_rows + jnp.where(row_ok, q_rows, T * N + r)      # masked rows: distinct scratch rows
    for acc, (w, g) in zip(accs, value_pieces):
        plgpu.store(o_ref.at[o_rows[:, None], _cols(g, w)[None, :]], (acc / l_safe[:, None]).astype(o_ref.dtype),
                    mask=jnp.broadcast_to(row_ok[:, None], (M, w)))
    if lse_refs:
        (lse_ref,) = lse_refs
        plgpu.store(lse_ref.at[o_rows], jnp.where(l > 0, m + jnp.log(l_safe), _MASK), mask=row_ok)


def _whole(shape):
    nd = len(shape)
    return pl.BlockSpec(shape, lambda *_: (0,) * nd)


@functools.partial(jax.jit, static_argnames=("latent_value_dim", "sm_scale", "sliding_window", "interpret",
                                             "block_k", "num_splits", "k_page_offset", "v_page_offset"))
def ragged_paged_mla_gpu(q_TNH, k_pages_PG1H, v_pages_PG1H, kv_lens_S, page_indices_SP, cu_q_lens_S1, num_seqs, *,
                         latent_value_dim, sm_scale, sliding_window=None, interpret=False, block_k=BLOCK_K,
                         num_splits=None, k_page_offset=0, v_page_offset=0):
    """The kernel; arguments as `ragged_paged_attention(..., latent_value_dim=)` (validated
    there: one KV head, q's head dim twice the pages'). -> [T, N, latent_value_dim].
    num_splits: KV splits per token (None: `default_splits(T)`). k_page_offset / v_page_offset
    (static): page id p's row halves are k_pages[p + k_page_offset] and v_pages[p +
    v_page_offset], so both may be one buffer (the crosspool arena row)."""
    T, N, H2 = q_TNH.shape
    P, G, _, Hh = k_pages_PG1H.shape
    S, pages_per_seq = page_indices_SP.shape
    M = max(16, next_pow2(N))
    pieces = column_pieces(Hh, latent_value_dim)
    table = page_indices_SP.reshape(-1)
    precision = lax.Precision.HIGHEST if q_TNH.dtype == jnp.float32 else None
    out_rows = T * N + M
    NS = default_splits(T) if num_splits is None else int(num_splits)
    kernel = functools.partial(
        _kernel, sm_scale=sm_scale, sliding_window=sliding_window, N=N, M=M, BK=block_k, G=G,
        pages_per_seq=pages_per_seq, table_len=table.shape[0], num_pages=P, pieces=pieces,
        value_dim=latent_value_dim, precision=precision, num_splits=NS, out_rows=out_rows,
        k_page_offset=int(k_page_offset), v_page_offset=int(v_page_offset))
    args = (cu_q_lens_S1, kv_lens_S, jnp.reshape(num_seqs, (1,)).astype(jnp.int32), q_TNH.reshape(T * N, H2),
            k_pages_PG1H.reshape(P * G, Hh), v_pages_PG1H.reshape(P * G, Hh), table)
    cls = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")
    o_dtype = q_TNH.dtype if NS == 1 else jnp.float32
    out_shape = [jax.ShapeDtypeStruct((NS * out_rows, latent_value_dim), o_dtype)]
    if NS > 1:
        out_shape.append(jax.ShapeDtypeStruct((NS * out_rows,), jnp.float32))
    outs = pl.pallas_call(
        kernel,
        grid=(T, NS),
        in_specs=[_whole(a.shape) for a in args],
        out_specs=[_whole(o.shape) for o in out_shape],
        out_shape=out_shape,
        interpret=interpret,
        compiler_params=cls(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
        name=f"ragged_paged_mla_bk{block_k}_ns{NS}",
    )(*args)
    if NS == 1:
        o_RV = outs[0][:T * N]
    else:                        # merge the splits' partials by their log-sum-exps
        o_SRV = outs[0].reshape(NS, out_rows, latent_value_dim)[:, :T * N]
        lse_SR = outs[1].reshape(NS, out_rows)[:, :T * N]
        wgt = jnp.exp(lse_SR - jnp.max(lse_SR, axis=0)[None])
        o_RV = jnp.sum(wgt[..., None] * o_SRV, axis=0) / jnp.sum(wgt, axis=0)[..., None]
    n = jnp.reshape(num_seqs, ()).astype(jnp.int32)
    valid_T = jnp.arange(T, dtype=jnp.int32) < cu_q_lens_S1[n]
    o = o_RV.reshape(T, N, latent_value_dim)
    return jnp.where(valid_T[:, None, None], o, jnp.zeros_like(o)).astype(q_TNH.dtype)
