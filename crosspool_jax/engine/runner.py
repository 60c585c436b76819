"""The runner: turns a model's scheduled chunks into a dispatched step program on one device.

It builds the device inputs (`runtime/step_inputs.py`, `runtime/sampling_metadata.py`) padded
to an entry of the model's shape menu (`runtime/shapes.py`), picks the program (`ragged_step`
for mixed prefill/decode batches, `multi_decode` when every chunk is a decode that may run
several tokens), dispatches it with the pool's buffers donated, and returns the sampled tokens
per request. The pure decodes of several models of one architecture go out as lanes of one
`multi_decode` (`dispatch_lanes`: one program, one dispatch). It counts the distinct programs
it ran and the programs it dispatched; `compile_jobs` compiles every program of a menu ahead,
so that serving compiles nothing.

A `StepRunner` serves one KV device of the pool (`device_index`): its chunks' page tables
hold that device's local page ids (`placed_runner.PlacedRunner` maps the engine's global ids
and picks the device of each model). It also owns that device's token table (int32
[num_token_slots], donated through every program like the K/V buffers): each program writes
the tokens it samples into their requests' slots, and a chunk made before its request's last
token reached the host (`ScheduledChunk.device_token`) is fed from there.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, Optional, Sequence

import jax
import numpy as np

from crosspool_jax.engine.step_plan import ModelStep, PlacedWeights
from crosspool_jax.kv.pool import KVPool
from crosspool_jax.runtime import sampling_metadata as smeta
from crosspool_jax.runtime.packed_arrays import PackedArrays
from crosspool_jax.runtime.shapes import MIN_HISTORY, STOP_IDS, DecodeShape, ShapeMenu, StepShape
from crosspool_jax.runtime.step_inputs import build_prompt_targets, build_step_inputs, build_token_slots
from crosspool_jax.runtime.step_program import DecodeLane, multi_decode, ragged_step


@dataclasses.dataclass
class SampledToken:
    token_id: int
    logprob: float
    rank: int                      # its rank under the raw logits (1 = most likely)
    top: list[tuple[int, float]]   # (token_id, logprob) of the top tokens, when asked


@dataclasses.dataclass
class PromptLogprobs:
    """Raw log-probabilities of the prompt tokens at positions first_position ..
    first_position + n - 1, each given the tokens before it; X = the program's num_logprobs."""

    first_position: int
    logprob: np.ndarray            # f32 [n]
    rank: np.ndarray               # i32 [n]
    top_ids: np.ndarray            # i32 [n, X]
    top_logprobs: np.ndarray       # f32 [n, X]


@dataclasses.dataclass
class ChunkResult:
    """What a step produced for one chunk: its sampled tokens (one for a ragged step, up to
    num_steps for a multi-step decode; meaningless for a chunk that does not sample) and, for a
    request with prompt_logprobs, the scores of the prompt tokens its tokens predict."""

    tokens: list[SampledToken]
    prompt_logprobs: Optional[PromptLogprobs] = None


@dataclasses.dataclass
class RunnerStats:
    """Counters of a runner; compiled_programs counts distinct (model, program, shape, flags[, device])
    keys; steps counts the model steps collected, dispatches the step programs dispatched (a
    program of K lanes serves K model steps); device_seconds the time some collected step was
    between its dispatch and its results on the host (steps in flight at once, as lanes or
    with async scheduling, count their overlap once)."""

    compiled_programs: int = 0
    steps: int = 0
    dispatches: int = 0
    decode_tokens_per_dispatch_max: int = 0
    host_prepare_seconds: float = 0.0
    device_seconds: float = 0.0
    _program_keys: set = dataclasses.field(default_factory=set, repr=False)
    _counted_until: float = dataclasses.field(default=0.0, repr=False)

    def count_program(self, key) -> None:
        self._program_keys.add(key)
        self.compiled_programs = len(self._program_keys)

    def count_device_time(self, dispatched_at: float, done_at: float) -> None:
        """A step in flight from dispatched_at to done_at (perf_counter seconds): the part of it
        not counted yet joins device_seconds."""
        self.device_seconds += max(0.0, done_at - max(dispatched_at, self._counted_until))
        self._counted_until = max(self._counted_until, done_at)


