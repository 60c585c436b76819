"""Every endpoint and error case over raw HTTP, against the fake engine (outputs by hand)."""
import json
import threading
import time

import httpx
import pytest

from server_fake_engine import FakeTokenizer, expected_text, expected_tokens
from server_live import random_text, start_fake_server

TOK = FakeTokenizer()


def _post(server, path, body, **kw):
    return httpx.post(server.url + path, json=body, timeout=10, **kw)


def _sse(server, path, body):
    """The decoded `data:` payloads of a streamed response ('[DONE]' kept as a string)."""
    events = []
    with httpx.stream("POST", server.url + path, json=body, timeout=10) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: "):]
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def _assert_error(r, status, *, param=None, contains=()):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if param is not None:
        assert err["param"] == param
    for text in contains:
        assert text in err["message"], err["message"]
    return err


def test_health_and_models(fake_server):
    assert httpx.get(fake_server.url + "/health").json() == {"status": "ok"}
    data = httpx.get(fake_server.url + "/v1/models").json()["data"]
    assert [m["id"] for m in data] == ["alpha", "beta"]
    for m in data:
        assert m["object"] == "model" and m["owned_by"] == "crosspool-jax"
        assert m["max_model_len"] == 64 and isinstance(m["resident"], bool)
    assert data[0]["resident"] is True


def test_completion_string_and_token_prompts(fake_server, rng):
    text = random_text(rng)
    max_tokens = rng.randint(2, 12)
    r = _post(fake_server, "/v1/completions", {"model": "alpha", "prompt": text,
                                               "max_tokens": max_tokens})
    body = r.json()
    p = len(TOK.encode(text))
    assert body["object"] == "text_completion" and body["model"] == "alpha"
    assert body["choices"][0]["text"] == expected_text(p, max_tokens)
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": p, "completion_tokens": max_tokens,
                             "total_tokens": p + max_tokens}
    # Extension: return_token_ids, whole and streamed.
    body = _post(fake_server, "/v1/completions", {"model": "alpha", "prompt": text,
                                                  "max_tokens": 3, "return_token_ids": True}).json()
    assert body["choices"][0]["token_ids"] == expected_tokens(p, 3)
    events = _sse(fake_server, "/v1/chat/completions", {
        "model": "alpha", "messages": [{"role": "user", "content": text}], "max_tokens": 3,
        "stream": True, "return_token_ids": True})
    q = len(TOK.encode(TOK.apply_chat_template([{"role": "user", "content": text}]), False))
    assert [t for e in events[1:-1] for c in e["choices"] for t in c["token_ids"]] == \
        expected_tokens(q, 3)
    # Two token-id prompts, n=2: choice index = prompt * n + j; the model has no tokenizer.
    ids = [[rng.randrange(3, 500) for _ in range(rng.randint(1, 8))] for _ in range(2)]
    body = _post(fake_server, "/v1/completions", {"model": "beta", "prompt": ids, "n": 2,
                                                  "max_tokens": 3}).json()
    got = {c["index"]: c["text"] for c in body["choices"]}
    assert "token_ids" not in body["choices"][0]
    assert got == {i * 2 + j: expected_text(len(ids[i]), 3, j) for i in range(2) for j in range(2)}
    assert body["usage"]["prompt_tokens"] == sum(map(len, ids))
    assert body["usage"]["completion_tokens"] == 12


def test_completion_stop_and_logprobs(fake_server, rng):
    text = random_text(rng)
    p = len(TOK.encode(text))
    full = expected_text(p, 10)
    stop = full[4:6]
    body = _post(fake_server, "/v1/completions", {"model": "alpha", "prompt": text,
                                                  "max_tokens": 10, "stop": [stop]}).json()
    choice = body["choices"][0]
    assert choice["text"] == full[:4] and choice["finish_reason"] == "stop"
    assert choice["stop_reason"] == stop
    # Streamed, the text that turns into the stop string is held back, never taken back.
    events = _sse(fake_server, "/v1/completions", {"model": "alpha", "prompt": text,
                                                   "max_tokens": 10, "stop": stop, "stream": True})
    assert "".join(c["text"] for e in events[:-1] for c in e["choices"]) == full[:4]
    body = _post(fake_server, "/v1/completions", {"model": "alpha", "prompt": text,
                                                  "max_tokens": 4, "logprobs": 2}).json()
    lp = body["choices"][0]["logprobs"]
    assert lp["tokens"] == list(full[:4]) and lp["token_logprobs"] == [-0.25] * 4
    assert lp["text_offset"] == [0, 1, 2, 3]
    assert lp["top_logprobs"][0] == {full[0]: -0.25, chr(ord(full[0]) + 1): -0.5}


