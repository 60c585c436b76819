"""A fake `LLMEngine` whose outputs can be worked out by hand, for the server tests.

Tokenizer: encode(text) = [BOS=1] + [ord(c) for c in text]; decode drops ids < 32 and
spells the rest with chr. Chat template: "[role]content" per message, then "[assistant]".

Generation: choice j of a request whose prompt has P tokens emits, at its k-th token,
token ord('a') + (P + j + k) % 26, `tokens_per_step` tokens per step (1 by default) for every
running request. A request finishes with "length" at max_tokens (or the model's context),
with "stop" when a stop string appears (text cut before it). Outputs are cumulative, or
deltas for a request whose `output_kind` is DELTA (as the real engine's: text held back by
`SamplingParams.stop_holdback` while running). A prompt containing "FAIL"
(as text, or as the token ids of those characters) fails alone at its first step.
KV pages: ceil(tokens / 4) per choice while running, freed on finish or abort.

It also records the threads that call it (the contract: only one), its aborts, and has
switches to pause progress (`paused`), to make the next step raise (`explode`) and to make
the engine loop itself fail (`crash`).
"""
from __future__ import annotations

import dataclasses
import math
import threading
import time
from typing import Optional

from crosspool_jax.outputs import CompletionOutput, Logprob, RequestOutput
from crosspool_jax.sampling_params import RequestOutputKind, SamplingParams

BOS, EOS = 1, 2
PAGE_TOKENS = 4


class FakeTokenizer:
    eos_token_id = EOS

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([BOS] if add_special_tokens else []) + [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids if i >= 32)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        text = "".join(f"[{m['role']}]{m['content']}" for m in messages)
        return text + ("[assistant]" if add_generation_prompt else "")


def expected_tokens(num_prompt_tokens: int, count: int, choice: int = 0) -> list[int]:
    return [ord("a") + (num_prompt_tokens + choice + k) % 26 for k in range(count)]


def expected_text(num_prompt_tokens: int, count: int, choice: int = 0) -> str:
    return "".join(chr(t) for t in expected_tokens(num_prompt_tokens, count, choice))


@dataclasses.dataclass
class FakeStats:
    num_waiting: int
    num_running: int
    num_preemptions: int
    kv_pages_total: int
    kv_pages_used_by_model: dict
    models: dict
    swaps_in: int
    swaps_out: int
    requests_by_model: dict
    engine_steps: int = 0


@dataclasses.dataclass
class _Req:
    request_id: str
    model: str
    prompt: Optional[str]
    prompt_ids: list[int]
    params: SamplingParams
    tokens: list[list[int]]
    texts: list[str]
    finish: list[Optional[str]]
    stop_reason: list[Optional[str]]
    logprobs: list[list[dict]]
    times: dict = dataclasses.field(default_factory=dict)   # RequestOutput.metrics
    sent: dict = dataclasses.field(default_factory=dict)    # DELTA: choice -> (tokens, characters, finished) sent

    def completion(self, j: int) -> Optional[CompletionOutput]:
        """Choice j's output of this step: cumulative, or (DELTA) what is new, None when nothing."""
        lps = self.logprobs[j] if self.params.logprobs is not None else None
        if self.params.output_kind != RequestOutputKind.DELTA:
            return CompletionOutput(j, self.texts[j], list(self.tokens[j]), None, None if lps is None else list(lps),
                                    self.finish[j], self.stop_reason[j])
        n0, t0, done = self.sent.get(j, (0, 0, False))
        finished = self.finish[j] is not None
        end = len(self.texts[j]) if finished else max(t0, len(self.texts[j]) - self.params.stop_holdback)
        if done or (n0 == len(self.tokens[j]) and not finished):
            return None
        self.sent[j] = (len(self.tokens[j]), end, finished)
        return CompletionOutput(j, self.texts[j][t0:end], self.tokens[j][n0:], None, None if lps is None else lps[n0:],
                                self.finish[j], self.stop_reason[j])


