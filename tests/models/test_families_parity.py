"""Golden checks of the MLA / DeepSeek-style families against transformers, prompt by prompt.

Each case is a tiny random checkpoint written by transformers (`tiny_models`) whose options
together cover the family: with and without the query LoRA, attention biases, YaRN with
mscale / mscale_all_dim (positions past the pretraining length), interleaved and rotate-half
RoPE, dense first (or mixed) layers, shared experts, greedy and group-limited top-k, softmax
and sigmoid scores with a learnt choice bias (randomized, so it changes choices), with and
without renormalisation, scaled routing; GPT-OSS's attention sinks, alternating sliding and
full layers (window 5 < 33 tokens), q/k/v/o, router and expert biases, and the clamped SwiGLU
(a limit the tiny activations reach). Our forward (loaded by our loader,
dense attention seam) must give logits within 1e-4 of max |logit| of transformers' float32
logits for prompts of 1, 7 and 33 tokens.
"""
import zlib

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from crosspool_jax.checkpoints import load_model
from crosspool_jax.checkpoints.tiny_models import make_tiny_hf_model
from crosspool_jax.models import dense_logits

LENGTHS = (1, 7, 33)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 8,
        "mscale": 0.7, "mscale_all_dim": 0.9, "beta_fast": 32, "beta_slow": 1}

CASES = [
    # the tiny defaults: q LoRA, dense layer 0, 8 experts in 4 groups (best 2), 1 shared expert, scale 1.5
    ("dsv2-qlora-grouped-scaled", "deepseek_v2", dict()),
    ("dsv2-noqlora-greedy-bias-yarn-2shared-tied", "deepseek_v2",
     dict(q_lora_rank=None, topk_method="greedy", attention_bias=True, rope_parameters=YARN, n_shared_experts=2,
          first_k_dense_replace=0, num_hidden_layers=3, tie_word_embeddings=True)),
    ("dsv2-qlora-bias-yarn-2dense", "deepseek_v2",
     dict(attention_bias=True, rope_parameters=YARN, first_k_dense_replace=2, num_hidden_layers=3)),
    # DeepSeek-V3 routing: sigmoid, learnt choice bias, groups by top-2 sums, renormalised, scaled
    ("glm-qlora-grouped-bias-interleave", "glm4_moe_lite", dict()),
    ("glm-noqlora-rotatehalf-bias-yarn-mixed-nonorm", "glm4_moe_lite",
     dict(q_lora_rank=None, rope_interleave=False, attention_bias=True, rope_parameters=YARN, n_group=1,
          topk_group=1, norm_topk_prob=False, num_hidden_layers=3, mlp_layer_types=["sparse", "dense", "sparse"])),
    ("dsv3-qlora-grouped-bias-dense1", "deepseek_v3", dict()),
    # GLM-4.5 (GQA): q/k/v biases, per-head q/k norms, RoPE on half of each head, dense layer 0
    ("glm45-qknorm-bias-halfrope-grouped", "glm4_moe", dict()),
    ("glm45-nonorm-nobias-quarterrope-yarn-ungrouped-2dense", "glm4_moe",
     dict(use_qk_norm=False, attention_bias=False, n_group=1, topk_group=1, first_k_dense_replace=2,
          num_hidden_layers=3, rope_parameters={**YARN, "partial_rotary_factor": 0.25})),
    # GPT-OSS: sinks, q/k/v/o biases, router and expert biases, clamped SwiGLU, YaRN (no truncation)
    ("gptoss-sliding-full-sliding-clamped", "gpt_oss", dict()),
    ("gptoss-full-first-gqa4-top4-limit7", "gpt_oss",
     dict(num_hidden_layers=2, layer_types=["full_attention", "sliding_attention"], num_attention_heads=8,
          num_key_value_heads=2, num_experts_per_tok=4, swiglu_limit=7.0, swiglu_alpha=1.3)),
]


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def case(request, tmp_path_factory):
    case_id, family, overrides = request.param
    path = str(tmp_path_factory.mktemp(case_id))
    seed = zlib.crc32(case_id.encode()) % 1000
    make_tiny_hf_model(family, path, seed=seed, **overrides)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return case_id, family, path, seed, load_model(path, dtype="float32"), model


@pytest.mark.parametrize("length", LENGTHS)
def test_float32_logits_match_transformers(case, length):
    case_id, family, path, seed, ours, theirs = case
    assert ours.config.family == family
    ids = np.random.default_rng(seed + length).integers(0, 256, length)
    n = len(ids)
    got = np.asarray(dense_logits(ours.kv_params, ours.ffn_params, ours.config, jnp.asarray(ids, jnp.int32),
                                  jnp.zeros(n, jnp.int32), jnp.arange(n, dtype=jnp.int32)))
    with torch.no_grad():
        want = theirs(torch.tensor(ids)[None]).logits[0].numpy()
    assert got.shape == want.shape == (n, 256)
    assert np.abs(want).max() > 0.1
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-4