class DispatchingRunner:
    """What every runner shares: `run` = `collect(dispatch(step))`, `dispatch_all` = each
    step's `dispatch`. Subclasses define `dispatch` (prepare inputs, dispatch the step program,
    return a `DispatchedStep` without waiting), may define `dispatch_all` (one engine step's
    models at once: programs over several models) and define `compile_jobs` (one callable per
    program of a model's shape menu, compiling it ahead)."""

    def dispatch_all(self, steps: Sequence[ModelStep]) -> list["DispatchedStep"]:
        """Dispatch every model's step of one engine step; one DispatchedStep per step, in order."""
        return [self.dispatch(step) for step in steps]

    def run(self, step: ModelStep) -> list[ChunkResult]:
        """Run one model's step. Returns, per chunk, its `ChunkResult`."""
        return self.collect(self.dispatch(step))

    def collect(self, step: "DispatchedStep") -> list[ChunkResult]:
        """Wait for a dispatched step; per chunk, its `ChunkResult`."""
        return collect_sampled(step)


class StepRunner(DispatchingRunner):
    """Runs step programs of many models against the pages of one KV device of the pool
    (page tables in this device's local ids)."""

    def __init__(self, pool: KVPool, *, attention_backend: str, moe_backend: str, max_decode_steps: int = 1,
                 device_index: int = 0, num_token_slots: int = 1):
        if not 0 <= device_index < pool.layout.num_devices:
            raise ValueError(f"StepRunner.device_index must be in [0, {pool.layout.num_devices}), "
                             f"got {device_index!r}")
        if not isinstance(num_token_slots, int) or num_token_slots < 1:
            raise ValueError(f"StepRunner.num_token_slots must be an integer >= 1, got {num_token_slots!r}")
        self.pool = pool
        self.device_index = device_index
        self.max_decode_steps = max_decode_steps
        self.attention_backend = attention_backend
        self.moe_backend = moe_backend
        self.stats = RunnerStats()
        self._zero_history: dict = {}
        self._token_table = jax.device_put(np.zeros(num_token_slots, np.int32), self.device)

    @property
    def device(self) -> jax.Device:
        """The KV device whose pages (and program) this runner serves."""
        return self.pool.devices[self.device_index]

    def dispatch(self, step: ModelStep) -> "DispatchedStep":
        """Prepare the inputs and dispatch the step program without waiting for it: the engine
        dispatches every model of a step, then collects (devices and host work overlap).

        The program's shape is the smallest entry of the model's shape menu that fits; a
        multi-step decode always runs the engine's max_decode_steps iterations (one compiled
        trip count), each row stopping at its allowance (the pages of the scheduled steps).
        A ragged step with a chunk of a request asking prompt_logprobs runs the prompt-logprobs
        variant (with the menu's largest num_logprobs)."""
        t0 = time.perf_counter()
        menu = step.menu
        if step.num_steps == 1:
            shape = menu.ragged(step.num_tokens, len(step.chunks), step.max_blocks)
        else:
            shape = menu.decode(len(step.chunks), step.max_blocks)
        prepared = self._prepare(step, shape)
        t1 = time.perf_counter()
        self.stats.count_program((step.model, type(shape).__name__, shape, prepared.variant,
                                  prepared.targets is not None, self.device_index))
        if isinstance(shape, DecodeShape):
            [packed] = self._run(multi_decode, (PackedArrays.pack((self._lane(step.weights, prepared),)),), (), dict(
                self._static(step.config, prepared.variant), num_steps=self.max_decode_steps))
            self.stats.host_prepare_seconds += t1 - t0
            return DispatchedStep(ProgramOutputs(packed), functools.partial(pick_lane, 0), len(step.chunks),
                                  prepared.variant[0], t1, self.stats, prepared.limits)
        w = step.weights
        [packed] = self._run(ragged_step, (w.kv_params, w.ffn_params),
                             (prepared.inputs, PackedArrays.pack(prepared.sampling), *prepared.history,
                              prepared.targets), self._static(step.config, prepared.variant))
        self.stats.host_prepare_seconds += t1 - t0
        return DispatchedStep(ProgramOutputs(packed), pick_step, len(step.chunks), prepared.variant[0], t1,
                              self.stats, prompt_spans=prepared.spans)

    def lane_key(self, step: ModelStep) -> Optional[tuple]:
        """What a step must share with others to run in one `multi_decode` with them as lanes
        (None: it runs alone): a pure decode (every chunk one sampled token) of one token or of
        the engine's max_decode_steps (the lane programs' two trip counts), without logprobs, on
        a menu with lanes. Steps with equal keys (same architecture, menu, sampling variant and
        trip count) are lanes of one program (`dispatch_lanes`)."""
        menu = step.menu
        if max(menu.lane_counts) < 2 or not step.chunks or step.num_steps not in (1, self.max_decode_steps):
            return None
        if not all(c.num_tokens == 1 and c.samples for c in step.chunks):
            return None
        variant = smeta.sampling_variant(menu, step.rows)
        if variant[0]:
            return None
        return (step.config, menu, variant, step.num_steps)

    def dispatch_lanes(self, steps: Sequence[ModelStep]) -> list["DispatchedStep"]:
        """Dispatch the decodes of len(steps) models with one `lane_key` as lanes of ONE
        `multi_decode` (one host dispatch, one program for all; trip count: the steps'
        num_steps), each padded to the lanes' common decode shape. Returns one DispatchedStep
        per model, in order."""
        t0 = time.perf_counter()
        K = len(steps)
        first = steps[0]
        menu, config, key = first.menu, first.config, self.lane_key(first)
        if key is None or K not in menu.lane_counts or any(self.lane_key(s) != key for s in steps):
            raise ValueError(f"dispatch_lanes: {K} steps of models {[s.model for s in steps]} cannot be lanes of "
                             f"one program (lane counts {menu.lane_counts})")
        shape = menu.decode(max(len(s.chunks) for s in steps), max(s.max_blocks for s in steps))
        prepared = [self._prepare(s, shape) for s in steps]
        variant, num_steps = key[2], key[3]
        t1 = time.perf_counter()
        self.stats.count_program((tuple(s.model for s in steps), "lanes", shape, variant, num_steps, self.device_index))
        lanes = PackedArrays.pack(tuple(self._lane(s.weights, p) for s, p in zip(steps, prepared)))
        [packed] = self._run(multi_decode, (lanes,), (), dict(self._static(config, variant), num_steps=num_steps))
        self.stats.host_prepare_seconds += t1 - t0
        outputs = ProgramOutputs(packed)
        return [DispatchedStep(outputs, functools.partial(pick_lane, k), len(s.chunks), 0, t1, self.stats, p.limits)
                for k, (s, p) in enumerate(zip(steps, prepared))]

    def _prepare(self, step: ModelStep, shape) -> "_Prepared":
        """The host inputs of `step` padded to `shape` (numpy: see `_run`)."""
        rows, menu = step.rows, step.menu
        chunks = step.chunks
        S = shape.num_seqs
        targets, spans = None, None
        if isinstance(shape, StepShape):
            targets, spans = build_prompt_targets(chunks, shape.num_tokens)
        if targets is not None:                 # prompt logprobs: the general sampling program, top tokens
            variant = (menu.logprob_variants[-1], False)
        else:
            variant = smeta.sampling_variant(menu, rows)
        sampling = smeta.build_sampling_metadata(rows, pad_rows_to=S)
        if smeta.needs_penalties(rows):
            with jax.default_device(self.device):
                history = smeta.build_token_history(rows, S, step.config.vocab_size,
                                                    length=menu.history(smeta.history_length(rows)))
        else:
            history = self._no_history(S, step.config.vocab_size)
        limits = None
        if isinstance(shape, StepShape):
            inputs, _ = build_step_inputs(chunks, shape=shape, num_layers=step.config.num_layers,
                                          tokens_per_page=step.tokens_per_page,
                                          num_pages=self.pool.layout.pages_per_device)
            inputs = PackedArrays.pack((inputs, build_token_slots(chunks, shape.num_tokens, S)))
        else:
            limits = [min(a, step.num_steps) for a in step.allowances]
            inputs = _decode_args(step.config, chunks, shape, step.stop_ids, limits)
        return _Prepared(variant, inputs, sampling, history, targets, spans, limits)

    def _static(self, config, variant) -> dict:
        num_logprobs, all_greedy = variant
        return dict(config=config, num_logprobs=num_logprobs, all_greedy=all_greedy,
                    attention_backend=self.attention_backend, moe_backend=self.moe_backend)

    @staticmethod
    def _lane(weights: PlacedWeights, prepared: "_Prepared") -> DecodeLane:
        token_ids, kv_lens, pages, num_seqs, stops, allowance, read_slots, write_slots = prepared.inputs
        counts, prompt_mask = prepared.history
        return DecodeLane(weights.kv_params, weights.ffn_params, token_ids, kv_lens, pages, num_seqs,
                          prepared.sampling, counts, prompt_mask, stops, allowance, read_slots, write_slots)

    def _run(self, program, before, after, static) -> list:
        """program(*before, k_buf, v_buf, token_table, *after, **static) with this device's K/V
        buffers and token table donated, the results put back; returns the program's other outputs."""
        # numpy inputs go to the jitted program as they are: its C++ dispatch moves them to
        # the device of the committed arguments, ~5x cheaper than jax.device_put
        k_buf, v_buf = self.pool.take(self.device_index)
        table, self._token_table = self._token_table, None
        self.stats.dispatches += 1
        try:
            k_buf, v_buf, table, *outs = program(*before, k_buf, v_buf, table, *after, **static)
        finally:
            self.pool.put(k_buf, v_buf, self.device_index)
            self._token_table = table
        return outs

    def _no_history(self, S: int, vocab_size: int):
        """The token history of rows without penalties (zeros), kept on this device per shape."""
        key = (S, vocab_size)
        if key not in self._zero_history:
            with jax.default_device(self.device):
                self._zero_history[key] = smeta.build_token_history([], S, vocab_size, length=MIN_HISTORY)
        return self._zero_history[key]

    def compile_jobs(self, config, menu: ShapeMenu, weights: PlacedWeights, *, model: str = "") -> list:
        """One callable per program a step of this model can run here (every shape of `menu`,
        multi-step decodes when the engine decodes several tokens per dispatch, every sampling
        variant of the menu, the ragged shapes' prompt-logprobs variant when the menu has it,
        the lane programs of `menu.lane_counts` (every decode shape, the variants without
        logprobs, trip counts 1 and max_decode_steps; lowered with this model's weights in
        every lane: a program depends on the weights' shapes only) and the token-history programs of penalties), each compiling its
        program ahead of time (`lower(...).compile()` fills the jit's cache: serving then
        compiles nothing). The callables may run in parallel threads."""
        k_buf, v_buf = self.pool.take(self.device_index)       # references for lowering: nothing is run
        self.pool.put(k_buf, v_buf, self.device_index)
        table = self._token_table
        jobs = []

        def add(program, args, static):
            jobs.append(functools.partial(_compile, program, args, static))

        for shape in menu.ragged_shapes():
            S = shape.num_seqs
            inputs, _ = build_step_inputs([], shape=shape, num_layers=config.num_layers, tokens_per_page=1,
                                          num_pages=self.pool.layout.pages_per_device)
            inputs = PackedArrays.pack((inputs, build_token_slots([], shape.num_tokens, S)))
            fixed = (weights.kv_params, weights.ffn_params, k_buf, v_buf, table, inputs,
                     PackedArrays.pack(smeta.build_sampling_metadata([], pad_rows_to=S)),
                     *self._no_history(S, config.vocab_size))
            variants = [(variant, None) for variant in menu.sampling_variants()]
            if menu.prompt_logprobs:
                variants.append(((menu.logprob_variants[-1], False), np.full(shape.num_tokens, -1, np.int32)))
            for variant, targets in variants:
                add(ragged_step, fixed + (targets,), self._static(config, variant))
        trips = sorted({1, self.max_decode_steps})
        decodes = [(1, v, self.max_decode_steps) for v in menu.sampling_variants()] if self.max_decode_steps > 1 else []
        decodes += [(K, v, n) for K in menu.lane_counts if K > 1 for v in menu.lane_variants() for n in trips]
        for shape in menu.decode_shapes() if decodes else ():
            S = shape.num_seqs
            prepared = _Prepared(None, _decode_args(config, [], shape, [], []),
                                 smeta.build_sampling_metadata([], pad_rows_to=S),
                                 self._no_history(S, config.vocab_size), None, None, None)
            lane = self._lane(weights, prepared)
            for K, variant, num_steps in decodes:
                add(multi_decode, (PackedArrays.pack((lane,) * K), k_buf, v_buf, table),
                    dict(self._static(config, variant), num_steps=num_steps))
        device = self.device
        for S in menu.sampling_rows():
            for length in menu.history_buckets:
                jobs.append(functools.partial(smeta.compile_token_history, S, config.vocab_size, length, device))
        return jobs


