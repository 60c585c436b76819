"""Host-side construction of the sampler's inputs.

Owns `SamplingRow` (one running sequence's sampling state, plain Python), `SamplingMetadata`
(the device pytree that `engine.sampler.sample` reads), and the token history the penalties
need (`build_token_history`). The metadata is built in numpy and handed to the jitted step
as it is (its dispatch moves it); rows past the live ones are padding and sample greedily.

Logits processors are data of a fixed width: each row's `logits_table` (logit_bias entries,
allowed ids, the last token of each bad word whose other tokens were just generated, -inf
for a banned id) becomes `BIASED_IDS` (token id, bias) columns and an allowed-only flag,
which `sampler.apply_logits_table` scatters onto the logits. Bad words of several tokens
depend on the tokens generated so far: the host rebuilds them each step, so the scheduler
decodes their requests one token per dispatch (`Request.needs_host_per_token`).

Reproducibility: a row's key for its k-th generated token is
`fold_in(key(base_seed), k)`, so a seeded request samples the same tokens whatever batch,
step or preemption it goes through. `key(seed)` is threefry key data [seed >> 32, seed & 0xFFFFFFFF]
(seed taken mod 2**64), equal to `jax.random.key(seed)` for 0 <= seed < 2**32.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from crosspool_jax.runtime.shapes import BIASED_IDS, STOP_IDS
from crosspool_jax.sampling_params import SamplingParams

_MIN_TEMPERATURE = 1e-5  # below this a row samples greedily (dividing by it would overflow)


@struct.dataclass
class SamplingMetadata:
    """Per-row sampling settings of one step; every field has S rows."""

    temperature: jax.Array         # f32 [S]; 0 = greedy for that row
    top_k: jax.Array               # i32 [S]; 0 = off
    top_p: jax.Array               # f32 [S]; 1 = off
    min_p: jax.Array               # f32 [S]; 0 = off
    presence_penalty: jax.Array    # f32 [S]; 0 = off
    frequency_penalty: jax.Array   # f32 [S]; 0 = off
    repetition_penalty: jax.Array  # f32 [S]; 1 = off
    rng_key_S2: jax.Array          # uint32 [S, 2]; the request's base threefry key data
    output_index: jax.Array        # i32 [S]; tokens generated so far (the key's fold_in)
    suppress_S: jax.Array          # bool [S]; min_tokens not reached: mask suppress_ids_SZ
    suppress_ids_SZ: jax.Array     # i32 [S, Z]; EOS and stop token ids, padded with -1 (Z = shapes.STOP_IDS)
    min_tokens: jax.Array          # i32 [S]; params.min_tokens (sampler.advance_metadata uses it)
    bias_ids_SW: jax.Array         # i32 [S, W]; token ids of the row's logits table, -1 padded (W = BIASED_IDS)
    bias_SW: jax.Array             # f32 [S, W]; each id's additive bias (-inf: banned)
    allowed_only_S: jax.Array      # bool [S]; every id outside the row's table is masked

    @property
    def num_rows(self) -> int:
        return self.temperature.shape[0]


@dataclasses.dataclass(frozen=True)
class SamplingRow:
    """One sequence's sampling state on the host.

    base_seed: the request's seed (params.seed, or one the engine drew for it; each of the
    n completions needs its own). output_index: tokens generated so far.
    bad_words_ids: the token ids of params.bad_words (the engine tokenizes them).
    """

    params: SamplingParams
    base_seed: int
    output_index: int
    eos_token_ids: Sequence[int] = ()
    prompt_token_ids: Sequence[int] = ()
    output_token_ids: Sequence[int] = ()
    bad_words_ids: Sequence[Sequence[int]] = ()

    def __post_init__(self):
        if not isinstance(self.params, SamplingParams):
            raise ValueError(f"SamplingRow.params: expected SamplingParams, got {type(self.params).__name__}")
        if not isinstance(self.base_seed, (int, np.integer)):
            raise ValueError(f"SamplingRow.base_seed: must be an integer (got {self.base_seed!r})")
        if not isinstance(self.output_index, (int, np.integer)) or self.output_index < 0:
            raise ValueError(f"SamplingRow.output_index: must be an integer >= 0 (got {self.output_index!r})")
        # prompt and output ids are not re-checked here (a row is built per sequence per step):
        # the engine validates prompts at add_request and the sampler makes the outputs
        if any(int(t) < 0 for t in self.eos_token_ids):
            raise ValueError("SamplingRow.eos_token_ids: token ids must be >= 0")

    @property
    def suppress_ids(self) -> list[int]:
        """Ids masked while min_tokens is not reached: EOS (unless ignore_eos) and stop ids."""
        ids = [] if self.params.ignore_eos else [int(t) for t in self.eos_token_ids]
        ids += [t for t in self.params.stop_token_ids if t not in ids]
        return ids

    def logits_table(self) -> tuple[dict[int, float], bool]:
        """This step's logits table: `logits_table` of the row's params and tokens."""
        return logits_table(self.params, self.bad_words_ids, self.output_token_ids)


def logits_table(params: SamplingParams, bad_words_ids: Sequence[Sequence[int]],
                 output_ids: Sequence[int]) -> tuple[dict[int, float], bool]:
    """({token id: additive bias}, allowed only) of one row at the step after `output_ids`.

    Allowed ids get bias 0 (plus their logit_bias), and with allowed_token_ids set the ids
    outside it are dropped from the table (the mask removes them anyway). A bad word bans
    (-inf) its last token when the tokens before it end `output_ids` (as vLLM: a word of
    one token always; the prompt does not count).
    """
    allowed_only = params.allowed_token_ids is not None
    table: dict[int, float] = {int(t): 0.0 for t in params.allowed_token_ids or ()}
    for t, b in (params.logit_bias or {}).items():
        if not allowed_only or int(t) in table:
            table[int(t)] = float(b)
    n_out = len(output_ids)
    for ids in bad_words_ids:
        prefix = len(ids) - 1
        if prefix > n_out or (prefix and list(output_ids[n_out - prefix:]) != list(ids[:-1])):
            continue
        if not allowed_only or ids[-1] in table:
            table[int(ids[-1])] = float("-inf")
    return table, allowed_only


def logits_table_capacity(params: SamplingParams, bad_words_ids: Sequence[Sequence[int]]) -> int:
    """The most entries `logits_table` can hold for these params at any step."""
    always, allowed_only = logits_table(params, [w for w in bad_words_ids if len(w) == 1], [])
    later = {w[-1] for w in bad_words_ids if len(w) > 1} - set(always)
    if allowed_only:
        later &= {int(t) for t in params.allowed_token_ids}
    return len(always) + len(later)


def seed_key_data(seed: int) -> np.ndarray:
    """uint32 [2] threefry key data of `seed` mod 2**64 (as `jax.random.key(seed)` for 0 <= seed < 2**32)."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    return np.array([seed >> 32, seed & 0xFFFFFFFF], dtype=np.uint32)


