"""Random-weight models of realistic layer shapes, for benchmarks (no checkpoint files).

`random_model_dirs(["qwen3moe-30b-a3b-4l"])` writes a folder with a config.json and a
`RANDOM_WEIGHTS` marker; the engine's registry initialises such a model's parameters
randomly on the device instead of reading safetensors.
"""
from __future__ import annotations

import json
import os
import tempfile

RANDOM_WEIGHTS_MARKER = "RANDOM_WEIGHTS"

# Real models' layer shapes with fewer layers (the layer count is in the name).
SHAPES = {
    "mixtral-8x7b-2l": {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": 32000,
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 2, "num_attention_heads": 32,
        "num_key_value_heads": 8, "num_local_experts": 8, "num_experts_per_tok": 2, "rope_theta": 1e6,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "tie_word_embeddings": False},
    "qwen3moe-30b-a3b-4l": {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 151936,
        "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 4,
        "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
        "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "rope_theta": 1e6, "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "tie_word_embeddings": False},
    "olmoe-1b-7b-4l": {
        "architectures": ["OlmoeForCausalLM"], "model_type": "olmoe", "vocab_size": 50304,
        "hidden_size": 2048, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 16,
        "num_key_value_heads": 16, "num_experts": 64, "num_experts_per_tok": 8, "norm_topk_prob": False,
        "rope_theta": 10000.0, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False},
    # DeepSeek-V2-Lite (MLA: latent 512 + rope key 64 cached per token and layer; no q LoRA;
    # layer 0 dense, then 64 routed experts top-6 + 2 shared; YaRN x40 with mscale), all 27 layers
    "deepseek-v2-lite-27l": {
        "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "vocab_size": 102400,
        "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 27,
        "num_attention_heads": 16, "num_key_value_heads": 16, "n_routed_experts": 64, "n_shared_experts": 2,
        "num_experts_per_tok": 6, "first_k_dense_replace": 1, "kv_lora_rank": 512, "q_lora_rank": None,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "topk_method": "greedy",
        "n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0, "norm_topk_prob": False,
        "rope_theta": 10000.0, "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                                                "beta_fast": 32, "beta_slow": 1, "mscale": 0.707,
                                                "mscale_all_dim": 0.707},
        "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "tie_word_embeddings": False},
    # GLM-4.7-Flash (MLA with a q LoRA; DeepSeek-V3 routing: sigmoid, choice bias, top-4 of 64
    # + 1 shared, scaled 1.8; layer 0 dense), all 47 layers
    "glm-4.7-flash-47l": {
        "architectures": ["Glm4MoeLiteForCausalLM"], "model_type": "glm4_moe_lite", "vocab_size": 154880,
        "hidden_size": 2048, "intermediate_size": 10240, "moe_intermediate_size": 1536, "num_hidden_layers": 47,
        "num_attention_heads": 20, "num_key_value_heads": 20, "n_routed_experts": 64, "n_shared_experts": 1,
        "num_experts_per_tok": 4, "kv_lora_rank": 512, "q_lora_rank": 768, "qk_nope_head_dim": 192,
        "qk_rope_head_dim": 64, "v_head_dim": 256, "n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.8,
        "norm_topk_prob": True, "rope_interleave": True, "rope_theta": 1000000.0,
        "max_position_embeddings": 202752, "rms_norm_eps": 1e-5, "tie_word_embeddings": False},
    # GPT-OSS-20B (sinks, sliding window 128 on every other layer, biased experts with the
    # clamped SwiGLU, YaRN x32), all 24 layers; its experts dequantised (the engine runs bf16)
    "gpt-oss-20b-24l": {
        "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "vocab_size": 201088,
        "hidden_size": 2880, "intermediate_size": 2880, "num_hidden_layers": 24, "num_attention_heads": 64,
        "num_key_value_heads": 8, "head_dim": 64, "num_local_experts": 32, "num_experts_per_tok": 4,
        "sliding_window": 128, "layer_types": ["sliding_attention", "full_attention"] * 12, "attention_bias": True,
        "swiglu_limit": 7.0, "rope_parameters": {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0,
                                                 "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                                                 "original_max_position_embeddings": 4096},
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "tie_word_embeddings": False},
    "qwen3moe-mini-2l": {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 4096,
        "hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 32, "num_experts": 16,
        "num_experts_per_tok": 4, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "rope_theta": 1e6, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "tie_word_embeddings": False},
}


def shape_config(name: str) -> dict:
    """The HF config of a shape name: a key of SHAPES, or `KEY:N` for that shape with N layers
    (e.g. "qwen3moe-30b-a3b-4l:48", the full model's layer count; per-layer lists such as
    `layer_types` repeat their pattern)."""
    base, _, layers = name.partition(":")
    if base not in SHAPES:
        raise ValueError(f"unknown random model shape {base!r}; known: {sorted(SHAPES)} (KEY or KEY:LAYERS)")
    config = dict(SHAPES[base])
    if layers:
        if not layers.isdigit() or int(layers) < 1:
            raise ValueError(f"random model shape {name!r}: the layer count after ':' must be a positive integer")
        n = int(layers)
        config["num_hidden_layers"] = n
        if "layer_types" in config:
            pattern = config["layer_types"]
            config["layer_types"] = [pattern[i % len(pattern)] for i in range(n)]
    return config


def random_model_dirs(names, root: str | None = None) -> dict:
    """Write a config-only folder per name (see `shape_config`); returns {name: folder}."""
    root = root or tempfile.mkdtemp(prefix="crosspool-random-")
    out = {}
    for name in names:
        config = shape_config(name)
        folder = os.path.join(root, name.replace(":", "-x"))
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(config, f, indent=1)
        with open(os.path.join(folder, RANDOM_WEIGHTS_MARKER), "w") as f:
            f.write("parameters are initialised randomly by the engine (benchmark model)\n")
        out[name] = folder
    return out
