"""Ragged paged attention: the pure-jnp reference, a GPU kernel and a TPU kernel behind one seam.

`ragged_paged_attention(...)` validates its arguments (validation.py), then dispatches on
`backend`: "reference" (reference.py, the oracle and the CPU path), "gpu" (gpu.py, Pallas
through the Triton lowering), "mgpu" (prefill_mgpu.py, Pallas Mosaic GPU for Hopper: causal
prefill and chunks without soft caps, windows, sinks or MLA; explicit only, "auto" never picks
it), "mgpu_prefill" (the engine's opt-in: "mgpu" for the prefill-shaped calls it takes on a GPU,
"auto" for the rest, `prefill_backend`), "tpu" (tpu.py, Pallas Mosaic TPU), or "auto" (gpu on CUDA,
tpu on TPU, reference otherwise; and the reference wherever the kernels' geometry limits,
head dim in {64, 128, 256} and a power-of-two page size in [16, 128], are not met, so
small test models still run on a GPU). An explicit "gpu"/"tpu" raises instead. Tile sizes
live in tuning.py; measured numbers in RESULTS.md.

Page offsets (static ints, default 0): the K of page id p (as page_indices gives it) is
k_pages[p + k_page_offset], its V v_pages[p + v_page_offset]. So K and V may be two windows
of ONE buffer (the same array passed as k_pages and v_pages): the disaggregated step passes
its whole arena row viewed [row_elems // page_elems, G, K, H] (a free reshape; slicing the
pages out would copy them into the kernel's operand on every call). Every backend clamps
page ids into the buffer, so a bad id never reads outside it.

Operand size (validation.py states the rule): the GPU kernel takes K/V operands of any size
(64-bit offsets past 4 GiB, int32 pool rows P * G); the TPU kernel is capped at 2**31 - 1
elements per operand; "auto" falls back to the reference beyond a kernel's limit.
"""
from __future__ import annotations

import jax

from pallas_kernels.ragged_paged_attention.reference import ragged_paged_attention_reference
from pallas_kernels.ragged_paged_attention.validation import (kernel_supports, validate_args,
                                                              validate_kernel_geometry)

__all__ = ["ragged_paged_attention", "ragged_paged_attention_reference", "prefill_backend", "resolve_backend"]


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


def prefill_backend(q, k_pages, page_indices, *, on_gpu: bool, soft_cap=None, sliding_window=None, sinks=None,
                    latent_value_dim=None) -> str:
    """What backend="mgpu_prefill" runs: "mgpu" (the Hopper prefill kernel) on a GPU for a
    prefill-shaped call (more query rows than sequence slots: some sequence brings a chunk) whose
    options the kernel takes (`prefill_mgpu.kernel_problem`), "auto" otherwise (decode-shaped
    calls, where a 64-row block per decode token would waste the kernel, and the options it
    leaves to gpu.py)."""
    if not on_gpu or q.shape[0] <= page_indices.shape[0]:
        return "auto"
    from pallas_kernels.ragged_paged_attention import prefill_mgpu
    problem = prefill_mgpu.kernel_problem(q, k_pages, soft_cap=soft_cap, sliding_window=sliding_window, sinks=sinks,
                                          latent_value_dim=latent_value_dim)
    return "auto" if problem else "mgpu"


def _auto_kernel(q, k_pages, page_indices, backend: str, latent_value_dim, sinks, traced_window) -> str:
    """What "auto" runs on a machine whose kernels are `backend`'s (the measurements behind it:
    RESULTS.md). MLA and attention sinks run on the GPU kernels from 2 query tokens up (their
    time is flat in the batch, the reference's grows with every sequence; at one token the
    reference is the faster); MLA also needs a decode-shaped call (T <= S: its kernel's prefill
    is unmeasured) and a row its column pieces tile. The TPU kernel's sinks are interpret-tested
    only (the reference there). Everything else runs on the kernel where its geometry fits.
    Otherwise the reference."""
    batched = q.shape[0] >= 2
    if latent_value_dim is not None:
        from pallas_kernels.ragged_paged_attention.mla_gpu import kernel_problem
        decode = q.shape[0] <= page_indices.shape[0]
        fits = (backend == "gpu" and batched and decode and sinks is None and not traced_window
                and kernel_problem(k_pages.shape[-1], latent_value_dim) is None)
        return "gpu" if fits else "reference"
    if sinks is not None and (backend == "tpu" or not batched):
        return "reference"
    return backend if kernel_supports(q, k_pages, backend) else "reference"


