"""`EngineConfig.kv_cache_dtype`: the KV pool's dtype. "auto" is the model's dtype but on a CPU,
where a 16-bit model's pool is float32 (XLA's CPU backend converts a 16-bit pool whole around
every K/V write; BENCHMARKS.md "kv_cache_dtype"); pages follow the pool's item size; a
bfloat16 model serves the same greedy tokens from either pool, its logprobs within bfloat16
rounding (its K/V are bfloat16 values, stored exactly in float32, and the reference attention
reads both in float32; XLA compiles the two programs' bfloat16 arithmetic differently)."""
import os
from types import SimpleNamespace

import jax.numpy as jnp
import pytest

from crosspool_jax import LLM, SamplingParams
from crosspool_jax.engine.config import EngineConfig
from crosspool_jax.engine.model_registry import ModelRegistry

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = os.path.join(REPO, "checkpoints", "mixtral-tiny")
POOL = 1 << 20
ENGINE = dict(dtype="bfloat16", kv_pool_bytes=POOL, max_num_seqs=2, max_num_batched_tokens=16,
              min_token_bucket=16, max_decode_steps=4, max_logprobs=2)


@pytest.mark.parametrize("bad", ["int8", "fp8", "", None, 3])
def test_bad_values_name_the_field(bad):
    with pytest.raises(ValueError, match="EngineConfig.kv_cache_dtype"):
        EngineConfig(models={"m": MODEL}, kv_cache_dtype=bad)


def test_backend_choices_name_the_field():
    """attention_backend also takes "mgpu_prefill" (the Hopper prefill kernel where it applies);
    moe_backend does not."""
    assert EngineConfig(models={"m": MODEL}, attention_backend="mgpu_prefill").attention_backend == "mgpu_prefill"
    with pytest.raises(ValueError, match="EngineConfig.moe_backend must be one of"):
        EngineConfig(models={"m": MODEL}, moe_backend="mgpu_prefill")
    with pytest.raises(ValueError, match="EngineConfig.attention_backend must be one of .*mgpu_prefill"):
        EngineConfig(models={"m": MODEL}, attention_backend="flash")


def test_auto_is_float32_for_a_16_bit_model_on_a_cpu_only():
    def pool(dtype, kv, platform):
        return EngineConfig(models={"m": MODEL}, dtype=dtype, kv_cache_dtype=kv).kv_pool_dtype(platform)

    assert pool("bfloat16", "auto", "cpu") == pool("float16", "auto", "cpu") == "float32"
    assert pool("bfloat16", "auto", "gpu") == "bfloat16" and pool("float16", "auto", "tpu") == "float16"
    assert pool("float32", "auto", "gpu") == "float32"
    assert pool("bfloat16", "bfloat16", "cpu") == "bfloat16" and pool("bfloat16", "float16", "gpu") == "float16"
    assert EngineConfig(models={"m": MODEL}, kv_cache_dtype=jnp.float16).kv_cache_dtype == "float16"


def test_pool_dtype_and_pages_follow_the_option():
    """auto on a CPU: a float32 pool for the bfloat16 model, half the pages of the explicit
    bfloat16 pool in the same bytes; the explicit value is honoured."""
    auto = ModelRegistry(EngineConfig(models={"m": MODEL}, **ENGINE))
    bf16 = ModelRegistry(EngineConfig(models={"m": MODEL}, kv_cache_dtype="bfloat16", **ENGINE))
    for registry, dtype in ((auto, jnp.float32), (bf16, jnp.bfloat16)):
        assert registry.kv_dtype == registry.kv_layout.dtype == jnp.dtype(dtype).name
        assert registry.kv_pool.k_buffers[0].dtype == registry.kv_pool.v_buffers[0].dtype == dtype
        assert registry.kv_pool.nbytes <= POOL < registry.kv_pool.nbytes + registry.kv_layout.page_bytes
    assert auto.kv_layout.page_elems == bf16.kv_layout.page_elems
    assert bf16.kv_layout.num_pages == 2 * auto.kv_layout.num_pages


def test_a_crosspool_split_keeps_the_arena_dtype():
    split = dict(mode="crosspool", kv_devices=1, weight_devices=1)
    registry = ModelRegistry(EngineConfig(models={"m": MODEL}, **split, **ENGINE))
    assert registry.kv_dtype == registry.kv_layout.dtype == "bfloat16" == registry.arena.layout.first.dtype
    with pytest.raises(ValueError, match="kv_cache_dtype='float32' with dtype='bfloat16': a crosspool device split"):
        ModelRegistry(EngineConfig(models={"m": MODEL}, kv_cache_dtype="float32", **split, **ENGINE))


def test_bf16_model_serves_the_same_greedy_tokens_from_a_float32_pool():
    """A prefill and two multi-step decode dispatches per prompt, both pools: the same tokens,
    the logprobs within bfloat16 rounding (measured: at most 0.3% of a logprob)."""
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=2)
    prompts = ["Hello there", [5, 17, 99, 3, 250, 41, 8, 12, 7]]
    got = {}
    for kv in ("float32", "bfloat16"):
        llm = LLM({"m": MODEL}, kv_cache_dtype=kv, **ENGINE)
        assert llm.engine.registry.kv_layout.dtype == kv
        got[kv] = [(c.token_ids, [{t: lp.logprob for t, lp in row.items()} for row in c.logprobs])
                   for c in (o.outputs[0] for o in llm.generate(prompts, params))]
    for (tokens32, lps32), (tokens16, lps16) in zip(got["float32"], got["bfloat16"]):
        assert tokens32 == tokens16
        for row32, row16 in zip(lps32, lps16):
            assert row32.keys() == row16.keys()
            assert all(row32[t] == pytest.approx(row16[t], rel=1e-2) for t in row32)


def test_another_pool_dtype_only_where_the_reference_attention_runs():
    """The Pallas kernels read pages of the model's dtype: an explicit other kv_cache_dtype is
    refused where one may run, and "auto" keeps the model's dtype on a GPU/TPU."""
    def pool(platform, backend="auto", kv="float32"):
        fake = SimpleNamespace(config=EngineConfig(models={"m": MODEL}, kv_cache_dtype=kv, attention_backend=backend,
                                                   **ENGINE),
                               kv_devices=[SimpleNamespace(platform=platform)], disaggregated=False)
        return ModelRegistry._kv_dtype(fake)

    assert pool("cpu") == pool("gpu", "reference") == pool("tpu", "reference") == "float32"
    assert pool("gpu", kv="auto") == pool("tpu", kv="auto") == pool("gpu", kv="bfloat16") == "bfloat16"
    for platform, backend in (("gpu", "auto"), ("tpu", "auto"), ("gpu", "gpu"), ("cpu", "tpu"), ("gpu", "mgpu_prefill")):
        with pytest.raises(ValueError, match="kv_cache_dtype='float32' with dtype='bfloat16': the Pallas"):
            pool(platform, backend)
