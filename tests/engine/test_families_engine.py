"""The MLA / DeepSeek-style families and GPT-OSS through the paged engine, against transformers.

Greedy float32 generation must equal transformers' `generate` token for token in one mixed
batch with an existing family (Mixtral), with the prefix cache on (a cached prefix is
reused), chunked prefill (the prompts exceed the step's token budget) and preemption (the
pool holds about half of the batch). The crosspool device split serves DeepSeek-V2 (MLA) and
GPT-OSS together in one arena (MLA's latent + rope key pages beside GPT-OSS's per-head K/V,
sinks, sliding/full layers, biased experts, the clamped SwiGLU) with the single-device
engine's greedy tokens, and GLM-4.5 (GQA with partial RoPE and DeepSeek-V3 routing) with
transformers'.
"""
import numpy as np
import pytest

from crosspool_jax import LLM, SamplingParams
from crosspool_jax.checkpoints.tiny_models import transformers_greedy
from crosspool_jax.engine.disagg_runner import DisaggRunner
from crosspool_jax.engine.request import Request

NEW = ["deepseek_v2", "glm4_moe_lite", "gpt_oss", "glm4_moe"]
MLA = ["deepseek_v2", "glm4_moe_lite"]
SPLIT = ["deepseek_v2", "gpt_oss"]      # GLM-4.7-Flash's split steps: tests/disagg (its compiles cost)
MAX_TOKENS = 6
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
ENGINE = dict(max_num_batched_tokens=64, min_token_bucket=64, max_decode_steps=4)


@pytest.fixture(scope="module")
def model_dirs(tiny_model_dirs):
    return {f: tiny_model_dirs[f] for f in NEW + ["mixtral"]}


def _prompts(seed, lengths, vocab=250):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, n).tolist() for n in lengths]


def _pool_bytes(model_dirs, pages):
    """Bytes of `pages` pages of the page size the engine picks for these models."""
    from crosspool_jax.checkpoints.loader import read_config
    from crosspool_jax.kv.pool import choose_page_elems
    rows = [read_config(p)[1].kv_cache_row for p in model_dirs.values()]
    return pages * 2 * choose_page_elems(rows) * 4


@pytest.mark.parametrize("family", NEW)
def test_greedy_matches_transformers_with_prefix_cache_chunks_and_preemption(model_dirs, family):
    dirs = {family: model_dirs[family], "mixtral": model_dirs["mixtral"]}
    # 16 pages: the batch below needs about 40 (2 layers per block), one request at most 6;
    # prompts just under a block boundary of either model run out of pages while decoding
    llm = LLM(dirs, dtype="float32", enable_prefix_caching=True, kv_pool_bytes=_pool_bytes(dirs, 16), **ENGINE)
    shared = _prompts(0, [40])[0]
    llm.generate([shared + [5, 6]], GREEDY, model=family)                  # fills the prefix cache
    probe = Request(request_id="probe", model=family, prompt_token_ids=shared + [1], sampling_params=GREEDY,
                    arrival_time=0.0, max_tokens=MAX_TOKENS)
    _, num_cached = llm.engine.kv_manager.get_computed_blocks(probe)
    assert num_cached >= llm.engine.registry.get(family).tokens_per_page     # a whole block is reused

    prompts = _prompts(1, [1, 7, 33, 30, 31]) + [shared + [5, 6], shared + [9]] + _prompts(2, [19, 18, 39])
    models = [family] * 7 + ["mixtral"] * 3
    outs = llm.generate(prompts, GREEDY, model=models)
    for prompt, name, out in zip(prompts, models, outs):
        assert out.error is None
        assert out.outputs[0].token_ids == transformers_greedy(dirs[name], prompt, MAX_TOKENS), (name, len(prompt))
    stats = llm.engine.stats()
    assert stats.num_preemptions > 0
    assert stats.kv_pages_free == stats.kv_pages_total


