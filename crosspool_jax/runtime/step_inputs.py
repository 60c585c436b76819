"""Host-side preparation of one model's step: scheduled chunks -> padded device arrays.

This is the one place where the scheduler's integers become device arrays. Shapes are
bucketed to powers of two (tokens, sequences, pages per sequence) so the number of
compiled step programs stays bounded.
"""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from flax import struct

from crosspool_jax.runtime.shapes import StepShape
from pallas_kernels.pow2 import next_pow2


# Smallest buckets: padding tiny batches up to these costs little and keeps the number of
# compiled programs low (each distinct shape is one compile).
MIN_TOKENS_BUCKET = 16
MIN_SEQS_BUCKET = 8
MIN_PAGES_BUCKET = 4


def bucket(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum)."""
    return next_pow2(max(int(n), minimum))


@struct.dataclass
class StepInputs:
    """Device inputs of one ragged step of one model (T, S, Pp are bucketed sizes)."""

    token_ids_T: jax.Array        # int32 [T]   packed new tokens of all sequences
    positions_T: jax.Array        # int32 [T]   absolute position of each token
    slots_LT: jax.Array           # int32 [L, T] page*G + offset per layer; P*G for padding
    page_indices_LSP: jax.Array   # int32 [L, S, Pp] per-layer page tables
    kv_lens_S: jax.Array          # int32 [S]   context length after this step's tokens
    cu_q_lens_S1: jax.Array       # int32 [S+1] prefix sums of new tokens per sequence
    num_seqs_1: jax.Array         # int32 [1]   real sequences
    logits_indices_S: jax.Array   # int32 [S]   row of each sequence's last new token


NO_SLOT = np.iinfo(np.int32).max   # a token-table slot that is none: reads take the host id, writes drop


@struct.dataclass
class TokenSlots:
    """Where a ragged step's tokens meet the device's token table (`step_program`: int32
    [R], the last token sampled for each running request's slot, which a step dispatched
    before its predecessor's results reach the host feeds from). T, S as in StepInputs."""

    read_T: jax.Array             # int32 [T]  slot holding the token's id (-1: token_ids_T has it)
    write_S: jax.Array            # int32 [S]  slot receiving the row's sampled token (NO_SLOT: none)


def build_token_slots(chunks: Sequence, num_tokens: int, num_seqs: int) -> TokenSlots:
    """chunks: objects with .num_tokens, .samples, .token_slot (the request's slot, -1: none)
    and .device_token (its first token is read from the table), padded to num_tokens tokens
    and num_seqs rows (a multi-step decode's rows: one token each, so read_T is per row).
    Padding reads -1, writes NO_SLOT."""
    read = np.full(num_tokens, -1, np.int32)
    write = np.full(num_seqs, NO_SLOT, np.int32)
    offset = 0
    for s, c in enumerate(chunks):
        if c.device_token:
            read[offset] = c.token_slot
        if c.samples and c.token_slot >= 0:
            write[s] = c.token_slot
        offset += c.num_tokens
    return TokenSlots(read, write)


def build_step_inputs(chunks: Sequence, *, num_layers: int, tokens_per_page: int, num_pages: int,
                      shape: StepShape | None = None, min_tokens_bucket: int = MIN_TOKENS_BUCKET,
                      min_seqs_bucket: int = MIN_SEQS_BUCKET) -> tuple[StepInputs, StepShape]:
    """chunks: objects with .start, .num_tokens, .token_ids and .page_table ([L][blocks]).

    shape: the padded sizes (a `ShapeMenu` entry; the chunks may then be empty: an all-padding
    step, as the warm-up runs); None: powers of two of the chunks' sizes, at least the minimums.
    """
    G = tokens_per_page
    num_real_tokens = sum(c.num_tokens for c in chunks)
    if shape is None:
        if not chunks:
            raise ValueError("build_step_inputs: no chunks to run and no shape")
        shape = StepShape(bucket(num_real_tokens, min_tokens_bucket), bucket(len(chunks), min_seqs_bucket),
                          bucket(max(len(c.page_table[0]) for c in chunks), MIN_PAGES_BUCKET))
    T, S, Pp = shape.num_tokens, shape.num_seqs, shape.pages_per_seq
    if num_real_tokens > T or len(chunks) > S or any(len(c.page_table[0]) > Pp for c in chunks):
        raise ValueError(f"build_step_inputs: {len(chunks)} chunks of {num_real_tokens} tokens do not fit {shape}")

    token_ids = np.zeros(T, np.int32)
    positions = np.zeros(T, np.int32)
    seq_of_token = np.zeros(T, np.int32)
    valid = np.zeros(T, bool)
    page_indices = np.zeros((num_layers, S, Pp), np.int32)
    kv_lens = np.zeros(S, np.int32)
    cu_q_lens = np.zeros(S + 1, np.int32)
    logits_indices = np.zeros(S, np.int32)
    offset = 0
    for s, c in enumerate(chunks):
        n = c.num_tokens
        token_ids[offset:offset + n] = c.token_ids
        positions[offset:offset + n] = np.arange(c.start, c.start + n)
        seq_of_token[offset:offset + n] = s
        valid[offset:offset + n] = True
        table = np.asarray(c.page_table, np.int32)          # [L, blocks]
        if table.shape[0] != num_layers:
            raise ValueError(f"page table of {c.request.request_id} has {table.shape[0]} layers, "
                             f"the model has {num_layers}")
        page_indices[:, s, :table.shape[1]] = table
        kv_lens[s] = c.start + n
        offset += n
        cu_q_lens[s + 1] = offset
        logits_indices[s] = offset - 1
    cu_q_lens[len(chunks) + 1:] = offset
    block = positions // G
    slots = page_indices[:, seq_of_token, block] * G + (positions % G)[None, :]
    slots = np.where(valid[None, :], slots, num_pages * G).astype(np.int32)
    inputs = StepInputs(token_ids, positions, slots, page_indices, kv_lens, cu_q_lens,
                        np.array([len(chunks)], np.int32), logits_indices)
    return inputs, shape


def build_prompt_targets(chunks: Sequence, num_tokens: int) -> tuple[np.ndarray | None, list]:
    """(targets int32 [num_tokens] or None, spans) for the prompt-logprobs program.

    A chunk of a request with prompt_logprobs scores, for each of its tokens at position p,
    the prompt token at p + 1 (-1 where p + 1 is past the prompt: the step samples that one).
    spans[i]: (first row in the step, prompt position of the first scored token, tokens
    scored) of chunk i, or None. targets is None when no chunk asks (the plain program).
    """
    targets = np.full(num_tokens, -1, np.int32)
    spans: list = []
    offset, asked = 0, False
    for c in chunks:
        request = c.request
        prompt = request.prompt_token_ids
        n_scored = min(c.start + c.num_tokens, len(prompt) - 1) - c.start
        if request.sampling_params.prompt_logprobs is not None and n_scored > 0:
            targets[offset:offset + n_scored] = prompt[c.start + 1:c.start + 1 + n_scored]
            spans.append((offset, c.start + 1, n_scored))
            asked = True
        else:
            spans.append(None)
        offset += c.num_tokens
    return (targets if asked else None), spans
