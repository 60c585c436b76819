"""MoE routing on the GPU in one Pallas (Triton-lowered) kernel: softmax over the experts,
top-k, optional renormalisation, as reference.route_topk computes them.

Why a kernel: XLA runs this as a softmax fusion, a sort (its top-k on a GPU), a second
softmax-shaped fusion for the renormalisation and a copy, four launches worth ~7 us per MoE
layer at one token on an H200 (scripts/profile_kernels.py, RESULTS.md), more than a third of
what the weights of a Qwen3-30B-A3B layer take to stream. Here one program routes `BLOCK_T`
token(s): the row of E logits sits in registers ([BLOCK_T, next_pow2(E)] f32), and top-k is k
rounds of "max, then the lowest expert index holding it, then knock it out": the ties rule of
lax.top_k (equal values: the lower index first), so the ids match the reference wherever the
probabilities do. Probabilities come from exp(x - max) / sum, as jax.nn.softmax computes them
(a few ulps apart from XLA's, so only near-ties can order differently).

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
from pallas_kernels.pow2 import next_pow2

# Tokens per program: one. The k rounds of reductions over a row are latency-bound, so rows
# of one program run their rounds serially; a row per program lets them run in parallel
# (RESULTS.md has the timings).
BLOCK_T = 1


def _route_kernel(logits_ref, w_ref, ids_ref, *, T: int, E: int, top_k: int, renormalize: bool,
                  block_t: int, Ep: int, Kp: int, interpret: bool):
    i = pl.program_id(0)
    r = jnp.arange(block_t, dtype=jnp.int32)
    t = i * block_t + r
    t_ok = t < T
    tc = jnp.minimum(t, T - 1)
    e = jnp.arange(Ep, dtype=jnp.int32)
    e_ok = e < E
    x = pltriton.load(logits_ref.at[tc[:, None], jnp.minimum(e, E - 1)[None, :]],
                      mask=jnp.broadcast_to(e_ok[None, :], (block_t, Ep)), other=0.0)
    x = jnp.where(e_ok[None, :], x.astype(jnp.float32), -jnp.inf)
    ex = jnp.exp(x - jnp.max(x, axis=1, keepdims=True))
    p = ex / jnp.sum(ex, axis=1, keepdims=True)
    p = jnp.where(e_ok[None, :], p, -1.0)                 # padding experts are never picked
    kc = jnp.arange(Kp, dtype=jnp.int32)
    w = jnp.zeros((block_t, Kp), jnp.float32)
    ids = jnp.zeros((block_t, Kp), jnp.int32)
    for j in range(top_k):
        m = jnp.max(p, axis=1)
        pick = jnp.min(jnp.where(p == m[:, None], e[None, :], Ep), axis=1)   # lowest index
        w = jnp.where(kc[None, :] == j, m[:, None], w)
        ids = jnp.where(kc[None, :] == j, pick[:, None], ids)
        p = jnp.where(e[None, :] == pick[:, None], -1.0, p)                 # knocked out
    if renormalize:
        w = w / jnp.sum(jnp.where(kc[None, :] < top_k, w, 0.0), axis=1, keepdims=True)
    ok = t_ok[:, None] & (kc < top_k)[None, :]
    store_cells(w_ref, t, kc, w, ok, live_shape=(T, top_k), interpret=interpret)
    store_cells(ids_ref, t, kc, ids, ok, live_shape=(T, top_k), interpret=interpret)


@functools.partial(jax.jit, static_argnames=("top_k", "renormalize", "interpret"))
def route_topk_gpu(router_logits_TE: jax.Array, top_k: int, *, renormalize: bool,
                   interpret: bool = False):
    """(weights_TK float32, expert_ids_TK int32), as reference.route_topk."""
    T, E = router_logits_TE.shape
    bt = min(BLOCK_T, next_pow2(T))
    Ep, Kp = next_pow2(E), next_pow2(top_k)
    rows, cols = cells_shape((T, top_k), (bt, Kp), interpret)
    kernel = functools.partial(_route_kernel, T=T, E=E, top_k=top_k, renormalize=renormalize,
                               block_t=bt, Ep=Ep, Kp=Kp, interpret=interpret)
    whole = lambda shape: pl.BlockSpec(shape, lambda i: (0,) * len(shape))   # noqa: E731
    w, ids = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(T, bt),),
        in_specs=[whole((T, E))],
        out_specs=[whole((rows, cols)), whole((rows, cols))],
        out_shape=[jax.ShapeDtypeStruct((rows, cols), jnp.float32),
                   jax.ShapeDtypeStruct((rows, cols), jnp.int32)],
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="crosspool_moe_route",
    )(router_logits_TE)
    return w[:T, :top_k], ids[:T, :top_k]
