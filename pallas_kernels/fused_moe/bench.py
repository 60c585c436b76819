"""Benchmark of the fused-MoE kernels on a GPU: decode MoE shapes and a prefill grouped matmul.

`main()` prints one JSON line per measurement and returns the rows (dicts). Decode rows are
GB/s of ACTIVE expert weights (experts that received at least one token; w1 + w2 for the
fused MoE, the one [E, D, F] matrix for grouped matmuls) and the fraction of the copy ceiling
(a 2 GiB device-to-device torch `copy_`, read + write counted, measured in the same run).
Prefill rows are TFLOP/s and the fraction of the bf16 8192^3 matmul rate of the same run.
GPT-OSS-20B rows (`bench_gpt_oss`): the experts with biases and the clamped SwiGLU at 1, 2 and
32 tokens, the kernels beside the reference. GLM-4.7-Flash rows (`bench_routing_kinds`): its
sigmoid + bias routing by XLA's `route` beside the routing kernel, on the GPU kernel path.
Layer-matmul rows (`bench_layer_matmul`): Qwen3-30B-A3B's q, k and o projections at 1, 2 and
32 tokens, one layer of a 4-layer stack: XLA's dot of the layer's slice beside `layer_matmul`
(the layer read in place, with and without its K split); GB/s of the matrix.
Peers: `jax.lax.ragged_dot`, JAX's Mosaic GPU `ragged_dot_mgpu` (if importable) and the
pure-jnp reference MoE under XLA. Run: `python -m pallas_kernels.fused_moe.bench`.
Timing (every row, every implementation alike): pallas_kernels/timing.py `device_time`, the
GPU's own clock from a profiler trace: one jitted call dispatched back to back over 3 distinct
copies of every input (weights included, so consecutive calls never find them in L2), per call
its first kernel's start to its last kernel's end, the median over 12 calls; `timer` in each
row says "trace" (or "host" where no GPU trace was available).
"""
from __future__ import annotations

import functools
import json
import time

import jax
import jax.numpy as jnp

from pallas_kernels.anchors import torch_copy_gbps
from pallas_kernels.timing import device_time
from pallas_kernels.fused_moe import tuning
from pallas_kernels.fused_moe import api
from pallas_kernels.fused_moe.api import fused_moe, grouped_matmul
from pallas_kernels.fused_moe.reference import fused_moe_reference, route_topk

# (name, E, D, F, tokens, top_k)
DECODE_SHAPES = [
    ("mixtral8x7b", 8, 4096, 14336, 64, 2),
    ("qwen3_30b_a3b", 128, 2048, 768, 1, 8),
    ("qwen3_30b_a3b", 128, 2048, 768, 16, 8),
    ("qwen3_30b_a3b", 128, 2048, 768, 64, 8),
    ("qwen3_30b_a3b", 128, 2048, 768, 256, 8),
    ("olmoe", 64, 2048, 1024, 32, 8),
]
# GPT-OSS-20B's experts with their biases and the clamped SwiGLU (alpha 1.702, limit 7):
# (name, E, D, F, tokens, top_k); bench_gpt_oss
GPT_OSS_SHAPES = [("gpt_oss_20b", 32, 2880, 2880, T, 4) for T in (1, 2, 32)]
# GLM-4.7-Flash's routed experts (DeepSeek-V3 routing: sigmoid, a choice-only bias, top-4 of
# 64, renormalised, scaled 1.8): the GPU path with XLA's `route` beside routing_gpu.py's kernel
# (GPU_GLUE's "routing_kinds"); bench_routing_kinds
ROUTING_KIND_SHAPES = [("glm47_flash", 64, 2048, 1536, T, 4) for T in (1, 32)]
# (name, L, K, N, tokens): q (2048 -> 32 x 128), k (-> 4 x 128), o (32 x 128 -> 2048), and q at a
# 512-token prefill chunk; bench_layer_matmul
LAYER_MATMUL_SHAPES = [(f"qwen3_30b_a3b {p}", 4, K, N, T) for p, K, N in
                       (("q", 2048, 4096), ("k", 2048, 512), ("q|k|v", 2048, (4096, 512, 512)), ("o", 4096, 2048))
                       for T in (1, 2, 32)] + \
                      [("qwen3_30b_a3b q prefill", 4, 2048, 4096, 512)]
