"""Fused MoE and grouped matmul: pure-jnp reference, GPU (Triton-lowered Pallas) and TPU
(Mosaic TPU Pallas) kernels behind one backend seam (api.py)."""
from pallas_kernels.fused_moe.api import fused_moe, grouped_matmul, layer_matmul
from pallas_kernels.fused_moe.expert_rows import ExpertRows
from pallas_kernels.fused_moe.reference import (SOFTMAX_TOPK, ClampedSwiGLU, Routing, fused_moe_reference,
                                                grouped_matmul_reference, route, route_topk)
from pallas_kernels.fused_moe.tuning import BlockConfig

__all__ = ["fused_moe", "grouped_matmul", "layer_matmul", "ExpertRows", "ClampedSwiGLU", "Routing", "SOFTMAX_TOPK",
           "route", "route_topk", "fused_moe_reference", "grouped_matmul_reference", "BlockConfig"]
