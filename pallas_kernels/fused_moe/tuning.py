"""Block sizes of the fused-MoE kernels: one frozen config type and the tuning table.

The M tile (`block_m`) is chosen from the expected rows per active group so that, in decode,
all of an expert's rows fit one tile and its weights are read once; N is spread over the grid.
Table entries were picked from the H100/H200 runs recorded in RESULTS.md.
"""
from __future__ import annotations

import dataclasses
import math

from pallas_kernels.pow2 import is_pow2, next_pow2, prev_pow2


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """Tile sizes: rows per tile, output columns per program, K chunk; Triton knobs."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"BlockConfig.{name} must be a positive int, got {v!r}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"BlockConfig.num_warps must be a power of two <= 16, "
                             f"got {self.num_warps}")
        if self.num_stages < 1:
            raise ValueError(f"BlockConfig.num_stages must be >= 1, got {self.num_stages}")


def _fit(dim: int, target: int, minimum: int, *, need_pow2: bool) -> int:
    """Largest block <= target dividing dim (a power of two >= minimum when need_pow2)."""
    b = min(target, dim)
    if need_pow2:        # start at a power of two: halving 48 gives 24, 12 and never 16
        b = prev_pow2(b)
    while b >= minimum:
        if dim % b == 0 and (is_pow2(b) or not need_pow2):
            return b
        b = b // 2 if need_pow2 else b - 1
    if not need_pow2:
        return dim
    raise ValueError(f"dimension {dim} has no power-of-two block >= {minimum} dividing it; "
                     f"the GPU kernels need dims that are multiples of {minimum}")


def gpu_supports(*dims: int) -> bool:
    """Whether the GPU kernels can tile weights with these K / N dims (multiples of 16)."""
    return all(d % 16 == 0 and d > 0 for d in dims)


def block_m_for(rows: int, groups: int, *, lo: int = 16, hi: int = 128) -> int:
    """Rows per tile: the next power of two >= ~2x the mean rows of an active group."""
    active = max(1, min(groups, rows))
    want = max(lo, 2 * -(-rows // active))
    b = lo
    while b < want and b < hi:
        b *= 2
    return b


GPU_SMS = 132  # H100 SXM / H200: programs per wave when one program fits per SM
# Hopper allows 227 KiB of shared memory per block; keep headroom for Triton's own scratch.
# 220 KiB: the decode configs measured in RESULTS.md ran at 204 KiB (Qwen3 gate/up) and 216 KiB
# (Mixtral gate/up, 3 stages); the one that failed asked for 240 KiB (Mixtral prefill gate/up).
GPU_SMEM_BUDGET = 220 * 1024


def gpu_smem_bytes(cfg: BlockConfig, weight_tiles: int, itemsize: int = 2) -> int:
    """Shared memory of one program: `num_stages` buffers of an [bm, bk] input tile and
    `weight_tiles` [bk, bn] weight tiles (2 for the fused gate/up kernel)."""
    return cfg.num_stages * (cfg.block_m * cfg.block_k + weight_tiles * cfg.block_k * cfg.block_n) * itemsize


def fit_gpu_smem(cfg: BlockConfig, weight_tiles: int, itemsize: int = 2) -> BlockConfig:
    """Fewer pipeline stages, then narrower weight tiles, until the program fits the budget
    (Mixtral-sized prefill in the gate/up kernel asked for 240 KiB at 3 stages on an H200)."""
    while gpu_smem_bytes(cfg, weight_tiles, itemsize) > GPU_SMEM_BUDGET:
        if cfg.num_stages > 2:
            cfg = dataclasses.replace(cfg, num_stages=cfg.num_stages - 1)
        elif cfg.block_n > 32:
            cfg = dataclasses.replace(cfg, block_n=cfg.block_n // 2)
        elif cfg.block_k > 16:
            cfg = dataclasses.replace(cfg, block_k=cfg.block_k // 2)
        else:
            break
    return cfg


def gpu_config(rows: int, groups: int, K: int, N: int) -> BlockConfig:
    """Block sizes for the GPU kernels for `rows` rows over `groups` groups, [K, N] weights.

    From the H200 sweeps in RESULTS.md. Small M tiles (decode): 128-column weight tiles in
    128-row K chunks, 3 stages deep; N is split further (down to 32 columns) while the grid
    would not fill 1.5 waves, 4 waves (down to 64 columns) when there are fewer rows than
    groups (Qwen3-30B-A3B at 1 token: 8 active tiles). Large tiles
    (prefill): 128x256 with 64-deep K chunks, 8 warps.
    """
    bm = block_m_for(rows, groups)
    if bm <= 32:
        bn_t, bk_t, warps, stages = 128, 128, 4, 3
    elif bm <= 64:
        bn_t, bk_t, warps, stages = 128, 64, 4, 4
    else:
        bn_t, bk_t, warps, stages = 256, 64, 8, 3
    bn = _fit(N, bn_t, 16, need_pow2=True)
    active_tiles = max(1, min(groups, rows))
    # fewer rows than groups (one token, top-8 of 128): small tiles, aim for 4 waves, but
    # not below 64 columns (Qwen3-30B-A3B at 1 token, step-timed on an H200: 64 columns
    # 39.8 us, 32 columns 43.9 us; RESULTS.md)
    want = (4.0 if rows < groups else 1.5) * GPU_SMS
    floor = 64 if rows < groups else 32
    while bn > floor and active_tiles * (N // bn) < want and N % (bn // 2) == 0:
        bn //= 2
    bk = _fit(K, bk_t, 16, need_pow2=True)
    return BlockConfig(bm, bn, bk, warps, stages)


def layer_matmul_config(rows: int, K: int, N, itemsize: int = 2) -> tuple[BlockConfig, int]:
    """(block sizes, K splits) of `gpu.layer_matmul`: x [rows, K] @ one [K, N] matrix, or
    several of one K side by side (N a tuple: q, k and v in one launch; the column blocks
    divide every N, the program counts are of their sum).

    Decode-sized (one row tile of <= 64 rows): 64-column weight tiles (32 below 2,048 columns),
    128-row K chunks 4 stages deep, and K split over the grid: the fewest whole-chunk splits that
    give two waves of programs, each split keeping >= 256 rows of K (Qwen3-30B-A3B's q: 64 column
    blocks x 8 splits; k and v: 16 x 8; q|k|v: 80 x 4; GPT-OSS's q, K = 2,880 in 45 chunks of
    64: 64 x 5). Larger row counts: the grouped matmul's prefill tiles (128 x 256, 64-deep
    K chunks, 8 warps), columns halved down to 64 while the grid is under 1.5 waves, no split."""
    Ns = tuple(N) if isinstance(N, (tuple, list)) else (N,)
    total, common = sum(Ns), math.gcd(*Ns)
    bm = min(128, max(16, next_pow2(rows)))
    tiles = -(-rows // bm)
    if bm > 64:
        bn = _fit(common, 256, 16, need_pow2=True)
        while bn > 64 and tiles * (total // bn) < 1.5 * GPU_SMS and common % (bn // 2) == 0:
            bn //= 2
        return fit_gpu_smem(BlockConfig(bm, bn, _fit(K, 64, 16, need_pow2=True), 8, 3), 1, itemsize), 1
    bn = _fit(common, 64 if total >= 2048 else 32, 16, need_pow2=True)
    bk = _fit(K, 128, 16, need_pow2=True)
    programs, chunks = tiles * (total // bn), K // bk
    allowed = [d for d in range(1, chunks + 1) if chunks % d == 0 and K // d >= 256] or [1]
    splits = next((d for d in allowed if programs * d >= 2 * GPU_SMS), allowed[-1])
    return fit_gpu_smem(BlockConfig(bm, bn, bk, 4, 4), 1, itemsize), splits


def tpu_config(rows: int, groups: int, K: int, N: int, itemsize: int) -> BlockConfig:
    """Block sizes for the Mosaic TPU kernels: lane dims multiples of 128 or whole."""
    sub = 8 * max(1, 4 // itemsize)
    bm = max(sub, block_m_for(rows, groups, lo=sub, hi=512))
    bn = _fit(N, 512, 128, need_pow2=False) if N % 128 == 0 else N
    bk = _fit(K, 512, 128, need_pow2=False) if K % 128 == 0 else K
    if bn % 128 and bn != N:
        bn = N
    if bk % 128 and bk != K:
        bk = K
    return BlockConfig(bm, bn, bk, 4, 2)
