"""Ragged paged attention for TPUs: a Pallas Mosaic TPU kernel with scalar-prefetched page tables.

No TPU is lent to this project: this kernel is tested only in the TPU interpret mode
(`pltpu.InterpretParams`) on a CPU and has never run on TPU hardware; its speed is unknown.

Grid (W, pages_per_seq): one work item (<= BQ query tokens of one sequence, work.py) per
row of the grid, one KV page per step of the second (the "arbitrary" reduction axis). The
item table and the flattened page table are scalar-prefetched into SMEM, and the K/V
BlockSpecs' index maps pick the page id from them, so Pallas' pipeline DMAs page j+1 from
the pool [P, G, K, H] (in place, no copy) while page j is computed. A page holds all KV
heads of G tokens, so each DMA is one contiguous G*K*H block. Steps past the item's last
page keep the same block index (no new DMA) and skip the compute. Each KV head's R query
heads and BQ tokens are packed into the rows of one [M, H] tile (M = BQ * R padded to a
power of two); the softmax state lives in VMEM scratch in float32. Columns outside the
item's key range are masked in the scores and zeroed in V, so unused pages (NaN included)
never leak; page ids are clamped into the pool. The sliding window (static or traced) is a
scalar-prefetched int32: the item's key range starts at its window, so pages before it are
never fetched, and each row masks its own window. Sinks (GPT-OSS): each row's online softmax
starts from its head's sink (max = sink, sum = 1, no value), so the sink joins its denominator
once.

Page offsets (static): the K BlockSpec's index map picks pool page p + k_page_offset, the V
one p + v_page_offset (p clamped into [0, P - 1 - max offset] first), so k_pages and v_pages
may be one buffer holding both as two windows. Operand size: capped at 2**31 - 1 elements
per K/V operand (validation.py says why: the DMA's flat address is computed inside libtpu's
Mosaic compiler from int32 block indices, and nothing shows it is 64-bit).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.ragged_paged_attention import tuning, work

_MASK = -1e30


def _kernel(items_ref, table_ref, win_ref, q_ref, k_ref, v_ref, *refs, sm_scale, soft_cap, has_window,
            has_sinks, R, Rp, G, num_pages_grid, precision):
    # items_ref int32[W*8], table_ref int32[S*pps] and win_ref int32[1] (the sliding window,
    # read when has_window) in SMEM; q_ref [K, M, H]; k_ref, v_ref [G, K, H] (one page);
    # has_sinks: sinks_ref [K, M, 1] f32 (each tile row's sink); o_ref [K, M, H];
    # m_sc, l_sc [K, M, 1]; acc_sc [K, M, H]
    sinks_ref, o_ref, m_sc, l_sc, acc_sc = refs if has_sinks else (None, *refs)
    K, M, H = q_ref.shape
    w, j = pl.program_id(0), pl.program_id(1)
    base = w * work.ITEM_COLS
    nq = items_ref[base + work.NQ]
    pos0 = items_ref[base + work.POS0]
    lo = items_ref[base + work.KV_LO]
    hi = items_ref[base + work.KV_HI]
    p_lo = lo // G
    n_pages = (hi + G - 1) // G - p_lo

    @pl.when(j == 0)
    def _init():
        if has_sinks:        # the sink: one more logit with no value, in every row's denominator
            m_sc[...] = sinks_ref[...]
            l_sc[...] = jnp.ones(l_sc.shape, jnp.float32)
        else:
            m_sc[...] = jnp.full(m_sc.shape, _MASK, jnp.float32)
            l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(j < n_pages)
    def _step():
        c = (p_lo + j) * G + lax.broadcasted_iota(jnp.int32, (M, G), 1)
        r = lax.broadcasted_iota(jnp.int32, (M, G), 0)
        tok = r // Rp
        pos = pos0 + tok
        col_ok = (c >= lo) & (c < hi)
        mask = col_ok & (tok < nq) & (r % Rp < R) & (c <= pos)
        if has_window:
            mask = mask & (c > pos - win_ref[0])
        vcol_ok = (p_lo + j) * G + lax.broadcasted_iota(jnp.int32, (G, H), 0)
        vcol_ok = (vcol_ok >= lo) & (vcol_ok < hi)
        for kh in range(K):
            q = q_ref[kh]
            k = k_ref[:, kh, :]
            v = jnp.where(vcol_ok, v_ref[:, kh, :], jnp.zeros((G, H), v_ref.dtype))
            s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                                preferred_element_type=jnp.float32) * sm_scale
            if soft_cap is not None:
                s = soft_cap * jnp.tanh(s / soft_cap)
            s = jnp.where(mask, s, _MASK)
            m_prev = m_sc[kh]
            m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
            alpha = jnp.exp(m_prev - m_new)
            p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
            l_sc[kh] = alpha * l_sc[kh] + jnp.sum(p, axis=1, keepdims=True)
            pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                 precision=precision, preferred_element_type=jnp.float32)
            acc_sc[kh] = alpha * acc_sc[kh] + pv
            m_sc[kh] = m_new

    @pl.when(j == num_pages_grid - 1)
    def _done():
        l = l_sc[...]
        o_ref[...] = (acc_sc[...] / jnp.where(l > 0, l, 1.0)).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("sm_scale", "soft_cap", "interpret", "config",
                                             "k_page_offset", "v_page_offset"))
def ragged_paged_attention_tpu(q_TNH, k_pages_PGKH, v_pages_PGKH, kv_lens_S, page_indices_SP,
                               cu_q_lens_S1, num_seqs, *, sm_scale, soft_cap=None,
                               sliding_window=None, interpret=False, config=None,
                               k_page_offset=0, v_page_offset=0, sinks=None):
    """The TPU kernel; arguments as `ragged_paged_attention` (validated there; k_pages and
    v_pages may be the same array, read through their page offsets). sliding_window (an int
    or a traced int32 scalar) is a scalar-prefetched operand, sinks (float [N]) a per-row
    operand that starts each row's online softmax.

    interpret=True runs it in the TPU interpret mode on any platform.
    """
    T, N, H = q_TNH.shape
    P, G, K, _ = k_pages_PGKH.shape
    S, pages_per_seq = page_indices_SP.shape
    R = N // K
    Rp = tuning.next_pow2(R)
    cfg = config or tuning.tpu_config(T=T, S=S, R=R, H=H, G=G)
    BQ = cfg.q_tokens
    M = BQ * Rp
    q_WKMH, items_W8, first_S = work.pack_queries(q_TNH, K, Rp, kv_lens_S, cu_q_lens_S1, num_seqs,
                                                  q_tokens=BQ, sliding_window=sliding_window)
    W = items_W8.shape[0]
    table = page_indices_SP.reshape(-1)
    precision = lax.Precision.HIGHEST if q_TNH.dtype == jnp.float32 else None

    max_page = P - 1 - max(k_page_offset, v_page_offset)    # id + offset stays in the buffer

    def page_map(offset):
        def kv_map(w, j, items_ref, table_ref, win_ref):
            base = w * work.ITEM_COLS
            p_lo = items_ref[base + work.KV_LO] // G
            p_last = jnp.maximum(p_lo, (items_ref[base + work.KV_HI] + G - 1) // G - 1)
            idx = jnp.minimum(jnp.minimum(p_lo + j, p_last), pages_per_seq - 1)
            page = table_ref[items_ref[base + work.SEQ] * pages_per_seq + idx]
            page = jnp.minimum(jnp.maximum(page, 0), max_page)
            return (page + offset if offset else page, 0, 0, 0)
        return kv_map

    def q_map(w, j, items_ref, table_ref, win_ref):
        return (w, 0, 0, 0)

    has_window, has_sinks = sliding_window is not None, sinks is not None
    window_1 = jnp.reshape(jnp.asarray(0 if sliding_window is None else sliding_window, jnp.int32), (1,))
    sink_args, sink_specs = [], []
    if has_sinks:                # [K, M, 1]: tile row (token, head rr) of KV head k gets sink k * R + rr
        sinks_KR = jnp.pad(sinks.astype(jnp.float32).reshape(K, R), ((0, 0), (0, Rp - R)))
        sink_args.append(jnp.tile(sinks_KR, (1, BQ))[..., None])
        sink_specs.append(pl.BlockSpec((K, M, 1), lambda w, j, *_: (0, 0, 0)))
    kernel = functools.partial(
        _kernel, sm_scale=sm_scale, soft_cap=soft_cap, has_window=has_window, has_sinks=has_sinks,
        R=R, Rp=Rp, G=G, num_pages_grid=pages_per_seq, precision=precision)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(W, pages_per_seq),
        in_specs=[
            pl.BlockSpec((None, K, M, H), q_map),
            pl.BlockSpec((None, G, K, H), page_map(int(k_page_offset))),
            pl.BlockSpec((None, G, K, H), page_map(int(v_page_offset))),
            *sink_specs,
        ],
        out_specs=pl.BlockSpec((None, K, M, H), q_map),
        scratch_shapes=[pltpu.VMEM((K, M, 1), jnp.float32), pltpu.VMEM((K, M, 1), jnp.float32),
                        pltpu.VMEM((K, M, H), jnp.float32)],
    )
    o_WKMH = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((W, K, M, H), q_TNH.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False,
        name=f"ragged_paged_attention_tpu_bq{BQ}",
    )(items_W8.reshape(-1), table, window_1, q_WKMH, k_pages_PGKH, v_pages_PGKH, *sink_args)
    o_WBKRH = o_WKMH.reshape(W, K, BQ, Rp, H)[:, :, :, :R].transpose(0, 2, 1, 3, 4)
    out_TKRH = work.scatter_outputs(o_WBKRH, first_S, cu_q_lens_S1, num_seqs, T=T)
    return out_TKRH.reshape(T, N, H)
