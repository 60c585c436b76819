"""`SamplingParams`: how one request is decoded. Shaped like vLLM's, validated on construction."""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Optional, Sequence, Union

_MAX_LOGPROBS = 20


@dataclasses.dataclass
class SamplingParams:
    """Decoding options of one request.

    temperature 0 means greedy. top_k 0 or -1 disables top-k; top_p 1 disables top-p;
    min_p 0 disables min-p. seed makes sampling reproducible per request. logprobs=k
    returns the sampled token's log-probability and the k most likely tokens' at each step.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: Optional[int] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: Optional[int] = 16
    min_tokens: int = 0
    stop: Optional[Union[str, Sequence[str]]] = None
    stop_token_ids: Optional[Sequence[int]] = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: Optional[int] = None
    skip_special_tokens: bool = True

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is not None and not isinstance(self.stop, (list, tuple)):
            raise ValueError(f"SamplingParams.stop: must be a string or a list of strings (got {self.stop!r})")
        self.stop = list(self.stop or [])
        ids = self.stop_token_ids
        if ids is not None and (not isinstance(ids, (list, tuple))
                                or not all(_is_int(t) for t in ids)):
            raise ValueError(f"SamplingParams.stop_token_ids: must be a list of integers (got {ids!r})")
        self.stop_token_ids = [int(t) for t in (ids or [])]
        self._check()

    def _check(self):
        def bad(field, why):
            raise ValueError(f"SamplingParams.{field}: {why} (got {getattr(self, field)!r})")

        for field in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                      "repetition_penalty"):
            value = getattr(self, field)
            if (not isinstance(value, numbers.Real) or isinstance(value, bool)
                    or not math.isfinite(value)):
                bad(field, "must be a finite number")
        for field in ("n", "top_k", "min_tokens"):
            if not _is_int(getattr(self, field)):
                bad(field, "must be an integer")
        for field in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, field), bool):
                bad(field, "must be a boolean")
        if self.n < 1:
            bad("n", "must be an integer >= 1")
        if self.temperature < 0:
            bad("temperature", "must be >= 0 (0 means greedy)")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", "must be in (0, 1]")
        if self.top_k < -1:
            bad("top_k", "must be -1 or 0 (disabled) or a positive integer")
        if not 0.0 <= self.min_p <= 1.0:
            bad("min_p", "must be in [0, 1]")
        if not -2.0 <= self.presence_penalty <= 2.0:
            bad("presence_penalty", "must be in [-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            bad("frequency_penalty", "must be in [-2, 2]")
        if not 0.0 < self.repetition_penalty <= 2.0:
            bad("repetition_penalty", "must be in (0, 2]")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            bad("max_tokens", "must be an integer >= 1 or None")
        if self.min_tokens < 0:
            bad("min_tokens", "must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", f"must be <= max_tokens ({self.max_tokens})")
        if self.seed is not None and not _is_int(self.seed):
            bad("seed", "must be an integer or None")
        if self.logprobs is not None and (not _is_int(self.logprobs)
                                          or not 0 <= self.logprobs <= _MAX_LOGPROBS):
            bad("logprobs", f"must be an integer in [0, {_MAX_LOGPROBS}] or None")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", "must be a non-empty string or a list of non-empty strings")
        if any(t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "must be non-negative token ids")

    @property
    def greedy(self) -> bool:
        """Temperature 0 (the sampler also treats temperatures below 1e-5 as greedy)."""
        return self.temperature == 0.0

    @property
    def needs_penalties(self) -> bool:
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
