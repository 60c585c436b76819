"""The public LLM serving traces in their own column formats, read into `TraceRequest`s.

- Azure LLM inference trace (AzurePublicDataset, `AzureLLMInferenceTrace_{conv,code}*.csv`):
  columns `TIMESTAMP, ContextTokens, GeneratedTokens`; TIMESTAMP a date-time such as
  `2023-11-16 18:15:46.6805900` (any number of fractional digits, optional UTC offset) or a
  number of seconds. The file names no model: its requests take `model` (by default the
  file's stem), and `traces.map_models` puts that onto a served model.
- BurstGPT (`BurstGPT_*.csv`): columns `Timestamp, Model, Request tokens, Response tokens`
  (more columns, e.g. `Total tokens, Log Type`, are ignored); Timestamp in seconds. Rows with
  0 request or response tokens (failed requests in the log) are dropped and counted.

Both load from CSV or from JSONL objects with the same keys. Arrival times count from the
file's first request and are multiplied by `time_scale` (0.5 replays twice as fast).
`load_trace(path)` reads any of these or the project's own JSONL (`traces.read_jsonl`), telling
them apart by their columns. `write_azure_csv` / `write_burstgpt_csv` write the formats (the
samples in `benchmarks/traces/` are generated traces written this way).
"""
from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import math
import os
import re
from typing import Iterable, Optional, Sequence

from crosspool_jax.bench.traces import FIELDS, TraceRequest, read_jsonl, scale_time, sort

AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
BURSTGPT_COLUMNS = ("Timestamp", "Model", "Request tokens", "Response tokens")
FORMATS = ("auto", "jsonl", "azure", "burstgpt")

_DATETIME = re.compile(r"^(\d{4})-(\d{2})-(\d{2})[ T](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?"
                       r"(Z|[+-]\d{2}:?\d{2})?$")
_AZURE_EPOCH = datetime.datetime(2023, 11, 16, 18, 0, 0, tzinfo=datetime.timezone.utc)


@dataclasses.dataclass
class LoadedTrace:
    """Requests read from a file and what was left out."""

    requests: list[TraceRequest]
    format: str
    dropped: int = 0                # rows without tokens (BurstGPT failures)


def parse_timestamp(text: str) -> tuple[int, float]:
    """(whole seconds, fraction): since the epoch for a date-time, the number itself for a number.
    Kept apart so that differences of date-times keep their sub-microsecond digits."""
    text = text.strip()
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(value):
            raise ValueError(f"timestamp {text!r} is not finite")
        return math.floor(value), value - math.floor(value)
    m = _DATETIME.match(text)
    if not m:
        raise ValueError(f"cannot read timestamp {text!r} (expected e.g. 2023-11-16 18:15:46.6805900 "
                         f"or seconds)")
    year, month, day, hour, minute, second = (int(m.group(i)) for i in range(1, 7))
    tz = datetime.timezone.utc
    if m.group(8) and m.group(8) != "Z":
        sign = 1 if m.group(8)[0] == "+" else -1
        digits = m.group(8)[1:].replace(":", "")
        tz = datetime.timezone(sign * datetime.timedelta(hours=int(digits[:2]), minutes=int(digits[2:])))
    whole = int(datetime.datetime(year, month, day, hour, minute, second, tzinfo=tz).timestamp())
    return whole, (float("0." + m.group(7)) if m.group(7) else 0.0)


def _int_field(row: dict, key: str, where: str) -> int:
    text = str(row[key]).strip()
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{where}: column {key!r} is not a number: {text!r}") from None
    if value != int(value) or value < 0:
        raise ValueError(f"{where}: column {key!r} must be a whole number >= 0, got {text!r}")
    return int(value)


def _rows(path: str):
    """(where, row dict) of a CSV (header line first) or a JSONL file, and the columns."""
    with open(path, newline="") as f:
        first = f.readline()
        f.seek(0)
        if first.lstrip().startswith("{"):
            columns = tuple(json.loads(first).keys())
            rows = []
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        rows.append((f"{path}:{lineno}", json.loads(line)))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{lineno}: not JSON ({e.msg})") from None
            return columns, rows
        reader = csv.DictReader(f)
        columns = tuple(c.strip() for c in (reader.fieldnames or ()))
        reader.fieldnames = list(columns)
        return columns, [(f"{path}:{lineno}", row) for lineno, row in enumerate(reader, start=2)]


def _require(columns: Sequence[str], wanted: Sequence[str], path: str, kind: str) -> None:
    missing = [c for c in wanted if c not in columns]
    if missing:
        raise ValueError(f"{path}: not a {kind} trace: missing column(s) {', '.join(missing)} "
                         f"(found: {', '.join(columns) or 'none'}; a {kind} file has "
                         f"{', '.join(wanted)})")


