"""Argument checks for ragged_paged_attention: one place that raises clear ValueErrors, and the
one place that states how big a K/V operand the Pallas kernels can address
(`max_operand_elems`, see the comment above it).

Shapes, dtypes and the static options (page offsets included) are static under jit, so every
check here runs at trace time and costs nothing per step. Values (lengths, page ids) are
traced and cannot be checked here.
"""
from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

BACKENDS = ("reference", "gpu", "tpu", "mgpu", "mgpu_prefill", "auto")
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
                  num_seqs, *, sm_scale, soft_cap, sliding_window, backend, k_page_offset=0,
                  v_page_offset=0, latent_value_dim=None, sinks=None):
    """Checks the contract's ranks, dtypes, shapes and static options; returns the backend name
    unchanged."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    T, N, H = _shape_of("q", q_TNH, 3)
    P, G, K, Hk = _shape_of("k_pages", k_pages_PGKH, 4)
    if tuple(v_pages_PGKH.shape) != (P, G, K, Hk):
        raise ValueError(f"v_pages shape {tuple(v_pages_PGKH.shape)} must equal k_pages shape "
                         f"{(P, G, K, Hk)}")
    if latent_value_dim is not None:
        if (isinstance(latent_value_dim, bool) or not isinstance(latent_value_dim, numbers.Integral)
                or not 1 <= latent_value_dim <= 2 * Hk):
            raise ValueError(f"latent_value_dim must be an int in [1, {2 * Hk}] (the latent row is 2 * "
                             f"the pages' head dim), got {latent_value_dim!r}")
        if K != 1 or H != 2 * Hk:
            raise ValueError(f"latent attention (latent_value_dim) needs one KV head and q's head dim "
                             f"({H}) twice the pages' ({Hk}); k_pages shape {(P, G, K, Hk)}")
    elif Hk != H:
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
    if isinstance(sliding_window, jax.Array):
        if sliding_window.shape != () or not jnp.issubdtype(sliding_window.dtype, jnp.integer):
            raise ValueError(f"a traced sliding_window must be an integer scalar, got {sliding_window.dtype}"
                             f"{list(sliding_window.shape)}")
    elif sliding_window is not None and (isinstance(sliding_window, bool)
                                         or not isinstance(sliding_window, numbers.Integral)
                                         or sliding_window < 1):
        raise ValueError(f"sliding_window must be a positive int or None, got {sliding_window!r}")
    if sinks is not None and (getattr(sinks, "shape", None) != (N,)
                              or not jnp.issubdtype(sinks.dtype, jnp.floating)):
        raise ValueError(f"sinks must be a float array [N] = [{N}], got {getattr(sinks, 'dtype', None)}"
                         f"{list(getattr(sinks, 'shape', ()))}")
    for name, off in (("k_page_offset", k_page_offset), ("v_page_offset", v_page_offset)):
        if isinstance(off, bool) or not isinstance(off, numbers.Integral) or off < 0:
            raise ValueError(f"{name} must be a non-negative int (static, not traced), got {off!r}")
        if off >= P:
            raise ValueError(f"{name}={off} leaves no page of the {P}-page buffer "
                             f"(k_pages/v_pages shape {(P, G, K, Hk)}): page id p reads page "
                             f"p + {name}, which must be < {P}")
    return backend


# How big one K (or V) operand the Pallas kernels can address: THE rule (the engine's page cap,
# `max_pages_for_kernel`, and the kernels' checks below all derive from it).
# - GPU (gpu.py, Triton lowering): no limit on the operand's bytes. The lowering computes each
#   load's element offset (index * stride, per dimension) in 64-bit whenever the operand is
#   over 2**32 bytes (jax/_src/pallas/triton/lowering.py, `_compute_offsets_from_indices`;
#   the int32 indices are zero-extended first), so only the kernel's own int32 index math must
#   not overflow: its largest index is a pool row, page * G + key < P * G (with `row_gather`;
#   otherwise a page id < P), and nothing in the kernel multiplies a K/V index by K*H or H.
#   Hence P * G <= 2**31 - 1 (checked per call; a block dim is also an int32 constant there).
#   Since K*H >= 64, that row bound only binds past 2**31 * 64 elements (256 GiB of bf16).
# - TPU (tpu.py, Mosaic): capped at 2**31 - 1 elements. Its BlockSpec index maps lower to
#   int32 block indices per dimension (`transform_indices`, jax/_src/pallas/mosaic/
#   lowering.py) and the Mosaic compiler inside libtpu turns them into the DMA's flat HBM
#   address; nothing in JAX's lowering shows that address is 64-bit, and no TPU is lent to
#   check, so the 32-bit-offset cap stays.
KERNEL_MAX_ROWS = 2 ** 31 - 1                       # GPU: pool rows P * G (int32 row ids)
TPU_MAX_OPERAND_ELEMS = 2 ** 31 - 1                 # TPU: elements of one K/V operand


def max_operand_elems(backend: str):
    """Most elements one K (or V) pages operand may have on `backend` (None: no limit on the
    operand's size; the GPU kernel still needs P * G <= KERNEL_MAX_ROWS)."""
    return TPU_MAX_OPERAND_ELEMS if backend == "tpu" else None


def max_pages_for_kernel(page_elems: int, backend: str):
    """Most pages of `page_elems` elements per K (or V) operand where `backend` ("gpu", "tpu",
    "reference") runs: None (no cap) but on TPU. The GPU's row bound is not a cap in practice:
    it needs over 256 GiB per operand (see the rule above)."""
    limit = max_operand_elems(backend)
    return None if limit is None else limit // int(page_elems)


def _size_problem(k_pages_PGKH, backend):
    """Why this K/V operand is too big for `backend`'s kernel (None: it fits)."""
    P, G = k_pages_PGKH.shape[:2]
    limit = max_operand_elems(backend)
    if limit is not None and k_pages_PGKH.size > limit:
        return (f"at most {limit} elements per K/V pages operand (32-bit DMA offsets assumed), "
                f"got {k_pages_PGKH.size}")
    if P * G > KERNEL_MAX_ROWS:
        return f"at most {KERNEL_MAX_ROWS} pool rows P * G (int32 row ids), got {P * G}"
    return None


def kernel_supports(q_TNH, k_pages_PGKH, backend) -> bool:
    """Whether `backend`'s Pallas kernel takes this head dim, page size and pool size."""
    H, G = q_TNH.shape[-1], k_pages_PGKH.shape[1]
    return (H in KERNEL_HEAD_DIMS and KERNEL_MIN_PAGE <= G <= KERNEL_MAX_PAGE and not G & (G - 1)
            and _size_problem(k_pages_PGKH, backend) is None)


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
    problem = _size_problem(k_pages_PGKH, backend)
    if problem is not None:
        raise ValueError(f"the {backend} kernel addresses {problem} (shape "
                         f"{tuple(k_pages_PGKH.shape)}); use fewer pages or backend='reference'")
