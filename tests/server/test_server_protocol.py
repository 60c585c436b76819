"""Request parsing and response shapes, without a server."""
import copy
import math

import pytest

from crosspool_jax.outputs import Logprob
from crosspool_jax.server import protocol, responses
from crosspool_jax.server.protocol import ApiError
from crosspool_jax.serve import FLAGS, engine_options, parse_bytes, parse_devices, parse_models
from server_fake_engine import FakeTokenizer


def _error(fn, *args) -> ApiError:
    with pytest.raises(ApiError) as info:
        fn(*args)
    return info.value


def test_completion_request_fields(rng):
    ids = [rng.randrange(3, 1000) for _ in range(rng.randint(1, 9))]
    temperature, top_p = rng.uniform(0.1, 2.0), rng.uniform(0.1, 1.0)
    req = protocol.parse_completion_request({
        "model": "m", "prompt": ids, "n": 3, "max_tokens": 7, "temperature": temperature,
        "top_p": top_p, "top_k": 5, "min_p": 0.05, "seed": 11, "stop": "xy",
        "presence_penalty": 0.5, "frequency_penalty": -0.5, "repetition_penalty": 1.2,
        "logprobs": 2, "stream": True, "stream_options": {"include_usage": True}, "user": "u"})
    assert req.prompts == [ids] and req.stream and req.include_usage and req.logprobs == 2
    p = req.params
    assert (p.n, p.max_tokens, p.top_k, p.seed, p.stop, p.logprobs) == (3, 7, 5, 11, ["xy"], 2)
    assert math.isclose(p.temperature, temperature) and math.isclose(p.top_p, top_p)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.5, -0.5, 1.2)


def test_completion_prompt_forms():
    parse = protocol.parse_completion_request
    assert parse({"model": "m", "prompt": "a"}).prompts == ["a"]
    assert parse({"model": "m", "prompt": ["a", "b"]}).prompts == ["a", "b"]
    assert parse({"model": "m", "prompt": [[5, 6], [7]]}).prompts == [[5, 6], [7]]
    assert parse({"model": "m", "prompt": "a"}).params.max_tokens == 16  # OpenAI's default
    for bad in (None, "", [], [[]], [1.5], {"x": 1}, [-1]):
        assert _error(parse, {"model": "m", "prompt": bad}).param == "prompt"


def test_validation_errors_name_the_parameter():
    parse = protocol.parse_completion_request
    cases = {"temperature": -0.5, "top_p": 0.0, "top_k": -3, "n": 0, "max_tokens": 0,
             "min_p": 2.0, "presence_penalty": 3.0, "repetition_penalty": 0.0, "logprobs": 99}
    for field, value in cases.items():
        e = _error(parse, {"model": "m", "prompt": "a", field: value})
        assert (e.status, e.param) == (400, field), (field, e.message)
        assert f"SamplingParams.{field}" in e.message
    for field, value in {"max_tokens": "ten", "temperature": "hot", "stream": "yes",
                         "stop": [1, 2], "seed": 1.5}.items():
        e = _error(parse, {"model": "m", "prompt": "a", field: value})
        assert (e.status, e.param) == (400, field)
    assert _error(parse, {"prompt": "a"}).param == "model"
    assert _error(parse, {"model": "m", "prompt": "a", "stream_options": {"include_usage": True}}
                  ).param == "stream_options"
    assert _error(protocol.parse_json_body, b"{nope").status == 400
    assert _error(protocol.parse_json_body, b"[1, 2]").status == 400
    body = _error(parse, {"prompt": "a"}).body()
    assert set(body["error"]) == {"message", "type", "param", "code"}


