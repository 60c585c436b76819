"""The CrossPool runner: the models' scheduled chunks -> disaggregated steps over the arena.

The `StepRunner.run` contract (runner.py) on the disaggregated path (crosspool_jax/disagg):
the KV pool and every model's attention side live in the KV devices' arena rows, every
model's experts in the weight devices' rows, and a jitted `disagg_step` runs all layers
across both pools. A program is compiled per architecture (`ArenaLayout.program`); where a
model's tensors sit is its data (`ArenaWeights.offsets`), so the steps of K models of one
architecture run as the K micro-batches of ONE program (`dispatch_all` groups them by
`lane_key`; `dispatch_lanes`): while the weight devices run one model's FFN for a layer, the
KV devices attend the next model's.

Per call: each chunk's global page ids (the engine's `PageAllocator`) are split into (KV
device, local page) by the one virtualizer, `disagg.pages.PageMap`, and the chunks are
grouped on their home device (`PageMap.home`: the device of the first block;
`disagg.build_disagg_inputs`; one model alone: two micro-batches when some device has two
sequences or more, else one, unless the runner fixes it; lanes: one micro-batch per model).
When every chunk's pages are on its home (the KV manager's sticky placement keeps most
requests so) the step is the common program; when some request has spilled onto other
devices (any device's pages, weight devices' too), its model's step runs alone as the
sequence-sharded program (`disagg.inputs.build_sharded_pages`: partial attention on every
device holding pages, merged by log-sum-exp). The step donates the arena; then one jitted
call per model gathers its sampled rows' logits and runs the engine's sampler
(`sampler.sample`).

A pure-decode step whose pages all sit on their homes runs `disagg_decode`: the engine's
max_decode_steps tokens in one program (one compiled trip count; lanes too), each chunk
keeping the tokens it was scheduled for; a sequence-sharded step decodes one token per
dispatch.
"""
from __future__ import annotations

import dataclasses
import functools
import threading
import time
from typing import Optional, Sequence

import jax
import numpy as np

from crosspool_jax.disagg import inputs as disagg_inputs
from crosspool_jax.disagg import pipeline as disagg_pipeline
from crosspool_jax.disagg.arena import Arena
from crosspool_jax.disagg.pages import PageMap
from crosspool_jax.runtime import sampler as sampler_lib
from crosspool_jax.runtime import sampling_metadata as smeta
from crosspool_jax.runtime.packed_arrays import PackedArrays, unpacked
from crosspool_jax.engine.runner import (DispatchedStep, DispatchingRunner, ProgramOutputs, RunnerStats, pick_rows,
                                         pick_step)
from crosspool_jax.engine.step_plan import ArenaWeights, ModelStep
from crosspool_jax.runtime.shapes import ShapeMenu


@dataclasses.dataclass
class _LocalChunk:
    """A scheduled chunk as `build_step_inputs` reads it, with its KV device's local page ids."""

    request: object
    start: int
    num_tokens: int
    token_ids: Sequence[int]
    page_table: np.ndarray        # int32 [L, blocks] page ids (local ids of the home; or global ids)


@dataclasses.dataclass
class Grouped:
    """One step's chunks grouped on their home KV devices."""

    local: list                   # [n_kv][chunks] _LocalChunk with the home's local page ids
    global_: list                 # [n_kv][chunks] the same chunks with global page ids
    where: list                   # (home device, index on it) of each chunk, in order
    sharded: bool                 # some chunk has pages off its home: the sequence-sharded program


@functools.partial(jax.jit, static_argnames=("num_logprobs", "all_greedy"))
def _sample_rows(logits_NRV, rows_S, meta, output_counts_SV, prompt_mask_SV, *, num_logprobs, all_greedy):
    """Sample the flat rows `rows_S` of the step's logits [n_kv, M*S, V] (one dispatch) -> (the
    SamplerOutput, None: no prompt scores) packed (`PackedArrays`: one buffer to fetch); meta may
    be packed too."""
    meta = unpacked(meta)
    logits_SV = logits_NRV.reshape(-1, logits_NRV.shape[-1])[rows_S]
    return PackedArrays.pack_device((sampler_lib.sample(logits_SV, meta, output_counts_SV, prompt_mask_SV,
                                                        num_logprobs=num_logprobs, all_greedy=all_greedy), None))


