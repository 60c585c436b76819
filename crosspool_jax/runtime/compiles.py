"""Counting XLA compiles in this process (the "no compiles while serving" check), and the
persistent compilation cache that makes a restart's warm-up fast.

JAX records one `/jax/core/compile/backend_compile_duration` event per executable it builds,
whether XLA compiled it or it came from the persistent compilation cache; a listener counts
them. JAX's listeners are process-wide, so there is one `CompileCounter` per process
(`compile_counter()`); engines and benchmarks read `count` before and after a window.
"""
from __future__ import annotations

import os
import threading
from typing import Optional

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
    """Executables built in this process since the counter was registered, and their seconds."""

    def __init__(self):
        self._lock = threading.Lock()
        self.count = 0
        self.seconds = 0.0

    def _on_event(self, event: str, duration_secs: float, **_) -> None:
        if event == BACKEND_COMPILE_EVENT:
            with self._lock:
                self.count += 1
                self.seconds += duration_secs


_COUNTER: Optional[CompileCounter] = None
_COUNTER_LOCK = threading.Lock()


def compile_counter() -> CompileCounter:
    """The process's counter, registered with JAX on first use."""
    global _COUNTER
    with _COUNTER_LOCK:
        if _COUNTER is None:
            from jax import monitoring  # noqa: PLC0415 - the cache folder's name imports without JAX

            _COUNTER = CompileCounter()
            monitoring.register_event_duration_secs_listener(_COUNTER._on_event)
        return _COUNTER


DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "crosspool_jax", "jax_cache")


def use_compilation_cache(folder: Optional[str]) -> None:
    """Point JAX's persistent compilation cache at `folder` (nothing when empty or None): the
    programs a warm-up compiles are kept there and read back by the next start."""
    if not folder:
        return
    import jax  # noqa: PLC0415

    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
