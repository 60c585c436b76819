"""The MXFP4 loader: a GPT-OSS checkpoint in the released format (expert weights as uint8
blocks + scales, written here) loads to the weights transformers' own dequantisation
(`integrations.mxfp4.convert_moe_packed_tensors`) gives, and the model then computes
transformers' logits with those weights."""
import os

import jax.numpy as jnp
import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from crosspool_jax.checkpoints import load_model
from crosspool_jax.checkpoints.mxfp4 import Mxfp4Tensors, dequantize
from crosspool_jax.checkpoints.safetensors_io import SafetensorsSet
from crosspool_jax.checkpoints.tiny_models import make_tiny_hf_model
from crosspool_jax.models import dense_logits

E, D, F = 4, 64, 32


def _deinterleave(w):
    return np.concatenate([w[..., 0::2], w[..., 1::2]], axis=-1)


def _quantize_experts(path, rng):
    """Replace every layer's gate_up_proj / down_proj by random MXFP4 blocks + scales (the
    released layout); returns {name: (blocks, scales)}."""
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    packed = {}
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        rows, cols = (2 * F, D) if name.endswith("gate_up_proj") else (D, F)     # [out, in] per expert
        blocks = rng.integers(0, 256, (E, rows, cols // 32, 16), dtype=np.uint8)
        scales = rng.integers(122, 130, (E, rows, cols // 32), dtype=np.uint8)
        del tensors[name]
        tensors[name + "_blocks"], tensors[name + "_scales"] = blocks, scales
        packed[name] = (blocks, scales)
    save_file(tensors, file, metadata={"format": "pt"})
    return packed


def test_dequantize_matches_transformers_on_every_code_and_scale():
    rng = np.random.default_rng()
    blocks = rng.integers(0, 256, (3, 5, 2, 16), dtype=np.uint8)
    scales = rng.integers(100, 150, (3, 5, 2), dtype=np.uint8)
    want = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.float32)
    np.testing.assert_array_equal(dequantize(blocks, scales), want.numpy())


def test_mxfp4_checkpoint_loads_to_transformers_dequantised_weights(tmp_path):
    rng = np.random.default_rng()
    model = make_tiny_hf_model("gpt_oss", str(tmp_path), seed=5, hidden_size=D, intermediate_size=F,
                               num_local_experts=E, num_hidden_layers=2)
    packed = _quantize_experts(str(tmp_path), rng)
    view = Mxfp4Tensors(SafetensorsSet(str(tmp_path)))
    assert view.quantized == {n for n in packed}
    assert view.info("model.layers.0.mlp.experts.gate_up_proj") == ("F32", (E, D, 2 * F))

    ours = load_model(str(tmp_path), dtype="float32")
    with torch.no_grad():
        for l, layer in enumerate(model.model.layers):
            for proj in ("gate_up_proj", "down_proj"):
                blocks, scales = packed[f"model.layers.{l}.mlp.experts.{proj}"]
                theirs = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales),
                                                    dtype=torch.float32)
                getattr(layer.mlp.experts, proj).copy_(theirs)
                got = ours.ffn_params["moe"]["w1_LEDF2" if proj == "gate_up_proj" else "w2_LEFD"][l]
                want = _deinterleave(theirs.numpy()) if proj == "gate_up_proj" else theirs.numpy()
                np.testing.assert_array_equal(np.asarray(got), want)

    ids = rng.integers(0, 256, 9)
    n = len(ids)
    logits = np.asarray(dense_logits(ours.kv_params, ours.ffn_params, ours.config, jnp.asarray(ids, jnp.int32),
                                     jnp.zeros(n, jnp.int32), jnp.arange(n, dtype=jnp.int32)))
    with torch.no_grad():
        want = model(torch.tensor(ids)[None]).logits[0].numpy()
    assert np.abs(logits - want).max() / np.abs(want).max() < 1e-4
