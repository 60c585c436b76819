"""Trace files and their transformations; the Azure and BurstGPT formats round-trip."""
import json

import pytest

from crosspool_jax.bench import traces
from crosspool_jax.bench.generator import TraceSpec, generate
from crosspool_jax.bench.public_traces import (load_azure, load_burstgpt, load_trace, parse_timestamp,
                                               write_azure_csv, write_burstgpt_csv)
from crosspool_jax.bench.traces import TraceRequest


@pytest.fixture
def trace():
    return generate(TraceSpec(num_models=3, rate=6.0, cv=4.0, duration_s=30.0, seed=4,
                              model_names=["ChatGPT", "GPT-4", "Other"]))


def _shifted(requests, model=None):
    """The requests with time counted from the first one (and one model name), as loaded."""
    t0 = requests[0].arrival_s
    return [TraceRequest(round(r.arrival_s - t0, 6), model or r.model, r.prompt_tokens, r.output_tokens)
            for r in requests]


def _rounded(requests):
    return [TraceRequest(round(r.arrival_s, 6), r.model, r.prompt_tokens, r.output_tokens) for r in requests]


def test_jsonl_round_trip(tmp_path, trace):
    path = tmp_path / "t.jsonl"
    assert traces.write_jsonl(trace, str(path)) == len(trace)
    assert traces.read_jsonl(str(path)) == trace
    assert load_trace(str(path)).requests == trace
    assert json.loads(path.read_text().splitlines()[0]).keys() == {"arrival_s", "model", "prompt_tokens",
                                                                    "output_tokens"}


def test_burstgpt_csv_round_trip(tmp_path, trace):
    path = tmp_path / "BurstGPT_sample.csv"
    write_burstgpt_csv(trace, str(path))
    assert path.read_text().splitlines()[0] == ("Timestamp,Model,Request tokens,Response tokens,"
                                                "Total tokens,Log Type")
    loaded = load_trace(str(path))
    assert loaded.format == "burstgpt" and loaded.dropped == 0
    assert _rounded(loaded.requests) == _shifted(trace)


def test_azure_csv_round_trip(tmp_path, trace):
    path = tmp_path / "AzureLLMInferenceTrace_conv.csv"
    write_azure_csv(trace, str(path))
    first = path.read_text().splitlines()[1]
    assert first.split(",")[0].count(".") == 1 and len(first.split(",")[0].split(".")[1]) == 7
    loaded = load_trace(str(path))
    assert loaded.format == "azure"
    assert _rounded(loaded.requests) == _shifted(trace, model="AzureLLMInferenceTrace_conv")
    assert _rounded(load_azure(str(path), model="m0").requests) == _shifted(trace, model="m0")


def test_jsonl_variants_of_the_public_formats(tmp_path):
    burst = tmp_path / "b.jsonl"
    burst.write_text("\n".join(json.dumps(o) for o in [
        {"Timestamp": 10.5, "Model": "GPT-4", "Request tokens": 100, "Response tokens": 20},
        {"Timestamp": 12.0, "Model": "ChatGPT", "Request tokens": 50, "Response tokens": 0},   # failed
        {"Timestamp": 13.0, "Model": "ChatGPT", "Request tokens": 70, "Response tokens": 5}]) + "\n")
    loaded = load_trace(str(burst), time_scale=2.0)
    assert loaded.dropped == 1
    assert loaded.requests == [TraceRequest(0.0, "GPT-4", 100, 20), TraceRequest(5.0, "ChatGPT", 70, 5)]
    azure = tmp_path / "a.jsonl"
    azure.write_text(json.dumps({"TIMESTAMP": "2023-11-16 18:15:46.6805900", "ContextTokens": 9,
                                 "GeneratedTokens": 3}) + "\n" +
                     json.dumps({"TIMESTAMP": "2023-11-16 18:15:47.0000000", "ContextTokens": 4,
                                 "GeneratedTokens": 1}) + "\n")
    got = load_trace(str(azure), model="chat").requests
    assert [(r.model, r.prompt_tokens) for r in got] == [("chat", 9), ("chat", 4)]
    assert got[1].arrival_s == pytest.approx(0.31941, abs=1e-9)


def test_timestamps():
    assert parse_timestamp("12.25") == (12, 0.25)
    whole, frac = parse_timestamp("2023-11-16 18:15:46.6805900")
    assert frac == pytest.approx(0.68059) and whole % 60 == 46
    assert parse_timestamp("2023-11-16T18:15:46+01:00")[0] == parse_timestamp("2023-11-16 17:15:46")[0]
    with pytest.raises(ValueError, match="cannot read timestamp 'yesterday'"):
        parse_timestamp("yesterday")


