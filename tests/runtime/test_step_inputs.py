"""Scheduled chunks -> padded step arrays."""
import dataclasses

import jax
import numpy as np
import pytest

from crosspool_jax.runtime.step_inputs import StepInputs, bucket, build_step_inputs


@dataclasses.dataclass
class _Req:
    request_id: str


@dataclasses.dataclass
class _Chunk:
    request: _Req
    start: int
    num_tokens: int
    token_ids: list
    page_table: list


def test_bucket_powers_of_two():
    assert [bucket(n) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 16]
    assert bucket(3, 8) == 8


def test_mixed_prefill_and_decode():
    G, L, P = 4, 2, 20
    # a prefill chunk of 5 tokens starting at 2 (blocks 0, 1), and a decode at position 6
    c0 = _Chunk(_Req("a"), 2, 5, [11, 12, 13, 14, 15], [[3, 7], [4, 8]])
    c1 = _Chunk(_Req("b"), 6, 1, [21], [[9, 10], [11, 12]])
    inputs, shape = build_step_inputs([c0, c1], num_layers=L, tokens_per_page=G, num_pages=P,
                                      min_tokens_bucket=8, min_seqs_bucket=1)
    assert shape.num_tokens == 8 and shape.num_seqs == 2 and shape.pages_per_seq == 4
    np.testing.assert_array_equal(inputs.token_ids_T[:6], [11, 12, 13, 14, 15, 21])
    np.testing.assert_array_equal(inputs.positions_T[:6], [2, 3, 4, 5, 6, 6])
    np.testing.assert_array_equal(inputs.kv_lens_S, [7, 7])
    np.testing.assert_array_equal(inputs.cu_q_lens_S1, [0, 5, 6])
    np.testing.assert_array_equal(inputs.logits_indices_S, [4, 5])
    # layer 1: position 2 of seq a -> page 4 offset 2; position 6 of seq b -> page 12 offset 2
    assert inputs.slots_LT[1, 0] == 4 * G + 2
    assert inputs.slots_LT[1, 5] == 12 * G + 2
    assert inputs.slots_LT[0, 3] == 7 * G + 1
    assert (inputs.slots_LT[:, 6:] == P * G).all()
    assert inputs.num_seqs_1[0] == 2


def test_step_inputs_is_a_frozen_pytree_in_field_order():
    c0 = _Chunk(_Req("a"), 0, 3, [5, 6, 7], [[1], [2]])
    inputs, _ = build_step_inputs([c0], num_layers=2, tokens_per_page=4, num_pages=8,
                                  min_tokens_bucket=4, min_seqs_bucket=2)
    names = [f.name for f in dataclasses.fields(StepInputs)]
    assert names == ["token_ids_T", "positions_T", "slots_LT", "page_indices_LSP", "kv_lens_S",
                     "cu_q_lens_S1", "num_seqs_1", "logits_indices_S"]
    leaves, treedef = jax.tree_util.tree_flatten(inputs)
    assert len(leaves) == len(names)
    assert all(leaf is getattr(inputs, name) for leaf, name in zip(leaves, names))   # flatten: field order
    back = jax.tree_util.tree_unflatten(treedef, leaves)
    assert type(back) is StepInputs and all(getattr(back, n) is getattr(inputs, n) for n in names)

    moved = inputs.replace(kv_lens_S=inputs.kv_lens_S + 1)
    np.testing.assert_array_equal(moved.kv_lens_S, [4, 1])
    np.testing.assert_array_equal(inputs.kv_lens_S, [3, 0])                          # the original unchanged
    assert moved.token_ids_T is inputs.token_ids_T
    with pytest.raises(dataclasses.FrozenInstanceError):
        inputs.kv_lens_S = moved.kv_lens_S
    jitted = jax.jit(lambda x: x.replace(positions_T=x.positions_T * 2))(inputs)
    assert type(jitted) is StepInputs
    np.testing.assert_array_equal(jitted.positions_T, [0, 2, 4, 0])
