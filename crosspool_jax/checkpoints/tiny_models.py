"""Tiny random Hugging Face models of every supported family, written with `save_pretrained`.

Used by scripts/make_checkpoints.py (the shipped models) and by the tests (golden checks
against transformers). Needs torch and transformers (the test extra); imported lazily so the
package itself does not depend on them. Weights are drawn from a seeded torch generator with
a larger spread than the HF init (std 0.02 makes every logit near zero and every routing
decision a near-tie), and norm weights are perturbed away from 1, so a wrong mapping shows.
"""
from __future__ import annotations

from typing import Any

# family -> (transformers config class name, defaults for a ~2-layer model)
_BASE = dict(vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6)
FAMILIES = {
    "mixtral": ("MixtralConfig", dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(intermediate_size=48, moe_intermediate_size=16,
                                         shared_expert_intermediate_size=24, num_experts=4,
                                         num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(intermediate_size=48, moe_intermediate_size=16, num_experts=4,
                                         num_experts_per_tok=2, head_dim=16)),
    "olmoe": ("OlmoeConfig", dict(intermediate_size=16, num_experts=4, num_experts_per_tok=2)),
    "llama": ("LlamaConfig", dict(intermediate_size=48)),
    "qwen3": ("Qwen3Config", dict(intermediate_size=48, head_dim=16)),
    # MLA with the query LoRA, a dense first layer, 8 experts in 4 groups (best 2), a shared
    # expert, scaled routing; every geometry distinct (latent 16, rope 4, nope 8, v 12)
    "deepseek_v2": ("DeepseekV2Config", dict(
        num_key_value_heads=4, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24,
        qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=12, topk_method="group_limited_greedy", n_group=4,
        topk_group=2, routed_scaling_factor=1.5)),
    # MLA with DeepSeek-V3 routing: sigmoid scores, a learnt choice bias (randomized below),
    # 8 experts in 4 groups scored by their two best (best 2 kept), renormalised, scaled
    "glm4_moe_lite": ("Glm4MoeLiteConfig", dict(
        num_key_value_heads=4, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
        num_experts_per_tok=3, n_shared_experts=1, kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=8,
        qk_rope_head_dim=4, v_head_dim=12, n_group=4, topk_group=2, routed_scaling_factor=1.8,
        norm_topk_prob=True)),
    "deepseek_v3": ("DeepseekV3Config", dict(
        num_key_value_heads=4, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24,
        qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=12, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, norm_topk_prob=True)),
    # GLM-4.5: GQA with q/k/v biases, per-head q/k norms, RoPE on half of each head (the first 8
    # of 16 dims), a dense first layer, DeepSeek-V3 routing (8 experts in 4 groups, best 2)
    "glm4_moe": ("Glm4MoeConfig", dict(
        head_dim=16, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
        n_shared_experts=1, first_k_dense_replace=1, n_group=4, topk_group=2, routed_scaling_factor=1.7,
        norm_topk_prob=True, use_qk_norm=True, attention_bias=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})),
    # sliding (window 5) / full layers alternating, sinks, q/k/v/o biases, router and expert
    # biases, a SwiGLU limit low enough to clamp, YaRN past a pretraining length of 16
    "gpt_oss": ("GptOssConfig", dict(
        head_dim=16, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2, sliding_window=5,
        num_hidden_layers=3, swiglu_limit=0.3,
        rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 32.0,
                         "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 16})),
}


def build_hf_config(family: str, **overrides) -> Any:
    """A transformers config object for `family` with the tiny defaults, then `overrides`."""
    import transformers
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    cls_name, defaults = FAMILIES[family]
    kwargs = {**_BASE, **defaults, **overrides}
    if family == "olmoe":
        kwargs.setdefault("pad_token_id", None)
        kwargs.setdefault("eos_token_id", kwargs["vocab_size"] - 1)
        kwargs.setdefault("bos_token_id", None)
    return getattr(transformers, cls_name)(**kwargs)


def randomize_(model, seed: int, *, std: float = 0.1, norm_std: float = 0.2) -> None:
    """Overwrite every parameter in place from a seeded generator (norms around 1), and the
    learnt buffers a checkpoint carries (DeepSeek-V3's e_score_correction_bias)."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    learnt = [(n, b) for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")]
    with torch.no_grad():
        for name, p in sorted(list(model.named_parameters()) + learnt, key=lambda kv: kv[0]):
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if "norm" in name:
                value = 1.0 + norm_std * noise
            else:
                value = std * noise
            p.copy_(value.to(p.dtype))


def make_tiny_hf_model(family: str, out_dir: str, *, seed: int = 0, dtype: str = "float32",
                       max_shard_size=None, **overrides):
    """Build, randomize and `save_pretrained` a tiny model; returns the torch model (float32)."""
    import torch
    import transformers
    config = build_hf_config(family, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize_(model, seed)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.eval()
    to_save = model if dtype == "float32" else model.to(getattr(torch, dtype))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size is not None else {}
    to_save.save_pretrained(out_dir, **kwargs)
    return model.to(torch.float32)


def transformers_greedy(path: str, ids, max_new: int) -> list:
    """transformers' float32 greedy `generate` of max_new tokens after `ids` (no EOS stop): the
    engine tests' reference."""
    import torch
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([list(ids)]), max_new_tokens=max_new, do_sample=False, eos_token_id=None,
                             pad_token_id=0, attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out[0, len(ids):].tolist()


# ----- tokenizer for the tiny models -----
BOS_TOKEN, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (BOS_TOKEN, IM_START, IM_END)
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def train_byte_bpe(texts, vocab_size: int = 1024):
    """A byte-level BPE `tokenizers.Tokenizer` trained on `texts` (deterministic for fixed input),
    with the ChatML special tokens first (ids 0, 1, 2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer=trainer)
    return tok


def write_tokenizer_files(folder: str, tok, *, chat_template: str = CHATML_TEMPLATE) -> dict:
    """tokenizer.json + tokenizer_config.json (ChatML template, bos/eos); returns the special ids."""
    import json
    import os
    tok.save(os.path.join(folder, "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS_TOKEN, "eos_token": IM_END,
           "pad_token": BOS_TOKEN, "unk_token": None, "add_bos_token": False, "add_eos_token": False,
           "model_max_length": 4096, "clean_up_tokenization_spaces": False,
           "chat_template": chat_template}
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    return {"bos_token_id": tok.token_to_id(BOS_TOKEN), "eos_token_id": tok.token_to_id(IM_END),
            "pad_token_id": tok.token_to_id(BOS_TOKEN)}
