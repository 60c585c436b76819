"""End to end with the real `LLMEngine`: the shipped models (checkpoints/) behind the server.

Where checkpoints/ holds fewer than two models, two tiny random Hugging Face models are
written to a temporary folder instead. Compilation dominates on CPU, so the requests reuse
few shapes: short prompts, at most 4 sequences per step, single-step decode.
"""
import importlib.util
import json
import os
import pathlib
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from crosspool_jax.engine import LLMEngine
from crosspool_jax.sampling_params import SamplingParams
from crosspool_jax.serve import shipped_models
from crosspool_jax.server import AsyncEngine, ServerMetrics, build_app
from server_live import LiveServer

REPO = pathlib.Path(__file__).resolve().parents[2]
ENGINE_OPTIONS = dict(dtype="float32", kv_pool_bytes=8 << 20, max_num_seqs=4,
                      max_num_batched_tokens=32, max_decode_steps=1)


def _load_test_module():
    spec = importlib.util.spec_from_file_location("load_test", REPO / "scripts" / "load_test.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["load_test"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    shipped = shipped_models(REPO / "checkpoints")
    if len(shipped) >= 2:
        return shipped
    from crosspool_jax.checkpoints.tiny_models import make_tiny_hf_model
    root = tmp_path_factory.mktemp("models")
    out = {}
    for family in ("mixtral", "olmoe"):
        make_tiny_hf_model(family, str(root / family), seed=3)
        out[f"{family}-tiny"] = str(root / family)
    return out


@pytest.fixture(scope="module")
def engine(models):
    return LLMEngine.from_options(models, **ENGINE_OPTIONS)


@pytest.fixture(scope="module")
def driven(engine):
    """The two models the tests send requests to (fewer models, fewer compilations)."""
    return engine.model_names[:2]


class _Served:
    """The server on `engine` for the duration of a with-block (the engine outlives it)."""

    def __init__(self, engine):
        self.metrics = ServerMetrics()
        self.async_engine = AsyncEngine(engine, metrics=self.metrics, stats_interval_s=0.01)
        self.live = LiveServer(build_app(self.async_engine, self.metrics))

    def __enter__(self):
        self.live.__enter__()
        self.url = self.live.url
        return self

    def __exit__(self, *exc):
        self.live.__exit__(*exc)


def _run_engine(engine, model, prompt, max_tokens) -> tuple[list[int], str]:
    """Greedy generation by calling the engine directly (no server in between)."""
    final = _engine_output(engine, model, prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0))
    return list(final.outputs[0].token_ids), final.outputs[0].text


def _engine_output(engine, model, prompt, params):
    """The finished RequestOutput of one request run on the engine directly."""
    rid = f"direct-{random.randrange(1 << 30)}"
    engine.add_request(rid, model, prompt, params)
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == rid and out.finished:
                final = out
    assert final is not None and final.error is None
    return final


