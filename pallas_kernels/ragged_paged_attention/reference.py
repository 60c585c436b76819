"""Pure-jnp ragged paged attention: the oracle for every backend, and the CPU path.

Contract (../shared/CROSSPOOL.md): q [T, N, H] packs the new tokens of all sequences;
sequence s owns q[cu_q_lens[s]:cu_q_lens[s+1]], the LAST tokens of its kv_lens[s]-token
context, causal within it. k_pages / v_pages [P, G, K, H] (G tokens per page);
page_indices int32[S, pages_per_seq]; kv_lens int32[S]; cu_q_lens int32[S+1];
num_seqs int32[1]: only the first num_seqs sequences count. Rows of q beyond
cu_q_lens[num_seqs] are padding and come back as zeros. Page id p's K is
k_pages[p + k_page_offset] and its V v_pages[p + v_page_offset] (static ints, default 0), so K
and V may be two windows of one buffer; ids outside the buffer are clamped into it (jnp
gather), and whatever they read is masked.

latent_value_dim (MLA's absorbed form, static): the pages hold one latent row per token split
in two halves, the first in k_pages and the second in v_pages (K = 1); the key is their
concatenation (q's head dim = 2 * the pages' head dim) and the value its first
latent_value_dim entries; the output is [T, N, latent_value_dim].

sinks (float [N], optional, GPT-OSS): one learnt logit per head that joins every softmax
denominator and attends to nothing. sliding_window may be a traced int32 scalar (a per-layer
window inside a scan over layers; a window past every position is full attention).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

_MASK = -1e30


def latent_key_value(k, v, latent_value_dim):
    """MLA's cached row from its halves: (key = concat(k, v) on the last axis, value = the key's
    first latent_value_dim entries); (k, v) unchanged when latent_value_dim is None."""
    if latent_value_dim is None:
        return k, v
    key = jnp.concatenate([k, v], axis=-1)
    return key, key[..., :latent_value_dim]


def softmax_with_sinks(s, sinks=None):
    """Softmax over the last axis (float32); sinks (broadcastable to s's shape with a last axis
    of 1) join each denominator as one more logit that attends to nothing (GPT-OSS)."""
    if sinks is None:
        return jax.nn.softmax(s, axis=-1)
    m = jnp.maximum(jnp.max(s, axis=-1, keepdims=True), sinks)
    e = jnp.exp(s - m)
    return e / (jnp.sum(e, axis=-1, keepdims=True) + jnp.exp(sinks - m))


def ragged_paged_attention_reference(q_TNH, k_pages_PGKH, v_pages_PGKH, kv_lens_S, page_indices_SP,
                                     cu_q_lens_S1, num_seqs, *, sm_scale=None, soft_cap=None,
                                     sliding_window=None, k_page_offset=0, v_page_offset=0,
                                     latent_value_dim=None, sinks=None):
    T, N, H = q_TNH.shape
    _, G, K, Hp = k_pages_PGKH.shape
    S, pages_per_seq = page_indices_SP.shape
    C = pages_per_seq * G                                           # context capacity
    if sm_scale is None:
        sm_scale = H ** -0.5
    num_seqs = jnp.reshape(num_seqs, ())
    t = jnp.arange(T, dtype=jnp.int32)
    # the sequence each query row belongs to; rows past cu_q_lens[num_seqs] are padding
    seq_T = jnp.clip(jnp.searchsorted(cu_q_lens_S1[1:], t, side="right"), 0, S - 1)
    valid_T = t < cu_q_lens_S1[num_seqs]
    q_len_T = cu_q_lens_S1[seq_T + 1] - cu_q_lens_S1[seq_T]
    kv_len_T = kv_lens_S[seq_T]
    pos_T = kv_len_T - q_len_T + (t - cu_q_lens_S1[seq_T])          # absolute position of the query
    pages_TP = page_indices_SP[seq_T]                               # [T, pages_per_seq]
    k_TCKH = k_pages_PGKH[pages_TP + k_page_offset].reshape(T, C, K, Hp)
    v_TCKH = v_pages_PGKH[pages_TP + v_page_offset].reshape(T, C, K, Hp)
    k_TCKH, v_TCKH = latent_key_value(k_TCKH, v_TCKH, latent_value_dim)   # MLA: one latent row
    Hv = v_TCKH.shape[-1]
    q_TKRH = q_TNH.reshape(T, K, N // K, H).astype(jnp.float32)
    s = jnp.einsum("tkrh,tckh->tkrc", q_TKRH, k_TCKH.astype(jnp.float32)) * sm_scale
    if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
    c = jnp.arange(C, dtype=jnp.int32)
    mask_TC = (c[None, :] <= pos_T[:, None]) & (c[None, :] < kv_len_T[:, None])
    if sliding_window is not None:
        mask_TC &= c[None, :] > pos_T[:, None] - sliding_window
    mask_TC &= valid_T[:, None]
    s = jnp.where(mask_TC[:, None, None, :], s, _MASK)
    p = softmax_with_sinks(s, None if sinks is None else sinks.astype(jnp.float32).reshape(K, N // K, 1))
    p = jnp.where(mask_TC[:, None, None, :], p, 0.0)
    # NaN-safe: masked-out (possibly NaN) values never reach the product
    v_safe = jnp.where(mask_TC[:, :, None, None], v_TCKH.astype(jnp.float32), 0.0)
    out = jnp.einsum("tkrc,tckh->tkrh", p, v_safe)
    return out.reshape(T, N, Hv).astype(q_TNH.dtype)
