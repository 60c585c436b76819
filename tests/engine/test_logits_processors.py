"""logit_bias, allowed_token_ids, bad_words, prompt_logprobs and logprob ranks through the engine,
against transformers (torch CPU) on a shipped tiny checkpoint (it has a tokenizer, for bad_words).

The generation references recompute every step's logits with transformers and apply each
processor to them in numpy; prompt logprobs are compared with transformers' full forward,
with prompts chunked over several steps, several completions and a shared prefix.
"""
import os

import numpy as np
import pytest
import torch
import transformers

from crosspool_jax import LLM, SamplingParams

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = os.path.join(ROOT, "checkpoints", "mixtral-tiny")
V = 1024
MAX_TOKENS = 8
# one 64-token bucket: prompts longer than 64 tokens are prefilled in several chunks
ENGINE = dict(kv_pool_bytes=2 << 20, max_num_batched_tokens=64, min_token_bucket=64, max_decode_steps=4)


@pytest.fixture(scope="module")
def llm():
    return LLM({"m": MODEL}, dtype="float32", **ENGINE)


@pytest.fixture(scope="module")
def hf():
    return transformers.AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()


def _hf_log_softmax(hf, ids) -> np.ndarray:
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, -1).numpy()


def _np_processed(logits_V, bias=None, allowed=None, bad_words_ids=(), output=()):
    """The logits processors in numpy: allowed mask, bad words (suffix rule), additive bias."""
    x = logits_V.copy()
    for t, b in (bias or {}).items():
        x[t] += b
    if allowed is not None:
        keep = np.zeros(len(x), bool)
        keep[list(allowed)] = True
        x[~keep] = -np.inf
    for ids in bad_words_ids:
        if len(ids) - 1 <= len(output) and list(output[len(output) - len(ids) + 1:]) == list(ids[:-1]):
            x[ids[-1]] = -np.inf
    return x


def _hf_greedy(hf, prompt, **processors):
    out = []
    for _ in range(MAX_TOKENS):
        logits = _hf_log_softmax(hf, prompt + out)[-1]
        out.append(int(np.argmax(_np_processed(logits, output=out, **processors))))
    return out


def _greedy(**kw):
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, **kw)


def _prompt(seed, n):
    return np.random.default_rng(seed).integers(5, V - 5, n).tolist()


def _two_token_word(llm, tokens):
    """A word whose token ids are two consecutive generated tokens (so banning it bites)."""
    entry = llm.engine.registry.get("m")
    for a, b in zip(tokens, tokens[1:]):
        text = entry.tokenizer.decode([a, b])
        if text.strip() == text and [a, b] in entry.encode_bad_words([text]):
            return text, entry.encode_bad_words([text])
    pytest.skip("no two consecutive generated tokens spell a word that tokenizes back to them")


def test_logit_bias_allowed_ids_and_bad_words_match_numpy_on_transformers_logits(llm, hf):
    prompt = _prompt(0, 20)
    plain = llm.generate([prompt], _greedy(), model="m")[0].outputs[0].token_ids
    assert plain == _hf_greedy(hf, prompt)
    word, word_ids = _two_token_word(llm, plain)
    assert any(len(ids) == 2 for ids in word_ids)
    entry = llm.engine.registry.get("m")
    one_token = entry.tokenizer.decode([plain[0]])
    cases = [
        (dict(logit_bias={plain[0]: -100.0, 17: 5.0, 300: 2.5}), dict(bias={plain[0]: -100.0, 17: 5.0, 300: 2.5})),
        (dict(allowed_token_ids=[3, 17, 40, 300, 512]), dict(allowed=[3, 17, 40, 300, 512])),
        (dict(allowed_token_ids=[3, 17, 40], logit_bias={40: 3.0, 600: 80.0}), dict(allowed=[3, 17, 40], bias={40: 3.0})),
        (dict(bad_words=[word]), dict(bad_words_ids=word_ids)),
        (dict(bad_words=[one_token]), dict(bad_words_ids=entry.encode_bad_words([one_token]))),
    ]
    prompts = [prompt] * (len(cases) + 1)
    params = [_greedy(**kw) for kw, _ in cases] + [_greedy()]
    outs = llm.generate(prompts, params, model="m")          # one batch: plain rows beside processed ones
    assert outs[-1].outputs[0].token_ids == plain
    for (kw, ref), out in zip(cases, outs):
        assert out.error is None, out.error
        got = out.outputs[0].token_ids
        assert got == _hf_greedy(hf, prompt, **ref), kw
        assert got != plain, kw                              # each processor changed the text


