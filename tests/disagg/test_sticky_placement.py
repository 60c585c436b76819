"""Sticky KV placement (what the disaggregated step prefers): a request's blocks stay on the
device of its last block while it has room and spill to the device with the most free pages
when not (so one request can use the whole pool); admission starts where most pages are free;
prefix hits may span devices and growth continues on the last hit's device; a pinned model
never spills.

(Host-only; beside the disagg tests because the disagg path is what needs it.)
"""
import random

import pytest

from crosspool_jax.engine.request import Request
from crosspool_jax.kv.allocator import PageAllocator
from crosspool_jax.kv.kv_cache_manager import KVCacheManager, ModelKVGeometry
from crosspool_jax.sampling_params import SamplingParams

PARAMS = SamplingParams(max_tokens=8)


def make(placement, pages_per_device=24, num_devices=3, caching=True):
    kv = KVCacheManager(PageAllocator(pages_per_device, num_devices), enable_prefix_caching=caching,
                        placement=placement)
    kv.register_model(ModelKVGeometry("a", num_layers=2, tokens_per_page=4, max_model_len=256))
    kv.register_model(ModelKVGeometry("b", num_layers=3, tokens_per_page=2, max_model_len=256))
    return kv


def grow(kv, r, n):
    ok = kv.allocate_slots(r, n)
    if ok:
        r.num_computed_tokens += n
        kv.cache_full_blocks(r)
    return ok


def block_devices(kv, r):
    return [b.device for b in kv.blocks_of(r)]


def devices_of(kv, r):
    return {kv.allocator.device_of(p) for row in kv.page_table(r) for p in row}


def test_bad_placement_raises():
    with pytest.raises(ValueError, match="placement must be one of"):
        KVCacheManager(PageAllocator(4, 2), placement="random")


def test_spread_default_crosses_devices_sticky_stays_while_room():
    spread, sticky = make("spread"), make("sticky")
    assert spread.placement == "spread"
    for kv, want in ((spread, 3), (sticky, 1)):
        r = Request("r", "a", [random.randrange(1, 99) for _ in range(40)], PARAMS)
        assert grow(kv, r, 40)                                # 10 blocks of 2 pages (device 0 holds 24)
        assert len(devices_of(kv, r)) == want
        assert kv.home_device(r) == (0 if kv is sticky else None)
    # both placements let one request use the whole pool: 3 devices x 12 blocks of model a
    assert sticky.max_request_tokens("a") == spread.max_request_tokens("a") == 3 * 48


def test_sticky_admission_picks_most_free_and_growth_stays():
    rng = random.Random()
    kv = make("sticky")
    reqs = []
    for i in range(6):
        r = Request(f"r{i}", rng.choice("ab"), [rng.randrange(1, 99) for _ in range(rng.randrange(3, 9))], PARAMS)
        free_before = [kv.num_free_pages(d) for d in range(3)]
        assert kv.home_device(r) is None
        assert grow(kv, r, r.num_tokens)
        (d,) = devices_of(kv, r)
        assert free_before[d] == max(free_before) and kv.home_device(r) == d
        reqs.append((r, d))
    for r, _ in reqs:                      # decode growth: a new block where the last one is, while room
        L = kv.geometry(r.model).num_layers
        for _ in range(5):
            r.output_token_ids.append(rng.randrange(1, 99))
            before, last = len(kv.blocks_of(r)), kv.home_device(r)
            free_before = [kv.num_free_pages(d) for d in range(3)]
            if not grow(kv, r, 1):
                break
            if len(kv.blocks_of(r)) > before:
                want = last if free_before[last] >= L else free_before.index(max(free_before))
                assert kv.blocks_of(r)[-1].device == want == kv.home_device(r)
    for r, _ in reqs:
        kv.free(r)
    assert kv.pages_used_by_model() == {"a": 0, "b": 0}
    kv.reset_prefix_cache()
    assert kv.allocator.num_free() == kv.allocator.num_total


def test_sticky_spills_only_when_the_device_is_full_then_stays():
    kv = make("sticky", caching=False)
    big = Request("big", "a", [random.randrange(1, 99) for _ in range(40)], PARAMS)
    assert grow(kv, big, 40)                               # 10 blocks = 20 of device 0's 24 pages
    assert kv.home_device(big) == 0 and kv.num_free_pages(0) == 4
    small = Request("small", "b", [1, 2, 3], PARAMS)
    assert grow(kv, small, 3)                              # 2 blocks x 3 pages on device 1 (most free)
    assert block_devices(kv, small) == [1, 1]
    assert kv.can_allocate_all([(big, 12)])
    assert grow(kv, big, 12)                               # 3 more blocks: 2 fit on device 0, 1 spills
    assert block_devices(kv, big) == [0] * 12 + [2]        # to the device with the most free pages
    assert kv.num_free_pages(0) == 0 and kv.home_device(big) == 2
    for _ in range(3):                                     # growth stays on device 2 while it has room
        assert grow(kv, big, 4)
    assert block_devices(kv, big) == [0] * 12 + [2] * 4
    # the whole pool: 72 pages - small's 6 = 33 blocks of model a at most
    assert kv.can_allocate_all([(big, (33 - 16) * 4)]) and not kv.can_allocate_all([(big, (33 - 16) * 4 + 1)])
    assert not kv.allocate_slots(big, (33 - 16) * 4 + 1)   # refused, nothing changed
    assert len(kv.blocks_of(big)) == 16
    assert grow(kv, big, (33 - 16) * 4) and kv.num_free_pages() == 0
    assert devices_of(kv, big) == {0, 1, 2}
    kv.free(big)
    kv.free(small)
    assert kv.allocator.num_free() == kv.allocator.num_total


def test_sticky_pinned_model_never_spills():
    kv = make("sticky", caching=False)
    kv.register_model(ModelKVGeometry("p", num_layers=2, tokens_per_page=4, max_model_len=256), device=1)
    assert kv.max_request_tokens("p") == 48                # one device: 12 blocks of 4 tokens
    r = Request("r", "p", [random.randrange(1, 99) for _ in range(44)], PARAMS)
    assert grow(kv, r, 44) and devices_of(kv, r) == {1}    # 11 blocks = 22 of device 1's 24 pages
    assert not kv.can_allocate_all([(r, 8)]) and not kv.allocate_slots(r, 8)
    assert kv.num_free_pages(0) == kv.num_free_pages(2) == 24
    assert grow(kv, r, 4) and devices_of(kv, r) == {1} and kv.num_free_pages(1) == 0


def test_sticky_prefix_hits_may_span_devices():
    kv = make("sticky", num_devices=2)
    prompt = [random.randrange(1, 99) for _ in range(57)]
    first = Request("first", "a", prompt, PARAMS)
    assert grow(kv, first, 57)                             # 15 blocks: 12 fill device 0, 3 spill to 1
    assert block_devices(kv, first) == [0] * 12 + [1] * 3
    kv.free(first)                                         # its full blocks stay cached
    second = Request("second", "a", prompt + [5, 6, 7], PARAMS)
    hits, n = kv.get_computed_blocks(second)
    assert n == 56 and [b.device for b in hits] == [0] * 12 + [1] * 2
    assert kv.allocate_slots(second, second.num_tokens - n, hits)
    assert block_devices(kv, second) == [0] * 12 + [1] * 3   # continues on the last hit's device