PREFILL_SHAPE = ("prefill_gmm", 8, 4096, 14336, 8192)   # (name, G, K, N, M)
MGPU_CONFIGS = [(64, 128, 64, 4, 1), (64, 64, 64, 4, 2)]  # block m, n, k, stages, grid_block_n
# Alternates to the tuning table tried per decode shape: (block_n, block_k, warps, stages),
# one config for both matmuls: narrower and deeper tiles for the one-token shape, whose
# gate/up grid is 96 programs on 132 SMs at 64 columns (results: RESULTS.md).
SWEEP = [(32, 128, 4, 3), (32, 128, 4, 4), (32, 64, 4, 4), (64, 128, 4, 4), (64, 64, 4, 6),
         (32, 128, 2, 4)]


def _time(f, *args) -> tuple[float, str]:
    """(GPU seconds of one call of f, timer): pallas_kernels.timing.device_time."""
    return device_time(f, *args)


class _Rows:
    def __init__(self):
        self.rows = []

    def add(self, **row):
        row = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
        self.rows.append(row)
        print(json.dumps(row), flush=True)


def _matmul_tflops() -> float:
    a = jax.random.normal(jax.random.PRNGKey(0), (8192, 8192), jnp.bfloat16)
    s, _ = _time(lambda a, b: a @ b, a, a)
    return 2 * 8192 ** 3 / 1e12 / s


def _mgpu():
    try:
        from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu
        return ragged_dot_mgpu
    except Exception as e:  # noqa: BLE001
        print(f"ragged_dot_mgpu unavailable: {type(e).__name__}: {e}", flush=True)
        return None


def _best_mgpu(rdm, lhs, w, gs):
    best = None
    K, N = w.shape[1], w.shape[2]
    for bm, bn, bk, st, gbn in MGPU_CONFIGS:
        if N % (bn * gbn) or K % bk:
            continue
        try:
            g = functools.partial(rdm.ragged_dot, block_m=bm, block_n=bn, block_k=bk,
                                  max_concurrent_steps=st, grid_block_n=gbn)
            call = lambda l, w, gs: g(l, w, group_sizes=gs)    # noqa: E731
            t = _time(call, lhs, w, gs)
            best = t if best is None else min(best, t, key=lambda timed: timed[0])
        except Exception as e:  # noqa: BLE001
            print(f"mgpu config {bm, bn, bk} failed: {type(e).__name__}: {str(e)[:160]}",
                  flush=True)
    return best


def decode_inputs(E: int, D: int, F: int, T: int):
    """(x [T, D], router logits [T, E] f32, w1 [E, D, 2F], w2 [E, F, D]) of a decode shape:
    bf16 random normals (weights scaled by 0.02), seeded by the shape (also used by
    scripts/profile_kernels.py and scripts/ncu_kernels.py)."""
    keys = jax.random.split(jax.random.PRNGKey(E * 1000 + T), 4)
    x = jax.random.normal(keys[0], (T, D), jnp.bfloat16)
    logits = jax.random.normal(keys[1], (T, E), jnp.float32)
    w1 = jax.random.normal(keys[2], (E, D, 2 * F), jnp.bfloat16) * 0.02
    w2 = jax.random.normal(keys[3], (E, F, D), jnp.bfloat16) * 0.02
    return x, logits, w1, w2


