"""Fixtures shared by the engine tests: tiny random HF checkpoints of every family, made once."""
import pytest

from crosspool_jax.checkpoints.tiny_models import FAMILIES, make_tiny_hf_model


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict:
    """{family: folder} for every supported family (seeded: the same weights every run)."""
    dirs = {}
    for i, family in enumerate(FAMILIES):
        path = tmp_path_factory.mktemp(family)
        make_tiny_hf_model(family, str(path), seed=100 + i)
        dirs[family] = str(path)
    return dirs
