"""Attention of sequences whose pages are spread over several KV devices (sequence-sharded).

Each KV device computes PARTIAL attention of the queries over the keys in its local pages
only (`partial_paged_attention`): per query row the output normalized over those keys and
their log-sum-exp. The partials of all devices are merged by log-sum-exp
(`merge_partials` on stacked host arrays, `merge_over_axis` with collectives inside a
`shard_map`): with m = max_d lse_d and w_d = exp(lse_d - m),
out = sum_d w_d out_d / sum_d w_d, which is the softmax over the union of the keys.
Attention sinks (GPT-OSS: a logit per head in every softmax denominator) join once, after the
merge, on the device owning the query (`with_sinks`: the merged lse against the sink).
MLA's latent attention (`latent_value_dim`) reads its one cached row per token as the key and
its first latent_value_dim entries as the value, as `ragged_paged_attention` does.

A device knows a sequence's keys by the local pages of the blocks it holds and their
logical block indices (`pages_SB`, `blocks_SB`; -1: no block in that column): key position
= block * G + offset, used when < kv_len, causal w.r.t. the query's position and inside
the sliding window. Padding queries (`seq_T` < 0) and devices with no key for a query give
out 0 and lse `EMPTY_LSE`, which every merge weighs 0 (or, when no device has a key, gives 0).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.ragged_paged_attention.reference import latent_key_value

EMPTY_LSE = -1e30            # lse of a query with no key on a device (finite: merges stay NaN-free)


def partial_paged_attention(q_TNH, k_pages_PGKH, v_pages_PGKH, positions_T, seq_T, kv_lens_S, pages_SB,
                            blocks_SB, *, sm_scale=None, sliding_window=None, latent_value_dim=None):
    """-> (out_TNH float32 normalized over this device's keys, lse_TN float32).

    q_TNH: queries of every sequence (T rows, any order); positions_T: each query's absolute
    position; seq_T: its sequence (< 0: padding); kv_lens_S: context length of each sequence;
    pages_SB: local page ids of the blocks of each sequence held here; blocks_SB: their
    logical block indices (-1: unused column; its page is never read as a key).
    sliding_window: None, an int or a traced int32 scalar; latent_value_dim (MLA): the pages
    hold halves of one latent row per token (K = 1), key = the row, value = its first
    latent_value_dim entries, out [T, N, latent_value_dim].
    """
    T, N, H = q_TNH.shape
    _, G, K, Hp = k_pages_PGKH.shape            # Hp: H, or half of MLA's cached row
    S, B = pages_SB.shape
    sm_scale = H ** -0.5 if sm_scale is None else sm_scale
    valid_T = seq_T >= 0
    s_T = jnp.clip(seq_T, 0, S - 1)
    pages_TB = pages_SB[s_T]
    k_TCKH = k_pages_PGKH[pages_TB].reshape(T, B * G, K, Hp).astype(jnp.float32)
    v_TCKH = v_pages_PGKH[pages_TB].reshape(T, B * G, K, Hp).astype(jnp.float32)
    k_TCKH, v_TCKH = latent_key_value(k_TCKH, v_TCKH, latent_value_dim)
    blocks_TB = blocks_SB[s_T]
    key_pos_TC = (blocks_TB[:, :, None] * G + jnp.arange(G, dtype=jnp.int32)).reshape(T, B * G)
    pos_T1 = positions_T[:, None]
    mask_TC = ((jnp.repeat(blocks_TB, G, axis=1) >= 0) & (key_pos_TC < kv_lens_S[s_T][:, None])
               & (key_pos_TC <= pos_T1) & valid_T[:, None])
    if sliding_window is not None:
        mask_TC &= key_pos_TC > pos_T1 - sliding_window
    q_TKRH = q_TNH.reshape(T, K, N // K, H).astype(jnp.float32)
    s_TKRC = jnp.einsum("tkrh,tckh->tkrc", q_TKRH, jnp.where(mask_TC[:, :, None, None], k_TCKH, 0.0)) * sm_scale
    s_TKRC = jnp.where(mask_TC[:, None, None, :], s_TKRC, -jnp.inf)
    m_TKR = jnp.max(s_TKRC, axis=-1)
    m_TKR = jnp.where(jnp.isfinite(m_TKR), m_TKR, 0.0)
    p_TKRC = jnp.where(mask_TC[:, None, None, :], jnp.exp(s_TKRC - m_TKR[..., None]), 0.0)
    l_TKR = p_TKRC.sum(-1)
    v_safe = jnp.where(mask_TC[:, :, None, None], v_TCKH, 0.0)      # NaN in unused pages never leaks
    out_TKRH = jnp.einsum("tkrc,tckh->tkrh", p_TKRC, v_safe) / jnp.where(l_TKR > 0, l_TKR, 1.0)[..., None]
    lse_TKR = jnp.where(l_TKR > 0, m_TKR + jnp.log(jnp.where(l_TKR > 0, l_TKR, 1.0)), EMPTY_LSE)
    return out_TKRH.reshape(T, N, v_TCKH.shape[-1]), lse_TKR.reshape(T, N)


def merge_partials(out_DTNH, lse_DTN):
    """Log-sum-exp merge of D devices' partials stacked on axis 0 -> out_TNH float32."""
    m_TN = lse_DTN.max(0)
    w_DTN = jnp.exp(lse_DTN - m_TN)
    return (w_DTN[..., None] * out_DTNH).sum(0) / w_DTN.sum(0)[..., None]


def merge_over_axis(out_TNH, lse_TN, axis_name, *, return_lse: bool = False):
    """`merge_partials` across the devices of a mesh axis (every device calls it: pmax, psum);
    a device with nothing to add passes out 0 and lse EMPTY_LSE. return_lse: (out, the lse over
    every device's keys) for `with_sinks`."""
    m_TN = jax.lax.pmax(lse_TN, axis_name)
    w_TN = jnp.exp(lse_TN - m_TN)
    num_TNH = jax.lax.psum(w_TN[..., None] * out_TNH, axis_name)
    den_TN = jax.lax.psum(w_TN, axis_name)
    out_TNH = num_TNH / den_TN[..., None]
    return (out_TNH, m_TN + jnp.log(den_TN)) if return_lse else out_TNH


def with_sinks(out_TNH, lse_TN, sinks_N):
    """The merged attention with a sink logit per head in its softmax denominator: the keys'
    share exp(lse) / (exp(lse) + exp(sink)) of the output (None: out unchanged)."""
    if sinks_N is None:
        return out_TNH
    return out_TNH * jax.nn.sigmoid(lse_TN - sinks_N.astype(jnp.float32))[..., None]
