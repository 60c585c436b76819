"""Test setup shared by the whole suite: 8 simulated CPU devices, float32 matmuls at full precision,
CPU code generated without LLVM's optimisations and by XLA's older fusion emitters, and one JAX
persistent compilation cache for the run.

Set CROSSPOOL_TEST_ON_GPU=1 to let JAX pick the GPU (the device machine's GPU test run).

XLA compile time dominates the suite on CPU (a tiny model's step program takes seconds). Two
XLA_FLAGS (CPU runs only) cut it:
- `--xla_backend_optimization_level=0` leaves XLA's HLO passes as they are and skips LLVM's
  optimisation of the generated machine code: a step program compiles in about 40% of the time,
  and the tiny programs run no slower that the suite notices.
- `--xla_cpu_use_fusion_emitters=false` emits the CPU fusions with XLA's older elemental emitters
  instead of the MLIR fusion emitters: the engine's programs compile in about 40% of the time again
  (a 1+1 CrossPool warm-up: 52 s -> 22 s). The CPU fusion pass then groups some elementwise ops
  differently (the optimised HLO is not byte-identical), but what the tests read of it is the
  same: conditionals, loops and their trip counts, collectives, parameter aliasing, copies of the
  pool, temp sizes (tests/disagg/test_program_structure.py and the others pass unchanged).
Subprocesses and notebook kernels inherit both with the device count. The second is checked once
per run (a `python -c "import jax"` with it, ~2 s, before the workers start): a jaxlib without it
runs the suite with the first alone, slower, instead of aborting.

The cache: a fresh temporary folder per run, shared by the xdist workers (the controller makes it
and the workers inherit its path; it is removed when the run ends). A program one worker compiled
(the same HLO, options and devices) is read back by the other, and by any later engine of equal
shapes, instead of compiled again: CPU compile time dominates the engine and server tests. Cache hits
still count in `runtime.compiles.compile_counter` (JAX reports them as compiles), so the "nothing
compiles after warm-up" checks mean what they meant. Subprocesses (the CLI and server binaries) do
not read it: they run as a user's process would.

Scheduling: `-n 2` runs xdist's work-stealing scheduler instead of its default "load" one (an
explicit `--dist` other than load is kept). "load" hands each worker chunks of consecutive tests
that it cannot take back, so near the end one worker could still hold a minute of queued tests
while the other sat idle; with work stealing an idle worker takes half of the other's queue. Each
worker starts on one contiguous half of the suite, so a module's fixtures are still built once
(twice only where a steal splits a module).
"""
import os
import shutil
import tempfile

import pytest

from crosspool_jax.runtime.compiles import FAST_CPU_COMPILE_FLAG, xla_accepts   # imports no JAX

_CPU_FLAGS = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"


def _cpu_xla_flags() -> str:
    """The CPU run's XLA_FLAGS: with the older fusion emitters where this jaxlib still knows the
    flag (XLA aborts on an unknown flag, so a jaxlib that dropped it would stop every test)."""
    flags = f"{_CPU_FLAGS} {FAST_CPU_COMPILE_FLAG}"
    return flags if xla_accepts(flags) else _CPU_FLAGS


if os.environ.get("CROSSPOOL_TEST_ON_GPU"):
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
else:
    if "XLA_FLAGS" not in os.environ:          # the xdist workers inherit the controller's
        os.environ["XLA_FLAGS"] = _cpu_xla_flags()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

_CACHE_ENV = "CROSSPOOL_TEST_JAX_CACHE"
_OWNED_CACHE = []


def pytest_configure(config):
    """Before the first compile (and before xdist starts its workers): point JAX at the run's cache."""
    folder = os.environ.get(_CACHE_ENV)
    if not folder:
        folder = tempfile.mkdtemp(prefix="crosspool-tests-jax-cache-")
        os.environ[_CACHE_ENV] = folder            # inherited by the xdist workers
        _OWNED_CACHE.append(folder)
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config):
    for folder in _OWNED_CACHE:
        shutil.rmtree(folder, ignore_errors=True)
    if _OWNED_CACHE:
        os.environ.pop(_CACHE_ENV, None)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """xdist's scheduler for `-n N` (see the module docstring): work stealing where it would be "load"."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import WorkStealingScheduling
    return WorkStealingScheduling(config, log)
