"""The compiled (non-interpret) GPU kernels lower to Triton for CUDA, checked on a CPU.

Interpret mode runs the kernels' semantics but skips the Triton lowering, so what only the
lowering reads (cache modifiers, atomics' forms, barriers, masked gathers' layouts) is
unchecked by the interpret tests; a lowering error (e.g. a `.cg` cache modifier the Triton
lowering cannot emit) would first show on the GPU. `jit(...).trace(...).lower(
lowering_platforms=("cuda",))` runs the Pallas Triton lowering rules in Python without a GPU
(the Triton compile to PTX happens later, on the device), so this catches them here. The
numbers are checked by the interpret tests and, on a GPU, by the gpu-marked classes.
"""
from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.fused_moe import fused_moe, grouped_matmul
from pallas_kernels.ragged_paged_attention import tuning
from pallas_kernels.ragged_paged_attention.gpu import ragged_paged_attention_gpu
from tests.pallas_kernels.test_ragged_paged_attention import make_case


def _lowered_kernels(f, *args) -> list[str]:
    text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    return re.findall(r'custom_call @([\w$.]+)', text)


@pytest.mark.parametrize("cfg", [
    None,                                       # the tuning table's
    tuning.BlockConfig(q_tokens=4, block_k=64, num_splits=4, heads_fastest=True,
                       row_gather=True, mask_v_load=True, items_in_kernel=True),
    tuning.BlockConfig(q_tokens=8, block_k=32, num_splits=2),     # whole pages, items by XLA
])
def test_attention_lowers_for_cuda(cfg):
    args = make_case(1, [1, 1, 5], [20, 600, 70], N=8, K=2, H=64, G=16, S_cap=4, T_pad=2,
                     dtype=jnp.bfloat16)
    f = functools.partial(ragged_paged_attention_gpu, sm_scale=0.1, config=cfg)
    assert _lowered_kernels(f, *args) == ["__gpu$xla.gpu.triton"]


def test_attention_with_sinks_and_traced_window_lowers_for_cuda():
    """GPT-OSS's options: sinks [N] and the window as operands, page offsets, KV splits."""
    args = make_case(1, [1, 1, 5], [20, 600, 70], N=8, K=2, H=64, G=16, S_cap=4, T_pad=2,
                     dtype=jnp.bfloat16)
    q, k, v, *rest = args
    buf = jnp.concatenate([k, v])
    f = functools.partial(ragged_paged_attention_gpu, sm_scale=0.1, k_page_offset=0,
                          v_page_offset=k.shape[0])
    lowered = _lowered_kernels(lambda w, s, *a: f(*a, sliding_window=w, sinks=s), jnp.int32(128),
                               jnp.zeros(8, jnp.float32), q, buf, buf, *rest)
    assert lowered == ["__gpu$xla.gpu.triton"]


@pytest.mark.parametrize("T,gpt_oss", [(1, False), (16, False), (1, True), (16, True)])
def test_fused_moe_lowers_for_cuda(T, gpt_oss):
    """gpt_oss: the experts' biases and the clamped SwiGLU in the kernels' epilogues."""
    from pallas_kernels.fused_moe import ClampedSwiGLU
    rng = np.random.default_rng(0)
    E, D, F = 8, 64, 32
    x = jnp.asarray(rng.standard_normal((T, D)), jnp.bfloat16)
    logits = jnp.asarray(rng.standard_normal((T, E)), jnp.float32)
    w1 = jnp.asarray(rng.standard_normal((E, D, 2 * F)), jnp.bfloat16)
    w2 = jnp.asarray(rng.standard_normal((E, F, D)), jnp.bfloat16)
    if gpt_oss:
        b1 = jnp.asarray(rng.standard_normal((E, 2 * F)), jnp.bfloat16)
        b2 = jnp.asarray(rng.standard_normal((E, D)), jnp.bfloat16)
        f = lambda *a: fused_moe(*a, top_k=2, backend="gpu", b1=b1, b2=b2,   # noqa: E731
                                 activation=ClampedSwiGLU(alpha=1.702, limit=7.0))
    else:
        f = functools.partial(fused_moe, top_k=2, backend="gpu")
    kernels = _lowered_kernels(f, x, logits, w1, w2)
    # routing, gate/up, down, combine
    assert kernels.count("__gpu$xla.gpu.triton") == 4, kernels


