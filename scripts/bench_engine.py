"""Engine throughput: tokens/s, host time per step against device time, and the roofline.

    python scripts/bench_engine.py                      # the shipped models, on whatever JAX finds
    python scripts/bench_engine.py --random_config qwen3moe-mini --num_prompts 32 --max_tokens 64
    python scripts/bench_engine.py --random_config qwen3moe-30b-a3b-4l:24 --num_prompts 1 --prompt_len 8192 \
        --max_tokens 2 --max_decode_steps 1 --ttft --page_elems 32768 \
        --attention_backend gpu --attention_backend mgpu_prefill   # issue 19: TTFT, 64-token pages

Each run prints one table and appends it, with the card, JAX version and date, to
--results (default: stdout only). "host" is the time the runner spends preparing inputs
(per step), "device" the time from dispatch until the sampled tokens are on the host.
"roofline tok/s": what the decode would reach if every step only read the bytes it must
(`bench/roofline.py`: weights once, the experts the batch reached, the K/V cache at the average
decode context) at the copy ceiling measured in the same run (a GPU
with PyTorch: `pallas_kernels.anchors.torch_copy_gbps`; elsewhere no ceiling, no roofline);
"x roofline" is the roofline over the measured rate (1.0 = at the limit; the measured rate
includes the prompts' prefill, so short outputs overstate the decode's gap). The experts reached
are the routing the run's sequences actually took (`bench/routing.py` replays them: "experts
per layer", per model; the uniform-routing estimate beside it), else uniform. `--ttft` adds the
time to the first token of one prompt of prompt_len tokens; repeated `--attention_backend`
flags give a row per backend, in this one process.
"""
from __future__ import annotations

import datetime
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_MODELS = flags.DEFINE_multi_string("model", None, "NAME=PATH (repeatable); default: the shipped models")
_RANDOM = flags.DEFINE_multi_string("random_config", None,
                                    "Benchmark a random-weight model of a built-in shape instead "
                                    "(see crosspool_jax/models/random_models.py).")
_NUM_PROMPTS = flags.DEFINE_integer("num_prompts", 16, "Prompts per model.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 64, "Prompt tokens.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 32, "Generated tokens per prompt.")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "dtype")
_DECODE_STEPS = flags.DEFINE_multi_integer("max_decode_steps", [1, 8], "Decode tokens per dispatch to compare.")
_KV_BYTES = flags.DEFINE_integer("kv_pool_bytes", None, "KV pool bytes (default: the engine's).")
_ATTN = flags.DEFINE_multi_string("attention_backend", ["auto"], "auto | reference | gpu | tpu | mgpu_prefill; "
                                  "repeat it to compare backends in one run (a row per backend and decode steps)")
_PAGE_ELEMS = flags.DEFINE_integer("page_elems", None, "Elements of one KV page (default: the engine's); "
                                   "the mgpu prefill kernel takes pages of 64 or 128 tokens")
_TTFT = flags.DEFINE_bool("ttft", False, "Also time one prompt's first token (prompt_len tokens, the engine's "
                          "chunked prefill; median of 3 after one warm call of the same length)")
_MOE = flags.DEFINE_string("moe_backend", "auto", "auto | reference | gpu | tpu")
_RESULTS = flags.DEFINE_string("results", None, "Append the table (markdown) to this file.")
_COPY_GBPS = flags.DEFINE_float("copy_gbps", None, "The copy ceiling (GB/s) for the roofline instead of measuring "
                                "it (a GPU with PyTorch measures it; elsewhere there is none unless given).")


def _device_name() -> str:
    import jax
    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', '')} x{len(jax.devices())}"


def run_once(models: dict, max_decode_steps: int, attention_backend: str) -> dict:
    import numpy as np

    from crosspool_jax import LLM, SamplingParams

    llm = LLM(models, dtype=_DTYPE.value, max_decode_steps=max_decode_steps, kv_pool_bytes=_KV_BYTES.value,
              attention_backend=attention_backend, moe_backend=_MOE.value, page_elems=_PAGE_ELEMS.value,
              max_num_seqs=max(64, _NUM_PROMPTS.value * len(models)))
    names = llm.model_names

    def make_prompts(seed):
        # fresh random prompts for each run, so the prefix cache does not shorten the timed run
        rng = np.random.default_rng(seed)
        prompts, model_of = [], []
        for name in names:
            vocab = llm.engine.registry.get(name).config.vocab_size
            for _ in range(_NUM_PROMPTS.value):
                prompts.append({"prompt_token_ids": rng.integers(0, vocab, _PROMPT_LEN.value).tolist()})
                model_of.append(name)
        return prompts, model_of

    params = SamplingParams(max_tokens=_MAX_TOKENS.value, temperature=0.0, ignore_eos=True)
    warm_prompts, warm_models = make_prompts(1)
    llm.generate(warm_prompts, params, model=warm_models, use_tqdm=False)          # compile
    prompts, model_of = make_prompts(2)
    stats0 = llm.engine.runner.stats
    base = (stats0.steps, stats0.host_prepare_seconds, stats0.device_seconds)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, model=model_of, use_tqdm=False)
    wall = time.perf_counter() - t0
    s = llm.engine.runner.stats
    steps = s.steps - base[0]
    gen = sum(len(o.outputs[0].token_ids) for o in outs)
    row = {"attention": attention_backend, "models": len(names), "prompts": len(prompts),
            "decode_steps": max_decode_steps, "gen_tokens": gen, "wall_s": wall, "tok_per_s": gen / wall,
            "steps": steps,
            "host_ms_per_step": 1e3 * (s.host_prepare_seconds - base[1]) / max(steps, 1),
            "device_ms_per_step": 1e3 * (s.device_seconds - base[2]) / max(steps, 1),
            "other_ms_per_step": 1e3 * (wall - (s.host_prepare_seconds - base[1]) - (s.device_seconds - base[2]))
            / max(steps, 1),
            "programs": s.compiled_programs}
    row.update(_roofline(llm, names, gen / wall, outs, model_of))
    if _TTFT.value:
        row["ttft_ms"] = 1e3 * _ttft(llm, names[0], seed=3)
    return row


