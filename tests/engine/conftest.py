"""Fixtures shared by the engine tests: tiny random HF checkpoints of every family, each made on first use."""
import pytest

from crosspool_jax.checkpoints.tiny_models import FAMILIES, make_tiny_hf_model


class _TinyModelDirs:
    """{family: folder}, written when a test first asks for the family (seeded by its place in
    FAMILIES: the same weights every run, whichever families a worker's tests use)."""

    def __init__(self, tmp_path_factory):
        self._factory = tmp_path_factory
        self._dirs = {}

    def __getitem__(self, family: str) -> str:
        if family not in self._dirs:
            path = self._factory.mktemp(family)
            make_tiny_hf_model(family, str(path), seed=100 + list(FAMILIES).index(family))
            self._dirs[family] = str(path)
        return self._dirs[family]


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> _TinyModelDirs:
    """{family: folder} for every supported family, written lazily (a checkpoint takes about a second)."""
    return _TinyModelDirs(tmp_path_factory)
