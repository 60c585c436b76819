"""Run one kernel case a few times, for Nsight Compute to profile (ncu reads the hardware
counters of each launch; it replays kernels, so this script only has to launch them).

    ncu --clock-control none -k regex:"crosspool|ragged" --launch-skip 3 --launch-count 3 \
        --section SpeedOfLight --section LaunchStats --section Occupancy \
        --section WarpStateStats python3 scripts/ncu_kernels.py --case moe_qwen3_t1

Cases: moe_qwen3_t1, moe_qwen3_t16 (our fused_moe: routing, gate/up, down, combine),
attn_b8_2k, attn_b1_32k (our attention, page 16). Warm-up launches (compile) come first, so
skip them with --launch-skip (each case launches its kernels once per call; 2 warm-up calls).
"""
from __future__ import annotations

import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from pallas_kernels.fused_moe import bench as moe_bench  # noqa: E402
from pallas_kernels.fused_moe.api import fused_moe  # noqa: E402
from pallas_kernels.ragged_paged_attention import bench as rpa_bench  # noqa: E402
from pallas_kernels.ragged_paged_attention.gpu import ragged_paged_attention_gpu  # noqa: E402


def _moe(T):
    """Qwen3-30B-A3B's MoE layer (128 experts, 2048 x 768, top-8) at T tokens."""
    return (functools.partial(fused_moe, top_k=8, backend="gpu"),
            moe_bench.decode_inputs(128, 2048, 768, T))


def _attn(B, ctx):
    args = rpa_bench.decode_inputs(jax.random.PRNGKey(B * ctx + 16), B, ctx, 16)
    return functools.partial(ragged_paged_attention_gpu, sm_scale=rpa_bench.HEAD_DIM ** -0.5), args


CASES = {
    "moe_qwen3_t1": lambda: _moe(1),
    "moe_qwen3_t16": lambda: _moe(16),
    "attn_b8_2k": lambda: _attn(8, 2048),
    "attn_b1_32k": lambda: _attn(1, 32768),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", required=True, choices=sorted(CASES))
    ap.add_argument("--calls", type=int, default=5)
    a = ap.parse_args()
    f, args = CASES[a.case]()
    g = jax.jit(f)
    for _ in range(a.calls):
        jax.block_until_ready(g(*args))


if __name__ == "__main__":
    main()
