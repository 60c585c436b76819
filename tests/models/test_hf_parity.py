"""Golden checks: our forward on weights loaded by our loader vs transformers' logits.

Error metric: max |ours - reference| / max |reference| over all logits of the batch.
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

T = 12

# (id, family, overrides): GQA ratios 1/4/8, head_dim != D/N, top-k 1/2/8, experts 4..64,
# shared expert on (qwen2_moe) and off, tied/untied, mixed dense/MoE layers, rope scalings.
CASES = [
    ("mixtral-gqa1-k2-e4", "mixtral", dict(num_attention_heads=4, num_key_value_heads=4)),
    ("mixtral-gqa8-hd16-k1-e8-tied-sw", "mixtral",
     dict(num_attention_heads=8, num_key_value_heads=1, head_dim=16, num_local_experts=8,
          num_experts_per_tok=1, tie_word_embeddings=True, sliding_window=5)),
    ("qwen2moe-gqa4-k8-e16-shared-mixed-tied", "qwen2_moe",
     dict(num_attention_heads=8, num_key_value_heads=2, num_experts=16, num_experts_per_tok=8,
          mlp_only_layers=[0], tie_word_embeddings=True)),
    ("qwen2moe-sparse-step2-normtopk-noshared", "qwen2_moe",
     dict(decoder_sparse_step=2, norm_topk_prob=True, num_hidden_layers=3, shared_expert_intermediate_size=0)),
    ("qwen3moe-gqa1-hd16-k8-e64-normtopk-mixed", "qwen3_moe",
     dict(num_attention_heads=4, num_key_value_heads=4, num_experts=64, num_experts_per_tok=8,
          norm_topk_prob=True, mlp_only_layers=[1])),
    ("olmoe-gqa4-k2-e8-clip", "olmoe",
     dict(num_attention_heads=8, num_key_value_heads=2, num_experts=8, clip_qkv=0.6)),
    ("llama-llama3rope-tied", "llama",
     dict(tie_word_embeddings=True, rope_theta=500000.0,
          rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    ("llama-linear-rope-hd16", "llama",
     dict(head_dim=16, rope_scaling={"rope_type": "linear", "factor": 2.0})),
    ("qwen3-dense-gqa4", "qwen3", dict(num_attention_heads=8, num_key_value_heads=2)),
    ("qwen3moe-yarn4", "qwen3_moe",     # positions past the pretraining length 8: the ramp and the factor matter
     dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8})),
    ("llama-yarn-mscale-notrunc", "llama",
     dict(rope_scaling={"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": 6, "beta_fast": 16,
                        "beta_slow": 2, "mscale": 0.8, "mscale_all_dim": 0.5, "truncate": False})),
]


def _ours(path, dtype, ids):
    m = load_model(path, dtype=dtype)
    n = len(ids)
    logits = dense_logits(m.kv_params, m.ffn_params, m.config, jnp.asarray(ids, jnp.int32),
                          jnp.zeros(n, jnp.int32), jnp.arange(n, dtype=jnp.int32))
    return np.asarray(logits), m


def _theirs(path, torch_dtype, ids):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    with torch.no_grad():
        return model(torch.tensor(ids)[None]).logits[0].float().numpy()


def _rel_err(a, ref):
    return float(np.abs(a - ref).max() / np.abs(ref).max())


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")   # qwen2 without shared expert
@pytest.mark.parametrize("case_id,family,overrides", CASES, ids=[c[0] for c in CASES])
def test_float32_logits_match_transformers(tmp_path, case_id, family, overrides):
    seed = zlib.crc32(case_id.encode()) % 1000
    make_tiny_hf_model(family, str(tmp_path), seed=seed, **overrides)
    ids = np.random.default_rng(seed).integers(0, 256, T)
    ours, m = _ours(str(tmp_path), "float32", ids)
    assert m.config.family == family
    ref = _theirs(str(tmp_path), torch.float32, ids)
    assert ours.shape == ref.shape == (T, 256)
    assert np.abs(ref).max() > 0.1        # the random model is not trivially near zero
    assert _rel_err(ours, ref) < 1e-4


BF16_CASES = [CASES[0], CASES[4], CASES[5]]


@pytest.mark.parametrize("case_id,family,overrides", BF16_CASES, ids=[c[0] for c in BF16_CASES])
def test_bfloat16_error_is_within_transformers_own_bf16_error(tmp_path, case_id, family, overrides):
    """bf16 tolerance, justified: running in bf16 is a perturbation of the float32 model, and
    transformers' own bf16 run measures how large that perturbation is for these weights
    (about 1% of max |logit| here: bf16 keeps 8 mantissa bits, relative step 2^-8 ~ 0.4%, and
    ~10 roundings compound over 2 layers). Ours vs the float32 truth must stay within 1.5x of
    transformers' bf16 error plus 1% (rounding points differ between the two codes), and
    under 4% absolutely. Measured: ours 0.9-1.2%, transformers 0.9-1.4%."""
    seed = zlib.crc32(case_id.encode()) % 1000 + 1
    make_tiny_hf_model(family, str(tmp_path), seed=seed, **overrides)
    ids = np.random.default_rng(seed).integers(0, 256, T)
    truth = _theirs(str(tmp_path), torch.float32, ids)
    theirs_bf16 = _theirs(str(tmp_path), torch.bfloat16, ids)
    ours, m = _ours(str(tmp_path), "bfloat16", ids)
    assert m.kv_params["attn"]["wq_LDQ"].dtype == jnp.bfloat16
    assert m.ffn_params["moe"]["w1_LEDF2"].dtype == jnp.bfloat16
    err = _rel_err(ours, truth)
    assert err < 1.5 * _rel_err(theirs_bf16, truth) + 0.01 and err < 0.04