@dataclasses.dataclass
class _Prepared:
    """One model's host inputs of a step (`StepRunner._prepare`): its sampling variant
    (num_logprobs, all_greedy), the program inputs (a PackedArrays for ragged_step, the
    `_decode_args` tuple for multi_decode), sampling metadata, token history (counts, prompt
    mask), prompt-logprobs targets and spans (or None), and the decode's per-chunk limits."""

    variant: Optional[tuple]
    inputs: object
    sampling: object
    history: tuple
    targets: Optional[np.ndarray]
    spans: Optional[list]
    limits: Optional[list]


def _compile(program, args, static) -> None:
    program.lower(*args, **static).compile()


def _decode_args(config, chunks, shape: DecodeShape, stop_ids, allowances):
    """multi_decode's host inputs (numpy: see StepRunner.dispatch) for single-token decode chunks:
    the `DecodeLane` fields from token_ids_S to write_slot_S, weights and sampling aside."""
    L = config.num_layers
    S, Pp = shape.num_seqs, shape.pages_per_seq
    token_ids = np.zeros(S, np.int32)
    kv_lens = np.ones(S, np.int32)
    pages = np.zeros((L, S, Pp), np.int32)
    stops = np.full((S, STOP_IDS), -1, np.int32)
    allowance = np.ones(S, np.int32)
    for s, c in enumerate(chunks):
        if c.num_tokens != 1:
            raise ValueError("multi-step decode needs single-token decode chunks")
        token_ids[s] = c.token_ids[0]
        kv_lens[s] = c.start + 1
        table = np.asarray(c.page_table, np.int32)
        pages[:, s, :table.shape[1]] = table
        ids = list(stop_ids[s])[:STOP_IDS]          # the host applies every stop rule; these end the loop's rows
        stops[s, :len(ids)] = ids
        allowance[s] = allowances[s]
    slots = build_token_slots(chunks, S, S)
    return token_ids, kv_lens, pages, np.array([len(chunks)], np.int32), stops, allowance, slots.read_T, slots.write_S


