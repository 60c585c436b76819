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


@pytest.fixture(scope="session")
def mixed_model_dirs(tiny_model_dirs, tmp_path_factory) -> dict:
    """Four models of three families, name -> folder, in this order: "q0" (Qwen3-MoE), "mx"
    (Mixtral), "ol" (OLMoE) and "q1" (Qwen3-MoE again: the same shapes as q0, other weights,
    seed 77). The order is the one the engine is given (it breaks the placement rules' ties)."""
    path = tmp_path_factory.mktemp("q1")
    make_tiny_hf_model("qwen3_moe", str(path), seed=77)
    return {"q0": tiny_model_dirs["qwen3_moe"], "mx": tiny_model_dirs["mixtral"], "ol": tiny_model_dirs["olmoe"],
            "q1": str(path)}
