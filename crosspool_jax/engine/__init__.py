"""Execution: scheduler, runner and step programs, sampler, and `LLMEngine` (see llm_engine.py's essay)."""
from crosspool_jax.engine.config import EngineConfig
from crosspool_jax.engine.llm_engine import EngineStats, LLMEngine

__all__ = ["EngineConfig", "EngineStats", "LLMEngine"]
