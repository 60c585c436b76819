"""crosspool-batch: generate for every line of a JSONL file, results in input order.

    crosspool-batch --input prompts.jsonl --output results.jsonl [--model NAME=PATH ...] [options]
    (or: python -m crosspool_jax.batch ...)

Each input line is one JSON object: "prompt" (text), "prompt_token_ids" (a list of ids) or
"messages" (a chat, rendered by the model's template); optional "model" (else
--default_model, required when several models are served), "id", and SamplingParams fields
("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n", "logprobs", ...). Each
output line has the input's "index" (0-based among non-blank lines), "line" (its line number
in the file) and "id", then "model", "prompt_token_ids" and "outputs" (text, token_ids,
finish_reason, stop_reason, and logprobs when asked for; "prompt_logprobs" beside them when
asked for; "logit_bias" keys are token ids as strings, as JSON has them), or "error" naming what was wrong
with that line: a bad line never ends the run. Re-running with the same --output resumes after
the lines already written (a torn last line is redone), and refuses an input file that is not
the one the output was started on.

The file flows through a grain pipeline (lines parsed ahead in grain's threads) into the
engine continuously: new lines are added as earlier ones finish, up to --max_in_flight at once.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import threading
from typing import Iterator, Optional

from absl import flags

from crosspool_jax import config_flags
from crosspool_jax.engine.config import EngineConfig
from crosspool_jax.model_specs import models_from_specs
from crosspool_jax.sampling_params import RequestOutputKind, SamplingParams

PROG = "crosspool-batch"
_SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}
_PROMPT_FIELDS = ("prompt", "prompt_token_ids", "messages")


class JsonlSource:
    """grain random-access source: record i is the i-th non-blank line of a JSONL file, parsed
    lazily. Also the file's sha256, to recognise it when a run resumes."""

    def __init__(self, path: str):
        self.path = path
        self._offsets: list[tuple[int, int]] = []        # (byte offset, 1-based line number)
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            offset = 0
            for number, line in enumerate(f, start=1):
                digest.update(line)
                if line.strip():
                    self._offsets.append((offset, number))
                offset += len(line)
        self.sha256 = digest.hexdigest()
        self._local = threading.local()

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, index: int) -> dict:
        offset, number = self._offsets[index]
        f = getattr(self._local, "file", None)
        if f is None:                       # one open file per reading thread
            f = self._local.file = open(self.path, "rb")  # noqa: SIM115 - closed with the thread's data
        f.seek(offset)
        raw = f.readline()
        where = {"_index": index, "_line": number}
        try:
            record = json.loads(raw)
        except (ValueError, RecursionError) as e:
            return {**where, "_error": f"line {number}: invalid JSON: {e}"}
        if not isinstance(record, dict):
            return {**where, "_error": f"line {number}: must be a JSON object, got {type(record).__name__}"}
        return {**record, **where}


def parse_record(record: dict, default_model: Optional[str], *, tokenizer_of=None, max_n: Optional[int] = None):
    """-> (prompt, SamplingParams, model). Raises ValueError naming the bad field.

    tokenizer_of(model) gives the tokenizer that renders a "messages" line."""
    if "_error" in record:
        raise ValueError(record["_error"])
    given = [k for k in _PROMPT_FIELDS if k in record]
    if len(given) != 1:
        raise ValueError(f"needs exactly one of {', '.join(repr(k) for k in _PROMPT_FIELDS)}"
                         + (f", got {given}" if given else ""))
    model = record.get("model", default_model)
    if model is None:
        raise ValueError("needs 'model' (several models are served and --default_model was not given)")
    if not isinstance(model, str):
        raise ValueError(f"'model' must be a string, got {model!r}")
    unknown = set(record) - _SAMPLING_FIELDS - set(_PROMPT_FIELDS) - {"model", "id", "_index", "_line"}
    if unknown:
        raise ValueError(f"unknown fields {sorted(unknown)}")
    fields = {k: v for k, v in record.items() if k in _SAMPLING_FIELDS}
    bias = fields.get("logit_bias")
    if isinstance(bias, dict):           # JSON object keys are strings: {"token id": bias}
        try:
            fields["logit_bias"] = {int(t): b for t, b in bias.items()}
        except ValueError:
            raise ValueError(f"SamplingParams.logit_bias: keys must be token ids, got {_short(list(bias))}") from None
    params = SamplingParams(**fields)
    if max_n is not None and params.n > max_n:
        raise ValueError(f"'n' is {params.n}, more than --max_n={max_n}")
    if "prompt" in record:
        prompt = record["prompt"]
        if not isinstance(prompt, str):
            raise ValueError(f"'prompt' must be a string (token ids go in 'prompt_token_ids'), got "
                             f"{type(prompt).__name__}")
    elif "prompt_token_ids" in record:
        ids = record["prompt_token_ids"]
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ValueError(f"'prompt_token_ids' must be a list of integers, got {_short(ids)}")
        prompt = {"prompt_token_ids": ids}
    else:
        prompt = {"prompt_token_ids": _render_chat(record["messages"], model, tokenizer_of)}
    return prompt, params, model


