"""One bad request must never hurt another, in the Python API: edge validation in `LLM` /
`LLMEngine.add_request`, and request isolation inside `LLMEngine.step` (a request whose run
raises fails alone, its pages freed, the rest of the step goes on)."""
import os

import pytest

from crosspool_jax import LLM, SamplingParams

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(REPO, "checkpoints", "mixtral-tiny")
GREEDY = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
    return LLM({"mixtral-tiny": MODEL}, dtype="float32", kv_pool_bytes=1 << 20)


def _pages_used(llm) -> int:
    return sum(llm.engine.stats().kv_pages_used_by_model.values())


def _ids(out):
    return out.outputs[0].token_ids


def test_step_failure_of_one_request_fails_it_alone(llm, monkeypatch):
    prompts = [[5, 6, 7], [9, 10, 11, 12], [13, 14]]
    want = [_ids(o) for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    dispatch_all = llm.engine.runner.dispatch_all              # the engine's entry into the runner

    def poisoned(steps):
        if any(c.request.prompt_token_ids == [9, 10, 11, 12] for step in steps for c in step.chunks):
            raise OverflowError("poisoned request")
        return dispatch_all(steps)

    monkeypatch.setattr(llm.engine.runner, "dispatch_all", poisoned)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert outs[1].error is not None and "OverflowError: poisoned request" in outs[1].error
    assert outs[1].outputs[0].finish_reason == "error"
    assert [_ids(outs[0]), _ids(outs[2])] == [want[0], want[2]]
    assert outs[0].error is None and outs[2].error is None
    assert _pages_used(llm) == 0 and not llm.engine.has_unfinished_requests()
    monkeypatch.undo()
    assert [_ids(o) for o in llm.generate(prompts, GREEDY, use_tqdm=False)] == want


def test_int32_overflow_values_fail_alone_and_leave_nothing_behind(llm):
    bad = SamplingParams(max_tokens=3, temperature=0.0)
    bad.top_k = 2 ** 31                       # changed after validation: add_request validates again
    oob_stop = SamplingParams(max_tokens=3, stop_token_ids=[10 ** 6])
    outs = llm.generate([[5, 6, 7], [5, 6, 7], [8, 9]], [bad, oob_stop, GREEDY], use_tqdm=False)
    assert "SamplingParams.top_k" in outs[0].error
    assert "stop_token_ids" in outs[1].error and "vocabulary" in outs[1].error
    assert outs[2].error is None and len(_ids(outs[2])) == 3
    for _ in range(2):                        # the engine is not stuck on them
        again = llm.generate([[8, 9]], GREEDY, use_tqdm=False)[0]
        assert _ids(again) == _ids(outs[2])
    assert _pages_used(llm) == 0 and not llm.engine.has_unfinished_requests()


def test_malformed_prompts(llm):
    for bad in (5, None, b"hi", 2.5):
        with pytest.raises(ValueError, match="prompt"):
            llm.generate(bad, GREEDY, use_tqdm=False)
    one = llm.generate((5, 6, 7), GREEDY, use_tqdm=False)   # a tuple of ids is ONE prompt
    assert len(one) == 1 and _ids(one[0]) == _ids(llm.generate([[5, 6, 7]], GREEDY, use_tqdm=False)[0])
    outs = llm.generate(["ok", "\ud800 lone surrogate", [1, "x"], {"text": "?"}, [10 ** 7]],
                        GREEDY, use_tqdm=False)
    assert outs[0].error is None
    assert "not valid Unicode" in outs[1].error and "position 0" in outs[1].error
    assert "token ids must be integers" in outs[2].error
    assert "'prompt' or 'prompt_token_ids'" in outs[3].error
    assert "outside the vocabulary" in outs[4].error
    assert _pages_used(llm) == 0 and not llm.engine.has_unfinished_requests()


def test_interrupted_generate_aborts_its_requests(llm, monkeypatch):
    step = llm.engine.step
    calls = []

    def interrupted():
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return step()

    monkeypatch.setattr(llm.engine, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        llm.generate([[5, 6, 7], [8, 9]], SamplingParams(max_tokens=8, temperature=0.0), use_tqdm=False)
    monkeypatch.undo()
    assert not llm.engine.has_unfinished_requests() and _pages_used(llm) == 0
    assert len(_ids(llm.generate([[8, 9]], GREEDY, use_tqdm=False)[0])) == 3


def test_chat_batches_and_bad_messages(llm):
    convs = [[{"role": "user", "content": "Hello"}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]]
    one = llm.chat(convs[0], GREEDY, use_tqdm=False)
    both = llm.chat(convs, GREEDY, use_tqdm=False)
    assert len(one) == 1 and len(both) == 2 and _ids(both[0]) == _ids(one[0])
    with pytest.raises(ValueError, match=r"messages\[0\] must be a dict with a string 'role'"):
        llm.chat([{"content": "no role"}], GREEDY)
    with pytest.raises(ValueError, match=r"conversation 1: messages\[1\]"):
        llm.chat([convs[0], [{"role": "user", "content": "x"}, {"role": 3}]], GREEDY)


def test_constructor_arguments():
    with pytest.raises(ValueError, match="kv_devices"):
        LLM({"m": MODEL}, kv_devices=2.5)
    with pytest.raises(ValueError, match="unknown engine option.*'kv_device'"):
        LLM({"m": MODEL}, kv_device=2)
    with pytest.raises(ValueError, match="not both"):
        LLM({"m": MODEL}, model=MODEL)
    llm = LLM(model=MODEL, dtype="float32", kv_pool_bytes=1 << 20)
    assert llm.model_names == ["mixtral-tiny"]
