"""What the engine keeps on the host of each request it serves, and what it reports of it.

Owns `Completion` (one of a request's n completions: its scheduler `Request`, incremental
detokenizer, logprobs and finish; `accept` appends sampled tokens until a stop rule holds,
`report` is its `CompletionOutput` of a step) and `ParentRequest` (the request as the user
added it: prompt, `SamplingParams`, its completions, times, prompt logprobs; `output` is its
`RequestOutput` of a step as `SamplingParams.output_kind` says: the whole output so far
(CUMULATIVE), what is new since the last report (DELTA: text held back by
`SamplingParams.stop_holdback` while running, prompt logprobs once), or nothing until finished
(FINAL_ONLY, decided by the engine)). Plain host Python: `llm_engine.LLMEngine` makes them in
`add_request`, feeds them each step's results and forgets them once finished.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from crosspool_jax.engine.detokenizer import IncrementalDetokenizer
from crosspool_jax.engine.request import Request, RequestStatus
from crosspool_jax.engine.stop_checker import check_stop
from crosspool_jax.outputs import CompletionOutput, Logprob, RequestOutput
from crosspool_jax.sampling_params import RequestOutputKind, SamplingParams


def logprob_entry(token_id: int, logprob: float, rank: int, top, tokenizer, spelled: dict) -> dict:
    """{token id: Logprob} of one position: the scored token, then the (id, logprob) pairs of
    `top` ranked from 1 (a token already there keeps its entry), each spelled by the tokenizer
    (`spelled` caches the spellings of one call's positions)."""
    entry = {token_id: Logprob(logprob, rank)}
    for r, (tid, lp) in enumerate(top, start=1):
        entry.setdefault(int(tid), Logprob(float(lp), r))
    if tokenizer is not None:
        for tid, lp in entry.items():
            if tid not in spelled:
                spelled[tid] = tokenizer.decode([tid], skip_special_tokens=False)
            lp.decoded_token = spelled[tid]
    return entry


@dataclasses.dataclass
class Completion:
    """Host-side state of one completion: text, logprobs, finish, and (DELTA) what was reported."""

    request: Request
    index: int
    detok: Optional[IncrementalDetokenizer]
    logprobs: Optional[list] = None
    cumulative_logprob: float = 0.0
    finish_reason: Optional[str] = None
    stop_reason: object = None
    text_limit: Optional[int] = None
    sent_tokens: int = 0                # RequestOutputKind.DELTA: tokens (and logprobs) reported
    sent_text: int = 0                  # characters reported
    sent_finish: bool = False           # its finish reported

    @property
    def text(self) -> str:
        """The output text so far (cut where a stop rule said)."""
        text = self.detok.text if self.detok else ""
        return text if self.text_limit is None else text[:self.text_limit]

    def accept(self, entry, tokens) -> tuple[list[int], Optional[RequestStatus]]:
        """Append sampled tokens (`SampledToken`s) one by one until a stop rule holds ->
        (the ids kept, the finished status or None). entry: the model's `ModelEntry`
        (tokenizer, EOS ids, max_model_len)."""
        req = self.request
        params = req.sampling_params
        kept: list[int] = []
        for tok in tokens:
            kept.append(tok.token_id)
            old_len = len(self.detok.text) if self.detok else 0
            if self.detok:
                self.detok.add([tok.token_id])
            if self.logprobs is not None:                    # the program may report more top tokens
                self.logprobs.append(logprob_entry(tok.token_id, tok.logprob, tok.rank, tok.top[:params.logprobs],
                                                   entry.tokenizer, {}))
            self.cumulative_logprob += tok.logprob
            decision = check_stop(params, req.num_output_tokens + len(kept), tok.token_id, old_len,
                                  self.detok.text if self.detok else "", entry.eos_token_ids,
                                  len(req.prompt_token_ids),
                                  min(entry.max_model_len, len(req.prompt_token_ids) + req.max_tokens))
            if decision is not None:
                self.finish_reason = decision.finish_reason
                self.stop_reason = decision.stop_reason
                self.text_limit = decision.truncate_text_to
                if self.detok:
                    self.detok.flush()        # a character cut by a length stop still shows
                return kept, (RequestStatus.FINISHED_LENGTH if decision.finish_reason == "length"
                              else RequestStatus.FINISHED_STOPPED)
        return kept, None

    def report(self, delta: bool) -> Optional[CompletionOutput]:
        """This step's `CompletionOutput`: the whole output so far, or (delta) what it added
        since its last report, None when nothing: its new tokens and logprobs, and its new text
        but for the last `SamplingParams.stop_holdback` characters while it runs (a stop string
        ending in the next tokens cuts the text there, which is never before that point)."""
        req = self.request
        finished = self.finish_reason is not None
        text, num_tokens = self.text, req.num_output_tokens
        tokens_from, text_from, text_to = 0, 0, len(text)
        if delta:
            if self.sent_finish:
                return None
            tokens_from, text_from = self.sent_tokens, self.sent_text
            if not finished:
                text_to = max(text_from, len(text) - req.sampling_params.stop_holdback)
            if tokens_from == num_tokens and not finished and text_to == text_from:
                return None
            self.sent_tokens, self.sent_text, self.sent_finish = num_tokens, text_to, finished
        return CompletionOutput(
            index=self.index, text=text[text_from:text_to], token_ids=req.output_token_ids[tokens_from:],
            cumulative_logprob=self.cumulative_logprob if self.logprobs is not None else None,
            logprobs=None if self.logprobs is None else self.logprobs[tokens_from:num_tokens],
            finish_reason=self.finish_reason, stop_reason=self.stop_reason)


@dataclasses.dataclass
class ParentRequest:
    """A request as the user added it, and its `params.n` completions."""

    request_id: str
    model: str
    prompt: Optional[str]
    prompt_token_ids: list
    params: SamplingParams
    children: list                              # [Completion]
    arrival_time: float
    first_scheduled_time: Optional[float] = None
    first_token_time: Optional[float] = None
    error: Optional[str] = None
    prompt_logprobs: Optional[list] = None     # [None, {token id: Logprob} or None while not computed, ...]
    prompt_logprobs_sent: bool = False         # RequestOutputKind.DELTA: reported once

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.children)

    def record_prompt_logprobs(self, scores, tokenizer) -> None:
        """Fill the prompt positions `scores` (`PromptLogprobs`) covers that no earlier chunk
        (another completion, a recompute after preemption) filled: {prompt token: Logprob}
        plus the top tokens."""
        k = self.params.prompt_logprobs
        spelled: dict[int, str] = {}
        for i in range(len(scores.logprob)):
            pos = scores.first_position + i
            if self.prompt_logprobs[pos] is None:
                self.prompt_logprobs[pos] = logprob_entry(
                    self.prompt_token_ids[pos], float(scores.logprob[i]), int(scores.rank[i]),
                    zip(scores.top_ids[i][:k], scores.top_logprobs[i][:k]), tokenizer, spelled)

    def output(self) -> Optional[RequestOutput]:
        """This step's `RequestOutput` (DELTA: what is new, None when nothing is)."""
        delta = self.params.output_kind == RequestOutputKind.DELTA
        completions = [c for c in (child.report(delta) for child in self.children) if c is not None]
        if delta and not completions and not self.finished:
            return None
        prompt_logprobs = self.prompt_logprobs
        if prompt_logprobs is not None:
            prompt_logprobs = None if delta and self.prompt_logprobs_sent else list(prompt_logprobs)
            self.prompt_logprobs_sent = True
        metrics = {"arrival_time": self.arrival_time, "first_scheduled_time": self.first_scheduled_time,
                   "first_token_time": self.first_token_time}
        return RequestOutput(request_id=self.request_id, model=self.model, prompt=self.prompt,
                             prompt_token_ids=self.prompt_token_ids, outputs=completions,
                             finished=self.finished, error=self.error, metrics=metrics,
                             prompt_logprobs=prompt_logprobs)