def _render_chat(messages, model: str, tokenizer_of) -> list[int]:
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content", ""), str)
            for m in messages):
        raise ValueError("'messages' must be a non-empty list of {\"role\": str, \"content\": str} objects")
    tokenizer = tokenizer_of(model) if tokenizer_of is not None else None
    if tokenizer is None:
        raise ValueError(f"model {model!r} has no tokenizer, so 'messages' cannot be rendered")
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)
    except Exception as e:  # noqa: BLE001 - a template that rejects these messages
        raise ValueError(f"cannot render 'messages' with the chat template of {model!r}: {e}") from None


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _logprobs(positions) -> list:
    return [[{"token_id": tid, "logprob": lp.logprob, "rank": lp.rank, "token": lp.decoded_token}
             for tid, lp in sorted(entries.items(), key=lambda kv: kv[1].rank if kv[1].rank is not None else 1 << 30)]
            for entries in positions]


def result_line(record: dict, out=None, error: Optional[str] = None) -> dict:
    """The output line of one input record: its result, or its error."""
    line = {"index": record["_index"], "line": record["_line"]}
    if "id" in record:
        line["id"] = record["id"]
    if error is not None or (out is not None and out.error):
        line["error"] = error or out.error
        return line
    line["model"] = out.model
    line["prompt_token_ids"] = out.prompt_token_ids
    if out.prompt_logprobs is not None:
        line["prompt_logprobs"] = [None] + _logprobs(out.prompt_logprobs[1:])
    outputs = []
    for c in out.outputs:
        entry = {"text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason,
                 "stop_reason": c.stop_reason if isinstance(c.stop_reason, (str, int)) else None}
        if c.logprobs is not None:
            entry["cumulative_logprob"] = c.cumulative_logprob
            entry["logprobs"] = _logprobs(c.logprobs)
        outputs.append(entry)
    line["outputs"] = outputs
    return line


def _lines_done(path: str) -> int:
    """Complete lines already in `path` (a torn last line is cut off)."""
    if not os.path.exists(path):
        return 0
    done = keep = 0
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break                      # a torn last line is redone
            done += 1
            keep += len(line)
    if os.path.getsize(path) != keep:
        with open(path, "rb+") as f:
            f.truncate(keep)
    return done


def _check_same_input(source: JsonlSource, output_path: str, done: int) -> None:
    """Remember which input an output belongs to (a sidecar file); refuse to resume on another."""
    meta_path = output_path + ".input.json"
    meta = {"input": os.path.abspath(source.path), "sha256": source.sha256, "lines": len(source)}
    if done and os.path.exists(meta_path):
        with open(meta_path, encoding="utf-8") as f:
            before = json.load(f)
        if before.get("sha256") != source.sha256:
            raise ValueError(f"{output_path} holds results of another input ({before.get('input')}, "
                             f"sha256 {str(before.get('sha256'))[:12]}...) than {source.path}; "
                             "use another --output or remove it")
    with open(meta_path, "w", encoding="utf-8") as f:
        json.dump(meta, f)


@dataclasses.dataclass
class BatchReport:
    total: int              # non-blank input lines
    resumed: int            # lines already in the output when the run started
    written: int            # lines written by this run
    errors: int             # of which error lines

    def summary(self, output_path: str) -> str:
        if self.resumed and not self.written:
            return f"nothing to do: all {self.total} lines are already in {output_path}"
        head = f"resumed after {self.resumed} lines already in {output_path}; " if self.resumed else ""
        return f"{head}wrote {self.written} result lines ({self.errors} errors) to {output_path}"


def run_batch(llm, input_path: str, output_path: str, *, default_model: Optional[str] = None,
              max_in_flight: int = 1024, max_n: Optional[int] = None, use_tqdm: bool = True) -> BatchReport:
    """Generate for every line of input_path not yet in output_path; append results in input order."""
    import grain  # noqa: PLC0415

    source = JsonlSource(input_path)
    start = _lines_done(output_path)
    _check_same_input(source, output_path, start)
    if default_model is None and len(llm.model_names) == 1:
        default_model = llm.model_names[0]
    dataset = grain.MapDataset.source(source)[start:]
    # one reader thread parses ahead: more would only compete with the engine loop for the GIL
    read = grain.ReadOptions(num_threads=1, prefetch_buffer_size=256)
    records: Iterator[dict] = iter(dataset.to_iter_dataset(read))
    report = BatchReport(total=len(source), resumed=min(start, len(source)), written=0, errors=0)
    bar = None
    if use_tqdm:
        from tqdm.auto import tqdm  # noqa: PLC0415
        bar = tqdm(total=len(source), initial=report.resumed, desc=PROG, unit="line")
    with open(output_path, "a", encoding="utf-8") as f:
        def write(line: dict) -> None:
            f.write(json.dumps(line) + "\n")
            report.written += 1
            report.errors += "error" in line
            if bar is not None:
                bar.update(1)

        try:
            _stream(llm, records, write, start, default_model, max_in_flight, max_n)
        finally:
            f.flush()
            if bar is not None:
                bar.close()
    return report


