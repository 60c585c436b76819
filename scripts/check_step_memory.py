"""Does a step program update the KV pool in place? Prints XLA's memory analysis of the
ragged and multi-step decode programs beside the pool size.

    python scripts/check_step_memory.py --model mixtral-tiny=checkpoints/mixtral-tiny --kv_pool_bytes 536870912

In place means alias ~= pool and temp << pool. (CPU, JAX 0.10.2, 2026-11-28: alias 512 MiB,
temp ~1 MiB for a 512 MiB pool. On an H200 the server logged XLA "can't reduce memory use
below 102 GiB" with a ~52 GiB pool: run this there to find which program copies the pool.)
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_MODEL = flags.DEFINE_multi_string("model", None, "NAME=PATH (default: the shipped models)")
_KV = flags.DEFINE_integer("kv_pool_bytes", 512 << 20, "KV pool bytes")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "dtype")


def main(argv):
    del argv
    from crosspool_jax import LLM, SamplingParams
    from crosspool_jax.model_specs import models_from_specs
    from crosspool_jax.engine import runner, step_program

    seen = {}

    def capture(name, fn):
        def wrapped(*args, **kwargs):
            if name not in seen:
                seen[name] = fn.lower(*args, **kwargs).compile().memory_analysis()
            return fn(*args, **kwargs)
        return wrapped

    runner.ragged_step = capture("ragged_step", step_program.ragged_step)
    runner.multi_decode = capture("multi_decode", step_program.multi_decode)
    llm = LLM(models_from_specs(_MODEL.value), dtype=_DTYPE.value, kv_pool_bytes=_KV.value, max_decode_steps=4)
    name = llm.model_names[0]
    llm.generate([[1, 2, 3, 4, 5, 6]], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True), model=name)
    mib = 2 ** 20
    print(f"pool: {llm.engine.registry.kv_pool.nbytes / mib:.1f} MiB")
    for prog, m in seen.items():
        print(f"{prog}: args {m.argument_size_in_bytes / mib:.1f} MiB, out {m.output_size_in_bytes / mib:.1f} MiB, "
              f"alias {m.alias_size_in_bytes / mib:.1f} MiB, temp {m.temp_size_in_bytes / mib:.1f} MiB")


if __name__ == "__main__":
    app.run(main)
