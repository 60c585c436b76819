"""Pure-jnp MoE: routing, grouped matmul and the fused MoE layer (the oracle).

Shapes use the project's dimension letters (WORKSPACE.md): T tokens, D model dim,
E experts, F expert hidden dim, M rows sorted by expert, N output columns.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

ACTIVATIONS = ("silu", "gelu")


def route_topk(router_logits_TE: jax.Array, top_k: int, *, renormalize: bool):
    """Softmax over experts (in float32), then top-k; optionally renormalise the k weights.

    This is the routing of Mixtral (renormalize=True), Qwen2-MoE / Qwen3-MoE / OLMoE
    (renormalize = the config's `norm_topk_prob`).
    Returns (weights_TK float32, expert_ids_TK int32).
    """
    probs_TE = jax.nn.softmax(router_logits_TE.astype(jnp.float32), axis=-1)
    weights_TK, ids_TK = jax.lax.top_k(probs_TE, top_k)
    if renormalize:
        weights_TK = weights_TK / jnp.sum(weights_TK, axis=-1, keepdims=True)
    return weights_TK, ids_TK.astype(jnp.int32)


def grouped_matmul_reference(lhs_MK: jax.Array, rhs_GKN: jax.Array, group_sizes_G: jax.Array,
                             *, preferred_element_type=None) -> jax.Array:
    """lax.ragged_dot's meaning: rows of lhs are grouped consecutively; group g uses rhs[g]."""
    return jax.lax.ragged_dot(lhs_MK, rhs_GKN, group_sizes_G.astype(jnp.int32),
                              preferred_element_type=preferred_element_type)


def _activate(gate, activation: str):
    if activation == "silu":
        return jax.nn.silu(gate)
    if activation == "gelu":
        return jax.nn.gelu(gate, approximate=False)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def local_expert_ids(ids_TK: jax.Array, expert_offset, num_local: int, token_mask_T=None) -> jax.Array:
    """Expert ids relative to the local slice [expert_offset, expert_offset + num_local);
    ids outside it, and every id of a token whose token_mask_T is False (padding), become
    num_local (no local expert: the pair is dropped)."""
    if expert_offset is not None:
        local_TK = ids_TK - jnp.asarray(expert_offset, jnp.int32)
        ids_TK = jnp.where((local_TK >= 0) & (local_TK < num_local), local_TK, num_local)
    if token_mask_T is not None:
        ids_TK = jnp.where(token_mask_T[:, None], ids_TK, num_local)
    return ids_TK.astype(jnp.int32)


def fused_moe_reference(x_TD: jax.Array, router_logits_TE: jax.Array, w1_EDF2: jax.Array,
                        w2_EFD: jax.Array, top_k: int, *, renormalize: bool = True,
                        activation: str = "silu", expert_offset=None, token_mask=None) -> jax.Array:
    """Sort (token, k) pairs by expert, two grouped matmuls, weighted combine.

    w1 holds [gate | up] along its last axis: w1[e] = concat(gate_e, up_e) of shape [D, 2F].
    Accumulates in float32; the result has x's dtype. expert_offset (int, traced ok): w1/w2
    hold experts [expert_offset, expert_offset + E_local) of the router's E; pairs routed
    elsewhere contribute nothing (expert parallelism: the sum over the slices is the layer).
    token_mask (bool [T], traced ok): tokens where it is False (padding) read no expert and
    their output is zero.
    """
    T, D = x_TD.shape
    E = w1_EDF2.shape[0]
    F = w2_EFD.shape[1]
    weights_TK, ids_TK = route_topk(router_logits_TE, top_k, renormalize=renormalize)
    ids_TK = local_expert_ids(ids_TK, expert_offset, E, token_mask)    # E: not local or padding, dropped
    flat_ids = ids_TK.reshape(-1)                                  # [T*K]
    order = jnp.argsort(flat_ids, stable=True)                     # [T*K]
    token_of_row = order // top_k                                  # [T*K]
    group_sizes_E = jnp.bincount(flat_ids, length=E).astype(jnp.int32)
    x_sorted = x_TD[token_of_row]                                  # [T*K, D]
    h = grouped_matmul_reference(x_sorted, w1_EDF2, group_sizes_E,
                                 preferred_element_type=jnp.float32)
    gate, up = h[:, :F], h[:, F:]
    act = (_activate(gate, activation) * up).astype(x_TD.dtype)
    y = grouped_matmul_reference(act, w2_EFD, group_sizes_E, preferred_element_type=jnp.float32)
    w_rows = jnp.where(flat_ids < E, weights_TK.reshape(-1), 0.0)[order]
    out = jnp.zeros((T, D), jnp.float32).at[token_of_row].add(y * w_rows[:, None])
    return out.astype(x_TD.dtype)
