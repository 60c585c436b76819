"""What `LLMEngine.step()` reports of a request by its `SamplingParams.output_kind`
(vLLM's RequestOutputKind), on a shipped checkpoint with a tokenizer (text, stop strings)."""
import dataclasses
import pathlib

import pytest

from crosspool_jax import LLM, RequestOutputKind, SamplingParams

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def llm():
    return LLM({"q": str(REPO / "checkpoints" / "qwen3-moe-tiny")}, dtype="float32", kv_pool_bytes=4 << 20,
               max_num_batched_tokens=64, min_token_bucket=64, max_decode_steps=3)


def _run_kinds(engine, prompt, params, kinds):
    """Every output step() reports of one request per output kind (the same seeded request)."""
    for kind in kinds:
        engine.add_request(kind.name, "q", prompt, dataclasses.replace(params, output_kind=kind))
    seen = {kind.name: [] for kind in kinds}
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen[out.request_id].append(out)
    return seen


def _joined(deltas, n):
    """Per completion index: (text, token ids, logprobs, finish reasons seen) of DELTA outputs joined."""
    joined = {i: ["", [], [], []] for i in range(n)}
    for out in deltas:
        for c in out.outputs:
            j = joined[c.index]
            j[0] += c.text
            j[1] += c.token_ids
            j[2] += c.logprobs or []
            j[3].append(c.finish_reason)
    return joined


def test_output_kinds(llm):
    """CUMULATIVE reports the whole output each step; FINAL_ONLY once, finished, the same; DELTA
    only what is new (tokens, text, logprobs; prompt logprobs once), which joined is the same."""
    kinds = list(RequestOutputKind)
    params = SamplingParams(n=2, max_tokens=9, temperature=0.9, seed=5, logprobs=2, prompt_logprobs=1,
                            ignore_eos=True)
    seen = _run_kinds(llm.engine, [5, 6, 7, 8], params, kinds)
    cum, fin, delta = seen["CUMULATIVE"], seen["FINAL_ONLY"], seen["DELTA"]
    assert len(cum) > 2 and not cum[0].finished and len(fin) == 1 and fin[0].finished
    last = cum[-1]
    for a, b in zip(fin[0].outputs, last.outputs):
        assert (a.text, a.token_ids, a.logprobs, a.cumulative_logprob) == (b.text, b.token_ids, b.logprobs,
                                                                          b.cumulative_logprob)
    assert len(delta) == len(cum) and delta[-1].finished
    assert delta[0].prompt_logprobs == last.prompt_logprobs and len(last.prompt_logprobs) == 4
    assert all(out.prompt_logprobs is None for out in delta[1:])
    joined = _joined(delta, 2)
    for c in last.outputs:
        text, ids, lps, reasons = joined[c.index]
        assert (text, ids, lps) == (c.text, c.token_ids, c.logprobs) and len(ids) == 9
        assert reasons[-1] == "length" and all(r is None for r in reasons[:-1])
    assert sum(len(c.token_ids) for c in delta[1].outputs) <= 2 * llm.engine.config.max_decode_steps


def test_delta_text_is_never_taken_back_by_a_stop_string(llm):
    """A DELTA request holds back the text a stop string may still end in: its joined text is
    the cumulative request's, cut before the stop string, whichever token completes it."""
    base = _run_kinds(llm.engine, [9, 10, 11], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
                      [RequestOutputKind.CUMULATIVE])["CUMULATIVE"][-1].outputs[0]
    assert len(base.text) >= 6
    stop = base.text[3:6]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, stop=[stop])
    seen = _run_kinds(llm.engine, [9, 10, 11], params, [RequestOutputKind.CUMULATIVE, RequestOutputKind.DELTA])
    want = seen["CUMULATIVE"][-1].outputs[0]
    assert want.finish_reason == "stop" and want.stop_reason == stop and want.text == base.text[:3]
    text, ids, _, reasons = _joined(seen["DELTA"], 1)[0]
    assert (text, ids, reasons[-1]) == (want.text, want.token_ids, "stop")
