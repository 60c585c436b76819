"""Tiny MoE models (one with a dense FFN layer) and a host-side sequence driver shared by the disagg tests."""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from crosspool_jax.models import ModelConfig, dense_logits, init_random_params

# Qwen3-MoE style: per-head q/k norms; 8 experts (expert-parallel on 1, 2 or 4 weight devices)
QWEN3_MOE = {
    "architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 64, "hidden_size": 32, "moe_intermediate_size": 16,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
    "num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": True, "rope_theta": 1e4,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False}
# Qwen2-MoE style: qkv bias, shared expert, 6 experts (4 weight devices: 2 groups x 2 ways over F)
QWEN2_MOE = {
    "architectures": ["Qwen2MoeForCausalLM"], "vocab_size": 64, "hidden_size": 32, "moe_intermediate_size": 16,
    "shared_expert_intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "num_experts": 6, "num_experts_per_tok": 2, "norm_topk_prob": False,
    "rope_theta": 1e4, "rms_norm_eps": 1e-6, "tie_word_embeddings": True}
# Mixtral style: 3 experts (coprime to 2 and 4 weight devices: pure tensor parallelism over F)
MIXTRAL = {
    "architectures": ["MixtralForCausalLM"], "vocab_size": 64, "hidden_size": 32, "intermediate_size": 16,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 3,
    "num_experts_per_tok": 2, "rope_theta": 1e4, "rms_norm_eps": 1e-5, "sliding_window": 6}
# Qwen2-MoE with a dense FFN layer between two MoE layers (mlp_only_layers): kinds moe, dense,
# moe, so layer 2 is entry 1 of the MoE stack; dense F = 32 splits over 1, 2 or 4 weight devices
QWEN2_MOE_DENSE = dict(QWEN2_MOE, num_hidden_layers=3, mlp_only_layers=[1], intermediate_size=32)
# DeepSeek-V2 style MLA with the query LoRA: latent 16 + rope key 4 cached per token (K = 1 row
# of 20 in two halves of 10), nope 8, v 12; dense layer 0 (F 32), 8 experts in 4 groups (best 2),
# a shared expert, scaled routing
DEEPSEEK_V2 = {
    "architectures": ["DeepseekV2ForCausalLM"], "vocab_size": 64, "hidden_size": 32, "intermediate_size": 32,
    "moe_intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4, "n_routed_experts": 8,
    "num_experts_per_tok": 2, "n_shared_experts": 1, "first_k_dense_replace": 1, "kv_lora_rank": 16,
    "q_lora_rank": 24, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 12,
    "topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2, "routed_scaling_factor": 1.5,
    "rope_theta": 1e4, "rms_norm_eps": 1e-6, "tie_word_embeddings": False}
# GLM-4.7-Flash style MLA without the query LoRA, attention biases, sigmoid routing with a choice
# bias (replicated on the weight rows), all layers MoE
GLM4_MOE_LITE = {
    "architectures": ["Glm4MoeLiteForCausalLM"], "vocab_size": 64, "hidden_size": 32, "intermediate_size": 32,
    "moe_intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4, "n_routed_experts": 8,
    "num_experts_per_tok": 3, "n_shared_experts": 1, "kv_lora_rank": 16, "q_lora_rank": None,
    "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 12, "n_group": 4, "topk_group": 2,
    "routed_scaling_factor": 1.8, "norm_topk_prob": True, "attention_bias": True,
    "mlp_layer_types": ["sparse", "sparse"], "rope_theta": 1e4, "rms_norm_eps": 1e-6}
# GPT-OSS style: sinks, sliding (window 3) / full / sliding layers, q/k/v/o biases, router and
# expert biases, a SwiGLU limit the tiny activations reach; 6 experts (4 weight devices: 2 groups
# x 2 ways over F, so b2 sits on one of each pair)
GPT_OSS = {
    "architectures": ["GptOssForCausalLM"], "vocab_size": 64, "hidden_size": 32, "intermediate_size": 16,
    "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
    "num_local_experts": 6, "num_experts_per_tok": 2, "sliding_window": 3,
    "layer_types": ["sliding_attention", "full_attention", "sliding_attention"], "attention_bias": True,
    "swiglu_limit": 0.1, "rope_theta": 1e4, "rms_norm_eps": 1e-6, "tie_word_embeddings": False}
CONFIGS = {"qwen3_moe": QWEN3_MOE, "qwen2_moe": QWEN2_MOE, "mixtral": MIXTRAL, "qwen2_moe_dense": QWEN2_MOE_DENSE,
           "deepseek_v2": DEEPSEEK_V2, "glm4_moe_lite": GLM4_MOE_LITE, "gpt_oss": GPT_OSS}