def test_allowed_ids_hold_for_sampled_tokens_over_multi_step_decodes(llm):
    allowed = [7, 70, 700]
    out = llm.generate([_prompt(1, 9)], SamplingParams(max_tokens=24, temperature=5.0, seed=3, ignore_eos=True,
                                                       allowed_token_ids=allowed, logprobs=2), model="m")[0]
    tokens = out.outputs[0].token_ids
    assert len(tokens) == 24 and set(tokens) <= set(allowed)
    for t, lps in zip(tokens, out.outputs[0].logprobs):       # ranks of the raw distribution, also past the top-2
        assert lps[t].rank is not None and lps[t].rank >= 1
    assert max(lps[t].rank for t, lps in zip(tokens, out.outputs[0].logprobs)) > 2


def test_prompt_logprobs_match_transformers_with_chunked_prefill(llm, hf):
    long_prompt = _prompt(2, 150)                        # three chunks of at most 64 tokens
    shared = long_prompt[:100] + _prompt(3, 20)          # shares cached blocks with the first
    k = 3
    params = SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=k, n=2, logprobs=1)
    outs = llm.generate([long_prompt, shared, [9]], [params, params, SamplingParams(max_tokens=2, prompt_logprobs=0)],
                        model="m")
    for prompt, out in zip([long_prompt, shared], outs):
        lps = out.prompt_logprobs
        assert len(lps) == len(prompt) and lps[0] is None
        want = _hf_log_softmax(hf, prompt)
        for p in range(1, len(prompt)):
            row = want[p - 1]
            entry = lps[p]
            got = entry[prompt[p]]
            np.testing.assert_allclose(got.logprob, row[prompt[p]], atol=2e-4)
            assert abs(got.rank - int((row >= row[prompt[p]]).sum())) <= 1     # float32 near-ties aside
            top = np.argsort(-row)[:k]
            for r, t in enumerate(top, start=1):
                if t != prompt[p]:
                    assert entry[int(t)].rank == r
                    np.testing.assert_allclose(entry[int(t)].logprob, row[t], atol=2e-4)
            assert len(entry) in (k, k + 1)
            assert got.decoded_token == llm.engine.get_tokenizer("m").decode([prompt[p]], skip_special_tokens=False)
        for c in out.outputs:
            assert all(lp[t].rank is not None for t, lp in zip(c.token_ids, c.logprobs))
    assert outs[2].prompt_logprobs == [None]
    times = outs[0].metrics
    assert times["arrival_time"] <= times["first_scheduled_time"] <= times["first_token_time"]


def test_prompt_logprobs_without_top_tokens_on_an_engine_of_max_logprobs_0(hf):
    """max_logprobs=0 leaves the prompt-logprobs program with no top tokens (empty [T, 0]
    arrays): prompt_logprobs=0 still scores every prompt token, and the warm-up compiles it."""
    llm0 = LLM({"m": MODEL}, dtype="float32", max_logprobs=0, **ENGINE)
    llm0.engine.warm_up(variants=True)
    prompt = _prompt(4, 90)                              # two chunks
    out = llm0.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=0), model="m")[0]
    lps = out.prompt_logprobs
    assert len(lps) == len(prompt) and lps[0] is None
    want = _hf_log_softmax(hf, prompt)
    for p in range(1, len(prompt)):
        assert list(lps[p]) == [prompt[p]]
        np.testing.assert_allclose(lps[p][prompt[p]].logprob, want[p - 1][prompt[p]], atol=2e-4)


def test_requests_beyond_the_table_width_or_vocabulary_are_refused_by_field(llm):
    engine = llm.engine
    with pytest.raises(ValueError, match=r"SamplingParams\.allowed_token_ids: token id 5000"):
        engine.add_request("a", "m", [1, 2], SamplingParams(allowed_token_ids=[1, 5000]))
    with pytest.raises(ValueError, match=r"SamplingParams\.logit_bias: token id 1024"):
        engine.add_request("b", "m", [1, 2], SamplingParams(logit_bias={1024: 1.0}))
    words = [engine.get_tokenizer("m").decode([t]) for t in range(600, 660)]
    too_many = SamplingParams(logit_bias={i: 1.0 for i in range(100)}, bad_words=[w for w in words if w.strip()])
    with pytest.raises(ValueError, match=r"logit_bias, allowed_token_ids and bad_words together make \d+ .* at most 128"):
        engine.add_request("c", "m", [1, 2], too_many)
    assert not engine.has_unfinished_requests()
    assert engine.stats().requests_by_model == {"m": (0, 0)}
