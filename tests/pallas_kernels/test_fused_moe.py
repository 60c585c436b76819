"""fused_moe (GPU Triton and TPU Mosaic kernels, interpret mode) against fused_moe_reference.

Router logits are a per-token random permutation of evenly spaced values, so top-k never
meets a tie (a tie would let kernel and reference pick different experts legitimately).

Tolerances: float32 runs at full precision (conftest): only the summation order differs
(K-chunked accumulation, the top_k combine summed per token instead of scattered):
1e-4 of the output scale. bfloat16: both sides round the activation h to bf16 before the
down projection; a different f32 accumulation order can move h by one bf16 ulp (2^-8),
which the F-term down projection carries to the output, then rounded once more to bf16:
2e-2 of the output scale (several ulps, far below the error of routing to a wrong expert).
"""
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.fused_moe import (ClampedSwiGLU, ExpertRows, Routing, fused_moe, fused_moe_reference, route,
                                     route_topk)
from pallas_kernels.fused_moe.layout import build_layout
from pallas_kernels.fused_moe.routing_gpu import route_topk_gpu

TOL = {jnp.float32: 1e-4, jnp.bfloat16: 2e-2}
_rng = np.random.default_rng()  # fresh inputs every run


def _logits(T, E, *, hot=None):
    """Distinct logits per token; with hot=n only the first n experts can win."""
    perm = np.argsort(_rng.random((T, E)), axis=1).astype(np.float32)
    logits = perm * (4.0 / E)
    if hot is not None:
        logits[:, hot:] -= 100.0
    return jnp.asarray(logits)


def _inputs(T, E, D, F, dtype, *, hot=None):
    x = jnp.asarray(_rng.standard_normal((T, D), np.float32), dtype)
    w1 = jnp.asarray(_rng.standard_normal((E, D, 2 * F), np.float32) / np.sqrt(D), dtype)
    w2 = jnp.asarray(_rng.standard_normal((E, F, D), np.float32) / np.sqrt(F), dtype)
    return x, _logits(T, E, hot=hot), w1, w2


def _assert_close(got, want, dtype):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.all(np.isfinite(got)), "non-finite output"
    scale = max(1e-3, float(np.abs(want).max()))
    err = float(np.abs(got - want).max())
    assert err <= TOL[dtype] * scale, f"max err {err} > {TOL[dtype]} * {scale}"


CASES = [  # (T, E, top_k, D, F, renormalize, activation, dtype)
    (5, 8, 2, 64, 32, True, "silu", jnp.float32),       # Mixtral routing
    (1, 128, 8, 64, 32, False, "silu", jnp.float32),    # Qwen3-MoE-like: 120 experts empty
    (33, 64, 1, 64, 64, True, "gelu", jnp.float32),
    (64, 16, 8, 64, 32, False, "silu", jnp.bfloat16),   # OLMoE-like top-8, bf16
    (6, 8, 2, 48, 80, True, "silu", jnp.float32),       # dims 16 * odd: tiles of 16, the
]                                                       # combine's last column block partial


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize("T,E,top_k,D,F,renormalize,activation,dtype", CASES)
def test_matches_reference(backend, T, E, top_k, D, F, renormalize, activation, dtype):
    x, logits, w1, w2 = _inputs(T, E, D, F, dtype)
    got = fused_moe(x, logits, w1, w2, top_k, renormalize=renormalize, activation=activation,
                    backend=backend, interpret=True)
    assert got.shape == (T, D) and got.dtype == dtype
    want = fused_moe_reference(x, logits, w1, w2, top_k, renormalize=renormalize,
                               activation=activation)
    _assert_close(got, want, dtype)


def test_empty_experts_are_never_read():
    """Only 3 of 8 experts can win; NaN weights in all others must not reach the output."""
    T, E, D, F, top_k = 5, 8, 64, 32, 2
    x, logits, w1, w2 = _inputs(T, E, D, F, jnp.float32, hot=3)
    want = fused_moe_reference(x, logits, w1, w2, top_k)
    w1 = w1.at[3:].set(jnp.nan)
    w2 = w2.at[3:].set(jnp.nan)
    for backend in ("gpu", "tpu"):
        got = fused_moe(x, logits, w1, w2, top_k, backend=backend, interpret=True)
        _assert_close(got, want, jnp.float32)


