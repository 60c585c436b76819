"""The CrossPool runner: one model's scheduled chunks -> one disaggregated step over the arena.

The `StepRunner.run` contract (runner.py) on the disaggregated path (crosspool_jax/disagg):
the KV pool and every model's attention side live in the KV devices' arena rows, every
model's experts in the weight devices' rows, and one jitted `disagg_step` per model (its
config static) runs all layers across both pools.

Per call: each chunk's global page ids (the engine's `PageAllocator`) are split into (KV
device, local page) by the one virtualizer, `disagg.pages.PageMap`, and the chunks are
grouped on their home device (`PageMap.home`: the device of the first block;
`disagg.build_disagg_inputs`; two micro-batches when some device has two sequences or more,
else one, unless the runner fixes it). When every chunk's pages are on its home (the KV
manager's sticky placement keeps most requests so) the step is the common program; when
some request has spilled onto other devices (any device's pages, weight devices' too), the
same step runs the sequence-sharded program (`disagg.inputs.build_sharded_pages`: partial attention on every device holding
pages, merged by log-sum-exp). The step donates the arena; then ONE jitted call gathers the
sampled rows' logits and runs the engine's sampler (`sampler.sample`).

A pure-decode step whose pages all sit on their homes runs `disagg_decode`: the engine's
max_decode_steps tokens in one program (one compiled trip count), each chunk keeping the
tokens it was scheduled for; a sequence-sharded step decodes one token per dispatch.
"""
from __future__ import annotations

import dataclasses
import functools
import threading
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from crosspool_jax.disagg import inputs as disagg_inputs
from crosspool_jax.disagg import pipeline as disagg_pipeline
from crosspool_jax.disagg.arena import Arena
from crosspool_jax.disagg.pages import PageMap
from crosspool_jax.runtime import sampler as sampler_lib
from crosspool_jax.runtime import sampling_metadata as smeta
from crosspool_jax.runtime.packed_inputs import PackedInt32
from crosspool_jax.engine.runner import DispatchedStep, DispatchingRunner, RunnerStats
from crosspool_jax.engine.step_plan import ArenaWeights, ModelStep
from crosspool_jax.runtime.shapes import ShapeMenu
from crosspool_jax.runtime.step_inputs import MIN_PAGES_BUCKET


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
    """Sample the flat rows `rows_S` of the step's logits [n_kv, M*S, V] (one dispatch)."""
    logits_SV = logits_NRV.reshape(-1, logits_NRV.shape[-1])[rows_S]
    return sampler_lib.sample(logits_SV, meta, output_counts_SV, prompt_mask_SV, num_logprobs=num_logprobs,
                              all_greedy=all_greedy)


