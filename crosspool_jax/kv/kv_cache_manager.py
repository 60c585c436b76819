"""`KVCacheManager`: which pages each request holds, and the prefix cache (plain Python, no JAX).

Geometry: a model's logical block (G tokens of one sequence) costs L pages, one per
layer, all on one KV device (`KVBlock.device`); a request's page table is L lists of page
ids, one id per block. Placement of a request's blocks over the KV devices:

- "spread" (default): each new block goes to the device with the most free capacity, so
  blocks of one request may sit on different devices and one request can use the whole pool;
- "sticky": a request's new blocks go to the device of its last block while that device has
  room, and spill to the device with the most free capacity when it has not (a request with
  no block yet starts on the one with the most among its model's start devices,
  `register_model(homes=)`, all by default, or where there is most when they are full; a
  prefix-cache hit's last block sets where it continues).
  Most requests stay on one device (the disaggregated step's cheap case: attention where the
  pages are); a long one spills over several and can still use the whole pool
  (`max_request_tokens`), and the step then attends sequence-sharded. Prefix hits may span
  devices.

Prefix caching: a full block whose K/V are computed gets a hash chained over
(model, parent block's hash, the block's token ids). Requests of the same model whose
prompts share full blocks share those blocks (reference counted). When the last owner
frees a hashed block it stays cached with ref_count 0 ("evictable") until its pages are
needed, least recently freed first; unhashed blocks go straight back to the allocator.

A model may be pinned to one KV device (`register_model(..., device=d)`): all its blocks
are then on d whatever the placement (the multi-device `shared`/`static` baselines, where a
model's weights and KV live on the device it was assigned to).

Optional per-model caps (`register_model(..., max_pages=N)`) bound the pages a model's live
requests hold: caps summing to at most the pool give a static per-model reservation (the
"static" baseline); without caps every model draws from the whole pool.

Capacity reporting: evictable cached blocks count as FREE capacity. `num_free_pages()`
and `usage()` include them as free, `pages_used_by_model()` counts only blocks held by
live requests (so an idle model reports 0), and `num_evictable_pages()` reports the
cached-but-evictable pages separately.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import struct
from typing import Optional, Sequence

import numpy as np

from crosspool_jax.kv.allocator import PageAllocator


PLACEMENTS = ("spread", "sticky")


@dataclasses.dataclass(frozen=True)
class ModelKVGeometry:
    """How one model uses the pool: L pages per block of G tokens; contexts up to max_model_len."""

    name: str
    num_layers: int
    tokens_per_page: int
    max_model_len: int

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"ModelKVGeometry.name must be a non-empty string, got {self.name!r}")
        for field in ("num_layers", "tokens_per_page", "max_model_len"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ModelKVGeometry({self.name}).{field} must be an integer >= 1, got {value!r}")

    def num_blocks(self, num_tokens: int) -> int:
        """Blocks needed to hold num_tokens tokens."""
        return -(-num_tokens // self.tokens_per_page)


@dataclasses.dataclass(eq=False)
class KVBlock:
    """One logical block of one model: `pages[l]` holds layer l's K (and V) for G tokens."""

    model: str
    pages: tuple[int, ...]
    device: int
    ref_count: int = 0
    block_hash: Optional[bytes] = None


