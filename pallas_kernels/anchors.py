"""Reference points measured in the same run as a kernel benchmark (GPU only).

`torch_copy_gbps`: a 2 GiB device-to-device copy through PyTorch's `copy_`, read + write
counted, as ../shared/tools/anchor_bench.py measures it: the memory-bandwidth ceiling the
kernels' GB/s are compared against.
"""
from __future__ import annotations

import statistics
import sys
from typing import Optional


def torch_copy_gbps() -> Optional[float]:
    """The copy ceiling in GB/s, or None (with a note on stderr) where torch/CUDA is missing."""
    try:
        import torch
        src = torch.empty(1024 ** 3, dtype=torch.bfloat16, device="cuda").normal_()
        dst = torch.empty_like(src)
        for _ in range(3):
            dst.copy_(src)
        torch.cuda.synchronize()
        ts = []
        for _ in range(20):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            dst.copy_(src)
            e1.record()
            torch.cuda.synchronize()
            ts.append(e0.elapsed_time(e1) / 1e3)
        gbps = 2 * src.numel() * 2 / 1e9 / statistics.median(ts)
        del src, dst
        torch.cuda.empty_cache()
        return gbps
    except Exception as e:  # noqa: BLE001 - torch is optional on the device machine
        print("torch copy unavailable:", type(e).__name__, e, file=sys.stderr)
        return None
