"""KVCacheManager: blocks per request, prefix-cache hits and ref counts, eviction, and a
hypothesis state machine over allocate / grow / finish / abort / preempt."""
import random

import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from crosspool_jax.engine.request import Request
from crosspool_jax.kv.allocator import PageAllocator
from crosspool_jax.kv.kv_cache_manager import KVCacheManager, ModelKVGeometry
from crosspool_jax.sampling_params import SamplingParams

PARAMS = SamplingParams(max_tokens=8)


def make_manager(pages_per_device=24, num_devices=1, caching=True):
    kv = KVCacheManager(PageAllocator(pages_per_device, num_devices), enable_prefix_caching=caching)
    kv.register_model(ModelKVGeometry("a", num_layers=2, tokens_per_page=4, max_model_len=64))
    kv.register_model(ModelKVGeometry("b", num_layers=3, tokens_per_page=2, max_model_len=64))
    return kv


def req(rid, model, tokens):
    return Request(rid, model, list(tokens), PARAMS)


def compute_all(kv, r, n=None):
    """Allocate and 'compute' the request's whole gap (or n tokens) like a scheduler step would."""
    n = r.num_tokens - r.num_computed_tokens if n is None else n
    assert kv.allocate_slots(r, n)
    r.num_computed_tokens += n
    kv.cache_full_blocks(r)


def pool_pages_accounted(kv):
    """Every page is exactly one of: free in the allocator, in a live block, in an evictable block."""
    live = {id(b): b for blocks in kv._blocks.values() for b in blocks}
    evictable = {id(b): b for od in kv._evictable for b in od.values()}
    assert not set(live) & set(evictable)
    pages = [p for b in list(live.values()) + list(evictable.values()) for p in b.pages]
    assert len(pages) == len(set(pages))
    assert len(pages) + kv.allocator.num_free() == kv.allocator.num_total
    for b in live.values():
        holders = sum(1 for blocks in kv._blocks.values() for x in blocks if x is b)
        assert b.ref_count == holders
        assert {kv.allocator.device_of(p) for p in b.pages} == {b.device}
    for b in evictable.values():
        assert b.ref_count == 0 and b.block_hash is not None
    return live, evictable


def test_geometry_and_registration_validation():
    with pytest.raises(ValueError, match=r"ModelKVGeometry\(m\).tokens_per_page"):
        ModelKVGeometry("m", 2, 0, 16)
    with pytest.raises(ValueError, match="name"):
        ModelKVGeometry("", 2, 4, 16)
    kv = make_manager()
    kv.register_model(ModelKVGeometry("a", 2, 4, 64))            # same geometry: idempotent
    with pytest.raises(ValueError, match="already registered"):
        kv.register_model(ModelKVGeometry("a", 2, 8, 64))
    with pytest.raises(ValueError, match="num_layers=30 pages"):
        kv.register_model(ModelKVGeometry("huge", 30, 4, 64))
    with pytest.raises(ValueError, match="unknown model 'zzz'"):
        kv.geometry("zzz")
    assert kv.pages_used_by_model() == {"a": 0, "b": 0}
    assert kv.max_request_tokens("a") == 12 * 4 and kv.max_request_tokens("b") == 8 * 2


def test_pinned_model_uses_only_its_device():
    rng = random.Random(5)
    kv = KVCacheManager(PageAllocator(12, 3), enable_prefix_caching=False)
    kv.register_model(ModelKVGeometry("a", 2, 4, 256), device=2)
    kv.register_model(ModelKVGeometry("b", 2, 4, 256))
    with pytest.raises(ValueError, match="device must be a KV device index in \\[0, 3\\)"):
        kv.register_model(ModelKVGeometry("c", 2, 4, 64), device=3)
    assert kv.pinned_device("a") == 2 and kv.pinned_device("b") is None
    # pinned: one device's pages at most, whatever the placement ("spread" here)
    assert kv.max_request_tokens("a") == 6 * 4 and kv.max_request_tokens("b") == 3 * 6 * 4
    r = req("r", "a", [rng.randrange(1, 100) for _ in range(20)])     # 5 blocks = 10 pages
    compute_all(kv, r)
    assert {b.device for b in kv.blocks_of(r)} == {2}
    assert kv.num_free_pages(2) == 2 and kv.num_free_pages(0) == kv.num_free_pages(1) == 12
    big = req("big", "a", [rng.randrange(1, 100) for _ in range(8)])  # 2 more blocks: device 2 is full
    assert not kv.can_allocate_all([(big, 8)]) and not kv.allocate_slots(big, 8)
    assert kv.num_free_pages(2) == 2 and kv.blocks_of(big) == []
    other = req("o", "b", [rng.randrange(1, 100) for _ in range(8)])  # unpinned model still spreads
    compute_all(kv, other)
    assert {b.device for b in kv.blocks_of(other)} == {0, 1}
    pool_pages_accounted(kv)


