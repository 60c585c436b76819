"""The experts a decode step actually reaches: the routing of generated sequences, replayed.

A decode step of B sequences reads, at every MoE layer, the experts that the B tokens it feeds
route to. `replay_routing` replays finished sequences (prompt + output) through the model's layers,
whole-sequence attention and no KV cache, and returns every token's top-k expert ids at every
MoE layer, chosen by the same `route` the MoE kernels run (and the final hidden states, which
equal `transformer.forward`'s); `distinct_experts_per_step`
counts, at each decode position, the distinct experts the sequences reach together, averaged
over positions and MoE layers: what `roofline.decode_step_bytes(experts_touched=)` takes in
place of the uniform-routing estimate. One jitted program per layer kind (the layer index is
data), the layer's weights sliced from the stacks (a copy of one layer at a time).
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from crosspool_jax.models.attention import dense_causal_attention
from crosspool_jax.models.config import ModelConfig
from crosspool_jax.models.transformer import attention_block, attention_options, ffn_input, ffn_output, rms_norm
from pallas_kernels.fused_moe.reference import route


@functools.partial(jax.jit, static_argnames=("config", "kind", "moe_backend"))
def _layer(attn_p: dict, ffn_p: dict, x_TD: jax.Array, positions_T: jax.Array, layer_idx: jax.Array, *,
           config: ModelConfig, kind: str, moe_backend: str):
    """One layer -> (its output, the tokens' expert ids [T, top_k] or None for a dense layer)."""
    attn = dense_causal_attention(jnp.zeros_like(positions_T), positions_T, **attention_options(config))
    _, h_TD = attention_block(attn_p, config, x_TD, positions_T, layer_idx, attn, None)
    xn_TD, logits_TE = ffn_input(ffn_p, config, kind, h_TD)        # `ffn_block`, its router read once
    ids_TK = None
    if kind == "moe":
        _, ids_TK = route(logits_TE, config.top_k, renormalize=config.norm_topk_prob, routing=config.routing,
                          score_bias_E=ffn_p.get("score_bias_LE"))
    y_TD = ffn_output(ffn_p, config, kind, xn_TD, logits_TE, moe_backend=moe_backend)
    return h_TD + y_TD.astype(h_TD.dtype), ids_TK


def replay_routing(kv_params: dict, ffn_params: dict, config: ModelConfig, sequences: Sequence[Sequence[int]], *,
                   moe_backend: str = "reference") -> list[tuple[np.ndarray, jax.Array]]:
    """Per sequence: (int32 [MoE layers, its tokens, top_k]: the experts each of its tokens is
    routed to at every MoE layer, its hidden states after the final norm). Each layer's weights
    are sliced once for all the sequences; moe_backend: the kernels that compute the FFN
    outputs the next layers read."""
    if not sequences or any(not len(s) for s in sequences):
        raise ValueError("replay_routing: needs sequences of at least one token")
    positions = [jnp.arange(len(s), dtype=jnp.int32) for s in sequences]
    xs = [kv_params["embed"]["embedding_VD"][jnp.asarray(s, jnp.int32)] for s in sequences]
    routes: list[list[np.ndarray]] = [[] for _ in sequences]
    for layer in range(config.num_layers):
        kind = config.ffn_kind(layer)
        attn_p = jax.tree.map(lambda a: a[layer], kv_params["attn"])
        ffn_p = jax.tree.map(lambda a: a[config.ffn_index(layer)], ffn_params[kind])     # noqa: B023
        for b, positions_T in enumerate(positions):
            xs[b], ids_TK = _layer(attn_p, ffn_p, xs[b], positions_T, jnp.int32(layer), config=config, kind=kind,
                                   moe_backend=moe_backend)
            if ids_TK is not None:
                routes[b].append(np.asarray(ids_TK))
    if not routes[0]:
        raise ValueError("replay_routing: the model has no MoE layer")
    return [(np.stack(r), rms_norm(x_TD, kv_params["final"]["norm_D"], config.rms_norm_eps))
            for r, x_TD in zip(routes, xs)]


def distinct_experts_per_step(routes: Sequence[np.ndarray], positions: Sequence[int]) -> float:
    """The mean, over `positions` and MoE layers, of the distinct experts that the sequences'
    tokens at each position reach together (routes[b]: `replay_routing`'s routes of sequence b, which
    must hold every position): the experts per MoE layer of a decode step feeding those
    tokens."""
    positions = list(positions)
    if not routes or not positions:
        raise ValueError("distinct_experts_per_step: needs at least one sequence and one position")
    short = [len(r[0]) for r in routes if len(r[0]) <= max(positions)]
    if short:
        raise ValueError(f"distinct_experts_per_step: a sequence of {short[0]} tokens has no position "
                         f"{max(positions)}")
    picked_BMPK = np.stack([r[:, positions, :] for r in routes])            # [B, layers, positions, top_k]
    B, M, P, K = picked_BMPK.shape
    ids_MPX = np.sort(picked_BMPK.transpose(1, 2, 0, 3).reshape(M, P, B * K), axis=-1)
    distinct_MP = 1 + np.count_nonzero(np.diff(ids_MPX, axis=-1), axis=-1)
    return float(distinct_MP.mean())


__all__ = ["distinct_experts_per_step", "replay_routing"]