@pytest.mark.parametrize("T", [1, 6])
def test_stacked_layer_read_in_place(T):
    """fused_moe on ExpertRows.of_stack(w_L..., layer) (traced layer, under jit) equals the call
    on w[layer]; the other layers are NaN, so a read outside the layer would show."""
    L, E, top_k, D, F = 3, 8, 2, 64, 32
    x, logits, w1, w2 = _inputs(T, E, D, F, jnp.float32)
    layer = 1
    w1_L = jnp.full((L,) + w1.shape, jnp.nan, w1.dtype).at[layer].set(w1)
    w2_L = jnp.full((L,) + w2.shape, jnp.nan, w2.dtype).at[layer].set(w2)
    want = fused_moe_reference(x, logits, w1, w2, top_k)
    for backend in ("gpu", "tpu", "reference"):
        run = jax.jit(lambda l: fused_moe(x, logits, ExpertRows.of_stack(w1_L, l), ExpertRows.of_stack(w2_L, l),
                                          top_k, backend=backend, interpret=True))
        _assert_close(run(jnp.int32(layer)), want, jnp.float32)


@pytest.mark.parametrize("T", [1, 6])
def test_expert_slices_sum_to_the_layer(T):
    """Expert parallelism: fused_moe on each slice of the experts (expert_offset traced, under
    jit) sums to the whole layer; an offset past E gives zeros (the kernels read nothing)."""
    E, top_k, D, F, n_slices = 8, 2, 64, 32, 4
    x, logits, w1, w2 = _inputs(T, E, D, F, jnp.float32)
    want = fused_moe_reference(x, logits, w1, w2, top_k)
    E_loc = E // n_slices
    for backend in ("gpu", "tpu", "reference"):
        run = jax.jit(lambda w1s, w2s, off: fused_moe(x, logits, w1s, w2s, top_k, backend=backend, interpret=True,
                                                    expert_offset=off))
        total = 0.0
        for i in range(n_slices):
            total = total + np.asarray(run(w1[i * E_loc:(i + 1) * E_loc], w2[i * E_loc:(i + 1) * E_loc],
                                           jnp.int32(i * E_loc)), np.float32)
        _assert_close(total, want, jnp.float32)
        # the kernels read no weight of a slice without pairs (NaN stays out); the jnp oracle
        # (lax.ragged_dot) touches every weight, so it gets finite ones
        fill = 0.5 if backend == "reference" else jnp.nan
        none = run(jnp.full_like(w1[:E_loc], fill), jnp.full_like(w2[:E_loc], fill), jnp.int32(E))
        assert np.all(np.asarray(none) == 0.0), backend
    with pytest.raises(ValueError, match="a slice cannot hold more"):
        fused_moe(x, logits[:, :E_loc], w1, w2, top_k, expert_offset=0)


@pytest.mark.parametrize("T", [1, 7])
def test_masked_tokens_read_no_expert(T):
    """token_mask: a masked (padding) token's output is zero and reads no expert weight, the
    other tokens' outputs are unchanged, with or without an expert slice."""
    E, top_k, D, F = 8, 2, 64, 32
    x, logits, w1, w2 = _inputs(T, E, D, F, jnp.float32)
    mask = np.arange(T) % 3 != 1 if T > 1 else np.array([False])
    want = np.where(mask[:, None], np.asarray(fused_moe_reference(x, logits, w1, w2, top_k)), 0.0)
    for backend in ("gpu", "tpu", "reference"):
        got = fused_moe(x, logits, w1, w2, top_k, backend=backend, interpret=True, token_mask=jnp.asarray(mask))
        _assert_close(got, want, jnp.float32)
        # only masked tokens: no expert is read (the kernels see NaN weights and still give zeros)
        fill = 0.5 if backend == "reference" else jnp.nan
        none = fused_moe(x, logits, jnp.full_like(w1, fill), jnp.full_like(w2, fill), top_k, backend=backend,
                         interpret=True, token_mask=jnp.zeros(T, bool), expert_offset=0)
        assert np.all(np.asarray(none) == 0.0), backend
    with pytest.raises(ValueError, match="token_mask must be"):
        fused_moe(x, logits, w1, w2, top_k, token_mask=jnp.ones(T + 1, bool))


