"""Rotary position embeddings: inverse frequencies per `ModelConfig` (default, linear, llama3,
yarn) and their application in the rotate-half convention Hugging Face uses.

YaRN (https://arxiv.org/abs/2309.00071, as transformers computes it): each frequency is a blend
of the original (extrapolated) and the factor-interpolated one, by a linear ramp over the
dimensions between the correction dims of beta_fast and beta_slow rotations at the pretraining
length; cos and sin are then scaled by the attention factor (0.1 ln(factor) + 1 unless given,
or the mscale / mscale_all_dim ratio). RoPE rotates `config.rope_dim` dims per head (MLA: the
rope part only); with `config.rope_interleave` (DeepSeek) it rotates the pairs (x0, x1),
(x2, x3), ... and returns the rotated evens then the rotated odds (transformers'
`apply_rotary_pos_emb_interleave`: a fixed permutation of the pairs' output, the same for q
and k, so q.k is that of DeepSeek's complex-number form)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from crosspool_jax.models.config import ModelConfig


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """float32[H/2] inverse frequencies (H = config.rope_dim), computed on the host like transformers does."""
    H = config.rope_dim
    inv_freq = (1.0 / (np.float32(config.rope_theta)
                       ** (np.arange(0, H, 2, dtype=np.int64).astype(np.float32) / np.float32(H))))
    inv_freq = inv_freq.astype(np.float32)
    scaling = config.rope_scaling_dict
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "linear":
        inv_freq = inv_freq / np.float32(scaling["factor"])
    elif rope_type == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled)
    elif rope_type == "yarn":
        inv_freq = _yarn_inv_freq(scaling, float(config.rope_theta), H)
    return np.asarray(inv_freq, np.float32)


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_attention_factor(config: ModelConfig) -> float:
    """The factor cos and sin are multiplied by (1.0 except for yarn)."""
    scaling = config.rope_scaling_dict
    if scaling.get("rope_type", "default") != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor = float(scaling["factor"])
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return _yarn_mscale(factor, float(mscale)) / _yarn_mscale(factor, float(mscale_all_dim))
    return _yarn_mscale(factor)


def _yarn_inv_freq(scaling: dict, base: float, dim: int) -> np.ndarray:
    factor = float(scaling["factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    beta_fast = float(scaling.get("beta_fast") or 32)
    beta_slow = float(scaling.get("beta_slow") or 1)

    def correction_dim(rotations: float) -> float:     # the dim that turns `rotations` times over old_len
        return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    if lo == hi:
        hi += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(lo)) / np.float32(hi - lo), 0, 1)
    keep = (1 - ramp).astype(np.float32)                 # 1: the original frequency, 0: interpolated
    pos_freqs = np.float32(base) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    extrapolated = (1.0 / pos_freqs).astype(np.float32)
    interpolated = (1.0 / (np.float32(factor) * pos_freqs)).astype(np.float32)
    return (interpolated * (1 - keep) + extrapolated * keep).astype(np.float32)


def rope_cos_sin(config: ModelConfig, positions_T: jax.Array, dtype):
    """cos, sin of shape [T, H] (the half-frequencies repeated twice), cast to dtype."""
    inv_freq = jnp.asarray(rope_inv_freq(config))
    freqs_TH2 = positions_T.astype(jnp.float32)[:, None] * inv_freq[None, :]
    emb_TH = jnp.concatenate([freqs_TH2, freqs_TH2], axis=-1)
    scale = rope_attention_factor(config)
    cos, sin = jnp.cos(emb_TH), jnp.sin(emb_TH)
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return cos.astype(dtype), sin.astype(dtype)


def apply_rope(x_TNH: jax.Array, cos_TH: jax.Array, sin_TH: jax.Array, *, interleaved: bool = False) -> jax.Array:
    """x*cos + rotate_half(x)*sin, broadcast over the head axis; interleaved: the pairs
    (x[2i], x[2i+1]) rotated by frequency i, evens first then odds in the output."""
    half = x_TNH.shape[-1] // 2
    if interleaved:
        cos_h, sin_h = cos_TH[:, None, :half], sin_TH[:, None, :half]
        x1, x2 = x_TNH[..., 0::2], x_TNH[..., 1::2]
        return jnp.concatenate([x1 * cos_h - x2 * sin_h, x2 * cos_h + x1 * sin_h], axis=-1)
    rotated = jnp.concatenate([-x_TNH[..., half:], x_TNH[..., :half]], axis=-1)
    return x_TNH * cos_TH[:, None, :] + rotated * sin_TH[:, None, :]
