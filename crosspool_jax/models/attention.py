"""Whole-sequence causal attention for the forward pass's attention seam (no KV cache).

`dense_causal_attention(segment_ids_T, positions_T)` returns an `attention_fn` for a packed
batch of whole sequences: token t attends to token s when they share a segment and
pos[s] <= pos[t] (and pos[t] - pos[s] < sliding_window when one is given). The kv_cache
argument passes through untouched. Softmax in float32, sm_scale = head_dim ** -0.5 unless
given. latent_value_dim (MLA, as `ragged_paged_attention`): the key is concat(k, v) along the
head dim and the value its first latent_value_dim entries. Per call (a layer's options, as
`models.transformer.layer_attention_options` gives them): sinks (float [N], a logit per head
in every softmax denominator) and a sliding_window overriding the static one (traced ok).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.ragged_paged_attention.reference import latent_key_value, softmax_with_sinks

_MASK = -1e30


def dense_causal_attention(segment_ids_T: jax.Array, positions_T: jax.Array, *, sliding_window=None,
                           sm_scale=None, latent_value_dim=None):
    """Build attention_fn(q_TNH, k_TKH, v_TKH, layer_idx, kv_cache) -> (out_TNH, kv_cache)."""
    seg_T = jnp.asarray(segment_ids_T)
    pos_T = jnp.asarray(positions_T)
    causal_TS = (seg_T[:, None] == seg_T[None, :]) & (pos_T[None, :] <= pos_T[:, None])
    static_window = sliding_window

    def attention_fn(q_TNH, k_TKH, v_TKH, layer_idx, kv_cache, *, sinks=None, sliding_window=static_window):
        del layer_idx
        mask_TS = causal_TS
        if sliding_window is not None:
            mask_TS = mask_TS & (pos_T[:, None] - pos_T[None, :] < sliding_window)
        k_TKH, v_TKH = latent_key_value(k_TKH, v_TKH, latent_value_dim)
        T, N, H = q_TNH.shape
        K, Hv = k_TKH.shape[1], v_TKH.shape[-1]
        scale = H ** -0.5 if sm_scale is None else sm_scale
        q_TKRH = q_TNH.reshape(T, K, N // K, H).astype(jnp.float32)
        s_KRTS = jnp.einsum("tkrh,skh->krts", q_TKRH, k_TKH.astype(jnp.float32)) * scale
        s_KRTS = jnp.where(mask_TS, s_KRTS, _MASK)
        p_KRTS = softmax_with_sinks(s_KRTS, None if sinks is None
                                    else sinks.astype(jnp.float32).reshape(K, N // K, 1, 1))
        out_TKRH = jnp.einsum("krts,skh->tkrh", p_KRTS, v_TKH.astype(jnp.float32))
        return out_TKRH.reshape(T, N, Hv).astype(q_TNH.dtype), kv_cache

    return attention_fn
