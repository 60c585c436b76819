"""Package exports that load on first use (PEP 562): a package's `__init__` names what it
exports and from which submodule, and importing the package imports none of them, so light
users (the command lines' flags and `--help`, the server's protocol) stay free of JAX.

    __getattr__ = lazy_exports(__name__, {"LLMEngine": "llm_engine", ...})
"""
from __future__ import annotations

import importlib


def lazy_exports(package: str, exports: dict):
    """The module `__getattr__` of `package` for {name: submodule it lives in}."""
    def __getattr__(name):
        if name in exports:
            return getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    return __getattr__
