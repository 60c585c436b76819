"""Public entry points `grouped_matmul` and `fused_moe`: validation, the backend seam, glue.

The one place that picks a backend ("reference" | "gpu" | "tpu" | "auto"). The kernel
backends share the flow: route (softmax, top-k, optional renormalisation), lay the (token, k)
rows out sorted by expert and padded to whole tiles (layout.py), gate/up grouped matmul with
the activation fused, down grouped matmul with the routing weight fused, then each token sums
its top_k rows (a gather, no scatter). The GPU kernels also add the experts' biases in their
epilogues (b1 before the activation, b2 before the routing weight) and compute GPT-OSS's
clamped SwiGLU (activation.gated); the TPU kernels take neither. On the GPU the kernels do the glue themselves (gate/up
gathers its token rows, down reads each row's routing weight, a combine kernel sums the rows
in a fixed order) and routing is one kernel too (routing_gpu.py), so a call is four kernels
plus the layout ops.

Weights (`rhs`, `w1`, `w2`) are arrays or `ExpertRows` (expert_rows.py: a layer of a stacked
weight, or a shard of a bigger buffer, read in place by the GPU kernels; the reference and the
TPU kernels get the materialised slice).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.fused_moe import gpu, tpu, tuning
from pallas_kernels.fused_moe.expert_rows import as_array, as_expert_rows
from pallas_kernels.fused_moe.layout import (build_layout, gather_rows, gmm_layout, scatter_back,
                                             single_token_layout)
from pallas_kernels.fused_moe.routing_gpu import route_topk_gpu
from pallas_kernels.fused_moe.reference import (SOFTMAX_TOPK, ClampedSwiGLU, Routing, fused_moe_reference,
                                                grouped_matmul_reference, local_expert_ids, route)
from pallas_kernels.fused_moe.validation import (check_config, check_expert_biases, check_fused_moe,
                                                 check_grouped_matmul, resolve_backend)

_KERNELS = {"gpu": gpu, "tpu": tpu}


def _weights_for(backend: str, w):
    """What a backend's kernels take: ExpertRows on the GPU (read in place), arrays elsewhere."""
    return as_expert_rows(w) if backend == "gpu" else as_array(w)


def _choose(backend: str, *dims: int) -> str:
    """Resolve the backend; "auto" keeps shapes the GPU kernels cannot tile on the reference."""
    resolved = resolve_backend(backend)
    if backend == "auto" and resolved == "gpu" and not tuning.gpu_supports(*dims):
        return "reference"
    return resolved


def _config(backend: str, rows: int, groups: int, K: int, N: int, itemsize: int, *, weight_tiles: int = 1):
    if backend == "gpu":
        return tuning.fit_gpu_smem(tuning.gpu_config(rows, groups, K, N), weight_tiles, itemsize)
    return tuning.tpu_config(rows, groups, K, N, itemsize)


def grouped_matmul(lhs, rhs, group_sizes, *, backend: str = "auto", interpret: bool = False,
                   config: tuning.BlockConfig | None = None):
    """lhs [M, K] x rhs [G, K, N] (array or ExpertRows) by consecutive row groups
    (lax.ragged_dot's meaning) -> [M, N].

    Rows beyond sum(group_sizes) are zeros. `config` overrides the tuning table (kernels only).
    With backend="auto" on a GPU, K or N not a multiple of 16 falls back to the reference.
    """
    check_grouped_matmul(lhs, rhs, group_sizes)
    backend = _choose(backend, rhs.shape[1], rhs.shape[2])
    if backend == "reference" or lhs.shape[0] == 0:
        return grouped_matmul_reference(lhs, as_array(rhs), group_sizes)
    return _grouped_matmul_kernel(lhs, rhs, group_sizes.astype(jnp.int32), backend=backend,
                                  interpret=interpret, config=config)