def _decode(rows: _Rows, ceiling, shape, *, sweep: bool, rdm, peers: bool = True):
    name, E, D, F, T, top_k = shape
    x, logits, w1, w2 = decode_inputs(E, D, F, T)
    keys = jax.random.split(jax.random.PRNGKey(E * 1000 + T), 4)
    _, ids = route_topk(logits, top_k, renormalize=True)
    touched = int(jnp.unique(ids).shape[0])
    moe_gb = touched * 3 * D * F * 2 / 1e9
    tag = f"{name} T={T} top{top_k} touched={touched}/{E}"

    def rec(what, timed, gb, **extra):
        sec, timer = timed
        extra["timer"] = timer
        gbps = gb / sec
        frac = round(gbps / ceiling, 3) if ceiling else None
        rows.add(kind="decode", shape=tag, impl=what, us=sec * 1e6, GBps=gbps,
                 frac_copy=frac, **extra)

    if peers:
        ref = functools.partial(fused_moe_reference, top_k=top_k)
        rec("xla_reference_fused_moe", _time(ref, x, logits, w1, w2), moe_gb)
    ours = functools.partial(fused_moe, top_k=top_k, backend="gpu")
    rec("ours_fused_moe", _time(ours, x, logits, w1, w2), moe_gb,
        config=str(tuning.gpu_config(T * top_k, E, D, F)))
    for glue in ((), ("combine",), ("routing",)):     # routing / combine by XLA instead
        f = functools.partial(api._fused_moe_kernel, expert_offset=None, top_k=top_k,
                              renormalize=True, activation="silu", backend="gpu",
                              interpret=False, config=None, gpu_glue=glue)
        rec("ours_fused_moe_kernels_" + ("+".join(glue) or "none"),
            _time(f, x, logits, w1, w2), moe_gb)
    if sweep:
        bm = tuning.block_m_for(T * top_k, E)
        for bn, bk, warps, stages in SWEEP:
            if F % bn or D % bn or D % bk or F % bk:
                continue
            cfg = tuning.BlockConfig(bm, bn, bk, warps, stages)
            try:
                f = functools.partial(fused_moe, top_k=top_k, backend="gpu", config=cfg)
                rec("ours_fused_moe_sweep", _time(f, x, logits, w1, w2), moe_gb,
                    config=str(cfg))
            except Exception as e:  # noqa: BLE001
                print(f"sweep {cfg} failed: {type(e).__name__}: {str(e)[:160]}", flush=True)
    if not peers:
        return
    # one grouped matmul with the gate/up input shape [E, D, F], as the anchors measure it
    M = T * top_k
    lhs = jax.random.normal(keys[0], (M, D), jnp.bfloat16)
    w = w1[:, :, :F]
    gs = jnp.bincount(ids.reshape(-1), length=E).astype(jnp.int32)
    gmm_gb = touched * D * F * 2 / 1e9
    rec("lax_ragged_dot", _time(jax.lax.ragged_dot, lhs, w, gs), gmm_gb)
    og = functools.partial(grouped_matmul, backend="gpu")
    rec("ours_grouped_matmul", _time(og, lhs, w, gs), gmm_gb)
    if rdm is not None:
        best = _best_mgpu(rdm, lhs, w, gs)
        if best is not None:
            rec("jax_ragged_dot_mgpu_best", best, gmm_gb)