def test_chat_request_fields():
    parse = protocol.parse_chat_request
    req = parse({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "he"}, {"type": "text", "text": "llo"}]}],
        "max_completion_tokens": 9, "max_tokens": 3, "logprobs": True, "top_logprobs": 4})
    assert req.messages == [{"role": "user", "content": "hello"}]
    assert req.params.max_tokens == 9 and req.params.logprobs == 4
    assert parse({"model": "m", "messages": [{"role": "user", "content": "x"}]}).params.max_tokens is None
    assert _error(parse, {"model": "m", "messages": []}).param == "messages"
    assert _error(parse, {"model": "m", "messages": [{"content": "x"}]}).param == "messages"
    assert _error(parse, {"model": "m", "messages": [{"role": "user", "content": "x"}],
                          "top_logprobs": 2}).param == "top_logprobs"


def test_logprob_shapes():
    tok = FakeTokenizer()
    ids = [ord("q"), ord("r")]
    lps = [{ord("q"): Logprob(-0.1, 1), ord("z"): Logprob(-2.0, 2)},
           {ord("a"): Logprob(-0.3, 1), ord("r"): Logprob(-0.9, 2), ord("b"): Logprob(-1.5, 3)}]
    legacy = responses.completion_logprobs(tok, ids, lps, 2, text_offset=5)
    assert legacy == {"tokens": ["q", "r"], "token_logprobs": [-0.1, -0.9],
                      "top_logprobs": [{"q": -0.1, "z": -2.0}, {"a": -0.3, "r": -0.9}],
                      "text_offset": [5, 6]}
    chat = responses.chat_logprobs(None, ids, lps, 1)["content"]
    assert chat[1]["token"] == f"token_id:{ord('r')}" and chat[1]["logprob"] == -0.9
    assert [t["logprob"] for t in chat[1]["top_logprobs"]] == [-0.3]


def test_flag_parsing(tmp_path):
    assert parse_bytes("3GiB", name="x") == 3 << 30 and parse_bytes("2MB", name="x") == 2_000_000
    assert parse_bytes("4096", name="x") == 4096
    assert parse_devices("4", name="x") == 4 and parse_devices("0,2", name="x") == [0, 2]
    with pytest.raises(ValueError, match="kv_pool_bytes"):
        parse_bytes("lots", name="kv_pool_bytes")
    flag_values = copy.deepcopy(FLAGS)
    flag_values(["serve", "--dtype=float32", "--kv_devices=2", "--kv_pool_bytes=1MiB",
                 "--max_model_len=128", "--max_decode_steps=1", "--noenable_prefix_caching"])
    opts = engine_options(flag_values)
    assert opts == {"dtype": "float32", "kv_devices": 2, "kv_pool_bytes": 1 << 20,
                    "max_model_len": 128, "max_decode_steps": 1, "enable_prefix_caching": False}
    assert parse_models([f"a={tmp_path}"]) == {"a": str(tmp_path)}
    with pytest.raises(ValueError, match="NAME=PATH"):
        parse_models(["nopath"])
    with pytest.raises(ValueError, match="does not exist"):
        parse_models([f"a={tmp_path}/missing"])


def test_split_delta_one_token_per_piece_with_a_real_tokenizer():
    import os

    from crosspool_jax.checkpoints.tokenizer import load_tokenizer
    from crosspool_jax.server.async_engine import ChoiceDelta
    from crosspool_jax.server.generation import split_delta

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    tok = load_tokenizer(os.path.join(repo, "checkpoints", "mixtral-tiny"))
    ids = tok.encode("Hello there, wonderful world of experts", add_special_tokens=False)
    prev, new = ids[:3], ids[3:]
    text = tok.decode(ids)[len(tok.decode(prev)):]
    lps = [{t: Logprob(-1.0, 1)} for t in new]
    pieces = split_delta(ChoiceDelta(0, text, new, lps, "length", None), prev, tok)
    assert [p.token_ids for p in pieces] == [[t] for t in new]
    assert "".join(p.text for p in pieces) == text and sum(bool(p.text) for p in pieces) >= len(new) - 1
    assert [p.finish_reason for p in pieces] == [None] * (len(new) - 1) + ["length"]
    assert [p.logprobs for p in pieces] == [[lp] for lp in lps]
    one = ChoiceDelta(0, "x", [5], None, None, None)
    assert split_delta(one, [], tok) == [one]
