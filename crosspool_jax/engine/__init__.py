"""Execution: scheduler, runner and step programs, sampler, and `LLMEngine` (see llm_engine.py's essay).

`EngineStats` and `LLMEngine` load on first use (PEP 562), so `engine.config` (the command
lines' flags and their `--help`) imports without JAX.
"""
from crosspool_jax.engine.config import EngineConfig

__all__ = ["EngineConfig", "EngineStats", "LLMEngine"]


def __getattr__(name):
    if name in ("EngineStats", "LLMEngine"):
        from crosspool_jax.engine import llm_engine  # noqa: PLC0415
        return getattr(llm_engine, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
