"""MoE routing on the GPU in one Pallas (Triton-lowered) kernel, as reference.route computes
it for every `Routing`: softmax or sigmoid scores, a choice-only score bias, group-limited
top-k (groups scored by their best or their two best choice scores), top-k, optional
renormalisation, scale.

Why a kernel: XLA runs the plain softmax top-k as a softmax fusion, a sort (its top-k on a
GPU), a second softmax-shaped fusion for the renormalisation and a copy, four launches worth
~7 us per MoE layer at one token on an H200 (scripts/profile_kernels.py, RESULTS.md), more
than a third of what the weights of a Qwen3-30B-A3B layer take to stream; group-limited
routing adds a second top-k and its masks. Here one program routes `BLOCK_T` token(s): the row
of E logits sits in registers ([BLOCK_T, next_pow2(E)] f32). Every top-k (the groups', then
the experts') is k rounds of "max, then the lowest index holding it, then knock it out": the
ties rule of lax.top_k (equal values: the lower index first), so the ids match the reference
wherever the scores do. A group's "top2_sum" is its max plus the max left after knocking out
the first one (lax.top_k's two best). The weights are the unbiased scores of the picked
experts. Softmax probabilities come from exp(x - max) / sum, as jax.nn.softmax computes them,
and sigmoid from 1 / (1 + exp(-x)) (a few ulps apart from XLA's, so only near-ties can order
differently).

Outputs: weights [T, k] f32 and ids [T, k] int32, stored by gpu.store_cells (which gives
masked lanes cells of their own under interpret mode).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.fused_moe.gpu import cells_shape, store_cells
from pallas_kernels.fused_moe.reference import SOFTMAX_TOPK, Routing
from pallas_kernels.pow2 import next_pow2

# Tokens per program: one. The k rounds of reductions over a row are latency-bound, so rows
# of one program run their rounds serially; a row per program lets them run in parallel
# (RESULTS.md has the timings).
BLOCK_T = 1
_OUT = -1e30          # a knocked-out or ineligible choice (finite: sums of two stay finite)


def _take_best(vals, idx, n_out, rounds):
    """`rounds` rounds of (max, its lowest index, knock it out) over vals [bt, n] (index
    row idx [n]); -> list of picked indices [bt] per round."""
    picks = []
    for _ in range(rounds):
        m = jnp.max(vals, axis=1)
        pick = jnp.min(jnp.where(vals == m[:, None], idx[None, :], n_out), axis=1)
        vals = jnp.where(idx[None, :] == pick[:, None], _OUT, vals)
        picks.append(pick)
    return picks


def _route_kernel(logits_ref, *refs, T: int, E: int, top_k: int, renormalize: bool, routing: Routing,
                  has_bias: bool, block_t: int, Ep: int, Kp: int, interpret: bool):
    # logits_ref [T, E]; with a bias: bias_ref [E] (added to the scores for the choice only);
    # w_ref / ids_ref: cells_shape((T, top_k), ...) f32 / int32.
    bias_ref, w_ref, ids_ref = refs if has_bias else (None, *refs)
    i = pl.program_id(0)
    r = jnp.arange(block_t, dtype=jnp.int32)
    t = i * block_t + r
    t_ok = t < T
    tc = jnp.minimum(t, T - 1)
    e = jnp.arange(Ep, dtype=jnp.int32)
    e_ok = e < E
    ec = jnp.minimum(e, E - 1)
    x = pltriton.load(logits_ref.at[tc[:, None], ec[None, :]],
                      mask=jnp.broadcast_to(e_ok[None, :], (block_t, Ep)), other=0.0)
    x = jnp.where(e_ok[None, :], x.astype(jnp.float32), -jnp.inf)
    if routing.scoring == "softmax":
        ex = jnp.exp(x - jnp.max(x, axis=1, keepdims=True))
        scores = ex / jnp.sum(ex, axis=1, keepdims=True)
    else:
        scores = 1.0 / (1.0 + jnp.exp(-x))
    choice = scores
    if has_bias:
        choice = choice + pltriton.load(bias_ref.at[ec], mask=e_ok, other=0.0).astype(jnp.float32)[None, :]
    choice = jnp.where(e_ok[None, :], choice, _OUT)           # padding experts are never picked
    if routing.num_groups > 1:
        G, size = routing.num_groups, E // routing.num_groups
        Gp = next_pow2(G)
        gi = jnp.arange(Gp, dtype=jnp.int32)
        group = e // size                                      # padding experts: >= G
        group_score = jnp.full((block_t, Gp), _OUT, jnp.float32)
        for g in range(G):
            vals = jnp.where((group == g)[None, :], choice, _OUT)
            if routing.group_score == "max":
                score = jnp.max(vals, axis=1)
            else:                                              # top2_sum: the two best
                first, second = _take_best(vals, e, Ep, 2)
                score = (jnp.sum(jnp.where(e[None, :] == first[:, None], vals, 0.0), axis=1)
                         + jnp.sum(jnp.where(e[None, :] == second[:, None], vals, 0.0), axis=1))
            group_score = jnp.where(gi[None, :] == g, score[:, None], group_score)
        keep = jnp.zeros((block_t, Ep), jnp.bool_)
        for pick in _take_best(group_score, gi, Gp, routing.topk_groups):
            keep = keep | (group[None, :] == pick[:, None])
        choice = jnp.where(keep, choice, _OUT)
    kc = jnp.arange(Kp, dtype=jnp.int32)
    w = jnp.zeros((block_t, Kp), jnp.float32)
    ids = jnp.zeros((block_t, Kp), jnp.int32)
    for j, pick in enumerate(_take_best(choice, e, Ep, top_k)):
        weight = jnp.sum(jnp.where(e[None, :] == pick[:, None], scores, 0.0), axis=1)   # unbiased
        w = jnp.where(kc[None, :] == j, weight[:, None], w)
        ids = jnp.where(kc[None, :] == j, pick[:, None], ids)
    if renormalize:
        denom = jnp.sum(jnp.where(kc[None, :] < top_k, w, 0.0), axis=1, keepdims=True)
        w = w / (denom + 1e-20 if routing.scoring == "sigmoid" else denom)
    if routing.scale != 1.0:
        w = w * routing.scale
    ok = t_ok[:, None] & (kc < top_k)[None, :]
    store_cells(w_ref, t, kc, w, ok, live_shape=(T, top_k), interpret=interpret)
    store_cells(ids_ref, t, kc, ids, ok, live_shape=(T, top_k), interpret=interpret)


@functools.partial(jax.jit, static_argnames=("top_k", "renormalize", "interpret", "routing"))
def route_topk_gpu(router_logits_TE: jax.Array, top_k: int, *, renormalize: bool,
                   interpret: bool = False, routing: Routing = SOFTMAX_TOPK, score_bias_E=None):
    """(weights_TK float32, expert_ids_TK int32), as reference.route (routing and score_bias_E
    as there; the plain softmax top-k by default)."""
    T, E = router_logits_TE.shape
    if routing.num_groups > 1 and (E % routing.num_groups
                                   or top_k > routing.topk_groups * (E // routing.num_groups)):
        raise ValueError(f"route_topk_gpu: {E} experts in {routing.num_groups} groups, best "
                         f"{routing.topk_groups} of them, cannot hold top_k={top_k}")
    bt = min(BLOCK_T, next_pow2(T))
    Ep, Kp = next_pow2(E), next_pow2(top_k)
    rows, cols = cells_shape((T, top_k), (bt, Kp), interpret)
    has_bias = score_bias_E is not None
    kernel = functools.partial(_route_kernel, T=T, E=E, top_k=top_k, renormalize=renormalize,
                               routing=routing, has_bias=has_bias, block_t=bt, Ep=Ep, Kp=Kp,
                               interpret=interpret)
    whole = lambda shape: pl.BlockSpec(shape, lambda i: (0,) * len(shape))   # noqa: E731
    args = [router_logits_TE] + ([score_bias_E] if has_bias else [])
    w, ids = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(T, bt),),
        in_specs=[whole(a.shape) for a in args],
        out_specs=[whole((rows, cols)), whole((rows, cols))],
        out_shape=[jax.ShapeDtypeStruct((rows, cols), jnp.float32),
                   jax.ShapeDtypeStruct((rows, cols), jnp.int32)],
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="crosspool_moe_route",
    )(*args)
    return w[:T, :top_k], ids[:T, :top_k]
