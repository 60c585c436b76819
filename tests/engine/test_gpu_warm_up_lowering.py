"""Every program the GPU warm-up compiles lowers for CUDA, checked on this CPU.

On a CPU the warm-up leaves the logprobs and prompt-logprobs variants out (`warm_up(variants=
None)`), and the kernels run the reference or interpret paths, so a program that only a GPU
builds could fail there first: the prompt-logprobs program of an engine with max_logprobs=0
did (an empty top-token reshape), 200 s into the first GPU run. Here the engine's own
`warm_up(variants=True)` runs with the GPU kernel backends, every job lowered with
`lowering_platforms=("cuda",)` instead of compiled (the Pallas Triton lowering runs in Python;
the PTX compile happens on the device): every shape of the menu, every sampling variant, the
multi-step decodes and the lane programs of two models of one architecture.
"""
from __future__ import annotations

import json
import os
import re

import pytest

from crosspool_jax import LLM
from crosspool_jax.engine import runner as runner_lib
from crosspool_jax.models.random_models import RANDOM_WEIGHTS_MARKER
from crosspool_jax.runtime import sampling_metadata

# small random-weight models whose dims the GPU kernels take (head dim 64, multiples of 16)
_COMMON = {"vocab_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "head_dim": 64, "rope_theta": 1e4, "rms_norm_eps": 1e-6, "max_position_embeddings": 4096,
           "tie_word_embeddings": False}
CONFIGS = {
    "qwen3": {**_COMMON, "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 128,
              "intermediate_size": 256, "moe_intermediate_size": 64, "num_experts": 16, "num_experts_per_tok": 4,
              "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": []},
    "mixtral": {**_COMMON, "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 256,
                "intermediate_size": 128, "num_local_experts": 8, "num_experts_per_tok": 2},
}


def _folder(root, name) -> str:
    folder = os.path.join(root, name)
    os.makedirs(folder)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(CONFIGS[name], f)
    with open(os.path.join(folder, RANDOM_WEIGHTS_MARKER), "w") as f:
        f.write("random weights\n")
    return folder


@pytest.mark.parametrize("max_logprobs", [0, 5])
def test_every_gpu_warm_up_program_lowers_for_cuda(monkeypatch, tmp_path, max_logprobs):
    lowered = []

    def lower(program, args, static):
        text = program.trace(*args, **static).lower(lowering_platforms=("cuda",)).as_text()
        lowered.append((program.__name__, static.get("num_logprobs"), text))

    monkeypatch.setattr(runner_lib, "_compile", lower)
    histories = []                       # the token-history programs (plain jnp, no kernel): counted only
    monkeypatch.setattr(sampling_metadata, "compile_token_history", lambda *a, **k: histories.append(a))
    qwen3, mixtral = _folder(tmp_path, "qwen3"), _folder(tmp_path, "mixtral")
    models = {"q0": qwen3, "q1": qwen3, "mx": mixtral}
    llm = LLM(models, dtype="bfloat16", kv_cache_dtype="bfloat16", attention_backend="gpu", moe_backend="gpu",
              max_logprobs=max_logprobs, max_lanes=2, max_decode_steps=4, max_num_batched_tokens=64,
              max_num_seqs=8, max_model_len=256, kv_pool_bytes=4 << 20)
    result = llm.engine.warm_up(variants=True, max_workers=2)
    assert result["programs"] == len(lowered) + len(histories) and lowered
    names = {name for name, _, _ in lowered}
    assert {"ragged_step", "multi_decode"} <= names
    # the prompt-logprobs programs (scored with the menu's top num_logprobs) are among them
    assert any(name == "ragged_step" and n == max_logprobs and "stablehlo.while" in text
               for name, n, text in lowered)
    for name, _, text in lowered:        # the kernels, not XLA's fallback, in every program
        calls = set(re.findall(r"custom_call @([\w$.]+)", text))
        assert any("triton" in c for c in calls), (name, calls)
