"""Benchmark of ragged paged attention on a GPU: our kernel beside JAX's Pallas GPU
`paged_attention` and an XLA baseline (gather pages to dense, then attend); MLA decode at
DeepSeek-V2-Lite's shapes, the reference path beside the MLA kernel, on separate K/V pages and
on one buffer with page offsets as the crosspool split passes it (`bench_mla_decode`, section
"mla_decode"); GPT-OSS-20B's attention with sinks and a traced window of 128 or full, the
reference beside the kernel (`bench_gpt_oss`, section "gpt_oss_attn"); prefill attention at 2k, 8k and 32k tokens, the Triton kernel beside the
Mosaic GPU one under its tilings, against the bf16 matmul rate measured in the same run
(`bench_prefill`, section "prefill"; `matmul_tflops`).

`main(rows_out=None, copy_gbps=None)` appends one dict per measurement to `rows_out` and
returns the list; scripts/bench_kernels.py prints them as one table with the MoE rows.
Timing (pallas_kernels/timing.py `device_time`): every implementation alike, one jitted call
dispatched back to back over 3 distinct copies of every input (consecutive calls read
different memory, so nothing is served from L2), timed by the GPU's own clock in a profiler
trace: per call, its first kernel's start to its last kernel's end (its kernels and the gaps
between them; host dispatch out), the median over 12 calls. Each row says its `timer`
("trace", or "host" where no GPU trace was available: timing.time_step).
"""
from __future__ import annotations

import dataclasses
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.anchors import torch_copy_gbps
from pallas_kernels.timing import device_time
from pallas_kernels.ragged_paged_attention import prefill_mgpu, tuning
from pallas_kernels.ragged_paged_attention.gpu import ragged_paged_attention_gpu

N_HEADS, K_HEADS, HEAD_DIM = 32, 8, 128
DECODE_SHAPES = [(1, 32768), (8, 2048), (8, 4096), (8, 16384), (32, 2048), (32, 8192),
                 (64, 4096)]
PAGE_SIZES = (16, 64)
# mixed batches: (decode seqs, their context, prefill chunks, chunk length, prefill context)
MIXED_SHAPES = [(32, 4096, 2, 512, 2048), (8, 8192, 4, 1024, 4096), (0, 0, 2, 2048, 2048)]
# tilings tried by --sweep on SWEEP_SHAPES: the tuning table's config with these fields
# replaced ("splits" multiplies num_splits). The first device run of this session swept
# block_k 64/128, warps 4/8, stages 3/4 and the flags (RESULTS.md); the second the splits and
# the H and I flags; this list is the third's.
SWEEP = [
    {"splits": 2},
    {"splits": 4},
    {"splits": 0.5},
    {"num_stages": 4},
]
# shapes near a wave boundary (B=8 / 2k: 256 programs, 4 per SM by registers), where the split count matters
SWEEP_SHAPES = [(8, 2048, 16), (8, 4096, 16), (1, 32768, 16)]
# (q_tokens, block_k, num_warps, num_stages, the four flags) tried on the mixed shapes by
# --sweep (R=4); the first is the previous default
MIXED_SWEEP = [(16, 128, 4, 3, False), (16, 64, 4, 3, True)]


def _time(f, *args):
    """(GPU seconds of one call of f, timer) (pallas_kernels.timing.device_time)."""
    return device_time(f, *args)


def _with_error(note: str, impl: str, outs: dict) -> str:
    """`note`, and for an implementation other than "reference" its max |error| against
    outs["reference"] (both already computed)."""
    if impl == "reference":
        return note
    err = float(jnp.max(jnp.abs(outs[impl].astype(jnp.float32) - outs["reference"].astype(jnp.float32))))
    return f"{note}; max |err| vs reference {err:.3g}"


