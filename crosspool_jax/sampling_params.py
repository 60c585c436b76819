"""`SamplingParams`: how one request is decoded. Shaped like vLLM's, validated on construction.

Every integer the engine hands to its step programs (`n`, `top_k`, `max_tokens`,
`min_tokens`, `stop_token_ids`) must fit int32, so a value no model can use fails here with
a ValueError naming the field instead of overflowing inside a step. Model-dependent bounds
(token ids within the vocabulary, lengths within the context) are checked by
`LLMEngine.add_request`, which knows the model.

The logits processors vLLM users pass are data of a fixed width per sampling row
(`BIASED_IDS`, the width of the sampler's logits table): `logit_bias` (token id -> additive bias),
`allowed_token_ids` (every other id masked) and `bad_words` (banned words, tokenized by the
engine) each hold at most `BIASED_IDS` entries (the engine checks them together against the
model). `prompt_logprobs=k` returns each prompt token's log-probability and the k most likely
tokens at each prompt position.
"""
from __future__ import annotations

import dataclasses
import enum
import math
import numbers
from typing import Optional, Sequence, Union

class RequestOutputKind(enum.IntEnum):
    """What `LLMEngine.step()` reports of a request each step it moves (vLLM's enum):
    CUMULATIVE its whole output so far; DELTA only what is new since the last report (text
    held back by the longest stop string's length - 1 while running, so that no text sent is
    taken back; prompt_logprobs in the first report only); FINAL_ONLY one report, once
    finished. DELTA and FINAL_ONLY copy nothing that grows with the output's length per step."""

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


BIASED_IDS = 128    # logit_bias, allowed and banned token ids per request: the logits table's width
MAX_LOGPROBS = 20
INT32_MAX = 2 ** 31 - 1
MAX_BAD_WORD_CHARS = 256     # characters of one bad word (its token ids are found by the engine)


