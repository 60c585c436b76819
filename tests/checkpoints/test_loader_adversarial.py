"""Broken checkpoints fail fast with a CheckpointError naming the file, the tensor or the
config field: truncated files, absurd header lengths, mistyped config values, huge layer
counts, index entries outside the folder."""
import json
import os
import shutil
import struct
import time

import pytest

from crosspool_jax.checkpoints import CheckpointError, load_model

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHIPPED = os.path.join(REPO, "checkpoints", "mixtral-tiny")


@pytest.fixture
def model_dir(tmp_path):
    dst = tmp_path / "mixtral"
    shutil.copytree(SHIPPED, dst)
    return dst


def _edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _load_error(folder) -> str:
    with pytest.raises(CheckpointError) as info:
        load_model(str(folder), dtype="float32")
    return str(info.value)


def test_truncated_file_names_file_and_tensor(model_dir):
    weights = model_dir / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    message = _load_error(model_dir)
    assert "model.safetensors" in message and "truncated" in message and "tensor '" in message


def test_absurd_header_length(model_dir):
    weights = model_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(struct.pack("<Q", 2 ** 62) + data[8:])
    message = _load_error(model_dir)
    assert "model.safetensors" in message and str(2 ** 62) in message


@pytest.mark.parametrize("changes,named", [
    ({"num_attention_heads": 0}, "num_attention_heads"),
    ({"hidden_size": [64]}, "hidden_size"),
    ({"hidden_size": "64"}, "hidden_size"),
    ({"architectures": "MixtralForCausalLM"}, "architectures"),
    ({"vocab_size": 10.5}, "vocab_size"),
    ({"eos_token_id": "two"}, "eos_token_id"),
])
def test_config_values_name_the_field(model_dir, changes, named):
    _edit_config(model_dir, **changes)
    message = _load_error(model_dir)
    assert "config.json" in message and named in message


def test_huge_layer_count_fails_fast(model_dir):
    _edit_config(model_dir, num_hidden_layers=100000)
    t0 = time.perf_counter()
    message = _load_error(model_dir)
    assert time.perf_counter() - t0 < 5
    assert "num_hidden_layers=100000" in message and "layers 0..1" in message


def test_index_pointing_outside_the_folder(model_dir, tmp_path):
    shutil.copy(model_dir / "model.safetensors", tmp_path / "x.safetensors")
    (model_dir / "model.safetensors").unlink()
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.embed_tokens.weight": "../x.safetensors"}}))
    message = _load_error(model_dir)
    assert "outside the checkpoint folder" in message and "../x.safetensors" in message