@functools.partial(jax.jit, static_argnames=("backend", "interpret", "config"))
def _grouped_matmul_kernel(lhs_MK, rhs_GKN, group_sizes_G, *, backend, interpret, config):
    M, K = lhs_MK.shape
    G, _, N = rhs_GKN.shape
    cfg = config or _config(backend, M, G, K, N, lhs_MK.dtype.itemsize)
    check_config(cfg, K, N, backend, "grouped_matmul")
    layout = gmm_layout(group_sizes_G, M, cfg.block_m)
    y_PN = _KERNELS[backend].gmm_padded(gather_rows(lhs_MK, layout), _weights_for(backend, rhs_GKN), layout, cfg,
                                        out_dtype=lhs_MK.dtype, interpret=interpret)
    return scatter_back(y_PN, layout)


def layer_matmul(x, w, *, backend: str = "auto", out_dtype=None, interpret: bool = False,
                 config: tuple[tuning.BlockConfig, int] | None = None):
    """x [T, K] @ w -> [T, N] in out_dtype (default: x's; float32 accumulation): w a [K, N]
    array or an ExpertRows of one group (one layer of a stacked [L, K, N] weight:
    `ExpertRows.of_stack(w_LKN[:, None], layer)`); or a tuple of such matrices of one K (q, k
    and v of a layer) -> the tuple of their products.

    backend "gpu" (and "auto" on a GPU) runs `gpu.layer_matmul` with float32 accumulation,
    reading w in place: a layer of a stack is not sliced out first (XLA's dynamic slice of a
    scanned stack is a copy of the layer on a GPU); the matrices of a tuple in ONE launch; at
    decode sizes it splits K over the grid (`tuning.layer_matmul_config`; `config` =
    (BlockConfig, K splits) overrides it). A matrix whose N is not a multiple of 16 (a
    one-column gate), every matrix when K is not, and every other backend, the TPU's included,
    is XLA's `x @ w` on the materialised slice (`jnp.dot(..., preferred_element_type=out_dtype)`);
    the other matrices of a tuple still run in the one kernel launch.
    """
    ws = tuple(w) if isinstance(w, (tuple, list)) else (w,)
    if getattr(x, "ndim", None) != 2 or not ws or any(getattr(m, "ndim", None) not in (2, 3) for m in ws):
        raise ValueError(f"layer_matmul: x must be [T, K] and w [K, N], one-group ExpertRows or a tuple of them, "
                         f"got shapes {getattr(x, 'shape', None)} and {[getattr(m, 'shape', None) for m in ws]}")
    for m in ws:
        if m.ndim == 3 and m.shape[0] != 1:
            raise ValueError(f"layer_matmul: w must hold one group, got shape {m.shape}")
        if x.shape[1] != m.shape[-2]:
            raise ValueError(f"layer_matmul: x's K ({x.shape[1]}) must equal w's K ({m.shape[-2]})")
    K = x.shape[1]
    on_kernel = (resolve_backend(backend) == "gpu" and x.shape[0] > 0 and tuning.gpu_supports(K))
    tiled = [i for i, m in enumerate(ws) if on_kernel and tuning.gpu_supports(m.shape[-1])]
    out = [None if i in tiled else jnp.dot(x, as_array(m)[0] if m.ndim == 3 else m, preferred_element_type=out_dtype)
           for i, m in enumerate(ws)]
    if tiled:                       # the tileable matrices in one launch, whatever the others are
        products = _layer_matmul_kernel(x, tuple(as_expert_rows(ws[i][None] if ws[i].ndim == 2 else ws[i])
                                                 for i in tiled),
                                        out_dtype=jnp.dtype(out_dtype or x.dtype), interpret=interpret, config=config)
        for i, y in zip(tiled, products):
            out[i] = y
    return tuple(out) if isinstance(w, (tuple, list)) else out[0]


@functools.partial(jax.jit, static_argnames=("out_dtype", "interpret", "config"))
def _layer_matmul_kernel(x_TK, ws, *, out_dtype, interpret, config):
    T, K = x_TK.shape
    Ns = tuple(w.shape[2] for w in ws)
    cfg, splits = config or tuning.layer_matmul_config(T, K, Ns, x_TK.dtype.itemsize)
    for N in Ns:
        check_config(cfg, K, N, "gpu", "layer_matmul")
    return gpu.layer_matmul(x_TK, ws, cfg, num_splits=splits, out_dtype=out_dtype, interpret=interpret)


