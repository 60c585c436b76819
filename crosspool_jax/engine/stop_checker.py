"""Stop rules of one sequence, checked on the host after each new output token.

Owns `check_stop` and `StopDecision`. Rules, in order (the first that holds wins):
1. before min_tokens output tokens, only a full context (prompt + output reached
   max_model_len) stops, with "length";
2. the new token is an EOS id (unless ignore_eos) -> "stop", stop_reason None;
3. the new token is in stop_token_ids -> "stop", stop_reason that id;
4. a stop string appears in the text -> "stop", stop_reason that string, the text cut before
   it (or after it with include_stop_str_in_output); only the new text and the last
   (longest stop string - 1) characters before it are searched, so each check is O(new text);
5. max_tokens output tokens, or a full context -> "length".
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

from crosspool_jax.sampling_params import SamplingParams

_FINISH_REASONS = ("stop", "length")


@dataclasses.dataclass(frozen=True)
class StopDecision:
    """Why a sequence finished and how much of its text to keep (text[:truncate_text_to])."""

    finish_reason: str
    stop_reason: Union[None, int, str]
    truncate_text_to: int

    def __post_init__(self):
        if self.finish_reason not in _FINISH_REASONS:
            raise ValueError(f"StopDecision.finish_reason: must be one of {_FINISH_REASONS}, "
                             f"got {self.finish_reason!r}")
        if self.truncate_text_to < 0:
            raise ValueError(f"StopDecision.truncate_text_to: must be >= 0, got {self.truncate_text_to}")


def find_stop_string(stop: Sequence[str], text: str, new_text_offset: int) -> Optional[tuple[int, str]]:
    """(start index, stop string) of the earliest stop string that ends in the new text.

    The new text is text[new_text_offset:]; a match may start up to len(longest) - 1
    characters before it. Ties on the start go to the stop string listed first.
    """
    if not stop or new_text_offset >= len(text):
        return None
    best: Optional[tuple[int, str]] = None
    for s in stop:
        # A match must end in the new text, so it starts no earlier than offset - len(s) + 1.
        i = text.find(s, max(0, new_text_offset - len(s) + 1))
        if i >= 0 and (best is None or i < best[0]):
            best = (i, s)
    return best


def check_stop(params: SamplingParams, num_output: int, last_token_id: Optional[int], new_text_offset: int,
               text: str, eos_token_ids: Sequence[int], num_prompt_tokens: int,
               max_model_len: int) -> Optional[StopDecision]:
    """The stop decision after the output's `num_output`-th token, `last_token_id`, was
    appended, or None (num_output 0: no token yet, last_token_id unused).

    text is all output text so far; text[new_text_offset:] is what the last token added.
    Call once per new token (the token rules look at the last token only).
    """
    if not 0 <= new_text_offset <= len(text):
        raise ValueError(f"new_text_offset: must be in [0, len(text)={len(text)}], got {new_text_offset}")
    keep_all = len(text)
    context_full = num_prompt_tokens + num_output >= max_model_len
    if num_output < params.min_tokens or num_output == 0:
        return StopDecision("length", None, keep_all) if context_full else None
    last = int(last_token_id)
    if not params.ignore_eos and last in eos_token_ids:
        return StopDecision("stop", None, keep_all)
    if last in params.stop_token_ids:
        return StopDecision("stop", last, keep_all)
    found = find_stop_string(params.stop, text, new_text_offset)
    if found is not None:
        i, s = found
        return StopDecision("stop", s, i + len(s) if params.include_stop_str_in_output else i)
    if context_full or (params.max_tokens is not None and num_output >= params.max_tokens):
        return StopDecision("length", None, keep_all)
    return None