def _relative(stamped: list[tuple[tuple[int, float], str, int, int]], time_scale: float) -> list[TraceRequest]:
    if not stamped:
        return []
    w0, f0 = min(s[0] for s in stamped)
    return sort(scale_time([TraceRequest(round((w - w0) + (f - f0), 7), m, p, o)
                            for (w, f), m, p, o in stamped], time_scale))


def load_azure(path: str, *, model: Optional[str] = None, time_scale: float = 1.0) -> LoadedTrace:
    """An Azure LLM inference trace file; every request for `model` (default: the file's stem)."""
    columns, rows = _rows(path)
    _require(columns, AZURE_COLUMNS, path, "Azure LLM inference")
    name = model or os.path.splitext(os.path.basename(path))[0]
    stamped, dropped = [], 0
    for where, row in rows:
        try:
            t = parse_timestamp(str(row["TIMESTAMP"]))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        p, o = _int_field(row, "ContextTokens", where), _int_field(row, "GeneratedTokens", where)
        if p < 1 or o < 1:
            dropped += 1
            continue
        stamped.append((t, name, p, o))
    return LoadedTrace(_relative(stamped, time_scale), "azure", dropped)


def load_burstgpt(path: str, *, time_scale: float = 1.0) -> LoadedTrace:
    """A BurstGPT file; each request keeps the file's model name (ChatGPT, GPT-4, ...)."""
    columns, rows = _rows(path)
    _require(columns, BURSTGPT_COLUMNS, path, "BurstGPT")
    stamped, dropped = [], 0
    for where, row in rows:
        try:
            t = parse_timestamp(str(row["Timestamp"]))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        model = str(row["Model"]).strip()
        if not model:
            raise ValueError(f"{where}: column 'Model' is empty")
        p, o = _int_field(row, "Request tokens", where), _int_field(row, "Response tokens", where)
        if p < 1 or o < 1:
            dropped += 1
            continue
        stamped.append((t, model, p, o))
    return LoadedTrace(_relative(stamped, time_scale), "burstgpt", dropped)


def detect_format(path: str) -> str:
    """'jsonl' (this project's), 'azure' or 'burstgpt', from the file's columns."""
    columns, _ = _rows(path)
    for kind, wanted in (("jsonl", FIELDS), ("azure", AZURE_COLUMNS), ("burstgpt", BURSTGPT_COLUMNS)):
        if all(c in columns for c in wanted):
            return kind
    raise ValueError(f"{path}: unknown trace format (columns: {', '.join(columns) or 'none'}); expected "
                     f"this project's JSONL ({', '.join(FIELDS)}), Azure ({', '.join(AZURE_COLUMNS)}) "
                     f"or BurstGPT ({', '.join(BURSTGPT_COLUMNS)})")


def load_trace(path: str, *, fmt: str = "auto", time_scale: float = 1.0,
               model: Optional[str] = None) -> LoadedTrace:
    """Any supported trace file. `model` names an Azure file's model; `time_scale` multiplies
    arrival times (this project's JSONL keeps its own time origin)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown trace format {fmt!r}; known: {', '.join(FORMATS)}")
    if not os.path.isfile(path):
        raise ValueError(f"trace file {path!r} does not exist")
    kind = detect_format(path) if fmt == "auto" else fmt
    if kind == "azure":
        return load_azure(path, model=model, time_scale=time_scale)
    if kind == "burstgpt":
        return load_burstgpt(path, time_scale=time_scale)
    requests = read_jsonl(path)
    return LoadedTrace(scale_time(requests, time_scale) if time_scale != 1.0 else requests, "jsonl")


def write_azure_csv(requests: Iterable[TraceRequest], path: str,
                    start: datetime.datetime = _AZURE_EPOCH) -> int:
    """The Azure format (model names are not kept): TIMESTAMP = start + arrival_s, 7 digits."""
    n = 0
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(AZURE_COLUMNS)
        for r in requests:
            stamp = start + datetime.timedelta(seconds=r.arrival_s)
            text = stamp.strftime("%Y-%m-%d %H:%M:%S") + f".{stamp.microsecond:06d}0"
            writer.writerow((text, r.prompt_tokens, r.output_tokens))
            n += 1
    return n


def write_burstgpt_csv(requests: Iterable[TraceRequest], path: str) -> int:
    """The BurstGPT format, with its Total tokens and Log Type columns."""
    n = 0
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(BURSTGPT_COLUMNS + ("Total tokens", "Log Type"))
        for r in requests:
            writer.writerow((f"{r.arrival_s:.6f}", r.model, r.prompt_tokens, r.output_tokens,
                             r.prompt_tokens + r.output_tokens, "Conversation log"))
            n += 1
    return n
