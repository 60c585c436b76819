"""The decoder forward pass as pure functions over the param pytrees of `params.py`.

One layer is two halves that may live on different devices:
`attention_block` (`qkv_projection`: input norm, q/k/v, q/k norms, RoPE; the attention seam;
`output_projection`: o projection, residual) and `ffn_block` (`ffn_partial`: post-attention
norm, then MoE with optional shared expert, or a dense SwiGLU MLP; then the residual). The
placed step programs and the CrossPool split program both call these (the split's weight
devices call `ffn_partial` on their shard). `forward` chains them over all layers (a `lax.scan` when every
layer has the same FFN kind) and returns the hidden states after the final norm;
`compute_logits` projects them to the vocabulary in float32. The expert stacks are not
sliced per layer: each layer's experts reach `fused_moe` as `ExpertRows.of_stack(w, l)`, which
the GPU kernels read in place (a sliced layer would be copied into the kernel call: one
layer of Mixtral-8x7B's experts is 2.8 GB).
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from crosspool_jax.models.config import ModelConfig
from crosspool_jax.models.rope import apply_rope, rope_cos_sin
from pallas_kernels.fused_moe.expert_rows import ExpertRows, as_array
from pallas_kernels.fused_moe.reference import fused_moe_reference

# attention_fn(q_TNH, k_TKH, v_TKH, layer_idx, kv_cache) -> (out_TNH, kv_cache)
AttentionFn = Callable[[jax.Array, jax.Array, jax.Array, Any, Any], tuple[jax.Array, Any]]


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis, statistics in float32, as transformers computes it."""
    xf = x.astype(jnp.float32)
    var = jnp.mean(xf * xf, axis=-1, keepdims=True)
    return weight.astype(x.dtype) * (xf * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def qkv_projection(layer_attn_params: dict, config: ModelConfig, x_TD: jax.Array,
                   positions_T: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One layer's q/k/v (input norm, projections, biases, q/k norms, clipping, RoPE)
    -> (q_TNH, k_TKH, v_TKH), as the attention seam receives them."""
    p, c = layer_attn_params, config
    T = x_TD.shape[0]
    xn_TD = rms_norm(x_TD, p["input_norm_LD"], c.rms_norm_eps)
    q_TQ = xn_TD @ p["wq_LDQ"]
    k_TKH = xn_TD @ p["wk_LDKH"]
    v_TKH = xn_TD @ p["wv_LDKH"]
    if c.attention_bias:
        q_TQ, k_TKH, v_TKH = q_TQ + p["bq_LQ"], k_TKH + p["bk_LKH"], v_TKH + p["bv_LKH"]
    if c.qk_norm == "full":
        q_TQ = rms_norm(q_TQ, p["q_norm_LQ"], c.rms_norm_eps)
        k_TKH = rms_norm(k_TKH, p["k_norm_LKH"], c.rms_norm_eps)
    if c.clip_qkv is not None:
        q_TQ, k_TKH, v_TKH = (jnp.clip(a, -c.clip_qkv, c.clip_qkv) for a in (q_TQ, k_TKH, v_TKH))
    q_TNH = q_TQ.reshape(T, c.num_heads, c.head_dim)
    k_TKH = k_TKH.reshape(T, c.num_kv_heads, c.head_dim)
    v_TKH = v_TKH.reshape(T, c.num_kv_heads, c.head_dim)
    if c.qk_norm == "per_head":
        q_TNH = rms_norm(q_TNH, p["q_norm_LH"], c.rms_norm_eps)
        k_TKH = rms_norm(k_TKH, p["k_norm_LH"], c.rms_norm_eps)
    cos_TH, sin_TH = rope_cos_sin(c, positions_T, x_TD.dtype)
    return apply_rope(q_TNH, cos_TH, sin_TH), apply_rope(k_TKH, cos_TH, sin_TH), v_TKH


def output_projection(layer_attn_params: dict, config: ModelConfig, x_TD: jax.Array,
                      out_TNH: jax.Array) -> jax.Array:
    """The attention output's o projection plus the residual x_TD -> h_TD."""
    T = x_TD.shape[0]
    return x_TD + out_TNH.reshape(T, config.q_size).astype(x_TD.dtype) @ layer_attn_params["wo_LQD"]


def attention_block(layer_attn_params: dict, config: ModelConfig, x_TD: jax.Array,
                    positions_T: jax.Array, layer_idx, attention_fn: AttentionFn, kv_cache):
    """One layer's attention half (residual included) -> (kv_cache, h_TD)."""
    q_TNH, k_TKH, v_TKH = qkv_projection(layer_attn_params, config, x_TD, positions_T)
    out_TNH, kv_cache = attention_fn(q_TNH, k_TKH, v_TKH, layer_idx, kv_cache)
    return kv_cache, output_projection(layer_attn_params, config, x_TD, out_TNH)


def _swiglu_f32(x_TD: jax.Array, w1_DF2: jax.Array, w2_FD: jax.Array) -> jax.Array:
    """SwiGLU with [gate | up] in w1, float32 accumulation; w1/w2 may be a block of F (their
    output is then that block's share of the sum)."""
    F = w2_FD.shape[0]
    h_TF2 = jnp.dot(x_TD, w1_DF2, preferred_element_type=jnp.float32)
    act_TF = (jax.nn.silu(h_TF2[:, :F]) * h_TF2[:, F:]).astype(x_TD.dtype)
    return jnp.dot(act_TF, w2_FD, preferred_element_type=jnp.float32)


def _fused_moe(x_TD, router_logits_TE, w1_EDF2, w2_EFD, top_k, *, renormalize, backend, expert_offset,
               token_mask):
    if backend == "reference":
        return fused_moe_reference(x_TD, router_logits_TE, as_array(w1_EDF2), as_array(w2_EFD), top_k,
                                   renormalize=renormalize, expert_offset=expert_offset, token_mask=token_mask)
    from pallas_kernels.fused_moe import fused_moe
    return fused_moe(x_TD, router_logits_TE, w1_EDF2, w2_EFD, top_k, renormalize=renormalize, backend=backend,
                     expert_offset=expert_offset, token_mask=token_mask)


def ffn_partial(layer_ffn_params: dict, config: ModelConfig, kind: str, h_TD: jax.Array, *,
                moe_backend: str = "reference", expert_offset=None, token_mask_T=None) -> jax.Array:
    """One layer's FFN output (post-attention norm, then MoE with optional shared expert, or a
    dense SwiGLU; no residual), float32.

    The one definition of the FFN half, for whole weights and for a device's shard of them:
    `expert_offset` (traced ok) says the expert stacks hold experts [expert_offset,
    expert_offset + E_local) of the router's E (pairs routed elsewhere read nothing), and the
    dense / shared-expert matrices and the experts' F may be a contiguous block of F ([gate |
    up] aligned). The sum of the shards' outputs is the layer's FFN output. A MoE layer's
    w1_LEDF2 / w2_LEFD may be `ExpertRows` (read in place by the kernels).
    """
    p, c = layer_ffn_params, config
    x_TD = rms_norm(h_TD, p["norm_LD"], c.rms_norm_eps)
    if kind == "dense":
        return _swiglu_f32(x_TD, p["w1_LDF2"], p["w2_LFD"])
    if kind != "moe":
        raise ValueError(f"ffn kind must be 'moe' or 'dense', got {kind!r}")
    router_logits_TE = x_TD @ p["router_LDE"]
    y_TD = _fused_moe(x_TD, router_logits_TE, p["w1_LEDF2"], p["w2_LEFD"], c.top_k, renormalize=c.norm_topk_prob,
                      backend=moe_backend, expert_offset=expert_offset,
                      token_mask=token_mask_T).astype(jnp.float32)
    if c.shared_expert_intermediate_size:
        gate_T1 = jax.nn.sigmoid(jnp.dot(x_TD, p["shared_gate_LD1"], preferred_element_type=jnp.float32))
        y_TD = y_TD + gate_T1 * _swiglu_f32(x_TD, p["shared_w1_LDF2"], p["shared_w2_LFD"])
    return y_TD


def ffn_block(layer_ffn_params: dict, config: ModelConfig, kind: str, h_TD: jax.Array, *,
              moe_backend: str = "reference", token_mask_T=None) -> jax.Array:
    """One layer's FFN half with the residual -> out_TD (whole weights; `ffn_partial`)."""
    return h_TD + ffn_partial(layer_ffn_params, config, kind, h_TD, moe_backend=moe_backend,
                              token_mask_T=token_mask_T).astype(h_TD.dtype)


_EXPERT_LEAVES = ("w1_LEDF2", "w2_LEFD")


def _layer_slice(stack: dict, i) -> dict:
    """Layer i of a stack; the expert stacks as ExpertRows (no slice)."""
    return {k: ExpertRows.of_stack(a, i) if k in _EXPERT_LEAVES else a[i] for k, a in stack.items()}


def forward(kv_params: dict, ffn_params: dict, config: ModelConfig, token_ids_T: jax.Array,
            positions_T: jax.Array, attention_fn: AttentionFn, kv_cache, *,
            moe_backend: str = "reference", token_mask_T=None):
    """All layers over one packed ragged batch -> (kv_cache, hidden_TD after the final norm).
    token_mask_T (bool [T], optional): the real tokens; padding routes to no expert."""
    c = config
    x_TD = kv_params["embed"]["embedding_VD"][token_ids_T]
    kinds = c.ffn_kinds
    if len(kinds) == 1:
        kind = kinds[0]

        stacked = {k: a for k, a in ffn_params[kind].items() if k in _EXPERT_LEAVES}   # read in place

        def body(carry, xs):
            x, cache = carry
            attn_p, ffn_p, l = xs
            ffn_p = {**ffn_p, **{k: ExpertRows.of_stack(a, l) for k, a in stacked.items()}}
            cache, h = attention_block(attn_p, c, x, positions_T, l, attention_fn, cache)
            return (ffn_block(ffn_p, c, kind, h, moe_backend=moe_backend, token_mask_T=token_mask_T), cache), None

        per_layer = {k: a for k, a in ffn_params[kind].items() if k not in _EXPERT_LEAVES}
        xs = (kv_params["attn"], per_layer, jnp.arange(c.num_layers, dtype=jnp.int32))
        (x_TD, kv_cache), _ = jax.lax.scan(body, (x_TD, kv_cache), xs)
    else:
        for l in range(c.num_layers):
            kind = c.ffn_kind(l)
            kv_cache, h_TD = attention_block(_layer_slice(kv_params["attn"], l), c, x_TD, positions_T,
                                             l, attention_fn, kv_cache)
            x_TD = ffn_block(_layer_slice(ffn_params[kind], c.ffn_index(l)), c, kind, h_TD,
                             moe_backend=moe_backend, token_mask_T=token_mask_T)
    return kv_cache, rms_norm(x_TD, kv_params["final"]["norm_D"], c.rms_norm_eps)


def compute_logits(kv_params: dict, config: ModelConfig, hidden_TD: jax.Array) -> jax.Array:
    """logits_TV in float32 (the tied embedding when configured, else the lm head)."""
    if config.tie_word_embeddings:
        w_VD = kv_params["embed"]["embedding_VD"]
        return jnp.einsum("td,vd->tv", hidden_TD, w_VD, preferred_element_type=jnp.float32)
    return jnp.einsum("td,dv->tv", hidden_TD, kv_params["final"]["lm_head_DV"],
                      preferred_element_type=jnp.float32)


@functools.partial(jax.jit, static_argnames=("config", "moe_backend"))
def dense_logits(kv_params: dict, ffn_params: dict, config: ModelConfig, token_ids_T: jax.Array,
                 segment_ids_T: jax.Array, positions_T: jax.Array, *,
                 moe_backend: str = "reference") -> jax.Array:
    """float32 logits_TV of whole packed sequences, no KV cache (tests, scoring, demos).

    Uses `dense_causal_attention` with the config's sliding window; one compile per shape.
    """
    from crosspool_jax.models.attention import dense_causal_attention
    attn = dense_causal_attention(segment_ids_T, positions_T, sliding_window=config.sliding_window)
    _, hidden_TD = forward(kv_params, ffn_params, config, token_ids_T, positions_T, attn, None,
                           moe_backend=moe_backend)
    return compute_logits(kv_params, config, hidden_TD)
