"""Hugging Face tensor names -> places in our param pytrees, one table per family.

A `Slot` says where one checkpoint tensor lands: the tree ("kv" or "ffn"), the path inside it
(e.g. ("attn", "wq_LDQ")), the leading indices (layer, or layer and expert), an optional
column range of the last axis (gate | up halves of w1), whether to transpose (HF linear
weights are [out, in]; ours are [in, out]) and whether the last axis alternates gate and up
(GPT-OSS's fused experts: it lands as [gate | up]).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from crosspool_jax.models.config import ModelConfig

# HF attention / norm names, shared by every family: suffix after "model.layers.{l}." -> leaf
_ATTN = {
    "input_layernorm.weight": ("input_norm_LD", False),
    "self_attn.q_proj.weight": ("wq_LDQ", True),
    "self_attn.k_proj.weight": ("wk_LDKH", True),
    "self_attn.v_proj.weight": ("wv_LDKH", True),
    "self_attn.o_proj.weight": ("wo_LQD", True),
}
_ATTN_BIAS = {
    "self_attn.q_proj.bias": ("bq_LQ", False),
    "self_attn.k_proj.bias": ("bk_LKH", False),
    "self_attn.v_proj.bias": ("bv_LKH", False),
}
_QK_NORM = {
    "per_head": {"self_attn.q_norm.weight": ("q_norm_LH", False),
                 "self_attn.k_norm.weight": ("k_norm_LH", False)},
    "full": {"self_attn.q_norm.weight": ("q_norm_LQ", False),
             "self_attn.k_norm.weight": ("k_norm_LKH", False)},
    "none": {},
}
# multi-head latent attention (DeepSeek-V2 family), without and with the query LoRA
_MLA = {
    "input_layernorm.weight": ("input_norm_LD", False),
    "self_attn.kv_a_proj_with_mqa.weight": ("wkv_a_LDRY", True),
    "self_attn.kv_a_layernorm.weight": ("kv_a_norm_LR", False),
    "self_attn.kv_b_proj.weight": ("wkv_b_LRNU", True),
    "self_attn.o_proj.weight": ("wo_LQD", True),
}
_MLA_Q = {"self_attn.q_proj.weight": ("wq_LDNI", True)}
_MLA_Q_LORA = {
    "self_attn.q_a_proj.weight": ("wq_a_LDA", True),
    "self_attn.q_a_layernorm.weight": ("q_a_norm_LA", False),
    "self_attn.q_b_proj.weight": ("wq_b_LANI", True),
}
_MLA_BIAS = {"self_attn.kv_a_proj_with_mqa.bias": ("bkv_a_LRY", False), "self_attn.o_proj.bias": ("bo_LD", False)}
_MLA_Q_LORA_BIAS = {"self_attn.q_a_proj.bias": ("bq_a_LA", False)}
# the shared expert's module name per family
_SHARED = {"qwen2_moe": "shared_expert", "deepseek_v2": "shared_experts", "deepseek_v3": "shared_experts",
           "glm4_moe_lite": "shared_experts", "glm4_moe": "shared_experts"}
# MoE tensors per family: (router, per-expert gate, up, down, prefix of the MoE block)
_MOE = {
    "mixtral": ("block_sparse_moe", "gate.weight", "w1.weight", "w3.weight", "w2.weight"),
    "qwen2_moe": ("mlp", "gate.weight", "gate_proj.weight", "up_proj.weight", "down_proj.weight"),
    "qwen3_moe": ("mlp", "gate.weight", "gate_proj.weight", "up_proj.weight", "down_proj.weight"),
    "olmoe": ("mlp", "gate.weight", "gate_proj.weight", "up_proj.weight", "down_proj.weight"),
    "deepseek_v2": ("mlp", "gate.weight", "gate_proj.weight", "up_proj.weight", "down_proj.weight"),
    "deepseek_v3": ("mlp", "gate.weight", "gate_proj.weight", "up_proj.weight", "down_proj.weight"),
    "glm4_moe_lite": ("mlp", "gate.weight", "gate_proj.weight", "up_proj.weight", "down_proj.weight"),
    "glm4_moe": ("mlp", "gate.weight", "gate_proj.weight", "up_proj.weight", "down_proj.weight"),
}
# tensors that may appear in older checkpoints and carry nothing we need
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class Slot:
    """Destination of one checkpoint tensor (see module docstring)."""

    tree: str                      # "kv" or "ffn"
    path: tuple                    # keys inside that tree
    index: tuple = ()              # leading indices into the stacked leaf
    cols: Optional[tuple] = None   # (start, stop) on the last axis
    transpose: bool = False
    interleaved: bool = False      # last axis gate0, up0, gate1, up1, ... -> [gate | up]


def tensor_slots(config: ModelConfig) -> dict[str, Slot]:
    """Every tensor name the checkpoint must hold -> its Slot."""
    c = config
    slots = {"model.embed_tokens.weight": Slot("kv", ("embed", "embedding_VD")),
             "model.norm.weight": Slot("kv", ("final", "norm_D"))}
    if not c.tie_word_embeddings:
        slots["lm_head.weight"] = Slot("kv", ("final", "lm_head_DV"), transpose=True)
    attn = _attention_names(c)
    for l in range(c.num_layers):
        pre = f"model.layers.{l}."
        for suffix, (leaf, transpose) in attn.items():
            slots[pre + suffix] = Slot("kv", ("attn", leaf), (l,), transpose=transpose)
        kind, i = c.ffn_kind(l), c.ffn_index(l)
        slots[pre + "post_attention_layernorm.weight"] = Slot("ffn", (kind, "norm_LD"), (i,))
        if kind == "dense":
            F = c.intermediate_size
            slots[pre + "mlp.gate_proj.weight"] = Slot("ffn", ("dense", "w1_LDF2"), (i,), (0, F), True)
            slots[pre + "mlp.up_proj.weight"] = Slot("ffn", ("dense", "w1_LDF2"), (i,), (F, 2 * F), True)
            slots[pre + "mlp.down_proj.weight"] = Slot("ffn", ("dense", "w2_LFD"), (i,), transpose=True)
            continue
        if c.family == "gpt_oss":
            slots.update(_gpt_oss_moe(pre, i))
            continue
        block, router, gate, up, down = _MOE[c.family]
        F = c.moe_intermediate_size
        slots[f"{pre}{block}.{router}"] = Slot("ffn", ("moe", "router_LDE"), (i,), transpose=True)
        for e in range(c.num_experts):
            ex = f"{pre}{block}.experts.{e}."
            slots[ex + gate] = Slot("ffn", ("moe", "w1_LEDF2"), (i, e), (0, F), True)
            slots[ex + up] = Slot("ffn", ("moe", "w1_LEDF2"), (i, e), (F, 2 * F), True)
            slots[ex + down] = Slot("ffn", ("moe", "w2_LEFD"), (i, e), transpose=True)
        if c.router_score_bias:
            slots[f"{pre}{block}.gate.e_score_correction_bias"] = Slot("ffn", ("moe", "score_bias_LE"), (i,))
        Fs = c.shared_expert_intermediate_size
        if Fs:
            sh = f"{pre}{block}.{_SHARED[c.family]}."
            slots[sh + "gate_proj.weight"] = Slot("ffn", ("moe", "shared_w1_LDF2"), (i,), (0, Fs), True)
            slots[sh + "up_proj.weight"] = Slot("ffn", ("moe", "shared_w1_LDF2"), (i,), (Fs, 2 * Fs), True)
            slots[sh + "down_proj.weight"] = Slot("ffn", ("moe", "shared_w2_LFD"), (i,), transpose=True)
            if c.shared_expert_gate:
                slots[f"{pre}{block}.shared_expert_gate.weight"] = Slot(
                    "ffn", ("moe", "shared_gate_LD1"), (i,), transpose=True)
    return slots


def _gpt_oss_moe(pre: str, i: int) -> dict[str, Slot]:
    """GPT-OSS's router (with bias) and fused experts: [E, D, 2F] gate/up interleaved, [E, F, D]
    down, and their biases (MXFP4 checkpoints hold blocks + scales, `checkpoints.mxfp4`)."""
    ex = f"{pre}mlp.experts."
    return {f"{pre}mlp.router.weight": Slot("ffn", ("moe", "router_LDE"), (i,), transpose=True),
            f"{pre}mlp.router.bias": Slot("ffn", ("moe", "router_bias_LE"), (i,)),
            ex + "gate_up_proj": Slot("ffn", ("moe", "w1_LEDF2"), (i,), interleaved=True),
            ex + "gate_up_proj_bias": Slot("ffn", ("moe", "b1_LEF2"), (i,), interleaved=True),
            ex + "down_proj": Slot("ffn", ("moe", "w2_LEFD"), (i,)),
            ex + "down_proj_bias": Slot("ffn", ("moe", "b2_LED"), (i,))}


def _attention_names(c: ModelConfig) -> dict:
    """HF attention suffix -> (leaf, transpose) for one layer of this model."""
    if c.is_mla:
        attn = {**_MLA, **(_MLA_Q_LORA if c.q_lora_rank else _MLA_Q)}
        if c.attention_bias:
            attn.update(_MLA_BIAS)
            if c.q_lora_rank:
                attn.update(_MLA_Q_LORA_BIAS)
        return attn
    attn = dict(_ATTN)
    if c.attention_bias:
        attn.update(_ATTN_BIAS)
    if c.attention_out_bias:
        attn["self_attn.o_proj.bias"] = ("bo_LD", False)
    if c.attention_sinks:
        attn["self_attn.sinks"] = ("sinks_LN", False)
    attn.update(_QK_NORM[c.qk_norm])
    return attn


def is_ignorable(name: str, config: ModelConfig) -> bool:
    """Tensors we skip without complaint: rotary buffers, a duplicate lm head when tied, the
    empty shared expert (and its gate) of a Qwen2-MoE saved with shared_expert_intermediate_size 0,
    and the multi-token-prediction layers DeepSeek-V3 and GLM-4.5 checkpoints store after the
    last layer (model.layers.{num_layers}... ; transformers skips them too)."""
    if name.endswith(IGNORED_SUFFIXES):
        return True
    if config.family in ("deepseek_v3", "glm4_moe") and name.startswith("model.layers."):
        layer = name.split(".")[2]
        if layer.isdigit() and int(layer) >= config.num_layers:
            return True
    if (config.family == "qwen2_moe" and not config.shared_expert_intermediate_size
            and (".mlp.shared_expert." in name or ".mlp.shared_expert_gate." in name)):
        return True
    return config.tie_word_embeddings and name == "lm_head.weight"