def _stream(llm, records: Iterator[dict], write, start: int, default_model, max_in_flight: int, max_n) -> None:
    """Keep up to max_in_flight lines in the engine, adding lines as others finish; write each
    result once every earlier line is written (at most 4 x max_in_flight results wait)."""
    engine = llm.engine
    in_flight: dict[str, dict] = {}          # request id -> record
    done: dict[int, dict] = {}               # index -> result line, waiting for its turn
    next_index, exhausted = start, False
    window = 4 * max_in_flight

    def flush():
        nonlocal next_index
        while next_index in done:
            write(done.pop(next_index))
            next_index += 1

    try:
        while True:
            while not exhausted and len(in_flight) < max_in_flight and len(done) + len(in_flight) < window:
                record = next(records, None)
                if record is None:
                    exhausted = True
                    break
                rid = f"batch-{record['_index']}"
                try:
                    prompt, params, model = parse_record(record, default_model, max_n=max_n,
                                                         tokenizer_of=engine.get_tokenizer)
                    engine.add_request(rid, model, prompt,          # read once finished
                                       dataclasses.replace(params, output_kind=RequestOutputKind.FINAL_ONLY))
                except ValueError as e:
                    done[record["_index"]] = result_line(record, error=f"line {record['_line']}: {e}")
                    continue
                in_flight[rid] = record
            flush()
            if not in_flight:
                if exhausted:
                    return
                continue
            try:
                outputs = engine.step()
            except Exception as e:  # noqa: BLE001 - an engine-wide failure fails these lines, not the run
                for rid, record in in_flight.items():
                    engine.abort_request(rid)
                    done[record["_index"]] = result_line(record, error=f"engine step failed: {type(e).__name__}: {e}")
                in_flight.clear()
                continue
            for out in outputs:
                if out.finished and out.request_id in in_flight:
                    record = in_flight.pop(out.request_id)
                    done[record["_index"]] = result_line(record, out)
    finally:
        for rid in in_flight:               # interrupted: leave nothing in the engine
            engine.abort_request(rid)


# ------------------------------------------------------------------------------ the command
FLAGS = flags.FlagValues()
flags.DEFINE_string("input", None, "JSONL file of requests, one object per line.", flag_values=FLAGS)
flags.DEFINE_string("output", None, "JSONL file of results (appended to: a rerun resumes).", flag_values=FLAGS)
flags.DEFINE_multi_string("model", [], "A served model as NAME=PATH. Unset: every model folder under the "
                          "repository's checkpoints/.", flag_values=FLAGS)
flags.DEFINE_string("default_model", None, "Model for lines without a 'model' field (needed when several "
                    "models are served).", flag_values=FLAGS)
flags.DEFINE_integer("max_in_flight", 1024, "Most lines in the engine at once.", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("max_n", 128, "Largest 'n' a line may ask for.", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_bool("progress", True, "Show a progress bar over the whole file.", flag_values=FLAGS)
_OWN_FLAGS = ["input", "output", "model", "default_model", "max_in_flight", "max_n", "progress"]
ENGINE_FLAGS = config_flags.define_flags(EngineConfig, skip=("models",), flag_values=FLAGS)


def help_text() -> str:
    first, _, rest = __doc__.partition("\n\n")
    return config_flags.format_help(f"{PROG} --input IN.jsonl --output OUT.jsonl [options]",
                                    first + "\n\n" + rest.partition("\n\n")[2],
                                    [("Batch options", _OWN_FLAGS), ("Engine options", ENGINE_FLAGS)], FLAGS)


def main(argv: Optional[list[str]] = None) -> int:
    config_flags.parse_command_line(FLAGS, list(sys.argv if argv is None else argv), prog=PROG,
                                    help_text=help_text)
    if not FLAGS.input or not FLAGS.output:
        config_flags.usage_error(PROG, "--input and --output are required")
    if not os.path.isfile(FLAGS.input):
        config_flags.usage_error(PROG, f"--input {FLAGS.input}: no such file")
    try:
        models = models_from_specs(FLAGS.model)
        options = config_flags.config_kwargs(EngineConfig, skip=("models",), flag_values=FLAGS,
                                             only_present=True)
        EngineConfig(models=models, **options)
    except ValueError as e:
        config_flags.usage_error(PROG, str(e))
    from crosspool_jax.runtime.compiles import prefer_fast_cpu_compiles  # noqa: PLC0415

    prefer_fast_cpu_compiles()                          # before JAX starts its backends
    from crosspool_jax.api import LLM  # noqa: PLC0415 - keep --help fast

    try:
        llm = LLM(models, **options)
        report = run_batch(llm, FLAGS.input, FLAGS.output, default_model=FLAGS.default_model,
                           max_in_flight=FLAGS.max_in_flight, max_n=FLAGS.max_n, use_tqdm=FLAGS.progress)
    except ValueError as e:
        config_flags.usage_error(PROG, str(e))
    print(report.summary(FLAGS.output))
    return 0


def run() -> None:
    """The `crosspool-batch` console command."""
    sys.exit(main())


if __name__ == "__main__":
    run()