@pytest.mark.parametrize("header, message", [
    ("TIMESTAMP,ContextTokens\n", "unknown trace format .*columns: TIMESTAMP, ContextTokens"),
    ("Timestamp,Model,Request tokens\n", "unknown trace format"),
])
def test_unknown_columns_are_named(tmp_path, header, message):
    path = tmp_path / "x.csv"
    path.write_text(header + "1,2,3\n")
    with pytest.raises(ValueError, match=message):
        load_trace(str(path))


def test_forced_format_names_missing_columns(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("Timestamp,Model,Request tokens\n1,a,3\n")
    with pytest.raises(ValueError, match=r"not a BurstGPT trace: missing column\(s\) Response tokens"):
        load_burstgpt(str(path))
    path.write_text("Timestamp,Model,Request tokens,Response tokens\n1,a,many,3\n")
    with pytest.raises(ValueError, match=r"x.csv:2: column 'Request tokens' is not a number: 'many'"):
        load_burstgpt(str(path))


def test_bad_jsonl_line_names_line_and_field(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"arrival_s": 0, "model": "m0", "prompt_tokens": 3, "output_tokens": 2}\n'
                    '{"arrival_s": 1, "model": "m0", "prompt_tokens": 3}\n')
    with pytest.raises(ValueError, match=r"t.jsonl:2: missing field\(s\) output_tokens"):
        traces.read_jsonl(str(path))
    path.write_text('{"arrival_s": 1, "model": "m0", "prompt_tokens": 0, "output_tokens": 2}\n')
    with pytest.raises(ValueError, match=r"t.jsonl:1: prompt_tokens must be an integer >= 1"):
        traces.read_jsonl(str(path))


def test_map_models_by_popularity_or_map():
    reqs = [TraceRequest(0.0, "m1", 5, 2), TraceRequest(0.1, "m0", 5, 2), TraceRequest(0.2, "m1", 5, 2)]
    mapped, mapping = traces.map_models(reqs, ["a", "b", "c"])
    assert mapping == {"m0": "a", "m1": "b"}                      # m<i> by index, onto the given order
    assert [r.model for r in mapped] == ["b", "a", "b"]
    named = [TraceRequest(0.0, "GPT-4", 5, 2), TraceRequest(0.1, "ChatGPT", 5, 2), TraceRequest(0.2, "ChatGPT", 5, 2)]
    assert traces.map_models(named, ["a", "b"])[1] == {"ChatGPT": "a", "GPT-4": "b"}   # by request count
    assert traces.map_models(named, ["a", "b"], traces.parse_model_map("GPT-4=a,ChatGPT=a"))[1] == {
        "ChatGPT": "a", "GPT-4": "a"}
    with pytest.raises(ValueError, match="trace model.s. GPT-4 have no entry in --model_map"):
        traces.map_models(named, ["a", "b"], {"ChatGPT": "a"})
    with pytest.raises(ValueError, match="--model_map targets z are not served"):
        traces.map_models(named, ["a", "b"], {"ChatGPT": "a", "GPT-4": "z"})
    with pytest.raises(ValueError, match=r"the trace has 2 models \(ChatGPT, GPT-4\) but only 1 are served"):
        traces.map_models(named, ["a"])
    with pytest.raises(ValueError, match="expected TRACE_MODEL=SERVED_MODEL"):
        traces.parse_model_map("a:b")


def test_clip_to_context_keeps_outputs_where_it_can():
    reqs = [TraceRequest(0.0, "a", 100, 20), TraceRequest(0.0, "a", 30, 20), TraceRequest(0.0, "a", 5, 90),
            TraceRequest(0.0, "b", 1000, 1)]
    clipped, n = traces.clip_to_context(reqs, {"a": 64})
    assert n == 2
    assert [(r.prompt_tokens, r.output_tokens) for r in clipped] == [(44, 20), (30, 20), (1, 63), (1000, 1)]


def test_scale_to_rate_keeps_the_shape(trace):
    scaled = traces.scale_to_rate(trace, 12.0)
    assert traces.offered_rate(scaled) == pytest.approx(12.0)
    ratio = trace[-1].arrival_s / scaled[-1].arrival_s
    for a, b in zip(trace, scaled):
        assert b.arrival_s * ratio == pytest.approx(a.arrival_s)
        assert (a.model, a.prompt_tokens, a.output_tokens) == (b.model, b.prompt_tokens, b.output_tokens)


def test_the_shipped_samples_load():
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "traces"
    conv = load_trace(str(root / "azure_conv_sample.csv"))
    assert conv.format == "azure" and len(conv.requests) > 100
    assert {r.model for r in conv.requests} == {"azure_conv_sample"}
    burst = load_trace(str(root / "burstgpt_sample.csv"))
    assert burst.format == "burstgpt" and {r.model for r in burst.requests} == {"ChatGPT", "GPT-4"}
    native = load_trace(str(root / "chat_8models_cv4.jsonl"))
    assert native.format == "jsonl" and {r.model for r in native.requests} == {f"m{i}" for i in range(8)}
