"""Ragged paged attention: the pure-jnp reference, a GPU kernel and a TPU kernel behind one seam.

`ragged_paged_attention(...)` validates its arguments (validation.py), then dispatches on
`backend`: "reference" (reference.py, the oracle and the CPU path), "gpu" (gpu.py, Pallas
through the Triton lowering), "tpu" (tpu.py, Pallas Mosaic TPU), or "auto" (gpu on CUDA,
tpu on TPU, reference otherwise; and the reference wherever the kernels' geometry limits,
head dim in {64, 128, 256} and a power-of-two page size in [16, 128], are not met, so
small test models still run on a GPU). An explicit "gpu"/"tpu" raises instead. Tile sizes
live in tuning.py; measured numbers in RESULTS.md.
"""
from __future__ import annotations

import jax

from pallas_kernels.ragged_paged_attention.reference import ragged_paged_attention_reference
from pallas_kernels.ragged_paged_attention.validation import (kernel_supports, validate_args,
                                                              validate_kernel_geometry)

__all__ = ["ragged_paged_attention", "ragged_paged_attention_reference", "resolve_backend"]


def resolve_backend(backend: str = "auto") -> str:
    """The concrete backend "auto" stands for on this machine (others unchanged)."""
    if backend != "auto":
        return backend
    platform = jax.default_backend()
    if platform in ("gpu", "cuda"):
        return "gpu"
    if platform == "tpu":
        return "tpu"
    return "reference"


def ragged_paged_attention(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *,
                           sm_scale=None, soft_cap=None, sliding_window=None, backend="auto",
                           interpret=False):
    """Attention of packed ragged queries q [T, N, H] over a paged KV pool [P, G, K, H].

    See ../shared/CROSSPOOL.md for the contract. Rows of q past cu_q_lens[num_seqs] come back
    as zeros on every backend. `interpret=True` runs a Pallas kernel in interpret mode (CPU).
    """
    validate_args(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs,
                  sm_scale=sm_scale, soft_cap=soft_cap, sliding_window=sliding_window,
                  backend=backend)
    requested = backend
    backend = resolve_backend(backend)
    if requested == "auto" and backend != "reference" and not kernel_supports(q, k_pages):
        backend = "reference"
    if sm_scale is None:
        sm_scale = q.shape[-1] ** -0.5
    sm_scale = float(sm_scale)
    soft_cap = None if soft_cap is None else float(soft_cap)
    sliding_window = None if sliding_window is None else int(sliding_window)
    num_seqs = num_seqs.reshape(1)
    if backend == "reference":
        return ragged_paged_attention_reference(
            q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs, sm_scale=sm_scale,
            soft_cap=soft_cap, sliding_window=sliding_window)
    validate_kernel_geometry(q, k_pages, backend)
    if backend == "gpu":
        from pallas_kernels.ragged_paged_attention.gpu import ragged_paged_attention_gpu
        return ragged_paged_attention_gpu(
            q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs, sm_scale=sm_scale,
            soft_cap=soft_cap, sliding_window=sliding_window, interpret=interpret)
    from pallas_kernels.ragged_paged_attention.tpu import ragged_paged_attention_tpu
    return ragged_paged_attention_tpu(
        q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs, sm_scale=sm_scale,
        soft_cap=soft_cap, sliding_window=sliding_window, interpret=interpret)
