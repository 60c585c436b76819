"""The models an engine serves: their configs, tokenizers, parameters and the shared KV pool.

It loads every checkpoint once, chooses the KV page size that every model can view
exactly, sizes the global KV pool, and hands out parameter pytrees for a step
(`acquire`/`release`), letting the weights pool swap cold models' pytrees to host memory.

Without a crosspool device split (one device, or mode "shared"/"static" on several) every
device is an independent monolithic pool: each model is placed whole on ONE device
(`model_devices`, greedy by weight bytes: `weights.place_models`), its FFN side in that
device's weights pool and its attention side in that device's attention pool (one pair of
`WeightsPool`s per device: `weights_pool_bytes` and `attention_pool_bytes` are budgets PER
DEVICE), its KV pages on that device (the engine pins the model there). `kv_pool_bytes` is
over all devices, split equally. mode "static" gives each model an equal share of its
device's pages (`static_page_caps`); "shared" lets the models of a device share its pages.

With mode "crosspool" and disjoint KV and weight devices (e.g. kv_devices=2, weight_devices=2)
the registry builds the disaggregated arena instead (`self.arena`, crosspool_jax/disagg): each
model's attention side on one KV device (its home, `model_homes`: where its requests start),
every model's expert shard on the weight devices, and KV pages in every row's remaining
memory, weight rows included; there is no `KVPool` (`kv_pool` is None; `kv_layout` is the
arena's pages: every device with its usable count). The rows are `arena_bytes` long, else as
long as `kv_pool_bytes`' pages on each KV device need. There `weights_pool_bytes` (over all
weight devices) and `attention_pool_bytes` (over all KV devices, the attention side then
replicated on each) budget slot regions of the arena (`disagg/residency.py`): beyond them
the least recently used models are swapped out to host memory and written back in place on
demand. Both organisations
sit behind one residency interface (`engine/residency.py`, `self.residency`), whose `acquire`
hands back the typed weights handle a runner reads (`PlacedWeights` or `ArenaWeights`).
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import os
from typing import Optional

import jax
import jax.numpy as jnp

from crosspool_jax import checkpoints
from crosspool_jax.checkpoints.loader import read_config
from crosspool_jax.disagg.arena import Arena
from crosspool_jax.disagg.layout import make_multi_layout
from crosspool_jax.disagg.residency import build_residency
from crosspool_jax.engine.config import EngineConfig
from crosspool_jax.engine.residency import ArenaSlots, PlacedResidency, Residency
from crosspool_jax.engine.step_plan import Weights
from crosspool_jax.models.random_models import RANDOM_WEIGHTS_MARKER
from crosspool_jax.kv.kv_cache_manager import ModelKVGeometry
from crosspool_jax.models import init_random_params
from crosspool_jax.kv.pool import KVPool, KVPoolLayout, choose_page_elems, tokens_per_page
from crosspool_jax.runtime.shapes import ShapeMenu
from crosspool_jax.models.params import side_bytes
from crosspool_jax.weights import WeightsPool, place_models, resolve_device_roles
from pallas_kernels.ragged_paged_attention.validation import max_pages_for_kernel
from crosspool_jax.weights.pool import ShardingFn

log = logging.getLogger(__name__)

_DEFAULT_POOL_BYTES_PER_DEVICE = 256 << 20


@dataclasses.dataclass
class ModelEntry:
    """One served model: what the scheduler, runner and API need to know about it."""

    name: str
    path: str
    config: object
    tokenizer: object
    generation_config: dict
    eos_token_ids: tuple
    max_model_len: int
    tokens_per_page: int = 0
    weights_bytes: int = 0
    menu: Optional[ShapeMenu] = None      # the program shapes of its steps (set with tokens_per_page)

    def encode_prompt(self, prompt) -> tuple[Optional[str], list[int]]:
        """A prompt is a string, a list of token ids, or {"prompt": ...} / {"prompt_token_ids": [...]}."""
        text = None
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                prompt = prompt["prompt_token_ids"]
            elif "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"model {self.name!r} has no tokenizer (no tokenizer.json in {self.path}); "
                                 "send prompt_token_ids instead of text")
            text = prompt
            ids = self.tokenizer.encode(prompt, add_special_tokens=True)
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
        else:
            raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise ValueError("prompt is empty: at least one token is needed")
        return text, ids

    def encode_bad_words(self, words) -> list[list[int]]:
        """The token ids of each bad word, as vLLM finds them: the word (leading spaces
        stripped) alone, and again after a space when that starts with another token and has
        as many tokens (so the word is banned at the start of a text and inside it)."""
        if not words:
            return []
        if self.tokenizer is None:
            raise ValueError(f"SamplingParams.bad_words: model {self.name!r} has no tokenizer to find the "
                             f"words' token ids")
        out: list[list[int]] = []
        for word in words:
            plain = self.tokenizer.encode(word.lstrip(), add_special_tokens=False)
            spaced = self.tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
            for ids in ([plain] if plain else []) + (
                    [spaced] if spaced and (not plain or (spaced[0] != plain[0] and len(spaced) == len(plain)))
                    else []):
                if ids not in out:
                    out.append(ids)
        return out


class ModelRegistry:
    """Owns the loaded models, the KV pool, and the weights' residency."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.kv_devices, self.weight_devices = _engine_devices(config)
        self.disaggregated = not set(self.kv_devices) & set(self.weight_devices)
        self.kv_dtype = self._kv_dtype()              # the KV pool's dtype (checked before anything loads)
        self.arena: Optional[Arena] = None
        # "auto" is resolved inside each kernel seam, per call: the Pallas kernel where the
        # platform and the model's geometry allow it, the reference otherwise.
        self.attention_backend = config.attention_backend
        self.moe_backend = config.moe_backend
        self._entries: dict[str, ModelEntry] = {}
        # model -> index of its device in kv_devices (== weight_devices here); empty with a
        # crosspool split, where every model spans all devices
        self.model_devices: dict[str, int] = {} if self.disaggregated else self._place()
        # Which models' weights are on the devices (`engine/residency.py`). Placed: per device,
        # every FFN pytree placed there lives in its weights pool and every attention side in
        # its attention pool; beyond each pool's budget the least recently used models' pytrees
        # are swapped to host memory and come back on demand. A crosspool split: the arena's
        # slots (set by _build_arena).
        self.residency: Optional[Residency] = None if self.disaggregated else PlacedResidency(
            [WeightsPool(config.attention_pool_bytes, _on_device(d)) for d in self.kv_devices],
            [WeightsPool(config.weights_pool_bytes, _on_device(d)) for d in self.weight_devices],
            self.model_devices)
        loaded = {}                                           # kept only to build the arena
        for name, path in config.models.items():
            model = self._load(name, str(path))
            self._add(name, str(path), model)
            if self.disaggregated:
                loaded[name] = model
        kv_rows = [e.config.kv_cache_row for e in self._entries.values()]
        page_elems = config.page_elems or choose_page_elems(kv_rows)
        for entry in self._entries.values():
            entry.tokens_per_page = tokens_per_page(page_elems, entry.config.kv_cache_heads,
                                                    entry.config.kv_cache_head_dim)
            # page tables hold up to max_model_len tokens plus the decode steps allocated ahead
            max_blocks = -(-(entry.max_model_len + config.max_decode_steps) // entry.tokens_per_page)
            entry.menu = ShapeMenu.build(max_num_batched_tokens=config.max_num_batched_tokens,
                                         max_num_seqs=config.max_num_seqs, max_blocks_per_seq=max_blocks,
                                         max_model_len=entry.max_model_len, min_token_bucket=config.min_token_bucket,
                                         max_logprobs=config.max_logprobs, vocab_size=entry.config.vocab_size,
                                         greedy_programs=self.kv_devices[0].platform != "cpu")
        if config.arena_bytes is not None and not self.disaggregated:
            raise ValueError("arena_bytes sizes the rows of a crosspool split (mode 'crosspool' with disjoint "
                             "kv_devices and weight_devices); use kv_pool_bytes here")
        self.model_homes: dict[str, tuple] = {}       # crosspool split: model -> KV devices of its attention side
        layout = (KVPoolLayout(page_elems, 1, len(self.kv_devices), self.kv_dtype) if config.arena_bytes
                  else KVPoolLayout.from_bytes(self._pool_bytes(), page_elems, len(self.kv_devices), self.kv_dtype))
        self.max_pages_per_device = self._kernel_page_cap(page_elems)
        if self.max_pages_per_device is not None and layout.pages_per_device > self.max_pages_per_device:
            log.warning("KV pool: %d pages per device exceed what the TPU attention kernel addresses "
                        "(2**31-1 elements per K/V operand); capped at %d pages (%.1f GiB of K+V per device)", layout.pages_per_device,
                        self.max_pages_per_device, self.max_pages_per_device * layout.page_bytes / 2 ** 30)
            layout = dataclasses.replace(layout, pages_per_device=self.max_pages_per_device)
        self.kv_layout = layout
        if self.disaggregated:
            self.kv_pool = None
            self.arena = self._build_arena(loaded, layout)
        else:
            self.kv_pool = KVPool(layout, self.kv_devices)
        self._set_lane_counts(config.max_lanes)
        log.info("KV pool: %d pages of %d bytes (%s) on %d device(s)", self.kv_layout.num_pages, layout.page_bytes,
                 self.kv_dtype, self.kv_layout.num_devices)

    def _kv_dtype(self) -> str:
        """The KV pool's dtype (`EngineConfig.kv_pool_dtype` on the KV devices' platform). A
        crosspool split keeps its arena's, the engine dtype: its pages share one buffer with the
        weights. Raises for an explicit kv_cache_dtype other than dtype there, and where a Pallas
        attention kernel may run (a GPU/TPU unless attention_backend is "reference"): the kernels
        are built and tested for pages of q's dtype only (the reference reads any, in float32)."""
        config = self.config
        platform = self.kv_devices[0].platform
        pool_dtype = config.dtype if self.disaggregated else config.kv_pool_dtype(platform)
        if config.kv_cache_dtype in ("auto", config.dtype):
            return pool_dtype
        if self.disaggregated:
            why = "a crosspool device split keeps its KV pages in the arena, one buffer with the weights"
        elif config.attention_kernels(platform) != "reference":
            why = ("the Pallas attention kernels read pages of the model's dtype (attention_backend="
                   "'reference' reads any)")
        else:
            return pool_dtype
        raise ValueError(f"EngineConfig.kv_cache_dtype={config.kv_cache_dtype!r} with dtype={config.dtype!r}: "
                         f"{why}; use 'auto' or {config.dtype!r}")

    def _build_arena(self, loaded: dict, layout: KVPoolLayout) -> Arena:
        """The disaggregated arena: every model's attention side on its home KV device (or budgeted
        slot regions where attention_pool_bytes / weights_pool_bytes are set), its FFN shards on
        the weight devices, and pages in every row's remaining memory, weight rows included
        (raises naming an unsupported model, a budget below the largest model, or rows too short).
        Rows of arena_bytes each, else as long as kv_pool_bytes' pages on each KV device need.
        `kv_layout` becomes the arena's pages: every device, with its usable count."""
        itemsize = jnp.dtype(self.config.dtype).itemsize
        row = {"row_elems": self.config.arena_bytes // itemsize} if self.config.arena_bytes else \
            {"pages_per_device": layout.pages_per_device}
        arena_layout = make_multi_layout({n: m.config for n, m in loaded.items()}, n_kv=len(self.kv_devices),
                                         n_w=len(self.weight_devices), **row,
                                         page_elems=layout.page_elems, dtype=self.config.dtype,
                                         devices=list(self.kv_devices) + list(self.weight_devices),
                                         attention_pool_bytes=self.config.attention_pool_bytes,
                                         weights_pool_bytes=self.config.weights_pool_bytes,
                                         max_pages_per_device=self.max_pages_per_device,
                                         attention_replicas=self.config.attention_replicas)
        self.residency = ArenaSlots(build_residency({n: (m.kv_params, m.ffn_params) for n, m in loaded.items()},
                                                    arena_layout))
        self.model_homes = {n: arena_layout.homes(n) for n in arena_layout.names}
        self.kv_layout = KVPoolLayout(layout.page_elems, arena_layout.pages_per_device, arena_layout.num_devices,
                                      layout.dtype, device_pages=arena_layout.device_pages)
        log.info("CrossPool arena: %d KV + %d weight devices, %d elements per row, usable pages per device %s, "
                 "attention homes %s, model slots %s, unused elements per device %s", arena_layout.n_kv,
                 arena_layout.n_w, arena_layout.arena_elems, arena_layout.device_pages, self.model_homes,
                 {r: arena_layout.region(r) and arena_layout.region(r).num_slots for r in ("kv", "w")},
                 [arena_layout.unused_elems(d) for d in range(arena_layout.num_devices)])
        return self.residency.arena

    def _kernel_page_cap(self, page_elems: int) -> Optional[int]:
        """Pages per KV device the Pallas attention kernel that may run here can address (None:
        no limit). The rule lives in pallas_kernels/ragged_paged_attention/validation.py: the GPU
        kernel has none (64-bit offsets), the TPU kernel caps one K or V operand at 2**31 - 1
        elements."""
        return max_pages_for_kernel(page_elems, self.config.attention_kernels(self.kv_devices[0].platform))

    def _place(self) -> dict[str, int]:
        """shared/static: each model on one device, greedy by weight bytes (`weights.place_models`),
        from the checkpoints' configs before anything is loaded. Raises ValueError for a model
        whose attention or FFN side alone exceeds a device's budget."""
        sizes = {name: _param_bytes(str(path), self.config.dtype) for name, path in self.config.models.items()}
        for name, (attn, ffn) in sizes.items():
            for option, need in (("attention_pool_bytes", attn), ("weights_pool_bytes", ffn)):
                budget = getattr(self.config, option)
                if budget is not None and need > budget:
                    raise ValueError(f"model {name!r} needs {need} bytes for its "
                                     f"{'attention' if option.startswith('attention') else 'FFN'} side on its "
                                     f"device, more than {option}={budget} (a per-device budget in mode "
                                     f"{self.config.mode!r})")
        return place_models({name: attn + ffn for name, (attn, ffn) in sizes.items()}, len(self.kv_devices))

    def _load(self, name: str, path: str):
        d = self.model_devices.get(name, 0)
        if os.path.exists(os.path.join(path, RANDOM_WEIGHTS_MARKER)):
            # a benchmark model: realistic shapes, random weights made on the device
            _, model_config = read_config(path)
            with jax.default_device(self.kv_devices[d]):
                kv_params, ffn_params = init_random_params(model_config, jax.random.key(0), self.config.dtype)
            return checkpoints.LoadedModel(name, path, model_config, kv_params, ffn_params, {}, None)
        return checkpoints.load_model(path, dtype=self.config.dtype, kv_placement=self.kv_devices[d],
                                      ffn_placement=self.weight_devices[d])

    def _add(self, name: str, path: str, loaded) -> None:
        cfg = loaded.config
        gen = loaded.generation_config or {}
        eos = set(cfg.eos_token_ids or ())
        gen_eos = gen.get("eos_token_id")
        if gen_eos is not None:
            eos.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
        if loaded.tokenizer is not None and loaded.tokenizer.eos_token_id is not None:
            eos.add(loaded.tokenizer.eos_token_id)
        max_len = cfg.max_position_embeddings
        if self.config.max_model_len is not None:
            max_len = min(max_len, self.config.max_model_len)
        weights_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((loaded.kv_params, loaded.ffn_params)))
        self._entries[name] = ModelEntry(name, path, cfg, loaded.tokenizer, gen, tuple(sorted(eos)), max_len,
                                         weights_bytes=weights_bytes)
        if not self.disaggregated:                        # else the arena takes both halves
            self.residency.register(name, loaded.kv_params, loaded.ffn_params)

    def _set_lane_counts(self, max_lanes: Optional[int]) -> None:
        """Each model's menu gets lane counts 1 .. min(max_lanes, models with its architecture
        and menu where it runs: its device (shared/static), the arena (the CrossPool split: models
        of one `ArenaLayout.program`)). max_lanes None: 4 on accelerators, 1 on a CPU, but at
        least 2 on the split (its step has a two-micro-batch program anyway)."""
        if max_lanes is None:
            max_lanes = 1 if self.kv_devices[0].platform == "cpu" else 4
            if self.disaggregated:
                max_lanes = max(max_lanes, 2)
        if max_lanes < 2:
            return
        groups: dict = {}
        for name, entry in self._entries.items():
            where = (self.arena.layout.model(name).program if self.disaggregated
                     else self.model_devices.get(name))
            groups.setdefault((where, entry.config, entry.menu), []).append(entry)
        for members in groups.values():
            lanes = tuple(range(1, min(max_lanes, len(members)) + 1))
            for entry in members:
                entry.menu = dataclasses.replace(entry.menu, lane_counts=lanes)

    def _pool_bytes(self) -> int:
        """kv_pool_bytes, else kv_memory_fraction of the free memory of the KV device with the
        least (every device gets an equal share: the placed models' weights differ per device)."""
        if self.config.kv_pool_bytes is not None:
            return self.config.kv_pool_bytes
        shares = []
        for device in self.kv_devices:
            stats = device.memory_stats() if hasattr(device, "memory_stats") else None
            if stats and "bytes_limit" in stats:
                free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
                shares.append(int(free * self.config.kv_memory_fraction))
            else:
                shares.append(_DEFAULT_POOL_BYTES_PER_DEVICE)
        return min(shares) * len(shares)

    @property
    def names(self) -> list[str]:
        return list(self._entries)

    def program_key(self, name: str) -> tuple:
        """Equal for models that run the same compiled programs: equal configs and shape menus on
        one device (the engine's dtype is every model's, so their weights have one structure,
        shapes, dtypes and placement; where they sit in a pool or the arena is program data)."""
        entry = self.get(name)
        return entry.config, entry.menu, self.model_devices.get(name)

    def get(self, name: str) -> ModelEntry:
        entry = self._entries.get(name)
        if entry is None:
            raise ValueError(f"unknown model {name!r}; served models: {sorted(self._entries)}")
        return entry

    def static_page_caps(self) -> dict:
        """mode="static": each model owns an equal, fixed share of its device's pages (a whole
        number of its blocks), the per-model worst-case reservation that static partitioning makes."""
        per_device = collections.Counter(self.model_devices.values())
        caps = {}
        for e in self._entries.values():
            d = self.model_devices[e.name]
            share = self.kv_layout.pages_per_device // per_device[d]
            caps[e.name] = share - share % e.config.num_layers
            if caps[e.name] < 1:
                raise ValueError(f"mode 'static': device {self.kv_devices[d].id} has "
                                 f"{self.kv_layout.pages_per_device} KV pages for {per_device[d]} models, a share "
                                 f"of {share} pages, less than one block ({e.config.num_layers} pages) of model "
                                 f"{e.name!r}; raise kv_pool_bytes")
        return caps

    def geometries(self) -> list[ModelKVGeometry]:
        return [ModelKVGeometry(e.name, e.config.num_layers, e.tokens_per_page, e.max_model_len)
                for e in self._entries.values()]

    def prefetch(self, name: str) -> None:
        """Start bringing a swapped-out model's weights back (a request for it was admitted)."""
        self.residency.prefetch(self.get(name).name)

    def acquire(self, name: str) -> Weights:
        """The model's resident weights for one step (`release` them after it), swapping them in
        if they are out: `PlacedWeights` (its pytrees on its device) or, on a crosspool split,
        `ArenaWeights` (where its tensors sit in the arena: the arena step's data)."""
        return self.residency.acquire(self.get(name).name)

    def release(self, name: str) -> None:
        self.residency.release(self.get(name).name)

    @property
    def weights(self) -> WeightsPool:
        """Device 0's weights pool (placed modes)."""
        return self.residency.weights_pools[0]

    @property
    def attention_weights(self) -> WeightsPool:
        """Device 0's attention pool (placed modes)."""
        return self.residency.attention_pools[0]

    def weights_stats(self) -> "SwapCounts":
        """Swaps of every pool (FFN side and attention side, every device; the arena's budgeted
        regions on a crosspool split) added up."""
        stats = self.residency.pool_stats()
        return SwapCounts(sum(s.swaps_in for s in stats), sum(s.swaps_out for s in stats),
                          sum(s.bytes_swapped_in for s in stats), sum(s.bytes_swapped_out for s in stats),
                          sum(s.swap_in_seconds for s in stats), sum(s.acquire_wait_seconds for s in stats))

    def fit_together(self, names) -> bool:
        """Whether the models `names` can all be resident at once (each pool's budget holds the
        ones it serves; the arena's budgeted regions have a slot for each). The scheduler keeps a
        step's models to such a set, so a step never swaps out a model it is about to run."""
        return self.residency.fit_together(names)

    @property
    def has_budgets(self) -> bool:
        """Whether some pool may hold fewer than all models (then residency constrains steps)."""
        return self.residency.has_budgets

    def is_resident(self, name: str) -> bool:
        return self.residency.is_resident(self.get(name).name)

    def model_stats(self) -> dict:
        """Per model: residency, bytes, context, and `device`: the id of the device it is placed
        on (None with a crosspool split, where it spans the KV and weight devices). With budgeted
        arena regions also `last_swap_in_seconds` per role ("kv": attention side, "w": experts)."""
        return {e.name: {**self.residency.swap_details(e.name), "resident": self.is_resident(e.name),
                         "weights_bytes": e.weights_bytes,
                         "max_model_len": e.max_model_len,
                         "device": (self.kv_devices[self.model_devices[e.name]].id
                                    if e.name in self.model_devices else None)}
                for e in self._entries.values()}


@dataclasses.dataclass(frozen=True)
class SwapCounts:
    """Swaps of all pools added up. Seconds: wall time from a swap-in's start until its data had
    landed (`WeightsPoolStats`); acquire_wait_seconds: the part steps spent blocked on it."""

    swaps_in: int
    swaps_out: int
    bytes_swapped_in: int = 0
    bytes_swapped_out: int = 0
    swap_in_seconds: float = 0.0
    acquire_wait_seconds: float = 0.0

    @property
    def swap_in_bytes_per_second(self) -> float:
        """Swap-in bandwidth (bytes / seconds; 0.0 before any swap-in)."""
        return self.bytes_swapped_in / self.swap_in_seconds if self.swap_in_seconds > 0 else 0.0


def _engine_devices(config: EngineConfig) -> tuple[list, list]:
    """The KV devices and weight devices the engine runs on.

    Without explicit kv_devices/weight_devices the engine runs on one device (both roles:
    the degenerate CrossPool case, and the single device of the shared/static baselines).
    mode "crosspool" with disjoint pools runs the disaggregated step (crosspool_jax/disagg);
    modes "shared"/"static" give every chosen device both roles (kv_devices and
    weight_devices, when both given, must select the same devices), each model placed on one.
    """
    if config.kv_devices is None and config.weight_devices is None:
        device = jax.devices()[0]
        return [device], [device]
    roles = resolve_device_roles(config.mode, config.kv_devices, config.weight_devices)
    return list(roles.kv_devices), list(roles.weight_devices)


def _on_device(device) -> ShardingFn:
    """A WeightsPool sharding_fn putting every leaf on one device."""
    sharding = jax.sharding.SingleDeviceSharding(device)
    return lambda model, path, shape: sharding


def _param_bytes(path: str, dtype) -> tuple[int, int]:
    """(attention side, FFN side) bytes of a checkpoint's parameters in `dtype`, from its config."""
    _, model_config = read_config(path)
    return side_bytes(model_config, dtype)