"""Orbax round trip: convert a Hugging Face folder, restore with an explicit sharding over the
8 simulated CPU devices, identical params and logits; the CLI and the marker checks."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crosspool_jax.checkpoints import CheckpointError, load_model
from crosspool_jax.checkpoints.__main__ import main as cli_main
from crosspool_jax.checkpoints.orbax_io import _abstract_tree, convert
from crosspool_jax.checkpoints.tiny_models import make_tiny_hf_model, train_byte_bpe, write_tokenizer_files
from crosspool_jax.models import dense_logits

P = jax.sharding.PartitionSpec


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("mixtral"))
    make_tiny_hf_model("mixtral", path, seed=31, num_local_experts=8, num_attention_heads=8,
                       num_key_value_heads=4)
    rng = np.random.default_rng(31)
    words = ["alpha", "beta", "gamma", "delta", "omega", "mixture", "expert", "pool"]
    texts = [" ".join(rng.choice(words, 40)) for _ in range(50)]
    write_tokenizer_files(path, train_byte_bpe(texts, vocab_size=300))
    return path


def _logits(m, ids):
    n = len(ids)
    return np.asarray(dense_logits(m.kv_params, m.ffn_params, m.config, jnp.asarray(ids, jnp.int32),
                                   jnp.zeros(n, jnp.int32), jnp.arange(n, dtype=jnp.int32)))


def test_round_trip_with_sharding_over_8_devices(hf_dir, tmp_path):
    dst = str(tmp_path / "orbax")
    assert cli_main(["convert", hf_dir, dst]) == 0
    marker = json.load(open(os.path.join(dst, "crosspool_orbax.json")))
    assert marker["dtype"] == "float32" and os.path.exists(os.path.join(dst, "tokenizer.json"))
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    assert mesh.devices.size == 8

    def ffn_sharding(path, shape):   # experts over "model", F over "data"
        if path == "moe/w1_LEDF2":
            return jax.sharding.NamedSharding(mesh, P(None, "model", None, "data"))
        if path == "moe/w2_LEFD":
            return jax.sharding.NamedSharding(mesh, P(None, "model", "data", None))
        return jax.sharding.NamedSharding(mesh, P())

    def kv_sharding(path, shape):    # q/k/v columns over "model"
        if path in ("attn/wq_LDQ", "attn/wk_LDKH", "attn/wv_LDKH"):
            return jax.sharding.NamedSharding(mesh, P(None, None, "model"))
        return jax.sharding.NamedSharding(mesh, P())

    restored = load_model(dst, dtype="float32", kv_placement=kv_sharding, ffn_placement=ffn_sharding)
    original = load_model(hf_dir, dtype="float32")
    assert restored.config == original.config and restored.tokenizer is not None
    w1 = restored.ffn_params["moe"]["w1_LEDF2"]
    assert w1.sharding.spec == P(None, "model", None, "data") and len(w1.devices()) == 8
    assert restored.kv_params["attn"]["wq_LDQ"].sharding.spec == P(None, None, "model")
    for a, b in zip(jax.tree_util.tree_leaves((original.kv_params, original.ffn_params)),
                    jax.tree_util.tree_leaves((restored.kv_params, restored.ffn_params))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ids = restored.tokenizer.encode("alpha beta expert pool gamma")
    want = _logits(original, ids)
    # identical logits once the restored params are gathered onto one device
    gathered = load_model(dst, dtype="float32")
    np.testing.assert_array_equal(_logits(gathered, ids), want)
    # and running sharded (partitioned matmuls may reorder float sums) agrees to float32 roundoff
    np.testing.assert_allclose(_logits(restored, ids), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_restore_casts_to_bfloat16(hf_dir, tmp_path):
    dst = convert(hf_dir, str(tmp_path / "o"))
    m = load_model(dst, dtype="bfloat16")
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree_util.tree_leaves((m.kv_params, m.ffn_params)))


def test_convert_refuses_non_empty_destination(hf_dir, tmp_path):
    dst = tmp_path / "busy"
    dst.mkdir()
    (dst / "keep.txt").write_text("x")
    with pytest.raises(CheckpointError, match="not empty"):
        convert(hf_dir, str(dst))
    assert cli_main(["convert", hf_dir, str(dst)]) == 1


def test_bad_marker_and_missing_params(hf_dir, tmp_path):
    dst = convert(hf_dir, str(tmp_path / "o"))
    marker = os.path.join(dst, "crosspool_orbax.json")
    json.dump({"format": "something-else", "version": 7}, open(marker, "w"))
    with pytest.raises(CheckpointError, match="unknown format 'something-else'"):
        load_model(dst)
    json.dump({"format": "crosspool-orbax", "version": 1}, open(marker, "w"))
    os.rename(os.path.join(dst, "params"), os.path.join(dst, "params_moved"))
    with pytest.raises(CheckpointError, match="missing .*params"):
        load_model(dst)


def test_abstract_tree_places_each_leaf_by_its_path():
    cpu = jax.devices("cpu")
    shapes = {"attn": {"wq_LDQ": (2, 4, 8), "inner": {"sinks_LN": (2, 3)}}, "embed": {"embedding_VD": (16, 4)},
              "norm_D": (4,)}
    placed = {}

    def placement(path, shape):                     # a different device per leaf, by call order
        placed[path] = (shape, cpu[len(placed) % len(cpu)])
        return placed[path][1]

    tree = _abstract_tree(shapes, np.dtype("float32"), placement)
    assert {p: s for p, (s, _) in placed.items()} == {"attn/wq_LDQ": (2, 4, 8), "attn/inner/sinks_LN": (2, 3),
                                                      "embed/embedding_VD": (16, 4), "norm_D": (4,)}
    assert jax.tree.structure(tree) == jax.tree.structure(shapes, is_leaf=lambda x: isinstance(x, tuple))
    for path, (shape, device) in placed.items():    # each leaf under its path, with what its placement gave
        node = tree
        for key in path.split("/"):
            node = node[key]
        assert node == jax.ShapeDtypeStruct(shape, np.float32, sharding=jax.sharding.SingleDeviceSharding(device))
    default = _abstract_tree(shapes, np.dtype("bfloat16"), None)["attn"]["inner"]["sinks_LN"]
    assert default == jax.ShapeDtypeStruct((2, 3), jnp.bfloat16,
                                           sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))
