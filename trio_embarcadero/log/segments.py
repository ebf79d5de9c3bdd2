"""The region's shared segment allocator: a crash-safe map of allocation units.

The data area is cut into ``num_units`` allocation units of ``unit_size``
bytes. A *segment* is a block of ``2**order`` units starting at a multiple of
``2**order`` (buddy alignment), so small streams take one unit and busy ones
take large blocks, and a block of any order can be found with one vectorised
scan. Who owns what is one little-endian ``u32`` word per unit, in the region
itself, so every broker process on the region shares it:

* ``0``: free;
* ``HEAD | broker << 8 | order``: the first unit of a segment of ``2**order``
  units that broker ``broker`` allocated;
* ``BODY``: one of the other units of a segment.

Every change happens under the region's file lock, and in an order that a
crash at any point leaves recoverable:

* allocating writes the ``BODY`` words first and the ``HEAD`` word last (the
  head is the commit point); the caller links the segment into a stream's
  chain only after that;
* freeing clears the ``HEAD`` word first, then the bodies; the caller has
  unlinked the segment from its chain before.

So after a crash, a unit can be ``BODY`` without a head covering it (an
allocation or a free cut short: :meth:`SegmentMap.recover` clears it), and a
head can exist that no chain reaches (allocated but not linked yet, or
unlinked but not freed yet: ``recover`` frees the heads of the broker that is
recovering that its chains do not reach). A unit is never in two segments,
and a segment is never in two chains, because a head is only linked after it
is written and only freed after it is unlinked.

This module knows nothing of streams, locks or files: it works on the word
array it is handed and the caller holds the lock.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import attrs
import numpy as np
import numpy.typing as npt

HEAD = 1 << 31
BODY = 1 << 30
_BROKER_SHIFT = 8
_ORDER_MASK = 0xFF
_BROKER_MASK = 0xFF


def head_word(broker_id: int, order: int) -> int:
    """The map word of a segment's first unit."""
    return HEAD | (broker_id << _BROKER_SHIFT) | order


def order_for(units: int) -> int:
    """The smallest order whose block holds ``units`` units."""
    return max(0, (units - 1).bit_length())


@attrs.frozen
class Segment:
    """One allocated segment, as the map records it.

    Attributes:
        unit: Its first unit.
        order: It spans ``2**order`` units.
        broker_id: The broker that allocated it.
    """

    unit: int
    order: int
    broker_id: int

    @property
    def units(self) -> int:
        return 1 << self.order


@attrs.frozen
class MapStatistics:
    """Allocation units by state.

    Attributes:
        total: Units in the data area.
        free: Units in no segment.
        used: Units in segments.
        largest_free_order: Order of the largest block that can be allocated
            now (-1: none).
    """

    total: int
    free: int
    used: int
    largest_free_order: int


class SegmentMap:
    """Allocate and free segments in a shared unit map.

    Args:
        words: The map, one ``u32`` per unit (a view of the region).
        max_order: The largest order a segment may have.
    """

    def __init__(self, words: npt.NDArray[np.uint32], max_order: int) -> None:
        self.words = words
        self.num_units = len(words)
        self.max_order = max_order

    # -- reading ---------------------------------------------------------------------

    def segment_at(self, unit: int) -> Segment | None:
        """The segment whose head is ``unit``, or None."""
        word = int(self.words[unit])
        if not word & HEAD:
            return None
        return Segment(unit, word & _ORDER_MASK, (word >> _BROKER_SHIFT) & _BROKER_MASK)

    def segments(self) -> Iterator[Segment]:
        """Every allocated segment, by unit."""
        for unit in np.flatnonzero(self.words & np.uint32(HEAD)).tolist():
            segment = self.segment_at(unit)
            assert segment is not None
            yield segment

    def statistics(self) -> MapStatistics:
        """Counts of free and used units, and the largest block free now."""
        free = int(np.count_nonzero(self.words == 0))
        largest = -1
        for order in range(min(self.max_order, self.num_units.bit_length() - 1), -1, -1):
            if self._find_free(order) is not None:
                largest = order
                break
        return MapStatistics(self.num_units, free, self.num_units - free, largest)

    # -- changing (the caller holds the region lock) ------------------------------------

    def allocate(self, order: int, broker_id: int) -> int | None:
        """Take a free block of ``2**order`` units for ``broker_id``.

        Returns:
            Its first unit, or None when no aligned block of that size is free.
        """
        if not 0 <= order <= self.max_order:
            raise ValueError(f"segment order {order} is not in 0..{self.max_order}")
        unit = self._find_free(order)
        if unit is None:
            return None
        size = 1 << order
        self.words[unit + 1 : unit + size] = BODY
        # The head last: until it is written the block is not allocated.
        self.words[unit] = head_word(broker_id, order)
        return unit

    def free(self, unit: int) -> None:
        """Give back the segment whose head is ``unit`` (already unlinked)."""
        segment = self.segment_at(unit)
        if segment is None:
            raise ValueError(f"unit {unit} is not the head of a segment")
        # The head first: from here on no one can take the block for allocated.
        self.words[unit] = 0
        self.words[unit + 1 : unit + segment.units] = 0

    def recover(self, broker_id: int, reachable: Iterable[int]) -> list[Segment]:
        """Repair the map after a crash, for one broker.

        Clears ``BODY`` units that no head covers (any broker's cut-short
        allocation or free: nobody else changes the map while the caller
        holds the lock), and frees ``broker_id``'s segments that its chains
        do not reach (``reachable``: the head units of every segment in the
        broker's stream chains).

        Returns:
            The segments freed.
        """
        covered = np.zeros(self.num_units, dtype=bool)
        for segment in self.segments():
            covered[segment.unit : segment.unit + segment.units] = True
        stray = (self.words == BODY) & ~covered
        self.words[stray] = 0
        keep = set(reachable)
        freed = [s for s in self.segments() if s.broker_id == broker_id and s.unit not in keep]
        for segment in freed:
            self.free(segment.unit)
        return freed

    def _find_free(self, order: int) -> int | None:
        size = 1 << order
        usable = self.num_units - self.num_units % size
        if usable == 0:
            return None
        free = np.logical_not(self.words[:usable].reshape(-1, size).any(axis=1))
        # Best fit one level up: a free block whose buddy is in use first, so
        # small segments fill holes instead of splitting large free blocks.
        buddy_free = np.ones_like(free)
        paired = len(free) - len(free) % 2
        buddy_free[:paired] = free[:paired].reshape(-1, 2)[:, ::-1].reshape(-1)
        for candidates in (free & ~buddy_free, free):
            index = int(np.argmax(candidates))
            if candidates[index]:
                return index * size
        return None
