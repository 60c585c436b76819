"""PageAllocator: atomic allocation per device, validated frees, and a hypothesis state machine."""
import random

import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from crosspool_jax.kv.allocator import NoFreePages, PageAllocator


def test_allocate_is_atomic_and_per_device():
    a = PageAllocator(pages_per_device=5, num_devices=2)
    assert (a.num_total, a.num_used, a.num_free()) == (10, 0, 10)
    first = a.allocate(4)                      # ties -> device 0
    assert {a.device_of(p) for p in first} == {0}
    second = a.allocate(3)                     # device 1 has more free pages now
    assert {a.device_of(p) for p in second} == {1}
    assert (a.num_free(0), a.num_free(1), a.num_used) == (1, 2, 7)
    with pytest.raises(NoFreePages, match="need 2 pages on KV device 0, only 1 free"):
        a.allocate(2, device=0)
    assert (a.num_free(0), a.num_free(1)) == (1, 2)   # nothing taken by the failed call
    assert a.allocate(0) == []
    a.free(first + second)
    assert a.num_free() == 10 and a.num_used == 0


def test_free_rejects_double_foreign_and_duplicate_ids():
    a = PageAllocator(4, 2)
    pages = a.allocate(3, device=1)
    with pytest.raises(ValueError, match="not in this pool"):
        a.free([8])
    with pytest.raises(ValueError, match="not in this pool"):
        a.free([-1])
    with pytest.raises(ValueError, match="double free"):
        a.free([pages[0], pages[0]])
    with pytest.raises(ValueError, match="double free"):
        a.free([pages[0], 0])                  # page 0 was never handed out
    assert a.num_used == 3                      # the failed frees returned nothing
    a.free(pages)
    with pytest.raises(ValueError, match="double free"):
        a.free(pages[:1])


def test_constructor_and_argument_validation():
    with pytest.raises(ValueError, match="pages_per_device"):
        PageAllocator(0)
    with pytest.raises(ValueError, match="num_devices"):
        PageAllocator(4, 0)
    a = PageAllocator(4, 2)
    with pytest.raises(ValueError, match="device must be in"):
        a.allocate(1, device=2)
    with pytest.raises(ValueError, match="n must be"):
        a.allocate(-1)


def test_random_churn_keeps_pages_unique():
    rng = random.Random(1234)
    a = PageAllocator(7, 3)
    owned: list[list[int]] = []
    for _ in range(500):
        if owned and rng.random() < 0.45:
            a.free(owned.pop(rng.randrange(len(owned))))
        else:
            n = rng.randrange(1, 5)
            try:
                owned.append(a.allocate(n, device=rng.choice([None, 0, 1, 2])))
            except NoFreePages:
                pass
        flat = [p for pages in owned for p in pages]
        assert len(flat) == len(set(flat)) == a.num_used
    for pages in owned:
        a.free(pages)
    assert a.num_free() == a.num_total


class AllocatorMachine(RuleBasedStateMachine):
    """Owners allocate, grow, free, abort (free everything at once) and preempt (free, then
    re-allocate from scratch); pages are never shared or leaked."""

    def __init__(self):
        super().__init__()
        self.alloc = PageAllocator(pages_per_device=6, num_devices=2)
        self.owners: dict[int, list[int]] = {}
        self.next_id = 0

    def _take(self, n, device):
        try:
            return self.alloc.allocate(n, device)
        except NoFreePages:
            return None

    @rule(n=st.integers(1, 5), device=st.sampled_from([None, 0, 1]))
    def allocate(self, n, device):
        before = self.alloc.num_free()
        pages = self._take(n, device)
        if pages is None:
            assert self.alloc.num_free() == before
        else:
            assert len(pages) == n and len({self.alloc.device_of(p) for p in pages}) == 1
            self.owners[self.next_id] = pages
            self.next_id += 1

    @precondition(lambda self: self.owners)
    @rule(data=st.data(), n=st.integers(1, 3))
    def grow(self, data, n):
        owner = data.draw(st.sampled_from(sorted(self.owners)))
        pages = self._take(n, None)
        if pages is not None:
            self.owners[owner] += pages

    @precondition(lambda self: self.owners)
    @rule(data=st.data())
    def free_some(self, data):
        owner = data.draw(st.sampled_from(sorted(self.owners)))
        pages = self.owners[owner]
        k = data.draw(st.integers(1, len(pages)))
        self.alloc.free(pages[-k:])
        del pages[-k:]
        if not pages:
            del self.owners[owner]

    @precondition(lambda self: self.owners)
    @rule(data=st.data())
    def abort(self, data):
        owner = data.draw(st.sampled_from(sorted(self.owners)))
        self.alloc.free(self.owners.pop(owner))

    @precondition(lambda self: self.owners)
    @rule(data=st.data())
    def preempt(self, data):
        owner = data.draw(st.sampled_from(sorted(self.owners)))
        n = len(self.owners[owner])
        self.alloc.free(self.owners.pop(owner))
        pages = self._take(min(n, self.alloc.num_free(0)) or 1, 0)
        if pages is not None:
            self.owners[owner] = pages

    @precondition(lambda self: self.owners)
    @rule(data=st.data())
    def double_free_is_refused(self, data):
        owner = data.draw(st.sampled_from(sorted(self.owners)))
        page = self.owners[owner][0]
        self.alloc.free([page])
        with pytest.raises(ValueError):
            self.alloc.free([page])
        self.owners[owner][0] = self.alloc.allocate(1, self.alloc.device_of(page))[0]

    @invariant()
    def no_page_shared_or_leaked(self):
        flat = [p for pages in self.owners.values() for p in pages]
        assert len(flat) == len(set(flat))
        assert self.alloc.num_used == len(flat)
        assert self.alloc.num_free(0) + self.alloc.num_free(1) == self.alloc.num_total - len(flat)

    def teardown(self):
        for pages in self.owners.values():
            self.alloc.free(pages)
        assert self.alloc.num_free() == self.alloc.num_total


AllocatorMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestAllocatorMachine = AllocatorMachine.TestCase


def test_devices_with_fewer_usable_pages():
    """device_pages: device d hands out ids [d * pages_per_device, d * pages_per_device +
    device_pages[d]) only; the others are not in the pool."""
    a = PageAllocator(6, 3, device_pages=(6, 2, 0))
    assert a.num_total == 8 and [a.num_free(d) for d in range(3)] == [6, 2, 0]
    assert a.allocate(2, 1) == [6, 7]
    with pytest.raises(NoFreePages):
        a.allocate(1, 1)
    with pytest.raises(NoFreePages):
        a.allocate(1, 2)
    assert a.allocate(1) == [0]                                   # the device with the most free
    with pytest.raises(ValueError, match="not in this pool"):
        a.free([8])
    a.free([6, 7, 0])
    assert a.num_free() == 8
    with pytest.raises(ValueError, match="device_pages"):
        PageAllocator(6, 2, device_pages=(7, 1))
