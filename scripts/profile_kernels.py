"""Where one kernel call's GPU time goes: every XLA op of the call, on the device, from a
`jax.profiler` trace (CUPTI), for our attention / MoE kernels and their peers.

    PYTHONPATH=. python3 scripts/profile_kernels.py [--json PATH] [--cases NAME,...]

Each case is one jitted call, run `--calls` times back to back over 3 copies of its inputs
inside one trace after a warm-up (pallas_kernels/timing.py, the benchmarks' timer). Per case it prints the device span of one call (first op start to last op end,
median over the calls), the sum of its ops' durations (the span minus this is launch gaps)
and each op (fusion, custom call) with its median duration, in the order they ran. This is
what RESULTS.md's "what limits it" sections are inferred from: a kernel's own time against
the small launches around it. Needs a GPU; on a CPU it runs but reports host ops.
"""
from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from pallas_kernels.fused_moe import bench as moe_bench  # noqa: E402
from pallas_kernels.fused_moe.api import fused_moe  # noqa: E402
from pallas_kernels.ragged_paged_attention import bench as rpa_bench  # noqa: E402
from pallas_kernels.ragged_paged_attention.gpu import ragged_paged_attention_gpu  # noqa: E402
from pallas_kernels.timing import call_spans, distinct_copies, traced_runs  # noqa: E402

_HD = rpa_bench.HEAD_DIM


def _attention_cases():
    """name -> (function, args): our kernel and JAX's paged_attention on decode shapes."""
    out = {}
    for B, ctx, G in ((8, 2048, 16), (8, 4096, 16), (1, 32768, 16), (64, 4096, 16)):
        args = rpa_bench.decode_inputs(jax.random.PRNGKey(B * ctx + G), B, ctx, G)
        out[f"attn ours B={B} ctx={ctx} G={G}"] = (
            functools.partial(ragged_paged_attention_gpu, sm_scale=_HD ** -0.5), args)
        kp2, vp2 = jnp.moveaxis(args[1], 2, 0), jnp.moveaxis(args[2], 2, 0)
        out[f"attn jax_paged B={B} ctx={ctx} G={G}"] = (
            functools.partial(rpa_bench.jax_paged, pages_per_compute_block=4, k_splits=8),
            (args[0], kp2, vp2, *args[3:]))
    return out


def _moe_cases():
    out = {}
    for name, E, D, F, T, top_k in (("qwen3", 128, 2048, 768, 1, 8),
                                    ("qwen3", 128, 2048, 768, 16, 8),
                                    ("qwen3", 128, 2048, 768, 256, 8),
                                    ("mixtral", 8, 4096, 14336, 64, 2)):
        out[f"moe ours {name} T={T}"] = (
            functools.partial(fused_moe, top_k=top_k, backend="gpu"),
            moe_bench.decode_inputs(E, D, F, T))
    return out


def profile_case(f, args, calls):
    """Per-op medians of one call of f (timing.traced_runs: back to back over 3 input copies)."""
    runs = traced_runs(f, distinct_copies(args, 3), calls)
    if not runs:
        return {"error": "no GPU kernels in the trace, or calls that launch different kernels"}
    busy = [sum(e[2] for e in run) * 1e-9 for run in runs]
    per_op = collections.OrderedDict()
    for run in runs:
        for name, _, dur in run:
            per_op.setdefault(name, []).append(dur)
    return {"calls": len(runs), "span_us": statistics.median(call_spans(runs)) * 1e6,
            "busy_us": statistics.median(busy) * 1e6,
            "ops": [(name, statistics.median(d) / 1e3, len(d)) for name, d in per_op.items()]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--calls", type=int, default=8)
    ap.add_argument("--cases", default=None, help="comma-separated substrings of case names")
    a = ap.parse_args()
    print("jax", jax.__version__, jax.devices(), flush=True)
    results = {}
    for builder in (_attention_cases, _moe_cases):
        for name, (f, args) in builder().items():
            if a.cases and not any(c in name for c in a.cases.split(",")):
                continue
            try:
                r = profile_case(f, args, a.calls)
            except Exception as e:  # noqa: BLE001 - record and go on
                r = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            results[name] = r
            if "error" in r:
                print(f"{name}: {r['error']}", flush=True)
                continue
            print(f"{name}: span {r['span_us']:.1f} us, ops busy {r['busy_us']:.1f} us, "
                  f"{r['calls']} calls", flush=True)
            for op, us, n in r["ops"]:
                print(f"    {us:8.1f} us  {op[:110]}  (x{n})", flush=True)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