@jax.jit
def _steps_of_rows(out, rows_S):
    """SamplerOutput leaves [n_kv, steps, R, ...] -> [steps, S, ...] of the flat rows rows_S."""
    def pick(a):
        n_kv, steps, R = a.shape[:3]
        flat = jnp.moveaxis(a, 1, 0).reshape(steps, n_kv * R, *a.shape[3:])
        return flat[:, rows_S]
    return jax.tree.map(pick, out)


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
        """Dispatch one model's step without waiting (`collect` it).

        step.weights is the model's `ArenaWeights` (its slot shifts; the weights are in the
        arena); the host applies stop rules. num_steps > 1 on a pure-decode batch whose pages
        all sit on their home devices runs `disagg_decode` (num_steps tokens in one program);
        otherwise one token (a sequence-sharded step decodes one token at a time)."""
        t0 = time.perf_counter()
        model_name, config, chunks, rows = step.model, step.config, step.chunks, step.rows
        tokens_per_page, num_steps, kv_params = step.tokens_per_page, step.num_steps, step.weights.bases
        layout = self.arena.layout.model(model_name)
        if tokens_per_page != layout.tokens_per_page:
            raise ValueError(f"model {model_name!r}: the engine's tokens_per_page {tokens_per_page} differs from "
                             f"the arena's {layout.tokens_per_page}")
        grouped = self.group_by_device(model_name, chunks)
        M = self.num_microbatches or (2 if max(len(c) for c in grouped.local) >= 2 else 1)
        inputs, logit_rows = disagg_inputs.build_disagg_inputs(
            grouped.local, layout=layout, num_layers=config.num_layers, num_microbatches=M, menu=step.menu)
        sharded = None
        if grouped.sharded:
            sharded = disagg_inputs.build_sharded_pages(
                grouped.global_, inputs, page_map=self.page_map, tokens_per_page=layout.tokens_per_page,
                num_microbatches=M, min_blocks=MIN_PAGES_BUCKET)
        R = inputs.logits_indices_S.shape[2] * M           # logit rows per KV device
        S = step.menu.rows(len(chunks))
        rows_S = np.zeros(S, np.int32)
        for i, (d, j) in enumerate(grouped.where):
            rows_S[i] = d * R + logit_rows[d][j]
        variant = smeta.sampling_variant(step.menu, rows)
        num_logprobs = variant[0]
        penalties = smeta.needs_penalties(rows)
        history_len = step.menu.history(smeta.history_length(rows))
        if num_steps > 1 and sharded is None and all(c.num_tokens == 1 for c in chunks):
            limits = [min(a, num_steps) for a in step.allowances]
            return self._dispatch_decode(model_name, config, kv_params, layout, inputs, grouped, logit_rows, rows_S,
                                         rows, limits, M, R, variant, penalties, history_len, t0)
        sampling = smeta.build_sampling_metadata(rows, pad_rows_to=S)
        counts, prompt_mask = (smeta.build_token_history(rows, S, config.vocab_size, length=history_len)
                               if penalties else (None, None))
        self.stats.count_program((model_name, "disagg", M, inputs.token_ids_T.shape, inputs.page_indices_LSP.shape,
                                  None if sharded is None else ("sharded", sharded.pages_LSB.shape)))
        self.stats.count_program(("sample", S, config.vocab_size, R * layout.n_kv, variant, penalties))
        t1 = time.perf_counter()
        logits_NRV = self._step(layout, config, inputs, sharded, M, kv_params)
        out = _sample_rows(logits_NRV, rows_S, sampling, counts, prompt_mask, num_logprobs=num_logprobs,
                           all_greedy=variant[1])
        self.stats.host_prepare_seconds += t1 - t0
        self.stats.dispatches += 1
        return DispatchedStep((out, None), len(chunks), num_logprobs, t1, self.stats)

    def _step(self, layout, config, inputs, sharded, M: int, bases):
        """`disagg_step` on the arena (taken and put back: the step donates it) -> logits."""
        arena = self.arena.take()
        try:
            arena, logits_NRV = disagg_pipeline.disagg_step(
                arena, PackedInt32.pack(inputs), sharded, layout=layout, config=config, num_microbatches=M,
                exchange=self.exchange, attention_backend=self.attention_backend, moe_backend=self.moe_backend,
                bases=bases)
        finally:
            self.arena.put(arena)
        return logits_NRV

    def _decode(self, layout, config, inputs, allowance_NMT, meta, history, M: int, variant, bases):
        """`disagg_decode` of max_decode_steps tokens on the arena with sampling `variant`
        (num_logprobs, all_greedy) -> its SamplerOutput."""
        counts, prompt_mask = history
        num_logprobs, all_greedy = variant
        arena = self.arena.take()
        try:
            arena, out = disagg_pipeline.disagg_decode(
                arena, PackedInt32.pack(inputs), allowance_NMT, meta, counts, prompt_mask, layout=layout,
                config=config, num_microbatches=M, num_steps=self.max_decode_steps, num_logprobs=num_logprobs,
                all_greedy=all_greedy, exchange=self.exchange, attention_backend=self.attention_backend, moe_backend=self.moe_backend,
                bases=bases)
        finally:
            self.arena.put(arena)
        return out

    def compile_jobs(self, config, menu: ShapeMenu, weights: ArenaWeights, *, model: str) -> list:
        """The model's programs as one job (`_run_every_program`; the jobs of all models take turns
        with the arena, one at a time)."""
        return [functools.partial(self._run_every_program, model, config, menu, weights)]

    def _run_every_program(self, model: str, config, menu: ShapeMenu, weights: ArenaWeights) -> int:
        """Compile (by running them on all-padding inputs: nothing is written) the model's
        common programs: `disagg_step` for one and two micro-batches at every ragged shape of
        the menu with the sampling program of every row count, and `disagg_decode` at every
        decode shape, each with every sampling variant (logprobs, penalties). The
        sequence-sharded program (a request spilled over KV devices) is not warmed up.
        Returns the number of programs run."""
        with self._warm_up_lock:
            return self._run_programs(model, config, menu, weights)

    def _run_programs(self, model: str, config, menu: ShapeMenu, weights: ArenaWeights) -> int:
        layout = self.arena.layout.model(model)
        n_kv = layout.n_kv
        variants = menu.sampling_variants()
        pen_variants = (False, True)
        empty = [[] for _ in range(n_kv)]
        done = 0

        def history(penalties, S):
            return (smeta.build_token_history([], S, config.vocab_size, length=menu.history_buckets[0])
                    if penalties else (None, None))

        for M in (1, 2):
            for shape in menu.ragged_shapes():
                inputs, _ = disagg_inputs.build_disagg_inputs(empty, layout=layout, num_layers=config.num_layers,
                                                              num_microbatches=M, shape=shape)
                logits_NRV = self._step(layout, config, inputs, None, M, weights.bases)
                done += 1
                for S in menu.decode_seq_buckets:
                    sampling = smeta.build_sampling_metadata([], pad_rows_to=S)
                    for num_logprobs, all_greedy in variants:
                        for penalties in pen_variants:
                            jax.block_until_ready(_sample_rows(logits_NRV, np.zeros(S, np.int32), sampling,
                                                               *history(penalties, S), num_logprobs=num_logprobs,
                                                               all_greedy=all_greedy))
                            done += 1
            if self.max_decode_steps > 1:
                for dshape in menu.decode_shapes():
                    shape = menu.ragged(dshape.num_seqs, dshape.num_seqs, dshape.pages_per_seq)
                    inputs, _ = disagg_inputs.build_disagg_inputs(empty, layout=layout, num_layers=config.num_layers,
                                                                  num_microbatches=M, shape=shape)
                    n_rows = n_kv * M * shape.num_seqs
                    meta = smeta.build_sampling_metadata([], pad_rows_to=n_rows)
                    for variant in variants:
                        for penalties in pen_variants:
                            out = self._decode(layout, config, inputs, np.zeros(inputs.token_ids_T.shape, np.int32),
                                               meta, history(penalties, n_rows), M, variant, weights.bases)
                            for S in menu.decode_seq_buckets:
                                jax.block_until_ready(_steps_of_rows(out, np.zeros(S, np.int32)))
                                done += 1
        return done

    def _dispatch_decode(self, model_name, config, bases, layout, inputs, grouped: Grouped, logit_rows, rows_S,
                         rows, limits, M, R, variant, penalties, history_len, t0) -> DispatchedStep:
        """max_decode_steps decode tokens in one program (one compiled trip count); chunk i keeps
        limits[i] of them (its pages cover those). Sampling runs on the KV devices, so the
        sampling rows go in device-row order (chunk i at flat row rows_S[i], padding rows
        elsewhere)."""
        num_steps = self.max_decode_steps
        S_in = inputs.kv_lens_S.shape[2]
        allowance_NMT = np.zeros(inputs.token_ids_T.shape, np.int32)
        for i, (d, j) in enumerate(grouped.where):       # a decode chunk's one token is its sequence's row
            m, s = divmod(int(logit_rows[d][j]), S_in)
            allowance_NMT[d, m, s] = limits[i]
        n_rows = layout.n_kv * R
        n = len(rows)
        src = np.full(n_rows, -1, np.int64)
        src[rows_S[:n]] = np.arange(n)
        src[src < 0] = np.arange(n, n_rows)                 # the greedy padding rows
        meta = jax.tree.map(lambda a: a[src], smeta.build_sampling_metadata(rows, pad_rows_to=n_rows))
        counts, prompt_mask = (smeta.build_token_history(rows, n_rows, config.vocab_size, length=history_len,
                                                         row_order=src)
                               if penalties else (None, None))
        self.stats.count_program((model_name, "disagg_decode", M, num_steps, inputs.token_ids_T.shape,
                                  inputs.page_indices_LSP.shape, variant, penalties))
        t1 = time.perf_counter()
        out = self._decode(layout, config, inputs, allowance_NMT, meta, (counts, prompt_mask), M, variant, bases)
        outs = _steps_of_rows(out, rows_S)
        self.stats.host_prepare_seconds += t1 - t0
        self.stats.dispatches += 1
        return DispatchedStep((outs, num_steps), len(rows), variant[0], t1, self.stats, limits)
