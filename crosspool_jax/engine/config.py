"""`EngineConfig`: every engine option in one validated tree (LLM keywords and server flags map here)."""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence, Union


MODES = ("crosspool", "shared", "static")
BACKENDS = ("auto", "reference", "gpu", "tpu")
# the attention backends add the Hopper prefill kernel for the prefill-shaped calls it takes
ATTENTION_BACKENDS = BACKENDS + ("mgpu_prefill",)
DTYPES = ("float32", "bfloat16", "float16")
KV_CACHE_DTYPES = ("auto",) + DTYPES
DeviceSpec = Union[int, Sequence, None]


def _opt(default, help: str, *, choices: Optional[tuple] = None, kind: Optional[str] = None):
    """A field with its help text for the generated command-line flags (`crosspool_jax.config_flags`):
    `choices` for an enum, `kind` "bytes" (512MiB, 4GiB) or "devices" (2 or 0,1) for how a flag is read."""
    metadata = {"help": help}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if kind is not None:
        metadata["kind"] = kind
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass
class EngineConfig:
    """Options of one engine serving many models.

    models: name -> checkpoint folder (Hugging Face or the project's orbax format).
    kv_pool_bytes: the global KV pool, K and V together, over all KV devices; None = a
      fraction (kv_memory_fraction) of the KV devices' free memory where the platform
      reports it, else 256 MiB per KV device.
    weights_pool_bytes: budget of the weights pool; beyond it, the least recently used
      models' FFN pytrees are swapped to host memory. None = no limit. Modes shared/static
      (and one device): a budget PER DEVICE (each device's pool holds the models placed on it).
      Mode crosspool with a device split: over ALL weight devices, as slots of the arena (each
      the size of the largest model's expert shards; disagg/residency.py).
    attention_pool_bytes: the same for the attention side (embeddings, attention weights,
      norms, lm head) on the KV devices (shared/static: per device; a crosspool split: over all
      KV devices, the replicated attention side counted once per device). None = no limit (a
      crosspool split then keeps each model's attention side on one KV device, its home).
    arena_bytes: a crosspool split: each device's arena row in bytes; its memory beyond its
      role's weights and the attention sides homed there is KV pages (weight devices too).
      Replaces kv_pool_bytes; None = rows sized by kv_pool_bytes.
    attention_replicas: a crosspool split: on how many KV devices each model's attention side
      sits (a divisor of kv_devices; its requests start there). 1: once, the most pages.
    max_model_len: cap on any model's context (prompt + output); None = each model's own.
    min_token_bucket: a step's tokens are padded to a power of two at least this; larger
      values mean fewer compiled step programs and more padding.
    decode_step_prefill_tokens: the most prefill tokens an engine step that also carries decode
      tokens may take (chunked prefill sized for the decodes' time between tokens: a long
      prompt of one model then stretches no other model's decode step beyond it); None = the
      whole max_num_batched_tokens.
    tbt_budget_ms: the time between tokens a step that carries decode tokens should stay within:
      the engine measures each model's step program per token bucket (`engine/step_cost.py`, in
      `LLMEngine.warm_up`, else before the first step) and the scheduler takes only the prefill
      tokens that keep the step's estimated time (the sum of its models' program times) within
      it. decode_step_prefill_tokens, when set, wins; None = no time budget.
    max_logprobs: the most `logprobs` or `prompt_logprobs` a request may ask for (programs
      that report logprobs compute this many for every row; vLLM's option of the same name).
    max_lanes: the most models of one architecture on one device whose decodes one program
      serves per engine step (lanes; shared/static), or whose steps one arena program serves
      (the crosspool split). None = 4 on accelerators, 1 on a CPU (at least 2 on the split).
    kv_cache_dtype: the KV pool's dtype (vLLM's option of the same name): "auto" = dtype, except
      on a CPU, where a bfloat16 / float16 model's pool is float32 (XLA's CPU backend converts a
      16-bit pool whole to float32 around every K/V scatter into it: the step's time then grows
      with the pool, not the tokens; BENCHMARKS.md). K/V are cast to it when written; attention
      reads it (in float32 on the reference path). A crosspool split keeps its arena's dtype
      (KV pages and weights share one buffer), and the GPU/TPU attention kernels read pages of
      the model's dtype: there only "auto" or dtype (or attention_backend "reference"). Pages
      follow its item size: a float32 pool holds half the tokens of a bfloat16 one in the same
      bytes.
    pipeline_models: overlap the host's work with the device's across models: an engine step
      dispatches about half of the models with work (those with no step in flight, least
      recently run first), then collects and processes the previous step's while the device
      runs the new ones, so each model advances every other step and TBT tends to max(host,
      device) instead of their sum. Off when weights budgets swap models (steps run whole).
    async_scheduling: dispatch the next step of the running requests before the host has the
      tokens of the step in flight (vLLM's async scheduling): each engine step dispatches the
      continuation (the step the scheduler makes as if the step in flight were done: decodes
      whose input token is read on the device from the step in flight's samples, prompt chunks
      and admissions fed from the host), then collects and processes the step in flight while
      the device runs it, so the host's per-step work hides behind the device's. A request that
      stops wastes its continuation's token (dropped); a pool that would have to preempt makes
      that step synchronous. `step()` returns the previous step's outputs. On by default; not with a
      crosspool device split or `pipeline_models`; a request with penalties or bad words of
      several tokens (sampling that reads its tokens on the host) makes steps synchronous
      while it runs.
    """

    models: dict = dataclasses.field(metadata={"help": "Served models: name -> checkpoint folder."})
    dtype: str = _opt("bfloat16", "Parameter dtype (and the KV cache's, see kv_cache_dtype).", choices=DTYPES)
    kv_cache_dtype: str = _opt("auto", "KV cache (pool) dtype: auto = dtype, but float32 for a bfloat16/float16 "
                               "model on a CPU (XLA's CPU backend converts a 16-bit pool whole around every "
                               "K/V write; a float32 pool holds half the tokens in the same bytes). A "
                               "crosspool device split, and the GPU/TPU attention kernels, take dtype only.",
                               choices=KV_CACHE_DTYPES)
    mode: str = _opt("crosspool", "Memory mode: crosspool (weights pool + global KV pool; with disjoint "
                     "kv_devices/weight_devices the disaggregated step), shared (kvcached-style elastic KV "
                     "shared by the models of a device), static (an equal, fixed KV share per model).",
                     choices=MODES)
    kv_devices: DeviceSpec = _opt(None, "KV-pool devices: a count (2) or device indices (0,1); unset: one "
                                  "device.", kind="devices")
    weight_devices: DeviceSpec = _opt(None, "Weights-pool devices: a count or device indices; with mode "
                                      "crosspool and devices disjoint from kv_devices, experts live there.",
                                      kind="devices")
    kv_pool_bytes: Optional[int] = _opt(None, "KV pool budget over all KV devices (K and V together; "
                                        "suffixes KiB/MiB/GiB or KB/MB/GB); unset: kv_memory_fraction of "
                                        "the free device memory where the platform reports it, else 256 MiB "
                                        "per KV device.", kind="bytes")
    kv_memory_fraction: float = _opt(0.5, "Fraction of the KV devices' free memory the KV pool takes when "
                                     "kv_pool_bytes is unset.")
    weights_pool_bytes: Optional[int] = _opt(None, "Weights pool budget; beyond it the least recently used "
                                             "models' expert weights are swapped to host memory. shared/static: "
                                             "per device; a crosspool split: over all weight devices. Unset: "
                                             "no limit.", kind="bytes")
    attention_pool_bytes: Optional[int] = _opt(None, "Budget of the attention side (embeddings, attention "
                                               "weights, norms, lm head) on the KV devices, swapped like the "
                                               "weights pool. Unset: no limit.", kind="bytes")
    arena_bytes: Optional[int] = _opt(None, "Mode crosspool with a device split: bytes of each device's arena "
                                      "row (its role's weights, the attention sides homed there, and KV pages "
                                      "in all the rest, weight devices included); replaces kv_pool_bytes. "
                                      "Unset: rows as long as kv_pool_bytes' pages on the KV devices need.",
                                      kind="bytes")
    attention_replicas: int = _opt(1, "Mode crosspool with a device split: on how many KV devices each "
                                   "model's attention side sits (its requests start on them; a divisor of "
                                   "kv_devices). 1 stores each once: the most KV pages.")
    page_elems: Optional[int] = _opt(None, "Elements of one KV page (one layer's K or V for G tokens); unset: "
                                     "chosen so that every model gets at least 16 tokens per page.")
    max_model_len: Optional[int] = _opt(None, "Cap on any model's context (prompt + output tokens); unset: "
                                        "each model's own max_position_embeddings.")
    max_num_seqs: int = _opt(64, "Most sequences in one engine step.")
    max_num_batched_tokens: int = _opt(512, "Most tokens (prefill chunks + decode tokens) in one engine step.")
    max_decode_steps: int = _opt(8, "Most tokens a decode-only step samples per sequence in one device "
                                 "program (multi-step decode); 1 turns it off.")
    max_lanes: Optional[int] = _opt(None, "Most models of one architecture on one device whose decodes run "
                                    "as lanes of ONE program per engine step (shared/static; their weights "
                                    "are data of the program), or whose steps run as the micro-batches of one "
                                    "arena program (crosspool split); 1 turns lanes off. Unset: 4 on GPU/TPU, "
                                    "1 on CPU (every lane count is a set of programs to compile, and a CPU "
                                    "host keeps up with per-model dispatch), at least 2 on the split (its "
                                    "two-micro-batch program exists anyway).")
    max_logprobs: int = _opt(20, "The most logprobs or prompt_logprobs a request may ask for (programs that "
                             "report logprobs compute this many for every row); vLLM's option of the same name.")
    decode_step_prefill_tokens: Optional[int] = _opt(None, "The most prefill tokens an engine step that also "
                                                     "carries decode tokens may take (chunked prefill sized for "
                                                     "the decodes' time between tokens); unset: the whole "
                                                     "max_num_batched_tokens.")
    tbt_budget_ms: Optional[float] = _opt(None, "Time between tokens, in milliseconds, that an engine step "
                                          "carrying decode tokens should stay within: prefill chunks are sized "
                                          "from each model's step time per token bucket, measured at warm-up on "
                                          "this engine's programs (see the engine's stats). "
                                          "decode_step_prefill_tokens, when set, wins. Unset: no time budget.")
    min_token_bucket: int = _opt(16, "A step's tokens are padded to a power of two at least this: larger "
                                 "means fewer compiled programs and more padding.")
    enable_prefix_caching: bool = _opt(True, "Reuse the KV pages of a shared prompt prefix.")
    pipeline_models: bool = _opt(False, "Overlap host and device across models: each engine step dispatches "
                                 "about half of the models with work, then collects and processes the "
                                 "previous step's while the device runs them (each model advances every "
                                 "other step). Off when weights budgets swap models.")
    async_scheduling: bool = _opt(True, "Dispatch each step before the previous step's tokens reach the host "
                                  "(fed to the next step on the device), so the host's per-step "
                                  "work overlaps the device's; step() returns the previous step's outputs. "
                                  "Placed modes (shared, static); a crosspool split and pipeline_models "
                                  "run synchronous steps.")
    attention_backend: str = _opt("auto", "Attention kernel: auto (Pallas on GPU/TPU where the shapes "
                                  "allow, the jnp reference otherwise), reference, gpu, tpu, or mgpu_prefill "
                                  "(on a GPU the Mosaic GPU prefill kernel for steps with prefill chunks where "
                                  "it takes the model's options, auto for the rest; Hopper).",
                                  choices=ATTENTION_BACKENDS)
    moe_backend: str = _opt("auto", "MoE kernel: auto, reference, gpu or tpu (as attention_backend).",
                            choices=BACKENDS)
    seed: int = _opt(0, "Engine seed: draws the seeds of requests that give none.")

    def __post_init__(self):
        if not isinstance(self.models, dict) or not self.models:
            raise ValueError("EngineConfig.models must be a non-empty dict of name -> checkpoint path")
        for name in self.models:
            if not isinstance(name, str) or not name:
                raise ValueError(f"EngineConfig.models: model names must be non-empty strings, got {name!r}")
        name = _dtype_name(self.dtype)
        if name not in DTYPES:
            raise ValueError(f"EngineConfig.dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        self.dtype = name
        name = _dtype_name(self.kv_cache_dtype)
        if name not in KV_CACHE_DTYPES:
            raise ValueError(f"EngineConfig.kv_cache_dtype must be auto, float32, bfloat16 or float16, got "
                             f"{self.kv_cache_dtype!r}")
        self.kv_cache_dtype = name
        if self.mode not in MODES:
            raise ValueError(f"EngineConfig.mode must be one of {MODES}, got {self.mode!r}")
        for name, choices in (("attention_backend", ATTENTION_BACKENDS), ("moe_backend", BACKENDS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"EngineConfig.{name} must be one of {choices}, got {getattr(self, name)!r}")
        for name in ("pipeline_models", "async_scheduling"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"EngineConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if not isinstance(self.max_logprobs, int) or isinstance(self.max_logprobs, bool) or self.max_logprobs < 0:
            raise ValueError(f"EngineConfig.max_logprobs must be an integer >= 0, got {self.max_logprobs!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_decode_steps", "min_token_bucket",
                     "attention_replicas"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be an integer >= 1, got {getattr(self, name)!r}")
        for name in ("kv_pool_bytes", "arena_bytes", "weights_pool_bytes", "attention_pool_bytes", "max_model_len",
                     "page_elems", "decode_step_prefill_tokens", "max_lanes"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"EngineConfig.{name} must be a positive integer or None, got {value!r}")
        budget = self.tbt_budget_ms
        if budget is not None and (not isinstance(budget, (int, float)) or isinstance(budget, bool)
                                   or not math.isfinite(budget) or budget <= 0):
            raise ValueError(f"EngineConfig.tbt_budget_ms must be a positive number of milliseconds or None, "
                             f"got {budget!r}")
        if self.arena_bytes is not None and self.kv_pool_bytes is not None:
            raise ValueError("EngineConfig: give arena_bytes (a crosspool split's rows; pages fill what the "
                             "weights leave) or kv_pool_bytes, not both")
        for name in ("kv_devices", "weight_devices"):
            _check_devices(name, getattr(self, name))
        if not 0.0 < self.kv_memory_fraction <= 1.0:
            raise ValueError(f"EngineConfig.kv_memory_fraction must be in (0, 1], got {self.kv_memory_fraction}")

    def kv_pool_dtype(self, platform: str) -> str:
        """The KV pool's dtype on a device of `platform` ("cpu", "gpu", "tpu"): kv_cache_dtype, and
        for "auto" dtype, but float32 for a 16-bit model on a CPU (the option's help says why)."""
        if self.kv_cache_dtype != "auto":
            return self.kv_cache_dtype
        return "float32" if platform == "cpu" else self.dtype

    def attention_kernels(self, platform: str) -> str:
        """The family of attention kernels that may run on a device of `platform`: "gpu" (the
        Pallas GPU kernels, `mgpu_prefill`'s Mosaic GPU prefill among them), "tpu", or
        "reference" (the jnp path: attention_backend "reference", or "auto" on a CPU)."""
        if self.attention_backend == "mgpu_prefill":
            return "gpu"
        if self.attention_backend == "auto":
            return platform if platform in ("gpu", "tpu") else "reference"
        return self.attention_backend


def _dtype_name(dtype):
    """A dtype given as a name, a numpy/JAX dtype or a scalar type (jnp.bfloat16) -> its name (by
    attribute, so this module needs no JAX); anything else unchanged, for the caller's error."""
    if isinstance(dtype, str):
        return dtype
    return getattr(dtype, "name", None) or getattr(dtype, "__name__", None) or dtype


def _check_devices(name: str, spec) -> None:
    """None, a count >= 1, or a non-empty list of device indices (>= 0) or jax devices."""
    def is_int(x):
        return isinstance(x, int) and not isinstance(x, bool)

    if spec is None or (is_int(spec) and spec >= 1):
        return
    if isinstance(spec, (list, tuple)) and spec and all(
            (is_int(d) and d >= 0) or hasattr(d, "platform") for d in spec):
        return
    raise ValueError(f"EngineConfig.{name} must be None, a device count >= 1 or a non-empty list of "
                     f"device indices, got {spec!r}")
