"""Write the small shipped models into checkpoints/ (deterministic: same machine, same bytes).

    python scripts/make_checkpoints.py [--out checkpoints]

Each model is a Hugging Face folder made by transformers' `save_pretrained` from a seeded
random init (crosspool_jax.checkpoints.tiny_models), with a byte-level BPE tokenizer
(vocab 1024) trained on Python's own documentation text (`pydoc_data/topics.py` of the
stdlib, first 400,000 characters), a ChatML chat template and generation_config.json.
The weights are random: the models exist to exercise the engine, not to say anything.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import sysconfig

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from crosspool_jax.checkpoints.tiny_models import (make_tiny_hf_model, train_byte_bpe,  # noqa: E402
                                                   write_tokenizer_files)

TEXT_FILE = os.path.join("pydoc_data", "topics.py")
TEXT_CHARS = 400_000
VOCAB = 1024
# name -> (family, seed, dtype, max_shard_size, overrides)
MODELS = {
    "mixtral-tiny": ("mixtral", 1, "float32", None,
                     dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                          num_local_experts=8, num_experts_per_tok=2)),
    "qwen3-moe-tiny": ("qwen3_moe", 2, "float32", "800KB",
                       dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                            moe_intermediate_size=64, intermediate_size=128, num_experts=16,
                            num_experts_per_tok=4, norm_topk_prob=True, tie_word_embeddings=True)),
    "olmoe-tiny": ("olmoe", 3, "bfloat16", None,
                   dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=8, intermediate_size=64,
                        num_experts=16, num_experts_per_tok=4)),
    "qwen2-moe-tiny": ("qwen2_moe", 4, "float32", None,
                       dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, intermediate_size=128,
                            moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts=8,
                            num_experts_per_tok=2, num_hidden_layers=3, mlp_only_layers=[1])),
    # MLA: its cached row (latent 48 + rope key 16) splits into two halves of 32, which divide
    # the others' page size, so adding it keeps every model's tokens per page a power of two
    "deepseek-v2-tiny": ("deepseek_v2", 5, "float32", None,
                         dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, intermediate_size=128,
                              moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
                              n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=48, q_lora_rank=32,
                              qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16,
                              topk_method="group_limited_greedy", n_group=4, topk_group=2,
                              routed_scaling_factor=1.5)),
}


def training_text() -> list[str]:
    path = os.path.join(sysconfig.get_paths()["stdlib"], TEXT_FILE)
    with open(path, encoding="utf-8") as f:
        text = f.read()[:TEXT_CHARS]
    return [text[i:i + 2000] for i in range(0, len(text), 2000)]


def make_all(out: str) -> list[str]:
    tok = train_byte_bpe(training_text(), vocab_size=VOCAB)
    written = []
    for name, (family, seed, dtype, shard, overrides) in MODELS.items():
        folder = os.path.join(out, name)
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        special = write_tokenizer_files(folder, tok)
        make_tiny_hf_model(family, folder, seed=seed, dtype=dtype, max_shard_size=shard,
                           vocab_size=tok.get_vocab_size(), max_position_embeddings=4096,
                           bos_token_id=special["bos_token_id"], eos_token_id=special["eos_token_id"],
                           pad_token_id=special["pad_token_id"], **overrides)
        with open(os.path.join(folder, "generation_config.json"), "w") as f:
            json.dump({"bos_token_id": special["bos_token_id"], "eos_token_id": [special["eos_token_id"]],
                       "pad_token_id": special["pad_token_id"], "do_sample": False}, f, indent=1)
        written.append(folder)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), "checkpoints"))
    args = parser.parse_args()
    for folder in make_all(args.out):
        size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
        print(f"{folder}: {size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
