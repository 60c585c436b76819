"""A decode step reads every weight matrix in place: no slice of a stacked weight is left in
the lowered program (issue 18: on a GPU, XLA copies a layer's slice of a scanned stack before
the matmul reads it, four copies per layer for the q/k/v/o projections).

The placed step's forward (`runtime.step_program._forward_logits`) is lowered for CUDA on this
CPU (`lowering_platforms=("cuda",)`: the Pallas Triton lowering runs in Python, no GPU needed)
with the kernel backend, and its StableHLO is searched for slicing ops (dynamic_slice, slice,
gather) whose operand is a weight stack ([L, K, N], [L, E, K, N]) or its rows view ([L*K, N],
[L*E*K, N], what `ExpertRows` hands the kernels). The reference backend of the same program
slices them (the check can fail). Stacks the kernels cannot tile (a dim not a multiple of 16:
Qwen2-MoE's one-column shared-expert gate) stay on XLA's dot and are left out.
"""
import math
import re

import jax
import jax.numpy as jnp
import pytest

from crosspool_jax.models import ModelConfig, init_random_params
from crosspool_jax.models.transformer import reads_in_place
from crosspool_jax.runtime.shapes import StepShape
from crosspool_jax.runtime.step_inputs import build_step_inputs
from crosspool_jax.runtime.step_program import _forward_logits

_COMMON = {"vocab_size": 80, "hidden_size": 48, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
           "rope_theta": 1e4, "rms_norm_eps": 1e-6, "tie_word_embeddings": False}
CONFIGS = {
    # every layer MoE: one layer scan
    "qwen3_moe": {**_COMMON, "architectures": ["Qwen3MoeForCausalLM"], "moe_intermediate_size": 32,
                  "num_hidden_layers": 3, "num_experts": 16, "num_experts_per_tok": 2, "norm_topk_prob": True},
    # a dense layer among MoE layers (the layers unrolled), a shared expert with its gate
    "qwen2_moe_dense": {**_COMMON, "architectures": ["Qwen2MoeForCausalLM"], "moe_intermediate_size": 32,
                        "shared_expert_intermediate_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
                        "mlp_only_layers": [1], "num_experts": 16, "num_experts_per_tok": 2,
                        "norm_topk_prob": False},
}
P, G = 32, 4                                   # pool pages, tokens per page
_SLICING = re.compile(r"stablehlo\.(?:dynamic_slice|slice|gather)\b.*?: \(tensor<([0-9x]+)x[a-z0-9]+>")


def _weight_shapes(kv, ffn) -> set:
    """The in-place stacks' shapes (`reads_in_place`: the stacks the kernels tile) and their rows views."""
    shapes = set()
    for path, a in jax.tree_util.tree_flatten_with_path((kv, ffn))[0]:
        if not reads_in_place(str(path[-1].key), a.shape):
            continue
        shapes.add(tuple(a.shape))
        shapes.add((math.prod(a.shape[:-1]), a.shape[-1]))
    return shapes


def _lowered(config_name: str, moe_backend: str) -> tuple[str, dict, dict]:
    """The placed forward of `config_name` lowered for CUDA: (StableHLO text, kv, ffn params)."""
    c = ModelConfig.from_hf_dict(CONFIGS[config_name])
    kv, ffn = init_random_params(c, jax.random.key(0), jnp.bfloat16)
    k_buf = v_buf = jnp.zeros((P, G * c.num_kv_heads * c.head_dim), jnp.bfloat16)
    x, _ = build_step_inputs([], shape=StepShape(16, 8, 4), num_layers=c.num_layers, tokens_per_page=G, num_pages=P)
    forward = jax.jit(_forward_logits, static_argnums=(2, 13, 14))
    text = forward.trace(kv, ffn, c, k_buf, v_buf, x.token_ids_T, x.positions_T, x.slots_LT, x.page_indices_LSP,
                         x.kv_lens_S, x.cu_q_lens_S1, x.num_seqs_1, x.logits_indices_S, "reference",
                         moe_backend).lower(lowering_platforms=("cuda",)).as_text()
    return text, kv, ffn


def _weight_slices(config_name: str, moe_backend: str) -> list[str]:
    text, kv, ffn = _lowered(config_name, moe_backend)
    weights = _weight_shapes(kv, ffn)
    return [line.strip() for line in text.splitlines()
            if (m := _SLICING.search(line)) and tuple(int(d) for d in m.group(1).split("x")) in weights]


@pytest.mark.parametrize("config_name", sorted(CONFIGS))
def test_the_kernel_backend_slices_no_weight_stack(config_name):
    assert _weight_slices(config_name, "gpu") == []


@pytest.mark.parametrize("config_name", sorted(CONFIGS))
def test_the_reference_backend_slices_every_layer_of_each_stack(config_name):
    """The positive control: XLA's path slices the projections, router and FFN matrices."""
    slices = _weight_slices(config_name, "reference")
    assert len(slices) >= 7, slices     # q, k, v, o, router, the experts' w1 and w2 (a scan body slices each once)


def test_q_k_and_v_are_one_kernel_launch():
    """A Qwen3-MoE layer (one scan body) runs three matmul kernels: q|k|v side by side, o and
    the router (issue 18: fewer launches per layer), beside the MoE's four."""
    text, _, _ = _lowered("qwen3_moe", "gpu")
    kernels = re.findall(r'name = "(crosspool_[a-z_]+)"', text)
    assert kernels.count("crosspool_layer_matmul") == 3, kernels
    assert sorted(set(kernels) - {"crosspool_layer_matmul"}) == ["crosspool_gmm", "crosspool_moe_combine",
                                                                  "crosspool_moe_gate_up", "crosspool_moe_route"]