def _check_pad(rows: Sequence[SamplingRow], pad_rows_to: int) -> None:
    if not isinstance(pad_rows_to, (int, np.integer)) or pad_rows_to < len(rows):
        raise ValueError(f"pad_rows_to: must be an integer >= the number of rows "
                         f"({len(rows)}), got {pad_rows_to!r}")


def build_sampling_metadata(rows: Sequence[SamplingRow], pad_rows_to: int) -> SamplingMetadata:
    """Numpy arrays of `rows` padded to `pad_rows_to` greedy rows (the jitted step moves them to
    its device; a Python device_put here would cost ~5x the jit's own transfer).

    Temperatures below 1e-5 become 0 (greedy).
    """
    _check_pad(rows, pad_rows_to)
    S = int(pad_rows_to)
    suppress_lists = [r.suppress_ids for r in rows]
    Z = STOP_IDS
    for row, ids in zip(rows, suppress_lists):
        if len(ids) > Z:
            raise ValueError(f"a request has {len(ids)} stop and EOS token ids; at most {Z} are supported "
                             f"(stop_token_ids: {list(row.params.stop_token_ids)[:8]}...)")

    temperature = np.zeros(S, np.float32)
    top_k = np.zeros(S, np.int32)
    top_p = np.ones(S, np.float32)
    min_p = np.zeros(S, np.float32)
    presence = np.zeros(S, np.float32)
    frequency = np.zeros(S, np.float32)
    repetition = np.ones(S, np.float32)
    keys = np.zeros((S, 2), np.uint32)
    output_index = np.zeros(S, np.int32)
    suppress = np.zeros(S, bool)
    suppress_ids = np.full((S, Z), -1, np.int32)
    min_tokens = np.zeros(S, np.int32)
    W = BIASED_IDS
    bias_ids = np.full((S, W), -1, np.int32)
    bias = np.zeros((S, W), np.float32)
    allowed_only = np.zeros(S, bool)
    for s, (row, ids) in enumerate(zip(rows, suppress_lists)):
        p = row.params
        temperature[s] = p.temperature if p.temperature >= _MIN_TEMPERATURE else 0.0
        top_k[s] = max(p.top_k, 0)
        top_p[s] = p.top_p
        min_p[s] = p.min_p
        presence[s] = p.presence_penalty
        frequency[s] = p.frequency_penalty
        repetition[s] = p.repetition_penalty
        keys[s] = seed_key_data(row.base_seed)
        output_index[s] = row.output_index
        min_tokens[s] = p.min_tokens
        suppress[s] = row.output_index < p.min_tokens and bool(ids)
        suppress_ids[s, :len(ids)] = ids
        if p.has_logits_processors:
            table, allowed_only[s] = row.logits_table()
            if len(table) > W:
                raise ValueError(f"a request's logit_bias, allowed_token_ids and bad_words make {len(table)} "
                                 f"entries; at most {W} are supported")
            bias_ids[s, :len(table)] = list(table)
            bias[s, :len(table)] = list(table.values())
    meta = SamplingMetadata(
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        presence_penalty=presence, frequency_penalty=frequency,
        repetition_penalty=repetition, rng_key_S2=keys, output_index=output_index,
        suppress_S=suppress, suppress_ids_SZ=suppress_ids, min_tokens=min_tokens, bias_ids_SW=bias_ids,
        bias_SW=bias, allowed_only_S=allowed_only)
    return meta


