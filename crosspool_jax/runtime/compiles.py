"""Counting XLA compiles in this process (the "no compiles while serving" check), the
persistent compilation cache that makes a restart's warm-up fast, and the CPU compiler flag
that makes a first warm-up on CPU faster.

JAX records one `/jax/core/compile/backend_compile_duration` event per executable it builds,
whether XLA compiled it or it came from the persistent compilation cache; a listener counts
them. JAX's listeners are process-wide, so there is one `CompileCounter` per process
(`compile_counter()`); engines and benchmarks read `count` before and after a window.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
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


# XLA's older CPU fusion emitters instead of its MLIR ones: engine programs compile in ~40% of
# the time (a 1+1 CrossPool warm-up on CPU: 52 s -> 22 s) and compute the same results
FAST_CPU_COMPILE_FLAG = "--xla_cpu_use_fusion_emitters=false"
_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin", "libtpu")


def xla_accepts(xla_flags: str) -> bool:
    """Whether this jaxlib starts with XLA_FLAGS=`xla_flags` (XLA aborts the process on a flag it
    does not know; checked in a child process, ~2 s)."""
    probe = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], capture_output=True,
                           env={**os.environ, "XLA_FLAGS": xla_flags, "JAX_PLATFORMS": "cpu"}, timeout=300)
    return probe.returncode == 0


def prefer_fast_cpu_compiles() -> bool:
    """Before JAX starts its backends (a command line's first step): add FAST_CPU_COMPILE_FLAG to
    XLA_FLAGS when this process will compute on the CPU (JAX_PLATFORMS says so, or no
    accelerator plugin is installed) and this jaxlib knows the flag. Returns whether it did."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms and "cpu" not in platforms.split(",")[0]:
        return False
    if not platforms and any(importlib.util.find_spec(p) for p in _ACCELERATOR_PLUGINS):
        return False
    current = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_use_fusion_emitters" in current:
        return False
    flags = f"{current} {FAST_CPU_COMPILE_FLAG}".strip()
    if not xla_accepts(flags):
        return False
    os.environ["XLA_FLAGS"] = flags
    return True