class ProgramOutputs:
    """A dispatched program's outputs, packed (`PackedArrays`: one device buffer, however many
    models and fields it holds). Its device-to-host copy starts at once and runs when the
    program finishes; `host()` fetches it once (every model step of the program shares it)."""

    def __init__(self, packed: PackedArrays):
        self._packed = packed
        packed.data.copy_to_host_async()
        self._host = None

    def block_until_ready(self) -> None:
        """Wait for the program (its outputs computed), without fetching them."""
        jax.block_until_ready(self._packed)

    def host(self):
        """The program's outputs as numpy (the pytree it packed); waits for the program."""
        if self._host is None:
            self._host = jax.device_get(self._packed).unpack()
        return self._host


def pick_step(host) -> tuple:
    """A ragged step's (SamplerOutput [S, ...], TokenScores or None) -> (outputs [1, S, ...], scores)."""
    outs, scores = host
    return jax.tree.map(lambda a: a[None], outs), scores


def pick_lane(lane: int, host) -> tuple:
    """Lane `lane` of a multi-step decode's per-lane SamplerOutputs [steps, S, ...]."""
    return host[lane], None


def pick_rows(rows_S: np.ndarray, host) -> tuple:
    """The flat rows rows_S (device d's row r is d * R + r) of SamplerOutput leaves [n_kv, steps, R, ...]
    -> [steps, S, ...]."""
    def pick(a):
        n_kv, steps, R = a.shape[:3]
        return np.moveaxis(a, 1, 0).reshape(steps, n_kv * R, *a.shape[3:])[:, rows_S]
    return jax.tree.map(pick, host), None


