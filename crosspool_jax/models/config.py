"""`ModelConfig`: one frozen, hashable description of a supported model, read from config.json.

Owns the mapping from a Hugging Face `config.json` dict (old `rope_theta`/`rope_scaling` keys or
the newer `rope_parameters` dict) to the fields the forward pass needs, and the layer plan
(which layers run a MoE FFN and which a dense MLP).
"""
from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Optional

import numpy as np

from pallas_kernels.fused_moe.reference import ClampedSwiGLU, Routing

# architecture name in config.json -> family
SUPPORTED_ARCHITECTURES = {
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "OlmoeForCausalLM": "olmoe",
    "LlamaForCausalLM": "llama",
    "Qwen3ForCausalLM": "qwen3",
    "DeepseekV2ForCausalLM": "deepseek_v2",
    "DeepseekV3ForCausalLM": "deepseek_v3",
    "Glm4MoeLiteForCausalLM": "glm4_moe_lite",
    "Glm4MoeForCausalLM": "glm4_moe",
    "GptOssForCausalLM": "gpt_oss",
}
QK_NORMS = ("none", "per_head", "full")
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
MOE_ACTIVATIONS = ("silu", "clamped_swiglu")
_QK_NORM_OF_FAMILY = {"mixtral": "none", "qwen2_moe": "none", "qwen3_moe": "per_head",
                      "olmoe": "full", "llama": "none", "qwen3": "per_head", "deepseek_v2": "none",
                      "deepseek_v3": "none", "glm4_moe_lite": "none", "glm4_moe": "none", "gpt_oss": "none"}
_MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "glm4_moe_lite",
                 "glm4_moe", "gpt_oss")
