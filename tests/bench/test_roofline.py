"""Tests of bench.roofline: the bytes a decode step must read, counted from the parameter shapes."""
import dataclasses

import pytest

from crosspool_jax.bench.roofline import decode_step_bytes, expected_distinct_experts, roofline_tokens_per_second
from crosspool_jax.models import ModelConfig
from crosspool_jax.models.params import side_bytes
from crosspool_jax.models.random_models import SHAPES


def _config(name="qwen3moe-30b-a3b-4l"):
    return ModelConfig.from_hf_dict(SHAPES[name])


def test_expected_distinct_experts():
    assert expected_distinct_experts(128, 8, 1) == pytest.approx(8)
    assert expected_distinct_experts(128, 8, 2) == pytest.approx(128 * (1 - (120 / 128) ** 2))
    assert 127.9 < expected_distinct_experts(128, 8, 1000) <= 128
    assert expected_distinct_experts(8, 2, 0) == 0.0


def test_all_experts_touched_reads_every_weight_once():
    c = _config()
    attn, ffn = side_bytes(c, "bfloat16")
    parts = decode_step_bytes(c, batch=4, context=100, itemsize=2, experts_touched=c.num_experts)
    embedding = c.vocab_size * c.hidden_size * 2
    # every weight once, but only the batch's rows of the (untied) embedding
    assert parts["total"] - parts["kv_cache"] == pytest.approx(attn + ffn - embedding + 4 * c.hidden_size * 2,
                                                               rel=1e-12)
    assert parts["kv_cache"] == 4 * 100 * c.num_layers * 2 * c.num_kv_heads * c.head_dim * 2


def test_one_token_reads_top_k_experts_per_layer():
    c = _config()
    one = decode_step_bytes(c, batch=1, context=1, itemsize=2)
    expert_bytes = 3 * c.hidden_size * c.moe_intermediate_size * 2          # w1 (gate, up) and w2
    assert one["experts"] == pytest.approx(c.num_layers * c.top_k * expert_bytes)
    assert one["experts_touched_per_layer"] == pytest.approx(c.top_k)
    tok_s = roofline_tokens_per_second(one["total"], 1, copy_gbps=3000.0)
    assert tok_s == pytest.approx(3000e9 / one["total"])


def test_an_mla_model_reads_its_latent_rows():
    c = _config("deepseek-v2-lite-27l")
    parts = decode_step_bytes(c, batch=2, context=10, itemsize=2)
    assert parts["kv_cache"] == 2 * 10 * c.num_layers * (c.kv_lora_rank + c.qk_rope_head_dim) * 2   # 576 a token


def test_tied_embedding_counts_as_the_lm_head():
    c = _config()
    tied = dataclasses.replace(c, tie_word_embeddings=True)
    parts = decode_step_bytes(tied, batch=2, context=8, itemsize=4)
    assert parts["lm_head"] == pytest.approx(c.vocab_size * c.hidden_size * 4)