def _pad_ids(id_lists: Sequence[Sequence[int]], S: int, length: int) -> np.ndarray:
    out_SL = np.full((S, length), -1, np.int32)
    for s, ids in enumerate(id_lists):
        if len(ids) > length:
            raise ValueError(f"token history of {len(ids)} ids exceeds its padded length {length}")
        out_SL[s, :len(ids)] = ids
    return out_SL


def history_length(rows: Sequence[SamplingRow]) -> int:
    """The longest prompt or output of `rows` (what `build_token_history`'s length must hold)."""
    return max([0] + [max(len(r.prompt_token_ids), len(r.output_token_ids)) for r in rows])


@functools.partial(jax.jit, static_argnames=("vocab_size",))
def _history(prompt_ids_SL, output_ids_SL, *, vocab_size: int):
    S = prompt_ids_SL.shape[0]

    def counts(ids_SL):
        valid_SL = (ids_SL >= 0) & (ids_SL < vocab_size)
        ids_SL = jnp.where(valid_SL, ids_SL, vocab_size)  # out of range: dropped
        rows_SL = jnp.broadcast_to(jnp.arange(S)[:, None], ids_SL.shape)
        return jnp.zeros((S, vocab_size), jnp.int32).at[rows_SL, ids_SL].add(1, mode="drop")

    return counts(output_ids_SL), counts(prompt_ids_SL) > 0


def build_token_history(rows: Sequence[SamplingRow], pad_rows_to: int, vocab_size: int, *, length: int,
                        row_order=None) -> tuple[jax.Array, jax.Array]:
    """(output_counts_SV int32, prompt_mask_SV bool) of `rows`, scatter-added on device.

    Ids are padded with -1 to `length` (a `ShapeMenu.history` bucket, at least
    `history_length(rows)`); ids outside [0, vocab_size) are ignored.
    row_order (int[pad_rows_to], optional): result row s is the padded row row_order[s] (a
    permutation applied on the host, for callers whose programs want rows in their own order).
    """
    _check_pad(rows, pad_rows_to)
    if not isinstance(vocab_size, (int, np.integer)) or vocab_size < 1:
        raise ValueError(f"vocab_size: must be a positive integer, got {vocab_size!r}")
    S = int(pad_rows_to)
    prompt_SL = _pad_ids([r.prompt_token_ids for r in rows], S, length)
    output_SL = _pad_ids([r.output_token_ids for r in rows], S, length)
    if row_order is not None:
        prompt_SL, output_SL = prompt_SL[row_order], output_SL[row_order]
    return _history(prompt_SL, output_SL, vocab_size=int(vocab_size))   # numpy: the jit moves it


def compile_token_history(pad_rows_to: int, vocab_size: int, length: int, device=None) -> None:
    """Compile `build_token_history`'s program for (rows, vocab, length) ahead of time (on
    `device`, as a runner's default-device context would run it)."""
    ids = np.full((pad_rows_to, length), -1, np.int32)
    with jax.default_device(device) if device is not None else contextlib.nullcontext():
        _history.lower(ids, ids, vocab_size=int(vocab_size)).compile()


def needs_penalties(rows: Sequence[SamplingRow]) -> bool:
    """Whether any row has a presence, frequency or repetition penalty (a static flag)."""
    return any(r.params.needs_penalties for r in rows)


def max_logprobs(rows: Sequence[SamplingRow]) -> int:
    """The largest `logprobs` asked for by any row (0 when none): `sample`'s num_logprobs."""
    return max([0] + [r.params.logprobs or 0 for r in rows])


def all_greedy(rows: Sequence[SamplingRow]) -> bool:
    """Every row samples greedily (temperature below 1e-5, as `build_sampling_metadata` makes it 0)."""
    return all(r.params.temperature < _MIN_TEMPERATURE for r in rows)


def sampling_variant(menu, rows: Sequence[SamplingRow]) -> tuple[int, bool]:
    """(num_logprobs, all_greedy): the sampling variant of `menu` (a `ShapeMenu`) that serves `rows`."""
    return menu.num_logprobs(max_logprobs(rows)), menu.all_greedy(all_greedy(rows))