def test_greedy_through_server_equals_engine(engine, driven, rng):
    a, b = driven
    cases = [(a, [rng.randrange(3, 100) for _ in range(rng.randint(3, 7))], 6),
             (b, [rng.randrange(3, 100) for _ in range(rng.randint(3, 7))], 5)]
    chat_model = next((m for m in driven if engine.get_tokenizer(m) is not None), None)
    messages = [{"role": "user", "content": "Hello there"}]
    got = []
    with _Served(engine) as served:
        client = openai.OpenAI(base_url=served.url + "/v1", api_key="x", max_retries=0)
        listed = {m.id: m for m in client.models.list().data}
        assert set(listed) == set(engine.model_names)
        assert all(isinstance(m.model_extra["resident"], bool) for m in listed.values())
        assert listed[a].model_extra["max_model_len"] == engine.max_model_len(a)
        device = engine.registry.model_stats()[a]["device"]          # the device it is placed on
        assert device is not None and listed[a].model_extra["device"] == device
        out = client.completions.create(model=a, prompt=cases[0][1], max_tokens=cases[0][2],
                                        temperature=0.0, extra_body={"return_token_ids": True})
        got.append((out.choices[0].model_extra["token_ids"], out.choices[0].text))
        assert out.usage.prompt_tokens == len(cases[0][1])
        assert out.usage.completion_tokens == len(got[0][0]) <= cases[0][2]
        stream = client.completions.create(
            model=b, prompt=cases[1][1], max_tokens=cases[1][2], temperature=0.0, stream=True,
            stream_options={"include_usage": True}, extra_body={"return_token_ids": True})
        ids, text, usage = [], "", None
        for chunk in stream:
            for c in chunk.choices:
                ids += c.model_extra["token_ids"]
                text += c.text
            usage = chunk.usage or usage
        got.append((ids, text))
        assert usage.completion_tokens == len(ids)
        if chat_model is not None:
            chat = client.chat.completions.create(model=chat_model, messages=messages,
                                                  max_tokens=4, temperature=0.0,
                                                  extra_body={"return_token_ids": True})
            chat_ids = chat.choices[0].model_extra["token_ids"]
        else:  # no tokenizer among the driven models: chat must say so
            with pytest.raises(openai.BadRequestError, match="no tokenizer"):
                client.chat.completions.create(model=a, messages=messages, max_tokens=4)
    # The server is down: the engine is ours again.
    for (model, prompt, max_tokens), (ids, text) in zip(cases, got):
        want_ids, want_text = _run_engine(engine, model, prompt, max_tokens)
        assert ids == want_ids and text == want_text, model
    if chat_model is not None:
        tok = engine.get_tokenizer(chat_model)
        prompt_ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True),
                                add_special_tokens=False)
        assert chat_ids == _run_engine(engine, chat_model, prompt_ids, 4)[0]


def test_logits_processors_prompt_logprobs_and_echo_through_the_openai_client(engine, driven):
    """logit_bias, allowed_token_ids, bad_words and prompt_logprobs (completions and chat), and
    echo with logprobs, through the official client: each equals the engine run directly."""
    model = next(m for m in driven if engine.get_tokenizer(m) is not None)
    tok = engine.get_tokenizer(model)
    prompt = [5, 61, 17, 300, 42, 9, 77, 8, 120, 33, 4, 250, 19, 64, 90, 3, 7, 11, 13, 21, 34, 55, 89, 144,
              233, 377, 610, 2, 6, 10, 14, 18, 22, 26, 30, 38, 46, 50]       # 38 tokens: two prefill chunks
    greedy = dict(max_tokens=5, temperature=0.0, ignore_eos=True)
    plain = _engine_output(engine, model, prompt, SamplingParams(**greedy)).outputs[0].token_ids
    word = tok.decode([plain[0]])
    cases = [dict(logit_bias={plain[0]: -100.0, 77: 4.0}), dict(allowed_token_ids=[3, 77, 300, 500]),
             dict(bad_words=[word])]
    with _Served(engine) as served:
        client = openai.OpenAI(base_url=served.url + "/v1", api_key="x", max_retries=0)
        got = []
        for kw in cases:
            body = dict(kw)
            logit_bias = {str(t): b for t, b in body.pop("logit_bias", {}).items()} or None
            out = client.completions.create(model=model, prompt=prompt, logit_bias=logit_bias,
                                            extra_body={"return_token_ids": True, "ignore_eos": True, **body},
                                            max_tokens=5, temperature=0.0)
            got.append(out.choices[0].model_extra["token_ids"])
        scored = client.completions.create(model=model, prompt=prompt, max_tokens=2, temperature=0.0, echo=True,
                                           logprobs=2, extra_body={"prompt_logprobs": 1, "return_token_ids": True})
        streamed = [c.choices[0] for c in client.completions.create(
            model=model, prompt=prompt, max_tokens=2, temperature=0.0, echo=True, logprobs=2, stream=True)
            if c.choices]
        chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi there"}],
                                              max_tokens=2, temperature=0.0, extra_body={"prompt_logprobs": 0})
        with pytest.raises(openai.BadRequestError, match="allowed_token_ids"):
            client.completions.create(model=model, prompt=prompt, extra_body={"allowed_token_ids": [1, 10 ** 6]})
    for kw, ids in zip(cases, got):
        assert ids == _engine_output(engine, model, prompt, SamplingParams(**greedy, **kw)).outputs[0].token_ids, kw
        assert ids != plain, kw
    assert set(got[1]) <= {3, 77, 300, 500}
    want = _engine_output(engine, model, prompt, SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=2,
                                                                logprobs=2))
    choice = scored.choices[0]
    plps = choice.model_extra["prompt_logprobs"]
    assert len(plps) == len(prompt) and plps[0] is None
    for p in range(1, len(prompt)):
        entry = want.prompt_logprobs[p][prompt[p]]
        assert plps[p][str(prompt[p])]["logprob"] == pytest.approx(entry.logprob, abs=1e-5)
        assert plps[p][str(prompt[p])]["rank"] == entry.rank
        assert all(v["rank"] <= 1 or int(t) == prompt[p] for t, v in plps[p].items())
    lps = choice.logprobs                           # echo: the prompt's tokens, then the generated ones
    assert len(lps.tokens) == len(prompt) + 2 and lps.token_logprobs[0] is None and lps.top_logprobs[0] is None
    assert lps.token_logprobs[1:len(prompt)] == pytest.approx(
        [want.prompt_logprobs[p][prompt[p]].logprob for p in range(1, len(prompt))], abs=1e-5)
    assert lps.token_logprobs[len(prompt):] == pytest.approx(
        [lp[t].logprob for t, lp in zip(want.outputs[0].token_ids, want.outputs[0].logprobs)], abs=1e-5)
    assert choice.text.startswith(tok.decode(prompt)) and lps.text_offset[0] == 0
    assert "".join(c.text for c in streamed) == choice.text                      # the stream: echo chunk first
    assert sum((c.logprobs.token_logprobs for c in streamed), []) == pytest.approx(lps.token_logprobs, abs=1e-6)
    assert sum((c.logprobs.text_offset for c in streamed), []) == lps.text_offset
    chat_plps = chat.model_extra["prompt_logprobs"]
    assert chat_plps[0] is None and all(len(e) == 1 for e in chat_plps[1:])