def test_chat_completion(fake_server, rng):
    messages = [{"role": "system", "content": random_text(rng, 3, 10)},  # stay well inside
                {"role": "user", "content": random_text(rng, 3, 10)}]     # the 64-token context
    body = _post(fake_server, "/v1/chat/completions", {
        "model": "alpha", "messages": messages, "max_completion_tokens": 5, "logprobs": True,
        "top_logprobs": 1}).json()
    p = len(TOK.encode(TOK.apply_chat_template(messages), add_special_tokens=False))
    choice = body["choices"][0]
    assert body["object"] == "chat.completion"
    assert choice["message"] == {"role": "assistant", "content": expected_text(p, 5)}
    assert [c["token"] for c in choice["logprobs"]["content"]] == list(expected_text(p, 5))
    assert all(len(c["top_logprobs"]) == 1 for c in choice["logprobs"]["content"])
    assert body["usage"]["prompt_tokens"] == p
    r = _post(fake_server, "/v1/chat/completions", {"model": "beta", "messages": messages})
    _assert_error(r, 400, param="model", contains=["no tokenizer"])


def test_streaming_completion_with_usage(fake_server, rng):
    text = random_text(rng)
    p = len(TOK.encode(text))
    events = _sse(fake_server, "/v1/completions", {
        "model": "alpha", "prompt": text, "max_tokens": 6, "stream": True,
        "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(ch["text"] for c in chunks for ch in c["choices"]) == expected_text(p, 6)
    assert chunks[-2]["choices"][-1]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
    assert len(chunks) >= 3  # the text really arrived in pieces


def test_streaming_chat_several_choices(fake_server, rng):
    messages = [{"role": "user", "content": random_text(rng)}]
    p = len(TOK.encode(TOK.apply_chat_template(messages), add_special_tokens=False))
    events = _sse(fake_server, "/v1/chat/completions", {
        "model": "alpha", "messages": messages, "n": 2, "max_tokens": 4, "stream": True})
    assert events[-1] == "[DONE]"
    first = events[0]["choices"]
    assert [c["delta"] for c in first] == [{"role": "assistant", "content": ""}] * 2
    texts, reasons = {0: "", 1: ""}, {}
    for chunk in events[1:-1]:
        assert chunk["object"] == "chat.completion.chunk"
        for c in chunk["choices"]:
            texts[c["index"]] += c["delta"].get("content", "")
            if c["finish_reason"]:
                reasons[c["index"]] = c["finish_reason"]
    assert texts == {j: expected_text(p, 4, j) for j in range(2)}
    assert reasons == {0: "length", 1: "length"}


def test_error_cases(fake_server):
    url = fake_server.url
    r = httpx.post(url + "/v1/completions", content=b'{"model": "alpha", "prompt": ',
                   headers={"content-type": "application/json"})
    _assert_error(r, 400, contains=["not valid JSON"])
    _assert_error(httpx.post(url + "/v1/chat/completions", content=b"[1]"), 400)
    _assert_error(_post(fake_server, "/v1/completions", {"prompt": "x"}), 400, param="model")
    err = _assert_error(_post(fake_server, "/v1/completions", {"model": "gamma", "prompt": "x"}),
                        404, param="model", contains=["'gamma'", "alpha", "beta"])
    assert err["code"] == "model_not_found"
    _assert_error(_post(fake_server, "/v1/chat/completions", {
        "model": "nope", "messages": [{"role": "user", "content": "x"}]}), 404)
    _assert_error(_post(fake_server, "/v1/completions", {
        "model": "alpha", "prompt": "x", "temperature": -1}), 400, param="temperature",
        contains=["SamplingParams.temperature"])
    _assert_error(_post(fake_server, "/v1/completions", {
        "model": "alpha", "prompt": "x", "max_tokens": "ten"}), 400, param="max_tokens")
    _assert_error(_post(fake_server, "/v1/completions", {"model": "alpha", "prompt": "x" * 80}),
                  400, contains=["81 tokens"])
    _assert_error(_post(fake_server, "/v1/completions", {"model": "alpha", "prompt": ""}),
                  400, param="prompt")
    # The same bad prompt streamed is still a 400 before any event.
    r = _post(fake_server, "/v1/completions", {"model": "alpha", "prompt": "x" * 80,
                                               "stream": True})
    _assert_error(r, 400)
    fake_server.wait_idle()


def test_request_failing_alone_leaves_others_alone(fake_server, rng):
    text = random_text(rng)
    results = {}

    def good():
        results["good"] = _post(fake_server, "/v1/completions", {
            "model": "alpha", "prompt": text, "max_tokens": 20}).json()

    t = threading.Thread(target=good)
    t.start()
    _assert_error(_post(fake_server, "/v1/completions", {"model": "alpha", "prompt": "FAIL"}),
                  400, contains=["fake failure"])
    events = _sse(fake_server, "/v1/completions", {"model": "alpha", "prompt": "FAIL!",
                                                   "stream": True})
    assert events[0]["error"]["message"] == "fake failure" and events[-1] == "[DONE]"
    t.join()
    p = len(TOK.encode(text))
    assert results["good"]["choices"][0]["text"] == expected_text(p, 20)


def test_engine_step_failure_fails_running_requests_only(fake_server, rng):
    fake_server.engine.explode.set()
    r = _post(fake_server, "/v1/completions", {"model": "alpha", "prompt": random_text(rng)})
    _assert_error(r, 500, contains=["fake step failure"])
    text = random_text(rng)
    body = _post(fake_server, "/v1/completions", {"model": "alpha", "prompt": text,
                                                  "max_tokens": 3}).json()
    assert body["choices"][0]["text"] == expected_text(len(TOK.encode(text)), 3)
    assert httpx.get(fake_server.url + "/health").status_code == 200


def test_client_disconnect_aborts(fake_server, rng):
    engine = fake_server.engine
    engine.step_s = 0.01
    try:
        with httpx.stream("POST", fake_server.url + "/v1/completions", json={
                "model": "alpha", "prompt": random_text(rng), "max_tokens": 40,
                "stream": True}, timeout=10) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
        rid = json.loads(first[6:])["id"]
        deadline = time.monotonic() + 5
        while f"{rid}-0" not in engine.aborted:
            assert time.monotonic() < deadline, "stream disconnect did not abort"
            time.sleep(0.01)
        # Non-streaming: the client gives up (read timeout) and closes the connection.
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(fake_server.url + "/v1/completions", json={
                "model": "beta", "prompt": [7, 8, 9], "max_tokens": 50}, timeout=0.15)
        fake_server.wait_idle()
        assert len(engine.aborted) >= 2 and engine.pages_used() == {"alpha": 0, "beta": 0}
    finally:
        engine.step_s = 0.002
    deadline = time.monotonic() + 5
    while any(fake_server.async_engine.stats_snapshot().kv_pages_used_by_model.values()):
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_metrics(fake_server, rng):
    _post(fake_server, "/v1/completions", {"model": "alpha", "prompt": random_text(rng),
                                           "max_tokens": 5})
    _post(fake_server, "/v1/completions", {"model": "nope", "prompt": "x"})
    text = httpx.get(fake_server.url + "/metrics").text
    lines = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
             for line in text.splitlines() if line and not line.startswith("#")}
    assert lines['crosspool_requests_total{model="alpha",status="200"}'] >= 1
    assert lines['crosspool_requests_total{model="",status="404"}'] >= 1
    assert lines['vllm:time_to_first_token_seconds_count{model_name="alpha"}'] >= 1
    assert lines['vllm:inter_token_latency_seconds_count{model_name="alpha"}'] >= 4
    assert lines['vllm:time_per_output_token_seconds_count{model_name="alpha"}'] >= 1
    assert lines['vllm:e2e_request_latency_seconds_count{model_name="alpha"}'] >= 1
    assert lines['vllm:request_success_total{finished_reason="length",model_name="alpha"}'] >= 1
    for phase in ("queue", "prefill", "decode", "inference"):          # what vLLM's Grafana dashboard reads
        assert lines[f'vllm:request_{phase}_time_seconds_count{{model_name="alpha"}}'] >= 1, phase
    assert lines['vllm:request_queue_time_seconds_sum{model_name="alpha"}'] >= 0
    assert lines['vllm:request_prompt_tokens_bucket{le="+Inf",model_name="alpha"}'] >= 1
    assert lines['vllm:request_generation_tokens_sum{model_name="alpha"}'] >= 5
    assert lines['vllm:request_max_num_generation_tokens_count{model_name="alpha"}'] >= 1
    for name in ('crosspool_kv_pages_used{model="alpha"}', 'crosspool_weights_resident{model="beta"}',
                 "crosspool_swaps_in_total", "vllm:num_preemptions_total", 'vllm:num_requests_waiting{model_name="alpha"}',
                 'vllm:num_requests_running{model_name="beta"}', 'vllm:kv_cache_usage_perc{model_name="alpha"}',
                 "crosspool_kv_pages_total", "crosspool_requests_in_flight"):
        assert name in lines, name
    # All engine calls came from one thread.
    assert len(fake_server.engine.threads) == 1


def test_api_key_and_overload(rng):
    live, server = start_fake_server(api_key="sekret", max_queue=2)
    try:
        body = {"model": "alpha", "prompt": random_text(rng), "max_tokens": 2}
        _assert_error(_post(server, "/v1/completions", body), 401)
        _assert_error(_post(server, "/v1/completions", body,
                            headers={"Authorization": "Bearer wrong"}), 401)
        _assert_error(httpx.get(server.url + "/v1/models"), 401)
        auth = {"Authorization": "Bearer sekret"}
        assert _post(server, "/v1/completions", body, headers=auth).status_code == 200
        assert httpx.get(server.url + "/health").status_code == 200  # open without a key
        server.engine.paused.set()
        results = []
        threads = [threading.Thread(target=lambda: results.append(
            _post(server, "/v1/completions", body, headers=auth))) for _ in range(2)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 5
        while server.async_engine.num_in_flight < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        _assert_error(_post(server, "/v1/completions", body, headers=auth), 429)
        server.engine.paused.clear()
        for t in threads:
            t.join()
        assert [r.status_code for r in results] == [200, 200]
        assert _post(server, "/v1/completions", body, headers=auth).status_code == 200
    finally:
        server.engine.paused.clear()
        live.__exit__(None, None, None)


def test_graceful_shutdown_finishes_short_requests_and_aborts_long_ones(rng):
    live, server = start_fake_server(step_s=0.02, shutdown_timeout_s=0.3)
    results = {}

    def stream(name, max_tokens):
        lines = []
        try:
            with httpx.stream("POST", server.url + "/v1/completions", timeout=10, json={
                    "model": "alpha", "prompt": random_text(rng), "max_tokens": max_tokens,
                    "stream": True}) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        lines.append(line)
        except httpx.HTTPError:
            pass  # the long request's connection may be cut
        results[name] = lines

    def plain():
        results["plain"] = httpx.post(server.url + "/v1/completions", timeout=10, json={
            "model": "alpha", "prompt": random_text(rng), "max_tokens": 40})

    threads = [threading.Thread(target=stream, args=("short", 5)),
               threading.Thread(target=stream, args=("long", 40)), threading.Thread(target=plain)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 5
    while len(server.engine.added) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    live.__exit__(None, None, None)  # what SIGTERM does: stop accepting, wait, then cancel
    for t in threads:
        t.join(10)
    assert results["short"][-1] == "data: [DONE]"
    # The long one is ended when the grace runs out: an error event, then [DONE].
    assert results["long"][-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in results["long"][:-1]]
    assert not any(c["finish_reason"] for e in events for c in e.get("choices", []))
    assert "shutting down" in events[-1]["error"]["message"]
    assert results["plain"].status_code == 503                   # a JSON error, not a cut connection
    assert "shutting down" in results["plain"].json()["error"]["message"]
    long_id = json.loads(results["long"][0][6:])["id"] + "-0"
    assert long_id in server.engine.aborted and not server.engine.requests
    assert not server.async_engine.healthy  # the engine thread has stopped
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/health", timeout=1)


def test_several_tokens_per_step_stream_and_latency_metrics(rng):
    live, server = start_fake_server(tokens_per_step=3)
    try:
        text = random_text(rng)
        p = len(TOK.encode(text))
        events = _sse(server, "/v1/completions", {"model": "alpha", "prompt": text,
                                                  "max_tokens": 7, "stream": True,
                                                  "return_token_ids": True})
        pieces = [c["token_ids"] for e in events[:-1] for c in e["choices"]]
        assert [len(piece) for piece in pieces] == [1] * 7       # one token per chunk, as vLLM
        assert all(len(e["choices"]) == 1 for e in events[:-1])
        assert "".join(c["text"] for e in events[:-1] for c in e["choices"]) == expected_text(p, 7)
        metrics = httpx.get(server.url + "/metrics").text
        # One first token, then 6 later tokens, each timed as its share of its step's gap.
        assert 'vllm:time_to_first_token_seconds_count{model_name="alpha"} 1.0' in metrics
        assert 'vllm:inter_token_latency_seconds_count{model_name="alpha"} 6.0' in metrics
        assert 'vllm:generation_tokens_total{model_name="alpha"} 7.0' in metrics
        assert f'vllm:prompt_tokens_total{{model_name="alpha"}} {float(p)}' in metrics
    finally:
        live.__exit__(None, None, None)


def test_engine_loop_crash_makes_server_unhealthy(rng):
    live, server = start_fake_server()
    try:
        server.engine.paused.set()
        result = {}
        t = threading.Thread(target=lambda: result.update(r=_post(server, "/v1/completions", {
            "model": "alpha", "prompt": random_text(rng)})))
        t.start()
        deadline = time.monotonic() + 5
        while not server.engine.requests:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        server.engine.crash.set()
        t.join(10)
        _assert_error(result["r"], 503, contains=["fake crash"])
        assert httpx.get(server.url + "/health").status_code == 503
        _assert_error(_post(server, "/v1/completions", {"model": "alpha", "prompt": "x"}), 503,
                      contains=["engine is not running"])
    finally:
        live.__exit__(None, None, None)


def test_echo_and_continuous_usage(fake_server, rng):
    text = random_text(rng)
    p = len(TOK.encode(text))
    body = _post(fake_server, "/v1/completions", {"model": "alpha", "prompt": text, "max_tokens": 3,
                                                  "echo": True}).json()
    assert body["choices"][0]["text"] == text + expected_text(p, 3)
    ids = [ord(c) for c in "Hey"]
    body = _post(fake_server, "/v1/completions", {"model": "alpha", "prompt": ids, "max_tokens": 2,
                                                  "echo": True}).json()
    assert body["choices"][0]["text"] == "Hey" + expected_text(3, 2)
    events = _sse(fake_server, "/v1/completions", {
        "model": "alpha", "prompt": text, "max_tokens": 3, "echo": True, "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    chunks = [e for e in events[:-1] if e["choices"]]
    assert "".join(c["text"] for e in chunks for c in e["choices"]) == text + expected_text(p, 3)
    assert [e["usage"]["completion_tokens"] for e in chunks[1:]] == [1, 2, 3]
    events = _sse(fake_server, "/v1/completions", {"model": "alpha", "prompt": ids, "max_tokens": 2, "echo": True,
                                                   "logprobs": 1, "stream": True})
    chunks = [e["choices"][0] for e in events[:-1] if e["choices"]]
    assert chunks[0]["text"] == "Hey" and len(chunks[0]["logprobs"]["tokens"]) == 3    # the prompt first
    assert chunks[0]["logprobs"]["token_logprobs"][0] is None
    assert [c["logprobs"]["text_offset"][0] for c in chunks[1:3]] == [3, 4]        # after the echoed text
