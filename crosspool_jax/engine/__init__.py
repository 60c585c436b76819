"""Execution: scheduler, runner and step programs, sampler, and `LLMEngine` (see llm_engine.py's essay).

The exports load on first use (PEP 562), so `engine.config` (the command lines' flags and their
`--help`) imports without JAX.
"""
from crosspool_jax.lazy_exports import lazy_exports

_EXPORTS = {"EngineConfig": "config", "EngineStats": "llm_engine", "LLMEngine": "llm_engine"}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
