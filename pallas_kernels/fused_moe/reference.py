"""Pure-jnp MoE: routing, grouped matmul and the fused MoE layer (the oracle).

Shapes use the project's dimension letters (WORKSPACE.md): T tokens, D model dim,
E experts, F expert hidden dim, M rows sorted by expert, N output columns.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

ACTIVATIONS = ("silu", "gelu")
SCORINGS = ("softmax", "sigmoid")
GROUP_SCORES = ("max", "top2_sum")


@dataclasses.dataclass(frozen=True)
class Routing:
    """How router logits become each token's top_k (weight, expert) pairs, beyond the plain
    softmax top-k (hashable: a static argument of the jitted paths).

    scoring: "softmax" over the experts or an independent "sigmoid" per expert. Group-limited
    top-k (num_groups > 1): the experts form num_groups equal consecutive groups, each scored
    by group_score ("max": its best choice score, DeepSeek-V2; "top2_sum": the sum of its two
    best, DeepSeek-V3), and only the experts of the topk_groups best groups are eligible.
    scale multiplies the final weights (routed_scaling_factor). Renormalising the k weights
    stays the callers' `renormalize` flag. A per-expert score bias (DeepSeek-V3's
    e_score_correction_bias) is data: `route(..., score_bias_E=)` adds it to the scores for
    the choice only; the weights are the unbiased scores.
    """

    scoring: str = "softmax"
    num_groups: int = 1
    topk_groups: int = 1
    group_score: str = "max"
    scale: float = 1.0

    def __post_init__(self):
        if self.scoring not in SCORINGS:
            raise ValueError(f"Routing.scoring must be one of {SCORINGS}, got {self.scoring!r}")
        if self.group_score not in GROUP_SCORES:
            raise ValueError(f"Routing.group_score must be one of {GROUP_SCORES}, got {self.group_score!r}")
        if self.num_groups < 1 or not 1 <= self.topk_groups <= self.num_groups:
            raise ValueError(f"Routing: need 1 <= topk_groups <= num_groups, got {self.topk_groups}, "
                             f"{self.num_groups}")


SOFTMAX_TOPK = Routing()


def route(router_logits_TE: jax.Array, top_k: int, *, renormalize: bool, routing: Routing = SOFTMAX_TOPK,
          score_bias_E=None):
    """Scores (float32), group limit, top-k by the (biased) choice scores, weights from the
    unbiased scores, optional renormalisation (sigmoid: sum + 1e-20, as DeepSeek-V3), scale.

    Returns (weights_TK float32, expert_ids_TK int32).
    """
    T, E = router_logits_TE.shape
    logits_TE = router_logits_TE.astype(jnp.float32)
    scores_TE = jax.nn.softmax(logits_TE, axis=-1) if routing.scoring == "softmax" else jax.nn.sigmoid(logits_TE)
    choice_TE = scores_TE if score_bias_E is None else scores_TE + score_bias_E.astype(jnp.float32)
    if routing.num_groups > 1:
        G = routing.num_groups
        if E % G or top_k > routing.topk_groups * (E // G):
            raise ValueError(f"route: {E} experts in {G} groups, best {routing.topk_groups} of them, "
                             f"cannot hold top_k={top_k}")
        grouped_TGX = choice_TE.reshape(T, G, E // G)
        if routing.group_score == "max":
            group_TG = jnp.max(grouped_TGX, axis=-1)
        else:
            group_TG = jnp.sum(jax.lax.top_k(grouped_TGX, 2)[0], axis=-1)
        _, best_TB = jax.lax.top_k(group_TG, routing.topk_groups)
        keep_TG = jnp.any(best_TB[:, :, None] == jnp.arange(G)[None, None, :], axis=1)
        choice_TE = jnp.where(jnp.repeat(keep_TG, E // G, axis=1), choice_TE, -jnp.inf)
    _, ids_TK = jax.lax.top_k(choice_TE, top_k)
    weights_TK = jnp.take_along_axis(scores_TE, ids_TK, axis=-1)
    if renormalize:
        denom_TK = jnp.sum(weights_TK, axis=-1, keepdims=True)
        weights_TK = weights_TK / (denom_TK + 1e-20 if routing.scoring == "sigmoid" else denom_TK)
    if routing.scale != 1.0:
        weights_TK = weights_TK * routing.scale
    return weights_TK, ids_TK.astype(jnp.int32)


def route_topk(router_logits_TE: jax.Array, top_k: int, *, renormalize: bool):
    """Softmax over experts (in float32), then top-k; optionally renormalise the k weights.

    This is the routing of Mixtral (renormalize=True), Qwen2-MoE / Qwen3-MoE / OLMoE
    (renormalize = the config's `norm_topk_prob`): `route` with the default `Routing`.
    Returns (weights_TK float32, expert_ids_TK int32).
    """
    return route(router_logits_TE, top_k, renormalize=renormalize)


def grouped_matmul_reference(lhs_MK: jax.Array, rhs_GKN: jax.Array, group_sizes_G: jax.Array,
                             *, preferred_element_type=None) -> jax.Array:
    """lax.ragged_dot's meaning: rows of lhs are grouped consecutively; group g uses rhs[g]."""
    return jax.lax.ragged_dot(lhs_MK, rhs_GKN, group_sizes_G.astype(jnp.int32),
                              preferred_element_type=preferred_element_type)


@dataclasses.dataclass(frozen=True)
class ClampedSwiGLU:
    """GPT-OSS's gated activation (transformers' GptOssExperts): g = min(gate, limit),
    (clip(up, -limit, limit) + 1) * g * sigmoid(alpha * g). Hashable: a static activation."""

    alpha: float = 1.702
    limit: float = 7.0


def gated_activation(gate, up, activation):
    """act(gate) * up for "silu" / exact "gelu", or a `ClampedSwiGLU`."""
    if isinstance(activation, ClampedSwiGLU):
        g = jnp.minimum(gate, activation.limit)
        return (jnp.clip(up, -activation.limit, activation.limit) + 1) * g * jax.nn.sigmoid(activation.alpha * g)
    if activation == "silu":
        return jax.nn.silu(gate) * up
    if activation == "gelu":
        return jax.nn.gelu(gate, approximate=False) * up
    raise ValueError(f"activation must be one of {ACTIVATIONS} or a ClampedSwiGLU, got {activation!r}")


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
                        activation: str = "silu", expert_offset=None, token_mask=None,
                        routing: Routing = SOFTMAX_TOPK, score_bias=None, b1=None, b2=None) -> jax.Array:
    """Sort (token, k) pairs by expert, two grouped matmuls, weighted combine.

    w1 holds [gate | up] along its last axis: w1[e] = concat(gate_e, up_e) of shape [D, 2F].
    Accumulates in float32; the result has x's dtype. expert_offset (int, traced ok): w1/w2
    hold experts [expert_offset, expert_offset + E_local) of the router's E; pairs routed
    elsewhere contribute nothing (expert parallelism: the sum over the slices is the layer).
    token_mask (bool [T], traced ok): tokens where it is False (padding) read no expert and
    their output is zero. routing / score_bias (float [E]): see `Routing` and `route`.
    b1 [E, 2F] (gate | up) and b2 [E, D] (optional, the experts' biases, sliced like w1/w2)
    are added after each grouped matmul, before the activation and the routing weight.
    """
    T, D = x_TD.shape
    E = w1_EDF2.shape[0]
    F = w2_EFD.shape[1]
    weights_TK, ids_TK = route(router_logits_TE, top_k, renormalize=renormalize, routing=routing,
                               score_bias_E=score_bias)
    ids_TK = local_expert_ids(ids_TK, expert_offset, E, token_mask)    # E: not local or padding, dropped
    flat_ids = ids_TK.reshape(-1)                                  # [T*K]
    order = jnp.argsort(flat_ids, stable=True)                     # [T*K]
    token_of_row = order // top_k                                  # [T*K]
    group_sizes_E = jnp.bincount(flat_ids, length=E).astype(jnp.int32)
    x_sorted = x_TD[token_of_row]                                  # [T*K, D]
    h = grouped_matmul_reference(x_sorted, w1_EDF2, group_sizes_E,
                                 preferred_element_type=jnp.float32)
    expert_of_row = flat_ids[order]                                # E: dropped pair
    if b1 is not None:
        h = h + jnp.take(b1, expert_of_row, axis=0, mode="fill", fill_value=0).astype(jnp.float32)
    gate, up = h[:, :F], h[:, F:]
    act = gated_activation(gate, up, activation).astype(x_TD.dtype)
    y = grouped_matmul_reference(act, w2_EFD, group_sizes_E, preferred_element_type=jnp.float32)
    if b2 is not None:
        y = y + jnp.take(b2, expert_of_row, axis=0, mode="fill", fill_value=0).astype(jnp.float32)
    w_rows = jnp.where(flat_ids < E, weights_TK.reshape(-1), 0.0)[order]
    out = jnp.zeros((T, D), jnp.float32).at[token_of_row].add(y * w_rows[:, None])
    return out.astype(x_TD.dtype)