def decode_inputs(key, B, ctx, G, dtype=jnp.bfloat16):
    pps = ctx // G
    P = B * pps + 8
    k1, k2, k3 = jax.random.split(key, 3)
    q = jax.random.normal(k1, (B, N_HEADS, HEAD_DIM), dtype)
    kp = jax.random.normal(k2, (P, G, K_HEADS, HEAD_DIM), dtype)
    vp = jax.random.normal(k3, (P, G, K_HEADS, HEAD_DIM), dtype)
    table = jax.random.permutation(k1, P)[:B * pps].reshape(B, pps).astype(jnp.int32)
    kv_lens = jnp.full((B,), ctx, jnp.int32)
    cu = jnp.arange(B + 1, dtype=jnp.int32)
    return q, kp, vp, kv_lens, table, cu, jnp.asarray([B], jnp.int32)


def _xla_gather_attention(q, kp, vp, kv_lens, table, cu, ns):
    """XLA baseline for decode: gather every sequence's pages to dense, then attend."""
    B = q.shape[0]
    k = kp[table].reshape(B, -1, K_HEADS, HEAD_DIM)
    v = vp[table].reshape(B, -1, K_HEADS, HEAD_DIM)
    qg = q.reshape(B, K_HEADS, -1, HEAD_DIM)
    s = jnp.einsum("bkrh,bckh->bkrc", qg, k, preferred_element_type=jnp.float32) * HEAD_DIM ** -0.5
    s = jnp.where(jnp.arange(k.shape[1])[None, None, None] < kv_lens[:, None, None, None], s, -1e30)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    return jnp.einsum("bkrc,bckh->bkrh", p, v).reshape(q.shape)


def jax_paged(q, kp_KPGH, vp_KPGH, kv_lens, table, cu, ns, **kw):
    from jax.experimental.pallas.ops.gpu import paged_attention as pa
    return pa.paged_attention(q, kp_KPGH, vp_KPGH, table, kv_lens, **kw)


def _row(rows_out, section, shape, impl, timed, *, gbytes=None, tflop=None, copy_gbps=None,
         note=""):
    """timed: (seconds, timer) as _time returns it, or plain seconds (the copy ceiling)."""
    sec, timer = timed if isinstance(timed, tuple) else (timed, None)
    row = {"section": section, "shape": shape, "impl": impl, "us": sec * 1e6}
    if timer:
        row["timer"] = timer
    if gbytes is not None:
        row["GBps"] = gbytes / sec
        if copy_gbps:
            row["frac_copy"] = row["GBps"] / copy_gbps
    if tflop is not None:
        row["TFLOPs"] = tflop / sec
    if note:
        row["note"] = note
    rows_out.append(row)
    print(row, flush=True)
    return row


def bench_decode(rows_out, copy_gbps, shapes=DECODE_SHAPES, pages=PAGE_SIZES):
    for G in pages:
        for B, ctx in shapes:
            args = decode_inputs(jax.random.PRNGKey(B * ctx + G), B, ctx, G)
            shape = f"B={B} ctx={ctx} G={G}"
            gb = 2 * B * ctx * K_HEADS * HEAD_DIM * 2 / 1e9
            ours = functools.partial(ragged_paged_attention_gpu, sm_scale=HEAD_DIM ** -0.5)
            cfg = tuning.gpu_config(T=B, S=B, R=N_HEADS // K_HEADS, H=HEAD_DIM, G=G, C=ctx,
                                    K=K_HEADS)
            t_ours = _time(ours, *args)
            _row(rows_out, "decode", shape, "ours", t_ours, gbytes=gb, copy_gbps=copy_gbps,
                 note=_cfg_note(cfg))
            kp2 = jnp.moveaxis(args[1], 2, 0)          # [K, P, G, H], built outside timing
            vp2 = jnp.moveaxis(args[2], 2, 0)
            best = None
            for kw in (dict(), dict(pages_per_compute_block=4, k_splits=8)):   # the anchor's two
                try:
                    t = _time(functools.partial(jax_paged, **kw), args[0], kp2, vp2,
                              *args[3:])
                    best = t if best is None else min(best, t, key=lambda timed: timed[0])
                except Exception as e:  # noqa: BLE001 - record and go on
                    print("jax paged_attention failed", shape, kw, type(e).__name__,
                          str(e)[:200], flush=True)
            del kp2, vp2
            if best is not None:
                _row(rows_out, "decode", shape, "jax_paged_attention", best, gbytes=gb,
                     copy_gbps=copy_gbps, note=f"ours x{best[0] / t_ours[0]:.2f}")
            try:
                t = _time(_xla_gather_attention, *args)
                _row(rows_out, "decode", shape, "xla_gather", t, gbytes=gb, copy_gbps=copy_gbps,
                     note=f"ours x{t[0] / t_ours[0]:.2f}")
            except Exception as e:  # noqa: BLE001
                print("xla baseline failed", shape, type(e).__name__, str(e)[:200], flush=True)
            del args


