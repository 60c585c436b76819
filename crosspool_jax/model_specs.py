"""Which models a program serves: `NAME=PATH` specs, or the small models shipped in checkpoints/.

Shared by the server, the batch command and the scripts (no flags defined here).
"""
from __future__ import annotations

import pathlib
from typing import Optional, Sequence

SHIPPED_ROOT = pathlib.Path(__file__).resolve().parent.parent / "checkpoints"


def shipped_models(root: Optional[pathlib.Path] = None) -> dict[str, str]:
    """Every model folder (holding config.json) under the repository's checkpoints/."""
    root = pathlib.Path(root) if root is not None else SHIPPED_ROOT
    if not root.is_dir():
        return {}
    return {p.name: str(p) for p in sorted(root.iterdir())
            if p.is_dir() and (p / "config.json").is_file()}


def parse_models(specs: Sequence[str]) -> dict[str, str]:
    """['name=path', ...] -> {name: path}, checking names are unique and paths exist."""
    models: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise ValueError(f"--model: expected NAME=PATH, got {spec!r}")
        if name in models:
            raise ValueError(f"--model: model name {name!r} given twice")
        if not pathlib.Path(path).exists():
            raise ValueError(f"--model {name}: path {path!r} does not exist")
        models[name] = path
    return models


def models_from_specs(specs: Optional[Sequence[str]]) -> dict[str, str]:
    """The models of `--model NAME=PATH` flags; with none, the shipped models."""
    if specs:
        return parse_models(specs)
    models = shipped_models()
    if not models:
        raise ValueError(f"no --model given and no models under {SHIPPED_ROOT}")
    return models
