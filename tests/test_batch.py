"""`crosspool-batch` (`python -m crosspool_jax.batch`): JSONL in, results in input order, an
error line per bad line (never the end of the run), streaming into the engine, resume."""
import json
import os
import subprocess
import sys

import pytest

from crosspool_jax import LLM, SamplingParams
from crosspool_jax.batch import run_batch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(REPO, "checkpoints", "mixtral-tiny")


@pytest.fixture(scope="module")
def llm():
    return LLM({"mixtral-tiny": MODEL}, dtype="float32", kv_pool_bytes=1 << 20)


def _write(path, lines):
    with open(path, "w", encoding="utf-8") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")


def _read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_results_in_order_with_per_line_errors(tmp_path, llm):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(src, [
        {"prompt": 5},                                              # first line of the file, bad
        {"id": "a", "prompt": "Hello there", "max_tokens": 4, "temperature": 0.0, "logprobs": 2},
        "",                                                          # blank: skipped, still counted
        "{not json",
        {"prompt_token_ids": [5, 6, 7], "max_tokens": 3, "temperature": 0.0, "logit_bias": {"9": 100.0},
         "prompt_logprobs": 1},
        {"prompt": "x", "temperature": -1},
        {"prompt": "y", "model": "nope"},
        {"prompt_token_ids": "abc"},
        {"prompt": "\ud800"},
        {"prompt": "x", "top_k": 2 ** 31},
        {"prompt": "x", "n": 1000},
        {"prompt_token_ids": [1, 2], "stop_token_ids": [10 ** 7]},
        {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0.0},
        {"prompt": "The end", "max_tokens": 2, "temperature": 0.0, "id": "z", "max_token": 3},
        {"prompt": "x", "logit_bias": {"nine": 1.0}},
    ])
    report = run_batch(llm, str(src), str(dst), use_tqdm=False, max_n=16, max_in_flight=2)
    out = _read(dst)
    assert report.written == len(out) == 14 and report.errors == 11
    assert [o["index"] for o in out] == list(range(14))
    assert [o["line"] for o in out] == [1, 2] + list(range(4, 16))
    assert "line 1:" in out[0]["error"] and "'prompt' must be a string" in out[0]["error"]
    assert out[1]["id"] == "a" and len(out[1]["outputs"][0]["token_ids"]) == 4
    lps = out[1]["outputs"][0]["logprobs"]
    assert len(lps) == 4 and all(any(e["token_id"] == t for e in pos)
                                 for pos, t in zip(lps, out[1]["outputs"][0]["token_ids"]))
    assert "line 4: invalid JSON" in out[2]["error"]
    assert out[3]["prompt_token_ids"] == [5, 6, 7] and out[3]["outputs"][0]["token_ids"] == [9, 9, 9]
    plps = out[3]["prompt_logprobs"]
    assert plps[0] is None and [any(e["token_id"] == t for e in pos) for pos, t in zip(plps[1:], [6, 7])] == [True] * 2
    assert "temperature" in out[4]["error"]
    assert "nope" in out[5]["error"]
    assert "'prompt_token_ids' must be a list of integers" in out[6]["error"]
    assert "not valid Unicode" in out[7]["error"]
    assert "SamplingParams.top_k" in out[8]["error"]
    assert "--max_n=16" in out[9]["error"]
    assert "stop_token_ids" in out[10]["error"]
    assert len(out[11]["outputs"][0]["token_ids"]) == 2
    assert "unknown fields ['max_token']" in out[12]["error"]
    assert "SamplingParams.logit_bias" in out[13]["error"]
    direct = llm.generate(["Hello there"], SamplingParams(max_tokens=4, temperature=0.0))[0]
    assert out[1]["outputs"][0]["token_ids"] == direct.outputs[0].token_ids
    assert not llm.engine.has_unfinished_requests()
    assert sum(llm.engine.stats().kv_pages_used_by_model.values()) == 0


def test_resume_skips_written_lines_and_redoes_a_torn_tail(tmp_path, llm):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(src, [{"prompt_token_ids": [i + 1, i + 2], "max_tokens": 2, "temperature": 0.0} for i in range(5)])
    run_batch(llm, str(src), str(dst), max_in_flight=2, use_tqdm=False)
    full = _read(dst)
    with open(dst) as f:
        lines = f.readlines()
    with open(dst, "w") as f:
        f.writelines(lines[:3])
        f.write(lines[3][:10])                 # a torn line, as after a crash
    report = run_batch(llm, str(src), str(dst), max_in_flight=2, use_tqdm=False)
    assert (report.resumed, report.written) == (3, 2) and "resumed after 3 lines" in report.summary("o")
    assert _read(dst) == full
    report = run_batch(llm, str(src), str(dst), use_tqdm=False)
    assert report.written == 0 and report.summary("o") == "nothing to do: all 5 lines are already in o"
    _write(src, [{"prompt_token_ids": [9, 9], "max_tokens": 2}] * 6)
    with pytest.raises(ValueError, match="another input"):
        run_batch(llm, str(src), str(dst), use_tqdm=False)


def test_command_line(tmp_path):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(src, [{"prompt": "Hi", "max_tokens": 2, "temperature": 0.0}])
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "crosspool_jax.batch", "--input", str(src), "--output", str(dst),
                           f"--model=mixtral-tiny={MODEL}", "--dtype=float32", "--kv_pool_bytes=1MiB",
                           "--noprogress"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "wrote 1 result lines (0 errors)" in proc.stdout
    out = _read(dst)
    assert len(out) == 1 and len(out[0]["outputs"][0]["token_ids"]) == 2
    missing = subprocess.run([sys.executable, "-m", "crosspool_jax.batch", "--input", str(tmp_path / "nope"),
                              "--output", str(dst)], capture_output=True, text=True, timeout=120, env=env)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.splitlines()[0] == f"crosspool-batch: error: --input {tmp_path / 'nope'}: no such file"
