"""Batch generation from JSONL: `python -m crosspool_jax.batch --input in.jsonl --output out.jsonl`.

Each input line is one JSON object: `prompt` (text) or `prompt_token_ids`, optional
`model` (else --model, required when several models are served) and sampling fields
(`max_tokens`, `temperature`, `top_p`, `top_k`, `min_p`, `seed`, `stop`, `n`, ...), and
optional `id`. The input is read through grain (a random-access source over the file's
line offsets, so the file is never held whole in memory). Results are written in input
order, one line per input line, each with its `index` (and `id`). A line that cannot be
parsed or served gets an `error` field: no line is silently dropped. Re-running with the
same --output resumes after the lines already written.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

from absl import app, flags

from crosspool_jax.model_specs import models_from_specs
from crosspool_jax.sampling_params import SamplingParams

_SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}


class JsonlSource:
    """grain random-access source: record i is line i of a JSONL file, parsed lazily."""

    def __init__(self, path: str):
        self.path = path
        self._offsets = []
        with open(path, "rb") as f:
            offset = 0
            for line in f:
                if line.strip():
                    self._offsets.append(offset)
                offset += len(line)

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, index: int) -> dict:
        with open(self.path, "rb") as f:
            f.seek(self._offsets[index])
            raw = f.readline()
        try:
            record = json.loads(raw)
            if not isinstance(record, dict):
                raise ValueError(f"line must be a JSON object, got {type(record).__name__}")
        except ValueError as e:
            return {"_index": index, "_error": f"line {index + 1}: invalid JSON: {e}"}
        return {"_index": index, **record}


def parse_record(record: dict, default_model: Optional[str]):
    """-> (prompt, SamplingParams, model). Raises ValueError naming the bad field."""
    if "_error" in record:
        raise ValueError(record["_error"])
    if "prompt_token_ids" in record:
        prompt = {"prompt_token_ids": record["prompt_token_ids"]}
    elif "prompt" in record:
        prompt = record["prompt"]
    else:
        raise ValueError("needs 'prompt' or 'prompt_token_ids'")
    model = record.get("model", default_model)
    if model is None:
        raise ValueError("needs 'model' (several models are served and --model was not given)")
    unknown = set(record) - _SAMPLING_FIELDS - {"prompt", "prompt_token_ids", "model", "id", "_index"}
    if unknown:
        raise ValueError(f"unknown fields {sorted(unknown)}")
    params = SamplingParams(**{k: v for k, v in record.items() if k in _SAMPLING_FIELDS})
    return prompt, params, model


def _result_line(record: dict, out=None, error: Optional[str] = None) -> dict:
    line = {"index": record["_index"]}
    if "id" in record:
        line["id"] = record["id"]
    if error is not None or (out is not None and out.error):
        line["error"] = error or out.error
        return line
    line["model"] = out.model
    line["prompt_token_ids"] = out.prompt_token_ids
    line["outputs"] = [{"text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason}
                       for c in out.outputs]
    return line


def _lines_done(path: str) -> int:
    if not os.path.exists(path):
        return 0
    done = 0
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break                      # a torn last line is redone
            done += 1
    with open(path, "rb+") as f:           # drop a torn tail before appending
        f.seek(0)
        keep = sum(len(l) for _, l in zip(range(done), f))
        f.truncate(keep)
    return done


def run_batch(llm, input_path: str, output_path: str, *, default_model: Optional[str] = None,
              chunk_size: int = 64, use_tqdm: bool = True) -> int:
    """Generate for every line of input_path; append results to output_path. Returns lines written."""
    import grain

    source = JsonlSource(input_path)
    start = _lines_done(output_path)
    if default_model is None and len(llm.model_names) == 1:
        default_model = llm.model_names[0]
    dataset = grain.MapDataset.source(source)
    written = 0
    with open(output_path, "a", encoding="utf-8") as f:
        for lo in range(start, len(dataset), chunk_size):
            records = [dataset[i] for i in range(lo, min(lo + chunk_size, len(dataset)))]
            lines: list[Optional[dict]] = [None] * len(records)
            ok, prompts, params, models = [], [], [], []
            for i, record in enumerate(records):
                try:
                    prompt, p, model = parse_record(record, default_model)
                    if model not in llm.model_names:
                        raise ValueError(f"unknown model {model!r}; served models: {llm.model_names}")
                except (ValueError, TypeError) as e:
                    lines[i] = _result_line(record, error=str(e))
                    continue
                ok.append(i)
                prompts.append(prompt)
                params.append(p)
                models.append(model)
            if ok:
                outs = llm.generate(prompts, params, model=models, use_tqdm=use_tqdm)
                for i, out in zip(ok, outs):
                    lines[i] = _result_line(records[i], out)
            for line in lines:
                f.write(json.dumps(line) + "\n")
                written += 1
            f.flush()
    return written


def _define_flags():
    """The command line's flags (defined only when run as a program, so importing this
    module next to the server, which has flags of the same names, is fine)."""
    flags.DEFINE_string("input", None, "JSONL file of requests.")
    flags.DEFINE_string("output", None, "JSONL file of results (appended to; resumes).")
    flags.DEFINE_multi_string("model", None, "NAME=PATH of a model to serve (repeatable); "
                              "default: every model under checkpoints/.")
    flags.DEFINE_string("default_model", None, "Model for lines without a 'model' field.")
    flags.DEFINE_string("dtype", "bfloat16", "Parameter and KV dtype.")
    flags.DEFINE_integer("chunk_size", 64, "Lines generated together before results are flushed.")


def main(argv):
    del argv
    f = flags.FLAGS
    if not f.input or not f.output:
        raise app.UsageError("--input and --output are required")
    from crosspool_jax.api import LLM

    try:
        models = models_from_specs(f.model)
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    llm = LLM(models, dtype=f.dtype)
    n = run_batch(llm, f.input, f.output, default_model=f.default_model, chunk_size=f.chunk_size)
    print(f"wrote {n} result lines to {f.output}")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