def _ttft(llm, name: str, seed: int) -> float:
    """Seconds to the first token of one fresh random prompt of prompt_len tokens for `name`
    (median of 3, after one call of the same length: its programs are compiled)."""
    import statistics

    import numpy as np

    from crosspool_jax import SamplingParams

    vocab = llm.engine.registry.get(name).config.vocab_size
    rng = np.random.default_rng(seed)
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    times = []
    for i in range(4):
        prompt = {"prompt_token_ids": rng.integers(0, vocab, _PROMPT_LEN.value).tolist()}   # no prefix-cache hit
        t0 = time.perf_counter()
        llm.generate([prompt], one, model=[name], use_tqdm=False)
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _roofline(llm, names, tok_per_s: float, outs, model_of) -> dict:
    """Roofline tok/s of the run's decode (each model's prompts decoding together, models one
    after another, reading the experts their routing reached) and its ratio to the measured
    rate; empty without a copy ceiling."""
    import jax.numpy as jnp

    from crosspool_jax.bench.roofline import decode_step_bytes, expected_distinct_experts
    from pallas_kernels.anchors import torch_copy_gbps

    global _CEILING
    if _CEILING is None:
        _CEILING = _COPY_GBPS.value or (torch_copy_gbps() if jax_platform() == "gpu" else 0.0)
    if not _CEILING:
        return {}
    context = _PROMPT_LEN.value + _MAX_TOKENS.value // 2
    seconds, touched = 0.0, {}
    for n in names:                              # one decode token for every prompt of every model
        config = llm.engine.registry.get(n).config
        sequences = [o.prompt_token_ids + o.outputs[0].token_ids for o, m in zip(outs, model_of) if m == n]
        touched[n] = _experts_reached(llm, n, sequences) if config.is_moe else None
        seconds += decode_step_bytes(config, batch=_NUM_PROMPTS.value, context=context,
                                     itemsize=jnp.dtype(_DTYPE.value).itemsize,
                                     experts_touched=touched[n])["total"] / (_CEILING * 1e9)
    roofline = _NUM_PROMPTS.value * len(names) / seconds
    first = llm.engine.registry.get(names[0]).config
    return {"copy_gbps": _CEILING, "roofline_tok_per_s": roofline, "x_roofline": roofline / tok_per_s,
            "experts_per_layer": {n: None if t is None else round(t, 2) for n, t in touched.items()},
            "experts_per_layer_uniform": (round(expected_distinct_experts(first.num_experts, first.top_k,
                                                                          _NUM_PROMPTS.value), 2)
                                          if first.is_moe else None)}


def _experts_reached(llm, name: str, sequences) -> float | None:
    """Distinct experts per MoE layer of the run's decode steps of model `name`, from its
    sequences' routing replayed (`bench/routing.py`); None where its weights are not placed
    whole on a device (a crosspool split) or the sequences differ in length."""
    from crosspool_jax.bench.routing import distinct_experts_per_step, replay_routing
    from crosspool_jax.engine.step_plan import PlacedWeights

    if len({len(s) for s in sequences}) != 1:
        return None
    weights = llm.engine.registry.acquire(name)
    try:
        if not isinstance(weights, PlacedWeights):
            return None
        replayed = replay_routing(weights.kv_params, weights.ffn_params, llm.engine.registry.get(name).config,
                                  sequences)
    finally:
        llm.engine.registry.release(name)
    # decode step t feeds each sequence's token at position prompt_len + t (the last is never fed)
    positions = range(_PROMPT_LEN.value, len(sequences[0]) - 1)
    return distinct_experts_per_step([routes for routes, _ in replayed], positions) if len(positions) else None


_CEILING = None


def jax_platform() -> str:
    import jax
    return jax.devices()[0].platform


def main(argv):
    del argv
    import jax

    from crosspool_jax.model_specs import models_from_specs
    from crosspool_jax.models.random_models import random_model_dirs

    models = random_model_dirs(_RANDOM.value) if _RANDOM.value else models_from_specs(_MODELS.value)
    rows = [run_once(models, k, backend) for backend in _ATTN.value for k in _DECODE_STEPS.value]
    head = (f"bench_engine: {_device_name()}, JAX {jax.__version__}, {datetime.date.today()}, "
            f"models={list(models)}, prompt_len={_PROMPT_LEN.value}, max_tokens={_MAX_TOKENS.value}, "
            f"dtype={_DTYPE.value}, page_elems={_PAGE_ELEMS.value or 'engine default'}, moe_backend={_MOE.value}")
    cols = list(rows[0])
    lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    table = "\n".join(lines)
    print(table)
    if _RESULTS.value:
        with open(_RESULTS.value, "a") as f:
            f.write(table + "\n\n")
    print(json.dumps(rows))


if __name__ == "__main__":
    app.run(main)
