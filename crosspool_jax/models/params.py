"""The parameter pytree layout: leaf names and shapes for a `ModelConfig`, random init, byte counts.

The one source of truth for what `kv_params` and `ffn_params` hold (the loader checks
checkpoints against `param_shapes`):

    kv_params = {
      "embed": {"embedding_VD": [V, D]},
      "attn": {                                  # every leaf stacked over the L layers
        "input_norm_LD": [L, D],
        "wq_LDQ": [L, D, N*H], "wk_LDKH": [L, D, K*H], "wv_LDKH": [L, D, K*H],
        "wo_LQD": [L, N*H, D],
        # attention_bias:       "bq_LQ": [L, N*H], "bk_LKH": [L, K*H], "bv_LKH": [L, K*H]
        # qk_norm "per_head":   "q_norm_LH": [L, H], "k_norm_LH": [L, H]
        # qk_norm "full":       "q_norm_LQ": [L, N*H], "k_norm_LKH": [L, K*H]
      },
      # attention_out_bias: "bo_LD": [L, D]; attention_sinks: "sinks_LN": [L, N]
      # MLA (config.is_mla) replaces wq/wk/wv (and their biases) by:
      #   "wq_LDNI": [L, D, N*I] (q_lora_rank 0) | "wq_a_LDA": [L, D, A], "q_a_norm_LA": [L, A],
      #   "wq_b_LANI": [L, A, N*I]; "wkv_a_LDRY": [L, D, R+Y] (latent | rope key),
      #   "kv_a_norm_LR": [L, R], "wkv_b_LRNU": [L, R, N*U] (per head: k nope | v);
      #   wo_LQD with Q = N*v_head_dim; attention_bias: "bq_a_LA" (with the LoRA), "bkv_a_LRY",
      #   "bo_LD". (R kv_lora_rank, A q_lora_rank, I qk_nope + qk_rope, Y qk_rope, U qk_nope + v)
      "final": {"norm_D": [D], "lm_head_DV": [D, V] (only when embeddings are untied)},
    }
    ffn_params = {
      "moe": {                                   # stacked over the MoE layers (L = their count)
        "norm_LD": [L, D], "router_LDE": [L, D, E],
        "w1_LEDF2": [L, E, D, 2F] (gate | up), "w2_LEFD": [L, E, F, D],
        # shared expert: "shared_w1_LDF2": [L, D, 2Fs], "shared_w2_LFD": [L, Fs, D],
        #                "shared_gate_LD1": [L, D, 1] (config.shared_expert_gate)
        # router_score_bias: "score_bias_LE": [L, E] (added to the scores for the choice only)
        # router_bias: "router_bias_LE": [L, E] (added to the logits)
        # expert_bias: "b1_LEF2": [L, E, 2F] (gate | up), "b2_LED": [L, E, D]
      },
      "dense": {"norm_LD": [L, D], "w1_LDF2": [L, D, 2F], "w2_LFD": [L, F, D]},
    }

The post-attention (pre-FFN) norm belongs to the FFN side. Only the FFN kinds the model has
appear in ffn_params.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from crosspool_jax.models.config import ModelConfig


def param_shapes(config: ModelConfig) -> tuple[dict, dict]:
    """(kv_shapes, ffn_shapes): the param pytrees with shape tuples as leaves."""
    c = config
    L, D, V, Q, KH, H = c.num_layers, c.hidden_size, c.vocab_size, c.q_size, c.kv_size, c.head_dim
    if c.is_mla:
        attn = _mla_shapes(c)
    else:
        attn = {"input_norm_LD": (L, D), "wq_LDQ": (L, D, Q), "wk_LDKH": (L, D, KH),
                "wv_LDKH": (L, D, KH), "wo_LQD": (L, Q, D)}
    if c.attention_bias and not c.is_mla:
        attn.update(bq_LQ=(L, Q), bk_LKH=(L, KH), bv_LKH=(L, KH))
    if c.attention_out_bias:
        attn.update(bo_LD=(L, D))
    if c.attention_sinks:
        attn.update(sinks_LN=(L, c.num_heads))
    if c.qk_norm == "per_head":
        attn.update(q_norm_LH=(L, H), k_norm_LH=(L, H))
    elif c.qk_norm == "full":
        attn.update(q_norm_LQ=(L, Q), k_norm_LKH=(L, KH))
    final = {"norm_D": (D,)}
    if not c.tie_word_embeddings:
        final["lm_head_DV"] = (D, V)
    kv = {"embed": {"embedding_VD": (V, D)}, "attn": attn, "final": final}

    ffn = {}
    Lm = c.num_layers_of_kind("moe")
    if Lm:
        E, F = c.num_experts, c.moe_intermediate_size
        moe = {"norm_LD": (Lm, D), "router_LDE": (Lm, D, E),
               "w1_LEDF2": (Lm, E, D, 2 * F), "w2_LEFD": (Lm, E, F, D)}
        Fs = c.shared_expert_intermediate_size
        if Fs:
            moe.update(shared_w1_LDF2=(Lm, D, 2 * Fs), shared_w2_LFD=(Lm, Fs, D))
            if c.shared_expert_gate:
                moe.update(shared_gate_LD1=(Lm, D, 1))
        if c.router_score_bias:
            moe.update(score_bias_LE=(Lm, E))
        if c.router_bias:
            moe.update(router_bias_LE=(Lm, E))
        if c.expert_bias:
            moe.update(b1_LEF2=(Lm, E, 2 * F), b2_LED=(Lm, E, D))
        ffn["moe"] = moe
    Ld = c.num_layers_of_kind("dense")
    if Ld:
        F = c.intermediate_size
        ffn["dense"] = {"norm_LD": (Ld, D), "w1_LDF2": (Ld, D, 2 * F), "w2_LFD": (Ld, F, D)}
    return kv, ffn


def _mla_shapes(c: ModelConfig) -> dict:
    """The attention leaves of an MLA layer stack (module docstring)."""
    L, D, N = c.num_layers, c.hidden_size, c.num_heads
    A, R, Y = c.q_lora_rank, c.kv_lora_rank, c.qk_rope_head_dim
    NI, NU = N * c.qk_head_dim, N * (c.qk_nope_head_dim + c.head_dim)
    attn = {"input_norm_LD": (L, D), "wkv_a_LDRY": (L, D, R + Y), "kv_a_norm_LR": (L, R),
            "wkv_b_LRNU": (L, R, NU), "wo_LQD": (L, c.q_size, D)}
    if A:
        attn.update(wq_a_LDA=(L, D, A), q_a_norm_LA=(L, A), wq_b_LANI=(L, A, NI))
    else:
        attn.update(wq_LDNI=(L, D, NI))
    if c.attention_bias:
        attn.update(bkv_a_LRY=(L, R + Y), bo_LD=(L, D))
        if A:
            attn.update(bq_a_LA=(L, A))
    return attn


_OWN_DRAW = 1 << 24


def _is_norm(name: str) -> bool:
    return "norm" in name


def init_random_params(config: ModelConfig, key: jax.Array, dtype=jnp.bfloat16) -> tuple[dict, dict]:
    """Random weights of the right shapes (for benchmarks and tests): matrices ~ N(0, s^2) with
    s = min(0.02, fan_in^-1/2), norms near 1, biases small. One jitted program per config."""
    return _init_random_params(config, jnp.dtype(dtype), key)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _init_random_params(config: ModelConfig, dtype, key):
    kv_shapes, ffn_shapes = param_shapes(config)
    flat, treedef = jax.tree_util.tree_flatten_with_path(
        (kv_shapes, ffn_shapes), is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(i, int) for i in x))
    sizes = [int(np.prod(shape)) for _, shape in flat]
    # Small leaves slice one shared draw (one RNG kernel to compile, not one per leaf);
    # leaves above _OWN_DRAW elements get their own draw so the shared buffer stays small.
    small = [s if s <= _OWN_DRAW else 0 for s in sizes]
    pool = jax.random.normal(jax.random.fold_in(key, len(flat)), (max(sum(small), 1),), jnp.float32)
    offsets = np.cumsum([0] + small)
    leaves = []
    for i, ((path, shape), start, size) in enumerate(zip(flat, offsets, sizes)):
        name = str(path[-1].key)
        if size <= _OWN_DRAW:
            noise = jax.lax.dynamic_slice_in_dim(pool, int(start), size).reshape(shape)
        else:
            noise = jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32)
        if _is_norm(name):
            leaf = 1.0 + 0.1 * noise
        elif name.startswith("b"):
            leaf = 0.02 * noise
        else:
            fan_in = shape[-2] if len(shape) >= 2 else 1
            leaf = noise * min(0.02, fan_in ** -0.5)
        leaves.append(leaf.astype(dtype))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def side_bytes(config: ModelConfig, dtype) -> tuple[int, int]:
    """(attention side, FFN side) bytes of a model's parameters in `dtype`, from its shapes alone."""
    itemsize = jnp.dtype(dtype).itemsize
    return tuple(itemsize * sum(int(np.prod(s, dtype=np.int64)) for s in
                                jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, tuple)))
                 for shapes in param_shapes(config))


def param_bytes(tree) -> int:
    """Total bytes of all array leaves of a pytree."""
    return int(sum(np.prod(x.shape, dtype=np.int64) * np.dtype(x.dtype).itemsize
                   for x in jax.tree_util.tree_leaves(tree)))