def hash_block(model: str, parent_hash: Optional[bytes], token_ids: Sequence[int]) -> bytes:
    """Chained content hash of one full block (16 bytes of BLAKE2b)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(model.encode())
    h.update(b"\x00" + (parent_hash or b"<root>"))
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return h.digest()


class KVCacheManager:
    """Blocks per request, reference counts, prefix cache and eviction, over one `PageAllocator`.

    Requests are anything with request_id, model, num_computed_tokens, num_tokens and
    token_ids_between(start, stop) (see `crosspool_jax.engine.request.Request`).
    """

    def __init__(self, allocator: PageAllocator, enable_prefix_caching: bool = True, placement: str = "spread"):
        if not isinstance(allocator, PageAllocator):
            raise ValueError(f"KVCacheManager.allocator must be a PageAllocator, got {type(allocator).__name__}")
        if placement not in PLACEMENTS:
            raise ValueError(f"KVCacheManager.placement must be one of {PLACEMENTS}, got {placement!r}")
        self.allocator = allocator
        self.placement = placement
        self.enable_prefix_caching = bool(enable_prefix_caching)
        self._geometries: dict[str, ModelKVGeometry] = {}
        self._blocks: dict[str, list[KVBlock]] = {}            # request_id -> its blocks, in order
        self._tables: dict[str, np.ndarray] = {}               # request_id -> int32 [L, capacity] page ids
        self._hashes: dict[str, list[bytes]] = {}              # request_id -> hashes of its full blocks
        self._num_hashed: dict[str, int] = {}                  # request_id -> blocks already offered to the cache
        self._cached: dict[bytes, KVBlock] = {}                # hash -> block (live or evictable)
        self._evictable = [collections.OrderedDict() for _ in range(allocator.num_devices)]  # id(block) -> block
        self._evictable_pages = [0] * allocator.num_devices
        self._used_by_model: dict[str, int] = {}               # pages of blocks with ref_count > 0
        self._max_pages: dict[str, Optional[int]] = {}          # per-model cap on live pages
        self._pinned: dict[str, Optional[int]] = {}             # model -> the KV device it is pinned to
        self._homes: dict[str, tuple] = {}                      # model -> devices its requests start on

    # ----- models ---------------------------------------------------------------------------
    def register_model(self, geometry: ModelKVGeometry, max_pages: Optional[int] = None,
                       device: Optional[int] = None, homes: Optional[Sequence[int]] = None) -> None:
        """Declare a model's geometry (idempotent for the same geometry).

        max_pages: optional cap on the pages the model's live requests may hold (a static
        per-model reservation when the caps sum to at most the pool); None = the whole pool.
        device: pin every block of the model to this KV device (None: placement decides).
        homes: the devices a request of the model starts on while they have room (its first
        block; None: any). A crosspool arena's: the KV devices holding the model's attention side.
        """
        if not isinstance(geometry, ModelKVGeometry):
            raise ValueError(f"register_model needs a ModelKVGeometry, got {type(geometry).__name__}")
        old = self._geometries.get(geometry.name)
        if old is not None and old != geometry:
            raise ValueError(f"model {geometry.name!r} is already registered with {old}, not {geometry}")
        starts = tuple(range(self.allocator.num_devices)) if homes is None else tuple(homes)
        if not starts or not all(isinstance(d, int) and 0 <= d < self.allocator.num_devices for d in starts):
            raise ValueError(f"model {geometry.name!r}: homes must be device indices in "
                             f"[0, {self.allocator.num_devices}), got {homes!r}")
        most = max(self.allocator.device_pages[d] for d in starts)
        if geometry.num_layers > most:
            raise ValueError(f"model {geometry.name!r}: one block needs num_layers={geometry.num_layers} pages on "
                             f"one KV device, which holds only {most} pages")
        if max_pages is not None and (not isinstance(max_pages, int) or isinstance(max_pages, bool)
                                      or not geometry.num_layers <= max_pages <= self.allocator.num_total):
            raise ValueError(f"model {geometry.name!r}: max_pages must be an integer in [num_layers="
                             f"{geometry.num_layers}, {self.allocator.num_total}] or None, got {max_pages!r}")
        if device is not None and (not isinstance(device, int) or isinstance(device, bool)
                                   or not 0 <= device < self.allocator.num_devices):
            raise ValueError(f"model {geometry.name!r}: device must be a KV device index in "
                             f"[0, {self.allocator.num_devices}) or None, got {device!r}")
        self._geometries[geometry.name] = geometry
        self._max_pages[geometry.name] = max_pages
        self._pinned[geometry.name] = device
        self._homes[geometry.name] = starts
        self._used_by_model.setdefault(geometry.name, 0)

    def geometry(self, model: str) -> ModelKVGeometry:
        try:
            return self._geometries[model]
        except KeyError:
            raise ValueError(f"unknown model {model!r}; registered: {sorted(self._geometries)}") from None

    @property
    def models(self) -> list[str]:
        return list(self._geometries)

    def pinned_device(self, model: str) -> Optional[int]:
        """The KV device the model is pinned to (`register_model(device=)`), or None."""
        return self._pinned[self.geometry(model).name]

    def max_request_tokens(self, model: str) -> int:
        """Most tokens one sequence of `model` could ever hold if it had the whole pool (or its
        whole max_pages)."""
        g = self.geometry(model)
        per_device = [p // g.num_layers for p in self.allocator.device_pages]
        pinned = self._pinned[model]            # else spread and sticky both spill over every device
        blocks = sum(per_device) if pinned is None else per_device[pinned]
        if self._max_pages[model] is not None:
            blocks = min(blocks, self._max_pages[model] // g.num_layers)
        return blocks * g.tokens_per_page

    def quota_left(self, model: str) -> Optional[int]:
        """Pages the model may still take under its max_pages (None: no cap)."""
        cap = self._max_pages[self.geometry(model).name]
        return None if cap is None else cap - self._used_by_model[model]

    def exceeds_quota(self, request, num_new_tokens: int, new_computed_blocks: Sequence[KVBlock] = ()) -> bool:
        """Whether allocate_slots(request, ...) would take the model past its max_pages."""
        left = self.quota_left(request.model)
        return left is not None and self._new_live_pages(request, num_new_tokens, new_computed_blocks) > left

    def _new_live_pages(self, request, num_new_tokens: int, new_computed_blocks: Sequence[KVBlock]) -> int:
        g = self.geometry(request.model)
        total = request.num_computed_tokens + len(new_computed_blocks) * g.tokens_per_page + num_new_tokens
        num_fresh = g.num_blocks(total) - len(self._blocks.get(request.request_id, ())) - len(new_computed_blocks)
        revived = sum(len(b.pages) for b in new_computed_blocks if b.ref_count == 0)
        return max(num_fresh, 0) * g.num_layers + revived

    # ----- prefix cache ----------------------------------------------------------------------
    def _block_hashes(self, request, num_blocks: int) -> list[bytes]:
        """Hashes of the request's first num_blocks full blocks (computed once, extended lazily)."""
        g = self.geometry(request.model)
        G = g.tokens_per_page
        hashes = self._hashes.setdefault(request.request_id, [])
        while len(hashes) < num_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            hashes.append(hash_block(request.model, parent, request.token_ids_between(i * G, (i + 1) * G)))
        return hashes[:num_blocks]

    def get_computed_blocks(self, request) -> tuple[list[KVBlock], int]:
        """Cached blocks matching the request's leading full blocks, and the tokens they cover.

        Never the whole request: at least its last token is left to compute (to get logits).
        Does not take references; pass the blocks to `allocate_slots`.
        """
        g = self.geometry(request.model)
        if not self.enable_prefix_caching or self._blocks.get(request.request_id):
            return [], 0
        max_blocks = (request.num_tokens - 1) // g.tokens_per_page
        hits = []
        for h in self._block_hashes(request, max_blocks):
            block = self._cached.get(h)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * g.tokens_per_page

    def cache_full_blocks(self, request) -> None:
        """Register the hashes of the request's blocks that are now full and computed."""
        if not self.enable_prefix_caching:
            return
        blocks = self._blocks.get(request.request_id, [])
        g = self.geometry(request.model)
        num_full = min(request.num_computed_tokens // g.tokens_per_page, len(blocks))
        start = self._num_hashed.get(request.request_id, 0)
        if num_full <= start:
            return
        hashes = self._block_hashes(request, num_full)
        for i in range(start, num_full):
            block = blocks[i]
            if block.block_hash is None and hashes[i] not in self._cached:
                block.block_hash = hashes[i]
                self._cached[hashes[i]] = block
            # A block computed twice (two identical prompts in flight) stays unhashed and is
            # returned to the allocator when freed.
        self._num_hashed[request.request_id] = num_full

    def reset_prefix_cache(self) -> int:
        """Evict every evictable cached block; returns the pages given back."""
        freed = 0
        for device in range(self.allocator.num_devices):
            while self._evictable[device]:
                freed += self._evict_one(device)
        return freed

    # ----- allocation ------------------------------------------------------------------------
    def allocate_slots(self, request, num_new_tokens: int, new_computed_blocks: Sequence[KVBlock] = ()) -> bool:
        """Ensure the request holds blocks for num_computed_tokens + len(new_computed_blocks)*G
        + num_new_tokens tokens: take the cached blocks (ref+1), then new pages, evicting
        least-recently-freed cached blocks when needed. Returns False, changing nothing, if the
        pool (or the model's max_pages) cannot hold them. The caller advances num_computed_tokens by the cached tokens.
        """
        g = self.geometry(request.model)
        if num_new_tokens < 0:
            raise ValueError(f"allocate_slots({request.request_id}): num_new_tokens must be >= 0, "
                             f"got {num_new_tokens}")
        blocks = self._blocks.get(request.request_id, [])
        new_computed_blocks = list(new_computed_blocks)
        if new_computed_blocks and blocks:
            raise ValueError(f"allocate_slots({request.request_id}): cached blocks can only be taken by a "
                             f"request that holds no blocks yet (it holds {len(blocks)})")
        for b in new_computed_blocks:
            if b.model != request.model or b.block_hash is None or self._cached.get(b.block_hash) is not b:
                raise ValueError(f"allocate_slots({request.request_id}): a new computed block is not a cached "
                                 f"block of model {request.model!r}")
        total_tokens = (request.num_computed_tokens + len(new_computed_blocks) * g.tokens_per_page
                        + num_new_tokens)
        if total_tokens > g.max_model_len:
            raise ValueError(f"allocate_slots({request.request_id}): {total_tokens} tokens exceed model "
                             f"{request.model!r}'s max_model_len of {g.max_model_len}")
        num_fresh = g.num_blocks(total_tokens) - len(blocks) - len(new_computed_blocks)
        if self.exceeds_quota(request, num_new_tokens, new_computed_blocks):
            return False
        plan = self._plan(num_fresh, g.num_layers, new_computed_blocks,
                          home=self._home_device(blocks or new_computed_blocks), pinned=self._pinned[request.model],
                          starts=self._homes[request.model])
        if plan is None:
            return False
        owned = self._blocks.setdefault(request.request_id, [])
        for b in new_computed_blocks:
            self._ref(b)
            owned.append(b)
            self._add_to_table(request.request_id, owned, b)
        if new_computed_blocks:
            self._num_hashed[request.request_id] = len(new_computed_blocks)
        for device in plan:
            while self.allocator.num_free(device) < g.num_layers:
                self._evict_one(device)
            block = KVBlock(request.model, tuple(self.allocator.allocate(g.num_layers, device)), device)
            self._ref(block)
            owned.append(block)
            self._add_to_table(request.request_id, owned, block)
        return True

    def can_allocate_all(self, requests_and_tokens: Sequence[tuple]) -> bool:
        """Whether `allocate_slots(request, n)` would succeed for every (request, n) together
        (no cached blocks taken). Changes nothing."""
        capacity = self._capacity()
        quota = {m: self.quota_left(m) for m in self._geometries}
        for request, n in requests_and_tokens:
            g = self.geometry(request.model)
            total = request.num_computed_tokens + n
            if total > g.max_model_len:
                return False
            num_fresh = g.num_blocks(total) - len(self._blocks.get(request.request_id, []))
            if quota[request.model] is not None:
                quota[request.model] -= max(num_fresh, 0) * g.num_layers
                if quota[request.model] < 0:
                    return False
            home = self._home_device(self._blocks.get(request.request_id, ()))
            if self._plan(num_fresh, g.num_layers, (), capacity, home=home,
                          pinned=self._pinned[request.model], starts=self._homes[request.model]) is None:
                return False
        return True

    def _capacity(self) -> list[int]:
        return [self.allocator.num_free(d) + self._evictable_pages[d] for d in range(self.allocator.num_devices)]

    def _home_device(self, blocks: Sequence[KVBlock]) -> Optional[int]:
        """With sticky placement, the device of the request's last block, where its next blocks go
        while that device has room (None: it holds none yet)."""
        return blocks[-1].device if self.placement == "sticky" and blocks else None

    def _plan(self, num_fresh: int, L: int, taken: Sequence[KVBlock],
              capacity: Optional[list[int]] = None, home: Optional[int] = None,
              pinned: Optional[int] = None, starts: Optional[tuple] = None) -> Optional[list[int]]:
        """Devices for num_fresh new blocks of L pages each (most capacity first), or None.
        Consumes `capacity` (per-device free + evictable pages) as it plans. Sticky placement
        keeps each block on the current device (`home`, then wherever the last block went)
        while it has room for L pages and spills to the device with the most capacity when
        not (home None: start on the one of `starts` with the most, or on the roomiest device
        when none of them has room for a block); a pinned model's blocks all go to its device."""
        if num_fresh <= 0:
            return []
        capacity = self._capacity() if capacity is None else capacity
        for b in taken:
            if b.ref_count == 0:        # about to leave the evictable set
                capacity[b.device] -= len(b.pages)
        if pinned is not None:
            if capacity[pinned] < num_fresh * L:
                return None
            capacity[pinned] -= num_fresh * L
            return [pinned] * num_fresh
        plan, device = [], home
        if device is None and starts is not None and self.placement == "sticky":
            device = max(starts, key=lambda d: (capacity[d], -d))     # else: the roomiest of all
        for _ in range(num_fresh):
            if self.placement == "spread" or device is None or capacity[device] < L:
                device = max(range(len(capacity)), key=lambda d: (capacity[d], -d))
            if capacity[device] < L:
                return None
            capacity[device] -= L
            plan.append(device)
        return plan

    def _add_to_table(self, request_id: str, owned: list[KVBlock], block: KVBlock) -> None:
        """Write the block's pages as column len(owned)-1 of the request's table (grown by doubling,
        so views handed out earlier stay valid snapshots)."""
        column = len(owned) - 1
        table = self._tables.get(request_id)
        if table is None or table.shape[1] <= column:
            grown = np.empty((len(block.pages), max(16, 2 * column)), np.int32)
            if table is not None:
                grown[:, :column] = table[:, :column]
            self._tables[request_id] = table = grown
        table[:, column] = block.pages

    def _ref(self, block: KVBlock) -> None:
        if block.ref_count == 0:
            if id(block) in self._evictable[block.device]:
                del self._evictable[block.device][id(block)]
                self._evictable_pages[block.device] -= len(block.pages)
            self._used_by_model[block.model] += len(block.pages)
        block.ref_count += 1

    def _evict_one(self, device: int) -> int:
        _, block = self._evictable[device].popitem(last=False)
        self._evictable_pages[device] -= len(block.pages)
        if self._cached.get(block.block_hash) is block:
            del self._cached[block.block_hash]
        block.block_hash = None
        self.allocator.free(block.pages)
        return len(block.pages)

    def free(self, request) -> None:
        """Drop the request's references (finished, aborted or preempted). Hashed blocks that
        reach ref 0 stay cached and evictable (the tail block first in line); others go back."""
        blocks = self._blocks.pop(request.request_id, [])
        self._tables.pop(request.request_id, None)
        self._hashes.pop(request.request_id, None)
        self._num_hashed.pop(request.request_id, None)
        for block in reversed(blocks):
            block.ref_count -= 1
            if block.ref_count > 0:
                continue
            self._used_by_model[block.model] -= len(block.pages)
            if block.block_hash is not None:
                self._evictable[block.device][id(block)] = block
                self._evictable_pages[block.device] += len(block.pages)
            else:
                self.allocator.free(block.pages)

    # ----- queries ---------------------------------------------------------------------------
    def page_table(self, request) -> list[list[int]]:
        """[L][num_blocks] global page ids of the request (L lists, even when it holds no block)."""
        return self.page_table_array(request).tolist()

    def page_table_array(self, request) -> np.ndarray:
        """The same as a read-only int32 array [L, num_blocks]: a view, O(1), that stays a valid
        snapshot when the request grows or is freed."""
        table = self._tables.get(request.request_id)
        if table is None:
            view = np.zeros((self.geometry(request.model).num_layers, 0), np.int32)
        else:
            view = table[:, :len(self._blocks[request.request_id])]
        view.flags.writeable = False
        return view

    def home_device(self, request) -> Optional[int]:
        """With sticky placement, the KV device of the request's last block, where it grows while
        that device has room (None when it holds none, or with spread placement)."""
        return self._home_device(self._blocks.get(request.request_id, ()))

    def blocks_of(self, request) -> list[KVBlock]:
        return list(self._blocks.get(request.request_id, []))

    def pages_used_by_model(self) -> dict[str, int]:
        """Pages held by live requests, per registered model (shared blocks counted once;
        evictable cached blocks not counted)."""
        return dict(self._used_by_model)

    def num_evictable_pages(self, device: Optional[int] = None) -> int:
        """Pages of cached blocks no request holds (free capacity, reclaimed on demand)."""
        return sum(self._evictable_pages) if device is None else self._evictable_pages[device]

    def num_free_pages(self, device: Optional[int] = None) -> int:
        """Free pages plus evictable cached pages."""
        return self.allocator.num_free(device) + self.num_evictable_pages(device)

    def usage(self) -> float:
        """Fraction of the pool held by live requests (evictable cached blocks count as free)."""
        return 1.0 - self.num_free_pages() / self.allocator.num_total