def test_bounded_load_across_models(engine, driven):
    load_test = _load_test_module()
    with _Served(engine) as served:
        report = load_test.run_load(served.url, num_requests=24, concurrency=24,
                                    max_tokens=(2, 8), prompt_len=(2, 10),
                                    disconnect_fraction=0.25, seed=random.randrange(1 << 20),
                                    models=list(driven), timeout_s=300)
        print(report.summary())
        assert report.failed == [] and report.completed + report.cancelled == 24
        assert report.completed >= 12 and report.healthy
        assert not any(report.kv_pages_used.values()), report.kv_pages_used
        assert httpx.get(served.url + "/health").status_code == 200
    stats = engine.stats()
    assert not engine.has_unfinished_requests()
    assert sum(stats.kv_pages_used_by_model.values()) == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_binary_sigterm_finishes_in_flight_and_exits_zero(models):
    port = _free_port()
    names = sorted(models)[:2]
    cmd = [sys.executable, "-m", "crosspool_jax.serve", "--port", str(port), "--dtype", "float32",
           "--kv_pool_bytes", "8MiB", "--max_num_seqs", "4", "--max_decode_steps", "1",
           "--log_level", "warning", "--nowarmup"]    # the first request must still be compiling at SIGTERM
    for name in names:
        cmd += ["--model", f"{name}={models[name]}"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "server did not come up"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        assert sorted(m["id"] for m in httpx.get(url + "/v1/models").json()["data"]) == names
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        out = client.completions.create(model=names[1], prompt=[7, 11, 13], max_tokens=2,
                                        temperature=0.0)
        assert 1 <= out.usage.completion_tokens <= 2  # EOS may come first
        assert out.choices[0].finish_reason in ("length", "stop")
        result = {}

        def request():
            events = []
            with httpx.stream("POST", url + "/v1/completions", timeout=120, json={
                    "model": names[0], "prompt": [5, 9, 13], "max_tokens": 1,
                    "temperature": 0.0, "stream": True}) as r:
                result["status"] = r.status_code
                events += [line for line in r.iter_lines() if line.startswith("data: ")]
            result["events"] = events

        t = threading.Thread(target=request)
        t.start()
        deadline = time.monotonic() + 60
        while "crosspool_requests_in_flight 1.0" not in httpx.get(url + "/metrics").text:
            assert time.monotonic() < deadline and t.is_alive(), result
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        t.join(120)
        assert proc.wait(120) == 0, proc.stdout.read().decode()[-3000:]
        assert result["status"] == 200 and result["events"][-1] == "data: [DONE]"
        finish = [c["finish_reason"] for e in result["events"][:-1]
                  for c in json.loads(e[6:])["choices"]]
        assert finish[-1] in ("length", "stop")
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    lines = [ln for ln in text.splitlines() if ln.startswith(name + " ")]
    assert len(lines) == 1, text
    return float(lines[0].split()[1])


def _compiles_metric(url: str) -> float:
    return _metric(url, "crosspool_xla_compiles_total")


def test_served_run_compiles_nothing_after_warm_up(models):
    """After the server's warm-up, a served mix of requests (greedy and sampled, logprobs,
    penalties, n > 1, streamed, prefill chunks and multi-step decode, logit_bias,
    allowed_token_ids, bad_words, prompt_logprobs) compiles no XLA program: /metrics' compile
    counter and the process's counter stay flat, with async scheduling on (its continuations,
    fed from the device's token table, run the warmed-up programs). One model, the first shipped one (DeepSeek-V2's
    MLA, which no other warm-up test compiles): each model's programs are its own, and the
    warm-up of several models (two of one architecture, lane programs included) then serving
    them without a compile is tests/engine/test_lanes.py's."""
    from crosspool_jax.runtime.compiles import compile_counter
    from crosspool_jax.serve import warm_up

    model = sorted(models)[0]
    engine = LLMEngine.from_options({model: models[model]}, dtype="float32", kv_pool_bytes=4 << 20,
                                    max_num_seqs=4, max_num_batched_tokens=16, max_decode_steps=2,
                                    max_model_len=48, max_logprobs=3, async_scheduling=True)
    done = warm_up(engine, variants=True)          # logprobs programs too (a CPU warms up only the plain ones)
    assert done["programs"] > 0 and done["compiles"] > 0
    stats = engine.stats()
    assert stats.kv_pages_free == stats.kv_pages_total and not engine.has_unfinished_requests()
    metrics = ServerMetrics()
    async_engine = AsyncEngine(engine, metrics=metrics)
    counter = compile_counter()
    try:
        with LiveServer(build_app(async_engine, metrics)) as live:
            client = openai.OpenAI(base_url=live.url + "/v1", api_key="x")
            before, before_metric = counter.count, _compiles_metric(live.url)
            rng = random.Random(5)
            for i in range(9):
                prompt = [rng.randrange(1, 200) for _ in range(rng.randrange(3, 30))]
                extra = {}
                if i % 3 == 1:
                    extra = dict(temperature=0.9, top_p=0.8, logprobs=2, n=2, seed=i)
                if i % 3 == 2:
                    extra = dict(temperature=0.7, frequency_penalty=0.5, presence_penalty=0.3, seed=i)
                if i == 6:
                    extra = dict(logit_bias={"7": 5.0}, extra_body={"allowed_token_ids": [7, 8, 9], "prompt_logprobs": 2})
                if i == 7:
                    extra = dict(temperature=0.5, extra_body={"bad_words": ["a b", "c"]})
                if i == 4:
                    chunks = list(client.completions.create(model=model, prompt=prompt, max_tokens=7, stream=True,
                                                            **extra))
                    assert any(c.choices and c.choices[0].text is not None for c in chunks)
                else:
                    out = client.completions.create(model=model, prompt=prompt, max_tokens=7, **extra)
                    assert out.usage.completion_tokens >= 1
            assert counter.count == before, f"{counter.count - before} programs compiled while serving"
            assert _compiles_metric(live.url) == before_metric
            assert engine.stats().continuations > 0
            assert _metric(live.url, "crosspool_async_continuations_total") == engine.stats().continuations
            stats = engine.stats()
            assert _metric(live.url, "crosspool_engine_steps_total") == stats.engine_steps >= stats.continuations
            assert _metric(live.url, "vllm:prefix_cache_queries_total") == stats.prefix_cache_queries > 0
    finally:
        async_engine.shutdown()
