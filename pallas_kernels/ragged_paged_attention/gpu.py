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
Its decode speed against JAX's Pallas GPU `paged_attention` and the copy ceiling (the HBM
read limit) is in RESULTS.md.

Layout and grid. The engine's pool [P, G, K, H] is viewed as [P * G, K * H] rows (or, without
`row_gather`, [P, G, K * H]; free reshapes); one program handles one work item (<= BQ query
tokens of one sequence, see work.py), one KV head and one KV split: grid (K, W, num_splits)
with `heads_fastest` (the KV heads of an item launched together), else (W, K, num_splits).
With `items_in_kernel` each program derives its item from cu_q_lens / kv_lens (a cumsum over
the sequences); otherwise XLA builds the item table first (work.build_items). The R query
heads that share the KV head and the BQ tokens are the rows of one tile (rows = BQ * R
padded to a power of two, at least 16 for tl.dot), gathered straight from q [T * N, H], so a
decode batch of one sequence still fills the tile and reads each K/V row once per KV head.
The inner loop walks the item's key range in steps of `block_k` keys, each key's pool row
found through the page table, with an online softmax in float32. With num_splits > 1 each
program covers an equal share of its item's blocks and writes an unnormalised partial plus
its log-sum-exp; the partials are merged in jnp (flash-decoding), one fused XLA op (merging
them inside the kernel, through an atomic counter per item, and as one variadic reduction
were both measured slower and removed: RESULTS.md). Outputs are stored to
their (token, head) rows of [T * N, H] by a masked row scatter (masked rows point at scratch
rows past the end, so no two lanes share an address). Key columns outside [kv_lo, kv_hi) are
masked in the scores and zeroed in V (`mask_v_load`: by the load itself), so unused or freed
pages (any bits, NaN included) never reach the output; page ids are clamped into the pool
and page-table slots into the table, so no read leaves either.

Sliding window and sinks (GPT-OSS). The window is an int32 operand (static or traced: one
compiled kernel serves a layer scan that alternates windowed and full layers); each item's key
range starts at its first token's window start, so blocks wholly before the window are never
loaded, and each row masks the keys its own window leaves out (a window may cut a page or a
block anywhere). Sinks [N] (float32 operand): a learnt logit per query head in every softmax
denominator, attending to nothing. Split 0 of each item starts its online softmax from the
row's sink (max = sink, sum = 1, no value), so the sink enters each row's denominator exactly
once, also through the log-sum-exp merge of the splits.

