"""Reading an order-5 topic in its total order, from any process (no Trio).

The sequencer (:mod:`.sequencer`) appends one entry per ordered batch to the
topic's ordered index (its layout is in :mod:`.layout`); the entries'
total orders rise, so the batch holding a total order is found by bisection.
A batch whose segment retention let go since it was ordered is *gone*:
:meth:`OrderedIndex.records` returns None for it, and readers go on with the
next entry, as the offsets of a stream jump past what retention reclaimed.
Once every batch an index segment names is gone, the sequencer lets that
segment go too: its entries are gone (:meth:`OrderedIndex.entry` returns
None), and an entry is trusted only if its segment is still the one the
chain was read with.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from ..wire import BATCH_HEADER_SIZE, BH_START_LOGICAL_OFFSET, scan_records
from .layout import (
    BH_TOTAL_SIZE,
    SEGMENT_HEADER_SIZE,
    U64,
    Geometry,
    IndexChain,
    IndexEntry,
    generation_holding,
    index_chain,
    index_per_segment,
    read_index_entry,
    read_ordered_count,
    read_topic_state,
)
from .stamps import is_stamped, stamp_copy

#: An index entry as numpy reads a run of them (see ``INDEX_ENTRY`` of :mod:`.layout`).
_ENTRY_DTYPE = np.dtype(
    [("broker", "<u4"), ("num_msg", "<u4"), ("total_order", "<u8"), ("header", "<u8"),
     ("generation", "<u8")]
)  # fmt: skip


class OrderedIndex:
    """The ordered index of one order-5 topic, as one process reads it.

    Args:
        buf: The region (a read-only mapping will do).
        geometry: Its geometry.
        topic_index: The topic's table slot.
    """

    def __init__(self, buf: Any, geometry: Geometry, topic_index: int) -> None:
        self._buf = buf
        self._g = geometry
        self.topic_index = topic_index
        self.incarnation = read_topic_state(buf, geometry, topic_index)[1]
        self._chain = IndexChain()
        self._per_segment = index_per_segment(geometry)

    def count(self) -> int:
        """Entries committed so far: the topic's ordered batches."""
        return read_ordered_count(self._buf, self._g, self.topic_index)

    def deleted(self) -> bool:
        """Whether the topic was deleted (maybe made anew) since this was opened."""
        state, incarnation = read_topic_state(self._buf, self._g, self.topic_index)
        return state != 1 or incarnation != self.incarnation

    def first(self) -> int:
        """The first entry still in the index (the ones before are gone)."""
        self._chain = index_chain(self._buf, self._g, self.topic_index)
        return self._chain.first * self._per_segment

    def entry(self, k: int) -> IndexEntry | None:
        """Entry ``k`` (``k < count()``), or None if it is gone."""
        for _ in range(3):
            chain = self._chain
            position = k // self._per_segment - chain.first
            if not 0 <= position < len(chain.units):
                # The chain grew, or its first segments went: read it again.
                chain = self._chain = index_chain(self._buf, self._g, self.topic_index)
                position = k // self._per_segment - chain.first
                if position < 0:
                    return None
            found = read_index_entry(self._buf, self._g, chain, k)
            base = self._g.segment_offset(chain.units[position])
            # Read after the entry: the segment was not let go meanwhile.
            if U64.unpack_from(self._buf, base + 24)[0] == chain.generations[position]:
                return found
            self._chain = IndexChain()
        return None

    def find(self, total_order: int, count: int | None = None) -> int:
        """The first entry still there holding ``total_order`` or a later one
        (``count`` when every entry so far ends before it)."""
        lo, hi = self.first(), self.count() if count is None else count
        while lo < hi:
            mid = (lo + hi) // 2
            e = self.entry(mid)
            if e is None or e.total_order + e.num_msg <= total_order:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def next_of_broker(self, broker_id: int, k: int, count: int, floor: int) -> int:
        """The first entry from ``k`` (before ``count``) of a batch of broker
        ``broker_id`` that holds a logical offset ``floor`` or later, or
        ``count`` when there is none.

        One vectorised pass per index segment: the entries' broker words,
        then the first logical offsets in the headers of that broker's
        batches. A batch that is gone (see :meth:`records`) may be taken for
        one that qualifies, as its header may hold anything by now, but no
        batch that qualifies is passed over: the caller reads the entry
        found as usual, and goes on from the next one if it does not qualify.
        """
        per = self._per_segment
        words = np.frombuffer(self._buf, dtype="<u8", count=len(self._buf) // 8)
        while k < count:
            chain = self._chain
            position = k // per - chain.first
            if not 0 <= position < len(chain.units):
                chain = self._chain = index_chain(self._buf, self._g, self.topic_index)
                position = k // per - chain.first
                if position < 0:  # let go meanwhile: the first one left
                    k = chain.first * per
                    continue
                if position >= len(chain.units):
                    return k  # not in the chain as read: the caller reads it
            upto = min(count, (k // per + 1) * per)
            base = self._g.segment_offset(chain.units[position])
            entries = np.frombuffer(
                self._buf,
                dtype=_ENTRY_DTYPE,
                count=upto - k,
                offset=base + SEGMENT_HEADER_SIZE + (k % per) * _ENTRY_DTYPE.itemsize,
            )
            headers = entries["header"].astype(np.int64)
            # Only headers in the region, on a word: an entry read from a
            # segment let go meanwhile may hold anything.
            mine = (
                (entries["broker"] == broker_id)
                & (headers >= 0)
                & (headers + BATCH_HEADER_SIZE <= len(words) * 8)
                & (headers % 8 == 0)
            )
            candidates = np.flatnonzero(mine)
            if len(candidates):
                at = (headers[candidates] + BH_START_LOGICAL_OFFSET) // 8
                ends = words[at] + entries["num_msg"][candidates].astype(np.uint64)
                hits = np.flatnonzero(ends > floor)
                if len(hits):
                    return k + int(candidates[hits[0]])
            k = upto
        return count

    def records(self, entry: IndexEntry) -> npt.NDArray[np.uint8] | None:
        """A copy of ``entry``'s batch payload (its records), or None if the
        batch is gone (retention reclaimed its segment, maybe reused since).

        The copy is checked after it is taken: a segment reclaimed while it
        was copied is seen, so the bytes returned are the batch's. Its
        records carry their total orders: if the broker that stored the
        batch has not written them yet (or died before it did), they are
        written into the copy, from the entry.
        """
        if generation_holding(self._buf, self._g, entry.header_offset) != entry.generation:
            return None
        # Looked at before the copy: once set, the records copied are stamped.
        stamped = is_stamped(self._buf, entry.header_offset)
        (total,) = U64.unpack_from(self._buf, entry.header_offset + BH_TOTAL_SIZE)
        start = entry.header_offset + BATCH_HEADER_SIZE
        region = np.frombuffer(self._buf, dtype=np.uint8)
        if start + total > len(region):
            return None
        data = region[start : start + total].copy()
        if generation_holding(self._buf, self._g, entry.header_offset) != entry.generation:
            return None
        if not stamped:
            stamp_copy(data, entry.num_msg, entry.total_order)
        return data


def cut_records(records: npt.NDArray[np.uint8], num_msg: int, skip: int) -> npt.NDArray[np.uint8]:
    """``records`` (a batch payload of ``num_msg`` records) from record ``skip`` on."""
    if skip <= 0:
        return records
    return records[int(scan_records(records, num_msg)[skip]) :]
