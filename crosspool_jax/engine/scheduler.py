"""The scheduler: continuous batching over many models on one KV pool (plain Python, no JAX).

How a step is chosen. There are no prefill or decode modes: every request has
`num_computed_tokens` (K/V already in the pool) and a target (`num_tokens`, the prompt plus
the outputs so far). `schedule()` closes those gaps under a token budget
(`max_num_batched_tokens`); prefill chunks and single-token decodes of every model share
one step, grouped per model (`SchedulerOutput.chunks_by_model`), each model's chunks one
ragged batch.

1. Running requests first: their decode tokens (oldest arrival first), then their
   unfinished prefill chunks (oldest first), each chunk the whole gap or what is left of
   the budget (chunked prefill). Decodes go first so that a long prefill never stalls the
   other requests' next tokens (time between tokens), and the prefill tokens of a step that
   carries decodes (running chunks and admissions together) are bounded, so a long prompt of
   one model stretches no other model's decode step: to `decode_step_prefill_tokens` when
   set, else, with a time budget (`tbt_budget_s`) and the models' measured step costs
   (`set_step_costs`: seconds of a model's program per token bucket), to what keeps the
   step's estimated time within the budget. That estimate is the sum of the step's models'
   program times at their buckets (the models of a step run one after another on one device
   and in the crosspool split; on several devices it over-estimates), so a prefill chunk of
   one model gets the time the other models' decodes leave, up to the largest bucket of its
   model that fits (tokens filling a bucket the model already pays for are free). When the
   decodes alone leave no room, the step still takes the model's smallest bucket of prefill
   tokens, so prompts advance however tight the budget. If the pool cannot hold a request's
   new tokens, the latest-arrived running request (any model; if it was already scheduled
   in this step, it is unscheduled) is preempted by recompute: its pages are freed,
   num_computed_tokens goes back to 0, its output tokens are kept (they are recomputed with
   the prompt, so the output is unchanged) and it goes to the front of its model's waiting
   queue. A request is never preempted for a later-arrived one: if no later request is
   left to preempt, the request waits (keeping its pages) unless no other running request
   holds pages that could make room, in which case it can never grow and fails with
   FINISHED_ERROR.
2. Then, unless this step preempted, waiting requests are admitted (prefix-cache hits
   skip their cached blocks, except for requests asking prompt_logprobs, which compute
   their whole prompt). Fairness rule: each model has a FCFS queue; models take
   turns, one admission per model per turn, until the budget, `max_num_seqs` or the pool
   stops it. The turn order rotates across steps: the model admitted first in a step goes
   to the back of the line, so a burst of one model cannot starve another model's
   head-of-line request of budget. A request that cannot get pages bars every
   later-arrived request (any model) from admission in this step, and its model goes to
   the front of the line for the next step, so a large request is never overtaken forever
   by smaller later ones. When a model's own page cap (`max_pages`, the static-reservation
   baseline) is what stops its request, only that model waits, and preemption only picks
   victims of that model.
3. Multi-step decode: when every scheduled chunk is a single-token decode, every running
   request is scheduled and nothing waits, all chunks get num_steps =
   min(max_decode_steps, each request's tokens left before max_tokens / max_model_len),
   with their pages allocated up front (num_steps 1 if the pool is short, or if a request's
   banned tokens change with each token it makes: `Request.needs_host_per_token`).

4. Weights residency (only with `fit_together`, i.e. when a weights budget holds fewer than
   all models): a step's models must fit in the weights pools together, so the engine never
   evicts a model it is about to run in the same step. They are chosen in a residency order:
   each model with work (running or waiting requests) joins while the chosen ones still fit
   together; the chosen models' running requests go first (leader first, decode-first within
   a model); a request of a model left out waits (keeping its pages; admissions skip its model
   without barring others). Every `residency_quantum` steps the leader moves to the back, so
   each model leads in turn and the swaps happen once per rotation instead of every step.

5. Models in flight (`schedule(busy_models=, split_models=)`, the engine's `pipeline_models`):
   a model whose previous step is still running on the device is left out of this step (its
   running requests wait without counting as unscheduled for multi-step decode; its queue is
   not admitted from, though a waiting request still keeps steps at one token), and with
   split_models a step takes at most half (rounded up) of the models with work, the least
   recently scheduled first, so consecutive steps alternate between halves.
   Results that come back for a request preempted or finished since its chunk was scheduled
   are dropped (`is_current`).

6. Continuations (the engine's `async_scheduling`): `schedule_continuation(output)` makes the
   step after `output` while `output` still runs on the device: the step 1.-3. make from the
   state `output` leaves if every chunk of it produces all its tokens. A request that
   `output` samples decodes next, its input token read on the device from its token slot
   (every running request holds one of max_num_seqs slots in the devices' token tables,
   given on admission and taken back when it finishes or is preempted); a prompt chunked
   across steps gets its next chunk; waiting requests are admitted. A request that `output`
   stops or that is aborted meanwhile has its continuation's results dropped (`is_current`).
   A continuation never preempts (that would drop results in flight): when the pool is
   short, none is made, and `schedule()` runs once `output` is in.

Rejections (status FINISHED_ERROR, listed once in `SchedulerOutput.rejected`): a prompt
longer than its model's max_model_len, a prompt needing more pages than the whole pool,
and a lone request whose growth the whole pool cannot hold.

The engine loop: `out = schedule()`, run `out`, `update_from_output(out, sampled)`, then
`finish_request(...)` for requests that hit a stop condition (the engine owns stop checks;
the length rule it should use is num_output_tokens >= max_tokens or num_tokens >=
max_model_len). Calls alternate: schedule, then one update for that output; with
continuations, `schedule_continuation(out)` may come between them (and again for its own
output), every output updated once, in the order they were made.
Not thread-safe: one thread (the engine loop) drives the scheduler and the KV manager.
"""
from __future__ import annotations

