"""The device-side sampler: next tokens and their log-probabilities from one step's logits.

Owns `sample` and `update_counts`. Order of operations on the float32 logits of each row:
0. the logits table (logit_bias, allowed_token_ids, bad_words; as vLLM, before penalties):
   each listed id gets its bias (-inf bans it), and an allowed-only row masks every other id;
1. penalties (when token history is passed): repetition on tokens seen in the prompt or the
   output (positive logits divided, negative multiplied, as HF and vLLM do), then frequency
   (times the output count) and presence (once per token seen in the output);
2. suppression: while min_tokens is not reached, EOS and stop token ids get -inf;
3. greedy rows (temperature 0) take the argmax; the others divide by the temperature, keep
   the top-k logits, then the smallest set of most likely tokens whose probability reaches
   top_p (after top-k), then the tokens whose probability is at least min_p times the
   largest, and draw by Gumbel-max with the row's key `fold_in(base_key, output_index)`.
Log-probabilities reported are those of the raw model distribution (log_softmax of the
unprocessed logits), as vLLM reports by default; the sampled token's rank is the number of
tokens whose raw log-probability is at least its own (1 = the most likely), as vLLM counts.

No conditional: on a GPU a `lax.cond` reads its predicate back to the host, which makes the
host wait for the device in the middle of every step. What a step needs is chosen by the
host as a static flag instead: `all_greedy` programs take the argmax only; the others run the
draw and every filter for every row, a row whose filter is off passing through it unchanged.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from flax import struct

from crosspool_jax.runtime.sampling_metadata import SamplingMetadata

_NEG_INF = float("-inf")


@struct.dataclass
class SamplerOutput:
    """What one sampling step returns; X = num_logprobs (arrays of shape [S, 0] when 0)."""

    token_ids_S: jax.Array      # i32 [S]; the sampled tokens
    logprob_S: jax.Array        # f32 [S]; their log-probability under the raw logits
    rank_S: jax.Array           # i32 [S]; their rank under the raw logits (1 = most likely)
    top_ids_SX: jax.Array       # i32 [S, X]; the X most likely tokens, most likely first
    top_logprobs_SX: jax.Array  # f32 [S, X]; their raw log-probabilities


@struct.dataclass
class TokenScores:
    """Raw log-probabilities of given tokens (prompt logprobs); X = num_logprobs."""

    logprob_T: jax.Array        # f32 [T]; the target token's log-probability
    rank_T: jax.Array           # i32 [T]; its rank (as `token_ranks`)
    top_ids_TX: jax.Array       # i32 [T, X]; the X most likely tokens, most likely first
    top_logprobs_TX: jax.Array  # f32 [T, X]


def score_tokens(logits_TV: jax.Array, target_ids_T: jax.Array, *, num_logprobs: int) -> TokenScores:
    """The raw log-probability and rank of target_ids_T (negative ids score token 0: the
    caller drops them) and the num_logprobs most likely tokens of each row."""
    T, V = logits_TV.shape
    logprobs_TV = jax.nn.log_softmax(logits_TV.astype(jnp.float32), axis=-1)
    logprob_T, rank_T = token_ranks(logprobs_TV, jnp.clip(target_ids_T, 0, V - 1))
    X = min(num_logprobs, V)
    if X > 0:
        top_logprobs_TX, top_ids_TX = jax.lax.top_k(logprobs_TV, X)
    else:
        top_logprobs_TX, top_ids_TX = jnp.zeros((T, 0), jnp.float32), jnp.zeros((T, 0), jnp.int32)
    return TokenScores(logprob_T, rank_T, top_ids_TX.astype(jnp.int32), top_logprobs_TX)


def apply_logits_table(logits_SV: jax.Array, meta: SamplingMetadata) -> jax.Array:
    """Each row's table applied to its logits: bias_SW added at bias_ids_SW (-inf bans), and on
    allowed_only_S rows every id outside the table set to -inf. Rows without a table (ids all
    -1) are unchanged. One gather and one scatter of S*W entries (no dense [S, V] table)."""
    S, V = logits_SV.shape
    ids_SW = meta.bias_ids_SW
    listed_SW = (ids_SW >= 0) & (ids_SW < V)
    rows_SW = jnp.broadcast_to(jnp.arange(S)[:, None], ids_SW.shape)
    biased_SW = logits_SV[rows_SW, jnp.clip(ids_SW, 0, V - 1)] + meta.bias_SW
    base_SV = jnp.where(meta.allowed_only_S[:, None], _NEG_INF, logits_SV)
    return base_SV.at[rows_SW, jnp.where(listed_SW, ids_SW, V)].set(biased_SW, mode="drop")


def token_ranks(logprobs_SV: jax.Array, token_ids_S: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(log-probability, rank) of token_ids_S in each row: rank = how many tokens have a
    log-probability at least the token's (vLLM's count; 1 = the most likely)."""
    logprob_S = jnp.take_along_axis(logprobs_SV, token_ids_S[:, None], axis=-1)[:, 0]
    rank_S = jnp.sum(logprobs_SV >= logprob_S[:, None], axis=-1, dtype=jnp.int32)
    return logprob_S, rank_S