def test_layout_gives_each_active_expert_one_tile_in_decode():
    T, E, top_k, bm = 7, 128, 8, 16
    _, ids = route_topk(_logits(T, E), top_k, renormalize=True)
    layout = jax.jit(build_layout, static_argnums=(1, 2))(ids.reshape(-1), E, bm)
    active = np.unique(np.asarray(ids))
    n_active = int(layout.num_active_1[0])
    assert n_active == len(active)                    # <= 16 rows per expert: one tile each
    assert sorted(np.asarray(layout.tile_group_I[:n_active]).tolist()) == active.tolist()
    # every (token, k) row lands in its expert's tile, each padded slot used at most once
    dst = np.asarray(layout.dst_row_R)
    assert len(set(dst.tolist())) == T * top_k
    tiles = np.asarray(layout.tile_group_I)[dst // bm]
    assert np.array_equal(tiles, np.asarray(ids).reshape(-1))


def test_single_token_layout_one_tile_per_choice():
    """T == 1: row r (the r-th choice) alone in tile r, the tile's group its expert."""
    from pallas_kernels.fused_moe.layout import single_token_layout

    top_k, E, bm = 8, 128, 16
    _, ids = route_topk(_logits(1, E), top_k, renormalize=True)
    layout = jax.jit(single_token_layout, static_argnums=1)(ids.reshape(-1), bm)
    assert layout.num_tiles == top_k and int(layout.num_active_1[0]) == top_k
    assert np.array_equal(np.asarray(layout.tile_group_I), np.asarray(ids).reshape(-1))
    src = np.asarray(layout.src_row_P)
    assert np.array_equal(np.flatnonzero(src < top_k), np.arange(top_k) * bm)
    assert np.array_equal(src[np.arange(top_k) * bm], np.arange(top_k))
    assert np.array_equal(np.asarray(layout.dst_row_R), np.arange(top_k) * bm)


def test_empty_batch_and_auto_fallback():
    x, logits, w1, w2 = _inputs(3, 8, 24, 12, jnp.float32)   # dims no GPU tile divides
    got = fused_moe(x, logits, w1, w2, 2, backend="auto")
    _assert_close(got, fused_moe_reference(x, logits, w1, w2, 2), jnp.float32)
    empty = fused_moe(x[:0], logits[:0], w1, w2, 2, backend="gpu", interpret=True)
    assert empty.shape == (0, 24)


def test_route_topk_renormalises():
    logits = _logits(4, 8)
    w, ids = route_topk(logits, 2, renormalize=True)
    np.testing.assert_allclose(np.asarray(w).sum(-1), 1.0, rtol=1e-6)
    top2 = np.argsort(-np.asarray(logits), axis=1)[:, :2]
    assert np.array_equal(np.asarray(ids), top2)
    w_raw, _ = route_topk(logits, 2, renormalize=False)
    assert np.all(np.asarray(w_raw).sum(-1) < 1.0)


@pytest.mark.parametrize("T,E,top_k,renormalize", [
    (1, 128, 8, True), (1, 60, 6, False), (5, 64, 8, False), (33, 8, 2, True), (17, 16, 1, True),
])
def test_gpu_routing_kernel_matches_reference(T, E, top_k, renormalize):
    """routing_gpu (interpret mode): the same experts in the same order, weights to f32
    rounding, from random normal logits (ties have probability ~0)."""
    logits = jnp.asarray(_rng.standard_normal((T, E)), jnp.float32)
    w, ids = route_topk_gpu(logits, top_k, renormalize=renormalize, interpret=True)
    w_ref, ids_ref = route_topk(logits, top_k, renormalize=renormalize)
    assert w.shape == (T, top_k) and ids.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(ids_ref))
    np.testing.assert_allclose(np.asarray(w), np.asarray(w_ref), rtol=1e-6, atol=1e-7)


ROUTING_KINDS = [  # (Routing, score bias, renormalize)
    (Routing(scoring="sigmoid"), True, False),
    (Routing(num_groups=4, topk_groups=2, group_score="max", scale=2.5), False, False),      # DeepSeek-V2
    (Routing(scoring="sigmoid", num_groups=8, topk_groups=4, group_score="top2_sum", scale=2.5), True, True),  # V3
]


@pytest.mark.parametrize("routing,bias,renormalize", ROUTING_KINDS)
def test_gpu_routing_kernel_routing_kinds(routing, bias, renormalize):
    """routing_gpu (interpret mode) for sigmoid scores, a choice-only bias, group-limited top-k
    (group max, top-2 sums) and scaling: the experts and weights of reference.route."""
    rng = _seeded("routing kinds")
    T, E, top_k = 9, 64, 6
    logits = jnp.asarray(rng.standard_normal((T, E)), jnp.float32)
    score_bias = jnp.asarray(0.5 * rng.standard_normal(E), jnp.float32) if bias else None
    w, ids = route_topk_gpu(logits, top_k, renormalize=renormalize, routing=routing, score_bias_E=score_bias,
                            interpret=True)
    w_ref, ids_ref = route(logits, top_k, renormalize=renormalize, routing=routing, score_bias_E=score_bias)
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(ids_ref))
    np.testing.assert_allclose(np.asarray(w), np.asarray(w_ref), rtol=1e-6, atol=1e-7)
    if routing.num_groups > 1:             # the group limit matters for these logits
        w_all, ids_all = route(logits, top_k, renormalize=renormalize, routing=Routing(
            scoring=routing.scoring, scale=routing.scale), score_bias_E=score_bias)
        assert not np.array_equal(np.asarray(ids_all), np.asarray(ids_ref))


