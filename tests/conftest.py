"""Test setup shared by the whole suite: 8 simulated CPU devices, float32 matmuls at full precision.

Set CROSSPOOL_TEST_ON_GPU=1 to let JAX pick the GPU (the device machine's GPU test run).
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
if not os.environ.get("CROSSPOOL_TEST_ON_GPU"):
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