def test_grouped_matmul_lowers_for_cuda():
    rng = np.random.default_rng(1)
    lhs = jnp.asarray(rng.standard_normal((40, 64)), jnp.bfloat16)
    rhs = jnp.asarray(rng.standard_normal((4, 64, 32)), jnp.bfloat16)
    gs = jnp.asarray([10, 0, 25, 5], jnp.int32)
    f = functools.partial(grouped_matmul, backend="gpu")
    assert _lowered_kernels(f, lhs, rhs, gs).count("__gpu$xla.gpu.triton") == 1


@pytest.mark.parametrize("T,K,N", [(1, 2048, 512), (40, 256, 64), (300, 256, 128)])
def test_layer_matmul_lowers_for_cuda(T, K, N):
    """One layer of a stack read in place: split K (decode), one row tile, several row tiles."""
    from pallas_kernels.fused_moe import ExpertRows, layer_matmul
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((T, K)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((3, K, N)), jnp.bfloat16)
    f = lambda x, w, layer: layer_matmul(x, ExpertRows.of_stack(w[:, None], layer), backend="gpu")   # noqa: E731
    assert _lowered_kernels(f, x, w, jnp.int32(2)) == ["__gpu$xla.gpu.triton"]
    # with two more matrices of the same K beside it (q|k|v): still one kernel
    g = lambda x, w, layer: layer_matmul(x, (ExpertRows.of_stack(w[:, None], layer),) * 2 + (w[0],), backend="gpu")  # noqa: E731
    assert _lowered_kernels(g, x, w, jnp.int32(2)) == ["__gpu$xla.gpu.triton"]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_mla_attention_lowers_for_cuda(dtype):
    """MLA at DeepSeek-V2-Lite's row (halves of 288: column pieces 256 + 32 and 128 + 64 + 32 + 64)."""
    from pallas_kernels.ragged_paged_attention.mla_gpu import ragged_paged_mla_gpu
    from tests.pallas_kernels.test_ragged_paged_attention import latent_case
    args = latent_case(2, [1, 1, 5], [20, 600, 70], N=16, half=288, G=16, S_cap=4, T_pad=2, dtype=dtype)
    f = functools.partial(ragged_paged_mla_gpu, latent_value_dim=512, sm_scale=0.1)
    assert _lowered_kernels(f, *args) == ["__gpu$xla.gpu.triton"]
    q, k, v, *rest = args                 # page offsets: both halves in one buffer
    buf = jnp.concatenate([k, v])
    f = functools.partial(ragged_paged_mla_gpu, latent_value_dim=512, sm_scale=0.1, k_page_offset=0,
                          v_page_offset=k.shape[0])
    assert _lowered_kernels(f, q, buf, buf, *rest) == ["__gpu$xla.gpu.triton"]


def test_routing_kinds_lower_for_cuda():
    """routing_gpu for sigmoid + bias + group-limited top-k (DeepSeek-V3's top-2 group sums)."""
    from pallas_kernels.fused_moe import Routing
    from pallas_kernels.fused_moe.routing_gpu import route_topk_gpu
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.standard_normal((4, 64)), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(64), jnp.float32)
    routing = Routing(scoring="sigmoid", num_groups=8, topk_groups=4, group_score="top2_sum", scale=2.5)
    f = functools.partial(route_topk_gpu, top_k=6, renormalize=True, routing=routing)
    assert _lowered_kernels(lambda lg, b: f(lg, score_bias_E=b), logits, bias) == ["__gpu$xla.gpu.triton"]