def bench_gpt_oss(rows: _Rows, ceiling, shape, *, x_scale: float = 10.0) -> None:
    """GPT-OSS's experts (biases b1/b2, ClampedSwiGLU(1.702, 7)) through fused_moe: the
    reference and, on a GPU, the kernels (backend="gpu", what "auto" runs there; max error
    against the reference in the row). x is scaled by x_scale so that the clamp's limit bites. GB/s of the
    active experts' weights and biases against the copy ceiling."""
    from pallas_kernels.fused_moe.reference import ClampedSwiGLU
    name, E, D, F, T, top_k = shape
    x, logits, w1, w2 = decode_inputs(E, D, F, T)
    x = x * x_scale
    kb = jax.random.split(jax.random.PRNGKey(E * 1000 + T + 1), 2)
    b1 = jax.random.normal(kb[0], (E, 2 * F), x.dtype)
    b2 = jax.random.normal(kb[1], (E, D), x.dtype)
    act = ClampedSwiGLU(alpha=1.702, limit=7.0)
    _, ids = route_topk(logits, top_k, renormalize=True)
    touched = int(jnp.unique(ids).shape[0])
    gb = touched * (3 * D * F + 2 * F + D) * x.dtype.itemsize / 1e9
    tag = f"{name} T={T} top{top_k} touched={touched}/{E} biases+clamp"
    impls = {"xla_reference_fused_moe": "reference"}
    if jax.default_backend() == "gpu":
        impls["ours_fused_moe"] = "gpu"
    outs = {}
    for impl, backend in impls.items():
        f = jax.jit(lambda x, lg, w1, w2, b1, b2, backend=backend: fused_moe(
            x, lg, w1, w2, top_k, activation=act, b1=b1, b2=b2, backend=backend))
        outs[impl] = f(x, logits, w1, w2, b1, b2)
        extra = {}
        if impl != "xla_reference_fused_moe":
            ref = outs["xla_reference_fused_moe"].astype(jnp.float32)
            extra["max_err"] = float(jnp.max(jnp.abs(outs[impl].astype(jnp.float32) - ref)))
            extra["max_ref"] = float(jnp.max(jnp.abs(ref)))
        sec, timer = _time(f, x, logits, w1, w2, b1, b2)
        rows.add(kind="decode", shape=tag, impl=impl, us=sec * 1e6, GBps=gb / sec,
                 frac_copy=round(gb / sec / ceiling, 3) if ceiling else None, timer=timer, **extra)


def bench_routing_kinds(rows: _Rows, ceiling, shape) -> None:
    """GLM-4.7-Flash's routing (sigmoid + score bias, renormalised, scaled) on the GPU kernel
    path: routing_gpu.py's kernel ("routing_kinds", the default) beside the routing by XLA
    (`route`), and the reference. GB/s of the active experts' weights."""
    from pallas_kernels.fused_moe.reference import Routing, route
    name, E, D, F, T, top_k = shape
    x, logits, w1, w2 = decode_inputs(E, D, F, T)
    bias = 0.1 * jax.random.normal(jax.random.PRNGKey(E + T), (E,), jnp.float32)
    routing = Routing(scoring="sigmoid", scale=1.8)
    _, ids = route(logits, top_k, renormalize=True, routing=routing, score_bias_E=bias)
    touched = int(jnp.unique(ids).shape[0])
    gb = touched * 3 * D * F * x.dtype.itemsize / 1e9
    tag = f"{name} T={T} top{top_k} touched={touched}/{E} sigmoid+bias"
    impls = {"xla_reference_fused_moe": None}
    if jax.default_backend() == "gpu":
        impls["ours_fused_moe_xla_routing"] = tuple(g for g in api.GPU_GLUE if g != "routing_kinds")
        impls["ours_fused_moe_kernel_routing"] = api.GPU_GLUE
    for impl, glue in impls.items():
        if glue is None:
            f = jax.jit(lambda x, lg, w1, w2, b: fused_moe_reference(x, lg, w1, w2, top_k, renormalize=True,
                                                                     routing=routing, score_bias=b))
        else:
            f = jax.jit(lambda x, lg, w1, w2, b, glue=glue: api._fused_moe_kernel(
                x, lg, w1, w2, None, None, b, top_k=top_k, renormalize=True, activation="silu", backend="gpu",
                interpret=False, config=None, gpu_glue=glue, routing=routing))
        sec, timer = _time(f, x, logits, w1, w2, bias)
        rows.add(kind="decode", shape=tag, impl=impl, us=sec * 1e6, GBps=gb / sec,
                 frac_copy=round(gb / sec / ceiling, 3) if ceiling else None, timer=timer)


