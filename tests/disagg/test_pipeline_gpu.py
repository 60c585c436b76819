"""The disaggregated step with the Pallas GPU kernels (attention over the whole arena row with
page offsets, fused_moe over each weight device's experts read in place as ExpertRows, both
with budgeted slots read at traced offsets) against the same step on the jnp references.

GPU only (2 GPUs or more): `CROSSPOOL_TEST_ON_GPU=1 python3 -m pytest -m gpu tests/disagg`
on the device machine (scripts/run_gpu_checks.sh with TESTS=tests/disagg/test_pipeline_gpu.py).
The model has kernel-friendly shapes (head dim 128, D and F multiples of 16); float32, so the
kernels run at full precision and the tolerance is summation order only.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crosspool_jax.disagg import build_disagg_inputs, disagg_step, make_multi_layout
from crosspool_jax.disagg.residency import build_residency
from crosspool_jax.models import ModelConfig, init_random_params
from disagg_tiny import DEEPSEEK_V2, GPT_OSS, PAGES_PER_DEVICE, make_seqs, next_chunks

KERNEL_QWEN3 = {
    "architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 512, "hidden_size": 256, "moe_intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 128,
    "num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": True, "rope_theta": 1e4,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False}
# MLA (latent 96 + rope key 32: a 64-wide half row, K = 1) with the query LoRA, a dense layer 0,
# grouped routing; and GPT-OSS (sinks, window-8 and full layers, biases, clamped SwiGLU)
KERNEL_DEEPSEEK_V2 = dict(DEEPSEEK_V2, vocab_size=512, hidden_size=256, intermediate_size=256,
                          moe_intermediate_size=128, num_attention_heads=8, kv_lora_rank=96, q_lora_rank=128,
                          qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=64)
KERNEL_GPT_OSS = dict(GPT_OSS, vocab_size=512, hidden_size=256, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=8, head_dim=64, num_local_experts=8, sliding_window=8,
                      layer_types=["sliding_attention", "full_attention"], swiglu_limit=7.0)
G = 16


def _run(backend: str, models: dict, layout, seqs_by_model, steps: int):
    res = build_residency({n: m[1:] for n, m in models.items()}, layout)
    out = []
    for _ in range(steps):
        for n, (config, _, _) in models.items():
            view = layout.model(n)
            chunks, owners = next_chunks(seqs_by_model[n], layout.n_kv, max_chunk=5)
            inputs, rows = build_disagg_inputs(chunks, layout=view, num_layers=config.num_layers, num_microbatches=2,
                                               min_tokens=16, min_seqs=4)
            bases = res.acquire(n)
            try:
                arena, logits = disagg_step(res.arena.take(), inputs, layout=view.program, config=config,
                                            num_microbatches=2, offsets=view.offsets(bases),
                                            attention_backend=backend, moe_backend=backend)
                res.arena.put(arena)
            finally:
                res.release(n)
            out.append(np.asarray(logits)[[d for d, r in enumerate(rows) for _ in r],
                                          [j for r in rows for j in r]])
            for per_device in owners:
                for s, end in per_device:
                    s.computed = end
    return out


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu" or len(jax.devices()) < 2, reason="needs 2 GPUs")
def test_kernels_match_reference_on_the_split():
    _compare(("reference", "gpu"))


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu" or len(jax.devices()) < 2, reason="needs 2 GPUs")
def test_auto_backends_serve_mla_and_gpt_oss_on_the_split():
    """The engine's default backends ("auto": the GPU MoE kernel with grouped routing for the MLA
    model, the reference where the kernels do not run yet: MLA and sinks attention, the
    clamped SwiGLU) on a 1+1 split holding both models, against the references."""
    configs = {n: ModelConfig.from_hf_dict(d) for n, d in (("mla", KERNEL_DEEPSEEK_V2), ("gpt_oss", KERNEL_GPT_OSS))}
    models = {n: (c, *init_random_params(c, jax.random.key(i), jnp.float32))
              for i, (n, c) in enumerate(configs.items())}
    layout = make_multi_layout(configs, n_kv=1, n_w=1, pages_per_device=2 * PAGES_PER_DEVICE)
    _compare_runs(models, layout, ("reference", "auto"))


def _compare(backends):
    config = ModelConfig.from_hf_dict(KERNEL_QWEN3)
    models = {f"m{i}": (config, *init_random_params(config, jax.random.key(i), jnp.float32)) for i in range(2)}
    pages = 2 * PAGES_PER_DEVICE                  # make_seqs draws from the first half; model i uses half i
    one = make_multi_layout({n: m[0] for n, m in models.items()}, n_kv=1, n_w=1, pages_per_device=pages,
                            page_elems=G * config.kv_size)
    slot_bytes = (one.region_elems("m0", "w") + 1024) * 4
    layout = make_multi_layout({n: m[0] for n, m in models.items()}, n_kv=1, n_w=1,
                               pages_per_device=pages, page_elems=G * config.kv_size,
                               weights_pool_bytes=slot_bytes)                 # one weights slot: they swap
    _compare_runs(models, layout, backends)


def _compare_runs(models, layout, backends):
    """Three steps of each model on every backend: the logits agree up to summation order."""
    results = {}
    for backend in backends:
        rng = np.random.default_rng(7)
        seqs = {n: make_seqs(rng, 1, m[0].num_layers, m[0].vocab_size, G=G) for n, m in models.items()}
        for i, n in enumerate(models):
            for s in seqs[n]:
                s.page_table = s.page_table + i * PAGES_PER_DEVICE          # disjoint pages per model
        results[backend] = _run(backend, models, layout, seqs, steps=3)
    for want, got in zip(*(results[b] for b in backends)):
        scale = float(np.abs(want).max())
        assert np.all(np.isfinite(got)) and float(np.abs(got - want).max()) <= 2e-3 * scale
    assert len(results[backends[0]]) == 6
