"""Benchmark shapes: a shape's layer count can be overridden (`KEY:N`), per-layer lists follow."""
import json
import os

import pytest

from crosspool_jax.models.config import ModelConfig
from crosspool_jax.models.random_models import RANDOM_WEIGHTS_MARKER, SHAPES, random_model_dirs, shape_config


def test_layer_count_override_keeps_the_shape():
    base = SHAPES["qwen3moe-30b-a3b-4l"]
    config = shape_config("qwen3moe-30b-a3b-4l:48")
    assert config["num_hidden_layers"] == 48
    assert {k: v for k, v in config.items() if k != "num_hidden_layers"} == \
        {k: v for k, v in base.items() if k != "num_hidden_layers"}
    assert base["num_hidden_layers"] == 4               # the table itself is untouched
    assert ModelConfig.from_hf_dict(config).num_layers == 48


def test_layer_types_repeat_their_pattern():
    config = ModelConfig.from_hf_dict(shape_config("gpt-oss-20b-24l:5"))
    assert config.num_layers == 5
    raw = shape_config("gpt-oss-20b-24l:5")["layer_types"]
    assert raw == ["sliding_attention", "full_attention", "sliding_attention", "full_attention",
                   "sliding_attention"]


@pytest.mark.parametrize("name,match", [("nope-2l", "unknown random model shape"),
                                        ("qwen3moe-mini-2l:0", "positive integer"),
                                        ("qwen3moe-mini-2l:x", "positive integer")])
def test_bad_names_are_refused(name, match):
    with pytest.raises(ValueError, match=match):
        shape_config(name)


def test_dirs_hold_the_config_and_the_marker(tmp_path):
    dirs = random_model_dirs(["qwen3moe-mini-2l", "qwen3moe-mini-2l:3"], root=str(tmp_path))
    assert set(dirs) == {"qwen3moe-mini-2l", "qwen3moe-mini-2l:3"}
    assert len(set(dirs.values())) == 2
    for name, folder in dirs.items():
        assert os.path.exists(os.path.join(folder, RANDOM_WEIGHTS_MARKER))
        with open(os.path.join(folder, "config.json")) as f:
            assert json.load(f)["num_hidden_layers"] == (3 if name.endswith(":3") else 2)