_MLA_FAMILIES = ("deepseek_v2", "deepseek_v3", "glm4_moe_lite")
# the RMSNorm eps of MLA's q_a_layernorm and kv_a_layernorm (transformers builds them with
# the RMSNorm default, not the config's rms_norm_eps)
MLA_NORM_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static model description (hashable: usable as a jit static argument).

    rope_scaling is None or a sorted tuple of (key, value) pairs of the HF rope parameters
    other than rope_theta (e.g. (("factor", 8.0), ..., ("rope_type", "llama3"))); see
    `rope_scaling_dict`. sliding_window applies to every layer (None: full causal).

    Multi-head latent attention (MLA: DeepSeek-V2/V3, GLM-4.7-Flash; `is_mla`: kv_lora_rank > 0):
    queries from x (q_lora_rank 0) or through a LoRA of rank q_lora_rank; keys and values from one latent
    of kv_lora_rank values per token plus a shared rope key of qk_rope_head_dim; per head a
    no-rope part of qk_nope_head_dim for scores and v_head_dim for values. There head_dim is
    v_head_dim (the attention output per head), num_kv_heads = num_heads (as config.json
    says), and the KV pool caches only the latent and the rope key (`kv_cache_heads`,
    `kv_cache_head_dim`). rope_interleave: RoPE rotates the pairs (x0, x1), (x2, x3), ...
    (DeepSeek) instead of the two halves.

    Routing (MoE layers): router_scoring "softmax" or "sigmoid"; router_score_bias: a learnt
    per-expert bias added to the scores for the choice only (DeepSeek-V3's
    e_score_correction_bias); group-limited top-k over n_group equal groups of experts keeping
    the topk_group best (group score: "max" of its scores or "top2_sum" of its two best);
    routed_scaling_factor multiplies the routing weights. The shared expert has a sigmoid
    gate (Qwen2-MoE) unless shared_expert_gate is False (DeepSeek).

    GPT-OSS: attention_out_bias (the o projection's bias), attention_sinks (a learnt logit per
    head in every softmax denominator), sliding_window_layers (the layers the sliding window
    applies to; None: every layer), router_bias (added to the router logits), expert_bias
    (gate/up and down biases per expert), moe_activation "clamped_swiglu": (clip(up, -limit,
    limit) + 1) * g * sigmoid(swiglu_alpha * g), g = min(gate, limit).
    """

    architecture: str
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Optional[tuple] = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    sliding_window: Optional[int] = None
    attention_bias: bool = False
    qk_norm: str = "none"
    clip_qkv: Optional[float] = None
    num_experts: int = 0
    top_k: int = 0
    norm_topk_prob: bool = True
    moe_intermediate_size: int = 0
    intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple = ()
    bos_token_id: Optional[int] = None
    eos_token_ids: tuple = ()
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    rope_interleave: bool = False
    partial_rotary_factor: float = 1.0
    router_scoring: str = "softmax"
    router_score_bias: bool = False
    n_group: int = 1
    topk_group: int = 1
    group_score: str = "max"
    routed_scaling_factor: float = 1.0
    shared_expert_gate: bool = True
    attention_out_bias: bool = False
    attention_sinks: bool = False
    sliding_window_layers: Optional[tuple] = None
    router_bias: bool = False
    expert_bias: bool = False
    moe_activation: str = "silu"
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0

    def __post_init__(self):
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(_unsupported_message(self.architecture))
        if self.family != SUPPORTED_ARCHITECTURES[self.architecture]:
            raise ValueError(f"family {self.family!r} does not match architecture "
                             f"{self.architecture!r} (expected {SUPPORTED_ARCHITECTURES[self.architecture]!r})")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"ModelConfig.num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}")
        if not 0.0 < self.partial_rotary_factor <= 1.0 or self.rope_dim <= 0 or self.rope_dim % 2:
            raise ValueError(f"ModelConfig.partial_rotary_factor must be in (0, 1] and rotate an even number of "
                             f"dims, got {self.partial_rotary_factor} of head_dim {self.head_dim}")
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"ModelConfig.qk_norm must be one of {QK_NORMS}, got {self.qk_norm!r}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"ModelConfig.sliding_window must be None or positive, got {self.sliding_window}")
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling_dict.get("rope_type", "default")
            if rope_type not in ROPE_TYPES:
                raise ValueError(f"ModelConfig.rope_scaling: rope_type {rope_type!r} is not supported "
                                 f"(supported: {', '.join(ROPE_TYPES)})")
        if self.family in _MOE_FAMILIES:
            if self.num_experts <= 0 or not 0 < self.top_k <= self.num_experts:
                raise ValueError(f"ModelConfig: need 0 < top_k <= num_experts, got top_k={self.top_k}, "
                                 f"num_experts={self.num_experts}")
            if self.moe_intermediate_size <= 0:
                raise ValueError(f"ModelConfig.moe_intermediate_size must be positive, "
                                 f"got {self.moe_intermediate_size}")
        if self.is_mla:
            for name in ("qk_nope_head_dim", "qk_rope_head_dim"):
                if int(getattr(self, name)) <= 0:
                    raise ValueError(f"ModelConfig.{name} must be positive for MLA, got {getattr(self, name)!r}")
            if self.qk_rope_head_dim % 2 or self.kv_lora_rank % 2:
                raise ValueError(f"ModelConfig: MLA needs an even kv_lora_rank and qk_rope_head_dim (the cached "
                                 f"latent is split in two halves), got {self.kv_lora_rank} and {self.qk_rope_head_dim}")
            if self.q_lora_rank < 0:
                raise ValueError(f"ModelConfig.q_lora_rank must be >= 0, got {self.q_lora_rank}")
        if self.moe_activation not in MOE_ACTIVATIONS:
            raise ValueError(f"ModelConfig.moe_activation must be one of {MOE_ACTIVATIONS}, got {self.moe_activation!r}")
        if self.sliding_window_layers is not None and not all(
                0 <= l < self.num_layers for l in self.sliding_window_layers):
            raise ValueError(f"ModelConfig.sliding_window_layers must be layer indices in [0, {self.num_layers}), "
                             f"got {self.sliding_window_layers}")
        self.routing                                     # Routing validates scoring and groups
        if self.num_experts and (self.num_experts % self.n_group
                                 or self.top_k > self.topk_group * (self.num_experts // self.n_group)):
            raise ValueError(f"ModelConfig: {self.num_experts} experts must split into n_group={self.n_group} "
                             f"equal groups whose best topk_group={self.topk_group} hold at least top_k="
                             f"{self.top_k} experts")
        if self.decoder_sparse_step <= 0:
            raise ValueError(f"ModelConfig.decoder_sparse_step must be positive, got {self.decoder_sparse_step}")
        if self.num_layers_of_kind("dense") and self.intermediate_size <= 0:
            raise ValueError(f"ModelConfig.intermediate_size must be positive when there are dense layers, "
                             f"got {self.intermediate_size}")

    # ----- derived -----
    @property
    def rope_scaling_dict(self) -> dict:
        return dict(self.rope_scaling or ())

    @property
    def is_moe(self) -> bool:
        return any(self.ffn_kind(l) == "moe" for l in range(self.num_layers))

    @property
    def q_size(self) -> int:
        """N*H: the attention output's width (the o projection's input)."""
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def qk_head_dim(self) -> int:
        """Per-head dim of the scores' q.k (MLA: nope + rope; else head_dim)."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.is_mla else self.head_dim

    @property
    def rope_dim(self) -> int:
        """Dims RoPE rotates per head, the first ones (MLA: the rope part only; GLM-4.5:
        partial_rotary_factor of head_dim, the rest passes through)."""
        return self.qk_rope_head_dim if self.is_mla else int(self.head_dim * self.partial_rotary_factor)

    @property
    def kv_cache_heads(self) -> int:
        """Heads of one token's row in each of the pool's K and V buffers (MLA: 1)."""
        return 1 if self.is_mla else self.num_kv_heads

    @property
    def kv_cache_head_dim(self) -> int:
        """Head dim of one token's row in each of the pool's K and V buffers. MLA caches the
        latent and the rope key, kv_lora_rank + qk_rope_head_dim values, split in two halves:
        the first in the K buffer, the second in the V buffer (no per-head K/V, no empty half)."""
        return (self.kv_lora_rank + self.qk_rope_head_dim) // 2 if self.is_mla else self.head_dim

    @property
    def kv_cache_row(self) -> int:
        """Elements of one token of one layer in the K buffer (the V buffer holds as many)."""
        return self.kv_cache_heads * self.kv_cache_head_dim

    @property
    def routing(self) -> Routing:
        """The MoE routing rule beyond top_k and renormalisation, as `fused_moe` takes it."""
        return Routing(scoring=self.router_scoring, num_groups=self.n_group, topk_groups=self.topk_group,
                       group_score=self.group_score, scale=self.routed_scaling_factor)

    @property
    def expert_activation(self):
        """The experts' gated activation as `fused_moe` takes it ("silu" or a `ClampedSwiGLU`)."""
        if self.moe_activation == "clamped_swiglu":
            return ClampedSwiGLU(alpha=self.swiglu_alpha, limit=self.swiglu_limit)
        return self.moe_activation

    def layer_sliding_window(self, l: int) -> Optional[int]:
        """The sliding window of layer l (None: full causal attention)."""
        if self.sliding_window_layers is None or l in self.sliding_window_layers:
            return self.sliding_window
        return None

    @property
    def attention_scale(self) -> float:
        """The softmax scale of q.k: qk_head_dim ** -0.5, times YaRN's mscale(mscale_all_dim)
        squared for MLA with a scaled RoPE (as transformers' `yarn_apply_mscale`)."""
        scale = self.qk_head_dim ** -0.5
        scaling = self.rope_scaling_dict
        if self.is_mla and scaling.get("rope_type", "default") != "default" and scaling.get("mscale_all_dim"):
            factor = float(scaling["factor"])
            m = 1.0 if factor <= 1 else 0.1 * float(scaling["mscale_all_dim"]) * np.log(factor) + 1.0
            scale *= m * m
        return float(scale)

    @functools.cached_property
    def _ffn_plan(self) -> tuple[tuple[str, ...], tuple[int, ...]]:
        """(kind of each layer, its index within its kind's stack): built once, in O(layers)."""
        kinds, indices, counts = [], [], {"moe": 0, "dense": 0}
        only = set(self.mlp_only_layers)
        for l in range(self.num_layers):
            moe = self.family in _MOE_FAMILIES and l not in only and not (l + 1) % self.decoder_sparse_step
            kind = "moe" if moe else "dense"
            kinds.append(kind)
            indices.append(counts[kind])
            counts[kind] += 1
        return tuple(kinds), tuple(indices)

    def ffn_kind(self, l: int) -> str:
        """"moe" or "dense" for layer l (Qwen's mlp_only_layers / decoder_sparse_step rule)."""
        if not 0 <= l < self.num_layers:
            raise ValueError(f"layer index {l} out of range [0, {self.num_layers})")
        return self._ffn_plan[0][l]

    def ffn_index(self, l: int) -> int:
        """Index of layer l within the stack of its FFN kind."""
        self.ffn_kind(l)
        return self._ffn_plan[1][l]

    def num_layers_of_kind(self, kind: str) -> int:
        return self._ffn_plan[0].count(kind)

    @property
    def ffn_kinds(self) -> tuple:
        """The FFN kinds present, in a fixed order ("moe" before "dense")."""
        return tuple(k for k in ("moe", "dense") if self.num_layers_of_kind(k))

    def kv_bytes_per_token_per_layer(self, dtype) -> int:
        """Bytes of one token of one layer in the K buffer: kv_cache_row * itemsize.

        The V buffer holds as many, so one token of one layer costs twice this in the KV pool
        (per-head K/V: 2 * K * H values; MLA: kv_lora_rank + qk_rope_head_dim values).
        """
        return self.kv_cache_row * np.dtype(dtype).itemsize

    # ----- construction -----
    @classmethod
    def from_hf_dict(cls, d: dict) -> "ModelConfig":
        """Build from a Hugging Face config.json dict; ValueError on anything unsupported."""
        archs = d.get("architectures") or []
        if isinstance(archs, str) or not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
            raise ValueError(f"config.json field 'architectures' must be a list of names, e.g. "
                             f"[\"MixtralForCausalLM\"], got {archs!r}")
        if not archs:
            raise ValueError("config.json has no 'architectures' entry; " + _supported_list())
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(_unsupported_message(arch))
        family = SUPPORTED_ARCHITECTURES[arch]

        def req(key, *alts):
            for k in (key,) + alts:
                if d.get(k) is not None:
                    return _number(d, k, int)
            raise ValueError(f"config.json for {arch} is missing required field {key!r}")

        def opt(key, default, kind=int):
            return default if d.get(key) is None else _number(d, key, kind)

        hidden = req("hidden_size")
        num_heads = req("num_attention_heads")
        if num_heads <= 0:
            raise ValueError(f"config.json field 'num_attention_heads' must be positive, got {num_heads}")
        head_dim = opt("head_dim", 0) if family != "olmoe" else 0
        head_dim = head_dim or hidden // num_heads
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config.json hidden_act {d.get('hidden_act')!r} is not supported (only 'silu')")
        rope_theta, rope_scaling, partial_rotary = _rope_from_hf(d, arch)
        eos = d.get("eos_token_id")
        eos_list = eos if isinstance(eos, list) else ([] if eos is None else [eos])
        eos_ids = tuple(_number({"eos_token_id": e}, "eos_token_id", int) for e in eos_list)
        kw = dict(
            architecture=arch, family=family,
            vocab_size=req("vocab_size"), hidden_size=hidden,
            num_layers=req("num_hidden_layers"), num_heads=num_heads,
            num_kv_heads=opt("num_key_value_heads", 0) or num_heads, head_dim=head_dim,
            rms_norm_eps=opt("rms_norm_eps", 1e-6, float), rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=opt("max_position_embeddings", 4096),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            sliding_window=_sliding_window_from_hf(d, family, arch),
            attention_bias=bool(d.get("qkv_bias", True) if family == "qwen2_moe"
                                else d.get("attention_bias", False)),
            qk_norm="per_head" if family == "glm4_moe" and d.get("use_qk_norm") else _QK_NORM_OF_FAMILY[family],
            partial_rotary_factor=partial_rotary,
            clip_qkv=opt("clip_qkv", None, float),
            intermediate_size=opt("intermediate_size", 0),
            bos_token_id=opt("bos_token_id", None),
            eos_token_ids=eos_ids,
        )
        if family == "llama" and d.get("mlp_bias"):
            raise ValueError("config.json: LlamaForCausalLM with mlp_bias=true is not supported")
        if family == "gpt_oss":
            kw.update(attention_out_bias=kw["attention_bias"], attention_sinks=True,
                      sliding_window_layers=_sliding_layers(d, arch))
        if family in _MLA_FAMILIES:
            kw.update(head_dim=req("v_head_dim"), q_lora_rank=opt("q_lora_rank", 0), kv_lora_rank=req("kv_lora_rank"),
                      qk_nope_head_dim=req("qk_nope_head_dim"), qk_rope_head_dim=req("qk_rope_head_dim"),
                      num_kv_heads=num_heads,
                      rope_interleave=family == "deepseek_v2" or bool(d.get("rope_interleave", True)))
        if family in _MOE_FAMILIES:
            kw.update(num_experts=int(req("num_local_experts", "num_experts", "n_routed_experts")),
                      top_k=int(req("num_experts_per_tok")))
            if family == "gpt_oss":
                kw.update(norm_topk_prob=True, moe_intermediate_size=int(req("intermediate_size")), intermediate_size=0,
                          router_bias=True, expert_bias=True, moe_activation="clamped_swiglu",
                          swiglu_alpha=opt("swiglu_alpha", 1.702, float), swiglu_limit=opt("swiglu_limit", 7.0, float))
            elif family == "deepseek_v2":
                kw.update(_deepseek_moe(d, arch, req, opt))
            elif family in ("deepseek_v3", "glm4_moe_lite", "glm4_moe"):
                kw.update(_deepseek_v3_moe(d, arch, req, opt, family))
            elif family == "mixtral":
                kw.update(norm_topk_prob=True, moe_intermediate_size=int(req("intermediate_size")))
            elif family == "olmoe":
                kw.update(norm_topk_prob=bool(d.get("norm_topk_prob", False)),
                          moe_intermediate_size=int(req("intermediate_size")), intermediate_size=0)
            else:
                kw.update(norm_topk_prob=bool(d.get("norm_topk_prob", False)),
                          moe_intermediate_size=int(req("moe_intermediate_size")),
                          decoder_sparse_step=opt("decoder_sparse_step", 0) or 1,
                          mlp_only_layers=tuple(sorted(_number({"mlp_only_layers": i}, "mlp_only_layers", int)
                                                       for i in d.get("mlp_only_layers") or ())))
                if family == "qwen2_moe":
                    kw["shared_expert_intermediate_size"] = opt("shared_expert_intermediate_size", 0)
        return cls(**kw)


