"""Argument checks for ragged_paged_attention: one place that raises clear ValueErrors.

Shapes and dtypes are static under jit, so every check here runs at trace time and costs
nothing per step. Values (lengths, page ids) are traced and cannot be checked here.
"""
from __future__ import annotations

import numbers

import jax.numpy as jnp

BACKENDS = ("reference", "gpu", "tpu", "auto")
KERNEL_HEAD_DIMS = (64, 128, 256)
KERNEL_MIN_PAGE, KERNEL_MAX_PAGE = 16, 128
_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _shape_of(name, x, rank):
    shape = getattr(x, "shape", None)
    if shape is None:
        raise ValueError(f"{name} must be an array, got {type(x).__name__}")
    if len(shape) != rank:
        raise ValueError(f"{name} must have rank {rank}, got shape {tuple(shape)}")
    return tuple(shape)


def _int32(name, x):
    if jnp.dtype(x.dtype) != jnp.int32:
        raise ValueError(f"{name} must be int32, got {x.dtype}")


def validate_args(q_TNH, k_pages_PGKH, v_pages_PGKH, kv_lens_S, page_indices_SP, cu_q_lens_S1,
                  num_seqs, *, sm_scale, soft_cap, sliding_window, backend):
    """Checks the contract's ranks, dtypes and shapes; returns the backend name unchanged."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    T, N, H = _shape_of("q", q_TNH, 3)
    P, G, K, Hk = _shape_of("k_pages", k_pages_PGKH, 4)
    if tuple(v_pages_PGKH.shape) != (P, G, K, Hk):
        raise ValueError(f"v_pages shape {tuple(v_pages_PGKH.shape)} must equal k_pages shape "
                         f"{(P, G, K, Hk)}")
    if Hk != H:
        raise ValueError(f"head dim of q ({H}) must equal head dim of k_pages/v_pages ({Hk})")
    if K == 0 or N % K:
        raise ValueError(f"query heads N={N} must be divisible by KV heads K={K}")
    for name, x in (("q", q_TNH), ("k_pages", k_pages_PGKH), ("v_pages", v_pages_PGKH)):
        if jnp.dtype(x.dtype) not in [jnp.dtype(d) for d in _FLOAT_DTYPES]:
            raise ValueError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
    if k_pages_PGKH.dtype != v_pages_PGKH.dtype:
        raise ValueError(f"k_pages dtype {k_pages_PGKH.dtype} != v_pages dtype {v_pages_PGKH.dtype}")
    (S,) = _shape_of("kv_lens", kv_lens_S, 1)
    S2, _ = _shape_of("page_indices", page_indices_SP, 2)
    (S1,) = _shape_of("cu_q_lens", cu_q_lens_S1, 1)
    if S2 != S or S1 != S + 1:
        raise ValueError(f"kv_lens [S={S}], page_indices [{S2}, pages_per_seq] and cu_q_lens "
                         f"[{S1}] must agree: page_indices needs S rows and cu_q_lens S+1 entries")
    ns = _shape_of("num_seqs", num_seqs, len(getattr(num_seqs, "shape", (1,))))
    if ns not in ((1,), ()):
        raise ValueError(f"num_seqs must be int32[1], got shape {ns}")
    for name, x in (("kv_lens", kv_lens_S), ("page_indices", page_indices_SP),
                    ("cu_q_lens", cu_q_lens_S1), ("num_seqs", num_seqs)):
        _int32(name, x)
    if sm_scale is not None and (not isinstance(sm_scale, numbers.Real) or sm_scale <= 0):
        raise ValueError(f"sm_scale must be a positive number (static, not traced) or None, "
                         f"got {sm_scale!r}")
    if soft_cap is not None and (not isinstance(soft_cap, numbers.Real) or soft_cap <= 0):
        raise ValueError(f"soft_cap must be a positive number or None, got {soft_cap!r}")
    if sliding_window is not None and (isinstance(sliding_window, bool)
                                       or not isinstance(sliding_window, numbers.Integral)
                                       or sliding_window < 1):
        raise ValueError(f"sliding_window must be a positive int or None, got {sliding_window!r}")
    return backend


# The Pallas kernels address a K (or V) operand with 32-bit element offsets (JAX runs without
# x64): one operand of more elements would wrap around and read the wrong keys. The engine
# caps its pages per device below this (`max_pages_for_kernel`); the kernels refuse beyond it.
KERNEL_MAX_OPERAND_ELEMS = 2 ** 31 - 1


def max_pages_for_kernel(page_elems: int) -> int:
    """Most pages of `page_elems` elements one K (or V) operand of the kernels can address."""
    return KERNEL_MAX_OPERAND_ELEMS // int(page_elems)


def kernel_supports(q_TNH, k_pages_PGKH) -> bool:
    """Whether the Pallas kernels take this head dim, page size and pool size."""
    H, G = q_TNH.shape[-1], k_pages_PGKH.shape[1]
    return (H in KERNEL_HEAD_DIMS and KERNEL_MIN_PAGE <= G <= KERNEL_MAX_PAGE and not G & (G - 1)
            and k_pages_PGKH.size <= KERNEL_MAX_OPERAND_ELEMS)


def validate_kernel_geometry(q_TNH, k_pages_PGKH, backend):
    """Extra limits of the Pallas kernels (the reference takes any geometry)."""
    H = q_TNH.shape[-1]
    G = k_pages_PGKH.shape[1]
    if H not in KERNEL_HEAD_DIMS:
        raise ValueError(f"the {backend} kernel needs head dim in {KERNEL_HEAD_DIMS}, got {H}; "
                         f"use backend='reference'")
    if not KERNEL_MIN_PAGE <= G <= KERNEL_MAX_PAGE or G & (G - 1):
        raise ValueError(f"the {backend} kernel needs a power-of-two page size in "
                         f"[{KERNEL_MIN_PAGE}, {KERNEL_MAX_PAGE}], got {G}; use backend='reference'")
    if k_pages_PGKH.size > KERNEL_MAX_OPERAND_ELEMS:
        raise ValueError(f"the {backend} kernel addresses at most {KERNEL_MAX_OPERAND_ELEMS} elements per K/V "
                         f"pages operand (32-bit offsets), got {k_pages_PGKH.size} "
                         f"(shape {tuple(k_pages_PGKH.shape)}); use fewer pages or backend='reference'")
