"""Block sizes for the ragged paged attention kernels: the one tuning table.

Everything here depends on static shapes only (head dim H, page size G, query heads per
KV head R, tokens T, sequence capacity S), so a jitted step compiles once per geometry.
The GPU numbers were chosen for Hopper (132 SMs, 228 KiB shared memory per SM); see
RESULTS.md for what they measured.
"""
from __future__ import annotations

import dataclasses

from pallas_kernels.pow2 import next_pow2, prev_pow2  # noqa: F401 - tuning.next_pow2 for the kernels

GPU_NUM_SMS = 132                 # H100 SXM / H200; only used to size the split-KV grid
_CTAS_PER_SM = 4                  # enough resident CTAs to keep HBM busy
# Splits of at least 256 keys, and no more than one wave of programs (4 per SM: the kernel's
# 128 registers per thread allow 4 CTAs of 4 warps): larger splits leave small batches at
# half a wave, and rounding the split count past one wave is slower (RESULTS.md: the sweep).
_MIN_KEYS_PER_SPLIT = 256


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """One kernel launch's tiling.

    q_tokens: query tokens of one sequence per program (BQ); rows = BQ * padded R.
    block_k: keys per inner-loop step (a multiple or a divisor of the page size).
    num_splits: KV splits (flash-decoding) per work item, merged by log-sum-exp.
    heads_fastest: GPU grid order; True launches the KV heads of one item back to back, so
      the programs running together read the same pages (each page row holds all K heads).
    row_gather: GPU K/V loads address one pool row per key ([BK, H] directly) instead of
      whole pages ([BK / G, G, H], reshaped).
    mask_v_load: with row_gather, V columns outside the key range are zeroed by a masked
      load (other=0) instead of a select after the load.
    items_in_kernel: GPU programs derive their work item (sequence, tokens, key range) from
      cu_q_lens / kv_lens themselves instead of reading a table built by XLA before the call
      (saves the small XLA launches of work.build_items).
    """
    q_tokens: int
    block_k: int
    num_splits: int = 1
    num_warps: int = 4
    num_stages: int = 2
    heads_fastest: bool = False
    row_gather: bool = False
    mask_v_load: bool = False
    items_in_kernel: bool = False

    def __post_init__(self):
        for name in ("heads_fastest", "row_gather", "mask_v_load", "items_in_kernel"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"BlockConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.mask_v_load and not self.row_gather:
            raise ValueError("BlockConfig.mask_v_load needs row_gather=True")
        for name in ("q_tokens", "block_k", "num_splits", "num_warps", "num_stages"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"BlockConfig.{name} must be a positive int, got {v!r}")
        for name in ("q_tokens", "block_k"):
            v = getattr(self, name)
            if v & (v - 1):
                raise ValueError(f"BlockConfig.{name} must be a power of two, got {v}")


def is_decode_heavy(T: int, S: int) -> bool:
    """Few query tokens per sequence on average: tile for one token per program."""
    return T <= 2 * S


def gpu_config(*, T: int, S: int, R: int, H: int, G: int, C: int, K: int,
               itemsize: int = 2) -> BlockConfig:
    """The GPU (Triton-lowered) kernel's tiling for a call's static shapes.

    C is the context capacity pages_per_seq * G (the most keys a sequence can have);
    itemsize the bytes of one K/V element. One K tile is kept near 16 KiB so that K and V
    of `num_stages` steps fit in shared memory twice over (two programs per SM).
    """
    Rp = next_pow2(R)
    decode = is_decode_heavy(T, S)
    rows = 16 if decode else 64
    q_tokens = max(1, rows // Rp)
    q_tokens = max(min(q_tokens, next_pow2(T)), 16 // Rp, 1)    # tl.dot needs >= 16 rows
    # K tiles of 16 KiB (bk 64 at H 128, bf16): 3 stages of K and V take 96 KiB, two
    # programs per SM; measured on an H200 (RESULTS.md) 1.2-1.4x faster than 32 KiB tiles
    # (bk 128, one program per SM) on decode, and 1.3-1.4x on the mixed/prefill batches.
    block_k = max(16, min(128, 16384 // (H * itemsize)))
    work = min(T, S + T // q_tokens)
    want = max(1, GPU_NUM_SMS * _CTAS_PER_SM // max(1, work * K))
    max_splits = max(1, C // _MIN_KEYS_PER_SPLIT)
    num_splits = min(prev_pow2(want), next_pow2(max_splits))
    if not decode:
        num_splits = min(num_splits, 4)
    stage_bytes = 2 * block_k * H * itemsize                      # K and V tiles
    # Measured on an H200 (RESULTS.md): 4 warps and a 3-stage pipeline beat 8 warps / 2
    # stages for decode and for prefill chunks alike (prefill 1.5-1.8x); 4-byte K/V and
    # head dim 256 were not measured: 2 stages.
    num_stages = 3 if itemsize == 2 and H <= 128 and 3 * stage_bytes <= 192 * 1024 else 2
    # One pool row per key with V masked in the load (1.2-1.3x on decode, RESULTS.md), the
    # KV heads of an item launched together, work items derived inside the kernel. The split
    # merge stays in XLA (one fused op): merging in the kernel measured 1.0-1.7x slower on
    # every split shape (RESULTS.md).
    return BlockConfig(q_tokens=q_tokens, block_k=block_k, num_splits=num_splits,
                       num_warps=4, num_stages=num_stages, heads_fastest=True,
                       row_gather=True, mask_v_load=True, items_in_kernel=True)


def tpu_config(*, T: int, S: int, R: int, H: int, G: int) -> BlockConfig:
    """The TPU kernel's tiling: one page per grid step, rows a multiple of 8 sublanes."""
    decode = is_decode_heavy(T, S)
    rows = 8 if decode else 128
    q_tokens = max(1, rows // next_pow2(R))
    q_tokens = max(min(q_tokens, next_pow2(T)), 8 // next_pow2(R), 1)
    return BlockConfig(q_tokens=q_tokens, block_k=G, num_splits=1, num_warps=1, num_stages=2)
