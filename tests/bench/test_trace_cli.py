"""`python -m crosspool_jax.bench.trace`: --help, generate, bad input, and a tiny end-to-end run
of the shipped models on CPU (in process) that writes JSON, markdown and PNG plots."""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from crosspool_jax.bench import sweep as sweep_lib
from crosspool_jax.bench import traces

REPO = pathlib.Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "crosspool_jax.bench.trace"]
METRICS = {"requests", "completed", "ttft_ms", "tbt_ms", "slo_attainment", "goodput_rps", "throughput_tok_s"}


def _cli(*args, timeout=120):
    return subprocess.run(CLI + list(args), cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_help_explains_every_flag_and_exits_zero():
    out = _cli("--help")
    assert out.returncode == 0, out.stderr
    from absl import flags

    import crosspool_jax.bench.trace as trace_cli
    names = {f.name for f in flags.FLAGS.get_flags_for_module(trace_cli.__name__)}
    names |= {f.name for f in flags.FLAGS.get_key_flags_for_module("crosspool_jax.serving_flags")}
    assert {"rate", "cv", "zipf", "profile", "model_map", "server_url", "kv_pool_bytes", "model"} <= names
    for name in names:
        assert f"--{name}:" in out.stdout or f"--[no]{name}:" in out.stdout, name


def test_generate_writes_the_contract_trace(tmp_path):
    path = tmp_path / "trace.jsonl"
    args = ["generate", f"--out={path}", "--num_models=8", "--rate=4", "--cv=4", "--zipf=1.0",
            "--profile=chat", "--duration_s=120", "--seed=0"]
    out = _cli(*args)
    assert out.returncode == 0, out.stderr
    first = path.read_text()
    trace = traces.read_jsonl(str(path))
    assert {r.model for r in trace} <= {f"m{i}" for i in range(8)} and len(trace) > 100
    assert _cli(*args).returncode == 0 and path.read_text() == first               # same flags, same trace


@pytest.mark.parametrize("args, message", [
    (["run", "--out=/tmp/x"], "--trace is required"),
    (["run", "--trace=/nonexistent.jsonl", "--out=/tmp/x"], "trace file '/nonexistent.jsonl' does not exist"),
    (["generate", "--out=/tmp/x.jsonl", "--cv=0"], "cv must be > 0"),
    (["frobnicate"], "expected one command, generate | run | sweep | report"),
])
def test_bad_input_is_named(args, message):
    out = _cli(*args)
    assert out.returncode != 0 and message in out.stderr + out.stdout


def test_unmapped_trace_models_are_named(tmp_path):
    path = tmp_path / "burst.csv"
    path.write_text("Timestamp,Model,Request tokens,Response tokens\n0,ChatGPT,5,2\n1,GPT-4,5,2\n")
    out = _cli("run", f"--trace={path}", f"--out={tmp_path / 'r'}", "--model_map=ChatGPT=mixtral-tiny",
               "--noplots", "--model=mixtral-tiny=checkpoints/mixtral-tiny")
    assert out.returncode != 0 and "trace model(s) GPT-4 have no entry in --model_map" in out.stderr


def test_tiny_run_of_the_shipped_models_on_cpu(tmp_path):
    # the trace's 60 requests (arrivals over about 2 s) replayed at 16 and 32 req/s: a few seconds
    # of real time each (at 4 and 8 req/s the replay alone took 22 s)
    trace = tmp_path / "trace.jsonl"
    # a 5% long-context tail far beyond --max_model_len: those requests are clipped
    assert _cli("generate", f"--out={trace}", "--num_models=2", "--rate=6", "--cv=4", "--duration_s=3",
                "--prompt_len_median=10", "--output_len_median=4", "--long_tail_fraction=0.3",
                "--long_tail_median=5000", "--seed=3").returncode == 0
    requests = traces.read_jsonl(str(trace))
    out_dir = tmp_path / "results"
    out = _cli("run", f"--trace={trace}", f"--out={out_dir}", "--rates=16,32",
               "--model=mixtral-tiny=checkpoints/mixtral-tiny", "--model=olmoe-tiny=checkpoints/olmoe-tiny",
               "--dtype=float32", "--mode=static", "--kv_devices=1", "--kv_pool_bytes=8MiB", "--max_num_seqs=4",
               "--max_num_batched_tokens=32", "--max_decode_steps=1", "--max_model_len=64", "--warmup_s=1",
               "--noprogress", "--sample_interval_s=0.05", timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    fitted, clipped = traces.clip_to_context(requests, {"m0": 64, "m1": 64})
    assert clipped > 0
    for rate in ("16", "32"):
        folder = out_dir / f"rate_{rate}"
        results = json.loads((folder / "results.json").read_text())
        overall = results["overall"]
        assert METRICS | {"compiles_in_window"} <= set(overall)
        assert overall["requests"] == overall["completed"] == len(requests)
        assert set(results["per_model"]) == {"mixtral-tiny", "olmoe-tiny"}
        for block in [overall] + list(results["per_model"].values()):
            assert METRICS <= set(block)
            assert set(block["ttft_ms"]) == set(block["tbt_ms"]) == {"p50", "p90", "p99", "max"}
        assert overall["tbt_samples"] == sum(r.output_tokens - 1 for r in fitted)     # every gap, once
        assert 0 < overall["steps_run_ahead"] < overall["engine_steps"]               # async scheduling
        assert overall["clipped_requests"] == clipped
        assert any(f"{clipped} of {len(requests)} requests were clipped" in n for n in overall["notes"])
        assert results["run"]["mode"] == "static" and results["run"]["rate_rps"] == float(rate)
        assert results["run"]["warmup"]["requests"] >= 2
        assert (folder / "results.md").read_text().startswith("# Trace run: mode static")
        for png in ("tbt_cdf.png", "kv_pages.png"):
            assert (folder / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out_dir / "comparison.md").is_file() and (out_dir / "vs_rate.png").is_file()

    # the sweep's merge: two "modes" of the same run compared side by side
    merged = tmp_path / "merged"
    for label in ("static", "shared"):
        shutil.copytree(out_dir / "rate_16", merged / label / "rate_16")
        path = merged / label / "rate_16" / "results.json"
        results = json.loads(path.read_text())
        results["run"]["label"] = label
        path.write_text(json.dumps(results))
    paths = sweep_lib.merge(str(merged))
    table = pathlib.Path(paths["md"]).read_text()
    assert "| static |  | 16 |" in table and "| shared |  | 16 |" in table
    assert {os.path.basename(p) for p in paths["png"]} == {"vs_rate.png", "tbt_cdf_rate16.png", "kv_pages_rate16.png"}