def _sliding_layers(d: dict, arch: str) -> Optional[tuple]:
    """GPT-OSS's layer_types -> the indices of its "sliding_attention" layers (None: no list)."""
    types = d.get("layer_types")
    if types is None:
        return None
    if set(types) - {"sliding_attention", "full_attention"}:
        raise ValueError(f"config.json for {arch}: layer_types must be 'sliding_attention' or 'full_attention', "
                         f"got {sorted(set(types))}")
    return tuple(l for l, t in enumerate(types) if t == "sliding_attention")


def _deepseek_moe(d: dict, arch: str, req, opt) -> dict:
    """The MoE fields of DeepseekV2ForCausalLM, as transformers' DeepseekV2 classes read them:
    the first first_k_dense_replace layers dense, shared experts of n_shared_experts *
    moe_intermediate_size without a gate, softmax routing ("greedy" top-k or
    "group_limited_greedy": groups scored by their best expert), scaled by
    routed_scaling_factor and never renormalised (its router ignores norm_topk_prob)."""
    F = req("moe_intermediate_size")
    method = d.get("topk_method") or "greedy"
    if method == "greedy":
        groups = dict(n_group=1, topk_group=1)
    elif method == "group_limited_greedy":
        groups = dict(n_group=req("n_group"), topk_group=req("topk_group"))
    else:
        raise ValueError(f"config.json for {arch}: topk_method {method!r} is not supported "
                         f"(supported: 'greedy', 'group_limited_greedy')")
    return dict(norm_topk_prob=False, moe_intermediate_size=F,
                shared_expert_intermediate_size=F * opt("n_shared_experts", 0), shared_expert_gate=False,
                routed_scaling_factor=opt("routed_scaling_factor", 1.0, float), group_score="max",
                mlp_only_layers=tuple(range(opt("first_k_dense_replace", 0))), **groups)