PAGE_ELEMS = 4 * 16          # G = 4 tokens per page for K*H = 16


def page_elems(config) -> int:
    """G = 4 tokens per page of this model's cached row (MLA: 4 * 10)."""
    return 4 * config.kv_cache_row
PAGES_PER_DEVICE = 32


@functools.lru_cache(maxsize=None)
def model(name: str, seed: int):
    config = ModelConfig.from_hf_dict(CONFIGS[name])
    kv, ffn = init_random_params(config, jax.random.key(seed), jnp.float32)
    kv, ffn = jax.tree_util.tree_map_with_path(_larger_biases, (kv, ffn))
    return config, kv, ffn


def _larger_biases(path, leaf):
    """Biases (0.02 * N(0, 1) from the init) and sinks ten times larger: dropping one shows."""
    return leaf * 10 if str(path[-1].key).startswith(("b", "sinks", "router_bias", "score_bias")) else leaf


@dataclasses.dataclass
class Chunk:
    """What `build_step_inputs` reads from a scheduled chunk."""

    token_ids: np.ndarray
    start: int
    page_table: np.ndarray       # [L, blocks] local page ids

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclasses.dataclass
class Seq:
    device: int
    tokens: list
    page_table: np.ndarray
    computed: int = 0


def make_seqs(rng: np.random.Generator, n_kv: int, num_layers: int, vocab: int, *, max_seqs: int = 3,
              G: int = 4, blocks: int = 4, empty_device: bool = False) -> list[Seq]:
    """1..max_seqs sequences per KV device with random prompts and shuffled local pages.

    Device 0 always gets a short prompt (2..5 tokens: a decode by the second step of
    5-token chunks) and a long one (6..9: still prefilling then), so every test sees
    decodes and prefill chunks mixed in one step whatever the seed.
    """
    seqs = []
    for d in range(n_kv):
        if empty_device and d == n_kv - 1:
            continue
        perm = rng.permutation(PAGES_PER_DEVICE)
        count = max(2, int(rng.integers(1, max_seqs + 1))) if d == 0 else int(rng.integers(1, max_seqs + 1))
        for j in range(count):
            n = int(rng.integers(2, 6)) if (d, j) == (0, 0) else (
                int(rng.integers(6, 10)) if (d, j) == (0, 1) else int(rng.integers(2, 10)))
            table = perm[j * num_layers * blocks:(j + 1) * num_layers * blocks].reshape(num_layers, blocks)
            seqs.append(Seq(d, [int(t) for t in rng.integers(0, vocab, n)], table))
    return seqs


def next_chunks(seqs: list[Seq], n_kv: int, max_chunk: int) -> tuple[list, list]:
    """This step's chunk of every sequence (at most max_chunk new tokens: chunked prefill)."""
    chunks, owners = [[] for _ in range(n_kv)], [[] for _ in range(n_kv)]
    for s in seqs:
        end = min(len(s.tokens), s.computed + max_chunk)
        chunks[s.device].append(Chunk(np.array(s.tokens[s.computed:end], np.int32), s.computed, s.page_table))
        owners[s.device].append((s, end))
    return chunks, owners


REF_TOKENS = 256                   # every reference call has this length: one compile per model


def reference_last_logits(config, kv, ffn, prefixes):
    """dense_logits of each prefix's last token, all prefixes packed in one padded call."""
    tokens = np.zeros(REF_TOKENS, np.int32)
    segments = np.full(REF_TOKENS, -1, np.int32)
    positions = np.zeros(REF_TOKENS, np.int32)
    last, at = [], 0
    for i, p in enumerate(prefixes):
        tokens[at:at + len(p)], segments[at:at + len(p)] = p, i
        positions[at:at + len(p)] = np.arange(len(p))
        at += len(p)
        last.append(at - 1)
    assert at <= REF_TOKENS
    out = dense_logits(kv, ffn, config, jnp.asarray(tokens), jnp.asarray(segments), jnp.asarray(positions))
    return np.asarray(out)[last]


def check_and_advance(logits, owners, logit_rows, rng, config, kv, ffn) -> float:
    """Relative error of a disagg step's last-token logits against the dense forward; then
    mark each chunk computed and append a random next token to sequences that finished
    their prompt (the next step decodes it)."""
    logits = np.asarray(logits)
    got, prefixes = [], []
    for d, per_device in enumerate(owners):
        for (s, end), row in zip(per_device, logit_rows[d]):
            got.append(logits[d, row])
            prefixes.append(s.tokens[:end])
            s.computed = end
            if end == len(s.tokens):
                s.tokens.append(int(rng.integers(0, config.vocab_size)))
    want = reference_last_logits(config, kv, ffn, prefixes)
    return float(np.abs(np.stack(got) - want).max() / np.abs(want).max())
