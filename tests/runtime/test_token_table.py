"""The step programs' token table: every program writes each row's last sampled token into
the row's slot, and a row whose input id is read from its slot (`device_token`) computes what
the same row fed the id from the host computes (random weights, fresh inputs)."""
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np

from crosspool_jax.engine.runner import _decode_args
from crosspool_jax.models import ModelConfig, init_random_params
from crosspool_jax.runtime import sampling_metadata as smeta
from crosspool_jax.runtime.packed_arrays import PackedArrays
from crosspool_jax.runtime.shapes import DecodeShape, StepShape
from crosspool_jax.runtime.step_inputs import NO_SLOT, build_step_inputs, build_token_slots
from crosspool_jax.runtime.step_program import DecodeLane, multi_decode, ragged_step

CONFIG = ModelConfig.from_hf_dict({
    "architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 64, "hidden_size": 32, "moe_intermediate_size": 16,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
    "num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": True, "rope_theta": 1e4,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False})
PAGES, G = 32, 4                      # page_elems = G * K * H
SLOTS, SLOT = 8, 5
STATIC = dict(config=CONFIG, num_logprobs=0, attention_backend="reference", moe_backend="reference")


def _chunk(start, token_ids, *, samples=True, device_token=False, blocks=3):
    table = np.array([[l * 8 + b for b in range(blocks)] for l in range(CONFIG.num_layers)], np.int32)
    return SimpleNamespace(request=SimpleNamespace(request_id="r"), start=start, num_tokens=len(token_ids),
                           token_ids=token_ids, page_table=table, samples=samples, token_slot=SLOT,
                           device_token=device_token)


def _ragged(params, k, v, table, chunk, shape=StepShape(16, 8, 4)):
    inputs, _ = build_step_inputs([chunk], shape=shape, num_layers=CONFIG.num_layers, tokens_per_page=G,
                                  num_pages=PAGES)
    counts, mask = smeta.build_token_history([], shape.num_seqs, CONFIG.vocab_size, length=16)
    slots = build_token_slots([chunk], shape.num_tokens, shape.num_seqs)
    k, v, table, packed = ragged_step(*params, k, v, table, PackedArrays.pack((inputs, slots)),
                                      smeta.build_sampling_metadata([], pad_rows_to=shape.num_seqs), counts, mask,
                                      **STATIC)
    out, _ = jax.device_get(packed).unpack()
    return k, v, table, out


def _prefilled():
    params = init_random_params(CONFIG, jax.random.key(3), jnp.float32)
    row = G * CONFIG.num_kv_heads * CONFIG.head_dim
    k = jnp.zeros((PAGES, row), jnp.float32)
    v = jnp.zeros((PAGES, row), jnp.float32)
    table = jnp.asarray(np.arange(SLOTS, dtype=np.int32) + 100)        # other slots must stay as they are
    prompt = np.random.default_rng(4).integers(1, CONFIG.vocab_size, 6).tolist()
    k, v, table, out = _ragged(params, k, v, table, _chunk(0, prompt))
    first = int(out.token_ids_S[0])
    expected = np.arange(SLOTS) + 100
    expected[SLOT] = first
    np.testing.assert_array_equal(np.asarray(table), expected)              # the sample, in the row's slot
    return params, k, v, table, first


def _copy(*arrays):
    return [jnp.array(a, copy=True) for a in arrays]                     # the programs donate theirs


def test_ragged_step_reads_the_row_slot_as_the_host_id():
    params, k, v, table, first = _prefilled()
    host = _ragged(params, *_copy(k, v, table), _chunk(6, [first]))
    fed = _ragged(params, *_copy(k, v, table), _chunk(6, [-1], device_token=True))
    np.testing.assert_array_equal(np.asarray(fed[0]), np.asarray(host[0]))          # the same K/V written
    np.testing.assert_array_equal(fed[3].token_ids_S, host[3].token_ids_S)
    np.testing.assert_allclose(fed[3].logprob_S, host[3].logprob_S, rtol=1e-6)
    assert int(fed[2][SLOT]) == int(fed[3].token_ids_S[0])


def test_multi_decode_reads_the_slot_and_writes_the_last_allowed_token():
    params, k, v, table, first = _prefilled()
    shape, steps, allowance = DecodeShape(8, 4), 4, 3

    def run(chunk):
        args = _decode_args(CONFIG, [chunk], shape, [[]], [allowance])
        counts, mask = smeta.build_token_history([], shape.num_seqs, CONFIG.vocab_size, length=16)
        lane = DecodeLane(*params, *args[:4], smeta.build_sampling_metadata([], pad_rows_to=shape.num_seqs),
                          counts, mask, *args[4:])
        k2, v2, table2, packed = multi_decode(PackedArrays.pack((lane,)), *_copy(k, v, table), num_steps=steps,
                                              **STATIC)
        [out] = jax.device_get(packed).unpack()
        return k2, table2, out

    host = run(_chunk(6, [first]))
    fed = run(_chunk(6, [-1], device_token=True))
    np.testing.assert_array_equal(np.asarray(fed[0]), np.asarray(host[0]))
    np.testing.assert_array_equal(fed[2].token_ids_S[:allowance, 0], host[2].token_ids_S[:allowance, 0])
    # the token table holds the row's token at its allowance (its last one), not the loop's last
    assert int(fed[1][SLOT]) == int(fed[2].token_ids_S[allowance - 1, 0])
    untouched = np.arange(SLOTS) + 100
    assert np.array_equal(np.delete(np.asarray(fed[1]), SLOT), np.delete(untouched, SLOT))


def test_a_row_that_does_not_sample_writes_nothing():
    params, k, v, table, _ = _prefilled()
    before = np.asarray(table).copy()
    _, _, table, _ = _ragged(params, k, v, table, _chunk(6, [7, 8, 9], samples=False))
    np.testing.assert_array_equal(np.asarray(table), before)
    assert NO_SLOT > SLOTS
