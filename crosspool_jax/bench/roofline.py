"""The memory roofline of a decode step: the bytes it must read, and the time they take.

A decode step of B sequences reads every weight the step uses once (a step is memory bound
at small B): all attention-side matrices and norms, the router of every MoE layer, only the
experts the step's tokens route to, shared experts and dense FFN layers whole, the lm head
(or the tied embedding) whole, one embedding row per token, and each sequence's K/V cache.
`decode_step_bytes` counts them from the model's parameter shapes (`models.params`); the
experts touched come from the routing taken when the caller knows it, else from uniform
routing: E * (1 - (1 - k/E)^B) distinct experts per layer for B tokens of top-k of E
(`expected_distinct_experts`; random-weight benchmark models route about uniformly).
Divided by a copy ceiling measured in the same run it gives the step's floor time, and
tokens/s at the roofline = B / floor.
"""
from __future__ import annotations

import re
from typing import Optional

import jax
import numpy as np

from crosspool_jax.models.config import ModelConfig
from crosspool_jax.models.params import param_shapes


def expected_distinct_experts(num_experts: int, top_k: int, num_tokens: int) -> float:
    """Distinct experts B tokens reach when each picks top_k of E uniformly (independently)."""
    if num_experts <= 0 or num_tokens <= 0:
        return 0.0
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** num_tokens)


def _letters(name: str) -> list[str]:
    """The dimension letters of a leaf name ("w1_LEDF2" -> ["L", "E", "D", "F2"]), [] without."""
    suffix = name.rsplit("_", 1)[-1] if "_" in name else ""
    letters = re.findall(r"[A-Z][0-9]*", suffix)
    return letters if "".join(letters) == suffix else []


def decode_step_bytes(config: ModelConfig, *, batch: int, context: int, itemsize: int,
                      experts_touched: Optional[float] = None) -> dict:
    """Bytes one decode step of `batch` sequences, each with `context` tokens of K/V, must read
    (weights in `itemsize` bytes per element, the K/V cache too). experts_touched: distinct
    experts per MoE layer (default: `expected_distinct_experts`). Returns the parts and
    "total"."""
    kv_shapes, ffn_shapes = param_shapes(config)
    E = config.num_experts
    touched = (expected_distinct_experts(E, config.top_k, batch) if experts_touched is None
               else float(experts_touched))
    parts = {"attention": 0.0, "embedding_rows": 0.0, "lm_head": 0.0, "router_and_norms": 0.0,
             "experts": 0.0, "dense_and_shared": 0.0, "kv_cache": 0.0}

    def size(shape) -> float:
        return float(np.prod(shape, dtype=np.float64)) * itemsize

    leaves = jax.tree_util.tree_flatten_with_path(
        (kv_shapes, ffn_shapes), is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(i, int) for i in x))[0]
    for path, shape in leaves:
        keys = [str(getattr(k, "key", k)) for k in path]
        group, name = keys[1], keys[-1]
        letters = _letters(name)
        if group == "embed":
            rows = size(shape) / shape[0] * batch
            parts["embedding_rows"] += rows
            if config.tie_word_embeddings:                   # the logits read the whole table
                parts["lm_head"] += size(shape)
        elif group == "final":
            parts["lm_head" if name.startswith("lm_head") else "router_and_norms"] += size(shape)
        elif group == "attn":
            parts["attention"] += size(shape)
        elif letters[:2] == ["L", "E"]:                      # an expert stack: only the experts reached
            parts["experts"] += size(shape) * min(touched, E) / E
        elif name.startswith("router") or "norm" in name or name.startswith("b"):
            parts["router_and_norms"] += size(shape)
        else:
            parts["dense_and_shared"] += size(shape)
    parts["kv_cache"] = float(batch) * context * config.num_layers * 2 * config.kv_cache_row * itemsize  # K and V rows
    parts["total"] = sum(parts.values())
    parts["experts_touched_per_layer"] = touched
    return parts


def roofline_tokens_per_second(step_bytes: float, batch: int, copy_gbps: float) -> float:
    """Tokens/s of a decode step of `batch` sequences that reads `step_bytes` at `copy_gbps`
    (read + write counted in the ceiling, so reading alone runs at that rate)."""
    return batch / (step_bytes / (copy_gbps * 1e9))


__all__ = ["decode_step_bytes", "expected_distinct_experts", "roofline_tokens_per_second"]