import collections
import dataclasses
import math
from typing import Callable, Mapping, Optional

import numpy as np

from crosspool_jax.engine.request import Request, RequestStatus
from crosspool_jax.kv.kv_cache_manager import KVCacheManager

DEVICE_TOKEN = -1       # a token of a step in flight, not on the host yet (read on the device)


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 512
    max_num_seqs: int = 64
    max_decode_steps: int = 8
    enable_prefix_caching: bool = True
    residency_quantum: int = 8          # steps a model leads the residency order before the next one
    decode_step_prefill_tokens: Optional[int] = None   # prefill tokens of a step with decodes (None: budget)
    tbt_budget_s: Optional[float] = None   # seconds a step with decodes may take, by the step costs (None: off)

    def __post_init__(self):
        for name in ("max_num_batched_tokens", "max_num_seqs", "max_decode_steps", "residency_quantum"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"SchedulerConfig.{name} must be an integer >= 1, got {value!r}")
        value = self.decode_step_prefill_tokens
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"SchedulerConfig.decode_step_prefill_tokens must be an integer >= 1 or None, "
                             f"got {value!r}")
        value = self.tbt_budget_s
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)
                                  or not math.isfinite(value) or value <= 0):
            raise ValueError(f"SchedulerConfig.tbt_budget_s must be a positive number of seconds or None, "
                             f"got {value!r}")
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(f"SchedulerConfig.enable_prefix_caching must be a bool, "
                             f"got {self.enable_prefix_caching!r}")


@dataclasses.dataclass(frozen=True)
class ModelStepCost:
    """Seconds one model's step program takes, by token bucket: a step of the model with t
    tokens runs the program of the smallest bucket >= t and takes that bucket's seconds
    (non-decreasing; the engine measures them, `engine/step_cost.py`). base_s + per_token_s * T
    is the line fitted to the measured buckets (`measured` says which; the others are read off
    the line), for reports."""

    token_buckets: tuple[int, ...]
    seconds: tuple[float, ...]
    base_s: float = 0.0
    per_token_s: float = 0.0
    measured: tuple[bool, ...] = ()

    def __post_init__(self):
        buckets, seconds = tuple(self.token_buckets), tuple(self.seconds)
        if not buckets or len(buckets) != len(seconds):
            raise ValueError(f"ModelStepCost: {len(buckets)} token buckets but {len(seconds)} times (one each, "
                             f"at least one)")
        if any(not isinstance(b, int) or b < 1 for b in buckets) or list(buckets) != sorted(set(buckets)):
            raise ValueError(f"ModelStepCost.token_buckets must be increasing integers >= 1, got {buckets}")
        if any(not math.isfinite(x) or x < 0 for x in seconds) or any(x > y for x, y in zip(seconds, seconds[1:])):
            raise ValueError(f"ModelStepCost.seconds must be finite, >= 0 and non-decreasing, got {seconds}")
        if self.measured and len(self.measured) != len(buckets):
            raise ValueError(f"ModelStepCost.measured: one flag per token bucket or none, got {self.measured}")

    def at(self, tokens: int) -> float:
        """Seconds of the model's program for a step of `tokens` tokens (0: not in the step)."""
        if tokens <= 0:
            return 0.0
        for bucket, seconds in zip(self.token_buckets, self.seconds):
            if tokens <= bucket:
                return seconds
        return self.seconds[-1]

    def most_tokens_within(self, seconds: float) -> int:
        """The largest bucket whose program takes at most `seconds` (0 when none does)."""
        return max((b for b, s in zip(self.token_buckets, self.seconds) if s <= seconds), default=0)


