"""Argument checks of the public fused-MoE entry points and the backend choice.

Every check raises ValueError naming the bad argument and the shapes it saw.
"""
from __future__ import annotations

import jax

from pallas_kernels.fused_moe.reference import ACTIVATIONS, ClampedSwiGLU

BACKENDS = ("auto", "reference", "gpu", "tpu")


def resolve_backend(backend: str) -> str:
    """'auto' -> 'gpu' on CUDA/ROCm, 'tpu' on TPU, 'reference' elsewhere."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    platform = jax.default_backend()
    if platform in ("gpu", "cuda", "rocm"):
        return "gpu"
    if platform == "tpu":
        return "tpu"
    return "reference"


def check_grouped_matmul(lhs, rhs, group_sizes) -> None:
    """lhs [M, K], rhs [G, K, N], group_sizes int[G]."""
    if lhs.ndim != 2:
        raise ValueError(f"grouped_matmul: lhs must be [M, K], got shape {lhs.shape}")
    if rhs.ndim != 3:
        raise ValueError(f"grouped_matmul: rhs must be [G, K, N], got shape {rhs.shape}")
    if lhs.shape[1] != rhs.shape[1]:
        raise ValueError(f"grouped_matmul: lhs K={lhs.shape[1]} != rhs K={rhs.shape[1]} "
                         f"(lhs {lhs.shape}, rhs {rhs.shape})")
    if group_sizes.ndim != 1 or group_sizes.shape[0] != rhs.shape[0]:
        raise ValueError(f"grouped_matmul: group_sizes must be [G={rhs.shape[0]}] "
                         f"(one per rhs group), got shape {group_sizes.shape}")
    if not jax.numpy.issubdtype(group_sizes.dtype, jax.numpy.integer):
        raise ValueError(f"grouped_matmul: group_sizes must be integers, got {group_sizes.dtype}")


def check_fused_moe(x, router_logits, w1, w2, top_k, activation, expert_slice: bool = False) -> None:
    """x [T, D], router_logits [T, E], w1 [E, D, 2F], w2 [E, F, D], 1 <= top_k <= E; with
    expert_slice, w1/w2 may hold fewer experts than the router's E (a slice of them)."""
    if x.ndim != 2:
        raise ValueError(f"fused_moe: x must be [T, D], got shape {x.shape}")
    if router_logits.ndim != 2:
        raise ValueError(f"fused_moe: router_logits must be [T, E], got shape "
                         f"{router_logits.shape}")
    if w1.ndim != 3:
        raise ValueError(f"fused_moe: w1 must be [E, D, 2F], got shape {w1.shape}")
    if w2.ndim != 3:
        raise ValueError(f"fused_moe: w2 must be [E, F, D], got shape {w2.shape}")
    T, D = x.shape
    E = w1.shape[0]
    if router_logits.shape[0] != T:
        raise ValueError(f"fused_moe: router_logits has {router_logits.shape[0]} tokens, "
                         f"x has {T}")
    if (router_logits.shape[1] < E) if expert_slice else (router_logits.shape[1] != E):
        raise ValueError(f"fused_moe: router_logits has {router_logits.shape[1]} experts, "
                         f"w1 has E={E}" + (" (a slice cannot hold more)" if expert_slice else ""))
    if w1.shape[1] != D:
        raise ValueError(f"fused_moe: w1 D={w1.shape[1]} != x D={D} (w1 {w1.shape})")
    if w1.shape[2] % 2:
        raise ValueError(f"fused_moe: w1's last dim must be 2F (gate | up), got {w1.shape[2]}")
    F = w1.shape[2] // 2
    if w2.shape != (E, F, D):
        raise ValueError(f"fused_moe: w2 must be [E, F, D] = {(E, F, D)} to match w1 {w1.shape} "
                         f"and x {x.shape}, got {w2.shape}")
    E_router = router_logits.shape[1]
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= E_router:
        raise ValueError(f"fused_moe: top_k must be an int in [1, E={E_router}], got {top_k!r}")
    if not isinstance(activation, ClampedSwiGLU) and activation not in ACTIVATIONS:
        raise ValueError(f"fused_moe: activation must be one of {ACTIVATIONS} or a ClampedSwiGLU, "
                         f"got {activation!r}")


def check_expert_biases(w1, w2, b1, b2) -> None:
    """b1 [E, 2F] and b2 [E, D] (arrays, optional) for w1 [E, D, 2F] and w2 [E, F, D]."""
    E, D, F2 = w1.shape
    for name, b, want in (("b1", b1, (E, F2)), ("b2", b2, (E, D))):
        if b is not None and tuple(getattr(b, "shape", ())) != want:
            raise ValueError(f"fused_moe: {name} must be [E, {'2F' if name == 'b1' else 'D'}] = {want} for w1 "
                             f"{tuple(w1.shape)} and w2 {tuple(w2.shape)}, got shape {getattr(b, 'shape', None)}")


def check_config(cfg, K: int, N: int, backend: str, what: str) -> None:
    """Block sizes must tile [K, N] exactly; the GPU lowering needs powers of two >= 16."""
    if K % cfg.block_k or N % cfg.block_n:
        raise ValueError(f"{what}: config block_k={cfg.block_k}, block_n={cfg.block_n} must "
                         f"divide the weight's K={K} and N={N}")
    if backend == "gpu":
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(cfg, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{what}: GPU config {name}={v} must be a power of two >= 16")
