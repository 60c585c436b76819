"""`bench.routing`: the routing of finished sequences replayed layer by layer, and the distinct
experts a decode step reaches."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crosspool_jax.bench.routing import distinct_experts_per_step, replay_routing
from crosspool_jax.models import ModelConfig
from crosspool_jax.models.attention import dense_causal_attention
from crosspool_jax.models.params import init_random_params
from crosspool_jax.models.transformer import attention_options, forward

CONFIG = ModelConfig.from_hf_dict({
    "architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 96, "hidden_size": 32,
    "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "num_experts": 8, "num_experts_per_tok": 2,
    "moe_intermediate_size": 16, "intermediate_size": 40, "mlp_only_layers": [1],       # moe, dense, moe
    "decoder_sparse_step": 1, "norm_topk_prob": True, "eos_token_id": 5, "bos_token_id": 1,
    "tie_word_embeddings": False})


def test_replay_follows_the_forward_pass_and_routes_each_token():
    kv, ffn = init_random_params(CONFIG, jax.random.key(4), jnp.float32)
    tokens = np.random.default_rng(0).integers(0, CONFIG.vocab_size, 11).tolist()
    [(routes, hidden_TD), (other, _)] = replay_routing(kv, ffn, CONFIG, [tokens, tokens[:4]])
    np.testing.assert_array_equal(other, routes[:, :4])                 # causal: a prefix routes the same
    positions_T = jnp.arange(11, dtype=jnp.int32)
    attn = dense_causal_attention(jnp.zeros(11, jnp.int32), positions_T, **attention_options(CONFIG))
    _, want_TD = forward(kv, ffn, CONFIG, jnp.asarray(tokens, jnp.int32), positions_T, attn, None)
    np.testing.assert_allclose(np.asarray(hidden_TD), np.asarray(want_TD), rtol=1e-5, atol=1e-5)
    assert routes.shape == (2, 11, 2) and routes.dtype == np.int32          # 2 MoE layers, top 2 of 8
    assert ((routes >= 0) & (routes < 8)).all() and (routes[..., 0] != routes[..., 1]).all()
    assert len(np.unique(routes)) > 2                  # random tokens spread over the experts


def test_distinct_experts_per_step_counts_the_union_per_position_and_layer():
    a = np.array([[[1, 2], [1, 2], [0, 7]]])           # 1 layer, 3 positions, top 2
    b = np.array([[[2, 3], [2, 1], [6, 5]]])
    assert distinct_experts_per_step([a, b], [0]) == 3.0
    assert distinct_experts_per_step([a, b], [0, 1]) == 2.5                 # {1, 2, 3}, {1, 2}
    assert distinct_experts_per_step([a, b], [2]) == 4.0
    assert distinct_experts_per_step([a], [0, 1, 2]) == 2.0
    with pytest.raises(ValueError, match="no position 3"):
        distinct_experts_per_step([a, b], [3])
