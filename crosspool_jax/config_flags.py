"""absl flags generated from configuration dataclasses: one source of options.

`define_flags(EngineConfig)` defines one flag per field of the dataclass, with the field's
default and the help text of its metadata (`metadata["help"]`, `["choices"]`, `["kind"]`:
"bytes" flags read 512MiB / 4GiB, "devices" flags read a count or indices). `config_kwargs`
reads the flags back as keyword arguments for the dataclass. The server and the batch command
build their flags this way from `EngineConfig` and their own option dataclasses, so a field
added to a config is a flag at once, with the same name, default and help.
"""
from __future__ import annotations

import ast
import dataclasses
import re
import sys
import textwrap
import typing
from typing import Any, Iterable, Union

from absl import flags

_BYTES_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_bytes(text: str, *, name: str) -> int:
    """'1073741824', '512MiB', '2G', '1.5GiB' -> bytes (K/M/G/T and KiB/MiB/... are powers of 1024,
    KB/MB/... of 1000)."""
    m = _BYTES_RE.match(text)
    if not m:
        raise ValueError(f"--{name}: cannot read {text!r} as a byte count (e.g. 4GiB, 512MB)")
    number, unit, suffix = float(m.group(1)), m.group(2).lower(), m.group(3).lower()
    power = "kmgt".index(unit) + 1 if unit else 0
    base = 1000 if suffix == "b" and unit else 1024
    return int(number * base ** power)


def parse_devices(text: str, *, name: str) -> Union[int, list[int]]:
    """'2' -> 2 (a count); '0,1' -> [0, 1] (device indices)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or not all(p.isdigit() for p in parts):
        raise ValueError(f"--{name}: expected a count (2) or device indices (0,1), got {text!r}")
    if len(parts) == 1 and "," not in text:
        return int(parts[0])
    return [int(p) for p in parts]


def _fields(cls, skip: Iterable[str]) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.name not in set(skip)]


def _default(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def _base_type(annotation) -> Any:
    """int for Optional[int], ...; None for anything that is not one plain type."""
    if annotation in (int, float, bool, str):
        return annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is Union and len(args) == 1 and args[0] in (int, float, bool, str):
        return args[0]
    return None


def _help(cls, field: dataclasses.Field) -> str:
    return field.metadata.get("help") or f"{cls.__name__}.{field.name}"


def define_flags(cls, *, skip: Iterable[str] = (), flag_values=flags.FLAGS) -> list[str]:
    """One flag per field of dataclass `cls` (except `skip`); returns the flag names."""
    hints = typing.get_type_hints(cls)
    names = []
    for field in _fields(cls, skip):
        name, default, help_ = field.name, _default(field), _help(cls, field)
        kind, choices = field.metadata.get("kind"), field.metadata.get("choices")
        base = _base_type(hints[name])
        if kind in ("bytes", "devices"):
            flags.DEFINE_string(name, None if default is None else str(default), help_, flag_values=flag_values)
        elif choices:
            flags.DEFINE_enum(name, default, list(choices), help_, flag_values=flag_values)
        elif base is bool:
            flags.DEFINE_bool(name, default, help_, flag_values=flag_values)
        elif base is int:
            flags.DEFINE_integer(name, default, help_, flag_values=flag_values)
        elif base is float:
            flags.DEFINE_float(name, default, help_, flag_values=flag_values)
        elif base is str:
            flags.DEFINE_string(name, default, help_, flag_values=flag_values)
        else:                                   # any other type: a Python literal
            flags.DEFINE_string(name, None if default is None else repr(default),
                                help_ + " (a Python literal)", flag_values=flag_values)
        names.append(name)
    return names


def config_kwargs(cls, *, skip: Iterable[str] = (), flag_values=flags.FLAGS,
                  only_present: bool = False) -> dict:
    """The flags of `define_flags(cls)` as keyword arguments of `cls`; ValueError naming a flag
    that cannot be read. `only_present`: only the flags given on the command line."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for field in _fields(cls, skip):
        flag = flag_values[field.name]
        if only_present and not flag.present:
            continue
        value, kind = flag.value, field.metadata.get("kind")
        if isinstance(value, str) and not field.metadata.get("choices"):
            if kind == "bytes":
                value = parse_bytes(value, name=field.name)
            elif kind == "devices":
                value = parse_devices(value, name=field.name)
            elif _base_type(hints[field.name]) is None:
                try:
                    value = ast.literal_eval(value)
                except (ValueError, SyntaxError):
                    raise ValueError(f"--{field.name}: cannot read {value!r} as a Python literal") from None
        kwargs[field.name] = value
    return kwargs


def format_help(usage: str, description: str, sections: list[tuple[str, list[str]]],
                flag_values) -> str:
    """A user manual: usage, description, then each section's flags with default and help."""
    lines = [f"usage: {usage}", "", description.strip(), ""]
    for heading, names in sections:
        lines.append(f"{heading}:")
        for name in names:
            flag = flag_values[name]
            if flag.boolean:
                head = f"  --[no]{name}"
            elif isinstance(flag, flags.MultiFlag):
                head = f"  --{name} VALUE (repeatable)"
            else:
                head = f"  --{name} VALUE"
            default = flag.default_as_str if flag.default is not None else None
            if default is not None and not isinstance(flag, flags.MultiFlag):
                head += f"   (default: {default.strip(chr(39))})"
            lines.append(head)
            lines += textwrap.wrap(flag.help, width=96, initial_indent=" " * 6, subsequent_indent=" " * 6)
        lines.append("")
    return "\n".join(lines)


def parse_command_line(flag_values, argv: list[str], *, prog: str, help_text) -> list[str]:
    """Parse `argv` into `flag_values`. --help/-h prints `help_text()` and exits 0; a usage
    error prints one line naming it and exits 2. Returns the arguments left over."""
    if any(a in ("-h", "--help", "-help", "--helpfull", "--helpshort") for a in argv[1:]):
        print(help_text())
        sys.exit(0)
    try:
        rest = flag_values(argv)
    except flags.Error as e:
        usage_error(prog, str(e))
    if len(rest) > 1:
        usage_error(prog, f"unexpected arguments: {' '.join(rest[1:])}")
    return rest


def usage_error(prog: str, message: str):
    """Print '<prog>: error: <message>' and a pointer to --help; exit 2."""
    print(f"{prog}: error: {message}\nRun '{prog} --help' for the options.", file=sys.stderr)
    sys.exit(2)