def test_gpu_routing_kernel_breaks_ties_like_lax_top_k():
    """Equal probabilities: the lower expert index first (lax.top_k's rule)."""
    logits = jnp.asarray([[0.5, 2.0, 1.0, 2.0, 1.0, 2.0, 0.0, 1.0]], jnp.float32)
    _, ids = route_topk_gpu(logits, 5, renormalize=True, interpret=True)
    _, ids_ref = route_topk(logits, 5, renormalize=True)
    assert np.asarray(ids).tolist() == [[1, 3, 5, 2, 4]] == np.asarray(ids_ref).tolist()


@pytest.mark.parametrize("change,msg", [
    (dict(x=(2, 4, 8)), "x must be"),
    (dict(logits=(3, 5)), "router_logits has 5 experts"),
    (dict(logits=(2, 4)), "router_logits has 2 tokens"),
    (dict(w1=(4, 16, 12)), "w1 D=16 != x D=8"),
    (dict(w1=(4, 8, 7)), "last dim must be 2F"),
    (dict(w2=(4, 5, 8)), "w2 must be"),
    (dict(top_k=5), "top_k must be an int in"),
    (dict(top_k=0), "top_k must be an int in"),
    (dict(activation="relu"), "activation must be one of"),
    (dict(backend="triton"), "backend must be one of"),
])
def test_bad_arguments(change, msg):
    x = jnp.ones(change.get("x", (3, 8)))
    logits = jnp.ones(change.get("logits", (3, 4)))
    w1 = jnp.ones(change.get("w1", (4, 8, 12)))
    w2 = jnp.ones(change.get("w2", (4, 6, 8)))
    with pytest.raises(ValueError, match=msg):
        fused_moe(x, logits, w1, w2, change.get("top_k", 2),
                  activation=change.get("activation", "silu"),
                  backend=change.get("backend", "reference"))


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
class TestGpuKernel:
    """The compiled Triton kernels on realistic shapes in bf16 (run on the device machine)."""

    @pytest.mark.parametrize("T,E,top_k,D,F", [
        (64, 8, 2, 4096, 14336),    # Mixtral-8x7B
        (1, 128, 8, 2048, 768),     # Qwen3-30B-A3B decode
        (256, 128, 8, 2048, 768),
        (32, 64, 8, 2048, 1024),    # OLMoE
    ])
    def test_bf16_against_reference(self, T, E, top_k, D, F):
        k = jax.random.split(jax.random.PRNGKey(int(_rng.integers(1 << 30))), 3)
        x = jax.random.normal(k[0], (T, D), jnp.bfloat16)
        w1 = (jax.random.normal(k[1], (E, D, 2 * F)) / np.sqrt(D)).astype(jnp.bfloat16)
        w2 = (jax.random.normal(k[2], (E, F, D)) / np.sqrt(F)).astype(jnp.bfloat16)
        logits = _logits(T, E)
        got = fused_moe(x, logits, w1, w2, top_k, renormalize=(E == 8), backend="gpu")
        want = fused_moe_reference(x, logits, w1, w2, top_k, renormalize=(E == 8))
        _assert_close(got, want, jnp.bfloat16)

    @pytest.mark.parametrize("T", [1, 2, 32])
    def test_gpt_oss_experts_bf16(self, T):
        """GPT-OSS-20B's experts (E 32, top-4, D = F = 2880) with biases and the clamped SwiGLU
        (alpha 1.702, limit 7), inputs scaled so that the limit bites, against the reference."""
        rng = _seeded("gpu gpt-oss experts")
        E, top_k, D, F = 32, 4, 2880, 2880
        x, logits, w1, w2, b1, b2 = _gpt_oss_inputs(rng, T, E, D, F, jnp.bfloat16, scale=10.0)
        act = ClampedSwiGLU(alpha=1.702, limit=7.0)
        assert _clamp_bites(x, logits, w1, b1, top_k, 7.0)
        got = fused_moe(x, logits, w1, w2, top_k, activation=act, b1=b1, b2=b2, backend="gpu")
        want = fused_moe_reference(x, logits, w1, w2, top_k, activation=act, b1=b1, b2=b2)
        _assert_close(got, want, jnp.bfloat16)

    @pytest.mark.parametrize("T", [1, 64])
    @pytest.mark.parametrize("E,top_k,routing", [
        (256, 8, Routing(scoring="sigmoid", num_groups=8, topk_groups=4, group_score="top2_sum", scale=2.5)),  # V3
        (64, 4, Routing(scoring="sigmoid", scale=1.8)),                                                    # GLM-4.7
        (64, 6, Routing(num_groups=8, topk_groups=3, group_score="max")),                                  # V2
    ])
    def test_routing_kinds_compiled(self, T, E, top_k, routing):
        """routing_gpu compiled for the DeepSeek-V2/V3 and GLM-4.7-Flash routings, with a bias."""
        rng = _seeded("gpu routing kinds")
        logits = jnp.asarray(rng.standard_normal((T, E)), jnp.float32)
        bias = jnp.asarray(0.3 * rng.standard_normal(E), jnp.float32)
        w, ids = route_topk_gpu(logits, top_k, renormalize=True, routing=routing, score_bias_E=bias)
        w_ref, ids_ref = route(logits, top_k, renormalize=True, routing=routing, score_bias_E=bias)
        np.testing.assert_array_equal(np.asarray(ids), np.asarray(ids_ref))
        np.testing.assert_allclose(np.asarray(w), np.asarray(w_ref), rtol=1e-5, atol=1e-6)

    def test_expert_rows_past_4gib(self):
        """Weights read in place from a buffer over 4 GiB (64-bit pointer offsets): a stack
        whose layer sits past element 2**31 of a [L*E*D, 2F] rows view."""
        T, E, top_k, D, F, L = 8, 8, 2, 4096, 14336, 6      # w1 stack: 6 layers x 1.9 GB
        k = jax.random.split(jax.random.PRNGKey(int(_rng.integers(1 << 30))), 3)
        x = jax.random.normal(k[0], (T, D), jnp.bfloat16)
        w1_L = (jax.random.normal(k[1], (L, E, D, 2 * F), jnp.bfloat16) * (D ** -0.5)).astype(jnp.bfloat16)
        w2 = (jax.random.normal(k[2], (E, F, D)) / np.sqrt(F)).astype(jnp.bfloat16)
        logits = _logits(T, E)
        layer = L - 1                                     # starts at element 5 * 1.9 G > 2**31
        got = fused_moe(x, logits, ExpertRows.of_stack(w1_L, layer), w2, top_k, backend="gpu")
        want = fused_moe_reference(x, logits, w1_L[layer], w2, top_k)
        _assert_close(got, want, jnp.bfloat16)


