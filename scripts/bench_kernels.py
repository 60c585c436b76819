"""One benchmark table for the Pallas kernels on a GPU (run on the device machine).

    PYTHONPATH=. python3 scripts/bench_kernels.py [--sweep] [--json PATH] [--skip-moe]
        [--skip-attention] [--attention-sweep-only] [--moe-sweep-only] [--skip-decode]
        [--skip-mixed] [--no-moe-sweep] [--moe-no-prefill] [--moe-no-peers] [--skip-gpt-oss]
        [--only-new] [--mla-sweep] [--layer-matmul-only] [--prefill-only]

Measures the copy ceiling once (a 2 GiB device-to-device torch copy_, read + write counted),
then runs pallas_kernels.ragged_paged_attention.bench.main and, if it exists,
pallas_kernels.fused_moe.bench.main, and prints all their rows as one table. Among them, the
GPT-OSS-20B and MLA rows: attention with sinks and a traced window of 128 or full (section
gpt_oss_attn), DeepSeek-V2-Lite's MLA decode on separate pages and with page offsets into one
buffer (mla_decode, impl *_offsets), GPT-OSS's experts with biases and the clamped SwiGLU at
1, 2 and 32 tokens (moe decode, shape "gpt_oss_20b ... biases+clamp"), each kernel beside the
reference, and GLM-4.7-Flash's sigmoid + bias routing by XLA beside the routing kernel (moe
decode, shape "glm47_flash ... sigmoid+bias"). `--only-new` runs just those rows (no decode / mixed attention table, no other MoE
shapes, no MoE peers or prefill); `--skip-gpt-oss` leaves the GPT-OSS rows out; `--mla-sweep`
adds the MLA kernel under explicit (block_k, num_splits) tilings (section mla_sweep, for its
tuning: e.g. `--only-new --mla-sweep --skip-moe --skip-gpt-oss`). The layer-matmul rows (moe
decode, shape "qwen3_30b_a3b q|k|o ..."; in `--only-new` too, alone with `--layer-matmul-only`):
one layer of a stacked projection, XLA's dot of the slice beside `layer_matmul` in place.
`--prefill-only`: only the prefill attention rows (section prefill) and the bf16 matmul rate
they are compared against (no copy ceiling, no other rows).
"""
from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from pallas_kernels.anchors import torch_copy_gbps  # noqa: E402
from pallas_kernels.ragged_paged_attention import bench as rpa_bench  # noqa: E402


MOE_SWEEP_SHAPES = (1, 3, 5)    # Qwen3-30B-A3B 1 and 64 tokens, OLMoE (fused_moe.bench)


def _fmt(v, spec):
    return "" if v is None else format(v, spec)


def print_table(rows, header):
    print(header)
    cols = ("section", "shape", "impl", "us", "GB/s", "%copy", "TFLOP/s", "note")
    lines = [cols]
    for r in rows:
        frac = r.get("frac_copy")
        lines.append((r.get("section", ""), r.get("shape", ""), r.get("impl", ""),
                      _fmt(r.get("us"), ".1f"), _fmt(r.get("GBps"), ".0f"),
                      _fmt(None if frac is None else 100 * frac, ".0f"),
                      _fmt(r.get("TFLOPs"), ".1f"), str(r.get("note", ""))))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(cols))]
    for line in lines:
        print(" | ".join(str(c).ljust(w) for c, w in zip(line, widths)))


_KNOWN = ("section", "shape", "impl", "us", "GBps", "frac_copy", "TFLOPs", "note")


def _normalise_moe(row):
    """The MoE bench's rows ('kind', extra keys) in this table's columns."""
    out = {k: row[k] for k in _KNOWN if k in row}
    out["section"] = row.get("section") or f"moe {row.get('kind', '')}".strip()
    extra = {k: v for k, v in row.items() if k not in _KNOWN and k != "kind"}
    if extra:
        out["note"] = " ".join([str(out.get("note", ""))] + [f"{k}={v}" for k, v in extra.items()]).strip()
    return out


