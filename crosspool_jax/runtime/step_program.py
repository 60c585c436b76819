"""The jitted step programs: all layers of one model, KV writes, attention, sampling, on device.

Two pure functions, each compiled once per (model, bucketed shape, flags):

- `ragged_step`: one ragged batch of prefill chunks and decode tokens; runs every layer
  (scan over stacked layer params inside `models.forward`), writes the new K/V into the
  global pool, and samples one token for every sequence. Its prompt-logprobs variant (given
  `prompt_targets_T`) also scores every token's next prompt token (`sampler.score_tokens`
  over the logits of ALL the step's tokens, `PROMPT_BLOCK` tokens at a time).
- `multi_decode`: num_steps decode tokens per dispatch, for one model or for several of one
  architecture on the same device at once (lanes: one program and one dispatch for all of a
  step's decodes of those models). A `lax.fori_loop` with a fixed trip
  count (a data-dependent loop would read its predicate back to the host every iteration on
  a GPU) feeds each sampled token back and computes its slots from the page tables; a row
  that hit a stop token or its token allowance stops writing K/V (its later tokens are
  dropped by the host). The host is off the per-token path; it post-processes the returned
  tokens (stop strings) afterwards.

The KV buffers are donated: the pool is updated in place. So is the device's token table
(int32 [R]: the last token sampled for each running request's slot): every program writes
the tokens it samples into the slots of their requests and reads the first token of a row
whose id the host does not know yet from its slot, so the engine can dispatch a request's
next step before the previous step's tokens reach the host (`LLMEngine`'s async scheduling).
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from crosspool_jax import models
from crosspool_jax.runtime import sampler as sampler_lib
from crosspool_jax.runtime.packed_arrays import PackedArrays, unpacked
from crosspool_jax.kv.pool import page_view, token_slots, write_kv
from pallas_kernels.ragged_paged_attention import ragged_paged_attention

PROMPT_BLOCK = 128        # tokens whose logits [B, V] the prompt-logprobs variant holds at once


def _paged_attention_fn(config, slots_LT, page_indices_LSP, kv_lens_S, cu_q_lens_S1, num_seqs_1, backend):
    """The layer's attention against the pool. The cache is the flat `[P, page_elems]` buffers,
    viewed as this model's pages `[P, G, K, H]` only around the K/V write and the attention:
    the layer scan carries the buffers in the layout they arrive in (carrying the views lets
    XLA give a view with a size-1 dim (K = 1: MLA, one KV head) another layout than the
    buffer's, and copy the whole pool in and out of every step)."""
    def attention_fn(q_TNH, k_TKH, v_TKH, layer_idx, cache, **layer_options):
        k_buf, v_buf = cache
        k_pages = page_view(k_buf, config.kv_cache_heads, config.kv_cache_head_dim)
        v_pages = page_view(v_buf, config.kv_cache_heads, config.kv_cache_head_dim)
        k_pages, v_pages = write_kv(k_pages, v_pages, k_TKH, v_TKH, slots_LT[layer_idx])
        out = ragged_paged_attention(q_TNH, k_pages, v_pages, kv_lens_S, page_indices_LSP[layer_idx],
                                     cu_q_lens_S1, num_seqs_1, backend=backend,
                                     **{**models.attention_options(config), **layer_options})
        return out, (k_pages.reshape(k_buf.shape), v_pages.reshape(v_buf.shape))
    return attention_fn


def _forward_logits(kv_params, ffn_params, config, k_buf, v_buf, token_ids_T, positions_T, slots_LT,
                    page_indices_LSP, kv_lens_S, cu_q_lens_S1, num_seqs_1, logits_indices_S,
                    attention_backend, moe_backend, token_mask_T=None):
    attention_fn = _paged_attention_fn(config, slots_LT, page_indices_LSP, kv_lens_S, cu_q_lens_S1,
                                       num_seqs_1, attention_backend)
    if token_mask_T is None:          # the tokens of the step's sequences; the rest is padding
        token_mask_T = jnp.arange(token_ids_T.shape[0], dtype=jnp.int32) < cu_q_lens_S1[num_seqs_1[0]]
    (k_buf, v_buf), hidden_TD = models.forward(kv_params, ffn_params, config, token_ids_T, positions_T,
                                               attention_fn, (k_buf, v_buf), moe_backend=moe_backend,
                                               token_mask_T=token_mask_T)
    logits_SV = models.compute_logits(kv_params, config, hidden_TD[logits_indices_S])
    return k_buf, v_buf, logits_SV, hidden_TD


def _fed_tokens(token_table, read_slots, host_ids):
    """Each token's id: from the token table where read_slots >= 0, else the host's."""
    return jnp.where(read_slots >= 0, token_table[jnp.maximum(read_slots, 0)], host_ids)


def _prompt_scores(kv_params, config, hidden_TD, targets_T, num_logprobs: int) -> sampler_lib.TokenScores:
    """`score_tokens` of every token's hidden state against targets_T, PROMPT_BLOCK rows of
    logits at a time (a `lax.map`: the [T, V] logits are never whole)."""
    T, D = hidden_TD.shape
    B = min(T, PROMPT_BLOCK)
    pad = -T % B
    hidden_TD = jnp.pad(hidden_TD, ((0, pad), (0, 0)))
    targets_T = jnp.pad(targets_T, (0, pad), constant_values=-1)

    def block(args):
        h_BD, t_B = args
        return sampler_lib.score_tokens(models.compute_logits(kv_params, config, h_BD), t_B,
                                        num_logprobs=num_logprobs)

    scores = jax.lax.map(block, (hidden_TD.reshape(-1, B, D), targets_T.reshape(-1, B)))
    # explicit sizes: with num_logprobs 0 the top-token arrays are empty, and -1 cannot be inferred
    return jax.tree.map(lambda a: a.reshape((T + pad,) + a.shape[2:])[:T], scores)


@functools.partial(jax.jit, static_argnames=("config", "num_logprobs", "all_greedy", "attention_backend",
                                             "moe_backend"),
                   donate_argnames=("k_buf", "v_buf", "token_table"))
def ragged_step(kv_params, ffn_params, k_buf, v_buf, token_table, inputs, sampling, output_counts_SV, prompt_mask_SV,
                prompt_targets_T=None, *, config, num_logprobs, attention_backend, moe_backend, all_greedy=False):
    """One ragged batch -> (k_buf, v_buf, token_table, PackedArrays of (SamplerOutput for every
    sequence row, TokenScores or None): one buffer to fetch). `inputs`: a (StepInputs,
    TokenSlots) pair and `sampling` a SamplingMetadata, or each packed (`PackedArrays`: their
    host arrays in one transfer). num_logprobs, all_greedy: the sampling variant
    (`sampler.sample`). prompt_targets_T (int32 [T], -1 where none; None: the plain program):
    the token each token of the step predicts, scored with the top num_logprobs tokens."""
    (inputs, token_slots), sampling = unpacked(inputs), unpacked(sampling)
    token_ids_T = _fed_tokens(token_table, token_slots.read_T, inputs.token_ids_T)
    k_buf, v_buf, logits_SV, hidden_TD = _forward_logits(
        kv_params, ffn_params, config, k_buf, v_buf, token_ids_T, inputs.positions_T, inputs.slots_LT,
        inputs.page_indices_LSP, inputs.kv_lens_S, inputs.cu_q_lens_S1, inputs.num_seqs_1,
        inputs.logits_indices_S, attention_backend, moe_backend)
    out = sampler_lib.sample(logits_SV, sampling, output_counts_SV, prompt_mask_SV, num_logprobs=num_logprobs,
                             all_greedy=all_greedy)
    scores = (None if prompt_targets_T is None else
              _prompt_scores(kv_params, config, hidden_TD, prompt_targets_T, num_logprobs))
    token_table = token_table.at[token_slots.write_S].set(out.token_ids_S, mode="drop")
    return k_buf, v_buf, token_table, PackedArrays.pack_device((out, scores))


class DecodeLane(NamedTuple):
    """One model's rows of a multi-step decode: its weights and its S rows (host or device
    arrays). token_ids_S: the last known token of each sequence (its KV not yet computed),
    read from the token table at read_slot_S instead where that is >= 0; kv_lens_S: context
    length including that token; allowance_S: how many tokens each sequence may still produce
    (>= 1; its pages cover that many); stop_ids_SZ: ids that end a sequence (-1 padded; EOS
    already removed by the host for ignore_eos rows); write_slot_S: the token-table slot that
    receives the row's last token (`step_inputs.NO_SLOT`: none)."""

    kv_params: dict
    ffn_params: dict
    token_ids_S: jax.Array
    kv_lens_S: jax.Array
    page_indices_LSP: jax.Array
    num_seqs_1: jax.Array
    sampling: "SamplingMetadata"
    output_counts_SV: Optional[jax.Array]
    prompt_mask_SV: Optional[jax.Array]
    stop_ids_SZ: jax.Array
    allowance_S: jax.Array
    read_slot_S: jax.Array
    write_slot_S: jax.Array


@functools.partial(jax.jit, static_argnames=("config", "num_steps", "num_logprobs", "all_greedy",
                                             "attention_backend", "moe_backend"),
                   donate_argnames=("k_buf", "v_buf", "token_table"))
def multi_decode(lanes, k_buf, v_buf, token_table, *, config, num_steps, num_logprobs, attention_backend, moe_backend,
                 all_greedy=False):
    """num_steps decode tokens per sequence of every lane in one dispatch (a fixed trip count).

    lanes: a tuple of `DecodeLane`s, models of one architecture (`config`) sharing the pool:
    one program serves K models' decodes (each lane's weights are data), the lanes' forwards
    run one after another inside each iteration. A row past its allowance or a stop writes no
    K/V. Returns the buffers, the token table (each row's last token, at min(allowance,
    num_steps), in its write slot) and a PackedArrays (one buffer to fetch) of the tuple, per
    lane, of the sampler outputs stacked [num_steps, S, ...]; row s's tokens past its allowance
    or stop are not meaningful. `lanes` may be packed
    (`PackedArrays`: every lane's host arrays in one transfer).
    """
    lanes = unpacked(lanes)
    P, X = k_buf.shape
    G = X // config.kv_cache_row

    def lane_start(lane, fixed_rows):
        out_buf = sampler_lib.empty_outputs(num_steps, lane.token_ids_S.shape[0], config.vocab_size, lane.sampling,
                                            lane.output_counts_SV, lane.prompt_mask_SV, num_logprobs=num_logprobs)
        tokens_S = _fed_tokens(token_table, lane.read_slot_S, lane.token_ids_S)
        return tokens_S, lane.kv_lens_S, ~fixed_rows[1], lane.output_counts_SV, out_buf

    def lane_rows(lane):
        """(row ids, rows holding a sequence, cu_q_lens of one token a row): fixed for the whole loop."""
        S = lane.token_ids_S.shape[0]
        rows = jnp.arange(S, dtype=jnp.int32)
        return rows, rows < lane.num_seqs_1[0], jnp.minimum(jnp.arange(S + 1, dtype=jnp.int32), lane.num_seqs_1[0])

    fixed = tuple(lane_rows(lane) for lane in lanes)

    def lane_token(j, lane, fixed_rows, state, k_buf, v_buf):
        tokens_S, kv_lens, done_S, counts, out_buf = state
        rows, seq_S, cu_q_lens_S1 = fixed_rows
        live_S = seq_S & ~done_S
        pos_S = kv_lens - 1
        slots_LS = token_slots(lane.page_indices_LSP, rows, pos_S, live_S, tokens_per_page=G, num_pages=P)
        k_buf, v_buf, logits_SV, _ = _forward_logits(
            lane.kv_params, lane.ffn_params, config, k_buf, v_buf, tokens_S, pos_S, slots_LS, lane.page_indices_LSP,
            kv_lens, cu_q_lens_S1, lane.num_seqs_1, rows, attention_backend, moe_backend, token_mask_T=live_S)
        meta = sampler_lib.advance_metadata(lane.sampling, j)
        out = sampler_lib.sample(logits_SV, meta, counts, lane.prompt_mask_SV, num_logprobs=num_logprobs,
                                 all_greedy=all_greedy)
        new_S = out.token_ids_S
        out_buf = jax.tree.map(lambda buf, x: buf.at[j].set(x), out_buf, out)
        if counts is not None:
            counts = sampler_lib.update_counts(counts, new_S)
        hit_stop = jnp.any(new_S[:, None] == lane.stop_ids_SZ, axis=-1)
        done_S = done_S | hit_stop | (j + 1 >= lane.allowance_S)
        return k_buf, v_buf, (new_S, kv_lens + 1, done_S, counts, out_buf)

    def body(j, state):
        k_buf, v_buf, states = state
        new_states = []
        for lane, fixed_rows, lane_state in zip(lanes, fixed, states):
            k_buf, v_buf, lane_state = lane_token(j, lane, fixed_rows, lane_state, k_buf, v_buf)
            new_states.append(lane_state)
        return k_buf, v_buf, tuple(new_states)

    init = (k_buf, v_buf, tuple(lane_start(lane, f) for lane, f in zip(lanes, fixed)))
    k_buf, v_buf, states = jax.lax.fori_loop(0, num_steps, body, init)
    for lane, (rows, _, _), state in zip(lanes, fixed, states):
        last_S = jnp.clip(lane.allowance_S, 1, num_steps) - 1
        token_table = token_table.at[lane.write_slot_S].set(state[-1].token_ids_S[last_S, rows], mode="drop")
    return k_buf, v_buf, token_table, PackedArrays.pack_device(tuple(state[-1] for state in states))
