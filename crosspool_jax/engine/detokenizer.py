"""Incremental detokenization: the text delta each new output token adds.

Owns `IncrementalDetokenizer`. Byte-level BPE tokens can end inside a UTF-8 character; the
decoder then shows U+FFFD for the incomplete bytes. Text is therefore only emitted up to a
point where the decode does not end in U+FFFD, so a partial character is held back until the
tokens that complete it arrive, and emitted text is never taken back.

To stay O(1) per token, each step decodes only a short window: the tokens since the last
emission point (`_read`) plus the few tokens before it (`_prefix`) as context, and the
delta is what the window's text adds beyond the context's text. The context also makes the
first output token decode as it would inside the sequence (leading spaces of SentencePiece
style tokenizers): it starts from the last prompt tokens.
"""
from __future__ import annotations

from typing import Protocol, Sequence

_REPLACEMENT = "\ufffd"
_PROMPT_CONTEXT = 5  # prompt tokens decoded as context before the first output token


class Tokenizer(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """The output text of one sequence, grown token by token."""

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int],
                 skip_special_tokens: bool = True):
        if not callable(getattr(tokenizer, "decode", None)):
            raise ValueError(f"tokenizer: needs a decode(ids, skip_special_tokens) method, "
                             f"got {type(tokenizer).__name__}")
        self._tokenizer = tokenizer
        self._skip = bool(skip_special_tokens)
        context = [int(t) for t in prompt_token_ids[-_PROMPT_CONTEXT:]]
        if _REPLACEMENT in self._decode(context):
            context = []  # the prompt's tail is not whole characters: decode outputs alone
        self._ids: list[int] = context      # context followed by every output id
        self._prefix = 0                    # window start (context for the next delta)
        self._read = len(context)           # ids before this are in the emitted text
        self._num_context = len(context)
        self._text = ""

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=self._skip) if ids else ""

    @property
    def text(self) -> str:
        """All output text emitted so far."""
        return self._text

    @property
    def output_token_ids(self) -> list[int]:
        return self._ids[self._num_context:]

    def add(self, new_token_ids: Sequence[int]) -> str:
        """Append output tokens; return the text they complete (may be empty)."""
        self._ids.extend(int(t) for t in new_token_ids)
        return self._emit(hold_partial=True)

    def flush(self) -> str:
        """Emit whatever is held back (a trailing U+FFFD included): call when the sequence ends."""
        return self._emit(hold_partial=False)

    def _emit(self, hold_partial: bool) -> str:
        if len(self._ids) == self._read:
            return ""
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        if len(after) <= len(before):
            return ""  # nothing new yet (e.g. a skipped special token)
        if hold_partial and after.endswith(_REPLACEMENT):
            return ""
        delta = after[len(before):]
        self._prefix, self._read = self._read, len(self._ids)
        self._text += delta
        return delta
