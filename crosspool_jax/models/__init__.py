"""Model families (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, Llama, Qwen3, DeepSeek-V2/V3, GLM-4.7-Flash,
GPT-OSS) as pure functions over parameter pytrees split into a KV side (embeddings, attention, final
norm, lm head) and an FFN side (MoE or dense MLP stacks). See WORKSPACE.md "Model forward" and `params.py`."""
from crosspool_jax.models.attention import dense_causal_attention
from crosspool_jax.models.config import SUPPORTED_ARCHITECTURES, ModelConfig
from crosspool_jax.models.params import init_random_params, param_bytes, param_shapes
from crosspool_jax.models.transformer import (attention_block, attention_options, compute_logits, dense_logits,
                                              ffn_block, forward, rms_norm)

__all__ = [
    "ModelConfig", "SUPPORTED_ARCHITECTURES", "forward", "compute_logits", "attention_block", "attention_options",
    "ffn_block", "dense_causal_attention", "dense_logits", "init_random_params", "param_bytes", "param_shapes",
    "rms_norm",
]
