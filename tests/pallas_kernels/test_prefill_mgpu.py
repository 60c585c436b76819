"""Prefill attention on Hopper (prefill_mgpu.py) and its benchmark rows (bench.bench_prefill).

On this CPU: the benchmark's prefill rows at a toy shape through the reference (their FLOP
count checked by hand).
"""
from __future__ import annotations

import jax
import pytest

from pallas_kernels.ragged_paged_attention import bench


def _one_call(f, *args):
    """A stand-in for bench._time: what is checked is the rows, not the timer."""
    jax.block_until_ready(f(*args))
    return 1e-3, "host"


def test_causal_flop_counts_only_the_visible_pairs():
    # 3 queries at the end of 5 keys see 3, 4 and 5 keys; a full prefill of 4 sees 1+2+3+4
    assert bench.causal_pairs([3], [5]) == 3 + 4 + 5
    assert bench.causal_pairs([4, 1], [4, 7]) == 10 + 7
    assert bench.causal_flop([4], [4], n_heads=2, head_dim=8) == 4 * 2 * 8 * 10


def test_prefill_benchmark_rows_on_cpu(monkeypatch):
    """The prefill rows at a toy shape through the reference (1 and 2 sequences, two head
    layouts), each with its TFLOP/s of the visible pairs and its share of the matmul rate; the
    matmul rate row from a small dot."""
    monkeypatch.setattr(bench, "_time", _one_call)
    rows = []
    rate = bench.matmul_tflops(rows, n=64)
    assert rows[0]["section"] == "ceiling" and rows[0]["impl"] == "xla_dot"
    assert abs(rate - 2 * 64 ** 3 / 1e-3 / 1e12) < 1e-12
    bench.bench_prefill(rows, matmul_tflops=2.0, shapes=[(1, 40), (2, 24)], heads=((4, 2), (4, 1)),
                        G=16, backends=("reference",), head_dim=16)
    pre = [r for r in rows if r["section"] == "prefill"]
    assert len(pre) == 4 and all(r["impl"] == "reference" for r in pre)
    for r in pre:
        n, tokens = (1, 40) if r["shape"].startswith("1x40") else (2, 24)
        n_heads = int(r["shape"].split("N=")[1].split()[0])
        flop = 4 * n_heads * 16 * n * tokens * (tokens + 1) // 2
        assert abs(r["TFLOPs"] - flop / 1e-3 / 1e12) < 1e-9
        assert abs(r["frac_matmul"] - r["TFLOPs"] / 2.0) < 1e-12
