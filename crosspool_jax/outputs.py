"""What generation returns: `RequestOutput` and `CompletionOutput`, shaped like vLLM's."""
from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass
class Logprob:
    """Log-probability of one token at one position; rank 1 is the most likely token."""

    logprob: float
    rank: Optional[int] = None
    decoded_token: Optional[str] = None


@dataclasses.dataclass
class CompletionOutput:
    """One of the `n` completions of a request.

    logprobs, when asked for, is a list (one per generated token) of {token_id: Logprob}
    holding the sampled token and the top tokens. finish_reason is None while running,
    then "stop" (EOS, stop token or stop string; stop_reason says which), "length"
    (max_tokens or the model's context), or "abort".
    """

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: Optional[float] = None
    logprobs: Optional[list[dict[int, Logprob]]] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[object] = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class RequestOutput:
    """The state of one request: its prompt and its completions so far.

    error is set (and finished True) when the request failed alone, e.g. a prompt longer
    than the model's context or the whole KV pool. prompt_logprobs (with
    SamplingParams.prompt_logprobs=k): per prompt token, None for the first, then
    {token id: Logprob} of the prompt token given the tokens before it and the k most likely
    tokens there (vLLM's shape); complete from the first output with a generated token.
    metrics: {"arrival_time", "first_scheduled_time", "first_token_time"} (time.monotonic()
    seconds; None until it happened).
    """

    request_id: str
    model: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    error: Optional[str] = None
    metrics: Optional[dict] = None
    prompt_logprobs: Optional[list[Optional[dict[int, Logprob]]]] = None
