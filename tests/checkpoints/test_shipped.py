"""The models shipped in checkpoints/: load, tokenize, and match transformers (float32 logits)."""
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from crosspool_jax.checkpoints import load_model
from crosspool_jax.models import dense_logits

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "checkpoints")
SHIPPED = ["mixtral-tiny", "qwen3-moe-tiny", "olmoe-tiny", "qwen2-moe-tiny", "deepseek-v2-tiny"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_matches_transformers(name):
    path = os.path.join(ROOT, name)
    m = load_model(path, dtype="float32")
    tok = m.tokenizer
    assert tok is not None and tok.vocab_size == m.config.vocab_size == 1024
    assert m.eos_token_ids == (tok.eos_token_id,) == (2,)
    prompt = tok.apply_chat_template([{"role": "user", "content": f"Tell me about {name}."}])
    ids = tok.encode(prompt)
    assert tok.decode(ids, skip_special_tokens=False) == prompt
    n = len(ids)
    ours = np.asarray(dense_logits(m.kv_params, m.ffn_params, m.config, jnp.asarray(ids, jnp.int32),
                                   jnp.zeros(n, jnp.int32), jnp.arange(n, dtype=jnp.int32)))
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        ref = hf(torch.tensor(ids)[None]).logits[0].numpy()
    assert np.abs(ours - ref).max() / np.abs(ref).max() < 1e-4   # relative to max |logit|
