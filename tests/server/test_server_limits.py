"""Limits and hygiene of the server over the fake engine: body size and time limits, clients
that leave during the upload, the API key from a file or the environment, API docs behind it,
vLLM's /tokenize, /detokenize and /version, metrics labelled by model for 4xx too, and the
binary's start-up (a bad port, SIGTERM during warm-up)."""
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from crosspool_jax.server import ServerConfig
from server_fake_engine import FakeTokenizer
from server_live import start_fake_server

TOK = FakeTokenizer()
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def limited():
    live, server = start_fake_server(max_body_bytes=4096, body_timeout_s=0.5, max_prompt_chars=100)
    yield server
    live.__exit__(None, None, None)


def _raw_exchange(url: str, request: bytes, *, then_close: bool = False, read: bool = True) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        if then_close:
            return b""
        chunks = []
        while read:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks)


def test_body_limits(limited):
    r = httpx.post(limited.url + "/v1/completions", json={"model": "alpha", "prompt": "x" * 5000})
    assert r.status_code == 400 and "4096 bytes" in r.json()["error"]["message"]
    r = httpx.post(limited.url + "/v1/completions", json={"model": "alpha", "prompt": "x" * 101})
    assert r.status_code == 400 and "101 characters" in r.json()["error"]["message"]
    r = httpx.post(limited.url + "/v1/chat/completions", json={
        "model": "alpha", "messages": [{"role": "user", "content": "x" * 95}]})
    assert r.status_code == 400 and "rendered chat prompt" in r.json()["error"]["message"]
    assert httpx.post(limited.url + "/v1/completions", json={
        "model": "alpha", "prompt": "x" * 40, "max_tokens": 2}).status_code == 200
    metrics = httpx.get(limited.url + "/metrics").text
    assert 'crosspool_requests_total{model="alpha",status="400"} 2.0' in metrics   # the body named it
    assert 'crosspool_requests_total{model="",status="400"} 1.0' in metrics       # too large to read


def test_slow_client_gets_408_and_leaving_client_logs_nothing(limited, caplog):
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n"
            b"Content-Length: 200\r\n\r\n")
    t0 = time.monotonic()
    answer = _raw_exchange(limited.url, head + b'{"model": "alpha", ')
    assert b" 408 " in answer.split(b"\r\n", 1)[0] and b"did not arrive within 0.5 s" in answer
    assert time.monotonic() - t0 < 5
    uvicorn_errors = logging.getLogger("uvicorn.error")
    uvicorn_errors.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO):
            _raw_exchange(limited.url, head + b'{"model"', then_close=True)
            time.sleep(0.3)
    finally:
        uvicorn_errors.removeHandler(caplog.handler)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info], caplog.text
    assert httpx.get(limited.url + "/health").status_code == 200


def test_tokenize_detokenize_version(limited):
    r = httpx.post(limited.url + "/tokenize", json={"model": "alpha", "prompt": "Hey", "return_token_strs": True})
    assert r.json() == {"count": 4, "max_model_len": 64, "tokens": TOK.encode("Hey"),
                        "token_strs": ["", "H", "e", "y"]}
    chat = [{"role": "user", "content": "Hi"}]
    r = httpx.post(limited.url + "/tokenize", json={"model": "alpha", "messages": chat})
    assert r.json()["tokens"] == TOK.encode(TOK.apply_chat_template(chat), add_special_tokens=False)
    r = httpx.post(limited.url + "/detokenize", json={"model": "alpha", "tokens": TOK.encode("Hey")})
    assert r.json() == {"prompt": "Hey"}
    r = httpx.post(limited.url + "/tokenize", json={"model": "alpha", "prompt": "x", "messages": chat})
    assert r.status_code == 400
    r = httpx.post(limited.url + "/tokenize", json={"model": "beta", "prompt": "x"})
    assert r.status_code == 400 and "no tokenizer" in r.json()["error"]["message"]
    assert httpx.get(limited.url + "/version").json()["version"]


def test_api_key_file_environment_and_docs(tmp_path, monkeypatch):
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    assert ServerConfig(api_key_file=str(key_file)).resolved_api_key() == "from-file"
    monkeypatch.setenv("CROSSPOOL_API_KEY", "from-env")
    assert ServerConfig().resolved_api_key() == "from-env"
    with pytest.raises(ValueError, match="not both"):
        ServerConfig(api_key="a", api_key_file=str(key_file))
    with pytest.raises(ValueError, match="port"):
        ServerConfig(port=99999)
    live, server = start_fake_server(enable_docs=True)          # the key from the environment
    try:
        for path in ("/docs", "/openapi.json", "/v1/models"):
            assert httpx.get(server.url + path).status_code == 401, path
        auth = {"Authorization": "Bearer from-env"}
        schema = httpx.get(server.url + "/openapi.json", headers=auth).json()
        assert "max_tokens" in str(schema["paths"]["/v1/completions"])
        assert httpx.get(server.url + "/health").status_code == 200
        assert httpx.get(server.url + "/metrics").status_code == 200
    finally:
        live.__exit__(None, None, None)
    monkeypatch.delenv("CROSSPOOL_API_KEY")
    live, server = start_fake_server()
    try:
        assert httpx.get(server.url + "/docs").status_code == 404          # off by default
        assert httpx.get(server.url + "/openapi.json").status_code == 404
    finally:
        live.__exit__(None, None, None)


def test_warm_up_fits_a_tiny_context():
    """max_model_len 2 (one prompt token, one new token): the warm-up compiles that menu and a
    request then runs without compiling."""
    from crosspool_jax.engine import LLMEngine
    from crosspool_jax.runtime.compiles import compile_counter
    from crosspool_jax.sampling_params import SamplingParams
    from crosspool_jax.serve import warm_up

    engine = LLMEngine.from_options({"m": os.path.join(REPO, "checkpoints", "mixtral-tiny")}, dtype="float32",
                                    kv_pool_bytes=1 << 20, max_model_len=2, max_num_batched_tokens=16,
                                    max_num_seqs=4, max_decode_steps=1)
    assert warm_up(engine)["programs"] > 0
    before = compile_counter().count
    engine.add_request("r", "m", {"prompt_token_ids": [5]}, SamplingParams(max_tokens=1, temperature=0.0))
    while engine.has_unfinished_requests():
        engine.step()
    assert compile_counter().count == before


def _serve(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "crosspool_jax.serve", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def test_binary_refuses_a_bad_port_in_one_line_and_help_exits_zero():
    proc = _serve("--port", "99999")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2 and out.splitlines()[0].startswith("crosspool-serve: error: ")
    assert "port must be in [0, 65535]" in out and "Traceback" not in out


def test_sigterm_during_warm_up_exits_cleanly():
    model = os.path.join(REPO, "checkpoints", "mixtral-tiny")
    proc = _serve("--model", f"m={model}", "--dtype", "float32", "--kv_pool_bytes", "8MiB",
                  "--port", "0", "--log_level", "info")
    lines = []
    try:
        deadline = time.monotonic() + 120
        for line in proc.stdout:
            lines.append(line)
            if "warm-up: compiling" in line:
                break
            assert time.monotonic() < deadline, "".join(lines)
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = "".join(lines) + rest
    assert proc.returncode == 0, out[-3000:]
    assert "SIGTERM during start-up; exiting" in out
    assert "Traceback" not in out and "Segmentation" not in out
