"""Does a step program update the KV pool in place? Prints XLA's memory analysis of the
step programs beside the pool size.

    python scripts/check_step_memory.py --model mixtral-tiny=checkpoints/mixtral-tiny --kv_pool_bytes 536870912
    python scripts/check_step_memory.py --random_config mixtral-8x7b-2l --crosspool_split 1+1 \
        --kv_pool_bytes 8589934592 [--attention_backend reference]     (the disaggregated step)

In place means alias ~= pool and temp << pool. Measured (2026-11-28, JAX 0.11.2, H200):
ragged_step and multi_decode with a 4 GiB pool: alias 4096 MiB, temp 0.6-0.8 MiB (in place;
the server's XLA "can't reduce memory below 102 GiB" warning is not a pool copy in them).
The disaggregated step (mixtral-8x7b-2l, 1+1, 8 GiB pool): temp 8,224 MiB with the Pallas
attention kernel (the pages region sliced out of the arena row is copied into the kernel's
operand) and 2,698 MiB with the reference attention (about one layer's expert shard: the
Pallas grouped-matmul operand, sliced out of the weight row, is copied). On CPU use
--dtype float32: XLA's CPU backend computes bfloat16 in float32 and copies the row for that.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_MODEL = flags.DEFINE_multi_string("model", None, "NAME=PATH (default: the shipped models)")
_KV = flags.DEFINE_integer("kv_pool_bytes", 512 << 20, "KV pool bytes")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "dtype")
_RANDOM = flags.DEFINE_list("random_config", None, "Random-weight model shapes instead of --model "
                            "(crosspool_jax/models/random_models.py; several share the pool)")
_HLO = flags.DEFINE_string("hlo_dir", None, "Write each program's optimised HLO here, and list its largest "
                           "copies (a copy of a pool-sized buffer is what breaks in-place updates)")
_ATTN = flags.DEFINE_string("attention_backend", "auto", "auto | reference | gpu | tpu")
_SPLIT = flags.DEFINE_string("crosspool_split", None, "KV+W devices (e.g. 1+1): check the disaggregated "
                             "step instead; its arena row holds the pages (temp ~ pages means the step "
                             "copies them, e.g. as a kernel operand)")


def main(argv):
    del argv
    from crosspool_jax import LLM, SamplingParams
    from crosspool_jax.model_specs import models_from_specs
    from crosspool_jax.engine import disagg_runner, runner
    from crosspool_jax.runtime import step_program
    from crosspool_jax.models.random_models import random_model_dirs
    from crosspool_jax.weights.devices import parse_split

    seen = {}

    def capture(name, fn):
        def wrapped(*args, **kwargs):
            if name not in seen:
                compiled = fn.lower(*args, **kwargs).compile()
                seen[name] = compiled.memory_analysis()
                if _HLO.value:
                    _write_hlo(name, compiled.as_text())
            return fn(*args, **kwargs)
        return wrapped

    runner.ragged_step = capture("ragged_step", step_program.ragged_step)
    runner.multi_decode = capture("multi_decode", step_program.multi_decode)
    pipeline = disagg_runner.disagg_pipeline
    pipeline_step = pipeline.disagg_step
    pipeline.disagg_step = capture("disagg_step", pipeline_step)
    models = random_model_dirs(_RANDOM.value) if _RANDOM.value else models_from_specs(_MODEL.value)
    split = {}
    if _SPLIT.value:
        n_kv, n_w = parse_split(_SPLIT.value)
        split = dict(mode="crosspool", kv_devices=n_kv, weight_devices=n_w)
    llm = LLM(models, dtype=_DTYPE.value, kv_pool_bytes=_KV.value, max_decode_steps=4,
              attention_backend=_ATTN.value, **split)
    for name in llm.model_names:
        llm.generate([[1, 2, 3, 4, 5, 6]], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True), model=name)
    pipeline.disagg_step = pipeline_step
    mib = 2 ** 20
    layout = llm.engine.registry.kv_layout
    print(f"pool: {layout.num_pages * layout.page_bytes / mib:.1f} MiB over {layout.num_devices} KV device(s)")
    for prog, m in seen.items():
        print(f"{prog}: args {m.argument_size_in_bytes / mib:.1f} MiB, out {m.output_size_in_bytes / mib:.1f} MiB, "
              f"alias {m.alias_size_in_bytes / mib:.1f} MiB, temp {m.temp_size_in_bytes / mib:.1f} MiB")


def _write_hlo(name: str, text: str) -> None:
    """The program's HLO to <hlo_dir>/<name>.txt, and its ten largest copy instructions printed."""
    import re

    os.makedirs(_HLO.value, exist_ok=True)
    with open(os.path.join(_HLO.value, f"{name}.txt"), "w") as f:
        f.write(text)
    sizes = {"bf16": 2, "f16": 2, "f32": 4, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1, "f8e4m3fn": 1}
    copies = []
    for line in text.splitlines():
        m = re.search(r"= (\w+)\[([\d,]*)\][^ ]* (copy|copy-start|dynamic-update-slice|transpose)\(", line)
        if m and m.group(1) in sizes:
            n = sizes[m.group(1)]
            for d in filter(None, m.group(2).split(",")):
                n *= int(d)
            copies.append((n, line.strip()[:200]))
    print(f"{name}: {len(copies)} copy-like instructions; largest:")
    for n, line in sorted(copies, reverse=True)[:10]:
        print(f"  {n / 2 ** 20:10.1f} MiB  {line}")


if __name__ == "__main__":
    app.run(main)
