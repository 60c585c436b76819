"""The ragged work list shared by the Pallas backends.

A call's query tokens are cut, per sequence, into work items of at most `q_tokens` tokens
(BQ). Item w belongs to one sequence and covers its query tokens [qoff, qoff + nq); the
keys it needs are [kv_lo, kv_hi) (causal end, sliding-window start). The number of items is
dynamic; the arrays are sized by the static bound W = min(T, S + T // BQ) and the items past
the real count have nq = 0 and an empty key range. Everything here is a handful of
small jnp ops that XLA fuses around the kernel. Searches use method="compare_all" (one fused
compare-and-count) rather than the default binary-search loop, which on a GPU becomes a
device while-loop with a host round trip per step (measured: ~200 us per call on an H200).
"""
from __future__ import annotations

import jax.numpy as jnp

# columns of the int32[W, 8] item table
SEQ, T0, NQ, POS0, KV_LO, KV_HI = range(6)
ITEM_COLS = 8


def num_items(T: int, S: int, q_tokens: int) -> int:
    """Static bound on the number of work items."""
    return max(1, min(T, S + T // q_tokens))


def build_items(kv_lens_S, cu_q_lens_S1, num_seqs, *, T, q_tokens, sliding_window):
    """int32[W, 8] work items (columns SEQ, T0, NQ, POS0, KV_LO, KV_HI) and the per-sequence
    first item index int32[S]."""
    S = kv_lens_S.shape[0]
    W = num_items(T, S, q_tokens)
    n = jnp.reshape(num_seqs, ()).astype(jnp.int32)
    active_S = jnp.arange(S, dtype=jnp.int32) < n
    q_len_S = jnp.where(active_S, cu_q_lens_S1[1:] - cu_q_lens_S1[:-1], 0)
    items_S = (q_len_S + q_tokens - 1) // q_tokens
    end_S = jnp.cumsum(items_S).astype(jnp.int32)
    first_S = end_S - items_S
    w = jnp.arange(W, dtype=jnp.int32)
    seq_W = jnp.clip(jnp.searchsorted(end_S, w, side="right", method="compare_all"), 0, S - 1).astype(jnp.int32)
    valid_W = w < end_S[-1]
    qoff_W = (w - first_S[seq_W]) * q_tokens
    q_len_W = q_len_S[seq_W]
    nq_W = jnp.where(valid_W, jnp.minimum(q_tokens, q_len_W - qoff_W), 0)
    t0_W = jnp.where(valid_W, cu_q_lens_S1[seq_W] + qoff_W, 0)
    pos0_W = kv_lens_S[seq_W] - q_len_W + qoff_W
    kv_hi_W = jnp.where(valid_W, pos0_W + nq_W, 0)
    if sliding_window is None:
        kv_lo_W = jnp.zeros_like(kv_hi_W)
    else:
        kv_lo_W = jnp.where(valid_W, jnp.maximum(0, pos0_W - sliding_window + 1), 0)
    kv_lo_W = jnp.minimum(kv_lo_W, kv_hi_W)
    zero = jnp.zeros_like(w)
    items = jnp.stack([seq_W, t0_W, nq_W, pos0_W, kv_lo_W, kv_hi_W, zero, zero], axis=1)
    return items.astype(jnp.int32), first_S


def pack_queries(q_TNH, num_kv_heads, heads_per_kv_padded, kv_lens_S, cu_q_lens_S1, num_seqs, *,
                 q_tokens, sliding_window):
    """Work items of `q_tokens` query tokens and their queries, the query heads of one KV head
    packed together (padded to `heads_per_kv_padded`, a power of two) so that each item's
    rows form one [M = q_tokens * heads_per_kv_padded, H] tile per KV head.

    -> (q_WKMH, items_W8, first_S); shared by the GPU and TPU kernels.
    """
    T, N, H = q_TNH.shape
    K, Rp = num_kv_heads, heads_per_kv_padded
    R = N // K
    items_W8, first_S = build_items(kv_lens_S, cu_q_lens_S1, num_seqs, T=T, q_tokens=q_tokens,
                                    sliding_window=sliding_window)
    W = items_W8.shape[0]
    q_TKRH = q_TNH.reshape(T, K, R, H)
    if Rp != R:
        q_TKRH = jnp.pad(q_TKRH, ((0, 0), (0, 0), (0, Rp - R), (0, 0)))
    q_WKMH = gather_queries(q_TKRH, items_W8, q_tokens).transpose(0, 2, 1, 3, 4).reshape(
        W, K, q_tokens * Rp, H)
    return q_WKMH, items_W8, first_S


def gather_queries(q_TKRH, items_W8, q_tokens):
    """[W, BQ, K, R, H]: each item's query rows (rows past nq repeat a valid token)."""
    T = q_TKRH.shape[0]
    i = jnp.arange(q_tokens, dtype=jnp.int32)
    t_WB = jnp.clip(items_W8[:, T0, None] + i[None, :], 0, T - 1)
    return q_TKRH[t_WB]


def scatter_outputs(out_WBKRH, first_S, cu_q_lens_S1, num_seqs, *, T):
    """[T, K, R, H] from the items' outputs; padding rows (past cu_q_lens[num_seqs]) are 0."""
    W, B, K, R, H = out_WBKRH.shape
    S = first_S.shape[0]
    n = jnp.reshape(num_seqs, ()).astype(jnp.int32)
    t = jnp.arange(T, dtype=jnp.int32)
    seq_T = jnp.clip(jnp.searchsorted(cu_q_lens_S1[1:], t, side="right",
                                        method="compare_all"), 0, S - 1)
    valid_T = t < cu_q_lens_S1[n]
    qoff_T = t - cu_q_lens_S1[seq_T]
    row_T = jnp.clip((first_S[seq_T] + qoff_T // B) * B + qoff_T % B, 0, W * B - 1)
    out_TKRH = out_WBKRH.reshape(W * B, K, R, H)[row_T]
    return jnp.where(valid_T[:, None, None, None], out_TKRH, 0).astype(out_WBKRH.dtype)
