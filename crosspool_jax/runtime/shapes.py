"""The shape menu: the finite set of program shapes a model's steps use.

Every jitted step program is compiled once per static shape. So that nothing compiles while
serving, the shapes a step may take are a small menu fixed when the engine starts, every
step is padded to the smallest entry that fits, and the warm-up compiles every entry
(`LLMEngine.warm_up`). The menu of a model follows from the engine's limits:

- ragged steps (prefill chunks and decode tokens mixed): T tokens, powers of four from
  `min_token_bucket`, the last one max_num_batched_tokens rounded up to a power of two;
  S = min(T, max_seqs) sequence rows (a step has at most as many sequences as tokens, so S
  never limits a step T admits);
- multi-step decode: S sequence rows, powers of four from `MIN_SEQS` to max_seqs;
- page tables: Pp blocks per sequence, three sizes an eighth apart, the largest holding the
  model's longest context (the attention kernels walk only each sequence's real pages, so a
  larger table costs its transfer, not attention work);
- token history (repetition, frequency and presence penalties, data of every program): one
  length, max_model_len rounded up to a power of two, built by a small program of its own
  (a step with penalties sends its rows' ids padded to it).

Sampling variants (static flags of a program): `num_logprobs`, 0 or the engine's
`max_logprobs` (every row that asks gets its top-k out of that one computation);
`all_greedy` (argmax only; the other programs draw and filter for every row, branch-free),
whose True variant a menu has on accelerators only (`greedy_variants`: on a CPU every
program costs memory mappings and the draw is cheap, so greedy steps run the general one);
and the ragged programs' prompt-logprobs variant (`prompt_logprobs`: the step also scores
every token's next prompt token, with max_logprobs top tokens; general sampling). Lanes:
`lane_counts` (1 .. K) are the numbers of models of one architecture on one device whose
decodes one `multi_decode` serves at once (their weights are data), compiled for every decode
shape with the variants without logprobs (`lane_variants`), for decodes of one token and of
the engine's max_decode_steps; the registry sets K from how many
models share an architecture and a device (`EngineConfig.max_lanes`). Stop and
suppressed token ids per row are a fixed `STOP_IDS` columns, and the logits processors
(logit_bias, allowed_token_ids, bad_words) a fixed `BIASED_IDS` columns of (token id, bias)
per row: data, never a program variant. Coarse buckets keep the menu small (a 512-token
budget, 64 sequences and 4k contexts on an accelerator: 21 shapes, 96 programs a model).
"""
from __future__ import annotations

import dataclasses
import itertools

from crosspool_jax.sampling_params import BIASED_IDS  # noqa: F401  (the logits table's width, a request limit)
from pallas_kernels.pow2 import next_pow2

MIN_SEQS = 8             # sequence rows of the smallest program
MIN_PAGES = 4            # page-table blocks of the smallest program
MIN_HISTORY = 16         # token-history length of the smallest penalties program
STOP_IDS = 32            # stop / suppressed token ids per row (EOS included), a fixed width