def fused_moe(x, router_logits, w1, w2, top_k: int, *, renormalize: bool = True,
              activation: str = "silu", backend: str = "auto", interpret: bool = False,
              config: tuning.BlockConfig | tuple[tuning.BlockConfig, tuning.BlockConfig]
              | None = None, expert_offset=None, token_mask=None, routing: Routing = SOFTMAX_TOPK,
              score_bias=None, b1=None, b2=None):
    """Mixture of experts: x [T, D], router_logits [T, E], w1 [E, D, 2F] (gate|up),
    w2 [E, F, D] (arrays or ExpertRows) -> [T, D] in x's dtype (float32 accumulation).

    token_mask (bool [T], traced ok): tokens where it is False (a step's padding) are routed
    to no expert: they read no weights and their output is zero.

    expert_offset (int32 scalar, traced ok; expert parallelism): w1/w2 hold only experts
    [expert_offset, expert_offset + E_local) of the router's E; (token, k) pairs routed to
    other experts contribute nothing and read no weights, so the sum of the outputs over the
    slices is the whole layer. An offset with no local expert (e.g. E) reads no expert.

    routing (static `Routing`) and score_bias (float [E], traced ok) generalise the softmax
    top-k (sigmoid scores, group-limited top-k, a choice-only bias, scaling: DeepSeek-V2/V3);
    the GPU path computes every Routing in its routing kernel (GPU_GLUE's "routing_kinds").

    b1 [E, 2F] / b2 [E, D] (the experts' biases, arrays; with expert_offset the local slice's
    rows, as w1/w2) and activation=ClampedSwiGLU(alpha, limit) (GPT-OSS): backend="gpu" runs
    them in the kernels (b1 and the activation in the gate/up epilogue, b2 in the down
    projection's, before the routing weight), as does "auto" on a GPU; "tpu" raises.

    `config` overrides the tuning table: one BlockConfig for both grouped matmuls or a
    (gate_up, down) pair with the same block_m. With backend="auto" on a GPU, D or F not a
    multiple of 16 falls back to the reference.
    """
    check_fused_moe(x, router_logits, w1, w2, top_k, activation, expert_slice=expert_offset is not None)
    if token_mask is not None and getattr(token_mask, "shape", None) != (x.shape[0],):
        raise ValueError(f"fused_moe: token_mask must be [T] = [{x.shape[0]}], got shape "
                         f"{getattr(token_mask, 'shape', None)}")
    gpt_oss = b1 is not None or b2 is not None or isinstance(activation, ClampedSwiGLU)
    if gpt_oss:
        check_expert_biases(w1, w2, b1, b2)
    if gpt_oss and backend == "tpu":
        raise ValueError("fused_moe: the tpu kernels do not take expert biases or the clamped SwiGLU yet; "
                         "use backend='reference', 'gpu' or 'auto'")
    backend = _choose(backend, w2.shape[1], w2.shape[2])
    if backend == "reference" or x.shape[0] == 0:
        return fused_moe_reference(x, router_logits, as_array(w1), as_array(w2), top_k,
                                   renormalize=renormalize, activation=activation,
                                   expert_offset=expert_offset, token_mask=token_mask, routing=routing,
                                   score_bias=score_bias, b1=b1, b2=b2)
    return _fused_moe_kernel(x, router_logits, w1, w2, expert_offset, token_mask, score_bias, b1, b2,
                             top_k=top_k, renormalize=renormalize, activation=activation, backend=backend,
                             interpret=interpret, config=config, routing=routing)


# What the GPU path does in kernels instead of XLA ops: "routing" (routing_gpu.py instead of
# softmax + sort + renormalisation) and "combine" (gpu.combine_rows instead of a gather and a
# sum). The benchmark times the other settings beside the default (fused_moe/bench.py), and
# "routing_kinds": routing_gpu.py also for the other `Routing`s and a score bias (sigmoid,
# group-limited top-k: DeepSeek-V2/V3, GLM; RESULTS.md: faster than XLA's `route` at 1 and 32 tokens).
GPU_GLUE = ("routing", "combine", "routing_kinds")


def _combine_xla(y_PD, layout, top_k: int, dtype):
    """Each token's top_k rows summed by XLA (a gather, then a sum over k)."""
    D = y_PD.shape[1]
    return jnp.sum(scatter_back(y_PD, layout).reshape(-1, top_k, D), axis=1).astype(dtype)


