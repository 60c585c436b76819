"""The gated activations as the kernels compute them (float32 in, float32 out).

Only exp, abs and arithmetic: the Triton lowering of Pallas has no erf, so the exact GELU
uses Abramowitz & Stegun 7.1.26 for erf (|error| <= 1.5e-7, below float32 test tolerances).
"""
from __future__ import annotations

import jax.numpy as jnp

_P = 0.3275911
_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


def erf(x):
    """erf(x) to 1.5e-7 absolute, from exp and a degree-5 polynomial."""
    ax = jnp.abs(x)
    t = 1.0 / (1.0 + _P * ax)
    poly = t * (_A[0] + t * (_A[1] + t * (_A[2] + t * (_A[3] + t * _A[4]))))
    y = 1.0 - poly * jnp.exp(-ax * ax)
    return jnp.where(x < 0, -y, y)


def activate(gate, activation: str):
    """silu(gate) or exact gelu(gate); the caller multiplies by `up`."""
    if activation == "silu":
        return gate / (1.0 + jnp.exp(-gate))
    if activation == "gelu":
        return 0.5 * gate * (1.0 + erf(gate * 0.7071067811865476))
    raise ValueError(f"activation must be 'silu' or 'gelu', got {activation!r}")
