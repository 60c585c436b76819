"""Sticky KV placement (what the disaggregated step needs): every block of a request on one
KV device, chosen at admission where most pages are free; prefix hits pin the device.

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


def devices_of(kv, r):
    return {kv.allocator.device_of(p) for row in kv.page_table(r) for p in row}


def test_bad_placement_raises():
    with pytest.raises(ValueError, match="placement must be one of"):
        KVCacheManager(PageAllocator(4, 2), placement="random")


def test_spread_default_crosses_devices_sticky_does_not():
    spread, sticky = make("spread"), make("sticky")
    assert spread.placement == "spread"
    for kv, want in ((spread, 3), (sticky, 1)):
        r = Request("r", "a", [random.randrange(1, 99) for _ in range(40)], PARAMS)
        assert grow(kv, r, 40)                                # 10 blocks of 2 pages
        assert len(devices_of(kv, r)) == want
        assert kv.home_device(r) == (0 if kv is sticky else None)
    # one device holds 24 pages = 12 blocks of model a = 48 tokens
    assert sticky.max_request_tokens("a") == 48 and spread.max_request_tokens("a") == 3 * 48


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
    for r, d in reqs:                                         # decode growth stays home
        for _ in range(5):
            r.output_token_ids.append(rng.randrange(1, 99))
            if not grow(kv, r, 1):
                break
            assert devices_of(kv, r) == {d}
    for r, _ in reqs:
        kv.free(r)
    assert kv.pages_used_by_model() == {"a": 0, "b": 0}
    kv.reset_prefix_cache()
    assert kv.allocator.num_free() == kv.allocator.num_total


def test_sticky_request_does_not_spill_to_other_devices():
    kv = make("sticky", caching=False)
    big = Request("big", "a", [random.randrange(1, 99) for _ in range(40)], PARAMS)
    assert grow(kv, big, 40)                               # 10 blocks = 20 of device 0's 24 pages
    assert kv.home_device(big) == 0 and kv.num_free_pages(0) == 4
    assert kv.can_allocate_all([(big, 8)]) and not kv.can_allocate_all([(big, 12)])
    assert not kv.allocate_slots(big, 12)                  # 3 more blocks: device 0 has room for 2
    assert kv.num_free_pages(1) == kv.num_free_pages(2) == 24
    assert grow(kv, big, 8) and kv.num_free_pages(0) == 0 and devices_of(kv, big) == {0}
    kv.free(big)
    assert kv.allocator.num_free() == kv.allocator.num_total


def test_sticky_prefix_hit_pins_device():
    kv = make("sticky", num_devices=2)
    prompt = [random.randrange(1, 99) for _ in range(17)]
    first = Request("first", "a", prompt, PARAMS)
    assert grow(kv, first, 17)
    (home,) = devices_of(kv, first)
    # fill the other device less than home so "most free" would pick it without the hit
    hog = Request("hog", "b", [random.randrange(1, 99) for _ in range(4)], PARAMS)
    assert grow(kv, hog, 4)
    second = Request("second", "a", prompt + [5, 6, 7], PARAMS)
    hits, n = kv.get_computed_blocks(second)
    assert n == 16 and {b.device for b in hits} == {home}
    assert kv.allocate_slots(second, second.num_tokens - n, hits)
    assert devices_of(kv, second) == {home}
