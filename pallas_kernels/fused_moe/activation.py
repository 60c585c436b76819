"""The gated activations as the kernels compute them (float32 in, float32 out).

Only exp, abs, min/max and arithmetic: the Triton lowering of Pallas has no erf, so the exact
GELU uses Abramowitz & Stegun 7.1.26 for erf (|error| <= 1.5e-7, below float32 test
tolerances), and sigmoid is 1 / (1 + exp(-x)).
"""
from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.fused_moe.reference import ClampedSwiGLU

_P = 0.3275911
_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


def erf(x):
    """erf(x) to 1.5e-7 absolute, from exp and a degree-5 polynomial."""
    ax = jnp.abs(x)
    t = 1.0 / (1.0 + _P * ax)
    poly = t * (_A[0] + t * (_A[1] + t * (_A[2] + t * (_A[3] + t * _A[4]))))
    y = 1.0 - poly * jnp.exp(-ax * ax)
    return jnp.where(x < 0, -y, y)


def gated(gate, up, activation):
    """act(gate) * up for "silu" / exact "gelu"; for a `ClampedSwiGLU` (GPT-OSS), as
    reference.gated_activation: g = min(gate, limit), (clip(up, -limit, limit) + 1) * g *
    sigmoid(alpha * g)."""
    if isinstance(activation, ClampedSwiGLU):
        g = jnp.minimum(gate, activation.limit)
        u = jnp.minimum(jnp.maximum(up, -activation.limit), activation.limit)
        return (u + 1.0) * g / (1.0 + jnp.exp(-activation.alpha * g))
    if activation == "silu":
        return gate / (1.0 + jnp.exp(-gate)) * up
    if activation == "gelu":
        return 0.5 * gate * (1.0 + erf(gate * 0.7071067811865476)) * up
    raise ValueError(f"activation must be 'silu', 'gelu' or a ClampedSwiGLU, got {activation!r}")
