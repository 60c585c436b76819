"""The batch command against one `LLM.generate` call on the same prompts (issue 16's bar: the
stream must be at least as fast as one generate call).

    PYTHONPATH=. python scripts/bench_batch.py --num_lines 1000 --max_tokens 8

Writes a JSONL file of `num_lines` token-id prompts (random lengths, greedy, over the shipped
models), warms both paths up on a few lines, then times `LLM.generate` on all prompts and
`crosspool_jax.batch.run_batch` on the file with the same engine, alternating `--repeats`
times, and prints the best wall time of each (and checks both produced the same tokens).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

import jax

from crosspool_jax import LLM, SamplingParams
from crosspool_jax.batch import run_batch
from crosspool_jax.model_specs import shipped_models


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_lines", type=int, default=1000)
    parser.add_argument("--max_tokens", type=int, default=8)
    parser.add_argument("--models", type=int, default=2, help="how many shipped models the lines use")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max_in_flight", type=int, default=1024)
    args = parser.parse_args()
    models = dict(list(shipped_models().items())[:args.models])
    llm = LLM(models, dtype="float32", kv_pool_bytes=64 << 20)
    rng = random.Random(0)
    names = list(models)
    lines = [{"prompt_token_ids": [rng.randrange(3, 1000) for _ in range(rng.randint(4, 24))],
              "model": names[i % len(names)], "max_tokens": args.max_tokens, "temperature": 0.0,
              "ignore_eos": True} for i in range(args.num_lines)]
    folder = tempfile.mkdtemp()
    src = os.path.join(folder, "in.jsonl")
    with open(src, "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    prompts = [line["prompt_token_ids"] for line in lines]
    llm.generate(prompts[:64], params, model=[l["model"] for l in lines[:64]], use_tqdm=False)   # warm-up
    best = {"generate": float("inf"), "batch": float("inf")}
    for r in range(args.repeats):
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, model=[l["model"] for l in lines], use_tqdm=False)
        best["generate"] = min(best["generate"], time.perf_counter() - t0)
        dst = os.path.join(folder, f"out{r}.jsonl")
        t0 = time.perf_counter()
        run_batch(llm, src, dst, max_in_flight=args.max_in_flight, use_tqdm=False)
        best["batch"] = min(best["batch"], time.perf_counter() - t0)
        with open(dst) as f:
            got = [json.loads(line)["outputs"][0]["token_ids"] for line in f]
        assert got == [o.outputs[0].token_ids for o in outs], "batch and generate differ"
    print(f"JAX {jax.__version__}, {jax.devices()[0].platform}, {args.num_lines} lines, "
          f"{args.max_tokens} tokens each, {len(names)} models")
    for name, seconds in best.items():
        print(f"{name:>9}: {seconds:7.2f} s  ({args.num_lines / seconds:6.1f} lines/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
