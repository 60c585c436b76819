"""`Request`: one sequence's host-side state as the scheduler sees it (plain Python, no JAX).

A request knows its tokens (prompt, then outputs), how many of them already have their
K/V in the pool (`num_computed_tokens`), and its status. There are no prefill or decode
modes: the scheduler only closes the gap between `num_computed_tokens` and `num_tokens`.
"""
from __future__ import annotations

import dataclasses
import enum
import time
from typing import Optional

from crosspool_jax.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "finished_stopped"
    FINISHED_LENGTH = "finished_length"
    FINISHED_ABORTED = "finished_aborted"
    FINISHED_ERROR = "finished_error"

    @property
    def is_finished(self) -> bool:
        return self.name.startswith("FINISHED_")

    @property
    def finish_reason(self) -> Optional[str]:
        """vLLM's finish_reason: "stop", "length", "abort", "error", or None while unfinished."""
        return {"FINISHED_STOPPED": "stop", "FINISHED_LENGTH": "length", "FINISHED_ABORTED": "abort",
                "FINISHED_ERROR": "error"}.get(self.name)


@dataclasses.dataclass(eq=False)
class Request:
    """One sequence of one model.

    bad_words_ids: the token ids of each of `sampling_params.bad_words` (the engine finds them).
    max_tokens: the resolved output cap; None takes `sampling_params.max_tokens`, and when
      that is None too the scheduler sets it from the model's max_model_len on add_request.
    num_computed_tokens: tokens of all_token_ids whose K/V are in the pool. After a sampled
      token is appended it is one less than num_tokens (the new token is fed next step).
    token_slot: while running, its slot in the devices' token tables (the scheduler gives it
      one of max_num_seqs on admission); -1 otherwise.
    """

    request_id: str
    model: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float = dataclasses.field(default_factory=time.monotonic)
    max_tokens: Optional[int] = None
    output_token_ids: list[int] = dataclasses.field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    num_preemptions: int = 0
    error: Optional[str] = None
    bad_words_ids: list = dataclasses.field(default_factory=list)
    token_slot: int = -1

    def __post_init__(self):
        if not isinstance(self.request_id, str) or not self.request_id:
            raise ValueError(f"Request.request_id must be a non-empty string, got {self.request_id!r}")
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"Request {self.request_id}: model must be a non-empty string, got {self.model!r}")
        if not isinstance(self.sampling_params, SamplingParams):
            raise ValueError(f"Request {self.request_id}: sampling_params must be a SamplingParams, "
                             f"got {type(self.sampling_params).__name__}")
        try:
            self.prompt_token_ids = [int(t) for t in self.prompt_token_ids]
        except (TypeError, ValueError) as e:
            raise ValueError(f"Request {self.request_id}: prompt_token_ids must be integers") from e
        if not self.prompt_token_ids:
            raise ValueError(f"Request {self.request_id}: prompt_token_ids is empty")
        if min(self.prompt_token_ids) < 0:
            raise ValueError(f"Request {self.request_id}: prompt_token_ids must be >= 0, "
                             f"got {min(self.prompt_token_ids)}")
        self.output_token_ids = [int(t) for t in self.output_token_ids]
        if self.max_tokens is None:
            self.max_tokens = self.sampling_params.max_tokens
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise ValueError(f"Request {self.request_id}: max_tokens must be an integer >= 1 or None, "
                             f"got {self.max_tokens!r}")
        if not isinstance(self.status, RequestStatus):
            raise ValueError(f"Request {self.request_id}: status must be a RequestStatus, got {self.status!r}")
        if not 0 <= self.num_computed_tokens <= self.num_tokens:
            raise ValueError(f"Request {self.request_id}: num_computed_tokens={self.num_computed_tokens} "
                             f"outside [0, num_tokens={self.num_tokens}]")

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt then outputs (a new list; use `token_ids_between` for a slice)."""
        return self.prompt_token_ids + self.output_token_ids

    def token_ids_between(self, start: int, stop: int) -> list[int]:
        """all_token_ids[start:stop] without building the whole list."""
        p = len(self.prompt_token_ids)
        if stop <= p:
            return self.prompt_token_ids[start:stop]
        if start >= p:
            return self.output_token_ids[start - p:stop - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[:stop - p]

    @property
    def needs_host_per_token(self) -> bool:
        """A bad word of several tokens: the ids it bans depend on the last tokens generated,
        which the host rebuilds each step, so this request decodes one token per dispatch."""
        return any(len(ids) > 1 for ids in self.bad_words_ids)

    @property
    def needs_tokens_on_host(self) -> bool:
        """Its sampling reads the tokens generated so far on the host (the penalties' counts, bad
        words of several tokens), so a step cannot be made for it before the last one's tokens
        are in (`Scheduler.schedule_continuation`)."""
        return self.needs_host_per_token or self.sampling_params.needs_penalties

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def num_tokens_left(self) -> Optional[int]:
        """Outputs still allowed by max_tokens (None when unresolved)."""
        return None if self.max_tokens is None else self.max_tokens - len(self.output_token_ids)