def ragged_paged_attention(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *,
                           sm_scale=None, soft_cap=None, sliding_window=None, backend="auto",
                           interpret=False, k_page_offset=0, v_page_offset=0, latent_value_dim=None,
                           sinks=None):
    """Attention of packed ragged queries q [T, N, H] over a paged KV pool [P, G, K, H].

    See ../shared/CROSSPOOL.md for the contract. Rows of q past cu_q_lens[num_seqs] come back
    as zeros on every backend. `interpret=True` runs a Pallas kernel in interpret mode (CPU).
    k_page_offset / v_page_offset (static non-negative ints < P): page id p's K is
    k_pages[p + k_page_offset], its V v_pages[p + v_page_offset] (module docstring).
    latent_value_dim (static int, MLA's absorbed form): the pages hold one latent row per token,
    its first half in k_pages and its second in v_pages (K = 1, q's head dim twice theirs);
    key = the whole row, value = its first latent_value_dim entries; out [T, N,
    latent_value_dim]. backend="gpu" runs mla_gpu.py's kernel (column pieces of >= 16; page
    offsets as above), "tpu" raises; "auto" on a GPU runs the kernel for decode-shaped calls
    of 2 tokens or more and the reference otherwise (`_auto_kernel`).
    sinks (float [N], traced ok; GPT-OSS): a learnt logit per head in every softmax
    denominator; backend="gpu" runs them on gpu.py's kernel ("auto" on a GPU too, from 2
    tokens) and "tpu" on tpu.py's (interpret-tested only: "auto" on a TPU keeps them on the
    reference).
    sliding_window may be a traced int32 scalar (a per-layer window): the kernels take every
    window as an operand, so "auto" runs a traced window wherever it runs a static one. The
    MLA kernel takes neither sinks nor a traced window (backend="gpu" raises).
    backend="mgpu" runs prefill_mgpu.py's Hopper kernel and raises a ValueError naming what it
    does not take (`prefill_mgpu.kernel_problem`: soft caps, windows, sinks, MLA, float32, head
    dims other than 64/128, page sizes other than 64/128), for which backend="gpu" is the
    fallback; `interpret=True` runs it in Mosaic GPU's interpreter where this JAX has one.
    """
    validate_args(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs,
                  sm_scale=sm_scale, soft_cap=soft_cap, sliding_window=sliding_window,
                  backend=backend, k_page_offset=k_page_offset, v_page_offset=v_page_offset,
                  latent_value_dim=latent_value_dim, sinks=sinks)
    offsets = dict(k_page_offset=int(k_page_offset), v_page_offset=int(v_page_offset))
    if backend == "mgpu_prefill":
        backend = prefill_backend(q, k_pages, page_indices, on_gpu=resolve_backend("auto") == "gpu", soft_cap=soft_cap,
                                  sliding_window=sliding_window, sinks=sinks, latent_value_dim=latent_value_dim)
    requested = backend
    backend = resolve_backend(backend)
    traced_window = isinstance(sliding_window, jax.Array)
    latent = latent_value_dim is not None
    if requested == "auto" and backend != "reference":
        backend = _auto_kernel(q, k_pages, page_indices, backend, latent_value_dim, sinks, traced_window)
    if latent and backend == "tpu":
        raise ValueError("the tpu kernel does not run MLA's latent attention (latent_value_dim) yet; "
                         "use backend='reference', 'gpu' or 'auto'")
    if latent and backend == "gpu" and (sinks is not None or traced_window):
        raise ValueError("the gpu MLA kernel does not run attention sinks or a traced sliding window yet; "
                         "use backend='reference' or 'auto'")
    if sm_scale is None:
        sm_scale = q.shape[-1] ** -0.5
    sm_scale = float(sm_scale)
    soft_cap = None if soft_cap is None else float(soft_cap)
    if not traced_window:
        sliding_window = None if sliding_window is None else int(sliding_window)
    num_seqs = num_seqs.reshape(1)
    if backend == "reference":
        return ragged_paged_attention_reference(
            q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs, sm_scale=sm_scale,
            soft_cap=soft_cap, sliding_window=sliding_window, latent_value_dim=latent_value_dim, sinks=sinks,
            **offsets)
    if backend == "mgpu":
        from pallas_kernels.ragged_paged_attention import prefill_mgpu
        problem = prefill_mgpu.kernel_problem(q, k_pages, soft_cap=soft_cap, sliding_window=sliding_window,
                                              sinks=sinks, latent_value_dim=latent_value_dim)
        if problem:
            raise ValueError(f"the mgpu kernel does not take {problem}; use backend='gpu' or 'auto'")
        return prefill_mgpu.ragged_paged_attention_mgpu(
            q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs, sm_scale=sm_scale,
            interpret=interpret, **offsets)
    if latent:
        from pallas_kernels.ragged_paged_attention import mla_gpu
        problem = mla_gpu.kernel_problem(k_pages.shape[-1], latent_value_dim)
        if problem:
            raise ValueError(f"the gpu MLA kernel: {problem}; use backend='reference'")
        return mla_gpu.ragged_paged_mla_gpu(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs,
                                            latent_value_dim=latent_value_dim, sm_scale=sm_scale,
                                            sliding_window=sliding_window, interpret=interpret, **offsets)
    validate_kernel_geometry(q, k_pages, backend)
    if backend == "gpu":
        from pallas_kernels.ragged_paged_attention.gpu import ragged_paged_attention_gpu
        return ragged_paged_attention_gpu(
            q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs, sm_scale=sm_scale,
            soft_cap=soft_cap, sliding_window=sliding_window, interpret=interpret, sinks=sinks,
            **offsets)
    from pallas_kernels.ragged_paged_attention.tpu import ragged_paged_attention_tpu
    return ragged_paged_attention_tpu(
        q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs, sm_scale=sm_scale,
        soft_cap=soft_cap, sliding_window=sliding_window, interpret=interpret, sinks=sinks,
        **offsets)
