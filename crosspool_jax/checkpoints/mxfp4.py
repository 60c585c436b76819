"""MXFP4 expert weights (GPT-OSS's released checkpoints), dequantised tensor by tensor as the
loader streams them.

A quantised tensor NAME is stored as two tensors: NAME_blocks (uint8 [..., R, G, 16]: blocks of
32 FP4 e2m1 values along the input dim, two per byte, the low nibble first) and NAME_scales
(uint8 [..., R, G]: one power-of-two exponent per block, biased by 127). Its value, as
transformers' `integrations.mxfp4.convert_moe_packed_tensors` computes it, is
FP4[nibble] * 2 ** (scale - 127) laid out [..., R, G * 32], then the last two axes swapped:
[..., G * 32, R], the unquantised tensor's layout (GPT-OSS: gate_up_proj [E, D, 2F], down_proj
[E, F, D]). `Mxfp4Tensors` shows a safetensors set with every such pair as the one float32
tensor NAME, so the loader's name and shape checks and its per-leaf streaming apply unchanged;
one tensor (one layer's experts) is dequantised at a time, in float32 on the host.

Keeping MXFP4 on the device instead would take: the blocks and scales as the weights pool's
leaves (a quarter of bf16's bytes, plus 1/32 for the scales), and grouped-matmul kernels that
unpack a tile's nibbles and scale them in registers before the MMA (or an FP4 MMA where the
GPU has one); the reference would dequantise a layer's experts inside the step.
"""
from __future__ import annotations

import numpy as np

FP4_VALUES = np.array([+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0,
                       -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)
BLOCKS, SCALES = "_blocks", "_scales"


def dequantize(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """uint8 blocks [..., R, G, 16] and scales [..., R, G] -> float32 [..., G * 32, R]."""
    blocks = np.asarray(blocks, np.uint8)
    scales = np.asarray(scales, np.uint8)
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != 16:
        raise ValueError(f"MXFP4 blocks [..., R, G, 16] and scales [..., R, G] do not match: "
                         f"{blocks.shape} and {scales.shape}")
    *prefix, R, G, _ = blocks.shape
    values = np.empty((*prefix, R, G, 32), np.float32)
    values[..., 0::2] = FP4_VALUES[blocks & 0x0F]
    values[..., 1::2] = FP4_VALUES[blocks >> 4]
    values = np.ldexp(values, scales.astype(np.int32)[..., None] - 127)
    return np.swapaxes(values.reshape(*prefix, R, G * 32), -1, -2)


class Mxfp4Tensors:
    """A safetensors set (`keys`, `info`, `get`, `file_of`) with every NAME_blocks + NAME_scales
    pair shown as one float32 tensor NAME, dequantised when read."""

    def __init__(self, tensors):
        self._tensors = tensors
        names = set(tensors.keys())
        self._quantized = {n[:-len(BLOCKS)] for n in names
                           if n.endswith(BLOCKS) and n[:-len(BLOCKS)] + SCALES in names}
        hidden = {q + suffix for q in self._quantized for suffix in (BLOCKS, SCALES)}
        self._names = sorted(names - hidden | self._quantized)

    @property
    def quantized(self) -> frozenset:
        return frozenset(self._quantized)

    def keys(self) -> list[str]:
        return list(self._names)

    def file_of(self, name: str) -> str:
        return self._tensors.file_of(name + BLOCKS if name in self._quantized else name)

    def info(self, name: str) -> tuple[str, tuple]:
        if name not in self._quantized:
            return self._tensors.info(name)
        _, shape = self._tensors.info(name + BLOCKS)
        *prefix, R, G, _ = shape
        return "F32", (*prefix, G * 32, R)

    def get(self, name: str) -> np.ndarray:
        if name not in self._quantized:
            return self._tensors.get(name)
        return dequantize(self._tensors.get(name + BLOCKS), self._tensors.get(name + SCALES))
