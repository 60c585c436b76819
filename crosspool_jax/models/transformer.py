"""The decoder forward pass as pure functions over the param pytrees of `params.py`.

One layer is two halves that may live on different devices:
`attention_block` (`qkv_projection`: input norm, q/k/v, q/k norms, RoPE; the attention seam;
`output_projection`: o projection, residual) and `ffn_block` (`ffn_partial`: post-attention
norm, then MoE with optional shared expert, or a dense SwiGLU MLP; then the residual). The
placed step programs and the CrossPool split program both call these (the split's weight
devices call `ffn_partial` on their shard). `forward` chains them over all layers (a `lax.scan` when every
layer has the same FFN kind) and returns the hidden states after the final norm;
`compute_logits` projects them to the vocabulary in float32. `forward` slices no weight matrix
per layer: each layer's experts reach `fused_moe` as `ExpertRows.of_stack(w, l)`, and its other
matrices (`MATRIX_LEAVES`: the projections, the router, dense and shared-expert FFNs; those the
kernels tile, `reads_in_place`) reach `_matmul` as one-group ExpertRows, which the GPU kernels
read in place (a sliced layer is a copy on a GPU: one layer of Mixtral-8x7B's experts is 2.8 GB,
of Qwen3-30B-A3B's q/k/v/o projections 38 MB; q, k and v in one launch); the reference and TPU
paths materialise the slice.

The families differ by config-driven branches resolved at trace time, in this one forward:

- Multi-head latent attention (`config.is_mla`: DeepSeek-V2/V3, GLM-4.7-Flash) runs in its
  absorbed form, for prefill and decode alike: the per-head key up-projection is folded into
  the query (q_nope @ W_uk: one latent "head" of kv_lora_rank, plus the rope part), so
  attention is MQA over one cached row per token, the latent c_kv (kv_lora_rank) and the rope
  key (qk_rope_head_dim), with the values the latent itself; the value up-projection W_uv is
  applied to the attention output before the o projection. The cached row reaches the seam
  as its two halves (k_TKH = first half, v_TKH = second half, K = 1), which the paged pool
  stores in its K and V buffers; the attention takes key = concat(k, v) and value = its first
  kv_lora_rank entries (`ragged_paged_attention(..., latent_value_dim=)`).
- What differs per layer reaches the seam as keywords (`layer_attention_options`): GPT-OSS's
  attention sinks and, for alternating sliding/full layers, the layer's window.
- The MoE's routing (`config.routing`: softmax or sigmoid scores, group-limited top-k, a
  choice-only score bias, scaling), router bias, expert biases and activation
  (`config.expert_activation`) go to `fused_moe`; a shared expert's gate is optional.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from crosspool_jax.models.config import MLA_NORM_EPS, ModelConfig
from crosspool_jax.models.rope import apply_rope, rope_cos_sin
from pallas_kernels.fused_moe.expert_rows import ExpertRows, as_array
from pallas_kernels.fused_moe.tuning import gpu_supports
from pallas_kernels.fused_moe.reference import fused_moe_reference

# attention_fn(q_TNH, k_TKH, v_TKH, layer_idx, kv_cache, **layer_options) -> (out_TNH, kv_cache)
# (MLA: q_TNRY [T, N, R+Y], k/v the halves of the cached row [T, 1, (R+Y)/2], out [T, N, R];
# layer_options: `layer_attention_options`, which override the function's static options)
AttentionFn = Callable[..., tuple[jax.Array, Any]]
FULL_WINDOW = 1 << 30          # a sliding window past every position: full causal attention

# a layer's matrices, read in place by `forward` (as one-group ExpertRows of their [L, K, N] stack)
# like the expert stacks; MLA's wkv_b_LRNU is reshaped per head, so it is sliced
MATRIX_LEAVES = ("wq_LDQ", "wk_LDKH", "wv_LDKH", "wo_LQD", "wq_LDNI", "wq_a_LDA", "wq_b_LANI", "wkv_a_LDRY",
                  "router_LDE", "w1_LDF2", "w2_LFD", "shared_w1_LDF2", "shared_w2_LFD", "shared_gate_LD1")
EXPERT_LEAVES = ("w1_LEDF2", "w2_LEFD")


def _matmul(x: jax.Array, w, backend: str, out_dtype=None):
    """x @ w (out_dtype: jnp.dot's preferred_element_type): w an array (XLA's dot) or one layer
    of a stack as ExpertRows, which the kernel backends read in place
    (`pallas_kernels.fused_moe.layer_matmul`); or a tuple of them sharing x -> the tuple of
    products (all ExpertRows: one kernel launch for all)."""
    if isinstance(w, tuple) and not all(isinstance(m, ExpertRows) for m in w):
        return tuple(_matmul(x, m, backend, out_dtype) for m in w)         # each on its own path
    if not isinstance(w, (tuple, ExpertRows)):
        return jnp.dot(x, w, preferred_element_type=out_dtype)
    from pallas_kernels.fused_moe import layer_matmul
    return layer_matmul(x, w, backend=backend, out_dtype=out_dtype)


def attention_options(config: ModelConfig) -> dict:
    """The static options of `ragged_paged_attention` (and the dense seam) for this model; a
    window that differs by layer comes per layer (`layer_attention_options`)."""
    per_layer = config.sliding_window_layers is not None
    return dict(sm_scale=config.attention_scale, sliding_window=None if per_layer else config.sliding_window,
                latent_value_dim=config.kv_lora_rank if config.is_mla else None)


def layer_attention_options(layer_attn_params: dict, config: ModelConfig, layer_idx) -> dict:
    """What one layer adds to the attention call: its sinks (`sinks_LN`'s row, GPT-OSS) and, when
    the window differs by layer, its sliding window (a traced scalar when layer_idx is traced:
    FULL_WINDOW for full-attention layers)."""
    c, out = config, {}
    if c.attention_sinks:
        out["sinks"] = layer_attn_params["sinks_LN"]
    if c.sliding_window_layers is not None and c.sliding_window is not None:
        if isinstance(layer_idx, int):
            out["sliding_window"] = c.layer_sliding_window(layer_idx)
        else:
            windows_L = jnp.asarray([c.layer_sliding_window(l) or FULL_WINDOW for l in range(c.num_layers)],
                                    jnp.int32)
            out["sliding_window"] = windows_L[layer_idx]
    return out


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis, statistics in float32, as transformers computes it."""
    xf = x.astype(jnp.float32)
    var = jnp.mean(xf * xf, axis=-1, keepdims=True)
    return weight.astype(x.dtype) * (xf * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def qkv_projection(layer_attn_params: dict, config: ModelConfig, x_TD: jax.Array,
                   positions_T: jax.Array, *,
                   matmul_backend: str = "reference") -> tuple[jax.Array, jax.Array, jax.Array]:
    """One layer's q/k/v (input norm, projections, biases, q/k norms, clipping, RoPE)
    -> (q_TNH, k_TKH, v_TKH), as the attention seam receives them (MLA: `_mla_qkv`).
    Matrices may be arrays or one-group ExpertRows (`_matmul`; matmul_backend: their kernels')."""
    p, c = layer_attn_params, config
    T = x_TD.shape[0]
    xn_TD = rms_norm(x_TD, p["input_norm_LD"], c.rms_norm_eps)
    if c.is_mla:
        return _mla_qkv(p, c, xn_TD, positions_T, matmul_backend)
    q_TQ, k_TKH, v_TKH = _matmul(xn_TD, (p["wq_LDQ"], p["wk_LDKH"], p["wv_LDKH"]), matmul_backend)
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
    cos_TR, sin_TR = rope_cos_sin(c, positions_T, x_TD.dtype)
    R = c.rope_dim                     # the first R dims of a head rotate, the rest pass through
    if R == c.head_dim:
        return apply_rope(q_TNH, cos_TR, sin_TR), apply_rope(k_TKH, cos_TR, sin_TR), v_TKH
    rotate = lambda a: jnp.concatenate([apply_rope(a[..., :R], cos_TR, sin_TR), a[..., R:]], axis=-1)  # noqa: E731
    return rotate(q_TNH), rotate(k_TKH), v_TKH


def _mla_up_proj(p: dict, c: ModelConfig):
    """kv_b_proj per head -> (W_uk [R, N, qk_nope], W_uv [R, N, v_head_dim])."""
    w_RNU = p["wkv_b_LRNU"].reshape(c.kv_lora_rank, c.num_heads, c.qk_nope_head_dim + c.head_dim)
    return w_RNU[..., :c.qk_nope_head_dim], w_RNU[..., c.qk_nope_head_dim:]


def _mla_qkv(p: dict, c: ModelConfig, xn_TD: jax.Array, positions_T: jax.Array, matmul_backend: str):
    """MLA's absorbed q and the cached row's halves: (q_TNRY [T, N, R+Y] = (q_nope @ W_uk | rope q),
    k, v [T, 1, (R+Y)/2]: the halves of (kv_a_norm(c_kv) | rope k))."""
    T, N, R, Y = xn_TD.shape[0], c.num_heads, c.kv_lora_rank, c.qk_rope_head_dim
    # the query's first projection and the cached row's, both of xn: one launch
    q_TX, kv_TRY = _matmul(xn_TD, (p["wq_a_LDA" if c.q_lora_rank else "wq_LDNI"], p["wkv_a_LDRY"]), matmul_backend)
    if c.q_lora_rank:
        qa_TA = q_TX + p["bq_a_LA"] if c.attention_bias else q_TX
        q_TX = _matmul(rms_norm(qa_TA, p["q_a_norm_LA"], MLA_NORM_EPS), p["wq_b_LANI"], matmul_backend)
    q_TNI = q_TX.reshape(T, N, c.qk_head_dim)
    if c.attention_bias:
        kv_TRY = kv_TRY + p["bkv_a_LRY"]
    latent_TR = rms_norm(kv_TRY[:, :R], p["kv_a_norm_LR"], MLA_NORM_EPS)
    cos_TY, sin_TY = rope_cos_sin(c, positions_T, xn_TD.dtype)
    q_rope_TNY = apply_rope(q_TNI[..., c.qk_nope_head_dim:], cos_TY, sin_TY, interleaved=c.rope_interleave)
    k_rope_T1Y = apply_rope(kv_TRY[:, None, R:], cos_TY, sin_TY, interleaved=c.rope_interleave)
    w_uk_RNH, _ = _mla_up_proj(p, c)
    q_lat_TNR = jnp.einsum("tnh,rnh->tnr", q_TNI[..., :c.qk_nope_head_dim], w_uk_RNH)
    q_TNRY = jnp.concatenate([q_lat_TNR, q_rope_TNY], axis=-1)
    row_T1RY = jnp.concatenate([latent_TR[:, None, :], k_rope_T1Y], axis=-1)
    half = c.kv_cache_head_dim
    return q_TNRY, row_T1RY[..., :half], row_T1RY[..., half:]


def output_projection(layer_attn_params: dict, config: ModelConfig, x_TD: jax.Array,
                      out_TNH: jax.Array, *, matmul_backend: str = "reference") -> jax.Array:
    """The attention output's o projection (and bias) plus the residual x_TD -> h_TD. MLA:
    out is the latent [T, N, R], brought to v_head_dim per head by W_uv first."""
    p, c = layer_attn_params, config
    T = x_TD.shape[0]
    if c.is_mla:
        _, w_uv_RNH = _mla_up_proj(p, c)
        out_TNH = jnp.einsum("tnr,rnh->tnh", out_TNH.astype(x_TD.dtype), w_uv_RNH)
    y_TD = _matmul(out_TNH.reshape(T, c.q_size).astype(x_TD.dtype), p["wo_LQD"], matmul_backend)
    if "bo_LD" in p:
        y_TD = y_TD + p["bo_LD"]
    return x_TD + y_TD


def attention_block(layer_attn_params: dict, config: ModelConfig, x_TD: jax.Array,
                    positions_T: jax.Array, layer_idx, attention_fn: AttentionFn, kv_cache, *,
                    matmul_backend: str = "reference"):
    """One layer's attention half (residual included) -> (kv_cache, h_TD)."""
    q_TNH, k_TKH, v_TKH = qkv_projection(layer_attn_params, config, x_TD, positions_T, matmul_backend=matmul_backend)
    out_TNH, kv_cache = attention_fn(q_TNH, k_TKH, v_TKH, layer_idx, kv_cache,
                                     **layer_attention_options(layer_attn_params, config, layer_idx))
    return kv_cache, output_projection(layer_attn_params, config, x_TD, out_TNH, matmul_backend=matmul_backend)


def _swiglu_f32(x_TD: jax.Array, w1_DF2, w2_FD, backend: str = "reference") -> jax.Array:
    """SwiGLU with [gate | up] in w1, float32 accumulation; w1/w2 may be a block of F (their
    output is then that block's share of the sum), arrays or one-group ExpertRows (`_matmul`)."""
    F = w2_FD.shape[-2]
    h_TF2 = _matmul(x_TD, w1_DF2, backend, jnp.float32)
    act_TF = (jax.nn.silu(h_TF2[:, :F]) * h_TF2[:, F:]).astype(x_TD.dtype)
    return _matmul(act_TF, w2_FD, backend, jnp.float32)


def _fused_moe(x_TD, router_logits_TE, w1_EDF2, w2_EFD, top_k, *, renormalize, backend, expert_offset,
               token_mask, routing, score_bias, activation, b1, b2):
    kw = dict(renormalize=renormalize, expert_offset=expert_offset, token_mask=token_mask, routing=routing,
              score_bias=score_bias, activation=activation, b1=b1, b2=b2)
    if backend == "reference":
        return fused_moe_reference(x_TD, router_logits_TE, as_array(w1_EDF2), as_array(w2_EFD), top_k, **kw)
    from pallas_kernels.fused_moe import fused_moe
    return fused_moe(x_TD, router_logits_TE, w1_EDF2, w2_EFD, top_k, backend=backend, **kw)


def ffn_input(layer_ffn_params: dict, config: ModelConfig, kind: str, h_TD: jax.Array, *,
              matmul_backend: str = "reference") -> tuple:
    """(x_TD, router_logits_TE or None): the FFN's input norm and, for a MoE layer, the router
    logits: what the experts of `ffn_partial` read. Needs only the layer's norm (and router)."""
    p, c = layer_ffn_params, config
    x_TD = rms_norm(h_TD, p["norm_LD"], c.rms_norm_eps)
    if kind == "dense":
        return x_TD, None
    if kind != "moe":
        raise ValueError(f"ffn kind must be 'moe' or 'dense', got {kind!r}")
    router_logits_TE = _matmul(x_TD, p["router_LDE"], matmul_backend)
    if c.router_bias:
        router_logits_TE = router_logits_TE + p["router_bias_LE"]
    return x_TD, router_logits_TE


def ffn_partial(layer_ffn_params: dict, config: ModelConfig, kind: str, h_TD: jax.Array, *,
                moe_backend: str = "reference", expert_offset=None, token_mask_T=None) -> jax.Array:
    """One layer's FFN output (post-attention norm, then MoE with optional shared expert, or a
    dense SwiGLU; no residual), float32: `ffn_input` then `ffn_output`.

    The one definition of the FFN half, for whole weights and for a device's shard of them:
    `expert_offset` (traced ok) says the expert stacks hold experts [expert_offset,
    expert_offset + E_local) of the router's E (pairs routed elsewhere read nothing), and the
    dense / shared-expert matrices and the experts' F may be a contiguous block of F ([gate |
    up] aligned). The sum of the shards' outputs is the layer's FFN output. A MoE layer's
    w1_LEDF2 / w2_LEFD may be `ExpertRows` (read in place by the kernels).
    """
    x_TD, router_logits_TE = ffn_input(layer_ffn_params, config, kind, h_TD, matmul_backend=moe_backend)
    return ffn_output(layer_ffn_params, config, kind, x_TD, router_logits_TE, moe_backend=moe_backend,
                      expert_offset=expert_offset, token_mask_T=token_mask_T)


def ffn_output(layer_ffn_params: dict, config: ModelConfig, kind: str, x_TD: jax.Array, router_logits_TE, *,
               moe_backend: str = "reference", expert_offset=None, token_mask_T=None) -> jax.Array:
    """The FFN (or a device's shard of it, as `ffn_partial` says) of its normed input `x_TD` and
    router logits (`ffn_input`), float32; needs no norm or router weights."""
    p, c = layer_ffn_params, config
    if kind == "dense":
        return _swiglu_f32(x_TD, p["w1_LDF2"], p["w2_LFD"], moe_backend)
    if kind != "moe":
        raise ValueError(f"ffn kind must be 'moe' or 'dense', got {kind!r}")
    y_TD = _fused_moe(x_TD, router_logits_TE, p["w1_LEDF2"], p["w2_LEFD"], c.top_k, renormalize=c.norm_topk_prob,
                      backend=moe_backend, expert_offset=expert_offset, token_mask=token_mask_T,
                      routing=c.routing, score_bias=p.get("score_bias_LE"), activation=c.expert_activation,
                      b1=p.get("b1_LEF2"), b2=p.get("b2_LED")).astype(jnp.float32)
    if c.shared_expert_intermediate_size:
        shared_TD = _swiglu_f32(x_TD, p["shared_w1_LDF2"], p["shared_w2_LFD"], moe_backend)
        if c.shared_expert_gate:
            shared_TD = jax.nn.sigmoid(_matmul(x_TD, p["shared_gate_LD1"], moe_backend, jnp.float32)) * shared_TD
        y_TD = y_TD + shared_TD
    return y_TD


def ffn_block(layer_ffn_params: dict, config: ModelConfig, kind: str, h_TD: jax.Array, *,
              moe_backend: str = "reference", token_mask_T=None) -> jax.Array:
    """One layer's FFN half with the residual -> out_TD (whole weights; `ffn_partial`)."""
    return h_TD + ffn_partial(layer_ffn_params, config, kind, h_TD, moe_backend=moe_backend,
                              token_mask_T=token_mask_T).astype(h_TD.dtype)


def reads_in_place(name: str, shape) -> bool:
    """Whether the layer loops (`forward`, the split program's `layout.layer_rows`) read the
    stacked weight `name` (a leaf, or "<kind>/<leaf>") of `shape` layer by layer in place: the
    expert stacks, and the stacked matrices the matmul kernel tiles (`fused_moe.layer_matmul`;
    a one-column gate or a 3-expert router stays a slice, on XLA's dot)."""
    leaf = name.rsplit("/", 1)[-1]
    return leaf in EXPERT_LEAVES or (leaf in MATRIX_LEAVES and gpu_supports(int(shape[-2]), int(shape[-1])))


def _layer_rows(name: str, stack_L, layer) -> ExpertRows:
    """Layer `layer` of a stacked matrix ([L, K, N]: one group) or expert stack ([L, E, K, N])."""
    return ExpertRows.of_stack(stack_L if name in EXPERT_LEAVES else stack_L[:, None], layer)


def _layer_slice(stack: dict, i) -> dict:
    """Layer i of a stack; the matrices and expert stacks as ExpertRows (no slice)."""
    return {k: _layer_rows(k, a, i) if reads_in_place(k, a.shape) else a[i] for k, a in stack.items()}


def _split_stacks(stack: dict) -> tuple[dict, dict]:
    """(the leaves read in place, the leaves the layer scan slices)."""
    return ({k: a for k, a in stack.items() if reads_in_place(k, a.shape)},
            {k: a for k, a in stack.items() if not reads_in_place(k, a.shape)})


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

        attn_in_place, attn_per_layer = _split_stacks(kv_params["attn"])
        ffn_in_place, ffn_per_layer = _split_stacks(ffn_params[kind])

        def body(carry, xs):
            x, cache = carry
            attn_p, ffn_p, l = xs
            attn_p = {**attn_p, **{k: _layer_rows(k, a, l) for k, a in attn_in_place.items()}}
            ffn_p = {**ffn_p, **{k: _layer_rows(k, a, l) for k, a in ffn_in_place.items()}}
            cache, h = attention_block(attn_p, c, x, positions_T, l, attention_fn, cache, matmul_backend=moe_backend)
            return (ffn_block(ffn_p, c, kind, h, moe_backend=moe_backend, token_mask_T=token_mask_T), cache), None

        xs = (attn_per_layer, ffn_per_layer, jnp.arange(c.num_layers, dtype=jnp.int32))
        (x_TD, kv_cache), _ = jax.lax.scan(body, (x_TD, kv_cache), xs)
    else:
        for l in range(c.num_layers):
            kind = c.ffn_kind(l)
            kv_cache, h_TD = attention_block(_layer_slice(kv_params["attn"], l), c, x_TD, positions_T,
                                             l, attention_fn, kv_cache, matmul_backend=moe_backend)
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

    Uses `dense_causal_attention` with the config's `attention_options`; one compile per shape.
    """
    from crosspool_jax.models.attention import dense_causal_attention
    attn = dense_causal_attention(segment_ids_T, positions_T, **attention_options(config))
    _, hidden_TD = forward(kv_params, ffn_params, config, token_ids_T, positions_T, attn, None,
                           moe_backend=moe_backend)
    return compute_logits(kv_params, config, hidden_TD)
