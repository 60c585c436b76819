"""The shared/static baselines' host-side rules: PlacedRunner refusals and the default KV pool size.

The outputs of the placed path are checked against the single-device engine in
tests/engine/test_engine_crosspool.py (`test_layout_matches_single_device_engine`); here what
needs no compiled program: a model's chunks must hold pages of its device only, and without
kv_pool_bytes every device gets the share of the device with the least free memory.
"""
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from crosspool_jax.engine.model_registry import ModelRegistry
from crosspool_jax.engine.placed_runner import PlacedRunner
from crosspool_jax.engine.step_plan import ModelStep
from crosspool_jax.kv.pool import KVPool, KVPoolLayout


@pytest.fixture(scope="module")
def runner():
    pool = KVPool(KVPoolLayout(64, 8, 2, "float32"), jax.devices()[:2])
    return PlacedRunner(pool, {"a": 0, "b": 1}, attention_backend="reference", moe_backend="reference")


def _chunk(table):
    return SimpleNamespace(request=SimpleNamespace(request_id="r"), start=0, num_tokens=1, token_ids=[1],
                           page_table=np.asarray(table, np.int32))


def _step(model, chunk):
    return ModelStep(model, None, 4, None, None, [chunk], [None], [[]], [1])


def test_one_step_runner_per_device(runner):
    assert [r.device_index for r in runner.runners] == [0, 1]
    assert [r.device for r in runner.runners] == jax.devices()[:2]
    assert runner.stats.compiled_programs == 0 and runner.stats.steps == 0


def test_chunks_off_the_models_device_are_refused(runner):
    with pytest.raises(ValueError, match="request r of model 'b' has pages on KV device 0; the model is placed "
                                         "on device 1"):
        runner.run(_step("b", _chunk([[1, 2]])))
    with pytest.raises(ValueError, match="request r of model 'a': page ids .* lie on devices \\[0, 1\\]"):
        runner.run(_step("a", _chunk([[1, 9]])))
    with pytest.raises(ValueError, match="model 'c' has no device"):
        runner.run(_step("c", _chunk([[1]])))


def test_placement_outside_the_pool_is_refused():
    pool = KVPool(KVPoolLayout(64, 8, 2, "float32"), jax.devices()[:2])
    with pytest.raises(ValueError, match="model 'a' is placed on device index 2, not one of the pool's 2"):
        PlacedRunner(pool, {"a": 2}, attention_backend="reference", moe_backend="reference")


def test_default_kv_pool_is_bounded_by_the_device_with_least_free_memory():
    def device(limit, in_use):
        return SimpleNamespace(memory_stats=lambda: {"bytes_limit": limit, "bytes_in_use": in_use})
    fake = SimpleNamespace(config=SimpleNamespace(kv_pool_bytes=None, kv_memory_fraction=0.5),
                           kv_devices=[device(1000, 200), device(1000, 600), device(1000, 0)])
    assert ModelRegistry._pool_bytes(fake) == 3 * 200            # half of device 1's 400 free bytes, each
    fake.config.kv_pool_bytes = 12345
    assert ModelRegistry._pool_bytes(fake) == 12345


def test_kernel_page_cap_only_where_a_pallas_kernel_may_run():
    """Only the TPU attention kernel caps one K/V operand (2**31 - 1 elements: its DMA offsets are
    not known to be 64-bit); the GPU kernel addresses any pool (64-bit offsets) and the reference
    has no limit. The registry caps pages per device only where the TPU kernel may run."""
    from crosspool_jax.engine.config import EngineConfig
    from pallas_kernels.ragged_paged_attention.validation import max_pages_for_kernel

    def fake(backend, platform):
        return SimpleNamespace(config=EngineConfig(models={"m": "unused"}, attention_backend=backend),
                               kv_devices=[SimpleNamespace(platform=platform)])
    assert max_pages_for_kernel(2048, "tpu") == (2 ** 31 - 1) // 2048
    for backend, platform, kernels in (("auto", "cpu", "reference"), ("reference", "gpu", "reference"),
                                       ("auto", "gpu", "gpu"), ("gpu", "cpu", "gpu"), ("mgpu_prefill", "gpu", "gpu"),
                                       ("reference", "tpu", "reference"), ("auto", "tpu", "tpu"),
                                       ("tpu", "cpu", "tpu")):
        registry = fake(backend, platform)
        assert registry.config.attention_kernels(platform) == kernels, (backend, platform)
        cap = ModelRegistry._kernel_page_cap(registry, 2048)
        assert cap == (max_pages_for_kernel(2048, "tpu") if kernels == "tpu" else None), (backend, platform)


@pytest.mark.parametrize("split", [{}, {"mode": "crosspool", "kv_devices": 1, "weight_devices": 1}])
def test_pool_capped_at_the_kernel_limit(tiny_model_dirs, monkeypatch, split):
    from crosspool_jax.engine import model_registry
    from crosspool_jax.engine.config import EngineConfig

    monkeypatch.setattr(model_registry, "max_pages_for_kernel",
                        lambda page_elems, backend: 40 if backend == "tpu" else None)
    registry = ModelRegistry(EngineConfig(models={"m": tiny_model_dirs["qwen3_moe"]}, dtype="float32",
                                          kv_pool_bytes=64 << 20, attention_backend="tpu", **split))
    assert registry.max_pages_per_device == 40 and max(registry.kv_layout.usable_pages) == 40
    if split:                                # no arena row uses more pages than the kernel addresses
        assert max(registry.arena.layout.device_pages) == 40