class _PrefillLimit:
    """The prefill tokens the step being built may still take (the module docstring, 1.):
    unbounded while it carries no decode; then `cap` prefill tokens in all, or, with a time
    budget, what keeps the sum of its models' program times within `budget_s`."""

    def __init__(self, cap: Optional[int], budget_s: Optional[float], costs: Mapping[str, ModelStepCost]):
        self.cap, self.budget_s, self.costs = cap, budget_s, costs
        self.tokens: collections.Counter = collections.Counter()      # model -> tokens in the step
        self.decodes = 0
        self.prefill = 0

    def add(self, model: str, n: int, decode: bool) -> None:
        """A chunk of n tokens joins the step (n < 0: a scheduled one of -n tokens leaves it)."""
        sign = 1 if n > 0 else -1
        self.tokens[model] += n
        self.decodes += sign * int(decode)
        self.prefill += 0 if decode else n

    def room(self, model: str) -> Optional[int]:
        """Prefill tokens `model` may still add to the step (None: no bound)."""
        if not self.decodes:
            return None
        if self.cap is not None:
            return max(self.cap - self.prefill, 0)
        if self.budget_s is None:
            return None
        cost = self.costs[model]
        others = sum(self.costs[m].at(t) for m, t in self.tokens.items() if m != model)
        room = cost.most_tokens_within(self.budget_s - others) - self.tokens[model]
        return max(room, cost.token_buckets[0] - self.prefill, 0)


@dataclasses.dataclass
class ScheduledChunk:
    """Tokens of one request fed in one step.

    start: num_computed_tokens before the step; token_ids = all_token_ids[start:start+num_tokens].
    samples: the chunk reaches the end of the known tokens, so the step samples a next token.
    num_steps: 1, or k > 1 for a multi-step decode (k tokens sampled, each fed to the next).
    page_table: [L][num_blocks] global page ids, already covering start + num_tokens + num_steps - 1
      tokens: a read-only int32 numpy array [L, num_blocks] (a snapshot; `np.asarray` is free).
    token_slot: the request's slot in the devices' token tables (the program writes the chunk's
      last sampled token there; -1: none).
    device_token: the chunk continues a step still in flight (`Scheduler.schedule_continuation`):
      its one token is that step's last sample, not known on the host when the chunk was made
      (token_ids is [DEVICE_TOKEN]); the program reads it from the token table at token_slot.
    """

    request: Request
    start: int
    num_tokens: int
    token_ids: list[int]
    samples: bool
    num_steps: int
    page_table: np.ndarray              # int32 [L, num_blocks]
    token_slot: int = -1
    device_token: bool = False

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_outputs_before(self) -> int:
        """Output tokens the request has when this chunk samples (of a continuation: counting
        the tokens of the step in flight before it)."""
        if not self.samples:
            return self.request.num_output_tokens
        return self.start + self.num_tokens - self.request.num_prompt_tokens


@dataclasses.dataclass
class SchedulerOutput:
    chunks_by_model: dict[str, list[ScheduledChunk]]
    preempted: list[str]
    rejected: list[tuple[str, str]]     # (request_id, error message)
    num_batched_tokens: int

    @property
    def chunks(self) -> list[ScheduledChunk]:
        return [c for chunks in self.chunks_by_model.values() for c in chunks]

    @property
    def num_steps(self) -> int:
        return max((c.num_steps for c in self.chunks), default=1)

    @property
    def is_empty(self) -> bool:
        return not self.chunks_by_model


