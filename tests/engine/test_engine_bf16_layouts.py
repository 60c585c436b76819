"""bfloat16 across memory layouts, teacher-forced: a mixed batch of four models of three
families (two Qwen3-MoE, Mixtral, OLMoE) in one engine step; in every CrossPool split (1+1, 2+2,
6+2, 4+4) and in shared/static on several devices, the logprobs of the same next-token positions
stay within bfloat16 rounding of the single-device engine's.

Greedy tokens may legitimately differ in bf16 (a near-tie flips an argmax under another
summation order), so the comparison is teacher-forced: each prompt is scored for one next
token (the prefill step), and then the prompt extended by the single-device engine's first
token is scored again (a decode-sized step), both with the top-`TOP` logprobs.
"""
import numpy as np
import pytest

from crosspool_jax import LLM, SamplingParams

TOP = 8
ONE = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, logprobs=TOP)
ENGINE = dict(dtype="bfloat16", kv_pool_bytes=2 << 20, max_num_batched_tokens=64, min_token_bucket=64,
              max_decode_steps=1, max_logprobs=TOP)
# relative to the largest logprob magnitude of a row: bf16 keeps 8 bits of mantissa, and the
# layouts differ in summation order (expert shards, devices); measured max ~0.8% on these models
TOLERANCE = 3e-2


@pytest.fixture(scope="module")
def models(mixed_model_dirs):
    return mixed_model_dirs           # q0, mx, ol, q1 (q1: q0's family and shapes, other weights)


@pytest.fixture(scope="module")
def batch(models):
    rng = np.random.default_rng(7)
    prompts = [rng.integers(1, 250, n).tolist() for n in (5, 19, 33, 8, 12, 27, 3, 40)]
    return prompts, [list(models)[i % len(models)] for i in range(len(prompts))]


def _score(llm, prompts, names):
    """Per prompt: ({token: logprob} of its top-TOP next tokens, the greedy token)."""
    outs = llm.generate(prompts, ONE, model=names)
    rows = []
    for o in outs:
        assert o.error is None, o.error
        c = o.outputs[0]
        rows.append(({t: lp.logprob for t, lp in c.logprobs[0].items()}, c.token_ids[0]))
    return rows


def _scores_of(llm, batch, first=None):
    prompts, names = batch
    got = _score(llm, prompts, names)
    extended = [p + [t] for p, (_, t) in zip(prompts, first or got)]
    return got, _score(llm, extended, names)


@pytest.fixture(scope="module")
def single(models, batch):
    return _scores_of(LLM(models, **ENGINE), batch)


# Every CrossPool split the tests use (1+1: a device pair's arena; 2+2, 6+2 and 4+4 with each
# attention side on 2 KV devices: expert shards, another summation order) and the placed modes
# on several devices (each model's step whole on its device).
@pytest.mark.parametrize("mode,n_kv,n_w,replicas", [("crosspool", 1, 1, 1), ("crosspool", 2, 2, 1),
                                                     ("crosspool", 6, 2, 1),
                                                     ("crosspool", 4, 4, 2), ("shared", 4, 4, 1),
                                                     ("static", 2, 2, 1)])
def test_layouts_stay_within_bf16_rounding_of_one_device(models, batch, single, mode, n_kv, n_w, replicas):
    llm = LLM(models, mode=mode, kv_devices=n_kv, weight_devices=n_w, attention_replicas=replicas, **ENGINE)
    got = _scores_of(llm, batch, first=single[0])
    worst = 0.0
    for step_want, step_got in zip(single, got):
        for (want, _), (have, _) in zip(step_want, step_got):
            common = set(want) & set(have)
            assert len(common) >= TOP // 2            # the same candidates, up to near-ties at the edge
            scale = max(abs(v) for v in want.values())
            for t in common:
                worst = max(worst, abs(want[t] - have[t]) / scale)
    assert worst < TOLERANCE, worst