@dataclasses.dataclass
class DispatchedStep:
    """One model's step in flight: its program's `ProgramOutputs` (shared by the lanes of one
    program) and `pick`, which takes this step's part of the program's host outputs:
    (SamplerOutput [steps, S, ...], TokenScores [T, ...] of the prompt-logprobs variant or
    None). Chunk i keeps at most limits[i] of the steps' tokens (None: all). prompt_spans: each
    chunk's span from `build_prompt_targets` when the program scored the prompt."""

    outputs: ProgramOutputs
    pick: Callable
    num_chunks: int
    num_logprobs: int
    dispatched_at: float          # perf_counter when the program was dispatched
    stats: RunnerStats            # of the runner that dispatched it: counted when collected
    limits: Optional[Sequence[int]] = None
    prompt_spans: Optional[list] = None


def collect_sampled(step: DispatchedStep) -> list[ChunkResult]:
    """Fetch a dispatched step's results to the host and count it in its runner's stats."""
    stats = step.stats
    outs, scores = step.pick(step.outputs.host())
    prompt = [None] * step.num_chunks
    if scores is not None:
        prompt = [None if span is None else PromptLogprobs(
            span[1], *(a[span[0]:span[0] + span[2]] for a in
                       (scores.logprob_T, scores.rank_T, scores.top_ids_TX, scores.top_logprobs_TX)))
            for span in step.prompt_spans]
    steps_run = outs.token_ids_S.shape[0]
    stats.steps += 1
    stats.count_device_time(step.dispatched_at, time.perf_counter())
    stats.decode_tokens_per_dispatch_max = max(stats.decode_tokens_per_dispatch_max, steps_run)
    tokens = unpack_sampled(outs, steps_run, step.num_chunks, step.num_logprobs, step.limits)
    return [ChunkResult(t, p) for t, p in zip(tokens, prompt)]


def unpack_sampled(outs, steps_run: int, num_chunks: int, num_logprobs: int,
                   limits: Optional[Sequence[int]] = None) -> list[list[SampledToken]]:
    """Host copies of stacked SamplerOutputs [steps, S, ...] -> per chunk, its sampled tokens
    (chunk s: at most limits[s])."""
    tokens = np.asarray(outs.token_ids_S)
    logprobs = np.asarray(outs.logprob_S)
    ranks = np.asarray(outs.rank_S)
    top_ids = np.asarray(outs.top_ids_SX) if num_logprobs else None
    top_lps = np.asarray(outs.top_logprobs_SX) if num_logprobs else None
    result = []
    for s in range(num_chunks):
        seq = []
        for j in range(steps_run if limits is None else min(steps_run, limits[s])):
            top = ([(int(i), float(p)) for i, p in zip(top_ids[j, s], top_lps[j, s])] if num_logprobs else [])
            seq.append(SampledToken(int(tokens[j, s]), float(logprobs[j, s]), int(ranks[j, s]), top))
        result.append(seq)
    return result