class DisaggRunner(DispatchingRunner):
    """Runs the models' disaggregated step programs against one `disagg.Arena`."""

    def __init__(self, arena: Arena, *, min_token_bucket: int = 16, num_microbatches: Optional[int] = None,
                 exchange: str = "p2p", attention_backend: str = "auto", moe_backend: str = "auto",
                 max_decode_steps: int = 1):
        if num_microbatches not in (None, 1, 2):
            raise ValueError(f"DisaggRunner.num_microbatches must be 1, 2 or None (auto), got {num_microbatches!r}")
        if exchange not in ("p2p", "collective"):
            raise ValueError(f"DisaggRunner.exchange must be 'p2p' or 'collective', got {exchange!r}")
        self.arena = arena
        self.min_token_bucket = min_token_bucket
        self.max_decode_steps = max_decode_steps
        self._warm_up_lock = threading.Lock()
        self._warmed: set = set()                  # (program, config, menu) whose programs have run
        self.num_microbatches = num_microbatches
        self.exchange = exchange
        self.attention_backend = attention_backend
        self.moe_backend = moe_backend
        self.page_map = PageMap(arena.layout.pages_per_device, arena.layout.n_kv, arena.layout.n_w)
        self.stats = RunnerStats()

    def group_by_device(self, model_name: str, chunks: Sequence) -> Grouped:
        """The chunks grouped on their home KV devices, and whether any spans several."""
        n_kv = self.page_map.n_kv
        grouped = Grouped([[] for _ in range(n_kv)], [[] for _ in range(n_kv)], [], False)
        for c in chunks:
            table = np.asarray(c.page_table, np.int32)
            if table.size == 0:
                raise ValueError(f"request {c.request.request_id} of model {model_name!r} holds no KV pages")
            try:
                devices, local = self.page_map.split(table)
            except ValueError as e:
                raise ValueError(f"request {c.request.request_id} of model {model_name!r}: {e}") from None
            home = self.page_map.home(table, self.arena.layout.homes(model_name))
            grouped.sharded |= bool((devices != home).any())
            grouped.where.append((home, len(grouped.local[home])))
            grouped.local[home].append(_LocalChunk(c.request, c.start, c.num_tokens, c.token_ids, local))
            grouped.global_[home].append(_LocalChunk(c.request, c.start, c.num_tokens, c.token_ids, table))
        return grouped

    def dispatch(self, step: ModelStep) -> DispatchedStep:
        """Dispatch one model's step without waiting (`collect` it): `dispatch_lanes` of one."""
        return self.dispatch_lanes([step])[0]

    def dispatch_all(self, steps: Sequence[ModelStep]) -> list[DispatchedStep]:
        """Dispatch one engine step's models: models of one architecture whose steps have one
        `lane_key` as lanes of one program (up to the menu's largest lane count a program),
        every other step alone. One DispatchedStep per step, in order."""
        grouped = [self.group_by_device(s.model, s.chunks) for s in steps]
        groups: dict = {}
        for i, (step, g) in enumerate(zip(steps, grouped)):
            key = self._lane_key(step, g)
            groups.setdefault(("alone", i) if key is None else key, []).append(i)
        out: list = [None] * len(steps)
        for members in groups.values():
            width = max(steps[members[0]].menu.lane_counts)
            for lo in range(0, len(members), width):
                part = members[lo:lo + width]
                dispatched = self._dispatch_lanes([steps[i] for i in part], [grouped[i] for i in part])
                for i, d in zip(part, dispatched):
                    out[i] = d
        return out

    def lane_key(self, step: ModelStep) -> Optional[tuple]:
        """What a step must share with others to run in one program with them as lanes (None: it
        runs alone): the architecture (`ArenaLayout.program`: where the weights sit is the
        program's data) and menu, every chunk's pages on its home (the common program), and the
        program: a pure decode of max_decode_steps tokens with one sampling variant (sampling runs
        in it), or a ragged step of the same token bucket (sampling runs after it, per lane)."""
        return self._lane_key(step, self.group_by_device(step.model, step.chunks))

    def _lane_key(self, step: ModelStep, grouped: Grouped) -> Optional[tuple]:
        """`lane_key` of a step whose chunks `group_by_device` grouped."""
        menu = step.menu
        if max(menu.lane_counts) < 2 or not step.chunks or grouped.sharded:
            return None
        program = self.arena.layout.model(step.model).program
        if self._is_decode(step):
            return (program, step.config, menu, "decode", smeta.sampling_variant(menu, step.rows),
                    smeta.needs_penalties(step.rows))
        return (program, step.config, menu, "ragged", menu.ragged(step.num_tokens, len(step.chunks),
                                                                  step.max_blocks).num_tokens)

    def _is_decode(self, step: ModelStep) -> bool:
        return (self.max_decode_steps > 1 and step.num_steps > 1
                and all(c.num_tokens == 1 for c in step.chunks))

    def dispatch_lanes(self, steps: Sequence[ModelStep]) -> list[DispatchedStep]:
        """Dispatch the steps of K models of one architecture as ONE program (K = 1: one model's
        step) without waiting; one DispatchedStep per step, in order.

        Each step's `ArenaWeights.offsets` say where its model sits (the program's data). One
        model's step splits its chunks into M micro-batches (2 when some device has two
        sequences or more, else 1, unless the runner fixes M); K >= 2 lanes (equal `lane_key`)
        are the K micro-batches, lane m's chunks micro-batch m, so the weight devices run one
        model's FFN while the KV devices attend another's. The host applies stop rules. A pure
        decode whose pages all sit on their homes runs `disagg_decode` (max_decode_steps tokens
        in one program, each chunk keeping the tokens it was scheduled for; sampling in the
        program); otherwise `disagg_step` (a sequence-sharded step when some chunk has pages off
        its home: one model only), then one sampling call per model."""
        grouped = [self.group_by_device(s.model, s.chunks) for s in steps]
        K, menu = len(steps), steps[0].menu
        if K > 1 and (K not in menu.lane_counts or len(keys := {self._lane_key(s, g) for s, g in zip(steps, grouped)})
                      != 1 or None in keys):       # the key covers the architecture and pages on their homes
            raise ValueError(f"dispatch_lanes: steps of models {[s.model for s in steps]} cannot be lanes of one "
                             f"program (lane counts {menu.lane_counts})")
        return self._dispatch_lanes(steps, grouped)

    def _dispatch_lanes(self, steps: Sequence[ModelStep], grouped: list) -> list[DispatchedStep]:
        """`dispatch_lanes` of steps that can be lanes of one program, their chunks grouped."""
        t0 = time.perf_counter()
        K, first = len(steps), steps[0]
        config, menu = first.config, first.menu
        layouts = [self.arena.layout.model(s.model) for s in steps]
        for s, lay in zip(steps, layouts):
            if s.tokens_per_page != lay.tokens_per_page:
                raise ValueError(f"model {s.model!r}: the engine's tokens_per_page {s.tokens_per_page} differs from "
                                 f"the arena's {lay.tokens_per_page}")
        program = layouts[0].program
        n_kv = program.n_kv
        if K == 1:
            g = grouped[0]
            M = self.num_microbatches or (2 if max(len(c) for c in g.local) >= 2 else 1)
            local, where, microbatches = g.local, [g.where], None
        else:
            M, local, where = K, [[] for _ in range(n_kv)], []
            microbatches = [[[] for _ in range(K)] for _ in range(n_kv)]
            for m, g in enumerate(grouped):
                lane_where = []
                for d, j in g.where:
                    microbatches[d][m].append(len(local[d]))
                    lane_where.append((d, len(local[d])))
                    local[d].append(g.local[d][j])
                where.append(lane_where)
        offsets = np.stack([s.weights.offsets for s in steps] if K > 1 else [first.weights.offsets] * M)
        inputs, logit_rows = disagg_inputs.build_disagg_inputs(
            local, layout=program, num_layers=config.num_layers, num_microbatches=M, menu=menu,
            microbatches=microbatches)
        R = inputs.logits_indices_S.shape[2] * M           # logit rows per KV device
        rows_S = []                                         # per step: its chunks' flat logit rows
        for s, lane_where in zip(steps, where):
            flat = np.zeros(menu.rows(len(s.chunks)), np.int32)
            for i, (d, j) in enumerate(lane_where):
                flat[i] = d * R + logit_rows[d][j]
            rows_S.append(flat)
        if all(self._is_decode(s) for s in steps) and not grouped[0].sharded:
            return self._dispatch_decode(steps, program, inputs, where, logit_rows, rows_S, offsets, M, R, t0)
        sharded = None
        if grouped[0].sharded:
            sharded = disagg_inputs.build_sharded_pages(
                grouped[0].global_, inputs, page_map=self.page_map, tokens_per_page=program.tokens_per_page,
                num_microbatches=M)
        self.stats.count_program((program, config, "disagg", M, inputs.token_ids_T.shape, inputs.page_indices_LSP.shape,
                                  None if sharded is None else ("sharded", sharded.pages_LSB.shape)))
        t1 = time.perf_counter()
        logits_NRV = self._step(program, config, inputs, sharded, M, offsets)
        self.stats.dispatches += 1
        out = []
        for s, flat in zip(steps, rows_S):
            variant, penalties = smeta.sampling_variant(menu, s.rows), smeta.needs_penalties(s.rows)
            S = len(flat)
            counts, prompt_mask = (smeta.build_token_history(s.rows, S, config.vocab_size,
                                                             length=menu.history(smeta.history_length(s.rows)))
                                   if penalties else (None, None))
            self.stats.count_program(("sample", S, config.vocab_size, R * n_kv, variant, penalties))
            meta = PackedArrays.pack(smeta.build_sampling_metadata(s.rows, pad_rows_to=S))
            sampled = _sample_rows(logits_NRV, flat, meta, counts, prompt_mask, num_logprobs=variant[0],
                                   all_greedy=variant[1])
            out.append(DispatchedStep(ProgramOutputs(sampled), pick_step, len(s.chunks), variant[0], t1,
                                      self.stats))
        self.stats.host_prepare_seconds += t1 - t0
        return out

    def _step(self, program, config, inputs, sharded, M: int, offsets):
        """`disagg_step` on the arena (taken and put back: the step donates it) -> logits."""
        arena = self.arena.take()
        try:
            arena, logits_NRV = disagg_pipeline.disagg_step(
                arena, PackedArrays.pack(inputs), sharded, layout=program, config=config, num_microbatches=M,
                exchange=self.exchange, attention_backend=self.attention_backend, moe_backend=self.moe_backend,
                offsets=offsets)
        finally:
            self.arena.put(arena)
        return logits_NRV

    def _decode(self, program, config, inputs, allowance_NMT, meta, history, M: int, variant, offsets):
        """`disagg_decode` of max_decode_steps tokens on the arena with sampling `variant`
        (num_logprobs, all_greedy) -> its SamplerOutput, packed."""
        counts, prompt_mask = history
        num_logprobs, all_greedy = variant
        arena = self.arena.take()
        try:
            arena, out = disagg_pipeline.disagg_decode(
                arena, PackedArrays.pack(inputs), allowance_NMT, PackedArrays.pack(meta), counts, prompt_mask,
                layout=program,
                config=config, num_microbatches=M, num_steps=self.max_decode_steps, num_logprobs=num_logprobs,
                all_greedy=all_greedy, exchange=self.exchange, attention_backend=self.attention_backend,
                moe_backend=self.moe_backend, offsets=offsets)
        finally:
            self.arena.put(arena)
        return out

    def compile_jobs(self, config, menu: ShapeMenu, weights: ArenaWeights, *, model: str) -> list:
        """The model's programs as one job (`_run_every_program`; the jobs of all models take turns
        with the arena, one at a time; models of one architecture share their programs, so the
        first one's job runs them)."""
        return [functools.partial(self._run_every_program, model, config, menu, weights)]

    def _run_every_program(self, model: str, config, menu: ShapeMenu, weights: ArenaWeights) -> int:
        """Compile (by running them on all-padding inputs: nothing is written) the programs of the
        model's architecture: `disagg_step` for one and two micro-batches and every lane count at
        every ragged shape of the menu with the sampling program of every row count, and
        `disagg_decode` at every decode shape, each with every sampling variant (logprobs,
        penalties), and, where a request can spill over devices (`_can_spill`), the
        sequence-sharded `disagg_step` for one and two micro-batches at every ragged shape.
        Returns the number of programs run (0 when another model of the architecture ran them)."""
        program = self.arena.layout.model(model).program
        with self._warm_up_lock:
            if (program, config, menu) in self._warmed:
                return 0
            self._warmed.add((program, config, menu))
            return self._run_programs(program, config, menu, weights.offsets)

    def _can_spill(self) -> bool:
        """Whether a sequence can hold pages on several devices (more than one device has pages)."""
        return sum(1 for p in self.arena.layout.device_pages if p > 0) > 1

    def _run_programs(self, program, config, menu: ShapeMenu, offsets_X) -> int:
        n_kv = program.n_kv
        variants = menu.sampling_variants()
        pen_variants = (False, True)
        empty = [[] for _ in range(n_kv)]
        done = 0

        def history(penalties, S):
            return (smeta.build_token_history([], S, config.vocab_size, length=menu.history_buckets[0])
                    if penalties else (None, None))

        for M in sorted({1, 2} | set(menu.lane_counts)):
            offsets = np.stack([offsets_X] * M)
            for shape in menu.ragged_shapes():
                inputs, _ = disagg_inputs.build_disagg_inputs(empty, layout=program, num_layers=config.num_layers,
                                                              num_microbatches=M, shape=shape)
                logits_NRV = self._step(program, config, inputs, None, M, offsets)
                done += 1
                if M <= 2 and self._can_spill():         # the sequence-sharded program: one model, M 1 or 2
                    sharded = disagg_inputs.build_sharded_pages(empty, inputs, page_map=self.page_map,
                                                                tokens_per_page=program.tokens_per_page,
                                                                num_microbatches=M)
                    jax.block_until_ready(self._step(program, config, inputs, sharded, M, offsets))
                    done += 1
                for S in menu.decode_seq_buckets:
                    sampling = PackedArrays.pack(smeta.build_sampling_metadata([], pad_rows_to=S))
                    for num_logprobs, all_greedy in variants:
                        for penalties in pen_variants:
                            jax.block_until_ready(_sample_rows(logits_NRV, np.zeros(S, np.int32), sampling,
                                                               *history(penalties, S), num_logprobs=num_logprobs,
                                                               all_greedy=all_greedy))
                            done += 1
            if self.max_decode_steps > 1:
                for dshape in menu.decode_shapes():
                    shape = menu.ragged(dshape.num_seqs, dshape.num_seqs, dshape.pages_per_seq)
                    inputs, _ = disagg_inputs.build_disagg_inputs(empty, layout=program, num_layers=config.num_layers,
                                                                  num_microbatches=M, shape=shape)
                    n_rows = n_kv * M * shape.num_seqs
                    meta = smeta.build_sampling_metadata([], pad_rows_to=n_rows)
                    for variant in variants:
                        for penalties in pen_variants:
                            jax.block_until_ready(self._decode(
                                program, config, inputs, np.zeros(inputs.token_ids_T.shape, np.int32), meta,
                                history(penalties, n_rows), M, variant, offsets))
                            done += 1
        return done

    def _dispatch_decode(self, steps, program, inputs, where, logit_rows, rows_S, offsets, M, R,
                         t0) -> list[DispatchedStep]:
        """max_decode_steps decode tokens of every step in one program (one compiled trip count);
        chunk i of a step keeps min(its allowance, the step's num_steps) of them (its pages cover
        those). Sampling runs on the KV devices, so the sampling rows go in device-row order
        (chunk i of step k at flat row rows_S[k][i], padding rows elsewhere)."""
        first = steps[0]
        config, menu = first.config, first.menu
        num_steps = self.max_decode_steps
        S_in = inputs.kv_lens_S.shape[2]
        allowance_NMT = np.zeros(inputs.token_ids_T.shape, np.int32)
        limits = [[min(a, s.num_steps) for a in s.allowances] for s in steps]
        for lane_where, lane_limits in zip(where, limits):
            for (d, j), limit in zip(lane_where, lane_limits):    # a decode chunk's one token is its sequence's row
                m, s = divmod(int(logit_rows[d][j]), S_in)
                allowance_NMT[d, m, s] = limit
        rows = [r for s in steps for r in s.rows]
        flat_rows = np.concatenate([flat[:len(s.chunks)] for s, flat in zip(steps, rows_S)])
        n_rows, n = program.n_kv * R, len(rows)
        src = np.full(n_rows, -1, np.int64)
        src[flat_rows] = np.arange(n)
        src[src < 0] = np.arange(n, n_rows)                 # the greedy padding rows
        meta = jax.tree.map(lambda a: a[src], smeta.build_sampling_metadata(rows, pad_rows_to=n_rows))
        variant, penalties = smeta.sampling_variant(menu, rows), smeta.needs_penalties(rows)
        counts, prompt_mask = (smeta.build_token_history(rows, n_rows, config.vocab_size,
                                                         length=menu.history(smeta.history_length(rows)),
                                                         row_order=src)
                               if penalties else (None, None))
        self.stats.count_program((program, config, "disagg_decode", M, num_steps, inputs.token_ids_T.shape,
                                  inputs.page_indices_LSP.shape, variant, penalties))
        t1 = time.perf_counter()
        outputs = ProgramOutputs(self._decode(program, config, inputs, allowance_NMT, meta, (counts, prompt_mask), M,
                                              variant, offsets))
        self.stats.host_prepare_seconds += t1 - t0
        self.stats.dispatches += 1
        return [DispatchedStep(outputs, functools.partial(pick_rows, flat[:len(s.chunks)]), len(s.chunks), variant[0],
                               t1, self.stats, lane_limits) for s, flat, lane_limits in zip(steps, rows_S, limits)]