def bench_layer_matmul(rows: _Rows, ceiling, shape) -> None:
    """x [T, K] times one layer of stacked [L, K, N] weights (N a tuple: several matrices of one
    K, as q|k|v), one jitted call each: XLA's dots of the layers' dynamic slices beside
    `layer_matmul` reading them in place, with the K split of the tuning table and without
    (splits=1, same tiles), and for several matrices one call per matrix beside the one launch.
    GB/s of the matrices read, against the copy ceiling. (A layer scan around the call is not
    timed: under the trace timer its per-iteration launches, ~25 us, hide the kernels.)"""
    from pallas_kernels.fused_moe.api import layer_matmul
    from pallas_kernels.fused_moe.expert_rows import ExpertRows
    name, L, K, N, T = shape
    Ns = N if isinstance(N, tuple) else (N,)
    kx, *kws = jax.random.split(jax.random.PRNGKey(K + sum(Ns) + T), 1 + len(Ns))
    x = jax.random.normal(kx, (T, K), jnp.bfloat16)
    ws = tuple((jax.random.normal(k, (L, K, n)) / K ** 0.5).astype(jnp.bfloat16) for k, n in zip(kws, Ns))
    layer = jnp.int32(L - 1)
    gb = K * sum(Ns) * x.dtype.itemsize / 1e9
    cfg, splits = tuning.layer_matmul_config(T, K, Ns)

    def ours(x, ws, layer, config):
        return layer_matmul(x, tuple(ExpertRows.of_stack(w[:, None], layer) for w in ws), backend="gpu", config=config)

    def ours_apart(x, ws, layer):
        return tuple(layer_matmul(x, ExpertRows.of_stack(w[:, None], layer), backend="gpu") for w in ws)

    impls = {"xla_dot_of_layer_slice": jax.jit(lambda x, ws, layer: tuple(x @ w[layer] for w in ws))}
    if jax.default_backend() == "gpu":
        impls[f"ours_layer_matmul_split{splits}"] = jax.jit(functools.partial(ours, config=(cfg, splits)))
        if splits > 1:
            impls["ours_layer_matmul_split1"] = jax.jit(functools.partial(ours, config=(cfg, 1)))
        if len(Ns) > 1:
            impls["ours_layer_matmul_one_call_per_matrix"] = jax.jit(ours_apart)
    want = [jnp.dot(x, w[L - 1], preferred_element_type=jnp.float32) for w in ws]
    for impl, f in impls.items():
        err = max(float(jnp.max(jnp.abs(g.astype(jnp.float32) - r))) for g, r in zip(f(x, ws, layer), want))
        sec, timer = _time(f, x, ws, layer)
        rows.add(kind="decode", shape=f"{name} T={T} K={K} N={'|'.join(map(str, Ns))}", impl=impl, us=sec * 1e6,
                 GBps=gb / sec, frac_copy=round(gb / sec / ceiling, 3) if ceiling else None, timer=timer, max_err=err,
                 config=f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages} k/{splits}")


def _prefill(rows: _Rows, mm_tflops, *, sweep: bool, rdm):
    name, G, K, N, M = PREFILL_SHAPE
    keys = jax.random.split(jax.random.PRNGKey(7), 3)
    lhs = jax.random.normal(keys[0], (M, K), jnp.bfloat16)
    w = jax.random.normal(keys[1], (G, K, N), jnp.bfloat16)
    ids = jax.random.randint(keys[2], (M,), 0, G)
    gs = jnp.bincount(ids, length=G).astype(jnp.int32)
    tflop = 2 * M * K * N / 1e12

    def rec(what, timed, **extra):
        sec, timer = timed
        rows.add(kind="prefill", shape=f"{name} M={M} G={G} K={K} N={N}", impl=what,
                 us=sec * 1e6, TFLOPs=tflop / sec, timer=timer,
                 frac_matmul=round(tflop / sec / mm_tflops, 3), **extra)

    rec("lax_ragged_dot", _time(jax.lax.ragged_dot, lhs, w, gs))
    og = functools.partial(grouped_matmul, backend="gpu")
    rec("ours_grouped_matmul", _time(og, lhs, w, gs),
        config=str(tuning.gpu_config(M, G, K, N)))
    if sweep:
        for cfg in [tuning.BlockConfig(128, 128, 64, 8, 3), tuning.BlockConfig(128, 256, 64, 8, 4)]:
            try:
                f = functools.partial(grouped_matmul, backend="gpu", config=cfg)
                rec("ours_grouped_matmul_sweep", _time(f, lhs, w, gs), config=str(cfg))
            except Exception as e:  # noqa: BLE001
                print(f"prefill sweep {cfg} failed: {type(e).__name__}: {str(e)[:160]}",
                      flush=True)
    if rdm is not None:
        best = _best_mgpu(rdm, lhs, w, gs)
        if best is not None:
            rec("jax_ragged_dot_mgpu_best", best)