def _from_top(start: int, stop: int, ratio: int, levels: int) -> tuple[int, ...]:
    """`levels` sizes `ratio` apart, the largest next_pow2(stop), none below `start`."""
    top = next_pow2(max(stop, start))
    return tuple(sorted({max(top // ratio ** i, start) for i in range(levels)}))


def _powers(start: int, stop: int, ratio: int) -> tuple[int, ...]:
    """start, start*ratio, ... up to the first value >= stop (which is capped at next_pow2(stop))."""
    cap = next_pow2(max(stop, start))
    out, v = [], start
    while True:
        out.append(min(v, cap))
        if v >= cap:
            return tuple(sorted(set(out)))
        v *= ratio


def _fit(buckets: tuple[int, ...], n: int, what: str) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"{what} = {n} exceeds the largest compiled shape ({buckets[-1]}); the engine's limits "
                     f"(max_num_batched_tokens, max_num_seqs, max_model_len) bound every step")


@dataclasses.dataclass(frozen=True)
class StepShape:
    """The static part of a ragged step: bucketed sizes (one program per StepShape and flags)."""

    num_tokens: int
    num_seqs: int
    pages_per_seq: int


@dataclasses.dataclass(frozen=True)
class DecodeShape:
    """The static part of a multi-step decode: sequence rows and page-table blocks."""

    num_seqs: int
    pages_per_seq: int


@dataclasses.dataclass(frozen=True)
class ShapeMenu:
    """The program shapes of one model (see the module docstring)."""

    token_buckets: tuple[int, ...]         # T of ragged steps
    max_seqs: int                          # sequence rows of the largest program
    decode_seq_buckets: tuple[int, ...]    # S of multi-step decodes
    page_buckets: tuple[int, ...]          # Pp
    history_buckets: tuple[int, ...]       # token-history lengths
    logprob_variants: tuple[int, ...] = (0, 20)   # num_logprobs of the programs: 0 and max_logprobs
    greedy_variants: tuple[bool, ...] = (False, True)   # all_greedy of the programs
    prompt_logprobs: bool = True                  # ragged programs have the prompt-logprobs variant
    lane_counts: tuple[int, ...] = (1,)           # models of this architecture one decode program serves

    @classmethod
    def build(cls, *, max_num_batched_tokens: int, max_num_seqs: int, max_blocks_per_seq: int,
              max_model_len: int, min_token_bucket: int = 16, max_logprobs: int = 20,
              vocab_size: int | None = None, greedy_programs: bool = True) -> "ShapeMenu":
        for name, v in (("max_num_batched_tokens", max_num_batched_tokens), ("max_num_seqs", max_num_seqs),
                        ("max_blocks_per_seq", max_blocks_per_seq), ("max_model_len", max_model_len),
                        ("min_token_bucket", min_token_bucket)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"ShapeMenu.{name} must be an integer >= 1, got {v!r}")
        max_seqs = next_pow2(max(max_num_seqs, MIN_SEQS))
        tokens = _powers(next_pow2(min_token_bucket), max_num_batched_tokens, 4)
        if not isinstance(max_logprobs, int) or max_logprobs < 0:
            raise ValueError(f"ShapeMenu.max_logprobs must be an integer >= 0, got {max_logprobs!r}")
        top = min(max_logprobs, vocab_size) if vocab_size else max_logprobs
        return cls(token_buckets=tokens, max_seqs=max_seqs,
                   decode_seq_buckets=_powers(MIN_SEQS, max_seqs, 4),
                   page_buckets=_from_top(MIN_PAGES, max_blocks_per_seq, 8, 3),
                   history_buckets=(next_pow2(max(max_model_len, MIN_HISTORY)),),
                   logprob_variants=tuple(sorted({0, top})),
                   greedy_variants=(False, True) if greedy_programs else (False,))

    def num_logprobs(self, asked: int) -> int:
        """The num_logprobs of the program serving rows that ask for at most `asked` (0: none)."""
        if asked <= 0:
            return 0
        top = self.logprob_variants[-1]
        if asked > top:
            raise ValueError(f"logprobs = {asked} exceeds max_logprobs = {top}")
        return top

    def all_greedy(self, greedy_rows: bool) -> bool:
        """The all_greedy flag of the program serving rows that are all greedy (or not)."""
        return bool(greedy_rows) and True in self.greedy_variants

    def sampling_variants(self) -> list[tuple[int, bool]]:
        """Every (num_logprobs, all_greedy) pair the menu's programs are compiled for."""
        return list(itertools.product(self.logprob_variants, self.greedy_variants))

    def lane_variants(self) -> list[tuple[int, bool]]:
        """The sampling variants of the lane programs (K > 1): those without logprobs."""
        return [v for v in self.sampling_variants() if not v[0]]

    def ragged(self, num_tokens: int, num_seqs: int, num_blocks: int) -> StepShape:
        """The smallest ragged shape holding num_tokens tokens of num_seqs sequences whose
        longest page table has num_blocks blocks."""
        T = _fit(self.token_buckets, num_tokens, "tokens of a step")
        S = min(T, self.max_seqs)
        if num_seqs > S:
            raise ValueError(f"sequences of a step = {num_seqs} exceed the {S} rows of its shape (T={T})")
        return StepShape(T, S, _fit(self.page_buckets, num_blocks, "page-table blocks of a sequence"))

    def decode(self, num_seqs: int, num_blocks: int) -> DecodeShape:
        """The smallest multi-step decode shape for num_seqs sequences of at most num_blocks blocks."""
        return DecodeShape(_fit(self.decode_seq_buckets, num_seqs, "sequences of a decode step"),
                           _fit(self.page_buckets, num_blocks, "page-table blocks of a sequence"))

    def rows(self, num_seqs: int) -> int:
        """Sampled rows for num_seqs sequences (a multi-step decode's S)."""
        return _fit(self.decode_seq_buckets, num_seqs, "sequences of a step")

    def history(self, length: int) -> int:
        """The token-history length (penalties) holding `length` ids."""
        return _fit(self.history_buckets, max(length, 1), "token history length")

    def ragged_shapes(self) -> list[StepShape]:
        return [StepShape(T, min(T, self.max_seqs), P) for T, P in itertools.product(self.token_buckets,
                                                                                     self.page_buckets)]

    def decode_shapes(self) -> list[DecodeShape]:
        return [DecodeShape(S, P) for S, P in itertools.product(self.decode_seq_buckets, self.page_buckets)]

    def sampling_rows(self) -> tuple[int, ...]:
        """Every number of sampled rows a program of the menu has."""
        return tuple(sorted({s.num_seqs for s in self.ragged_shapes()} | set(self.decode_seq_buckets)))