def test_max_pages_caps_a_model_without_side_effects():
    rng = random.Random(23)
    kv = KVCacheManager(PageAllocator(40))
    kv.register_model(ModelKVGeometry("a", 2, 4, 64), max_pages=6)
    kv.register_model(ModelKVGeometry("b", 3, 2, 64))
    with pytest.raises(ValueError, match="max_pages must be an integer in"):
        kv.register_model(ModelKVGeometry("c", 2, 4, 64), max_pages=1)
    assert kv.max_request_tokens("a") == 3 * 4 and kv.quota_left("a") == 6 and kv.quota_left("b") is None
    r1 = req("r1", "a", [rng.randrange(1, 100) for _ in range(8)])
    compute_all(kv, r1)                                           # 2 blocks = 4 pages
    r2 = req("r2", "a", [rng.randrange(1, 100) for _ in range(5)])
    assert kv.exceeds_quota(r2, 5) and not kv.allocate_slots(r2, 5)   # 2 more blocks > 2 pages left
    assert kv.blocks_of(r2) == [] and kv.pages_used_by_model()["a"] == 4
    assert kv.allocate_slots(r2, 4) and kv.quota_left("a") == 0
    assert not kv.can_allocate_all([(r1, 1)]) and kv.can_allocate_all([(r1, 0)])
    kv.free(r1)                                                   # its 2 hashed blocks stay cached
    assert kv.quota_left("a") == 4
    r3 = req("r3", "a", r1.prompt_token_ids + [7])
    blocks, num_cached = kv.get_computed_blocks(r3)
    assert num_cached == 8
    assert kv.exceeds_quota(r3, 5, blocks)                        # reviving 2 blocks + 1 new = 6 pages > 4
    assert kv.allocate_slots(r3, 1, blocks[:1]) and kv.quota_left("a") == 0   # 1 revived + 1 new block
    kv.free(r2)
    kv.free(r3)
    pool_pages_accounted(kv)


def test_page_table_layout_and_free():
    rng = random.Random(7)
    kv = make_manager()
    r = req("r", "a", [rng.randrange(1, 100) for _ in range(9)])
    assert kv.page_table(r) == [[], []]
    compute_all(kv, r)                                            # 9 tokens -> 3 blocks of G=4
    table = kv.page_table(r)
    assert len(table) == 2 and all(len(row) == 3 for row in table)
    assert len({p for row in table for p in row}) == 6
    assert kv.pages_used_by_model() == {"a": 6, "b": 0}
    assert kv.allocate_slots(r, 3)                                # 12 tokens still fit in 3 blocks
    assert len(kv.page_table(r)[0]) == 3
    assert kv.allocate_slots(r, 4)                                # 13 tokens -> a 4th block
    assert len(kv.page_table(r)[0]) == 4
    kv.free(r)
    # two full computed blocks were hashed: they stay cached (evictable), the rest went back.
    assert kv.pages_used_by_model() == {"a": 0, "b": 0}
    assert kv.num_evictable_pages() == 4
    assert kv.num_free_pages() == kv.allocator.num_total and kv.usage() == 0.0
    pool_pages_accounted(kv)
    assert kv.reset_prefix_cache() == 4 and kv.allocator.num_free() == kv.allocator.num_total


def test_page_table_array_is_a_read_only_snapshot():
    rng = random.Random(9)
    kv = make_manager(pages_per_device=200)
    r = req("r", "b", [rng.randrange(1, 100) for _ in range(5)])
    compute_all(kv, r)
    view = kv.page_table_array(r)
    assert view.dtype.name == "int32" and view.shape == (3, 3) and view.tolist() == kv.page_table(r)
    with pytest.raises(ValueError):
        view[0, 0] = 1
    assert kv.allocate_slots(r, 40)                               # 23 blocks: past the first capacity (16)
    assert view.tolist() == [row[:3] for row in kv.page_table(r)]
    assert kv.page_table_array(r).shape == (3, 23)
    kv.free(r)
    assert kv.page_table_array(r).shape == (3, 0) and view.shape == (3, 3)