@pytest.mark.parametrize("family", MLA)
def test_kv_page_holds_latent_and_rope_key_only(model_dirs, family):
    """Bytes per token per layer in the engine's pool = (kv_lora_rank + qk_rope_head_dim) * itemsize."""
    llm = LLM({family: model_dirs[family]}, dtype="float32", kv_pool_bytes=1 << 20, **ENGINE)
    entry = llm.engine.registry.get(family)
    c = entry.config
    layout = llm.engine.registry.kv_pool.layout
    assert c.is_mla and c.kv_cache_heads == 1
    assert layout.page_bytes / entry.tokens_per_page == (c.kv_lora_rank + c.qk_rope_head_dim) * 4
    assert 2 * c.kv_bytes_per_token_per_layer("float32") == (c.kv_lora_rank + c.qk_rope_head_dim) * 4


def test_crosspool_split_serves_mla_and_gpt_oss_like_the_single_device_engine(model_dirs):
    """DeepSeek-V2 (MLA with the query LoRA, a dense layer 0, grouped routing) and GPT-OSS
    (sinks, window-5 and full layers, biases, clamped SwiGLU) in one arena on a 2+2 split
    (experts expert-parallel, dense and shared F split over both weight devices): a batch of
    both (prompts past GPT-OSS's window, multi-step decodes) gives the single-device engine's
    greedy tokens, and the MLA model's pages hold its latent + rope key rows (its G in the
    arena from kv_cache_row)."""
    dirs = {f: model_dirs[f] for f in SPLIT}
    prompts = _prompts(4, [7, 3, 12, 1, 20, 9, 33, 5, 16])
    models = [SPLIT[i % 2] for i in range(len(prompts))]
    options = dict(dtype="float32", kv_pool_bytes=1 << 20, max_num_seqs=8, **ENGINE)    # a short shape menu
    single = LLM(dirs, **options)
    want = [o.outputs[0].token_ids for o in single.generate(prompts, GREEDY, model=models)]
    split = LLM(dirs, mode="crosspool", kv_devices=2, weight_devices=2, **options)
    assert isinstance(split.engine.runner, DisaggRunner)
    registry = split.engine.registry
    c, view = registry.get("deepseek_v2").config, registry.arena.layout.model("deepseek_v2")
    assert view.tokens_per_page == registry.get("deepseek_v2").tokens_per_page == view.page_elems // c.kv_cache_row
    assert view.has("kv", "attn/wkv_b_LRNU") and view.has("kv", "attn/wkv_a_LDRY")
    gpt_oss = registry.arena.layout.model("gpt_oss")
    assert gpt_oss.has("kv", "attn/sinks_LN") and gpt_oss.has("kv", "moe/router_bias_LE")
    assert gpt_oss.has("w", "moe/b1_LEF2") and gpt_oss.has("w", "moe/b2_LED")
    outs = split.generate(prompts, GREEDY, model=models)
    for prompt, name, out, tokens in zip(prompts, models, outs, want):
        assert out.error is None
        assert out.outputs[0].token_ids == tokens, (name, len(prompt))
    assert split.engine.stats().kv_pages_free == split.engine.stats().kv_pages_total


def test_crosspool_split_serves_glm45_like_transformers(model_dirs):
    """GLM-4.5 (GQA, q/k norms and biases, half-head RoPE, DeepSeek-V3 routing, a dense layer)
    on a 1+1 device split: transformers' greedy tokens."""
    path = model_dirs["glm4_moe"]
    llm = LLM({"glm4_moe": path}, dtype="float32", mode="crosspool", kv_devices=1, weight_devices=1,
              kv_pool_bytes=1 << 20, **ENGINE)
    prompts = _prompts(3, [7, 3])
    for prompt, out in zip(prompts, llm.generate(prompts, GREEDY)):
        assert out.error is None
        assert out.outputs[0].token_ids == transformers_greedy(path, prompt, MAX_TOKENS)
