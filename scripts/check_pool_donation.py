"""Does a served step really update the KV pool in place on this device? Runs the engine on
two models and prints, after each request and after direct calls of `ragged_step`, the
device addresses of the pool's K and V buffers and the device's memory in use and at peak.

    python scripts/check_pool_donation.py --random_config olmoe-1b-7b-4l --kv_pool_bytes 8589934592
    JAX_PLATFORMS=cpu python scripts/check_pool_donation.py --model m=checkpoints/mixtral-tiny

In place means the addresses never change and the peak stays near the pool plus the weights.
`check_step_memory.py` reads what XLA planned (the outputs alias the donated pool); this reads
what happened: a changed address means the runtime gave the step a fresh buffer of the pool's
size (the donation did not take), as the one-GPU benches' out-of-memory errors of a K buffer's
size suggest (BENCHMARKS.md, "Runtime redesign, part 2").
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_MODEL = flags.DEFINE_multi_string("model", None, "NAME=PATH (default: two copies of --random_config)")
_RANDOM = flags.DEFINE_string("random_config", "olmoe-1b-7b-4l", "random-weight model shape")
_KV = flags.DEFINE_integer("kv_pool_bytes", 8 << 30, "KV pool bytes")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "dtype")
_ATTN = flags.DEFINE_string("attention_backend", "auto", "auto | reference | gpu | tpu")
_WARM = flags.DEFINE_bool("warm_up", True, "compile the menu's programs (LLMEngine.warm_up) before the requests")


def main(argv):
    del argv
    import jax

    from crosspool_jax import LLM, SamplingParams
    from crosspool_jax.engine import runner as runner_mod
    from crosspool_jax.model_specs import models_from_specs
    from crosspool_jax.models.random_models import random_model_dirs
    from crosspool_jax.runtime import step_program
    from crosspool_jax.runtime.compiles import compile_counter

    compiles = compile_counter()

    device = jax.devices()[0]

    def memory(tag):
        s = device.memory_stats()
        if not s:
            return
        gib = 2 ** 30
        print(f"{tag}: in use {s.get('bytes_in_use', 0) / gib:.2f} GiB, peak {s.get('peak_bytes_in_use', 0) / gib:.2f}"
              f" GiB, limit {s.get('bytes_limit', 0) / gib:.2f} GiB, compiles so far {compiles.count}", flush=True)

    captured = {}

    def capture(*args, **kwargs):
        captured.setdefault("call", (args, kwargs))
        return step_program.ragged_step(*args, **kwargs)

    capture.lower = step_program.ragged_step.lower        # the warm-up lowers the real program
    runner_mod.ragged_step = capture
    if _MODEL.value:
        models = models_from_specs(_MODEL.value)
    else:
        path = random_model_dirs([_RANDOM.value])[_RANDOM.value]
        models = {"a": path, "b": path}
    llm = LLM(models, dtype=_DTYPE.value, kv_pool_bytes=_KV.value, max_decode_steps=1,
              attention_backend=_ATTN.value)
    pool = llm.engine.runner.runners[0].pool

    def addresses():
        k, v = pool.take(0)
        pool.put(k, v, 0)
        return k.unsafe_buffer_pointer(), v.unsafe_buffer_pointer()

    memory("loaded")
    if _WARM.value:
        print("warm-up", llm.engine.warm_up(), flush=True)
        memory("warmed up")
    start = addresses()
    print("pool addresses", start)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    names = llm.model_names
    moved = 0
    for i in range(4):
        llm.generate([[1, 2, 3, 4, 5] * 20] * 2, params, model=names[i % len(names)], use_tqdm=False)
        jax.block_until_ready(pool.k_buffers[0])
        now = addresses()
        moved += now != start
        print(f"after request {i}: addresses {now} ({'same' if now == start else 'MOVED'})")
        memory(f"after request {i}")
    args, kwargs = captured["call"]
    args = list(args)
    k_buf, v_buf = pool.take(0)
    table = jax.numpy.zeros(args[4].shape, args[4].dtype)      # the captured token table was donated
    for i in range(2):
        before = (k_buf.unsafe_buffer_pointer(), v_buf.unsafe_buffer_pointer())
        args[2], args[3], args[4] = k_buf, v_buf, table
        k_buf, v_buf, table, *_ = step_program.ragged_step(*args, **kwargs)
        jax.block_until_ready(k_buf)
        after = (k_buf.unsafe_buffer_pointer(), v_buf.unsafe_buffer_pointer())
        moved += after != before
        print(f"direct ragged_step {i}: {before} -> {after} ({'same' if after == before else 'MOVED'})")
        memory(f"direct ragged_step {i}")
    pool.put(k_buf, v_buf, 0)
    print("in place" if not moved else f"NOT in place: the pool moved {moved} times")


if __name__ == "__main__":
    app.run(main)