def test_shared_prefix_shares_pages_and_counts_refs():
    rng = random.Random(11)
    kv = make_manager()
    prefix = [rng.randrange(1, 100) for _ in range(8)]
    r1 = req("r1", "a", prefix + [rng.randrange(1, 100) for _ in range(3)])
    compute_all(kv, r1)
    r2 = req("r2", "a", prefix + [rng.randrange(1, 100) for _ in range(5)])
    blocks, num_cached = kv.get_computed_blocks(r2)
    assert num_cached == 8 and len(blocks) == 2
    assert all(b.ref_count == 1 for b in blocks)                  # get_computed_blocks takes no reference
    assert kv.allocate_slots(r2, r2.num_tokens - num_cached, blocks)
    r2.num_computed_tokens = num_cached
    assert [b.ref_count for b in kv.blocks_of(r2)] == [2, 2, 1, 1]
    t1, t2 = kv.page_table(r1), kv.page_table(r2)
    for layer in range(2):
        assert t1[layer][:2] == t2[layer][:2] and t1[layer][2] != t2[layer][2]
    assert kv.pages_used_by_model()["a"] == 2 * (3 + 4 - 2)      # shared blocks counted once
    # same tokens, other model: no hit.
    other = req("o", "b", prefix + [5])
    assert kv.get_computed_blocks(other) == ([], 0)
    kv.free(r1)
    assert [b.ref_count for b in kv.blocks_of(r2)] == [1, 1, 1, 1]
    assert kv.pages_used_by_model()["a"] == 8
    kv.free(r2)
    assert kv.pages_used_by_model()["a"] == 0
    pool_pages_accounted(kv)


def test_hash_is_chained_over_the_parent_block():
    rng = random.Random(17)
    kv = make_manager()
    head_x, head_y, shared = ([rng.randrange(1, 100) for _ in range(4)] for _ in range(3))
    x = req("x", "a", head_x + shared + [1])
    y = req("y", "a", head_y + shared + [1])
    compute_all(kv, x)
    compute_all(kv, y)                          # y's second block: same tokens as x's, other context
    z = req("z", "a", head_y + shared + [2, 2])
    blocks, num_cached = kv.get_computed_blocks(z)
    assert num_cached == 8 and blocks == kv.blocks_of(y)[:2]
    assert kv.get_computed_blocks(req("w", "a", [5] * 4 + shared + [3])) == ([], 0)


def test_never_the_whole_request_and_revival_after_free():
    rng = random.Random(3)
    kv = make_manager()
    tokens = [rng.randrange(1, 100) for _ in range(8)]            # exactly two full blocks
    r1 = req("r1", "a", tokens)
    compute_all(kv, r1)
    kv.free(r1)
    assert kv.num_evictable_pages() == 4
    r2 = req("r2", "a", tokens)
    blocks, num_cached = kv.get_computed_blocks(r2)
    assert num_cached == 4 and len(blocks) == 1                   # the last token must be computed
    assert kv.allocate_slots(r2, 4, blocks)
    assert kv.num_evictable_pages() == 2                          # revived block left the evictable set
    assert kv.pages_used_by_model()["a"] == 4
    pool_pages_accounted(kv)


def test_disabled_prefix_caching_never_hits():
    kv = make_manager(caching=False)
    tokens = [random.Random(5).randrange(1, 100) for _ in range(12)]
    r1 = req("r1", "a", tokens)
    compute_all(kv, r1)
    kv.free(r1)
    assert kv.num_evictable_pages() == 0 and kv.allocator.num_free() == kv.allocator.num_total
    assert kv.get_computed_blocks(req("r2", "a", tokens)) == ([], 0)