def _summary(rows: list[dict]) -> None:
    """One line per shape: the best row of each implementation."""
    best: dict = {}
    for r in rows:
        if r["kind"] == "anchor" or "impl" not in r:
            continue
        impl = r["impl"].replace("_sweep", "")
        key = (r["shape"], impl)
        metric = r.get("GBps") or r.get("TFLOPs")
        if key not in best or metric > (best[key].get("GBps") or best[key].get("TFLOPs")):
            best[key] = r
    print("\nshape | impl | us | GB/s or TFLOP/s | fraction of ceiling", flush=True)
    for (shape, impl), r in best.items():
        metric = r.get("GBps") or r.get("TFLOPs")
        frac = r.get("frac_copy", r.get("frac_matmul"))
        print(f"{shape} | {impl} | {r['us']:.1f} | {metric:.1f} | {frac}", flush=True)


def main(sweep: bool = True, time_budget_s: float = 170.0, *, peers: bool = True,
         shapes=None, prefill: bool = True, gpt_oss: bool = True, routing_kinds: bool = True,
         layer_matmuls: bool = True) -> list[dict]:
    """Run every shape (or `shapes`, names or indices of DECODE_SHAPES) and, with gpt_oss,
    GPT_OSS_SHAPES, with routing_kinds ROUTING_KIND_SHAPES, with layer_matmuls
    LAYER_MATMUL_SHAPES; returns the rows it printed. Sweeps stop once the budget is spent;
    peers=False times only our kernels."""
    rows = _Rows()
    start = time.perf_counter()
    print(f"jax {jax.__version__} devices {jax.devices()}", flush=True)
    ceiling = torch_copy_gbps()
    rows.add(kind="anchor", impl="torch_copy_2GiB", GBps=ceiling)
    mm = _matmul_tflops() if prefill else None
    if mm:
        rows.add(kind="anchor", impl="matmul_bf16_8192", TFLOPs=mm)
    rdm = _mgpu() if peers else None
    picked = DECODE_SHAPES if shapes is None else [DECODE_SHAPES[i] for i in shapes]
    for shape in picked:
        try:
            _decode(rows, ceiling, shape, rdm=rdm, peers=peers,
                    sweep=sweep and time.perf_counter() - start < time_budget_s)
        except Exception as e:  # noqa: BLE001
            print(f"FAIL {shape}: {type(e).__name__}: {str(e)[:400]}", flush=True)
    for shape in GPT_OSS_SHAPES if gpt_oss else ():
        try:
            bench_gpt_oss(rows, ceiling, shape)
        except Exception as e:  # noqa: BLE001
            print(f"FAIL {shape}: {type(e).__name__}: {str(e)[:400]}", flush=True)
    for shape in ROUTING_KIND_SHAPES if routing_kinds else ():
        try:
            bench_routing_kinds(rows, ceiling, shape)
        except Exception as e:  # noqa: BLE001
            print(f"FAIL {shape}: {type(e).__name__}: {str(e)[:400]}", flush=True)
    for shape in LAYER_MATMUL_SHAPES if layer_matmuls else ():
        try:
            bench_layer_matmul(rows, ceiling, shape)
        except Exception as e:  # noqa: BLE001
            print(f"FAIL {shape}: {type(e).__name__}: {str(e)[:400]}", flush=True)
    if prefill:
        try:
            _prefill(rows, mm, rdm=rdm,
                     sweep=sweep and time.perf_counter() - start < time_budget_s)
        except Exception as e:  # noqa: BLE001
            print(f"FAIL prefill: {type(e).__name__}: {str(e)[:400]}", flush=True)
    _summary(rows.rows)
    print(f"bench done in {time.perf_counter() - start:.0f} s", flush=True)
    return rows.rows


if __name__ == "__main__":
    main()
