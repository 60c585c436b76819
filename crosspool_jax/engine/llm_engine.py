"""`LLMEngine`: many models, one global KV pool, one scheduler, one step loop.

How a request travels:

1. `add_request` tokenizes the prompt with the model's tokenizer (or takes token ids),
   validates it, and hands the scheduler one `Request` per completion (`n` > 1 makes
   `n` children that share the prompt's pages through the prefix cache).
2. `step` asks the scheduler for one ragged batch (`SchedulerOutput`): prefill chunks and
   decode tokens of any number of models under one token budget; pages are taken from the
   one global pool on demand, and requests are preempted (recompute) when it runs out.
3. For each model in the batch, the runner dispatches ONE jitted program that runs all
   layers (paged attention against the shared pool, MoE FFN), writes the new K/V in place
   and samples on device; a decode-only batch may produce several tokens per dispatch, and
   the decodes of models of one architecture on one device run as lanes of one program
   (`EngineConfig.max_lanes`: one dispatch for all of them). With `tbt_budget_ms` the
   scheduler sizes the prefill of a step that carries decodes from each model's step time
   per token bucket, which the engine measures on its own programs (`measure_step_costs`:
   in `warm_up`, else before the first step; `engine/step_cost.py`).
   Without a device split (`PlacedRunner`) each model is placed on one device (mode
   shared/static on several devices, or the one device) and its program runs there against
   that device's pages (the KV manager pins the model's blocks to it).
   With a crosspool device split the `DisaggRunner` runs the disaggregated step instead
   (KV pool and attention on the KV devices, experts on the weight devices; sticky page
   placement, sequence-sharded attention for a request spilled over several KV devices; one
   token per dispatch).
4. The engine detokenizes incrementally, applies stop rules (EOS, stop ids, stop strings,
   lengths), reports finished children to the scheduler (which frees their pages), gathers
   the prompt logprobs each prefill chunk scored, and returns a `RequestOutput` of every
   request that moved, as its `SamplingParams.output_kind` says: the whole output so far
   (CUMULATIVE), what is new since the last one (DELTA: the server's), or one once finished
   (FINAL_ONLY: `LLM.generate`, the batch command).

Pipelined steps (`EngineConfig.pipeline_models`): a step dispatches about half of the models
with work (those with no step in flight) and then collects and processes the previous step's
results while the device runs the new programs (`_overlapped_step`), so the host's work on one
half overlaps the device's on the other and each model advances every other step. `step()` then
returns the previous step's outputs. Weights budgets (models swapped in and out) keep steps
whole.

Async scheduling (`EngineConfig.async_scheduling`, placed modes): a step is left in flight, and
the next `step()` first dispatches its continuation (`Scheduler.schedule_continuation`: the
step `schedule()` would make once the step in flight is in: decodes whose input token the
program reads from the device's token table, where the step in flight writes its samples,
beside prompt chunks and admissions fed from the host), then collects and processes the step
in flight while the device runs the continuation (`_continue_in_flight`). The host's work of
one step overlaps the device's of the next; `step()` returns the previous step's outputs. When
no continuation can be made (a request whose sampling reads its tokens on the host, a pool
that would have to preempt, weights budgets that cannot hold every model with work), the step
in flight is finished first and `schedule()` makes the next step, which is dispatched and left
in flight. A request that stopped in the step in flight has its continuation's results dropped
(`Scheduler.is_current`).

Request isolation (`_run_isolated`): whatever one request does that still fails inside a
step fails that request alone. The step runs all its models at once; when that raises, it
runs each model alone, and a model that still raises each of its requests alone. A request
whose own run raises (or whose tokens cannot be accepted) finishes with finish_reason
"error" and `RequestOutput.error` set, its pages freed by the scheduler; the others go on.
Re-running is safe: nothing has advanced the scheduler yet, so a run whose results were
dropped is repeated from the same state and writes the same K/V again.

The engine is not thread-safe: one thread calls it (the server runs it in its own loop).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import random
import time
from typing import Optional, Sequence, Union

import jax


from crosspool_jax.engine import step_cost
from crosspool_jax.engine.config import EngineConfig
from crosspool_jax.engine.detokenizer import IncrementalDetokenizer
from crosspool_jax.engine.disagg_runner import DisaggRunner
from crosspool_jax.engine.model_registry import ModelRegistry
from crosspool_jax.engine.request import Request, RequestStatus
from crosspool_jax.engine.request_state import Completion, ParentRequest
from crosspool_jax.engine.placed_runner import PlacedRunner
from crosspool_jax.runtime import sampling_metadata as smeta
from crosspool_jax.runtime.sampling_metadata import SamplingRow
from crosspool_jax.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from crosspool_jax.engine.step_plan import ModelStep
from crosspool_jax.runtime.compiles import compile_counter
from crosspool_jax.runtime.shapes import BIASED_IDS, STOP_IDS
from crosspool_jax.weights.budget import WeightsPoolBusyError
from crosspool_jax.kv.allocator import PageAllocator
from crosspool_jax.kv.kv_cache_manager import KVCacheManager
from crosspool_jax.outputs import RequestOutput
from crosspool_jax.sampling_params import RequestOutputKind, SamplingParams

Prompt = Union[str, Sequence[int], dict]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class EngineStats:
    """A snapshot of the engine. requests_by_model: {model: (running, waiting)} sequences
    (every served model listed)."""

    num_waiting: int
    num_running: int
    num_preemptions: int
    kv_pages_total: int
    kv_pages_free: int
    kv_pages_used_by_model: dict
    models: dict
    swaps_in: int
    swaps_out: int
    compiled_programs: int
    steps: int
    dispatches: int = 0           # step programs dispatched (lanes: one program serves several model steps)
    compiles: int = 0             # XLA executables built in this process (runtime.compiles)
    compile_seconds: float = 0.0
    requests_by_model: dict = dataclasses.field(default_factory=dict)
    step_costs: dict = dataclasses.field(default_factory=dict)   # measured per model (`step_cost.describe`)
    continuations: int = 0        # async scheduling: steps dispatched before the previous step's tokens were read
    engine_steps: int = 0         # engine steps that scheduled work (steps counts the model steps run)
    prefix_cache_queries: int = 0  # prompt tokens of admitted requests (vLLM's prefix cache queries)
    prefix_cache_hits: int = 0     # of them, found computed in the prefix cache


@dataclasses.dataclass
class _InFlight:
    """A dispatched engine step whose results are not read yet (`pipeline_models`,
    `async_scheduling`): its
    scheduler output and, per model, (entry, chunks, DispatchedStep); its models stay acquired."""

    out: SchedulerOutput
    dispatched: list

    @property
    def models(self) -> frozenset:
        return frozenset(entry.name for entry, _, _ in self.dispatched)


class LLMEngine:
    """Serves every model of `config.models` from one KV pool and one scheduler."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self._compiles = compile_counter()           # process-wide; read as a difference over a window
        self.registry = ModelRegistry(config)
        kv_layout = self.registry.kv_layout
        disaggregated = self.registry.arena is not None
        allocator = PageAllocator(kv_layout.pages_per_device, kv_layout.num_devices, kv_layout.usable_pages)
        # the disaggregated step attends where a request's pages are: kept on one KV device while
        # it has room (spilling when not: that request's steps then run sequence-sharded)
        self.kv_manager = KVCacheManager(allocator, enable_prefix_caching=config.enable_prefix_caching,
                                         placement="sticky" if disaggregated else "spread")
        caps = self.registry.static_page_caps() if config.mode == "static" else {}
        for geometry in self.registry.geometries():
            self.kv_manager.register_model(geometry, max_pages=caps.get(geometry.name),
                                           device=self.registry.model_devices.get(geometry.name),
                                           homes=self.registry.model_homes.get(geometry.name))
        self.scheduler = Scheduler(
            SchedulerConfig(max_num_batched_tokens=config.max_num_batched_tokens, max_num_seqs=config.max_num_seqs,
                            max_decode_steps=config.max_decode_steps,
                            enable_prefix_caching=config.enable_prefix_caching,
                            decode_step_prefill_tokens=config.decode_step_prefill_tokens,
                            tbt_budget_s=None if config.tbt_budget_ms is None else config.tbt_budget_ms / 1e3),
            self.kv_manager, fit_together=self.registry.fit_together if self.registry.has_budgets else None)
        if disaggregated:         # multi-step decode: disagg_decode (one program per max_decode_steps tokens)
            self.runner = DisaggRunner(self.registry.arena, min_token_bucket=config.min_token_bucket,
                                       attention_backend=self.registry.attention_backend,
                                       moe_backend=self.registry.moe_backend, max_decode_steps=config.max_decode_steps)
        else:
            self.runner = PlacedRunner(self.registry.kv_pool, self.registry.model_devices,
                                       attention_backend=self.registry.attention_backend,
                                       moe_backend=self.registry.moe_backend, max_decode_steps=config.max_decode_steps,
                                       num_token_slots=config.max_num_seqs)
        self._parents: dict[str, ParentRequest] = {}
        # pipeline_models (weights budgets keep steps whole): the step dispatched last, not read yet
        self._pipelined = config.pipeline_models and not self.registry.has_budgets
        # async_scheduling: placed runners only (their programs keep the token tables)
        self._async = config.async_scheduling and not disaggregated and not self._pipelined
        self._in_flight: Optional[_InFlight] = None
        self._num_continuations = 0
        self._num_scheduled_steps = 0
        self._child_owner: dict[str, tuple[str, int]] = {}
        self._seed_rng = random.Random(config.seed)
        self.step_costs: dict[str, step_cost.ModelStepCost] = {}    # measure_step_costs
        self._wants_step_costs = config.tbt_budget_ms is not None and config.decode_step_prefill_tokens is None
        if config.tbt_budget_ms is not None and not self._wants_step_costs:
            log.warning("tbt_budget_ms is not used: decode_step_prefill_tokens = %d bounds the prefill of steps "
                        "with decodes", config.decode_step_prefill_tokens)

    @classmethod
    def from_options(cls, models: dict, **options) -> "LLMEngine":
        return cls(EngineConfig(models=dict(models), **options))

    # ----- queries -------------------------------------------------------------------
    @property
    def model_names(self) -> list[str]:
        return list(self.registry.names)

    def get_tokenizer(self, model: str):
        return self.registry.get(model).tokenizer

    def max_model_len(self, model: str) -> int:
        return self.registry.get(model).max_model_len

    def has_unfinished_requests(self) -> bool:
        return bool(self._parents)

    def stats(self) -> EngineStats:
        wstats = self.registry.weights_stats()
        by_model = {name: (0, 0) for name in self.model_names}
        by_model.update(self.scheduler.requests_by_model())
        return EngineStats(
            num_waiting=self.scheduler.num_waiting(), num_running=self.scheduler.num_running(),
            num_preemptions=self.scheduler.num_preemptions,
            kv_pages_total=self.registry.kv_layout.num_pages, kv_pages_free=self.kv_manager.num_free_pages(),
            kv_pages_used_by_model=self.kv_manager.pages_used_by_model(),
            models=self.registry.model_stats(), swaps_in=wstats.swaps_in, swaps_out=wstats.swaps_out,
            compiled_programs=self.runner.stats.compiled_programs, steps=self.runner.stats.steps,
            dispatches=self.runner.stats.dispatches,
            compiles=self._compiles.count, compile_seconds=self._compiles.seconds, requests_by_model=by_model,
            step_costs=step_cost.describe(self.step_costs, self.scheduler.config.tbt_budget_s),
            continuations=self._num_continuations, engine_steps=self._num_scheduled_steps,
            prefix_cache_queries=self.scheduler.prefix_cache_queries,
            prefix_cache_hits=self.scheduler.prefix_cache_hits)

    def warm_up(self, *, progress=None, max_workers: Optional[int] = None, variants: Optional[bool] = None) -> dict:
        """Compile every program a served step can use, before serving: for each model every
        shape of its menu (`runtime/shapes.py`) with its sampling variants (`variants` False:
        without the logprobs and prompt-logprobs ones), on `max_workers` threads (default: the
        CPU count; XLA compiles without holding the GIL). Models whose programs are the same
        (`ModelRegistry.program_key`) are lowered and compiled once, for the first of them:
        "programs" counts the distinct ones. `variants` None: True on
        accelerators, False on a CPU, where every executable costs ~300 memory mappings and a
        process may hold 65,530 (the logprobs variants then compile on first use). Returns
        {"programs": jobs run, "compiles": XLA compiles, "seconds": wall time}, and with a TBT
        budget "step_costs" (`measure_step_costs`, run after the compiles). `progress(model,
        done, total)` is called as each model's programs are ready."""
        if variants is None:
            variants = jax.devices()[0].platform != "cpu"
        t0 = time.perf_counter()
        c0 = self._compiles.count
        names = self.model_names
        jobs, seen = {}, set()
        for name in names:
            key = self.registry.program_key(name)
            jobs[name] = []
            if key in seen:         # an earlier model's jobs build this one's programs (the jit's cache holds them)
                continue
            seen.add(key)
            entry = self.registry.get(name)
            weights = self.registry.acquire(name)          # resident while lowering
            try:
                menu = (entry.menu if variants else
                        dataclasses.replace(entry.menu, logprob_variants=(0,), prompt_logprobs=False))
                jobs[name] = self.runner.compile_jobs(entry.config, menu, weights, model=name)
            finally:
                self.registry.release(name)
        workers = max_workers or os.cpu_count() or 1
        with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="warm-up") as pool:
            futures = {name: [pool.submit(job) for job in model_jobs] for name, model_jobs in jobs.items()}
            for i, name in enumerate(names):
                for future in futures[name]:
                    future.result()
                if progress is not None:
                    progress(name, i + 1, len(names))
        result = {"programs": sum(len(j) for j in jobs.values())}
        if self._wants_step_costs:
            result["step_costs"] = self.measure_step_costs()
        return {**result, "compiles": self._compiles.count - c0, "seconds": time.perf_counter() - t0}

    def measure_step_costs(self, *, repeats: int = 3) -> dict:
        """Time each model's step program at every token bucket of its menu (`engine/step_cost.py`;
        models with the same programs once) and give the costs to the scheduler, which sizes the
        prefill of steps with decodes to tbt_budget_ms with them. Returns them described
        (`step_cost.describe`; also `stats().step_costs`) and logs them."""
        self.step_costs = step_cost.measure_step_costs(self.registry, self.runner, self.kv_manager,
                                                       repeats=repeats)
        self.scheduler.set_step_costs(self.step_costs)
        described = step_cost.describe(self.step_costs, self.scheduler.config.tbt_budget_s)
        step_cost.log_costs(described, self.config.tbt_budget_ms)
        return described

    # ----- requests ------------------------------------------------------------------
    def add_request(self, request_id: str, model: str, prompt: Prompt, params: SamplingParams,
                    arrival_time: Optional[float] = None) -> None:
        """Validate and queue one request. Raises ValueError naming what is wrong; nothing is
        queued then. `step()` reports the request each step it moves as
        `params.output_kind` says (`RequestOutputKind`: cumulative, delta or final only)."""
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id must be a non-empty string, got {request_id!r}")
        if request_id in self._parents:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        params.validate()                        # fields may have been changed since construction
        entry = self.registry.get(model)
        _check_prompt(prompt)
        try:
            prompt_text, token_ids = entry.encode_prompt(prompt)
        except ValueError:
            raise
        except Exception as e:  # noqa: BLE001 - a tokenizer error is this prompt's fault alone
            raise ValueError(f"cannot tokenize the prompt for model {model!r}: {type(e).__name__}: {e}") from None
        vocab = entry.config.vocab_size
        for t in token_ids:
            if not 0 <= t < vocab:
                raise ValueError(f"prompt token id {t} is outside the vocabulary of model {model!r} "
                                 f"(size {vocab})")
        for t in params.stop_token_ids:
            if t >= vocab:
                raise ValueError(f"SamplingParams.stop_token_ids: token id {t} is outside the vocabulary "
                                 f"of model {model!r} (size {vocab})")
        bad_words_ids = self._check_logits_processors(entry, params)
        if params.truncate_prompt_tokens is not None:
            token_ids = list(token_ids)[-params.truncate_prompt_tokens:]
        for field in ("logprobs", "prompt_logprobs"):
            value = getattr(params, field)
            if value is not None and value > self.config.max_logprobs:
                raise ValueError(f"SamplingParams.{field}: {value} exceeds the engine's max_logprobs = "
                                 f"{self.config.max_logprobs}")
        if params.prompt_logprobs is not None and self.registry.arena is not None:
            raise ValueError("SamplingParams.prompt_logprobs: not supported with a crosspool device split "
                             "(kv_devices / weight_devices): its step returns the logits of sampled rows only")
        num_stop_ids = len(set(params.stop_token_ids) | (set() if params.ignore_eos else set(entry.eos_token_ids)))
        if num_stop_ids > STOP_IDS:
            raise ValueError(f"stop_token_ids: {len(params.stop_token_ids)} ids (with the model's EOS ids: "
                             f"{num_stop_ids}); at most {STOP_IDS} are supported")
        if len(token_ids) >= entry.max_model_len:
            raise ValueError(f"prompt of {len(token_ids)} tokens is too long for model {model!r}: "
                             f"max_model_len is {entry.max_model_len} (prompt + at least one new token)")
        arrival = time.monotonic() if arrival_time is None else arrival_time
        parent = ParentRequest(request_id, model, prompt_text, list(token_ids), params, [], arrival,
                         prompt_logprobs=[None] * len(token_ids) if params.prompt_logprobs is not None else None)
        base_seed = params.seed if params.seed is not None else self._seed_rng.getrandbits(31)
        for i in range(params.n):
            child_id = request_id if params.n == 1 else f"{request_id}#{i}"
            max_tokens = params.max_tokens if params.max_tokens is not None else entry.max_model_len
            max_tokens = min(max_tokens, entry.max_model_len - len(token_ids))
            request = Request(request_id=child_id, model=model, prompt_token_ids=list(token_ids),
                              sampling_params=params, arrival_time=arrival + 1e-9 * i, max_tokens=max_tokens)
            request.base_seed = (base_seed + 7919 * i) % (2 ** 31)
            request.bad_words_ids = bad_words_ids
            detok = (IncrementalDetokenizer(entry.tokenizer, list(token_ids), params.skip_special_tokens)
                     if entry.tokenizer is not None else None)
            child = Completion(request, i, detok, logprobs=[] if params.logprobs is not None else None)
            parent.children.append(child)
            self._child_owner[child_id] = (request_id, i)
        self._parents[request_id] = parent
        self.registry.prefetch(model)
        for child in parent.children:
            self.scheduler.add_request(child.request)

    def _check_logits_processors(self, entry, params: SamplingParams) -> list[list[int]]:
        """The token ids of params.bad_words, after checking logit_bias, allowed_token_ids and
        the bad words against the model (ValueError naming the field)."""
        vocab = entry.config.vocab_size
        for field, ids in (("logit_bias", params.logit_bias or {}), ("allowed_token_ids", params.allowed_token_ids or ())):
            outside = sorted(t for t in ids if t >= vocab)
            if outside:
                raise ValueError(f"SamplingParams.{field}: token id {outside[0]} is outside the vocabulary of "
                                 f"model {entry.name!r} (size {vocab})")
        bad_words_ids = entry.encode_bad_words(params.bad_words)
        for ids in bad_words_ids:
            if any(t >= vocab for t in ids):
                raise ValueError(f"SamplingParams.bad_words: the tokenizer of model {entry.name!r} gives token ids "
                                 f"outside its vocabulary (size {vocab})")
        entries = smeta.logits_table_capacity(params, bad_words_ids)
        if entries > BIASED_IDS:
            raise ValueError(f"SamplingParams.logit_bias, allowed_token_ids and bad_words together make {entries} "
                             f"biased or banned token ids; at most {BIASED_IDS} are supported per request")
        return bad_words_ids

    def abort_request(self, request_id: str) -> None:
        """Abort a request (all its completions; pages freed). A step in flight left with no
        current request is collected at once, so nothing stays acquired for it."""
        parent = self._parents.pop(request_id, None)
        if parent is None:
            return
        for child in parent.children:
            self.scheduler.abort_request(child.request.request_id)
            self._child_owner.pop(child.request.request_id, None)
        self._drain_if_stale(set())

    # ----- the step ------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One engine step: schedule, run, return the `RequestOutput`s of the requests that moved.
        With `pipeline_models` or `async_scheduling`, the step dispatches its models and returns
        the previous step's results (collected while the device runs the new programs); see
        `_overlapped_step` and `_continue_in_flight`."""
        if self._wants_step_costs and not self.step_costs:      # no warm-up measured them
            self.measure_step_costs()
        moved: set[str] = set()
        if self._async and self._in_flight is not None and self._continue_in_flight(moved):
            return self._outputs(moved)
        busy = self._in_flight.models if self._in_flight is not None else frozenset()
        out = self.scheduler.schedule(busy_models=busy, split_models=self._pipelined)
        self._note_scheduled(out, moved)
        if self._pipelined or self._async:
            self._overlapped_step(out, moved)
        else:
            self._process(out, *self._run_isolated(out.chunks_by_model), moved)
        return self._outputs(moved)

    def _note_scheduled(self, out: SchedulerOutput, moved: set) -> None:
        """A scheduled step's bookkeeping before it runs: first-scheduled times, rejections failed."""
        self._num_scheduled_steps += bool(out.chunks_by_model)
        scheduled_at = time.monotonic()
        for chunks in out.chunks_by_model.values():
            for chunk in chunks:
                parent = self._parent_of(chunk.request.request_id)
                if parent is not None and parent.first_scheduled_time is None:
                    parent.first_scheduled_time = scheduled_at
        for child_id, message in out.rejected:
            self._fail_request(child_id, message, moved)

    def _continue_in_flight(self, moved: set) -> bool:
        """Async scheduling: dispatch the continuation of the step in flight
        (`Scheduler.schedule_continuation`: the step `schedule()` would make once its results
        are in, its requests' next tokens fed from the device's token tables), then collect and
        process the step in flight while the device runs it. True when the continuation is in
        flight now; False when there was none (the step in flight is finished, and `step()`
        schedules the next one). A continuation none of whose requests is still current after
        that (all stopped or aborted) is collected at once (`_drain_if_stale`), so nothing stays
        in flight once every request is done."""
        previous, self._in_flight = self._in_flight, None
        follow = self.scheduler.schedule_continuation(previous.out)
        if follow is not None:
            self._note_scheduled(follow, moved)
            try:
                self._in_flight = self._dispatch(follow)
                self._num_continuations += 1
            except Exception:  # noqa: BLE001 - the scheduler schedules those requests again
                log.debug("dispatching a continuation failed; collecting the step in flight first", exc_info=True)
        self._finish(previous, moved)
        self._drain_if_stale(moved)
        return self._in_flight is not None

    def _drain_if_stale(self, moved: set) -> None:
        """Collect the step in flight now if none of its chunks is current any more (every
        request of it stopped or aborted): its results would be dropped, and its models stay
        acquired until it is collected."""
        flight = self._in_flight
        if flight is not None and not any(self.scheduler.is_current(c) for c in flight.out.chunks):
            self._in_flight = None
            self._finish(flight, moved)

    def _overlapped_step(self, out: SchedulerOutput, moved: set) -> None:
        """Dispatch this step's models (`_dispatch`: no result is read), then collect and process
        the previous step's (`_finish`), whose programs the device runs first: the host's work
        on them overlaps the device's on the new ones. The new step stays in flight until the
        next call. When this step cannot be dispatched beside the previous one (its weights do
        not fit beside the models in flight, or dispatching raises), the previous step is
        finished first and this one runs whole, isolated (`_run_isolated`). (Async scheduling
        comes here with nothing in flight: the step is dispatched and left in flight.)"""
        previous, self._in_flight = self._in_flight, None
        flight = None
        if out.chunks_by_model:
            try:
                flight = self._dispatch(out)
            except Exception:  # noqa: BLE001 - run it isolated below, after the previous step
                log.debug("dispatching a step beside the one in flight failed; running it whole", exc_info=True)
        if flight is None and out.chunks_by_model:
            if previous is not None:
                self._finish(previous, moved)
                previous = None
            self._process(out, *self._run_isolated(out.chunks_by_model), moved)
        self._in_flight = flight
        if previous is not None:
            self._finish(previous, moved)

    def _dispatch(self, out: SchedulerOutput) -> _InFlight:
        """Acquire the step's models and dispatch them all (nothing collected); on any error the
        models acquired here are released and the error raised."""
        prepared = []
        try:
            for model, chunks in out.chunks_by_model.items():
                prepared.append(self._prepare(model, chunks))
            dispatched = self.runner.dispatch_all([step for _, _, step in prepared])
        except BaseException:
            for entry, _, _ in prepared:
                self.registry.release(entry.name)
            raise
        return _InFlight(out, [(entry, chunks, step) for (entry, chunks, _), step in zip(prepared, dispatched)])

    def _finish(self, flight: _InFlight, moved: set) -> None:
        """Collect a dispatched step's results, release its models and process the results. A
        collect that raises reruns the step's still-current chunks whole, isolated (nothing
        advanced the scheduler for them), fed from the host and writing no token slot: a
        continuation dispatched after the step has taken its tokens from the token table and
        written its own there, which the rerun must not overwrite."""
        failed: dict[str, str] = {}
        try:
            done = self._collect(flight.dispatched)
        except Exception as error:  # noqa: BLE001 - rerun the step
            log.warning("collecting a step in flight failed (%s); running it again whole", _step_error(error))
            current = {model: [_to_rerun(c) for c in chunks if self.scheduler.is_current(c)]
                       for model, chunks in flight.out.chunks_by_model.items()}
            done, failed = self._run_isolated({model: chunks for model, chunks in current.items() if chunks})
        self._process(flight.out, done, failed, moved)

    def _process(self, out: SchedulerOutput, ran: list, failed: dict, moved: set) -> None:
        """Accept the sampled tokens of `ran` (`_run_models` results), fail `failed`, advance the
        scheduler, finish the stopped requests; `moved` gets every parent that moved."""
        for child_id, message in failed.items():
            self._fail_request(child_id, message, moved)
        sampled: dict[str, list[int]] = {}
        stopped: list[tuple[Completion, RequestStatus]] = []
        for entry, chunks, results in ran:
            for chunk, result in zip(chunks, results):
                child = self._child_of(chunk.request.request_id)
                if child is None or not self.scheduler.is_current(chunk):    # aborted, finished, preempted
                    continue
                if result.prompt_logprobs is not None:
                    self._parent_of(chunk.request.request_id).record_prompt_logprobs(result.prompt_logprobs,
                                                                                     entry.tokenizer)
                if not chunk.samples:
                    continue
                try:
                    kept, status = child.accept(entry, result.tokens)
                except Exception as e:  # noqa: BLE001 - e.g. a tokenizer that cannot decode: this request only
                    log.exception("accepting tokens of %s failed", chunk.request.request_id)
                    self._fail_request(chunk.request.request_id, _step_error(e), moved)
                    continue
                sampled[chunk.request.request_id] = kept
                if status is not None:
                    stopped.append((child, status))
                moved.add(self._child_owner[chunk.request.request_id][0])
        self.scheduler.update_from_output(out, sampled)
        for child, status in stopped:
            self.scheduler.finish_request(child.request.request_id, status)

    def _outputs(self, moved: set) -> list[RequestOutput]:
        """The `RequestOutput` of every parent in `moved` as its output kind says (FINAL_ONLY:
        once finished; DELTA: none when nothing is new); finished parents are forgotten."""
        now = time.monotonic()
        results = []
        for parent_id in moved:
            parent = self._parents.get(parent_id)
            if parent is None:
                continue
            if parent.first_token_time is None and any(c.request.output_token_ids for c in parent.children):
                parent.first_token_time = now
            if parent.params.output_kind == RequestOutputKind.FINAL_ONLY and not parent.finished:
                continue
            output = parent.output()
            if output is not None:
                results.append(output)
            if parent.finished:
                del self._parents[parent_id]
                for child in parent.children:
                    self._child_owner.pop(child.request.request_id, None)
        return results

    # ----- request isolation -----------------------------------------------------------
    def _run_isolated(self, chunks_by_model: dict) -> tuple[list[tuple], dict[str, str]]:
        """(`_run_models` results, {child id: error} of the requests that failed alone).

        All models at once; on an exception each model alone; a model that still raises,
        each of its chunks alone. Only a chunk whose own run raises is reported failed."""
        try:
            return self._run_models(chunks_by_model), {}
        except Exception:  # noqa: BLE001 - find who it belongs to below
            log.exception("a step of %d model(s) failed; running them one by one", len(chunks_by_model))
        ran: list[tuple] = []
        failed: dict[str, str] = {}
        for model, chunks in chunks_by_model.items():
            groups = [chunks]
            while groups:
                group = groups.pop()
                try:
                    ran += self._run_models({model: group})
                except Exception as e:  # noqa: BLE001
                    if len(group) > 1:
                        groups += [[chunk] for chunk in group]
                    else:
                        log.exception("request %s failed alone in its step", group[0].request_id)
                        failed[group[0].request_id] = _step_error(e)
        return ran, failed

    def _fail_request(self, child_id: str, message: str, moved: set) -> None:
        """Finish every completion of the request owning `child_id` with an error (pages freed)."""
        owner = self._child_owner.get(child_id)
        if owner is None:
            return
        parent = self._parents[owner[0]]
        parent.error = parent.error or message
        for child in parent.children:
            child.finish_reason = child.finish_reason or "error"
            self.scheduler.finish_request(child.request.request_id, RequestStatus.FINISHED_ERROR)
        moved.add(parent.request_id)

    def _parent_of(self, child_id: str) -> Optional[ParentRequest]:
        owner = self._child_owner.get(child_id)
        return None if owner is None else self._parents.get(owner[0])

    def _child_of(self, child_id: str) -> Optional[Completion]:
        owner = self._child_owner.get(child_id)
        if owner is None:
            return None
        return self._parents[owner[0]].children[owner[1]]

    def _run_models(self, chunks_by_model: dict) -> list[tuple]:
        """[(entry, chunks, sampled tokens per chunk)] of every model of the step.

        Every model is acquired (its weights pinned in their pools) and its step prepared, then
        the runner dispatches them all at once (`dispatch_all`: decodes of models of one
        architecture on one device run as lanes of one program) before any result is fetched,
        so models on different devices run at the same time and the host prepares the next
        program while the device runs the last. Each model stays acquired until its result is
        in; when the pools cannot hold the next model beside those acquired
        (WeightsPoolBusyError), the acquired ones are dispatched, collected and released first."""
        pending: list[tuple] = []                    # (entry, chunks, ModelStep): acquired, not dispatched
        done: list[tuple] = []

        def collect_all():
            steps = self.runner.dispatch_all([step for _, _, step in pending])
            dispatched = [(entry, chunks, step) for (entry, chunks, _), step in zip(pending, steps)]
            pending.clear()
            done.extend(self._collect(dispatched))

        try:
            for model, chunks in chunks_by_model.items():
                try:
                    pending.append(self._prepare(model, chunks))
                except WeightsPoolBusyError:
                    if not pending:
                        raise
                    collect_all()
                    pending.append(self._prepare(model, chunks))
            collect_all()
        finally:
            for entry, _, _ in pending:              # an error left these acquired: release them
                self.registry.release(entry.name)
        return done

    def _prepare(self, model: str, chunks: list) -> tuple:
        """(entry, chunks, ModelStep): the model acquired (its weights pinned) and its step built;
        nothing stays acquired when it raises (WeightsPoolBusyError: the pools cannot hold it
        beside the models acquired now)."""
        entry = self.registry.get(model)
        weights = self.registry.acquire(model)
        try:
            return entry, chunks, self._model_step(entry, weights, chunks)
        except BaseException:
            self.registry.release(model)
            raise

    def _collect(self, dispatched: list) -> list[tuple]:
        """[(entry, chunks, results)] of dispatched [(entry, chunks, DispatchedStep)], in order;
        every model is released, also when a collect raises (the error is raised after)."""
        done = []
        try:
            for entry, chunks, step in dispatched:
                done.append((entry, chunks, self.runner.collect(step)))
        finally:
            for entry, _, _ in dispatched:
                self.registry.release(entry.name)
        return done

    def _model_step(self, entry, weights, chunks) -> ModelStep:
        rows, stop_ids, allowances = [], [], []
        for chunk in chunks:
            req = chunk.request
            params = req.sampling_params
            produced = chunk.num_outputs_before      # a continuation counts the tokens in flight
            rows.append(SamplingRow(params=params, base_seed=req.base_seed,
                                    output_index=produced, eos_token_ids=entry.eos_token_ids,
                                    prompt_token_ids=req.prompt_token_ids, output_token_ids=req.output_token_ids,
                                    bad_words_ids=req.bad_words_ids))
            ids = list(params.stop_token_ids) + ([] if params.ignore_eos else list(entry.eos_token_ids))
            stop_ids.append(ids)
            allowances.append(max(1, req.max_tokens - produced))
        return ModelStep(entry.name, entry.config, entry.tokens_per_page, entry.menu, weights,
                         chunks, rows, stop_ids, allowances, num_steps=chunks[0].num_steps)