def run_moe(rows, sweep, **moe_kw):
    """pallas_kernels.fused_moe.bench.main() if that module exists; its rows join the table."""
    try:
        from pallas_kernels.fused_moe import bench as moe_bench
    except ImportError as e:
        print("no MoE benchmark:", e)
        return
    try:
        params = inspect.signature(moe_bench.main).parameters
        kw, moe_rows = {}, []
        if "sweep" in params:
            kw["sweep"] = sweep
        if "rows_out" in params:
            kw["rows_out"] = moe_rows
        kw.update({k: v for k, v in moe_kw.items() if k in params})
        out = moe_bench.main(**kw)
        if isinstance(out, list) and out is not moe_rows:
            moe_rows.extend(out)
        rows.extend(_normalise_moe(r) for r in moe_rows if isinstance(r, dict))
    except Exception:  # noqa: BLE001 - the attention table still prints
        traceback.print_exc()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true", help="also sweep attention tilings")
    ap.add_argument("--json", default=None, help="write the rows here as JSON")
    ap.add_argument("--skip-moe", action="store_true")
    ap.add_argument("--skip-attention", action="store_true")
    ap.add_argument("--attention-sweep-only", action="store_true",
                    help="with --sweep: only the decode tiling sweep, no decode/mixed table")
    ap.add_argument("--moe-sweep-only", action="store_true",
                    help="MoE: our kernels on MOE_SWEEP_SHAPES only, no peers, no prefill")
    ap.add_argument("--skip-decode", action="store_true", help="no attention decode table")
    ap.add_argument("--skip-mixed", action="store_true", help="no attention mixed rows")
    ap.add_argument("--no-moe-sweep", action="store_true", help="with --sweep: not for MoE")
    ap.add_argument("--moe-no-prefill", action="store_true", help="no MoE prefill rows")
    ap.add_argument("--moe-no-peers", action="store_true", help="MoE: our kernels only")
    ap.add_argument("--skip-gpt-oss", action="store_true", help="no GPT-OSS attention or MoE rows")
    ap.add_argument("--mla-sweep", action="store_true",
                    help="the MLA kernel under explicit (block_k, num_splits) tilings (section mla_sweep)")
    ap.add_argument("--layer-matmul-only", action="store_true",
                    help="only the layer-matmul rows (a layer of a stacked projection, in place or sliced)")
    ap.add_argument("--only-new", action="store_true",
                    help="only the GPT-OSS attention, MLA decode and GPT-OSS MoE rows")
    ap.add_argument("--prefill-only", action="store_true",
                    help="only the prefill attention rows and the bf16 matmul rate (section prefill)")
    a = ap.parse_args()
    if a.only_new:
        a.skip_decode = a.skip_mixed = a.moe_no_prefill = a.moe_no_peers = True
    if a.layer_matmul_only:
        a.skip_attention = a.moe_no_prefill = a.moe_no_peers = True
    rows = []
    if a.prefill_only:
        a.skip_attention = a.skip_moe = True
        rpa_bench.bench_prefill(rows, rpa_bench.matmul_tflops(rows))
    copy_gbps = None if a.prefill_only else torch_copy_gbps()
    if copy_gbps:
        rows.append({"section": "ceiling", "shape": "2 GiB", "impl": "torch_copy",
                     "us": 2 * 2 ** 31 / 1e9 / copy_gbps * 1e6, "GBps": copy_gbps,
                     "frac_copy": 1.0})
    if not a.skip_attention:
        try:
            only = a.attention_sweep_only
            rpa_bench.main(rows, copy_gbps, do_sweep=a.sweep, decode=not (only or a.skip_decode),
                           mixed=not (only or a.skip_mixed), gpt_oss=not (only or a.skip_gpt_oss),
                           mla_sweep=a.mla_sweep)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
    if not a.skip_moe:
        moe_kw = dict(peers=False, prefill=False, shapes=MOE_SWEEP_SHAPES) if a.moe_sweep_only else {}
        if a.moe_no_prefill:
            moe_kw["prefill"] = False
        if a.moe_no_peers:
            moe_kw["peers"] = False
        if a.skip_gpt_oss:
            moe_kw["gpt_oss"] = False
        if a.only_new:
            moe_kw["shapes"] = ()
        if a.layer_matmul_only:
            moe_kw.update(shapes=(), gpt_oss=False, routing_kinds=False)
        run_moe(rows, a.sweep and not a.no_moe_sweep, **moe_kw)
    header = (f"{jax.devices()[0].device_kind}, jax {jax.__version__}, "
              f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"header": header, "rows": rows}, f, indent=1)
    print_table(rows, header)


if __name__ == "__main__":
    main()
