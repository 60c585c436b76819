"""Execution: scheduler, runner and step programs, sampler, and `LLMEngine` (see llm_engine.py's essay).

The exports load on first use (PEP 562), so `engine.config` (the command lines' flags and their
`--help`) imports without JAX.
"""
import importlib

_EXPORTS = {"EngineConfig": "config", "EngineStats": "llm_engine", "LLMEngine": "llm_engine"}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"crosspool_jax.engine.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