def causal_pairs(q_lens, kv_lens) -> int:
    """The (query, key) pairs a causal chunk attends: each sequence's q_len queries are the last
    of its kv_len tokens, query i sees kv_len - q_len + i + 1 keys, so a sequence contributes
    q_len * (kv_len - q_len) + q_len * (q_len + 1) / 2."""
    return sum(ql * (kv - ql) + ql * (ql + 1) // 2 for ql, kv in zip(q_lens, kv_lens))


def causal_flop(q_lens, kv_lens, n_heads, head_dim) -> int:
    """FLOPs of causal attention counting only the visible pairs: 4 * H per pair and query head
    (2 * H for the q.k dot, 2 * H for p.v)."""
    return 4 * n_heads * head_dim * causal_pairs(q_lens, kv_lens)


def ragged_inputs(key, q_lens, kv_lens, n_heads=N_HEADS, kv_heads=K_HEADS, G=16, head_dim=HEAD_DIM,
                  dtype=jnp.bfloat16):
    """A ragged batch: sequence s brings q_lens[s] queries, the last of its kv_lens[s] tokens;
    q [sum q_lens, N, H], a pool of random pages [P, G, K, H] (random normals, no zeros) and a
    shuffled page table -> ragged_paged_attention's positional arguments."""
    S = len(q_lens)
    pps = -(-max(kv_lens) // G)
    P = S * pps + 8
    k1, k2, k3, k4 = jax.random.split(key, 4)
    q = jax.random.normal(k1, (sum(q_lens), n_heads, head_dim), dtype)
    kp = jax.random.normal(k2, (P, G, kv_heads, head_dim), dtype)
    vp = jax.random.normal(k3, (P, G, kv_heads, head_dim), dtype)
    table = jax.random.permutation(k4, P)[:S * pps].reshape(S, pps).astype(jnp.int32)
    cu = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
    return q, kp, vp, jnp.asarray(kv_lens, jnp.int32), table, cu, jnp.asarray([S], jnp.int32)


def _mixed_inputs(key, n_dec, ctx_dec, n_pre, chunk, ctx_pre, G=16, dtype=jnp.bfloat16):
    q_lens = [1] * n_dec + [chunk] * n_pre
    kv_lens = [ctx_dec] * n_dec + [ctx_pre] * n_pre
    return ragged_inputs(key, q_lens, kv_lens, G=G, dtype=dtype), causal_flop(q_lens, kv_lens, N_HEADS, HEAD_DIM)


def bench_mixed(rows_out, shapes=MIXED_SHAPES, do_sweep=False):
    for n_dec, ctx_dec, n_pre, chunk, ctx_pre in shapes:
        args, flop = _mixed_inputs(jax.random.PRNGKey(n_dec + chunk), n_dec, ctx_dec, n_pre,
                                   chunk, ctx_pre)
        shape = f"dec {n_dec}x{ctx_dec} + pre {n_pre}x{chunk}@{ctx_pre} G=16"
        cfgs = [None]
        if do_sweep:
            cfgs += [tuning.BlockConfig(q_tokens=bq, block_k=bk, num_splits=1, num_warps=w,
                                        num_stages=st, heads_fastest=new, row_gather=new,
                                        mask_v_load=new, items_in_kernel=new)
                     for bq, bk, w, st, new in MIXED_SWEEP]
        for cfg in cfgs:
            ours = functools.partial(ragged_paged_attention_gpu, sm_scale=HEAD_DIM ** -0.5,
                                     config=cfg)
            try:
                t = _time(ours, *args)
            except Exception as e:  # noqa: BLE001
                print("mixed failed", cfg, type(e).__name__, str(e)[:300], flush=True)
                continue
            note = "" if cfg is None else _cfg_note(cfg)
            _row(rows_out, "mixed" if cfg is None else "sweep", shape, "ours", t,
                 tflop=flop / 1e12, note=note)


# prefill: (sequences, tokens each) at full prefill (q_len = kv_len, no cached prefix), and the
# (query heads, kv heads) pairs; head dim 128, bf16, pages of PREFILL_PAGE tokens
PREFILL_SHAPES = [(n, L) for L in (2048, 8192, 32768) for n in (1, 4)]
PREFILL_HEADS = ((32, 8), (32, 4))
PREFILL_PAGE = 64
MATMUL_N = 8192
# the Mosaic GPU kernel's other tilings, timed beside backend="mgpu" (its default config: one
# warpgroup of 64 rows): 128 rows per K/V tile, by one warpgroup or by two beside a producer
PREFILL_MGPU_CONFIGS = {
    "mgpu_q128": prefill_mgpu.PrefillConfig(block_q=128, num_slots=3),
    "mgpu_ws2": prefill_mgpu.PrefillConfig(warp_specialized=True, compute_wgs=2),
}


def matmul_tflops(rows_out=None, n=MATMUL_N) -> float:
    """The bf16 matmul rate of this device in TFLOP/s: XLA's n x n x n jnp.dot of random bf16
    (2 n^3 FLOPs), timed by `_time`; appends a "ceiling" row to rows_out when given."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(n))
    a = jax.random.normal(k1, (n, n), jnp.bfloat16)
    b = jax.random.normal(k2, (n, n), jnp.bfloat16)
    timed = _time(jnp.dot, a, b)
    tflops = 2 * n ** 3 / timed[0] / 1e12
    if rows_out is not None:
        _row(rows_out, "ceiling", f"{n}^3 bf16", "xla_dot", timed, tflop=2 * n ** 3 / 1e12)
    del a, b
    return tflops


def prefill_inputs(key, n_seqs, tokens, n_heads, kv_heads, G=PREFILL_PAGE, head_dim=HEAD_DIM,
                   dtype=jnp.bfloat16):
    """n_seqs full prefills of `tokens` tokens each (`ragged_inputs`)."""
    return ragged_inputs(key, [tokens] * n_seqs, [tokens] * n_seqs, n_heads, kv_heads, G, head_dim, dtype)


def prefill_backends() -> tuple:
    """The ragged_paged_attention backends the prefill rows time here: the Triton kernel ("gpu")
    and the Mosaic GPU one ("mgpu") on a GPU, the reference elsewhere."""
    return ("gpu", "mgpu") if jax.default_backend() == "gpu" else ("reference",)


def bench_prefill(rows_out, matmul_tflops, shapes=PREFILL_SHAPES, heads=PREFILL_HEADS,
                  G=PREFILL_PAGE, backends=None, head_dim=HEAD_DIM, mgpu_configs=PREFILL_MGPU_CONFIGS):
    """Prefill attention through ragged_paged_attention(backend=...) for each backend of
    `backends` (default `prefill_backends()`), and where "mgpu" is among them the Mosaic GPU
    kernel under each of `mgpu_configs` too (impl = its name): per (sequences x tokens, N/K
    heads) one row per implementation with its TFLOP/s and, in "frac_matmul", its ratio to
    `matmul_tflops` (the bf16
    matmul rate measured in the same run). FLOPs count only the causally visible pairs:
    4 * H * N * sum over sequences of q_len * (kv_len - q_len) + q_len * (q_len + 1) / 2
    (`causal_flop`). The note of every backend after the first gives its max |error| against
    the first's output (the reference would materialise [T, C, K, H]: too big at these
    shapes). A backend that fails (a shape it does not take) is printed and skipped."""
    from pallas_kernels.ragged_paged_attention import ragged_paged_attention
    backends = prefill_backends() if backends is None else tuple(backends)
    impls = {b: functools.partial(ragged_paged_attention, sm_scale=head_dim ** -0.5, backend=b)
             for b in backends}
    if "mgpu" in backends:
        impls.update({name: functools.partial(prefill_mgpu.ragged_paged_attention_mgpu,
                                              sm_scale=head_dim ** -0.5, config=cfg)
                      for name, cfg in mgpu_configs.items()})
    firsts = {}                           # shape -> (impl, its output on the host)
    for impl, f in impls.items():         # one implementation at a time: a failing one loses only its rows
        f = jax.jit(f)
        for N, K in heads:
            for n_seqs, tokens in shapes:
                args = prefill_inputs(jax.random.PRNGKey(n_seqs * tokens + N + K), n_seqs, tokens, N, K,
                                      G=G, head_dim=head_dim)
                tflop = causal_flop([tokens] * n_seqs, [tokens] * n_seqs, N, head_dim) / 1e12
                shape = f"{n_seqs}x{tokens} N={N} K={K} H={head_dim} G={G}"
                try:
                    out = np.asarray(f(*args).astype(jnp.float32))
                    timed = _time(f, *args)
                except Exception as e:  # noqa: BLE001 - record and go on
                    print("prefill failed", shape, impl, type(e).__name__, str(e)[:300], flush=True)
                    continue
                finally:
                    del args
                frac = tflop / timed[0] / matmul_tflops
                note = f"causal, {n_seqs} seq; {100 * frac:.0f}% of bf16 matmul"
                if shape not in firsts:
                    firsts[shape] = (impl, out)
                else:
                    first, first_out = firsts[shape]
                    note += f"; max |err| vs {first} {float(np.max(np.abs(out - first_out))):.3g}"
                _row(rows_out, "prefill", shape, impl, timed, tflop=tflop, note=note)["frac_matmul"] = frac
                del out


def sweep_configs(B, ctx, G, table=SWEEP):
    """The tuning table's config for a decode shape, then the SWEEP variants of it."""
    base = tuning.gpu_config(T=B, S=B, R=N_HEADS // K_HEADS, H=HEAD_DIM, G=G, C=ctx, K=K_HEADS)
    out = [base]
    for change in table:
        change = dict(change)
        if "splits" in change:
            change["num_splits"] = max(1, int(base.num_splits * change.pop("splits")))
        cfg = dataclasses.replace(base, **change)
        if cfg not in out:
            out.append(cfg)
    return out


def _cfg_note(cfg):
    flags = "".join(f for f, on in (("H", cfg.heads_fastest), ("R", cfg.row_gather),
                                    ("V", cfg.mask_v_load), ("I", cfg.items_in_kernel)) if on)
    return (f"bq{cfg.q_tokens} bk{cfg.block_k} ns{cfg.num_splits} w{cfg.num_warps} "
            f"st{cfg.num_stages} {flags}").strip()


def sweep(rows_out, copy_gbps, shapes=SWEEP_SHAPES):
    """Our kernel under explicit tilings, for the tuning table."""
    for B, ctx, G in shapes:
        args = decode_inputs(jax.random.PRNGKey(B + ctx + G), B, ctx, G)
        gb = 2 * B * ctx * K_HEADS * HEAD_DIM * 2 / 1e9
        for cfg in sweep_configs(B, ctx, G):
            f = functools.partial(ragged_paged_attention_gpu, sm_scale=HEAD_DIM ** -0.5,
                                  config=cfg)
            try:
                t = _time(f, *args)
                _row(rows_out, "sweep", f"B={B} ctx={ctx} G={G}", "ours", t, gbytes=gb,
                     copy_gbps=copy_gbps, note=_cfg_note(cfg))
            except Exception as e:  # noqa: BLE001
                print("sweep failed", cfg, type(e).__name__, str(e)[:300], flush=True)
        del args


# MLA decode at DeepSeek-V2-Lite's shapes: 16 heads over one cached row per token (latent 512 +
# rope key 64, halves of 288 in the K and V pages, G = 16 as choose_page_elems gives alone)
MLA_HEADS, MLA_LATENT, MLA_ROPE, MLA_G = 16, 512, 64, 16
MLA_SM_SCALE = (128 + MLA_ROPE) ** -0.5          # V2-Lite's q.k dim: 128 nope + 64 rope
MLA_DECODE_SHAPES = [(B, ctx) for B in (1, 8, 32) for ctx in (2048, 4096, 16384)]


def mla_decode_inputs(key, B, ctx, G=MLA_G, dtype=jnp.bfloat16):
    """Decode inputs of MLA's absorbed attention: q [B, N, 576], pages [P, G, 1, 288] twice."""
    half = (MLA_LATENT + MLA_ROPE) // 2
    pps = ctx // G
    P = B * pps + 8
    k1, k2, k3 = jax.random.split(key, 3)
    q = jax.random.normal(k1, (B, MLA_HEADS, 2 * half), dtype)
    kp = jax.random.normal(k2, (P, G, 1, half), dtype)
    vp = jax.random.normal(k3, (P, G, 1, half), dtype)
    table = jax.random.permutation(k1, P)[:B * pps].reshape(B, pps).astype(jnp.int32)
    return (q, kp, vp, jnp.full((B,), ctx, jnp.int32), table, jnp.arange(B + 1, dtype=jnp.int32),
            jnp.asarray([B], jnp.int32))


def _in_one_buffer(args):
    """The case with its K and V pages as two windows of ONE buffer, as the crosspool split
    passes its arena row: (args on the buffer, k_page_offset, v_page_offset)."""
    q, k, v, *rest = args
    buf = jnp.concatenate([k, v])
    return (q, buf, buf, *rest), 0, k.shape[0]


def bench_mla_decode(rows_out, copy_gbps, shapes=MLA_DECODE_SHAPES, G=MLA_G):
    """MLA decode through ragged_paged_attention(latent_value_dim=512): the reference path and,
    on a GPU, the MLA kernel (mla_gpu.py, what "auto" runs there from 2 tokens; its max error
    against the reference in the note), GB/s of the latent rows read against the copy ceiling. The "_offsets" rows read
    both halves from one buffer through page offsets (the crosspool split's arena row)."""
    from pallas_kernels.ragged_paged_attention import ragged_paged_attention
    kw = dict(latent_value_dim=MLA_LATENT, sm_scale=MLA_SM_SCALE)
    backends = {"reference": "reference"}
    if jax.default_backend() == "gpu":
        backends["ours_mla"] = "gpu"
    impls = {}
    for impl, backend in backends.items():
        impls[impl] = (jax.jit(functools.partial(ragged_paged_attention, backend=backend, **kw)), False)
        impls[impl + "_offsets"] = (jax.jit(lambda *a, backend=backend, off=(0, 0): ragged_paged_attention(
            *a, backend=backend, k_page_offset=off[0], v_page_offset=off[1], **kw),
            static_argnames=("off",)), True)
    for B, ctx in shapes:
        plain = mla_decode_inputs(jax.random.PRNGKey(B * ctx), B, ctx, G)
        one, k_off, v_off = _in_one_buffer(plain)
        gb = B * ctx * (MLA_LATENT + MLA_ROPE) * plain[1].dtype.itemsize / 1e9
        outs = {}
        for impl, (f, offsets) in impls.items():
            args = one if offsets else plain
            if offsets:
                f = functools.partial(f, off=(k_off, v_off))
            outs[impl] = f(*args)
            note = _with_error("DeepSeek-V2-Lite: 16 heads, latent 512 + rope 64", impl, outs)
            _row(rows_out, "mla_decode", f"B={B} ctx={ctx} G={G}", impl, _time(f, *args), gbytes=gb,
                 copy_gbps=copy_gbps, note=note)
        del plain, one, args, outs


# the MLA kernel's tiling sweep: where B = 8 sits at 41% of copy with the defaults (RESULTS.md)
MLA_SWEEP_SHAPES = [(8, 4096), (8, 16384), (32, 4096)]
MLA_SWEEP_BLOCKS, MLA_SWEEP_SPLITS = (16, 32, 64), (2, 4, 8, 16, 32)


def sweep_mla(rows_out, copy_gbps, shapes=MLA_SWEEP_SHAPES, blocks=MLA_SWEEP_BLOCKS, splits=MLA_SWEEP_SPLITS,
              G=MLA_G, interpret=False):
    """mla_gpu.py under explicit (block_k, num_splits) at DeepSeek-V2-Lite's shapes (section
    "mla_sweep"; a tiling the kernel cannot compile is printed and skipped), for its tuning."""
    from pallas_kernels.ragged_paged_attention.mla_gpu import ragged_paged_mla_gpu
    for B, ctx in shapes:
        args = mla_decode_inputs(jax.random.PRNGKey(B * ctx), B, ctx, G)
        gb = B * ctx * (MLA_LATENT + MLA_ROPE) * args[1].dtype.itemsize / 1e9
        for block_k in blocks:
            for num_splits in splits:
                f = functools.partial(ragged_paged_mla_gpu, latent_value_dim=MLA_LATENT,
                                      sm_scale=MLA_SM_SCALE, block_k=block_k, num_splits=num_splits,
                                      interpret=interpret)
                try:
                    _row(rows_out, "mla_sweep", f"B={B} ctx={ctx} G={G}", "ours_mla", _time(f, *args), gbytes=gb,
                         copy_gbps=copy_gbps, note=f"block_k={block_k} num_splits={num_splits}")
                except Exception as e:  # noqa: BLE001
                    print("mla sweep failed", block_k, num_splits, type(e).__name__, str(e)[:300], flush=True)
        del args


# GPT-OSS-20B's attention: 64 query heads over 8 KV heads of 64 dims, a sink per head, layers
# alternating a 128-token window and full attention (one traced window per layer)
GPT_OSS_HEADS, GPT_OSS_KV_HEADS, GPT_OSS_HEAD_DIM, GPT_OSS_WINDOW = 64, 8, 64, 128
# (decode sequences, their context, prefill chunks, chunk length, prefill context)
GPT_OSS_SHAPES = [(1, 4096, 0, 0, 0), (8, 4096, 0, 0, 0), (32, 8192, 0, 0, 0), (8, 32768, 0, 0, 0),
                  (32, 4096, 2, 512, 2048)]


def gpt_oss_inputs(key, n_dec, ctx_dec, n_pre, chunk, ctx_pre, G=16, dtype=jnp.bfloat16):
    """A mixed batch at GPT-OSS-20B's attention shapes (pages [P, G, 8, 64]) and the sinks [64]."""
    q_lens = [1] * n_dec + [chunk] * n_pre
    kv_lens = [ctx_dec] * n_dec + [ctx_pre] * n_pre
    S, T = len(q_lens), sum(q_lens)
    pps = max(kv_lens) // G
    P = S * pps + 8
    k1, k2, k3, k4 = jax.random.split(key, 4)
    q = jax.random.normal(k1, (T, GPT_OSS_HEADS, GPT_OSS_HEAD_DIM), dtype)
    kp = jax.random.normal(k2, (P, G, GPT_OSS_KV_HEADS, GPT_OSS_HEAD_DIM), dtype)
    vp = jax.random.normal(k3, (P, G, GPT_OSS_KV_HEADS, GPT_OSS_HEAD_DIM), dtype)
    table = jax.random.permutation(k1, P)[:S * pps].reshape(S, pps).astype(jnp.int32)
    cu = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
    sinks = 2.0 * jax.random.normal(k4, (GPT_OSS_HEADS,), jnp.float32)
    args = (q, kp, vp, jnp.asarray(kv_lens, jnp.int32), table, cu, jnp.asarray([S], jnp.int32))
    return args, sinks, q_lens, kv_lens


def bench_gpt_oss(rows_out, copy_gbps, shapes=GPT_OSS_SHAPES, G=16):
    """GPT-OSS-20B's attention with sinks, the window a traced int32 (128, or full: 2**30),
    through ragged_paged_attention: the reference and, on a GPU, the kernel (backend="gpu",
    what "auto" runs there from 2 tokens; its max error against the reference in the note). GB/s of the K/V rows the
    step must read (a windowed query reads its last 128 keys) against the copy ceiling."""
    from pallas_kernels.ragged_paged_attention import ragged_paged_attention
    kw = dict(sm_scale=GPT_OSS_HEAD_DIM ** -0.5)
    impls = {"reference": "reference"}
    if jax.default_backend() == "gpu":
        impls["ours"] = "gpu"
    row_bytes = 2 * GPT_OSS_KV_HEADS * GPT_OSS_HEAD_DIM          # K and V elements per token
    for shape in shapes:
        args, sinks, q_lens, kv_lens = gpt_oss_inputs(jax.random.PRNGKey(sum(shape)), *shape, G=G)
        n_dec, ctx_dec, n_pre, chunk, ctx_pre = shape
        name = f"dec {n_dec}x{ctx_dec}" + (f" + pre {n_pre}x{chunk}@{ctx_pre}" if n_pre else "") + f" G={G}"
        for window in (GPT_OSS_WINDOW, None):
            read = sum(min(kv, GPT_OSS_WINDOW + ql - 1) if window else kv for ql, kv in zip(q_lens, kv_lens))
            gb = read * row_bytes * args[1].dtype.itemsize / 1e9
            w = jnp.int32(window or (1 << 30))
            outs = {}
            for impl, backend in impls.items():
                f = jax.jit(lambda *a, backend=backend: ragged_paged_attention(
                    *a[:7], sinks=a[7], sliding_window=a[8], backend=backend, **kw))
                outs[impl] = f(*args, sinks, w)
                note = _with_error(f"sinks, window {window or 'full'} (traced)", impl, outs)
                _row(rows_out, "gpt_oss_attn", name, impl, _time(f, *args, sinks, w), gbytes=gb,
                     copy_gbps=copy_gbps, note=note)
            del outs
        del args


def main(rows_out: list | None = None, copy_gbps: float | None = None, *, do_sweep=False,
         decode=True, mixed=True, mla=True, gpt_oss=True, mla_sweep=False):
    rows_out = [] if rows_out is None else rows_out
    print("jax", jax.__version__, jax.devices(), flush=True)
    if copy_gbps is None:
        copy_gbps = torch_copy_gbps()
        if copy_gbps:
            _row(rows_out, "ceiling", "2 GiB", "torch_copy", 2 * 2 ** 31 / 1e9 / copy_gbps,
                 gbytes=2 * 2 ** 31 / 1e9, copy_gbps=copy_gbps)
    if do_sweep:
        sweep(rows_out, copy_gbps)
    if decode:
        bench_decode(rows_out, copy_gbps)
    if mixed:
        bench_mixed(rows_out, do_sweep=do_sweep)
    if mla:
        bench_mla_decode(rows_out, copy_gbps)
    if mla_sweep:
        sweep_mla(rows_out, copy_gbps)
    if gpt_oss:
        bench_gpt_oss(rows_out, copy_gbps)
    return rows_out


if __name__ == "__main__":
    main(do_sweep="--sweep" in sys.argv)