Page offsets (static): page id p's K is pool page p + k_page_offset, its V p + v_page_offset,
so k_pages and v_pages may be one buffer (the engine's whole arena row) holding both. The
kernel clamps p into [0, P - 1 - max offset] and adds each offset (times G in pool rows) as a
constant, so every read stays in the buffer and the default (0, 0) adds nothing.

Addressing (validation.py states the rule): the operand may be any size. The Triton lowering
computes load offsets (row * K*H + column) in 64-bit for operands over 4 GiB; the kernel's own
int32 index math never scales a K/V index by K*H or H: its largest value is a pool row
page * G + key < P * G, which validation.py keeps under 2**31 (256 GiB of bf16 at K*H = 64).

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


def _store_rows(ref, rows, val, mask):
    """ref[rows] = val where mask: a row scatter, masked rows not written. Indexed by int
    arrays on every axis (the form Pallas' interpret mode can discharge)."""
    if val.ndim == 2:
        cols = jnp.arange(val.shape[1], dtype=jnp.int32)
        plgpu.store(ref.at[rows[:, None], cols[None, :]], val,
                    mask=jnp.broadcast_to(mask, val.shape))
    else:
        plgpu.store(ref.at[rows], val, mask=mask)


def _item_in_kernel(w, cu_ref, kvl_ref, ns_ref, *, BQ, window):
    """Work item w's (seq, t0, nq, pos0, kv_lo, kv_hi), as work.build_items computes them,
    from cu_q_lens [S + 1], kv_lens [S] and num_seqs [1]: a cumsum over the S sequences
    (window: the sliding window's int32 value, or None)."""
    S = kvl_ref.shape[0]
    s = jnp.arange(tuning.next_pow2(S), dtype=jnp.int32)
    n = jnp.minimum(ns_ref[0], S)
    q_len = jnp.where(s < n, cu_ref[jnp.minimum(s + 1, S)] - cu_ref[jnp.minimum(s, S)], 0)
    items = (q_len + BQ - 1) // BQ
    end = jnp.cumsum(items)
    valid = w < jnp.sum(items)
    seq = jnp.minimum(jnp.sum((end <= w).astype(jnp.int32)), S - 1)
    at_seq = s == seq
    first = jnp.sum(jnp.where(at_seq, end - items, 0))
    q_len_w = jnp.sum(jnp.where(at_seq, q_len, 0))
    qoff = (w - first) * BQ
    nq = jnp.where(valid, jnp.minimum(BQ, q_len_w - qoff), 0)
    t0 = jnp.where(valid, cu_ref[seq] + qoff, 0)
    pos0 = kvl_ref[seq] - q_len_w + qoff
    hi = jnp.where(valid, pos0 + nq, 0)
    if window is None:
        lo = jnp.zeros_like(hi)
    else:
        lo = jnp.where(valid, jnp.maximum(0, pos0 - window + 1), 0)
    return seq, t0, nq, pos0, jnp.minimum(lo, hi), hi


def _shift(x, n: int):
    """x + n for a static n, nothing added when n == 0."""
    return x + n if n else x


def _kernel(*refs, sm_scale, soft_cap, has_window, has_sinks, R, Rp, M, BQ, BK, G, N,
            pages_per_seq, table_len, num_pages, num_splits, out_rows, heads_fastest, row_gather,
            mask_v_load, items_in_kernel, precision, k_page_offset, v_page_offset):
    # items_ref [8] int32 or, items_in_kernel, cu_q_lens [S + 1], kv_lens [S], num_seqs [1];
    # q_ref [T * N, H] (the caller's q, heads of a token adjacent);
    # k_ref/v_ref [P, G, H] or, row_gather, [P * G, H] (one KV head's columns);
    # pt_ref [S * pages_per_seq] int32;
    # has_window: win_ref [1] int32 (the sliding window); has_sinks: sinks_ref [N] float32;
    # o_ref [NS * out_rows, H] and lse_ref [NS * out_rows]: rows in q's order, split-major,
    # each split's block padded by M scratch rows that masked-off tile rows point at.
    n_item_refs = 3 if items_in_kernel else 1
    q_ref, k_ref, v_ref, pt_ref, *rest = refs[n_item_refs:]
    win_ref = rest.pop(0) if has_window else None
    sinks_ref = rest.pop(0) if has_sinks else None
    o_ref, *lse_refs = rest
    H = q_ref.shape[1]
    h = pl.program_id(0) if heads_fastest else pl.program_id(1)
    sp = pl.program_id(2)
    window = win_ref[0] if has_window else None
    if items_in_kernel:
        w = pl.program_id(1) if heads_fastest else pl.program_id(0)
        seq, t0, nq, pos0, lo, hi = _item_in_kernel(w, *refs[:3], BQ=BQ, window=window)
    else:
        items_ref = refs[0]
        seq = items_ref[work.SEQ]
        t0 = items_ref[work.T0]
        nq = items_ref[work.NQ]
        pos0 = items_ref[work.POS0]
        lo = items_ref[work.KV_LO]
        hi = items_ref[work.KV_HI]
    blk_lo = lo // BK
    blk_hi = (hi + BK - 1) // BK
    per = (blk_hi - blk_lo + num_splits - 1) // num_splits
    b0 = blk_lo + sp * per
    b1 = jnp.minimum(b0 + per, blk_hi)

    # tile row r = (token tok of the item, query head rr of KV head h)
    r = jnp.arange(M, dtype=jnp.int32)
    tok = r // Rp
    rr = r % Rp
    row_ok = (tok < nq) & (rr < R)
    q_rows = jnp.minimum(t0 + tok, q_ref.shape[0] // N - 1) * N + h * R + jnp.minimum(rr, R - 1)
    q = q_ref[q_rows]                                                     # [M, H]
    pos_r = pos0 + tok
    table0 = seq * pages_per_seq
    # page ids clamped so that id + either offset stays inside the buffer (no overflow: the
    # clamp comes before the constant offset is added)
    max_page = num_pages - 1 - max(k_page_offset, v_page_offset)

    def load_kv(b):
        # -> K [BK, H] and V [BK, H] of keys [b * BK, (b + 1) * BK); V columns outside
        # [lo, hi) zeroed (a freed page may hold NaN, and 0 * NaN is NaN)
        c = b * BK + jnp.arange(BK, dtype=jnp.int32)
        if row_gather:           # k_ref/v_ref [P * G, H]: one pool row per key
            slots = jnp.minimum(table0 + c // G, table_len - 1)
            pages = jnp.minimum(jnp.maximum(pt_ref[slots], 0), max_page)
            rows = pages * G + c % G                      # < P * G: int32 (validation.py)
            k_rows = _shift(rows, k_page_offset * G)
            v_rows = _shift(rows, v_page_offset * G)
            k = k_ref[k_rows]
            if mask_v_load:
                col_ok = (c >= lo) & (c < hi)
                cols = jnp.arange(H, dtype=jnp.int32)
                v = plgpu.load(v_ref.at[v_rows[:, None], cols[None, :]],
                               mask=jnp.broadcast_to(col_ok[:, None], (BK, H)), other=0.0)
                return k, v
            v = v_ref[v_rows]
        elif BK >= G:            # k_ref/v_ref [P, G, H]: whole pages
            ppb = BK // G
            slots = jnp.minimum(table0 + b * ppb + jnp.arange(ppb, dtype=jnp.int32),
                                table_len - 1)
            pages = jnp.minimum(jnp.maximum(pt_ref[slots], 0), max_page)
            k = k_ref[_shift(pages, k_page_offset)].reshape(BK, H)
            v = v_ref[_shift(pages, v_page_offset)].reshape(BK, H)
        else:                    # a slice of one page
            page = pt_ref[table0 + (b * BK) // G]
            page = jnp.minimum(jnp.maximum(page, 0), max_page)
            off = pl.multiple_of((b * BK) % G, BK)
            k = k_ref[_shift(page, k_page_offset), pl.ds(off, BK), :]
            v = v_ref[_shift(page, v_page_offset), pl.ds(off, BK), :]
        col_ok = (c >= lo) & (c < hi)
        return k, jnp.where(col_ok[:, None], v, jnp.zeros_like(v))

    def body(b, carry):
        m_prev, l_prev, acc_prev = carry
        k, v = load_kv(b)
        s = plgpu.dot(q, k, trans_b=True, precision=precision) * sm_scale      # [M, BK] f32
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        c = b * BK + jnp.arange(BK, dtype=jnp.int32)
        col_ok = (c >= lo) & (c < hi)
        mask = row_ok[:, None] & col_ok[None, :] & (c[None, :] <= pos_r[:, None])
        if window is not None:
            mask = mask & (c[None, :] > pos_r[:, None] - window)
        s = jnp.where(mask, s, _MASK)
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
        alpha = jnp.exp(m_prev - m_new)
        p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
        l_new = alpha * l_prev + jnp.sum(p, axis=1)
        pv = plgpu.dot(p.astype(v.dtype), v, precision=precision)
        return m_new, l_new, alpha[:, None] * acc_prev + pv

    m0 = jnp.full((M,), _MASK, jnp.float32)
    l0 = jnp.zeros((M,), jnp.float32)
    if has_sinks:
        # the sink is one more logit of value-less weight in the row's softmax: split 0 starts
        # its online softmax from it (max = sink, sum = exp(0)), so it enters each row's
        # denominator once, also after the splits are merged by log-sum-exp
        sink = sinks_ref[h * R + jnp.minimum(rr, R - 1)]
        m0 = jnp.where(sp == 0, sink, m0)
        l0 = jnp.where(sp == 0, 1.0, l0)
    acc0 = jnp.zeros((M, H), jnp.float32)
    m, l, acc = lax.fori_loop(b0, b1, body, (m0, l0, acc0))
    l_safe = jnp.where(l > 0, l, 1.0)
    # masked-off rows point at this split's scratch rows (distinct, so no two lanes collide)
    base = sp * out_rows
    o_rows = base + jnp.where(row_ok, q_rows, out_rows - M + r)
    _store_rows(o_ref, o_rows, (acc / l_safe[:, None]).astype(o_ref.dtype), row_ok[:, None])
    if lse_refs:
        (lse_ref,) = lse_refs
        _store_rows(lse_ref, o_rows, jnp.where(l > 0, m + jnp.log(l_safe), _MASK), row_ok)


def _whole(shape):
    nd = len(shape)
    return pl.BlockSpec(shape, lambda *_: (0,) * nd)


@functools.partial(jax.jit, static_argnames=("sm_scale", "soft_cap", "interpret", "config",
                                             "k_page_offset", "v_page_offset"))
def ragged_paged_attention_gpu(q_TNH, k_pages_PGKH, v_pages_PGKH, kv_lens_S, page_indices_SP,
                               cu_q_lens_S1, num_seqs, *, sm_scale, soft_cap=None,
                               sliding_window=None, interpret=False, config=None,
                               k_page_offset=0, v_page_offset=0, sinks=None):
    """The GPU kernel; arguments as `ragged_paged_attention` (validated there; k_pages and
    v_pages may be the same array, read through their page offsets). sliding_window (an int
    or a traced int32 scalar) and sinks (float [N]) are operands: one compiled kernel serves
    every window value.

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
    M = max(16, BQ * Rp)                           # tl.dot needs >= 16 rows
    W = work.num_items(T, S, BQ)
    q_RH = q_TNH.reshape(T * N, H)                 # free: rows are (token, head)
    if cfg.row_gather:           # free reshapes: [P * G, K * H] rows, or [P, G, K * H]
        kv_block = (P * G, H)
        k_view = k_pages_PGKH.reshape(P * G, K * H)
        v_view = v_pages_PGKH.reshape(P * G, K * H)
    else:
        kv_block = (P, G, H)
        k_view = k_pages_PGKH.reshape(P, G, K * H)
        v_view = v_pages_PGKH.reshape(P, G, K * H)
    table = page_indices_SP.reshape(-1)
    precision = lax.Precision.HIGHEST if q_TNH.dtype == jnp.float32 else None
    out_rows = T * N + M                           # q's rows, then M scratch rows

    has_window, has_sinks = sliding_window is not None, sinks is not None
    extra_args = []
    if has_window:
        extra_args.append(jnp.reshape(jnp.asarray(sliding_window, jnp.int32), (1,)))
    if has_sinks:
        extra_args.append(sinks.astype(jnp.float32))
    kernel = functools.partial(
        _kernel, sm_scale=sm_scale, soft_cap=soft_cap, has_window=has_window, has_sinks=has_sinks, R=R,
        Rp=Rp, M=M, BQ=BQ, BK=BK, G=G, N=N, pages_per_seq=pages_per_seq, table_len=table.shape[0],
        num_pages=P, num_splits=NS, out_rows=out_rows, heads_fastest=cfg.heads_fastest,
        row_gather=cfg.row_gather, mask_v_load=cfg.mask_v_load,
        items_in_kernel=cfg.items_in_kernel, precision=precision,
        k_page_offset=int(k_page_offset), v_page_offset=int(v_page_offset))
    if cfg.heads_fastest:        # consecutive programs: the KV heads of one item (same pages)
        grid = (K, W, NS)
        item_of = lambda a, b, s: (b, 0)       # noqa: E731
        head_of = lambda a, b, s: (0,) * (len(kv_block) - 1) + (a,)    # noqa: E731
    else:
        grid = (W, K, NS)
        item_of = lambda a, b, s: (a, 0)       # noqa: E731
        head_of = lambda a, b, s: (0,) * (len(kv_block) - 1) + (b,)    # noqa: E731
    o_dtype = q_TNH.dtype if NS == 1 else jnp.float32
    out_shape = [jax.ShapeDtypeStruct((NS * out_rows, H), o_dtype)]
    out_specs = [_whole((NS * out_rows, H))]
    if NS > 1:
        out_shape.append(jax.ShapeDtypeStruct((NS * out_rows,), jnp.float32))
        out_specs.append(_whole((NS * out_rows,)))
    if cfg.items_in_kernel:      # each program derives its item from the sequence lengths
        num_seqs_1 = jnp.reshape(num_seqs, (1,)).astype(jnp.int32)
        item_args = (cu_q_lens_S1, kv_lens_S, num_seqs_1)
        item_specs = [_whole(a.shape) for a in item_args]
    else:
        items_W8, _ = work.build_items(kv_lens_S, cu_q_lens_S1, num_seqs, T=T, q_tokens=BQ,
                                       sliding_window=sliding_window)
        item_args = (items_W8,)
        item_specs = [pl.BlockSpec((None, work.ITEM_COLS), item_of)]
    outs = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[
            *item_specs,
            _whole(q_RH.shape),
            pl.BlockSpec(kv_block, head_of),
            pl.BlockSpec(kv_block, head_of),
            _whole(table.shape),
            *[_whole(a.shape) for a in extra_args],
        ],
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=interpret,
        compiler_params=_compiler_params(cfg),
        name=f"ragged_paged_attention_bq{BQ}_bk{BK}_ns{NS}",
    )(*item_args, q_RH, k_view, v_view, table, *extra_args)
    if NS == 1:
        o_RH = outs[0][:T * N]
    else:
        o_SRH = outs[0].reshape(NS, out_rows, H)[:, :T * N]
        lse_SR = outs[1].reshape(NS, out_rows)[:, :T * N]
        mx = jnp.max(lse_SR, axis=0)
        wgt = jnp.exp(lse_SR - mx[None])
        o_RH = jnp.sum(wgt[..., None] * o_SRH, axis=0) / jnp.sum(wgt, axis=0)[..., None]
    # rows no item wrote (padding tokens past cu_q_lens[num_seqs]) are zeros
    n = jnp.reshape(num_seqs, ()).astype(jnp.int32)
    valid_T = jnp.arange(T, dtype=jnp.int32) < cu_q_lens_S1[n]
    out = o_RH.reshape(T, N, H)
    return jnp.where(valid_T[:, None, None], out, jnp.zeros_like(out)).astype(q_TNH.dtype)
