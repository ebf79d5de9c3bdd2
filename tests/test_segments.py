"""The shared segment map: property tests of allocate / free / crash / recover.

A model keeps, per broker, the chains the region would hold (lists of head
units). Hypothesis drives random sequences of allocations, links, unlinks,
frees and crashes cut short at each documented step, then recovery; after
every step no unit is in two segments, no segment is in two chains, every
chained segment is allocated, and after a broker recovers nothing of its is
lost or leaked.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from trio_embarcadero.log.segments import BODY, HEAD, SegmentMap, head_word, order_for

UNITS = 64
MAX_ORDER = 4
BROKERS = 3


def new_map(units: int = UNITS) -> SegmentMap:
    return SegmentMap(np.zeros(units, dtype="<u4"), MAX_ORDER)


def test_order_for() -> None:
    assert [order_for(n) for n in (1, 2, 3, 4, 5, 8, 9)] == [0, 1, 2, 2, 3, 3, 4]


def test_allocate_is_aligned_and_free_gives_back() -> None:
    m = new_map()
    a = m.allocate(0, 1)
    b = m.allocate(2, 1)
    assert a == 0
    assert b is not None
    assert b % 4 == 0
    assert m.segment_at(b) is not None
    assert m.statistics().used == 5
    m.free(b)
    assert m.statistics().used == 1
    with pytest.raises(ValueError, match="not the head"):
        m.free(b)
    with pytest.raises(ValueError, match="order 9"):
        m.allocate(9, 0)


def test_small_segments_fill_holes_before_splitting_large_blocks() -> None:
    m = new_map(16)
    first = m.allocate(0, 0)
    second = m.allocate(0, 0)
    assert (first, second) == (0, 1)
    m.free(0)
    # Unit 0 is a hole next to a used unit: the next small segment goes there,
    # so the aligned 8-unit block at 8 stays whole.
    assert m.allocate(0, 0) == 0
    assert m.allocate(3, 0) == 8


def test_full_map_refuses() -> None:
    m = new_map(8)
    assert m.allocate(3, 0) == 0
    assert m.allocate(0, 0) is None
    assert m.statistics().largest_free_order == -1


def test_recover_clears_a_cut_short_allocation_and_frees_unlinked_heads() -> None:
    m = new_map(16)
    linked = m.allocate(1, 0)
    unlinked = m.allocate(2, 0)  # allocated, crash before it was linked
    other = m.allocate(0, 1)  # another broker's, not linked yet: not ours to free
    assert linked is not None
    assert unlinked is not None
    assert other is not None
    m.words[9:12] = BODY  # an allocation of 8..11 cut short before its head
    freed = m.recover(0, reachable=[linked])
    assert [s.unit for s in freed] == [unlinked]
    assert m.segment_at(linked) is not None
    assert m.segment_at(other) is not None
    assert int(np.count_nonzero(m.words)) == 2 + 1


class Allocator(RuleBasedStateMachine):
    """Random allocate/link/unlink/free/crash/recover sequences against a model."""

    def __init__(self) -> None:
        super().__init__()
        self.map = new_map()
        # broker -> its chain: head units in link order
        self.chains: dict[int, list[int]] = {b: [] for b in range(BROKERS)}
        # heads allocated but not yet linked, and unlinked but not yet freed
        self.loose: dict[int, list[int]] = {b: [] for b in range(BROKERS)}

    @rule(broker=st.integers(0, BROKERS - 1), order=st.integers(0, MAX_ORDER), link=st.booleans())
    def allocate(self, broker: int, order: int, link: bool) -> None:
        unit = self.map.allocate(order, broker)
        if unit is None:
            assert self.map.statistics().largest_free_order < order
            return
        (self.chains if link else self.loose)[broker].append(unit)

    @rule(broker=st.integers(0, BROKERS - 1), free=st.booleans())
    def retire_oldest(self, broker: int, free: bool) -> None:
        """Retention: unlink the chain's first segment, then (maybe) free it."""
        if not self.chains[broker]:
            return
        unit = self.chains[broker].pop(0)
        if free:
            self.map.free(unit)
        else:
            self.loose[broker].append(unit)  # crash between unlink and free

    @rule(data=st.data())
    def crash_mid_allocation(self, data: st.DataObject) -> None:
        """An allocation cut short after some of its body words: no head."""
        order = data.draw(st.integers(1, MAX_ORDER))
        unit = self.map._find_free(order)
        if unit is None:
            return
        written = data.draw(st.integers(1, (1 << order) - 1))
        self.map.words[unit + 1 : unit + 1 + written] = BODY

    @rule(data=st.data())
    def crash_mid_free(self, data: st.DataObject) -> None:
        """A free cut short after its head was cleared: bodies left behind."""
        candidates = [u for b in range(BROKERS) for u in self.loose[b]]
        big = [u for u in candidates if (s := self.map.segment_at(u)) and s.order > 0]
        if not big:
            return
        unit = data.draw(st.sampled_from(big))
        for b in range(BROKERS):
            if unit in self.loose[b]:
                self.loose[b].remove(unit)
        self.map.words[unit] = 0

    @precondition(lambda self: any(self.loose.values()) or bool(np.any(self.map.words == BODY)))
    @rule(broker=st.integers(0, BROKERS - 1))
    def recover(self, broker: int) -> None:
        freed = self.map.recover(broker, reachable=self.chains[broker])
        assert sorted(s.unit for s in freed) == sorted(self.loose[broker])
        self.loose[broker] = []
        # No stray body is left, whoever's it was.
        covered = np.zeros(UNITS, dtype=bool)
        for s in self.map.segments():
            covered[s.unit : s.unit + s.units] = True
        assert not np.any((self.map.words == BODY) & ~covered)

    @invariant()
    def no_unit_in_two_segments(self) -> None:
        seen = np.zeros(UNITS, dtype=int)
        for s in self.map.segments():
            assert s.unit % s.units == 0
            seen[s.unit : s.unit + s.units] += 1
            assert np.all(self.map.words[s.unit + 1 : s.unit + s.units] == BODY)
        assert seen.max(initial=0) <= 1

    @invariant()
    def chains_hold_allocated_segments_once(self) -> None:
        linked = [u for chain in self.chains.values() for u in chain]
        assert len(linked) == len(set(linked)), "a segment in two chains"
        for broker, chain in self.chains.items():
            for unit in chain:
                assert self.map.words[unit] & HEAD
                s = self.map.segment_at(unit)
                assert s is not None
                assert s.broker_id == broker

    @invariant()
    def nothing_is_lost(self) -> None:
        """Every allocated segment is chained or loose (known to its broker)."""
        known = {u for b in range(BROKERS) for u in self.chains[b] + self.loose[b]}
        assert {s.unit for s in self.map.segments()} == known


Allocator.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_allocator_state_machine = Allocator.TestCase


def test_head_word_round_trips() -> None:
    m = new_map(4)
    m.words[0] = head_word(7, 2)
    s = m.segment_at(0)
    assert s is not None
    assert (s.broker_id, s.order, s.units) == (7, 2, 4)