def _deepseek_v3_moe(d: dict, arch: str, req, opt, family: str) -> dict:
    """The MoE fields of DeepseekV3ForCausalLM, Glm4MoeForCausalLM and Glm4MoeLiteForCausalLM
    (DeepSeek-V3 routing): sigmoid scores, e_score_correction_bias for the choice only, n_group
    groups scored by the sum of their two best, the topk_group best kept, norm_topk_prob,
    routed_scaling_factor; shared experts without a gate; dense layers: the first
    first_k_dense_replace (DeepSeek-V3: 3 by default, GLM-4.5: 1), GLM-4.7-Flash's
    mlp_layer_types "dense" entries (default: layer 0 only)."""
    F = req("moe_intermediate_size")
    L = req("num_hidden_layers")
    if family in ("deepseek_v3", "glm4_moe"):
        dense = tuple(range(opt("first_k_dense_replace", 3 if family == "deepseek_v3" else 1)))
    else:
        types = d.get("mlp_layer_types") or ["dense"] + ["sparse"] * (L - 1)
        if len(types) != L or set(types) - {"dense", "sparse"}:
            raise ValueError(f"config.json for {arch}: mlp_layer_types must list 'dense' or 'sparse' for each "
                             f"of the {L} layers, got {types!r}")
        dense = tuple(l for l, t in enumerate(types) if t == "dense")
    return dict(norm_topk_prob=bool(d.get("norm_topk_prob", True)), moe_intermediate_size=F,
                shared_expert_intermediate_size=F * opt("n_shared_experts", 0), shared_expert_gate=False,
                router_scoring="sigmoid", router_score_bias=True, group_score="top2_sum",
                n_group=opt("n_group", 1), topk_group=opt("topk_group", 1),
                routed_scaling_factor=opt("routed_scaling_factor", 1.0, float), mlp_only_layers=dense)