def test_gpu_configs_fit_shared_memory():
    """The tuning table never asks for more shared memory than a Hopper block has
    (Mixtral-8x7B prefill through the gate/up kernel once asked for 240 KiB)."""
    from pallas_kernels.fused_moe import tuning

    for rows in (1, 16, 64, 512, 4096, 16384):
        for groups, D, F in ((8, 4096, 14336), (128, 2048, 768), (64, 2048, 1024)):
            gate_up = tuning.fit_gpu_smem(tuning.gpu_config(rows, groups, D, F), weight_tiles=2)
            down = tuning.fit_gpu_smem(tuning.gpu_config(rows, groups, F, D), weight_tiles=1)
            assert tuning.gpu_smem_bytes(gate_up, 2) <= tuning.GPU_SMEM_BUDGET
            assert tuning.gpu_smem_bytes(down, 1) <= tuning.GPU_SMEM_BUDGET
            assert F % gate_up.block_n == 0 and D % gate_up.block_k == 0


# ----- routing kinds: DeepSeek-V2 (softmax, group max), DeepSeek-V3 / GLM (sigmoid, bias, top-2 sums) -----

ROUTERS = [  # (transformers router, config overrides, our Routing, renormalize)
    ("DeepseekV2", dict(topk_method="greedy", routed_scaling_factor=1.0), Routing(), False),
    ("DeepseekV2", dict(topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=2.5),
     Routing(num_groups=4, topk_groups=2, group_score="max", scale=2.5), False),
    ("Glm4MoeLite", dict(n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=1.8),
     Routing(scoring="sigmoid", num_groups=4, topk_groups=2, group_score="top2_sum", scale=1.8), True),
    ("Glm4MoeLite", dict(n_group=1, topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0),
     Routing(scoring="sigmoid", group_score="top2_sum"), False),
]