@dataclasses.dataclass
class SamplingParams:
    """Decoding options of one request.

    temperature 0 means greedy. top_k 0 or -1 disables top-k; top_p 1 disables top-p;
    min_p 0 disables min-p. seed makes sampling reproducible per request. logprobs=k
    returns the sampled token's log-probability and the k most likely tokens' at each step.
    truncate_prompt_tokens=k keeps only the last k prompt tokens (as vLLM).
    prompt_logprobs=k returns, for every prompt token after the first, its log-probability
    and the k most likely tokens there (`RequestOutput.prompt_logprobs`).
    logit_bias {token id: bias} adds each bias to that token's logit; allowed_token_ids
    masks every other token; bad_words bans each word (its last token is masked wherever the
    tokens before it were just generated), all before the penalties and the other filters.
    output_kind (`RequestOutputKind`) says what each engine step reports of the request.
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
    truncate_prompt_tokens: Optional[int] = None
    prompt_logprobs: Optional[int] = None
    logit_bias: Optional[dict] = None
    allowed_token_ids: Optional[Sequence[int]] = None
    bad_words: Optional[Sequence[str]] = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE

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
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field (runs on construction)."""
        def bad(field, why):
            raise ValueError(f"SamplingParams.{field}: {why} (got {_short(getattr(self, field))})")

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
        if not 1 <= self.n <= INT32_MAX:
            bad("n", f"must be an integer in [1, {INT32_MAX}]")
        if self.temperature < 0:
            bad("temperature", "must be >= 0 (0 means greedy)")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", "must be in (0, 1]")
        if not -1 <= self.top_k <= INT32_MAX:
            bad("top_k", f"must be -1 or 0 (disabled) or a positive integer <= {INT32_MAX}")
        if not 0.0 <= self.min_p <= 1.0:
            bad("min_p", "must be in [0, 1]")
        if not -2.0 <= self.presence_penalty <= 2.0:
            bad("presence_penalty", "must be in [-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            bad("frequency_penalty", "must be in [-2, 2]")
        if not self.repetition_penalty > 0.0:
            bad("repetition_penalty", "must be > 0 (1 disables it)")
        if self.max_tokens is not None and (not _is_int(self.max_tokens)
                                            or not 1 <= self.max_tokens <= INT32_MAX):
            bad("max_tokens", f"must be an integer in [1, {INT32_MAX}] or None")
        if not 0 <= self.min_tokens <= INT32_MAX:
            bad("min_tokens", f"must be an integer in [0, {INT32_MAX}]")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", f"must be <= max_tokens ({self.max_tokens})")
        if self.seed is not None and (not _is_int(self.seed) or not -2 ** 63 <= self.seed < 2 ** 64):
            bad("seed", "must be a 64-bit integer or None")
        if self.logprobs is not None and (not _is_int(self.logprobs)
                                          or not 0 <= self.logprobs <= MAX_LOGPROBS):
            bad("logprobs", f"must be an integer in [0, {MAX_LOGPROBS}] or None")
        if self.truncate_prompt_tokens is not None and (
                not _is_int(self.truncate_prompt_tokens)
                or not 1 <= self.truncate_prompt_tokens <= INT32_MAX):
            bad("truncate_prompt_tokens", f"must be an integer in [1, {INT32_MAX}] or None")
        if self.prompt_logprobs is not None and (not _is_int(self.prompt_logprobs)
                                                 or not 0 <= self.prompt_logprobs <= MAX_LOGPROBS):
            bad("prompt_logprobs", f"must be an integer in [0, {MAX_LOGPROBS}] or None")
        self._validate_logits_processors(bad)
        if not isinstance(self.output_kind, RequestOutputKind):
            bad("output_kind", f"must be a RequestOutputKind ({', '.join(k.name for k in RequestOutputKind)})")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", "must be a non-empty string or a list of non-empty strings")
        if any(not _is_utf8(s) for s in self.stop):
            bad("stop", "must be valid Unicode text (no lone surrogates)")
        if any(not 0 <= t <= INT32_MAX for t in self.stop_token_ids):
            bad("stop_token_ids", f"must be token ids in [0, {INT32_MAX}]")

    def _validate_logits_processors(self, bad) -> None:
        bias = self.logit_bias
        if bias is not None:
            if not isinstance(bias, dict) or not all(
                    _is_int(t) and isinstance(b, numbers.Real) and not isinstance(b, bool)
                    for t, b in bias.items()):
                bad("logit_bias", "must be a dict of integer token ids to numbers")
            if any(not 0 <= t <= INT32_MAX for t in bias):
                bad("logit_bias", f"token ids must be in [0, {INT32_MAX}]")
            if any(not math.isfinite(b) for b in bias.values()):
                bad("logit_bias", "biases must be finite numbers")
            if len(bias) > BIASED_IDS:
                bad("logit_bias", f"at most {BIASED_IDS} token ids per request")
        allowed = self.allowed_token_ids
        if allowed is not None:
            if not isinstance(allowed, (list, tuple)) or not all(_is_int(t) for t in allowed):
                bad("allowed_token_ids", "must be a list of integer token ids")
            if not allowed:
                bad("allowed_token_ids", "must not be empty (None allows every token)")
            if any(not 0 <= t <= INT32_MAX for t in allowed):
                bad("allowed_token_ids", f"token ids must be in [0, {INT32_MAX}]")
            if len(set(allowed)) > BIASED_IDS:
                bad("allowed_token_ids", f"at most {BIASED_IDS} token ids per request")
        words = self.bad_words
        if words is not None:
            if not isinstance(words, (list, tuple)) or not all(isinstance(w, str) and w.strip() for w in words):
                bad("bad_words", "must be a list of non-blank strings")
            if any(len(w) > MAX_BAD_WORD_CHARS or not _is_utf8(w) for w in words):
                bad("bad_words", f"each word must be valid Unicode text of at most {MAX_BAD_WORD_CHARS} characters")
            if 2 * len(words) > BIASED_IDS:
                bad("bad_words", f"at most {BIASED_IDS // 2} words per request")

    @property
    def has_logits_processors(self) -> bool:
        """Whether logit_bias, allowed_token_ids or bad_words is set."""
        return bool(self.logit_bias) or self.allowed_token_ids is not None or bool(self.bad_words)

    @property
    def greedy(self) -> bool:
        """Temperature 0 (the sampler also treats temperatures below 1e-5 as greedy)."""
        return self.temperature == 0.0

    @property
    def stop_holdback(self) -> int:
        """Characters of running text a DELTA report holds back: a stop string may still end
        in the next tokens' text, and the text is then cut before it."""
        return max((len(s) for s in self.stop), default=1) - 1

    @property
    def needs_penalties(self) -> bool:
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _short(value) -> str:
    """repr of a value, cut to 80 characters (a rejected value may be huge)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
