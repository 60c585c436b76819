"""The runner: turns one model's scheduled chunks into one dispatched step program on one device.

It builds the device inputs (`step_inputs.py`, `sampling_metadata.py`), picks the program
(`ragged_step` for mixed prefill/decode batches, `multi_decode` when every chunk is a
decode that may run several tokens), dispatches it with the pool's buffers donated, and
returns the sampled tokens per request. It counts the distinct compiled programs.

A `StepRunner` serves one KV device of the pool (`device_index`): its chunks' page tables
hold that device's local page ids (`placed_runner.PlacedRunner` maps the engine's global ids
and picks the device of each model).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import jax
import numpy as np

from crosspool_jax.runtime import sampling_metadata as smeta
from crosspool_jax.runtime.packed_inputs import PackedInt32
from crosspool_jax.runtime.step_inputs import MIN_PAGES_BUCKET, MIN_SEQS_BUCKET, bucket, build_step_inputs
from crosspool_jax.runtime.step_program import multi_decode, ragged_step
from crosspool_jax.kv.pool import KVPool


@dataclasses.dataclass
class SampledToken:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]   # (token_id, logprob) of the top tokens, when asked


@dataclasses.dataclass
class RunnerStats:
    """Counters of a runner; compiled_programs counts distinct (model, program, shape, flags[, device]) keys."""

    compiled_programs: int = 0
    steps: int = 0
    decode_tokens_per_dispatch_max: int = 0
    host_prepare_seconds: float = 0.0
    device_seconds: float = 0.0
    _program_keys: set = dataclasses.field(default_factory=set, repr=False)

    def count_program(self, key) -> None:
        self._program_keys.add(key)
        self.compiled_programs = len(self._program_keys)


class DispatchingRunner:
    """What every runner shares: `run` = `collect(dispatch(...))`. Subclasses define `dispatch`
    (prepare inputs, dispatch the step program, return a `DispatchedStep` without waiting)."""

    def run(self, model_name: str, config, kv_params, ffn_params, tokens_per_page: int, chunks: Sequence,
            rows: Sequence["smeta.SamplingRow"], *, num_steps: int = 1, stop_ids: Sequence[Sequence[int]] = (),
            allowances: Sequence[int] = ()) -> list[list["SampledToken"]]:
        """Run one step of `chunks` (all of one model). Returns, per chunk, its sampled tokens (one
        for a ragged step; up to num_steps for a multi-step decode)."""
        return self.collect(self.dispatch(model_name, config, kv_params, ffn_params, tokens_per_page, chunks, rows,
                                          num_steps=num_steps, stop_ids=stop_ids, allowances=allowances))

    def collect(self, step: "DispatchedStep") -> list[list["SampledToken"]]:
        """Wait for a dispatched step; per chunk, its sampled tokens."""
        return collect_sampled(step)


class StepRunner(DispatchingRunner):
    """Runs step programs of many models against the pages of one KV device of the pool
    (page tables in this device's local ids)."""

    def __init__(self, pool: KVPool, *, attention_backend: str, moe_backend: str, max_decode_steps: int = 1,
                 min_token_bucket: int = 16, device_index: int = 0):
        if not 0 <= device_index < pool.layout.num_devices:
            raise ValueError(f"StepRunner.device_index must be in [0, {pool.layout.num_devices}), "
                             f"got {device_index!r}")
        self.pool = pool
        self.device_index = device_index
        self.min_token_bucket = min_token_bucket
        self.max_decode_steps = max_decode_steps
        self.attention_backend = attention_backend
        self.moe_backend = moe_backend
        self.stats = RunnerStats()

    @property
    def device(self) -> jax.Device:
        """The KV device whose pages (and program) this runner serves."""
        return self.pool.devices[self.device_index]

    def dispatch(self, model_name: str, config, kv_params, ffn_params, tokens_per_page: int, chunks: Sequence,
                 rows: Sequence["smeta.SamplingRow"], *, num_steps: int = 1, stop_ids: Sequence[Sequence[int]] = (),
                 allowances: Sequence[int] = ()) -> "DispatchedStep":
        """Prepare the inputs and dispatch the step program without waiting for it: the engine
        dispatches every model of a step, then collects (devices and host work overlap)."""
        t0 = time.perf_counter()
        num_logprobs = smeta.max_logprobs(rows)
        penalties = smeta.needs_penalties(rows)
        pool = self.pool
        if num_steps == 1:
            inputs, shape = build_step_inputs(chunks, num_layers=config.num_layers, tokens_per_page=tokens_per_page,
                                              num_pages=pool.layout.pages_per_device,
                                              min_tokens_bucket=self.min_token_bucket)
            S = shape.num_seqs
        else:
            S = bucket(len(chunks), MIN_SEQS_BUCKET)
            # one compiled loop length (the engine's max_decode_steps); each row's
            # allowance stops it at the chunk's num_steps, whose pages are allocated
            allowances = [min(a, num_steps) for a in allowances]
            num_steps = max(num_steps, self.max_decode_steps)
        sampling = smeta.build_sampling_metadata(rows, pad_rows_to=S)
        counts, prompt_mask = (smeta.build_token_history(rows, S, config.vocab_size) if penalties
                               else (None, None))
        k_buf, v_buf = pool.take(self.device_index)
        try:
            if num_steps == 1:
                # numpy inputs go to the jitted program as they are: its C++ dispatch moves them
                # to the device of the committed arguments, ~5x cheaper than jax.device_put
                self.stats.count_program((model_name, "ragged", shape, num_logprobs, penalties, self.device_index))
                t1 = time.perf_counter()
                k_buf, v_buf, out = ragged_step(kv_params, ffn_params, k_buf, v_buf, PackedInt32.pack(inputs),
                                                sampling, counts,
                                                prompt_mask, config=config, num_logprobs=num_logprobs,
                                                attention_backend=self.attention_backend,
                                                moe_backend=self.moe_backend)
                outs, steps_run = out, None          # one step: collect adds the steps axis on the host
            else:
                args = self._multi_decode_args(config, chunks, S, stop_ids, allowances)
                Pp = args[2].shape[2]
                self.stats.count_program((model_name, "decode", S, Pp, num_steps, num_logprobs, penalties,
                                         self.device_index))
                t1 = time.perf_counter()
                k_buf, v_buf, outs, steps_run = multi_decode(
                    kv_params, ffn_params, k_buf, v_buf, *args[:3], args[3], sampling, counts, prompt_mask,
                    *args[4:], config=config, num_steps=num_steps, num_logprobs=num_logprobs,
                    attention_backend=self.attention_backend, moe_backend=self.moe_backend)
        finally:
            pool.put(k_buf, v_buf, self.device_index)
        self.stats.host_prepare_seconds += t1 - t0
        return DispatchedStep((outs, steps_run), len(chunks), num_logprobs, t1, self.stats)

    def _multi_decode_args(self, config, chunks, S, stop_ids, allowances):
        L = config.num_layers
        Pp = bucket(max(len(c.page_table[0]) for c in chunks), MIN_PAGES_BUCKET)
        Z = bucket(max((len(z) for z in stop_ids), default=1))
        token_ids = np.zeros(S, np.int32)
        kv_lens = np.ones(S, np.int32)
        pages = np.zeros((L, S, Pp), np.int32)
        stops = np.full((S, Z), -1, np.int32)
        allowance = np.ones(S, np.int32)
        for s, c in enumerate(chunks):
            if c.num_tokens != 1:
                raise ValueError("multi-step decode needs single-token decode chunks")
            token_ids[s] = c.token_ids[0]
            kv_lens[s] = c.start + 1
            table = np.asarray(c.page_table, np.int32)
            pages[:, s, :table.shape[1]] = table
            stops[s, :len(stop_ids[s])] = stop_ids[s]
            allowance[s] = allowances[s]
        return token_ids, kv_lens, pages, np.array([len(chunks)], np.int32), stops, allowance   # numpy: see dispatch


@dataclasses.dataclass
class DispatchedStep:
    """A step program in flight: its device outputs ((SamplerOutputs stacked [steps, S, ...],
    steps run) or (SamplerOutputs [S, ...] of one step, None)) until collected."""

    outputs: tuple
    num_chunks: int
    num_logprobs: int
    dispatched_at: float          # perf_counter when the program was dispatched
    stats: RunnerStats            # of the runner that dispatched it: counted when collected

    def __post_init__(self):
        # start the outputs' device-to-host copies now: they run when the program finishes,
        # so `collect` finds them on the host
        for leaf in jax.tree.leaves(self.outputs):
            if isinstance(leaf, jax.Array):
                leaf.copy_to_host_async()


def collect_sampled(step: DispatchedStep) -> list[list[SampledToken]]:
    """Fetch a dispatched step's sampled tokens to the host and count it in its runner's stats."""
    stats = step.stats
    outs, steps_run = jax.device_get(step.outputs)
    if steps_run is None:                    # one step: add the steps axis here (no device op)
        outs, steps_run = jax.tree.map(lambda a: np.asarray(a)[None], outs), 1
    stats.steps += 1
    stats.device_seconds += time.perf_counter() - step.dispatched_at
    stats.decode_tokens_per_dispatch_max = max(stats.decode_tokens_per_dispatch_max, int(steps_run))
    return unpack_sampled(outs, int(steps_run), step.num_chunks, step.num_logprobs)

def unpack_sampled(outs, steps_run: int, num_chunks: int, num_logprobs: int) -> list[list[SampledToken]]:
    """Host copies of stacked SamplerOutputs [steps, S, ...] -> per chunk, its sampled tokens."""
    tokens = np.asarray(outs.token_ids_S)
    logprobs = np.asarray(outs.logprob_S)
    top_ids = np.asarray(outs.top_ids_SX) if num_logprobs else None
    top_lps = np.asarray(outs.top_logprobs_SX) if num_logprobs else None
    result = []
    for s in range(num_chunks):
        seq = []
        for j in range(steps_run):
            top = ([(int(i), float(p)) for i, p in zip(top_ids[j, s], top_lps[j, s])] if num_logprobs else [])
            seq.append(SampledToken(int(tokens[j, s]), float(logprobs[j, s]), top))
        result.append(seq)
    return result