@functools.partial(jax.jit, static_argnames=("top_k", "renormalize", "activation", "backend",
                                             "interpret", "config", "gpu_glue", "routing"))
def _fused_moe_kernel(x_TD, router_logits_TE, w1_EDF2, w2_EFD, expert_offset, token_mask_T=None, score_bias_E=None,
                      b1_EF2=None, b2_ED=None, *, top_k, renormalize, activation, backend, interpret, config,
                      gpu_glue=GPU_GLUE, routing=SOFTMAX_TOPK):
    T, D = x_TD.shape
    E, _, F2 = w1_EDF2.shape
    F = F2 // 2
    R = T * top_k
    itemsize = x_TD.dtype.itemsize
    if config is None:
        cfg1 = _config(backend, R, E, D, F, itemsize, weight_tiles=2)   # gate and up tiles
        cfg2 = _config(backend, R, E, F, D, itemsize)
    else:
        cfg1, cfg2 = config if isinstance(config, tuple) else (config, config)
        if cfg1.block_m != cfg2.block_m:
            raise ValueError(f"fused_moe: config pair needs one block_m, got {cfg1.block_m} "
                             f"(gate/up) and {cfg2.block_m} (down)")
    check_config(cfg1, D, F, backend, "fused_moe gate/up")
    check_config(cfg2, F, D, backend, "fused_moe down")
    kernels = _KERNELS[backend]
    plain = routing == SOFTMAX_TOPK and score_bias_E is None
    if backend == "gpu" and "routing" in gpu_glue and (plain or "routing_kinds" in gpu_glue):   # one kernel
        weights_TK, ids_TK = route_topk_gpu(router_logits_TE, top_k, renormalize=renormalize,
                                            interpret=interpret, routing=routing, score_bias_E=score_bias_E)
    else:
        weights_TK, ids_TK = route(router_logits_TE, top_k, renormalize=renormalize, routing=routing,
                                   score_bias_E=score_bias_E)
    ids_TK = local_expert_ids(ids_TK, expert_offset, E, token_mask_T)   # E: another slice's or padding
    if T == 1:      # one token: its top_k experts are distinct, one tile each, no sorting
        dropping = expert_offset is not None or token_mask_T is not None
        layout = single_token_layout(ids_TK.reshape(R), cfg1.block_m, num_groups=E if dropping else None)
    else:
        layout = build_layout(ids_TK.reshape(R), E, cfg1.block_m)
    weights_R = weights_TK.reshape(R)
    if backend == "gpu":   # rows gathered, weights applied and rows combined in the kernels
        h_PF = kernels.gate_up_gathered(x_TD, top_k, _weights_for(backend, w1_EDF2), layout,
                                        cfg1, activation=activation, b1_EF2=b1_EF2, interpret=interpret)
        y_PD = kernels.gmm_padded(h_PF, _weights_for(backend, w2_EFD), layout, cfg2,
                                  row_weights_R=weights_R, bias_GN=b2_ED, out_dtype=jnp.float32,
                                  interpret=interpret)
        if "combine" in gpu_glue:
            return kernels.combine_rows(y_PD, layout.dst_row_R, top_k, x_TD.dtype,
                                        interpret=interpret)
        return _combine_xla(y_PD, layout, top_k, x_TD.dtype)
    # padded row p holds (token, k) pair src_row_P[p]; fill rows (== R) read token T -> zeros.
    x_PD = jnp.take(x_TD, layout.src_row_P // top_k, axis=0, mode="fill", fill_value=0)
    h_PF = kernels.gate_up_padded(x_PD, _weights_for(backend, w1_EDF2), layout, cfg1,
                                  activation=activation, interpret=interpret)
    scale_P = jnp.take(weights_R, layout.src_row_P, mode="fill", fill_value=0)
    y_PD = kernels.gmm_padded(h_PF, _weights_for(backend, w2_EFD), layout, cfg2, scale_P=scale_P,
                              out_dtype=jnp.float32, interpret=interpret)
    return _combine_xla(y_PD, layout, top_k, x_TD.dtype)