def _to_rerun(chunk):
    """A chunk of a step whose collect failed, to run again: fed from the host (the token a
    continuation read from the device is on the host once the step before it was processed)
    and writing no token slot (a continuation dispatched after the step has read the table and
    written its own tokens there, which the rerun must not overwrite)."""
    if chunk.device_token:
        if chunk.start >= chunk.request.num_tokens:
            raise RuntimeError(f"rerun of {chunk.request_id}: its token at {chunk.start} is not on the host")
        chunk = dataclasses.replace(chunk, token_ids=chunk.request.token_ids_between(chunk.start, chunk.start + 1),
                                    device_token=False)
    return dataclasses.replace(chunk, token_slot=-1)


def _step_error(e: Exception) -> str:
    return f"request failed in the engine step: {type(e).__name__}: {e}"


def _check_prompt(prompt) -> None:
    """A prompt's type and text, before any tokenizer sees it (ValueError naming the problem)."""
    if isinstance(prompt, dict):
        keys = set(prompt) & {"prompt", "prompt_token_ids"}
        if not keys:
            raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        prompt = prompt["prompt_token_ids"] if "prompt_token_ids" in keys else prompt["prompt"]
    if isinstance(prompt, str):
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"prompt is not valid Unicode text: {e.reason} at position {e.start}") from None
        return
    if isinstance(prompt, (list, tuple)):
        for t in prompt:
            if not isinstance(t, int) or isinstance(t, bool):
                raise ValueError(f"prompt token ids must be integers, got {_short(t)}")
        return
    raise ValueError(f"prompt must be a string, a list of token ids or a dict with 'prompt' or "
                     f"'prompt_token_ids', got {type(prompt).__name__}")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