class Scheduler:
    """Chooses each step's chunks over all models' requests; owns the waiting and running sets."""

    def __init__(self, config: SchedulerConfig, kv_manager: KVCacheManager,
                 fit_together: Optional[Callable[[set], bool]] = None):
        """fit_together(models) -> whether those models' weights can be resident at once
        (`ModelRegistry.fit_together`); None: no weights budget, any models share a step."""
        if not isinstance(config, SchedulerConfig):
            raise ValueError(f"Scheduler.config must be a SchedulerConfig, got {type(config).__name__}")
        if not isinstance(kv_manager, KVCacheManager):
            raise ValueError(f"Scheduler.kv_manager must be a KVCacheManager, got {type(kv_manager).__name__}")
        self.config = config
        self.kv = kv_manager
        self._requests: dict[str, Request] = {}                       # unfinished, by id
        self._order: dict[str, tuple[float, int]] = {}                # id -> (arrival_time, add count)
        self._num_added = 0
        self._waiting: dict[str, collections.deque] = {}              # model -> FCFS queue
        self._turns: list[str] = []                                   # models' turn order
        self._running: list[Request] = []                             # sorted by _order
        self._rejected: list[tuple[str, str]] = []                    # not yet reported
        self.num_preemptions = 0
        self.prefix_cache_queries = 0          # prompt tokens of admitted requests (vLLM's prefix cache queries)
        self.prefix_cache_hits = 0             # of them, found computed in the prefix cache
        self._fit_together = fit_together
        self._lead: list[str] = []                                    # models' residency order
        self._lead_steps = 0                                          # steps the first has led
        self._step_costs: dict[str, ModelStepCost] = {}               # model -> measured costs
        self._num_schedules = 0
        self._last_scheduled: dict[str, int] = {}                     # model -> schedule() count it last ran
        self._free_token_slots = list(range(config.max_num_seqs - 1, -1, -1))   # one per running request

    def set_step_costs(self, costs: Mapping[str, ModelStepCost]) -> None:
        """The models' step costs, which size the prefill of steps with decodes to
        `config.tbt_budget_s` (unless `decode_step_prefill_tokens` is set). Every model of the
        KV manager needs one."""
        missing = sorted(set(self.kv.models) - set(costs))
        if missing:
            raise ValueError(f"set_step_costs: no step cost for model(s) {missing}")
        for model, cost in costs.items():
            if not isinstance(cost, ModelStepCost):
                raise ValueError(f"set_step_costs: the cost of model {model!r} must be a ModelStepCost, "
                                 f"got {type(cost).__name__}")
        self._step_costs = dict(costs)

    # ----- requests in and out ---------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        """Queue a request (or reject it at once: it is then reported by the next schedule())."""
        if not isinstance(request, Request):
            raise ValueError(f"add_request needs a Request, got {type(request).__name__}")
        if request.request_id in self._requests:
            raise ValueError(f"add_request: request id {request.request_id!r} is already in the scheduler")
        if request.is_finished:
            raise ValueError(f"add_request: request {request.request_id!r} is already {request.status.name}")
        g = self.kv.geometry(request.model)
        if request.max_tokens is None:
            request.max_tokens = max(1, g.max_model_len - request.num_prompt_tokens)
        error = None
        if request.num_prompt_tokens > g.max_model_len:
            error = (f"prompt of {request.num_prompt_tokens} tokens is longer than model {request.model!r}'s "
                     f"max_model_len of {g.max_model_len} tokens")
        elif request.num_prompt_tokens > self.kv.max_request_tokens(request.model):
            blocks = g.num_blocks(request.num_prompt_tokens)
            error = (f"prompt of {request.num_prompt_tokens} tokens needs {blocks} blocks x {g.num_layers} layers "
                     f"= {blocks * g.num_layers} pages of model {request.model!r}, more than the whole KV pool "
                     f"can give it {self._capacity_note(request.model)}")
        if error is not None:
            request.status, request.error = RequestStatus.FINISHED_ERROR, error
            self._rejected.append((request.request_id, error))
            return
        request.status = RequestStatus.WAITING
        request.num_computed_tokens = 0
        self._requests[request.request_id] = request
        self._order[request.request_id] = (request.arrival_time, self._num_added)
        self._num_added += 1
        if request.model not in self._waiting:
            self._waiting[request.model] = collections.deque()
            self._turns.append(request.model)
        self._waiting[request.model].append(request)

    def finish_request(self, request_id: str, status: RequestStatus) -> None:
        """End a request (stop condition, abort, error): its pages are freed at once. Idempotent."""
        if not isinstance(status, RequestStatus) or not status.is_finished:
            raise ValueError(f"finish_request({request_id!r}): status must be a FINISHED_* status, got {status!r}")
        request = self._requests.pop(request_id, None)
        if request is None:
            return
        self._order.pop(request_id)
        if request in self._running:
            self._running.remove(request)
            self._release_token_slot(request)
        else:
            self._waiting[request.model].remove(request)
        self.kv.free(request)
        request.status = status

    def abort_request(self, request_id: str) -> None:
        """Abort a waiting or running request (no-op for unknown or finished ones)."""
        self.finish_request(request_id, RequestStatus.FINISHED_ABORTED)

    def get_request(self, request_id: str) -> Optional[Request]:
        """The unfinished request with that id, or None."""
        return self._requests.get(request_id)

    def has_unfinished(self) -> bool:
        """True while requests wait or run, or rejections are still to be reported."""
        return bool(self._requests) or bool(self._rejected)

    def num_waiting(self) -> int:
        return sum(len(q) for q in self._waiting.values())

    def num_running(self) -> int:
        return len(self._running)

    def requests_by_model(self) -> dict[str, tuple[int, int]]:
        """{model: (running, waiting)} sequences of every model with a queue."""
        out = {model: [0, len(queue)] for model, queue in self._waiting.items()}
        for request in self._running:
            out.setdefault(request.model, [0, 0])[0] += 1
        return {model: (running, waiting) for model, (running, waiting) in out.items()}

    # ----- one step ----------------------------------------------------------------------------
    def schedule(self, busy_models: frozenset = frozenset(), split_models: bool = False) -> SchedulerOutput:
        """One step (module docstring). busy_models: models with a step in flight, left out of
        this one (their running requests neither run nor count as unscheduled for multi-step
        decode; their queues are not admitted from). split_models: of the W models with work
        (running or waiting requests, busy ones included), this step takes at most ceil(W / 2),
        the least recently scheduled first, so that models alternate between consecutive steps
        (the engine's `pipeline_models`)."""
        return self._schedule(busy_models, split_models)

    def schedule_continuation(self, output: SchedulerOutput) -> Optional[SchedulerOutput]:
        """The step after `output`, made while `output` still runs on the device (the engine's
        async scheduling), or None when it cannot be made before `output`'s results are in.

        It is the step `schedule()` makes from the state `output` leaves if every chunk of it
        produces all its num_steps tokens: each request `output` samples for decodes the token
        `output` samples last, which the program reads from the device's token table
        (`ScheduledChunk.device_token`: its token_ids hold DEVICE_TOKEN); a prompt that
        `output` prefills part of gets its next chunk; waiting requests are admitted as
        `schedule()` admits them, hitting the prefix cache on the blocks `output` fills too (they
        are registered now: the device computes them before the continuation reads them). While
        the results are out, the scheduler's requests are set to that state (`output`'s tokens
        as DEVICE_TOKEN placeholders) and set back after. A
        request that `output` takes to its max_tokens or max_model_len is left out (it
        finishes when `output` is processed); one that stops sooner finishes then, and its
        continuation's results are dropped (`is_current`).

        None when: `output` is empty; a request `output` samples reads its tokens on the host
        to sample (`Request.needs_tokens_on_host`: penalties, bad words of several tokens);
        weights budgets cannot hold every model with work at once (the residency order then
        picks the next step's models); or the pool cannot hold a running request's new tokens
        (preemption, which would drop results in flight, waits for `schedule()`). The engine
        then collects `output` first and calls `schedule()`."""
        if not output.chunks_by_model:
            return None
        if self._fit_together is not None and not self._fit_together(self._models_with_work()):
            return None
        current = [c for c in output.chunks if self.is_current(c)]
        if any(c.samples and c.request.needs_tokens_on_host for c in current):
            return None
        saved = [(c.request, c.request.num_computed_tokens, c.request.num_output_tokens) for c in current]
        finishing: set[int] = set()                 # id() of requests `output` takes to their length limit
        for c in current:
            request = c.request
            request.num_computed_tokens = c.start + c.num_tokens
            if self.config.enable_prefix_caching and request.num_computed_tokens <= request.num_tokens:
                self.kv.cache_full_blocks(request)  # its full blocks are computed before the continuation runs
            if not c.samples:
                continue
            request.output_token_ids.extend([DEVICE_TOKEN] * c.num_steps)
            request.num_computed_tokens = c.start + c.num_tokens + c.num_steps - 1
            g = self.kv.geometry(request.model)
            if request.num_output_tokens >= request.max_tokens or request.num_tokens >= g.max_model_len:
                finishing.add(id(request))
        try:
            return self._schedule(frozenset(), False, finishing=finishing)
        finally:
            for request, computed, num_outputs in saved:
                del request.output_token_ids[num_outputs:]
                if request.status == RequestStatus.RUNNING:
                    request.num_computed_tokens = computed

    def _schedule(self, busy_models: frozenset, split_models: bool,
                  finishing: Optional[set] = None) -> Optional[SchedulerOutput]:
        """`schedule()`; with `finishing` (the id()s of requests to leave out), a continuation's
        step (`schedule_continuation`): nothing is preempted or rejected, None when a running
        request cannot get its pages or nothing is scheduled."""
        continuation = finishing is not None
        self._num_schedules += 1
        budget = self.config.max_num_batched_tokens
        planned: list[tuple[Request, int]] = []          # (request, tokens fed), in scheduling order
        preempted: list[str] = []
        rejected: list[tuple[str, str]] = []
        all_running_scheduled = True

        # 1. running requests: decodes first, then unfinished prefill chunks, oldest first in
        #    each; preempt the latest-arrived running request when the pool is short.
        gaps = {request: self._num_to_compute(request) for request in self._running}
        order = ([r for r in self._running if gaps[r] == 1] + [r for r in self._running if gaps[r] != 1])
        fits = self._model_gate(busy_models, split_models)
        if self._fit_together is not None:
            rank = {m: i for i, m in enumerate(self._lead)}
            # stable: decodes first (every model's), then the leader's requests first, oldest within a model
            order.sort(key=lambda r: (gaps[r] != 1, rank[r.model]))
        scheduled: dict[Request, int] = {}
        # the decodes of this step are in first: the prefill it carries is bounded, for their
        # time between tokens
        limit = self._prefill_limit()
        for request in order:
            if request.status != RequestStatus.RUNNING:          # preempted earlier in this loop
                continue
            if request.model in busy_models:                     # its model's last step is in flight
                continue
            if continuation and id(request) in finishing:        # its step in flight finishes it
                continue
            if not fits(request.model):      # another step's model, or its weights cannot be resident
                all_running_scheduled = False
                continue
            decode = gaps[request] == 1
            room = None if decode else limit.room(request.model)
            n = min(gaps[request], budget, budget if room is None else room)
            if n <= 0:          # out of budget, or nothing to compute (the engine should stop it)
                all_running_scheduled = False
                continue
            ok = self.kv.allocate_slots(request, n)
            if not ok and continuation:
                return None         # the pages it holds now stay its own for these tokens
            while not ok:
                victim = self._victim_for(request, n)
                if victim is None:
                    break
                freed = scheduled.pop(victim, 0)
                if freed:
                    limit.add(victim.model, -freed, gaps[victim] == 1)
                budget += freed
                self._preempt(victim)
                preempted.append(victim.request_id)
                ok = self.kv.allocate_slots(request, n)
            if ok:
                scheduled[request] = n
                budget -= n
                limit.add(request.model, n, decode)
            elif not self._competitors(request, n):
                error = self._cannot_grow_message(request, n)
                self.finish_request(request.request_id, RequestStatus.FINISHED_ERROR)
                request.error = error
                rejected.append((request.request_id, error))
            else:
                all_running_scheduled = False
        planned.extend(scheduled.items())

        # 2. admissions, unless this step preempted (bounded like the prefills above when the
        #    step carries decodes).
        if not preempted:
            budget = self._admit(budget, planned, fits, limit)

        # 3. multi-step decode.
        num_steps = 1
        if planned and all_running_scheduled and self.num_waiting() == 0 and self.config.max_decode_steps > 1:
            num_steps = self._multi_step(planned)
        if continuation and not planned:
            return None

        chunks_by_model: dict[str, list[ScheduledChunk]] = {}
        for request, n in planned:
            self._last_scheduled[request.model] = self._num_schedules
            start = request.num_computed_tokens
            token_ids = request.token_ids_between(start, start + n)
            chunks_by_model.setdefault(request.model, []).append(ScheduledChunk(
                request=request, start=start, num_tokens=n, token_ids=token_ids,
                samples=start + n == request.num_tokens, num_steps=num_steps,
                page_table=self.kv.page_table_array(request), token_slot=request.token_slot,
                device_token=token_ids == [DEVICE_TOKEN]))
        rejected, self._rejected = self._rejected + rejected, []
        return SchedulerOutput(chunks_by_model, preempted, rejected, sum(n for _, n in planned))

    def _models_with_work(self) -> set[str]:
        return {r.model for r in self._running} | {m for m, q in self._waiting.items() if q}

    def _prefill_limit(self) -> _PrefillLimit:
        """The bound on the prefill of this step (`decode_step_prefill_tokens` wins over the
        time budget, which needs the step costs)."""
        budget_s = self.config.tbt_budget_s if self._step_costs else None
        return _PrefillLimit(self.config.decode_step_prefill_tokens, budget_s, self._step_costs)

    def _model_gate(self, busy_models: frozenset, split_models: bool) -> Callable[[str], bool]:
        """fits(model): whether the model's requests may run in this step: not busy, among the
        half of the models with work that this step takes (split_models), and resident beside
        the step's other models (`_residency_gate`)."""
        resident = self._residency_gate()
        if not busy_models and not split_models:
            return resident
        with_work = self._models_with_work()
        free = sorted(with_work - set(busy_models), key=lambda m: (self._last_scheduled.get(m, 0), m))
        if split_models:
            free = free[:max(1, -(-len(with_work) // 2))]
        chosen = set(free)
        return lambda model: model in chosen and resident(model)

    def _residency_gate(self) -> Callable[[str], bool]:
        """fits(model): whether the model's requests may run in this step. Without budgets, any.
        With them, the models of this step are chosen in the residency order (`_lead`): each
        model with work joins while `fit_together` holds for the ones chosen so far. Every
        `residency_quantum` steps the leader goes to the back of the order, so each model leads
        in turn and consecutive steps keep the same resident models (no swap per step)."""
        if self._fit_together is None:
            return lambda model: True
        busy = self._models_with_work()
        for model in sorted(busy - set(self._lead)):
            self._lead.append(model)
        self._lead_steps += 1
        if self._lead_steps > self.config.residency_quantum:
            self._lead.append(self._lead.pop(0))
            self._lead_steps = 1
        chosen: set[str] = set()
        for model in self._lead:
            if model in busy and self._fit_together(chosen | {model}):
                chosen.add(model)
        return chosen.__contains__

    def _num_to_compute(self, request: Request) -> int:
        g = self.kv.geometry(request.model)
        return min(request.num_tokens, g.max_model_len) - request.num_computed_tokens

    def _competitors(self, request: Request, n: int) -> list[Request]:
        """Running requests whose pages could make room for `request`: any model's, or only its
        own model's when the model's max_pages is what binds."""
        same_model = self.kv.exceeds_quota(request, n)
        return [r for r in self._running if r is not request and (not same_model or r.model == request.model)]

    def _victim_for(self, request: Request, n: int) -> Optional[Request]:
        """The latest-arrived running request that arrived after `request` and whose pages help."""
        later = self._running[self._running.index(request) + 1:]
        helpful = set(map(id, self._competitors(request, n)))
        for victim in reversed(later):
            if id(victim) in helpful:
                return victim
        return None

    def _cannot_grow_message(self, request: Request, n: int) -> str:
        g = self.kv.geometry(request.model)
        need = request.num_computed_tokens + n
        return (f"request of model {request.model!r} at {need} tokens "
                f"({request.num_prompt_tokens} prompt + {request.num_output_tokens} output) needs "
                f"{g.num_blocks(need) * g.num_layers} pages, more than the whole KV pool can give it "
                f"{self._capacity_note(request.model)}")

    def _capacity_note(self, model: str) -> str:
        left = self.kv.quota_left(model)
        cap = "" if left is None else f", the model's max_pages {left + self.kv.pages_used_by_model()[model]}"
        device = self.kv.pinned_device(model)
        where = (f"{self.kv.allocator.num_total} pages in the pool" if device is None else
                 f"{self.kv.allocator.pages_per_device} pages on KV device {device}, where the model is placed")
        return f"(at most {self.kv.max_request_tokens(model)} tokens of this model; {where}{cap})"

    def _preempt(self, request: Request) -> None:
        self._running.remove(request)
        self._release_token_slot(request)
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self._waiting[request.model].appendleft(request)

    def _admit(self, budget: int, planned: list, fits: Callable[[str], bool], limit: _PrefillLimit) -> int:
        """Admit waiting requests by the fairness rule of the module docstring; returns the budget left.
        A model whose weights cannot be resident beside the step's models, or whose prefill room
        in this step (`limit`) is spent, waits (without barring others)."""
        barred_after: Optional[tuple[float, int]] = None
        done: set[str] = set()
        first_admitted: Optional[str] = None
        blocked_model: Optional[str] = None
        progress = True
        while progress and budget > 0 and len(self._running) < self.config.max_num_seqs:
            progress = False
            for model in list(self._turns):
                queue = self._waiting[model]
                if model in done or not queue:
                    continue
                if budget == 0 or len(self._running) >= self.config.max_num_seqs:
                    break
                request = queue[0]
                key = self._order[request.request_id]
                if (barred_after is not None and key > barred_after) or not fits(model):
                    done.add(model)
                    continue
                computed, num_cached = ([], 0)
                if self.config.enable_prefix_caching and request.sampling_params.prompt_logprobs is None:
                    # (prompt logprobs need every prompt token computed, as vLLM does it)
                    computed, num_cached = self.kv.get_computed_blocks(request)
                g = self.kv.geometry(request.model)
                n = min(min(request.num_tokens, g.max_model_len) - num_cached, budget)
                room = limit.room(model)
                if room is not None and room < n:
                    if room <= 0:
                        done.add(model)
                        continue
                    n = room
                if n <= 0 or not self.kv.allocate_slots(request, n, computed):
                    done.add(model)
                    if self.kv.exceeds_quota(request, n, computed):
                        continue        # its own model's cap binds: other models are not held up
                    if barred_after is None or key < barred_after:
                        barred_after, blocked_model = key, model
                    continue
                queue.popleft()
                if self.config.enable_prefix_caching:
                    self.prefix_cache_queries += request.num_tokens
                    self.prefix_cache_hits += num_cached
                request.num_computed_tokens = num_cached
                request.status = RequestStatus.RUNNING
                request.token_slot = self._free_token_slots.pop()
                self._insert_running(request)
                planned.append((request, n))
                budget -= n
                limit.add(model, n, False)
                progress = True
                first_admitted = first_admitted or model
        if blocked_model is not None:
            self._turns.remove(blocked_model)
            self._turns.insert(0, blocked_model)
        elif first_admitted is not None:
            self._turns.remove(first_admitted)
            self._turns.append(first_admitted)
        return budget

    def _release_token_slot(self, request: Request) -> None:
        self._free_token_slots.append(request.token_slot)
        request.token_slot = -1

    def _insert_running(self, request: Request) -> None:
        key = self._order[request.request_id]
        i = len(self._running)
        while i > 0 and self._order[self._running[i - 1].request_id] > key:
            i -= 1
        self._running.insert(i, request)

    def _multi_step(self, planned: list) -> int:
        """num_steps for an all-decode step (allocating its pages), or 1."""
        if not all(n == 1 and r.num_computed_tokens + 1 == r.num_tokens for r, n in planned):
            return 1
        if any(r.needs_host_per_token for r, _ in planned):
            return 1
        steps = self.config.max_decode_steps
        for request, _ in planned:
            g = self.kv.geometry(request.model)
            steps = min(steps, request.max_tokens - request.num_output_tokens, g.max_model_len - request.num_tokens)
        if steps <= 1 or not self.kv.can_allocate_all([(r, steps) for r, _ in planned]):
            return 1
        for request, _ in planned:
            if not self.kv.allocate_slots(request, steps):
                raise RuntimeError(f"multi-step allocation failed for {request.request_id} after can_allocate_all")
        return steps

    # ----- results -----------------------------------------------------------------------------
    def is_current(self, chunk: ScheduledChunk) -> bool:
        """Whether a scheduled chunk's results still apply: its request is unfinished, running and
        has computed exactly what it had when the chunk was scheduled (not preempted since)."""
        request = chunk.request
        return (self._requests.get(request.request_id) is request and request.status == RequestStatus.RUNNING
                and request.num_computed_tokens == chunk.start)

    def update_from_output(self, output: SchedulerOutput, sampled: dict[str, list[int]]) -> None:
        """Advance each scheduled request: its fed tokens are computed; sampled tokens are
        appended (all but the last are computed too: a multi-step decode fed them). Requests
        finished or aborted since `schedule()` are skipped. Registers newly full blocks in
        the prefix cache."""
        for chunks in output.chunks_by_model.values():
            for chunk in chunks:
                request = chunk.request
                if not self.is_current(chunk):
                    continue
                tokens = list(sampled.get(request.request_id, ()))
                if chunk.samples:
                    if not 1 <= len(tokens) <= chunk.num_steps:
                        raise ValueError(f"update_from_output: request {request.request_id!r} sampled "
                                         f"{len(tokens)} tokens in a chunk of num_steps={chunk.num_steps} "
                                         f"(expected 1..{chunk.num_steps})")
                    request.num_computed_tokens = chunk.start + chunk.num_tokens + len(tokens) - 1
                    request.output_token_ids.extend(int(t) for t in tokens)
                else:
                    if tokens:
                        raise ValueError(f"update_from_output: request {request.request_id!r} got sampled tokens "
                                         f"for a prefill chunk that does not sample")
                    request.num_computed_tokens = chunk.start + chunk.num_tokens
                if self.config.enable_prefix_caching:
                    self.kv.cache_full_blocks(request)