def apply_penalties(logits_SV: jax.Array, meta: SamplingMetadata,
                    output_counts_SV: Optional[jax.Array],
                    prompt_mask_SV: Optional[jax.Array]) -> jax.Array:
    """Repetition, then frequency and presence penalties; neutral rows are left unchanged."""
    if output_counts_SV is None and prompt_mask_SV is None:
        return logits_SV
    if output_counts_SV is None:
        output_counts_SV = jnp.zeros(logits_SV.shape, jnp.int32)
    in_output_SV = output_counts_SV > 0
    seen_SV = in_output_SV if prompt_mask_SV is None else in_output_SV | prompt_mask_SV
    rep_S1 = meta.repetition_penalty[:, None]
    repeated_SV = jnp.where(logits_SV > 0, logits_SV / rep_S1, logits_SV * rep_S1)
    logits_SV = jnp.where(seen_SV, repeated_SV, logits_SV)
    logits_SV = logits_SV - meta.frequency_penalty[:, None] * output_counts_SV.astype(jnp.float32)
    return logits_SV - meta.presence_penalty[:, None] * in_output_SV.astype(jnp.float32)


def apply_suppression(logits_SV: jax.Array, meta: SamplingMetadata) -> jax.Array:
    """-inf on each row's suppress_ids_SZ while its suppress_S is set."""
    S, V = logits_SV.shape
    ids_SZ = meta.suppress_ids_SZ
    active_SZ = meta.suppress_S[:, None] & (ids_SZ >= 0) & (ids_SZ < V)
    ids_SZ = jnp.where(active_SZ, ids_SZ, V)  # out of range: dropped
    rows_SZ = jnp.broadcast_to(jnp.arange(S)[:, None], ids_SZ.shape)
    mask_SV = jnp.zeros((S, V), bool).at[rows_SZ, ids_SZ].set(True, mode="drop")
    return jnp.where(mask_SV, _NEG_INF, logits_SV)


def apply_top_k_top_p(logits_SV: jax.Array, meta: SamplingMetadata) -> jax.Array:
    """Top-k, then top-p over the top-k distribution (one sort per row); dropped logits -> -inf.

    Ties with the last kept logit are kept.
    """
    V = logits_SV.shape[-1]
    sorted_SV = -jnp.sort(-logits_SV, axis=-1)  # descending
    rank_V = jnp.arange(V)

    k_S = jnp.where(meta.top_k > 0, jnp.minimum(meta.top_k, V), V)
    kth_S1 = jnp.take_along_axis(sorted_SV, (k_S - 1)[:, None], axis=-1)
    logits_SV = jnp.where(logits_SV < kth_S1, _NEG_INF, logits_SV)
    sorted_SV = jnp.where(rank_V[None, :] < k_S[:, None], sorted_SV, _NEG_INF)

    probs_SV = jax.nn.softmax(sorted_SV, axis=-1)
    mass_before_SV = jnp.cumsum(probs_SV, axis=-1) - probs_SV
    keep_SV = (mass_before_SV < meta.top_p[:, None]) & (sorted_SV > _NEG_INF)
    keep_SV = keep_SV.at[:, 0].set(True)
    n_kept_S = jnp.sum(keep_SV, axis=-1)
    pth_S1 = jnp.take_along_axis(sorted_SV, (n_kept_S - 1)[:, None], axis=-1)
    use_p_S1 = (meta.top_p < 1.0)[:, None]
    return jnp.where(use_p_S1 & (logits_SV < pth_S1), _NEG_INF, logits_SV)


def apply_min_p(logits_SV: jax.Array, meta: SamplingMetadata) -> jax.Array:
    """Drop tokens whose probability is below min_p times the largest (no sort needed).

    p_i >= min_p * p_max  <=>  logit_i >= logit_max + log(min_p); log(0) = -inf keeps all.
    """
    floor_S1 = jnp.max(logits_SV, axis=-1, keepdims=True) + jnp.log(meta.min_p)[:, None]
    return jnp.where(logits_SV < floor_S1, _NEG_INF, logits_SV)


def apply_filters(logits_SV: jax.Array, meta: SamplingMetadata) -> jax.Array:
    """Top-k, top-p, then min-p; a row with a filter off (top_k 0, top_p 1, min_p 0) keeps its logits."""
    return apply_min_p(apply_top_k_top_p(logits_SV, meta), meta)


def _row_keys(meta: SamplingMetadata) -> jax.Array:
    def one(key_data_2, index):
        key = jax.random.wrap_key_data(key_data_2, impl="threefry2x32")
        return jax.random.fold_in(key, index)

    return jax.vmap(one)(meta.rng_key_S2, meta.output_index)