@pytest.mark.parametrize("kind,overrides,routing,renormalize", ROUTERS)
def test_route_matches_transformers_routers(kind, overrides, routing, renormalize):
    """`route` picks the experts and weights transformers' routers pick, bias included."""
    import torch
    import transformers
    T, E, D, top_k = 19, 16, 32, 3
    cfg = getattr(transformers, f"{kind}Config")(hidden_size=D, n_routed_experts=E, num_experts_per_tok=top_k,
                                                 **overrides)
    folder = {"DeepseekV2": "deepseek_v2", "Glm4MoeLite": "glm4_moe_lite"}[kind]
    module = importlib.import_module(f"transformers.models.{folder}.modeling_{folder}")
    router = getattr(module, f"{kind}TopkRouter")(cfg)
    gen = torch.Generator().manual_seed(int(_rng.integers(1 << 30)))
    with torch.no_grad():
        router.weight.copy_(torch.randn(E, D, generator=gen))
        bias = getattr(router, "e_score_correction_bias", None)
        if bias is not None:
            bias.copy_(0.3 * torch.randn(E, generator=gen))
        x = torch.randn(T, D, generator=gen)
        logits, want_w, want_ids = router(x)
    score_bias = None if bias is None else jnp.asarray(bias.numpy())
    w, ids = route(jnp.asarray(logits.numpy()), top_k, renormalize=renormalize, routing=routing,
                   score_bias_E=score_bias)
    order = np.argsort(want_ids.numpy(), axis=1)
    np.testing.assert_array_equal(np.sort(np.asarray(ids), axis=1), np.take_along_axis(want_ids.numpy(), order, 1))
    got_w = np.take_along_axis(np.asarray(w), np.argsort(np.asarray(ids), axis=1), 1)
    np.testing.assert_allclose(got_w, np.take_along_axis(want_w.numpy(), order, 1), rtol=1e-5, atol=1e-6)


def _dense_moe(x, w1, w2, weights_TK, ids_TK, b1=None, b2=None, clamp=None):
    """Every chosen expert applied to its token by plain jnp, weighted and summed (clamp:
    (alpha, limit) of GPT-OSS's clamped SwiGLU, else SiLU)."""
    F = w2.shape[1]
    h = jnp.einsum("td,tkdf->tkf", x, w1[ids_TK]) + (0 if b1 is None else b1[ids_TK])
    gate, up = h[..., :F], h[..., F:]
    if clamp is None:
        act = jax.nn.silu(gate) * up
    else:
        alpha, limit = clamp
        gate = jnp.minimum(gate, limit)
        act = (jnp.clip(up, -limit, limit) + 1) * gate * jax.nn.sigmoid(alpha * gate)
    y = jnp.einsum("tkf,tkfd->tkd", act, w2[ids_TK]) + (0 if b2 is None else b2[ids_TK])
    return jnp.sum(y * weights_TK[..., None], axis=1)


@pytest.mark.parametrize("backend", ["reference", "gpu", "gpu_xla_routing"])
def test_fused_moe_with_routing_kinds(backend):
    """Sigmoid + bias + groups + scale through fused_moe equals the dense oracle on `route`'s choice
    (gpu: routing_gpu computes this routing, GPU_GLUE's "routing_kinds"; gpu_xla_routing: the GPU
    path with XLA's `route` instead)."""
    from pallas_kernels.fused_moe import api
    T, E, D, F, top_k = 9, 16, 64, 32, 4
    x, logits, w1, w2 = _inputs(T, E, D, F, jnp.float32)
    routing = Routing(scoring="sigmoid", num_groups=4, topk_groups=2, group_score="top2_sum", scale=2.0)
    bias = jnp.asarray(_rng.standard_normal(E).astype(np.float32))
    if backend == "gpu_xla_routing":
        glue = tuple(g for g in api.GPU_GLUE if g != "routing_kinds")
        got = api._fused_moe_kernel(x, logits, w1, w2, None, None, bias, top_k=top_k, renormalize=True,
                                    activation="silu", backend="gpu", interpret=True, config=None,
                                    gpu_glue=glue, routing=routing)
    else:
        got = fused_moe(x, logits, w1, w2, top_k, renormalize=True, routing=routing, score_bias=bias,
                        backend=backend, interpret=True)
    w, ids = route(logits, top_k, renormalize=True, routing=routing, score_bias_E=bias)
    _assert_close(got, _dense_moe(x, w1, w2, w, ids), jnp.float32)
    plain_w, plain_ids = route(logits, top_k, renormalize=True, routing=routing)
    assert not np.array_equal(np.asarray(plain_ids), np.asarray(ids)), "the bias should change some choice"


