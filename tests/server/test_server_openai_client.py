"""The official `openai` client against the server over the fake engine."""
import asyncio

import httpx

import openai
import pytest

from server_fake_engine import FakeTokenizer, expected_text
from server_live import random_text, start_fake_server

TOK = FakeTokenizer()


@pytest.fixture(scope="module")
def client(fake_server):
    return openai.OpenAI(base_url=fake_server.url + "/v1", api_key="unused", max_retries=0)


def test_models_and_completion(client, rng):
    assert sorted(m.id for m in client.models.list()) == ["alpha", "beta"]
    text = random_text(rng)
    out = client.completions.create(model="alpha", prompt=text, max_tokens=7, temperature=0.0)
    p = len(TOK.encode(text))
    assert out.choices[0].text == expected_text(p, 7)
    assert out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (p, 7)


def test_chat_and_streaming_with_usage(client, rng):
    messages = [{"role": "user", "content": random_text(rng)}]
    p = len(TOK.encode(TOK.apply_chat_template(messages), add_special_tokens=False))
    out = client.chat.completions.create(model="alpha", messages=messages, max_tokens=5, seed=3)
    assert out.choices[0].message.content == expected_text(p, 5)
    assert out.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="alpha", messages=messages, max_tokens=5,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        expected_text(p, 5)
    assert chunks[-1].usage.completion_tokens == 5 and chunks[-1].usage.prompt_tokens == p
    stream = client.completions.create(model="beta", prompt=[9, 8, 7, 6], max_tokens=4,
                                       stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected_text(4, 4)
    assert chunks[-1].usage.total_tokens == 8


def test_errors_map_to_client_exceptions(fake_server, client):
    with pytest.raises(openai.NotFoundError, match="gamma"):
        client.completions.create(model="gamma", prompt="x")
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.completions.create(model="alpha", prompt="x", top_p=1.5)
    with pytest.raises(openai.BadRequestError, match="too|tokens"):
        client.completions.create(model="alpha", prompt="y" * 100)
    live, server = start_fake_server(api_key="k")
    try:
        bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = openai.OpenAI(base_url=server.url + "/v1", api_key="k", max_retries=0)
        assert len(good.models.list().data) == 2
    finally:
        live.__exit__(None, None, None)


def test_several_models_in_parallel(fake_server, rng):
    async def run():
        aclient = openai.AsyncOpenAI(base_url=fake_server.url + "/v1", api_key="x",
                                     max_retries=0)
        jobs, expected = [], []
        for i in range(12):
            model = ("alpha", "beta")[i % 2]
            if model == "alpha":
                text = random_text(rng)
                prompt, p = text, len(TOK.encode(text))
            else:
                prompt = [rng.randrange(3, 300) for _ in range(rng.randint(1, 10))]
                p = len(prompt)
            n_tokens = rng.randint(1, 12)
            expected.append(expected_text(p, n_tokens))
            if i % 3 == 0:
                jobs.append(_stream_text(aclient, model, prompt, n_tokens))
            else:
                jobs.append(_plain_text(aclient, model, prompt, n_tokens))
        got = await asyncio.gather(*jobs)
        await aclient.close()
        return got, expected

    got, expected = asyncio.run(run())
    assert got == expected
    fake_server.wait_idle()


async def _plain_text(aclient, model, prompt, n_tokens):
    out = await aclient.completions.create(model=model, prompt=prompt, max_tokens=n_tokens)
    return out.choices[0].text


async def _stream_text(aclient, model, prompt, n_tokens):
    stream = await aclient.completions.create(model=model, prompt=prompt, max_tokens=n_tokens,
                                              stream=True)
    return "".join([c.choices[0].text async for c in stream if c.choices])


def test_vllm_compatible_surface_through_the_openai_client(fake_server, client):
    with pytest.raises(openai.BadRequestError, match="unknown field 'max_token'"):
        client.completions.create(model="alpha", prompt="x", extra_body={"max_token": 3})
    with pytest.raises(openai.BadRequestError, match="maximum context length is 64 tokens"):
        client.completions.create(model="alpha", prompt="hello", max_tokens=100)
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "x"}],
                                       response_format={"type": "json_object"})
    ids = client.post("/../tokenize", cast_to=object, body={"model": "alpha", "prompt": "Hello"})["tokens"]
    assert ids == TOK.encode("Hello")
    assert client.post("/../detokenize", cast_to=object,
                       body={"model": "alpha", "tokens": ids})["prompt"] == "Hello"
    metrics = httpx.get(fake_server.url + "/metrics").text
    for name in ("vllm:time_to_first_token_seconds_bucket", "vllm:e2e_request_latency_seconds_bucket",
                 "vllm:num_requests_running", "vllm:kv_cache_usage_perc", "vllm:request_success_total",
                 "vllm:prompt_tokens_total", "crosspool_xla_compiles_total"):
        assert name in metrics, name


def test_one_token_per_stream_chunk_under_multi_step_decode(rng):
    live, server = start_fake_server(tokens_per_step=4)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        text = random_text(rng)
        stream = client.completions.create(model="alpha", prompt=text, max_tokens=9, stream=True,
                                           extra_body={"return_token_ids": True})
        chunks = [c for c in stream if c.choices]
        assert [len(c.choices[0].model_extra["token_ids"]) for c in chunks] == [1] * 9
        assert "".join(c.choices[0].text for c in chunks) == expected_text(len(TOK.encode(text)), 9)
    finally:
        live.__exit__(None, None, None)