def _draw(logits_SV: jax.Array, meta: SamplingMetadata) -> jax.Array:
    """Temperature, filters, and one Gumbel-max draw per row with the row's own key."""
    S, V = logits_SV.shape
    temperature_S = jnp.where(meta.temperature > 0, meta.temperature, 1.0)
    logits_SV = apply_filters(logits_SV / temperature_S[:, None], meta)
    gumbel_SV = jax.vmap(lambda key: jax.random.gumbel(key, (V,), jnp.float32))(_row_keys(meta))
    return jnp.argmax(logits_SV + gumbel_SV, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("num_logprobs", "all_greedy"))
def sample(logits_SV: jax.Array, meta: SamplingMetadata,
           output_counts_SV: Optional[jax.Array] = None,
           prompt_mask_SV: Optional[jax.Array] = None, *,
           num_logprobs: int = 0, all_greedy: bool = False) -> SamplerOutput:
    """Sample one token per row of `logits_SV` [S, V] (any float dtype; math in float32).

    output_counts_SV (int [S, V]) and prompt_mask_SV (bool [S, V]) are the token history
    from `build_token_history`; pass None for both when no row has penalties.
    all_greedy: every row has temperature 0 (`ShapeMenu.all_greedy` decides): argmax only, no
    draw; False serves any rows (greedy rows still take the argmax).
    """
    if num_logprobs < 0:
        raise ValueError(f"num_logprobs: must be >= 0, got {num_logprobs}")
    S, V = logits_SV.shape
    if meta.temperature.shape != (S,):
        raise ValueError(f"meta: has {meta.temperature.shape[0]} rows, logits_SV has {S}")
    raw_SV = logits_SV.astype(jnp.float32)
    raw_logprobs_SV = jax.nn.log_softmax(raw_SV, axis=-1)

    logits_SV = apply_logits_table(raw_SV, meta)
    logits_SV = apply_penalties(logits_SV, meta, output_counts_SV, prompt_mask_SV)
    logits_SV = apply_suppression(logits_SV, meta)
    greedy_S = jnp.argmax(logits_SV, axis=-1).astype(jnp.int32)
    is_greedy_S = meta.temperature <= 0
    if all_greedy:
        token_ids_S = greedy_S
    else:
        token_ids_S = jnp.where(is_greedy_S, greedy_S, _draw(logits_SV, meta))

    logprob_S, rank_S = token_ranks(raw_logprobs_SV, token_ids_S)
    if num_logprobs > 0:
        top_logprobs_SX, top_ids_SX = jax.lax.top_k(raw_logprobs_SV, min(num_logprobs, V))
        top_ids_SX = top_ids_SX.astype(jnp.int32)
    else:
        top_logprobs_SX = jnp.zeros((S, 0), jnp.float32)
        top_ids_SX = jnp.zeros((S, 0), jnp.int32)
    return SamplerOutput(token_ids_S=token_ids_S, logprob_S=logprob_S, rank_S=rank_S,
                         top_ids_SX=top_ids_SX, top_logprobs_SX=top_logprobs_SX)


def advance_metadata(meta: SamplingMetadata, steps=1,
                     min_tokens_S: Optional[jax.Array] = None) -> SamplingMetadata:
    """The metadata `steps` tokens later (multi-step decode; `steps` may be traced).

    output_index grows by `steps`; suppress_S stays on only while output_index is below
    min_tokens_S (default: meta.min_tokens). It never switches on here.
    """
    min_tokens_S = meta.min_tokens if min_tokens_S is None else min_tokens_S
    output_index_S = meta.output_index + jnp.asarray(steps, jnp.int32)
    suppress_S = meta.suppress_S & (output_index_S < min_tokens_S)
    return meta.replace(output_index=output_index_S, suppress_S=suppress_S)


def empty_outputs(num_steps: int, S: int, vocab_size: int, meta: SamplingMetadata,
                  output_counts_SV: Optional[jax.Array] = None, prompt_mask_SV: Optional[jax.Array] = None, *,
                  num_logprobs: int = 0) -> SamplerOutput:
    """Zeros shaped like `sample`'s outputs for S rows, stacked [num_steps, S, ...]: the buffer a
    multi-step decode fills (shapes by `jax.eval_shape`: no sampling is computed)."""
    shapes = jax.eval_shape(functools.partial(sample, num_logprobs=num_logprobs),
                            jax.ShapeDtypeStruct((S, vocab_size), jnp.float32), meta, output_counts_SV,
                            prompt_mask_SV)
    return jax.tree.map(lambda a: jnp.zeros((num_steps,) + a.shape, a.dtype), shapes)


def update_counts(output_counts_SV: jax.Array, token_ids_S: jax.Array) -> jax.Array:
    """Add one occurrence of each row's new token to its output counts (multi-step decode)."""
    S = output_counts_SV.shape[0]
    return output_counts_SV.at[jnp.arange(S), token_ids_S].add(1, mode="drop")