def test_eviction_least_recently_freed_first_and_failure_has_no_side_effects():
    rng = random.Random(21)
    kv = make_manager(pages_per_device=12)                        # 6 blocks of model a
    old = req("old", "a", [rng.randrange(1, 100) for _ in range(9)])
    new = req("new", "a", [rng.randrange(1, 100) for _ in range(9)])
    compute_all(kv, old)                                          # 3 blocks (2 hashed)
    compute_all(kv, new)                                          # 3 blocks (2 hashed)
    kv.free(old)
    kv.free(new)
    assert kv.num_evictable_pages() == 8 and kv.allocator.num_free() == 4
    # needs 3 blocks = 6 pages: 4 free + one evicted block (old's tail block: least recently freed).
    r = req("r", "a", [rng.randrange(1, 100) for _ in range(12)])
    assert kv.allocate_slots(r, 12)
    assert kv.num_evictable_pages() == 6
    assert kv.get_computed_blocks(req("q1", "a", old.prompt_token_ids))[1] == 4   # old's head block survives
    assert kv.get_computed_blocks(req("q2", "a", new.prompt_token_ids))[1] == 8
    # a request needing more than free + evictable fails without touching anything.
    snapshot = (kv.allocator.num_free(), kv.num_evictable_pages(), dict(kv.pages_used_by_model()))
    big = req("big", "a", [rng.randrange(1, 100) for _ in range(20)])
    assert not kv.allocate_slots(big, 20)
    assert (kv.allocator.num_free(), kv.num_evictable_pages(), kv.pages_used_by_model()) == snapshot
    assert kv.blocks_of(big) == []
    # but exactly the free + evictable capacity succeeds, evicting everything.
    assert kv.allocate_slots(big, 12)
    assert kv.num_evictable_pages() == 0 and kv.allocator.num_free() == 0
    assert kv.get_computed_blocks(req("q3", "a", new.prompt_token_ids)) == ([], 0)
    for x in (r, big):
        kv.free(x)
    pool_pages_accounted(kv)


def test_blocks_spread_over_devices_each_block_on_one_device():
    rng = random.Random(8)
    kv = make_manager(pages_per_device=9, num_devices=2)          # model b: 3 blocks per device
    r = req("r", "b", [rng.randrange(1, 100) for _ in range(11)])  # 6 blocks of G=2: needs both devices
    assert kv.max_request_tokens("b") == 12
    compute_all(kv, r)
    devices = [b.device for b in kv.blocks_of(r)]
    assert sorted(devices) == [0, 0, 0, 1, 1, 1]
    table = kv.page_table(r)
    for i, device in enumerate(devices):
        assert {kv.allocator.device_of(table[layer][i]) for layer in range(3)} == {device}
    assert not kv.allocate_slots(r, 2)                            # a 7th block fits nowhere
    assert kv.can_allocate_all([(r, 1)]) and not kv.can_allocate_all([(r, 2)])
    kv.free(r)
    pool_pages_accounted(kv)


def test_allocate_slots_argument_errors():
    rng = random.Random(2)
    kv = make_manager()
    r = req("r", "a", [rng.randrange(1, 100) for _ in range(9)])
    compute_all(kv, r)
    s = req("s", "a", r.prompt_token_ids)
    blocks, _ = kv.get_computed_blocks(s)
    assert blocks
    with pytest.raises(ValueError, match="holds no blocks yet"):
        kv.allocate_slots(r, 1, blocks)
    with pytest.raises(ValueError, match="max_model_len of 64"):
        kv.allocate_slots(r, 60)
    with pytest.raises(ValueError, match="num_new_tokens must be >= 0"):
        kv.allocate_slots(r, -1)


