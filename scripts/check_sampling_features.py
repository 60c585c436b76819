"""Check the per-request logits processors and prompt logprobs on whatever backend JAX picks.

    python scripts/check_sampling_features.py [--model checkpoints/mixtral-tiny]

Builds an engine on one shipped checkpoint, warms it up with every variant (the
prompt-logprobs programs included), then serves requests with logit_bias, allowed_token_ids,
bad_words (one and several tokens) and prompt_logprobs with prompts prefilled in several
chunks, and checks: no XLA program compiled while serving; prompt logprobs equal to the full
forward (`models.dense_logits`, no KV cache); allowed and banned ids respected. Prints one
line per check and exits non-zero when one fails. On a GPU this exercises the Pallas kernels
and the GPU lowering of the sampler's table and the prompt-scoring blocks.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from crosspool_jax import LLM, SamplingParams  # noqa: E402
from crosspool_jax.checkpoints import load_model  # noqa: E402
from crosspool_jax.models import dense_logits  # noqa: E402
from crosspool_jax.runtime.compiles import compile_counter  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=os.path.join(ROOT, "checkpoints", "mixtral-tiny"))
    args = parser.parse_args()
    print(f"backend: {jax.default_backend()} {jax.devices()[0].device_kind}")
    llm = LLM({"m": args.model}, dtype="float32", kv_pool_bytes=8 << 20, max_num_batched_tokens=64,
              min_token_bucket=16, max_decode_steps=4, max_model_len=512)
    t0 = time.perf_counter()
    done = llm.engine.warm_up(variants=True)
    print(f"warm-up: {done['programs']} programs, {done['compiles']} compiles, {time.perf_counter() - t0:.1f} s")
    counter = compile_counter()
    before = counter.count
    rng = np.random.default_rng(0)
    vocab = llm.engine.registry.get("m").config.vocab_size
    prompt = rng.integers(5, vocab - 5, 150).tolist()           # three chunks of at most 64 tokens
    plain = llm.generate([prompt[:20]], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0]
    tokens = plain.outputs[0].token_ids
    tok = llm.engine.get_tokenizer("m")
    params = [
        SamplingParams(max_tokens=3, temperature=0.0, prompt_logprobs=5, logprobs=2),
        SamplingParams(max_tokens=16, temperature=2.0, seed=1, ignore_eos=True, allowed_token_ids=[7, 70, 700]),
        SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logit_bias={tokens[0]: -100.0}),
        SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, bad_words=[tok.decode(tokens[:2])]),
    ]
    outs = llm.generate([prompt, prompt[:20], prompt[:20], prompt[:20]], params)
    failures = []

    def check(name, ok, detail=""):
        print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}")
        if not ok:
            failures.append(name)

    check("no compile while serving", counter.count == before, f"({counter.count - before} compiled)")
    m = load_model(args.model, dtype="float32")
    n = len(prompt)
    logits = dense_logits(m.kv_params, m.ffn_params, m.config, jnp.asarray(prompt, jnp.int32),
                          jnp.zeros(n, jnp.int32), jnp.arange(n, dtype=jnp.int32))
    want = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    got = outs[0].prompt_logprobs
    err = max(abs(got[p][prompt[p]].logprob - want[p - 1, prompt[p]]) for p in range(1, n))
    same = np.mean([{t for t, lp in got[p].items() if lp.rank <= 5} == set(np.argsort(-want[p - 1])[:5].tolist())
                    for p in range(1, n)])
    check("prompt logprobs = full forward", err < 2e-3 and got[0] is None and len(got) == n, f"(max |diff| {err:.2e})")
    check("prompt top-5 = full forward's", same >= 0.97, f"(at {same:.0%} of positions; near-ties aside)")
    check("allowed_token_ids", set(outs[1].outputs[0].token_ids) <= {7, 70, 700})
    check("logit_bias -100 bans", tokens[0] not in outs[2].outputs[0].token_ids[:1])
    check("bad word of two tokens", outs[3].outputs[0].token_ids[:2] != tokens[:2])
    ranks = [lp[t].rank for t, lp in zip(outs[0].outputs[0].token_ids, outs[0].outputs[0].logprobs)]
    check("sampled ranks filled", all(r is not None and r >= 1 for r in ranks), f"{ranks}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
