"""Rotary position embeddings: inverse frequencies per `ModelConfig` (default, linear, llama3)
and their application in the rotate-half convention Hugging Face uses."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from crosspool_jax.models.config import ModelConfig


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """float32[H/2] inverse frequencies, computed on the host like transformers does."""
    H = config.head_dim
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
    return np.asarray(inv_freq, np.float32)


def rope_cos_sin(config: ModelConfig, positions_T: jax.Array, dtype):
    """cos, sin of shape [T, H] (the half-frequencies repeated twice), cast to dtype."""
    inv_freq = jnp.asarray(rope_inv_freq(config))
    freqs_TH2 = positions_T.astype(jnp.float32)[:, None] * inv_freq[None, :]
    emb_TH = jnp.concatenate([freqs_TH2, freqs_TH2], axis=-1)
    return jnp.cos(emb_TH).astype(dtype), jnp.sin(emb_TH).astype(dtype)


def apply_rope(x_TNH: jax.Array, cos_TH: jax.Array, sin_TH: jax.Array) -> jax.Array:
    """x*cos + rotate_half(x)*sin, broadcast over the head axis."""
    half = x_TNH.shape[-1] // 2
    rotated = jnp.concatenate([-x_TNH[..., half:], x_TNH[..., :half]], axis=-1)
    return x_TNH * cos_TH[:, None, :] + rotated * sin_TH[:, None, :]