def _number(d: dict, key: str, kind):
    """config.json's d[key] as an int (kind=int: an integral number) or a float; ValueError naming it."""
    value = d[key]
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok and kind is int:
        ok = float(value).is_integer()
    if not ok:
        raise ValueError(f"config.json field {key!r} must be {'an integer' if kind is int else 'a number'}, "
                         f"got {value!r}")
    return kind(value)


def _supported_list() -> str:
    return "supported architectures: " + ", ".join(SUPPORTED_ARCHITECTURES)


def _unsupported_message(arch) -> str:
    return f"unsupported architecture {arch!r}; {_supported_list()}"


def _rope_from_hf(d: dict, arch: str):
    """(rope_theta, rope_scaling, partial_rotary_factor) from either the new `rope_parameters`
    or old keys (partial_rotary_factor: the rope dict's, else a top-level one, else 1)."""
    params = d.get("rope_parameters")
    if isinstance(params, dict) and params and not isinstance(next(iter(params.values())), dict):
        params = dict(params)
        theta = params.pop("rope_theta", d.get("rope_theta", 10000.0))
    else:
        if isinstance(params, dict) and params:
            raise ValueError(f"config.json for {arch}: per-layer-type rope_parameters are not supported")
        theta = d.get("rope_theta", 10000.0)
        params = dict(d.get("rope_scaling") or {})
    partial = params.pop("partial_rotary_factor", None)
    partial = float(d.get("partial_rotary_factor", 1.0) if partial is None else partial)
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    params.pop("type", None)
    rope_type = params.get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"config.json for {arch}: rope_type {rope_type!r} is not supported "
                         f"(supported: {', '.join(ROPE_TYPES)})")
    if rope_type == "default":
        return float(theta), None, partial
    if rope_type in ("llama3", "yarn"):
        # the pretraining length: a top-level original_max_position_embeddings wins (as in
        # transformers), else the rope dict's, else max_position_embeddings
        if "original_max_position_embeddings" in d:
            params["original_max_position_embeddings"] = int(d["original_max_position_embeddings"])
        params.setdefault("original_max_position_embeddings", int(d.get("max_position_embeddings", 8192)))
    if rope_type == "yarn" and params.get("factor") is None:
        params["factor"] = float(d.get("max_position_embeddings", 8192)) / params["original_max_position_embeddings"]
    return float(theta), tuple(sorted((str(k), _hashable(v)) for k, v in params.items())), partial


def _hashable(v):
    return tuple(v) if isinstance(v, list) else v


def _sliding_window_from_hf(d: dict, family: str, arch: str):
    window = d.get("sliding_window")
    if family in ("qwen2_moe", "qwen3_moe", "qwen3") and not d.get("use_sliding_window", False):
        window = None
    layer_types = d.get("layer_types")
    if layer_types and family in ("qwen2_moe", "qwen3"):
        kinds = set(layer_types)
        if kinds == {"full_attention"}:
            window = None
        elif kinds != {"sliding_attention"}:
            raise ValueError(f"config.json for {arch}: mixed sliding/full attention layers "
                             f"(layer_types) are not supported")
    if family == "llama" or not window:
        return None
    return int(window)