def test_biased_experts_with_clamped_swiglu():
    """GPT-OSS's experts (biases, clamped SwiGLU) on the reference ("auto" picks it) equal the
    dense oracle, also for an expert slice."""
    T, E, D, F, top_k = 11, 8, 32, 16, 3
    x, logits, w1, w2 = _inputs(T, E, D, F, jnp.float32)
    x = 3 * x                                                  # activations past the limit
    b1 = jnp.asarray(_rng.standard_normal((E, 2 * F)).astype(np.float32))
    b2 = jnp.asarray(_rng.standard_normal((E, D)).astype(np.float32))
    act = ClampedSwiGLU(alpha=1.702, limit=0.8)
    got = fused_moe(x, logits, w1, w2, top_k, activation=act, b1=b1, b2=b2)
    w, ids = route(logits, top_k, renormalize=True)
    want = _dense_moe(x, w1, w2, w, ids, b1, b2, clamp=(1.702, 0.8))
    _assert_close(got, want, jnp.float32)
    h = np.asarray(jnp.einsum("td,tkdf->tkf", x, w1[ids]) + b1[ids])
    assert (h[..., :F] > 0.8).any() and (np.abs(h[..., F:]) > 0.8).any(), "the clamp should bite"
    halves = [fused_moe(x, logits, w1[e0:e0 + 4], w2[e0:e0 + 4], top_k, activation=act, b1=b1[e0:e0 + 4],
                        b2=b2[e0:e0 + 4], expert_offset=e0, backend="reference") for e0 in (0, 4)]
    _assert_close(halves[0] + halves[1], want, jnp.float32)


def _seeded(what: str) -> np.random.Generator:
    """A fresh seed per run, printed (pytest shows it with a failure), so a failure replays."""
    seed = int(np.random.SeedSequence().entropy % (1 << 31))
    print(f"{what}: seed {seed}")
    return np.random.default_rng(seed)


def _gpt_oss_inputs(rng, T, E, D, F, dtype, *, scale=3.0, limit=0.8):
    """x (scaled so that gate and up pass the clamp's limit), distinct logits, weights, biases
    b1 [E, 2F] and b2 [E, D]; checks the limit bites on both sides for the chosen experts."""
    x = jnp.asarray(scale * rng.standard_normal((T, D)), dtype)
    logits = jnp.asarray(np.argsort(rng.random((T, E)), axis=1).astype(np.float32) * (4.0 / E))
    w1 = jnp.asarray(rng.standard_normal((E, D, 2 * F)) / np.sqrt(D), dtype)
    w2 = jnp.asarray(rng.standard_normal((E, F, D)) / np.sqrt(F), dtype)
    b1 = jnp.asarray(rng.standard_normal((E, 2 * F)), dtype)
    b2 = jnp.asarray(rng.standard_normal((E, D)), dtype)
    return x, logits, w1, w2, b1, b2


def _clamp_bites(x, logits, w1, b1, top_k, limit):
    _, ids = route(logits, top_k, renormalize=True)
    F = w1.shape[2] // 2
    h = np.asarray(jnp.einsum("td,tkdf->tkf", x.astype(jnp.float32), w1[ids].astype(jnp.float32))
                   + b1[ids].astype(jnp.float32))
    return (h[..., :F] > limit).any() and (h[..., F:] > limit).any() and (h[..., F:] < -limit).any()


@pytest.mark.parametrize("T,E,top_k,D,F,dtype", [
    (1, 8, 4, 64, 32, jnp.float32),        # decode: the single-token layout
    (9, 16, 4, 48, 80, jnp.float32),       # dims 16 * odd
    (32, 8, 4, 64, 32, jnp.bfloat16),      # several rows per expert, bf16
])
def test_gpu_kernels_biased_experts_clamped_swiglu(T, E, top_k, D, F, dtype):
    """The GPU kernels (interpret mode) with GPT-OSS's experts: b1 and the clamped SwiGLU in the
    gate/up epilogue, b2 in the down projection's, the limit biting (inputs 3x a unit normal,
    limit 0.8) on the gate and on both sides of up; against the reference."""
    rng = _seeded("gpt-oss experts")
    x, logits, w1, w2, b1, b2 = _gpt_oss_inputs(rng, T, E, D, F, dtype)
    act = ClampedSwiGLU(alpha=1.702, limit=0.8)
    assert _clamp_bites(x, logits, w1, b1, top_k, 0.8)
    got = fused_moe(x, logits, w1, w2, top_k, activation=act, b1=b1, b2=b2, backend="gpu", interpret=True)
    want = fused_moe_reference(x, logits, w1, w2, top_k, activation=act, b1=b1, b2=b2)
    assert got.shape == (T, D) and got.dtype == dtype
    _assert_close(got, want, dtype)
    if T == 9:                                       # each bias alone, SiLU
        for only in (dict(b1=b1), dict(b2=b2)):
            got = fused_moe(x, logits, w1, w2, top_k, backend="gpu", interpret=True, **only)
            _assert_close(got, fused_moe_reference(x, logits, w1, w2, top_k, **only), dtype)