class FakeEngine:
    def __init__(self, models=("alpha", "beta"), *, max_model_len: int = 64, step_s: float = 0.002,
                 tokenizerless=("beta",), tokens_per_step: int = 1):
        self.model_names = list(models)
        self._max_model_len = max_model_len
        self.step_s = step_s
        self.tokens_per_step = tokens_per_step  # > 1: like a multi-step decode
        self.num_steps = 0
        self._tokenizer = FakeTokenizer()
        self._no_tokenizer = set(tokenizerless)
        self.paused = threading.Event()  # set: step() makes no progress
        self.explode = threading.Event()  # set: the next step() raises (and clears it)
        self.crash = threading.Event()  # set: has_unfinished_requests() raises (kills the loop)
        self.added: list[str] = []
        self.aborted: list[str] = []
        self.requests: dict[str, _Req] = {}
        self.resident = {m: i == 0 for i, m in enumerate(self.model_names)}
        self.swaps_in = 0
        self.threads: set[int] = set()

    def _enter(self):
        self.threads.add(threading.get_ident())

    def get_tokenizer(self, model):
        return None if model in self._no_tokenizer else self._tokenizer

    def max_model_len(self, model):
        return self._max_model_len

    def add_request(self, request_id, model, prompt, params):
        self._enter()
        if model not in self.model_names:
            raise ValueError(f"unknown model {model!r}; served: {self.model_names}")
        if request_id in self.requests:
            raise ValueError(f"duplicate request id {request_id!r}")
        if isinstance(prompt, str):
            tok = self.get_tokenizer(model)
            if tok is None:
                raise ValueError(f"model {model!r} has no tokenizer; send token ids")
            ids = tok.encode(prompt)
        else:
            ids = list(prompt)
        if not ids:
            raise ValueError("prompt is empty")
        if len(ids) >= self._max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens; model {model!r} allows at most "
                             f"{self._max_model_len - 1}")
        if not self.resident[model]:
            self.resident[model] = True
            self.swaps_in += 1
        n = params.n
        self.requests[request_id] = _Req(request_id, model, prompt if isinstance(prompt, str) else None,
                                         ids, params, [[] for _ in range(n)], [""] * n, [None] * n,
                                         [None] * n, [[] for _ in range(n)])
        self.added.append(request_id)

    def abort_request(self, request_id):
        self._enter()
        if self.requests.pop(request_id, None) is not None:
            self.aborted.append(request_id)

    def has_unfinished_requests(self):
        self._enter()
        if self.crash.is_set():
            raise RuntimeError("fake crash")
        return bool(self.requests)

    def step(self):
        self._enter()
        time.sleep(self.step_s)
        self.num_steps += 1
        if self.explode.is_set():
            self.explode.clear()
            raise RuntimeError("fake step failure")
        if self.paused.is_set():
            return []
        outs = []
        now = time.monotonic()
        for rid, r in list(self.requests.items()):
            r.times.setdefault("arrival_time", now - self.step_s)
            r.times.setdefault("first_scheduled_time", now)
            r.times.setdefault("first_token_time", now)
            if "FAIL" in self._tokenizer.decode(r.prompt_ids):
                del self.requests[rid]
                outs.append(RequestOutput(rid, r.model, r.prompt, r.prompt_ids, [], finished=True,
                                          error="fake failure"))
                continue
            for j in range(r.params.n):
                for _ in range(self.tokens_per_step):
                    if r.finish[j] is not None:
                        break
                    k = len(r.tokens[j])
                    tid = expected_tokens(len(r.prompt_ids), k + 1, j)[-1]
                    r.tokens[j].append(tid)
                    if r.params.logprobs is not None:
                        top = {tid + i: Logprob(-0.25 * (i + 1), rank=i + 1, decoded_token=chr(tid + i))
                               for i in range(max(r.params.logprobs, 1))}
                        r.logprobs[j].append(top)
                    r.texts[j] += chr(tid)
                    for s in r.params.stop:
                        if s in r.texts[j]:
                            r.texts[j] = r.texts[j][:r.texts[j].index(s)]
                            r.finish[j], r.stop_reason[j] = "stop", s
                            break
                    if r.finish[j] is None and (len(r.tokens[j]) == r.params.max_tokens or len(
                            r.prompt_ids) + len(r.tokens[j]) >= self._max_model_len):
                        r.finish[j] = "length"
            finished = all(f is not None for f in r.finish)
            outs.append(RequestOutput(
                rid, r.model, r.prompt, r.prompt_ids,
                [c for c in map(r.completion, range(r.params.n)) if c is not None],
                finished=finished, metrics=dict(r.times)))
            if finished:
                del self.requests[rid]
        return outs

    def pages_used(self) -> dict:
        used = {m: 0 for m in self.model_names}
        for r in self.requests.values():
            used[r.model] += sum(math.ceil((len(r.prompt_ids) + len(t)) / PAGE_TOKENS)
                                 for t in r.tokens)
        return used

    def stats(self):
        self._enter()
        running = {m: (sum(r.model == m for r in self.requests.values()), 0) for m in self.model_names}
        return FakeStats(num_waiting=0, num_running=len(self.requests), num_preemptions=0,
                         kv_pages_total=1000, kv_pages_used_by_model=self.pages_used(),
                         models={m: {"resident": self.resident[m], "weights_bytes": 1000}
                                 for m in self.model_names},
                         swaps_in=self.swaps_in, swaps_out=0, requests_by_model=running, engine_steps=self.num_steps)
