"""load_model: sharded/single files, dtypes, placements, and every error message naming its file/tensor."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from crosspool_jax.checkpoints import CheckpointError, load_model
from crosspool_jax.checkpoints.tiny_models import make_tiny_hf_model

OVERRIDES = dict(num_experts=4, mlp_only_layers=[1], shared_expert_intermediate_size=24)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """One float32 Qwen2-MoE (shared expert, a dense layer, qkv bias) saved as a single file."""
    path = str(tmp_path_factory.mktemp("qwen2moe"))
    make_tiny_hf_model("qwen2_moe", path, seed=21, **OVERRIDES)
    return path


@pytest.fixture
def work_dir(base_dir, tmp_path):
    dst = str(tmp_path / "model")
    shutil.copytree(base_dir, dst)
    return dst


def _rewrite(folder, edit):
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _flat(tree):
    return {jax.tree_util.keystr(k): np.asarray(v, np.float32)
            for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_sharded_checkpoint_loads_the_same_params(base_dir, tmp_path):
    sharded = str(tmp_path / "sharded")
    make_tiny_hf_model("qwen2_moe", sharded, seed=21, max_shard_size="20KB", **OVERRIDES)
    assert os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(sharded) if f.endswith(".safetensors")]) > 2
    a, b = load_model(base_dir, dtype="float32"), load_model(sharded, dtype="float32")
    fa, fb = _flat((a.kv_params, a.ffn_params)), _flat((b.kv_params, b.ffn_params))
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)
    assert a.config == b.config and a.tokenizer is None and isinstance(a.generation_config, dict)
    # the HF tensors land where the table says: spot-check gate|up halves and the transpose
    raw = load_file(os.path.join(base_dir, "model.safetensors"))
    w1 = np.asarray(a.ffn_params["moe"]["w1_LEDF2"])
    F = a.config.moe_intermediate_size
    np.testing.assert_array_equal(w1[0, 3, :, :F], raw["model.layers.0.mlp.experts.3.gate_proj.weight"].T)
    np.testing.assert_array_equal(w1[0, 3, :, F:], raw["model.layers.0.mlp.experts.3.up_proj.weight"].T)
    np.testing.assert_array_equal(np.asarray(a.ffn_params["dense"]["w2_LFD"])[0],
                                  raw["model.layers.1.mlp.down_proj.weight"].T)


def test_bfloat16_file_and_dtype_conversion(base_dir, tmp_path):
    bf = str(tmp_path / "bf16")
    make_tiny_hf_model("qwen2_moe", bf, seed=21, dtype="bfloat16", **OVERRIDES)
    m32 = load_model(base_dir, dtype="float32")
    from_bf16 = load_model(bf, dtype="float32")
    to_bf16 = load_model(base_dir, dtype="bfloat16")
    want = np.asarray(m32.kv_params["attn"]["wq_LDQ"]).astype(ml_dtypes.bfloat16)
    assert from_bf16.kv_params["attn"]["wq_LDQ"].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(from_bf16.kv_params["attn"]["wq_LDQ"]), want.astype(np.float32))
    assert to_bf16.kv_params["attn"]["wq_LDQ"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(to_bf16.kv_params["attn"]["wq_LDQ"]), want)


def test_placements_device_and_callable(base_dir):
    devices = jax.devices()
    mesh = jax.sharding.Mesh(np.array(devices).reshape(2, 4), ("x", "y"))
    seen = []

    def ffn_placement(param_path, shape):
        seen.append((param_path, shape))
        if param_path == "moe/w1_LEDF2":
            return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "y"))
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    m = load_model(base_dir, dtype="float32", kv_placement=devices[5], ffn_placement=ffn_placement)
    assert all(leaf.devices() == {devices[5]} for leaf in jax.tree_util.tree_leaves(m.kv_params))
    w1 = m.ffn_params["moe"]["w1_LEDF2"]
    assert w1.sharding.spec == jax.sharding.PartitionSpec(None, "y") and len(w1.devices()) == 8
    assert ("moe/w1_LEDF2", (1, 4, 32, 32)) in seen and ("dense/norm_LD", (1, 32)) in seen


def _assert_error(path, *fragments, dtype="float32"):
    with pytest.raises(CheckpointError) as e:
        load_model(path, dtype=dtype)
    for frag in fragments:
        assert frag in str(e.value), (frag, str(e.value))


def test_unsupported_architecture(work_dir):
    cfg_path = os.path.join(work_dir, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["architectures"] = ["Qwen3NextForCausalLM"]
    json.dump(cfg, open(cfg_path, "w"))
    _assert_error(work_dir, "config.json", "unsupported architecture 'Qwen3NextForCausalLM'",
                  "MixtralForCausalLM", "Qwen3MoeForCausalLM", "OlmoeForCausalLM", "LlamaForCausalLM")


def test_missing_config(work_dir):
    os.remove(os.path.join(work_dir, "config.json"))
    _assert_error(work_dir, "missing", os.path.join(work_dir, "config.json"))


def test_missing_folder(tmp_path):
    _assert_error(str(tmp_path / "nope"), "does not exist", "nope")


def test_missing_weights(work_dir):
    os.remove(os.path.join(work_dir, "model.safetensors"))
    _assert_error(work_dir, "no *.safetensors", work_dir)


def test_index_lists_a_missing_shard(base_dir, tmp_path):
    sharded = str(tmp_path / "sharded")
    make_tiny_hf_model("qwen2_moe", sharded, seed=21, max_shard_size="20KB", **OVERRIDES)
    victim = sorted(f for f in os.listdir(sharded) if f.endswith(".safetensors"))[1]
    os.remove(os.path.join(sharded, victim))
    _assert_error(sharded, victim, "model.safetensors.index.json", "missing")


def test_missing_tensor(work_dir):
    _rewrite(work_dir, lambda t: t.pop("model.layers.0.mlp.experts.2.up_proj.weight"))
    _assert_error(work_dir, "missing tensors", "'model.layers.0.mlp.experts.2.up_proj.weight'")


def test_unexpected_tensor(work_dir):
    _rewrite(work_dir, lambda t: t.update({"model.layers.0.mlp.experts.9.up_proj.weight":
                                           np.random.default_rng(0).normal(size=(16, 32)).astype(np.float32)}))
    _assert_error(work_dir, "unexpected tensors", "'model.layers.0.mlp.experts.9.up_proj.weight'")


def test_rotary_buffers_are_ignored(work_dir):
    _rewrite(work_dir, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq":
                                           np.random.default_rng(1).random(4).astype(np.float32)}))
    assert load_model(work_dir, dtype="float32").config.family == "qwen2_moe"


def test_mtp_layers_after_the_last_are_ignored_for_glm45_only(tmp_path):
    """GLM-4.5 and DeepSeek-V3 checkpoints store their multi-token-prediction layer as
    model.layers.{num_hidden_layers}.*: skipped, as transformers does; elsewhere an extra layer is
    an unexpected tensor."""
    extra = {"model.layers.2.mlp.gate.weight": np.random.default_rng(3).normal(size=(8, 32)).astype(np.float32),
             "model.layers.2.eh_proj.weight": np.random.default_rng(4).normal(size=(32, 64)).astype(np.float32)}
    glm = str(tmp_path / "glm")
    make_tiny_hf_model("glm4_moe", glm, seed=9)
    clean = _flat(load_model(glm, dtype="float32").ffn_params)
    _rewrite(glm, lambda t: t.update(extra))
    loaded = load_model(glm, dtype="float32")
    assert loaded.config.family == "glm4_moe" and loaded.config.num_layers == 2
    assert all(np.array_equal(v, clean[k]) for k, v in _flat(loaded.ffn_params).items())
    mixtral = str(tmp_path / "mixtral")
    make_tiny_hf_model("mixtral", mixtral, seed=9)
    _rewrite(mixtral, lambda t: t.update(extra))
    _assert_error(mixtral, "unexpected tensors", "'model.layers.2.mlp.gate.weight'")


def test_shape_mismatch(work_dir):
    name = "model.layers.1.self_attn.k_proj.weight"
    _rewrite(work_dir, lambda t: t.update({name: np.random.default_rng(2).normal(size=(24, 32)).astype(np.float32)}))
    _assert_error(work_dir, repr(name), "model.safetensors", "(24, 32)", "expected (16, 32)")


def test_dtype_that_cannot_be_cast(work_dir):
    name = "model.layers.0.input_layernorm.weight"
    _rewrite(work_dir, lambda t: t.update({name: np.random.default_rng(3).integers(0, 9, 32)}))
    _assert_error(work_dir, repr(name), "I64", "cannot be cast")


def test_unsupported_target_dtype(base_dir):
    with pytest.raises(ValueError, match="dtype 'int8' is not a supported parameter dtype"):
        load_model(base_dir, dtype="int8")


def test_corrupt_config_json(work_dir):
    with open(os.path.join(work_dir, "config.json"), "w") as f:
        f.write("{not json")
    _assert_error(work_dir, "cannot parse", "config.json")
