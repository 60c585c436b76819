"""LruBudget: budget arithmetic and LRU order, no JAX."""
import random

import pytest

from crosspool_jax.weights.budget import LruBudget, WeightsPoolBusyError


def _budget(sizes, budget):
    b = LruBudget(budget)
    for name, n in sizes.items():
        b.add(name, n)
    return b


def test_fits_and_lru_eviction_order():
    b = _budget({"a": 40, "b": 30, "c": 30, "d": 50}, 100)
    for m in ("a", "b", "c"):
        assert b.plan_fit(m) == []
        b.mark_resident(m)
    assert b.bytes_resident == 100 and b.free_bytes == 0
    assert b.resident_names() == ["a", "b", "c"]
    b.touch("a")  # a becomes most recent: b, c are the oldest
    assert b.resident_names() == ["b", "c", "a"]
    victims = b.plan_fit("d")
    assert victims == ["b", "c"]  # 30 + 30 frees 60 >= 50
    for v in victims:
        b.mark_evicted(v)
    b.mark_resident("d")
    assert b.resident_names() == ["a", "d"] and b.bytes_resident == 90


def test_in_use_is_never_a_victim():
    b = _budget({"a": 50, "b": 50, "c": 50}, 100)
    b.mark_resident("a")
    b.mark_resident("b")
    b.pin("a")  # a is oldest but in use
    assert b.plan_fit("c") == ["b"]
    b.pin("b")
    with pytest.raises(WeightsPoolBusyError, match="in use"):
        b.plan_fit("c")
    with pytest.raises(WeightsPoolBusyError):
        b.mark_evicted("a")
    b.unpin("a")
    assert b.plan_fit("c") == ["a"]
    with pytest.raises(ValueError, match="not in use"):
        b.unpin("a")


def test_nested_pins_count():
    b = _budget({"a": 10, "b": 10}, 10)
    b.mark_resident("a")
    b.pin("a")
    b.pin("a")
    b.unpin("a")
    assert b.in_use("a") == 1
    with pytest.raises(WeightsPoolBusyError):
        b.plan_fit("b")
    b.unpin("a")
    assert b.plan_fit("b") == ["a"]


def test_errors_name_the_problem():
    b = _budget({"big": 101, "ok": 10}, 100)
    with pytest.raises(ValueError, match=r"'big' needs 101 bytes.*budget of 100"):
        b.plan_fit("big")
    with pytest.raises(ValueError, match="not registered"):
        b.plan_fit("nope")
    with pytest.raises(ValueError, match="already registered"):
        b.add("ok", 3)
    with pytest.raises(ValueError, match="budget_bytes"):
        LruBudget(-1)
    with pytest.raises(ValueError, match="not resident"):
        b.pin("ok")
    b.mark_resident("ok")
    b.pin("ok")
    with pytest.raises(WeightsPoolBusyError):
        b.remove("ok")


def test_unlimited_budget_never_evicts():
    b = _budget({f"m{i}": 10**9 for i in range(5)}, None)
    for i in range(5):
        assert b.plan_fit(f"m{i}") == []
        b.mark_resident(f"m{i}")
    assert b.free_bytes is None and b.bytes_resident == 5 * 10**9


def test_random_walk_keeps_invariants():
    rng = random.Random(1234)
    sizes = {f"m{i}": rng.randint(1, 60) for i in range(8)}
    b = _budget(sizes, 100)
    for _ in range(500):
        m = rng.choice(list(sizes))
        op = rng.random()
        if op < 0.6:
            try:
                victims = b.plan_fit(m)
            except WeightsPoolBusyError:
                continue
            for v in victims:
                assert b.in_use(v) == 0 and v != m
                b.mark_evicted(v)
            if not b.is_resident(m):
                b.mark_resident(m)
            b.pin(m)
        elif op < 0.9 and b.in_use(m):
            b.unpin(m)
        assert b.bytes_resident <= 100
        assert all(b.is_resident(n) for n in sizes if b.in_use(n))