@pytest.mark.parametrize("T", [1, 7])
def test_gpu_kernels_biased_expert_slices_stack_and_mask(T):
    """Biases with the kernels' other inputs: expert slices (each slice's own b1/b2 rows) sum
    to the layer, a stacked layer read in place (ExpertRows, traced layer; other layers NaN),
    padding tokens masked (zero output)."""
    rng = _seeded("gpt-oss slices")
    E, top_k, D, F, L = 8, 4, 64, 32, 3
    x, logits, w1, w2, b1, b2 = _gpt_oss_inputs(rng, T, E, D, F, jnp.float32)
    act = ClampedSwiGLU(alpha=1.702, limit=0.8)
    kw = dict(activation=act, backend="gpu", interpret=True)
    want = np.asarray(fused_moe_reference(x, logits, w1, w2, top_k, activation=act, b1=b1, b2=b2))
    run = jax.jit(lambda w1s, w2s, b1s, b2s, off: fused_moe(x, logits, w1s, w2s, top_k, b1=b1s, b2=b2s,
                                                          expert_offset=off, **kw))
    total = sum(np.asarray(run(w1[e0:e0 + 4], w2[e0:e0 + 4], b1[e0:e0 + 4], b2[e0:e0 + 4], jnp.int32(e0)))
                for e0 in (0, 4))
    _assert_close(total, want, jnp.float32)
    w1_L = jnp.full((L,) + w1.shape, jnp.nan, w1.dtype).at[1].set(w1)
    w2_L = jnp.full((L,) + w2.shape, jnp.nan, w2.dtype).at[1].set(w2)
    stacked = jax.jit(lambda l: fused_moe(x, logits, ExpertRows.of_stack(w1_L, l), ExpertRows.of_stack(w2_L, l),
                                          top_k, b1=b1, b2=b2, **kw))(jnp.int32(1))
    _assert_close(stacked, want, jnp.float32)
    mask = np.arange(T) % 3 != 1 if T > 1 else np.array([False])
    got = fused_moe(x, logits, w1, w2, top_k, b1=b1, b2=b2, token_mask=jnp.asarray(mask), **kw)
    _assert_close(got, np.where(mask[:, None], want, 0.0), jnp.float32)


def test_gpt_oss_experts_backend_policy(monkeypatch):
    """"auto" on a GPU runs biased experts and the clamp on the kernels, as "gpu" does; "tpu"
    raises; bias shapes are checked."""
    from pallas_kernels.fused_moe import api
    rng = _seeded("gpt-oss policy")
    x, logits, w1, w2, b1, b2 = _gpt_oss_inputs(rng, 3, 8, 64, 32, jnp.float32)
    monkeypatch.setattr(api, "resolve_backend", lambda backend: "gpu" if backend == "auto" else backend)
    kernel_calls = []
    monkeypatch.setattr(api, "_fused_moe_kernel", lambda *a, **k: kernel_calls.append(k["backend"]))
    fused_moe(x, logits, w1, w2, 2, b1=b1, b2=b2, activation=ClampedSwiGLU())
    fused_moe(x, logits, w1, w2, 2, activation=ClampedSwiGLU(), backend="gpu")
    assert kernel_calls == ["gpu", "gpu"]
    with pytest.raises(ValueError, match="tpu kernels do not take expert biases"):
        fused_moe(x, logits, w1, w2, 2, b1=b1, backend="tpu", interpret=True)
    with pytest.raises(ValueError, match=r"b2 must be \[E, D\]"):
        fused_moe(x, logits, w1, w2, 2, b2=b2[:, :5], backend="gpu", interpret=True)


def test_gpt_oss_benchmark_rows_run_on_cpu():
    """fused_moe.bench's GPT-OSS rows at a toy shape (host timer; the reference only on a CPU):
    GB/s counts the active experts' weights and biases."""
    from pallas_kernels.fused_moe import bench
    rows = bench._Rows()
    bench.bench_gpt_oss(rows, 100.0, ("toy", 8, 64, 32, 2, 4))
    (row,) = rows.rows
    assert row["impl"] == "xla_reference_fused_moe" and "biases+clamp" in row["shape"]
    touched = int(row["shape"].split("touched=")[1].split("/")[0])
    assert abs(row["GBps"] * row["us"] * 1e-6 - touched * (3 * 64 * 32 + 2 * 32 + 64) * 2 / 1e9) < 1e-6


def test_routing_kinds_benchmark_rows_run_on_cpu():
    """fused_moe.bench's GLM-4.7-Flash routing rows at a toy shape (the reference only on a CPU)."""
    from pallas_kernels.fused_moe import bench
    rows = bench._Rows()
    bench.bench_routing_kinds(rows, 100.0, ("toy", 8, 64, 32, 2, 2))
    (row,) = rows.rows
    assert row["impl"] == "xla_reference_fused_moe" and "sigmoid+bias" in row["shape"]