class ManagerMachine(RuleBasedStateMachine):
    """Random interleavings of admit (with prefix hits), grow, finish, abort and preempt
    over two models on a two-device pool: no page leaks, no page with two owners, ref
    counts match the holders, and the pool returns to empty."""

    def __init__(self):
        super().__init__()
        self.kv = make_manager(pages_per_device=14, num_devices=2)
        self.requests: dict[str, Request] = {}
        self.count = 0

    @rule(model=st.sampled_from(["a", "b"]), head=st.sampled_from([(), (1, 2) * 4, (2, 2, 1, 1) * 3]),
          tokens=st.lists(st.integers(1, 2), min_size=1, max_size=10))
    def admit(self, model, head, tokens):
        r = req(f"r{self.count}", model, list(head) + tokens)
        self.count += 1
        blocks, num_cached = self.kv.get_computed_blocks(r)
        assert num_cached < r.num_tokens
        before = self.kv.num_free_pages()
        if self.kv.allocate_slots(r, r.num_tokens - num_cached, blocks):
            r.num_computed_tokens = num_cached
            self.requests[r.request_id] = r
        else:
            assert self.kv.num_free_pages() == before and self.kv.blocks_of(r) == []
            self.kv.free(r)

    @precondition(lambda self: self.requests)
    @rule(data=st.data(), new=st.lists(st.integers(1, 2), min_size=0, max_size=4))
    def grow(self, data, new):
        r = self.requests[data.draw(st.sampled_from(sorted(self.requests)))]
        gap = r.num_tokens - r.num_computed_tokens
        if self.kv.allocate_slots(r, gap + len(new)):
            r.num_computed_tokens += gap            # the gap was computed; `new` tokens are sampled
            r.output_token_ids.extend(new)
            self.kv.cache_full_blocks(r)

    @precondition(lambda self: self.requests)
    @rule(data=st.data())
    def finish_or_abort(self, data):
        r = self.requests.pop(data.draw(st.sampled_from(sorted(self.requests))))
        self.kv.free(r)

    @precondition(lambda self: self.requests)
    @rule(data=st.data())
    def preempt(self, data):
        r = self.requests[data.draw(st.sampled_from(sorted(self.requests)))]
        self.kv.free(r)
        r.num_computed_tokens = 0
        blocks, num_cached = self.kv.get_computed_blocks(r)
        if self.kv.allocate_slots(r, r.num_tokens - num_cached, blocks):
            r.num_computed_tokens = num_cached
        else:
            self.kv.free(r)
            del self.requests[r.request_id]

    @invariant()
    def accounted(self):
        live, _ = pool_pages_accounted(self.kv)
        for r in self.requests.values():
            g = self.kv.geometry(r.model)
            assert len(self.kv.blocks_of(r)) * g.tokens_per_page >= r.num_computed_tokens
            assert self.kv.page_table(r) == [[b.pages[layer] for b in self.kv.blocks_of(r)]
                                             for layer in range(g.num_layers)]
        used = {"a": 0, "b": 0}
        for b in live.values():
            used[b.model] += len(b.pages)
        assert self.kv.pages_used_by_model() == used

    def teardown(self):
        for r in self.requests.values():
            self.kv.free(r)
        assert self.kv.pages_used_by_model() == {"a": 0, "b": 0}
        assert self.kv.num_free_pages() == self.kv.allocator.num_total
        self.kv.reset_prefix_cache()
        assert self.kv.allocator.num_free() == self.kv.allocator.num_total


ManagerMachine.TestCase.settings = settings(max_examples=80, stateful_step_count=30, deadline=None)
TestManagerMachine = ManagerMachine.TestCase


def test_requests_start_on_their_models_homes_and_spill_anywhere():
    """A crosspool arena's pool: devices with different usable pages (a weight device's rows
    hold pages too), each model's requests starting on its home devices (its attention side),
    growing there while it has room, then spilling onto the device with the most room."""
    kv = KVCacheManager(PageAllocator(8, 3, device_pages=(4, 8, 6)), enable_prefix_caching=False,
                        placement="sticky")
    kv.register_model(ModelKVGeometry("a", num_layers=2, tokens_per_page=4, max_model_len=64), homes=(0,))
    kv.register_model(ModelKVGeometry("b", num_layers=2, tokens_per_page=4, max_model_len=64), homes=(1,))
    assert kv.max_request_tokens("a") == (2 + 4 + 3) * 4                  # every device's whole blocks
    r = req("r", "a", range(12))                                           # 3 blocks
    assert kv.allocate_slots(r, 12)
    assert [b.device for b in kv.blocks_of(r)] == [0, 0, 1]                # home full: spill to the roomiest
    assert all(p // 8 == b.device for b in kv.blocks_of(r) for p in b.pages)
    t = req("t", "b", range(3))
    assert kv.allocate_slots(t, 3) and kv.blocks_of(t)[0].device == 1
    s = req("s", "a", range(3))                                             # its home is full: the roomiest
    assert kv.allocate_slots(s, 3) and kv.blocks_of(s)[0].device == 2
    kv.free(r)
    u = req("u", "a", range(3))
    assert kv.allocate_slots(u, 3) and kv.blocks_of(u)[0].device == 0 and kv.num_free_pages() == 18 - 6
    with pytest.raises(ValueError, match="homes must be device indices"):
        kv.register_model(ModelKVGeometry("c", num_layers=2, tokens_per_page=4, max_model_len=64), homes=(3,))
