"""`python -m crosspool_jax.batch`: JSONL in, results in input order, errors per line, resume."""
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
    with open(path, "w") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")


def _read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_results_in_order_with_per_line_errors(tmp_path, llm):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(src, [
        {"id": "a", "prompt": "Hello there", "max_tokens": 4, "temperature": 0.0},
        "{not json",
        {"prompt_token_ids": [5, 6, 7], "max_tokens": 3, "temperature": 0.0},
        {"prompt": "x", "temperature": -1},
        {"prompt": "y", "model": "nope"},
        {"prompt": "The end", "max_tokens": 2, "temperature": 0.0, "id": "z"},
    ])
    assert run_batch(llm, str(src), str(dst), use_tqdm=False) == 6
    out = _read(dst)
    assert [o["index"] for o in out] == list(range(6))
    assert out[0]["id"] == "a" and len(out[0]["outputs"][0]["token_ids"]) == 4
    assert "invalid JSON" in out[1]["error"]
    assert out[2]["prompt_token_ids"] == [5, 6, 7]
    assert "temperature" in out[3]["error"]
    assert "nope" in out[4]["error"]
    assert out[5]["id"] == "z"
    direct = llm.generate(["Hello there"], SamplingParams(max_tokens=4, temperature=0.0))[0]
    assert out[0]["outputs"][0]["token_ids"] == direct.outputs[0].token_ids


def test_resume_skips_written_lines_and_redoes_a_torn_tail(tmp_path, llm):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(src, [{"prompt_token_ids": [i + 1, i + 2], "max_tokens": 2, "temperature": 0.0} for i in range(5)])
    run_batch(llm, str(src), str(dst), chunk_size=2, use_tqdm=False)
    full = _read(dst)
    with open(dst) as f:
        lines = f.readlines()
    with open(dst, "w") as f:
        f.writelines(lines[:3])
        f.write(lines[3][:10])                 # a torn line, as after a crash
    assert run_batch(llm, str(src), str(dst), chunk_size=2, use_tqdm=False) == 2
    assert _read(dst) == full


def test_command_line(tmp_path):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(src, [{"prompt": "Hi", "max_tokens": 2, "temperature": 0.0}])
    proc = subprocess.run([sys.executable, "-m", "crosspool_jax.batch", "--input", str(src), "--output", str(dst),
                           f"--model=mixtral-tiny={MODEL}", "--dtype=float32"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = _read(dst)
    assert len(out) == 1 and len(out[0]["outputs"][0]["token_ids"]) == 2
