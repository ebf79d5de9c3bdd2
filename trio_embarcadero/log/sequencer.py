"""The sequencer: one total order over every broker's stream of an order-5 topic.

Broker 0 (the head) runs it; it knows nothing of Trio. Each call of
:meth:`Sequencer.step` looks at every live order-5 topic in the region, walks
each broker's stream of it from where the last step stopped, and gives every
batch committed since a place in the topic's total order: per message, gap-free
from 0, in the order the sequencer finds the commits (a stream's batches in
their commit order, so a connection's batches keep the order it sent them in).
For each batch it writes the total orders into the records and the header,
appends an entry to the topic's ordered index and marks the header ordered.
The layout and the crash-safe order of those stores are described in
:mod:`.layout`; a sequencer that starts again (after a ``kill -9`` at any
point) goes on from the region alone.

The broker's writer commits a stream's batches in log order, so a batch still
being received holds back only its own stream's later batches. A committed
batch behind a reserved one (a hole: a writer that commits out of log order,
or one that died and left it) is waited for at most ``hole_timeout_ns``;
then the sequencer goes past it, and that batch is never ordered.

A publish session's batches (see :mod:`.sessions`) are ordered by their
batch_seq, also when different brokers stored them: a session batch whose
predecessor is not ordered yet holds its stream, like a hole, for at most
``hole_timeout_ns``; then the batch_seqs still missing before it are
skipped and it is ordered. A session batch whose batch_seq was skipped is
never ordered: its header's ``ordered`` word becomes 2 (``NEVER_ORDERED``).

Every step runs under the region's file lock: a topic is not deleted, nor a
segment reclaimed, while the sequencer writes into it.
"""

from __future__ import annotations

import contextlib
import logging
import struct
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import numpy as np
import numpy.typing as npt

from ..wire import BATCH_HEADER_SIZE, MH_NEXT_MSG_DIFF, MH_PADDED_SIZE, MH_TOTAL_ORDER
from .layout import (
    BATCH_ABANDONED,
    BATCH_COMMITTED,
    BATCH_RESERVED,
    BH_ORDERED,
    BH_SESSION,
    BH_TOTAL_ORDER,
    BH_TOTAL_SIZE,
    INDEX_ENTRY,
    INDEX_OWNER,
    NEVER_ORDERED,
    NEXT_GENERATION_OFFSET,
    NO_SEGMENT,
    SEGMENT_HEADER,
    SEGMENT_HEADER_SIZE,
    SEGMENT_MAGIC,
    SEGMENT_NEXT_OFFSET,
    TOPIC_INDEX_HEAD_OFFSET,
    TOPIC_LIVE,
    TOPIC_ORDERED_OFFSET,
    U32,
    U64,
    Geometry,
    IndexChain,
    SegmentReclaimed,
    WalkPosition,
    check_segment,
    enter_segment,
    generation_holding,
    index_chain,
    index_entry_offset,
    index_per_segment,
    ordered_topics,
    read_index_entry,
    read_ordered_count,
    read_stream_entry,
    read_topic_state,
    read_topics,
)
from .segments import SegmentMap
from .sessions import Placement, SessionTable

logger = logging.getLogger(__name__)

#: Batches one step orders at most, so the file lock is never held long.
DEFAULT_STEP_BUDGET = 4096
#: How often a step looks for index segments whose batches are all gone.
INDEX_RECLAIM_INTERVAL_NS = 1_000_000_000
#: An ordered index entry, as numpy reads a segment of them.
_ENTRIES = np.dtype(
    [("broker", "<u4"), ("num_msg", "<u4"), ("total", "<u8"), ("header", "<u8"),
     ("generation", "<u8")]
)  # fmt: skip


@attrs.frozen
class OrderedBatch:
    """A batch the sequencer has just ordered.

    Attributes:
        topic: Its topic.
        broker_id: The broker whose stream holds it.
        header_offset: Where its batch header is.
        num_msg: Its messages.
        total_order: The total order of its first message.
        entry: Its place in the topic's ordered index.
    """

    topic: str
    broker_id: int
    header_offset: int
    num_msg: int
    total_order: int
    entry: int


@attrs.frozen
class SequencerStatistics:
    """What the sequencer counts.

    Attributes:
        topics: Order-5 topics it orders.
        batches_ordered: Batches it ordered since it started.
        messages_ordered: Their messages.
        lag_batches: Batches committed but not ordered yet, at its last step.
        lag_oldest_s: How long the oldest of them has been waiting (since a
            step first saw it), in seconds; 0 when none waits.
        holes_skipped: Batches it went past after ``hole_timeout_ns``.
        index_full: Steps that found no free unit for an index segment.
        index_segments_freed: Index segments let go (every batch they named
            was gone).
        session_skips: Batch_seqs of publish sessions it skipped after a
            later one waited ``hole_timeout_ns`` for them.
    """

    topics: int
    batches_ordered: int
    messages_ordered: int
    lag_batches: int
    lag_oldest_s: float
    holes_skipped: int
    index_full: int
    index_segments_freed: int
    session_skips: int = 0


#: A batch header's num_msg, state, broker, ordered and total_size, read at +12.
_HEAD = struct.Struct("<IIII4xQ")
#: A batch header's session word (see :mod:`.sessions`), read at 0.
_SESSION = struct.Struct(f"<{BH_SESSION}xI")


def _walk(
    buf: Any, g: Geometry, topic_index: int, broker: int, pos: WalkPosition
) -> Iterator[tuple[int, int, int, int, int]]:
    """``(offset, state, ordered, num_msg, total_size)`` of each batch of a
    stream from ``pos`` on, moving ``pos`` past a batch when the next is asked
    for (as :func:`~.layout.iter_batches` does, which checks the segment's
    generation at every batch: here the caller holds the region's file lock,
    so no segment is let go meanwhile, and checks it once before it walks)."""
    if pos.segment == NO_SEGMENT:
        (first,) = U32.unpack_from(buf, g.stream_offset(topic_index, broker))
        if first == NO_SEGMENT or not enter_segment(buf, g, pos, first, topic_index, broker):
            return
    check_segment(buf, g, pos)
    header_room = pos.end - BATCH_HEADER_SIZE
    while True:
        offset = pos.offset
        total = 0
        if offset <= header_room:
            num_msg, state, _, ordered, total = _HEAD.unpack_from(buf, offset + 12)
        end = offset + BATCH_HEADER_SIZE + total
        if total and end <= pos.end:
            yield offset, state, ordered, num_msg, total
            pos.offset = end
            continue
        # The end of the segment's data: on to the next segment, if linked.
        base = g.segment_offset(pos.segment)
        (link,) = U32.unpack_from(buf, base + SEGMENT_NEXT_OFFSET)
        if link == NO_SEGMENT:
            return
        if not enter_segment(buf, g, pos, link, topic_index, broker):
            raise SegmentReclaimed(f"segment {pos.segment}'s successor is gone")
        header_room = pos.end - BATCH_HEADER_SIZE


class _Hole:
    __slots__ = ("offset", "since_ns")

    def __init__(self, offset: int, since_ns: int) -> None:
        self.offset = offset
        self.since_ns = since_ns


class _StreamCursor:
    """Where the sequencer stands in one broker's stream of a topic."""

    __slots__ = ("done", "held", "hole", "position", "waiting_since")

    def __init__(self) -> None:
        self.position: WalkPosition | None = None
        # Committed batches of the stream behind the position (ordered,
        # skipped or reclaimed), numbered as the stream's entry counts them.
        self.done = 0
        self.hole: _Hole | None = None
        # A session batch waiting for its predecessor (since when).
        self.held: _Hole | None = None
        self.waiting_since: int | None = None


class _TopicOrder:
    """The sequencer's state of one order-5 topic."""

    def __init__(self, name: str, index: int, incarnation: int, max_brokers: int) -> None:
        self.name = name
        self.index = index
        self.incarnation = incarnation
        self.chain = IndexChain()
        self.entries = 0
        self.next_total = 0
        self.cursors = [_StreamCursor() for _ in range(max_brokers)]


class Sequencer:
    """Orders the committed batches of every order-5 topic of a region.

    Args:
        buf: The region, mapped read-write.
        geometry: Its geometry.
        segment_map: Its segment map (index segments come from it).
        lock: Returns the region's file lock (a context manager).
        hole_timeout_ns: How long a committed batch behind a reserved one
            waits before the sequencer goes past the reserved one (and a
            session batch for its predecessor).
        sessions: The region's session table, whose batches are ordered by
            batch_seq; None orders them as any other.
    """

    def __init__(
        self,
        buf: Any,
        geometry: Geometry,
        segment_map: SegmentMap,
        lock: Callable[[], contextlib.AbstractContextManager[object]],
        *,
        hole_timeout_ns: int,
        sessions: SessionTable | None = None,
    ) -> None:
        self._buf = buf
        self._sessions = sessions
        self._g = geometry
        self._map = segment_map
        self._lock = lock
        self._words: npt.NDArray[np.uint64] = np.frombuffer(buf, dtype="<u8")
        self.hole_timeout_ns = hole_timeout_ns
        self._topics: dict[int, _TopicOrder] = {}
        self._batches = 0
        self._messages = 0
        self._holes = 0
        self._index_full = 0
        self._lag = 0
        self._lag_oldest_ns = 0
        self._index_segments_freed = 0
        self._session_skips = 0
        self._index_checked_ns: int | None = None
        with self._lock():
            self._recover_index_segments()

    def close(self) -> None:
        """Let go of the region's buffer (and the segment map's view of it),
        so the region can be unmapped."""
        self._topics.clear()
        self._sessions = None
        del self._words, self._map

    # -- one step ------------------------------------------------------------------

    def step(self, now_ns: int, budget: int = DEFAULT_STEP_BUDGET) -> list[OrderedBatch]:
        """Order what was committed since the last step, up to ``budget`` batches.

        Args:
            now_ns: The time now (any monotonic nanosecond clock; it times
                holes and the lag).
            budget: At most this many batches are ordered.

        Returns:
            The batches ordered, in total order per topic.
        """
        ordered: list[OrderedBatch] = []
        with self._lock():
            self._refresh_topics()
            for topic in self._topics.values():
                while True:
                    before = len(ordered)
                    held = False
                    for broker in range(self._g.max_brokers):
                        if len(ordered) >= budget:
                            break
                        held |= self._order_stream(topic, broker, now_ns, budget, ordered)
                    # A session batch held in one stream may be free to go now
                    # that another stream's batches are ordered: look again.
                    if not held or len(ordered) in (before, budget):
                        break
            self._measure_lag(now_ns)
            due = self._index_checked_ns
            if due is None or now_ns - due >= INDEX_RECLAIM_INTERVAL_NS:
                self._index_checked_ns = now_ns
                for topic in self._topics.values():
                    self._reclaim_index(topic)
        return ordered

    def statistics(self) -> SequencerStatistics:
        """A snapshot of the sequencer's counters (the lag as of the last step)."""
        return SequencerStatistics(
            topics=len(self._topics),
            batches_ordered=self._batches,
            messages_ordered=self._messages,
            lag_batches=self._lag,
            lag_oldest_s=self._lag_oldest_ns / 1e9,
            holes_skipped=self._holes,
            index_full=self._index_full,
            index_segments_freed=self._index_segments_freed,
            session_skips=self._session_skips,
        )

    # -- topics --------------------------------------------------------------------

    def _refresh_topics(self) -> None:
        live = ordered_topics(self._buf, self._g)
        for index in list(self._topics):
            state, incarnation = read_topic_state(self._buf, self._g, index)
            if index not in live or (state, incarnation) != (
                TOPIC_LIVE,
                self._topics[index].incarnation,
            ):
                del self._topics[index]  # deleted (maybe made anew since)
        for index, name in live.items():
            if index not in self._topics:
                self._topics[index] = self._recover_topic(name, index)

    def _recover_topic(self, name: str, index: int) -> _TopicOrder:
        """Pick up a topic's order from the region (a new topic, or a restart)."""
        _, incarnation = read_topic_state(self._buf, self._g, index)
        topic = _TopicOrder(name, index, incarnation, self._g.max_brokers)
        topic.chain = index_chain(self._buf, self._g, index)
        topic.entries = read_ordered_count(self._buf, self._g, index)
        if topic.entries:
            last = read_index_entry(self._buf, self._g, topic.chain, topic.entries - 1)
            topic.next_total = last.total_order + last.num_msg
            # Cut short after the commit point: its header's "ordered" word
            # may not be written yet. Redo it, unless retention took the batch.
            found = generation_holding(self._buf, self._g, last.header_offset)
            if found == last.generation:
                U32.pack_into(self._buf, last.header_offset + BH_ORDERED, 1)
                if self._sessions is not None:
                    self._sessions.ordered(last.header_offset)
            logger.info(
                "sequencer: topic %r resumes at total order %d (%d batches ordered)",
                name,
                topic.next_total,
                topic.entries,
            )
        return topic

    def _recover_index_segments(self) -> None:
        """Free index segments that no index reaches (allocated, not linked yet)."""
        reachable = [
            unit
            for index in read_topics(self._buf, self._g).values()
            for unit in index_chain(self._buf, self._g, index).units
        ]
        freed = self._map.recover(INDEX_OWNER, reachable)
        if freed:
            logger.info("sequencer: freed %d index segment(s) no topic held", len(freed))

    # -- one stream ----------------------------------------------------------------

    def _frontier(self, topic: _TopicOrder, broker: int, cursor: _StreamCursor) -> None:
        """Set ``cursor`` after the stream's last ordered batch: a new stream's
        start, or where a sequencer that stopped had got to."""
        entry = read_stream_entry(self._buf, self._g, topic.index, broker)
        position = WalkPosition()
        after = WalkPosition()
        done = walked = 0
        for offset, state, is_ordered, _, total in _walk(
            self._buf, self._g, topic.index, broker, position
        ):
            if state != BATCH_COMMITTED:
                continue
            walked += 1
            if is_ordered:
                done = walked
                after = attrs.evolve(position, offset=offset + BATCH_HEADER_SIZE + total)
        cursor.position = after
        cursor.done = entry.first_batch + done

    def _order_stream(
        self,
        topic: _TopicOrder,
        broker: int,
        now_ns: int,
        budget: int,
        ordered: list[OrderedBatch],
    ) -> bool:
        """Order what the stream has; True if it stopped at a held session batch."""
        cursor = topic.cursors[broker]
        buf, sessions = self._buf, self._sessions
        try:
            if cursor.position is None:
                (first,) = U32.unpack_from(self._buf, self._g.stream_offset(topic.index, broker))
                if first == NO_SEGMENT:
                    return False
                self._frontier(topic, broker, cursor)
            position = cursor.position
            assert position is not None
            for offset, state, is_ordered, num_msg, total in _walk(
                self._buf, self._g, topic.index, broker, position
            ):
                if state == BATCH_ABANDONED:
                    continue
                if state == BATCH_RESERVED:
                    if not self._past_hole(cursor, position, offset, total, now_ns):
                        return False
                    continue
                cursor.hole = None
                if is_ordered:
                    cursor.done += 1
                    continue
                if len(ordered) >= budget:
                    return False
                # A publish session's batch names its session at BH_SESSION.
                session = sessions is not None and _SESSION.unpack_from(buf, offset)[0]
                if session:
                    placement = self._place_session_batch(cursor, offset, now_ns)
                    if placement is Placement.HOLD:
                        return True
                    if placement is Placement.NEVER:
                        cursor.done += 1
                        continue
                batch = self._order_one(topic, broker, offset, num_msg, total, position)
                if batch is None:
                    return False  # no room for the index: the next step tries again
                if session:
                    assert sessions is not None
                    sessions.ordered(offset)
                cursor.done += 1
                ordered.append(batch)
        except SegmentReclaimed:
            # Retention let the segment go; it keeps unordered batches of an
            # order-5 topic, so only ordered ones went: find the frontier anew.
            cursor.position = None
        return False

    def _place_session_batch(self, cursor: _StreamCursor, offset: int, now_ns: int) -> Placement:
        """Whether to order the session batch at ``offset`` now, wait, or never.

        One whose predecessor is missing waits ``hole_timeout_ns``; then the
        missing batch_seqs are skipped. One whose batch_seq was skipped gets
        ``NEVER_ORDERED`` in its ``ordered`` word (one store: a sequencer that
        dies before it decides the same again).
        """
        assert self._sessions is not None
        placement = self._sessions.placement(offset)
        if placement is Placement.NEVER:
            U32.pack_into(self._buf, offset + BH_ORDERED, NEVER_ORDERED)
            cursor.held = None
            return placement
        if placement is Placement.ORDER:
            cursor.held = None
            return placement
        if cursor.held is None or cursor.held.offset != offset:
            cursor.held = _Hole(offset, now_ns)
        waited = now_ns - cursor.held.since_ns
        if waited < self.hole_timeout_ns:
            return Placement.HOLD
        skipped = self._sessions.skip_before(offset)
        self._session_skips += skipped
        logger.warning(
            "sequencer: a publish session's batch at byte %d waited %.1f s for the batch_seq "
            "before it; %d missing batch_seq(s) skipped (never ordered)",
            offset,
            waited / 1e9,
            skipped,
        )
        cursor.held = None
        return Placement.ORDER

    def _past_hole(
        self,
        cursor: _StreamCursor,
        position: WalkPosition,
        offset: int,
        total_size: int,
        now_ns: int,
    ) -> bool:
        """Whether to go past the reserved batch at ``offset``: only once a
        committed batch follows it and it has waited ``hole_timeout_ns``."""
        end = offset + BATCH_HEADER_SIZE + total_size
        if end + BATCH_HEADER_SIZE > position.end:
            return False
        (next_total,) = U64.unpack_from(self._buf, end + BH_TOTAL_SIZE)
        (next_state,) = U32.unpack_from(self._buf, end + 16)
        if next_total == 0 or next_state == BATCH_RESERVED:
            return False  # nothing committed behind it (yet): no hole
        if cursor.hole is None or cursor.hole.offset != offset:
            cursor.hole = _Hole(offset, now_ns)
        if now_ns - cursor.hole.since_ns < self.hole_timeout_ns:
            return False
        logger.warning(
            "sequencer: went past a batch at byte %d that stayed reserved for %.1f s; "
            "it is never ordered",
            offset,
            (now_ns - cursor.hole.since_ns) / 1e9,
        )
        cursor.hole = None
        self._holes += 1
        return True

    def _order_one(
        self,
        topic: _TopicOrder,
        broker: int,
        header_offset: int,
        num_msg: int,
        total_size: int,
        position: WalkPosition,
    ) -> OrderedBatch | None:
        entry = topic.entries
        slot = self._index_slot(topic, entry)
        if slot is None:
            return None
        total = topic.next_total
        self._stamp(header_offset + BATCH_HEADER_SIZE, num_msg, total_size, total)
        U64.pack_into(self._buf, header_offset + BH_TOTAL_ORDER, total)
        INDEX_ENTRY.pack_into(
            self._buf, slot, broker, num_msg, total, header_offset, position.generation
        )
        # The commit point: the batch has its place once the count covers it.
        U64.pack_into(
            self._buf, self._g.topic_offset(topic.index) + TOPIC_ORDERED_OFFSET, entry + 1
        )
        U32.pack_into(self._buf, header_offset + BH_ORDERED, 1)
        topic.entries = entry + 1
        topic.next_total = total + num_msg
        self._batches += 1
        self._messages += num_msg
        return OrderedBatch(topic.name, broker, header_offset, num_msg, total, entry)

    def _stamp(self, payload_offset: int, num_msg: int, total_size: int, first: int) -> None:
        """Write ``first + i`` into the ``total_order`` of record ``i``."""
        words = self._words
        base = payload_offset // 8
        padded = int(words[base + MH_PADDED_SIZE])
        if num_msg == 1:
            words[base + MH_TOTAL_ORDER] = first
            return
        step = padded // 8
        stop = base + num_msg * step
        if (
            padded * num_msg == total_size
            and padded % 8 == 0
            and padded
            and bool((words[base:stop:step] == padded).all())
        ):
            # One record size (the common case): a strided column. (Sizes
            # that merely add up to as much take the walk below.)
            words[base + MH_TOTAL_ORDER : stop : step] = np.arange(
                first, first + num_msg, dtype=np.uint64
            )
            return
        at = base
        for i in range(num_msg):
            words[at + MH_TOTAL_ORDER] = first + i
            at += int(words[at + MH_NEXT_MSG_DIFF]) // 8

    def _index_slot(self, topic: _TopicOrder, entry: int) -> int | None:
        """Where entry ``entry`` goes, adding an index segment if it needs one."""
        chain = topic.chain
        if entry // index_per_segment(self._g) - chain.first >= len(chain.units):
            unit = self._map.allocate(0, INDEX_OWNER)
            if unit is None:
                self._index_full += 1
                logger.warning("sequencer: no free unit for topic %r's ordered index", topic.name)
                return None
            (generation,) = U64.unpack_from(self._buf, NEXT_GENERATION_OFFSET)
            U64.pack_into(self._buf, NEXT_GENERATION_OFFSET, generation + 1)
            base = self._g.segment_offset(unit)
            SEGMENT_HEADER.pack_into(
                self._buf,
                base,
                SEGMENT_MAGIC,
                topic.index,
                INDEX_OWNER,
                chain.first + len(chain.units),
                NO_SEGMENT,
                0,
                generation,
            )
            # Linked only once its header is written (a reader follows links).
            if chain.units:
                prev = self._g.segment_offset(chain.units[-1])
                U32.pack_into(self._buf, prev + SEGMENT_NEXT_OFFSET, unit)
            else:
                head = self._g.topic_offset(topic.index) + TOPIC_INDEX_HEAD_OFFSET
                U32.pack_into(self._buf, head, unit + 1)
            chain.units.append(unit)
            chain.generations.append(generation)
        return index_entry_offset(self._g, chain, entry)

    # -- letting index segments go -----------------------------------------------------

    def _reclaim_index(self, topic: _TopicOrder) -> int:
        """Let the topic's first index segments go while every batch they
        name is gone (retention let it go); returns how many went.

        Crash-safe: the topic's head pointer moves first (one store), then
        the segment is freed; a segment cut off but not freed is freed by the
        next sequencer's start (``_recover_index_segments``).
        """
        chain = topic.chain
        per = index_per_segment(self._g)
        done = 0
        # Never the last segment, and only one whose every entry is written.
        while len(chain.units) > 1 and (chain.first + 1) * per <= topic.entries:
            base = self._g.segment_offset(chain.units[0]) + SEGMENT_HEADER_SIZE
            entries = np.frombuffer(self._buf, dtype=_ENTRIES, count=per, offset=base)
            # Entries of one data segment share its generation: one look each.
            generations, first = np.unique(entries["generation"], return_index=True)
            headers = entries["header"][first]
            if any(
                generation_holding(self._buf, self._g, int(header)) == int(generation)
                for generation, header in zip(generations, headers, strict=True)
            ):
                break  # a batch it names is still in the region
            U32.pack_into(
                self._buf,
                self._g.topic_offset(topic.index) + TOPIC_INDEX_HEAD_OFFSET,
                chain.units[1] + 1,
            )
            self._map.free(chain.units[0])
            del chain.units[0], chain.generations[0]
            chain.first += 1
            done += 1
        self._index_segments_freed += done
        return done

    # -- the lag -------------------------------------------------------------------

    def _measure_lag(self, now_ns: int) -> None:
        lag = 0
        oldest = 0
        for topic in self._topics.values():
            for broker, cursor in enumerate(topic.cursors):
                entry = read_stream_entry(self._buf, self._g, topic.index, broker)
                waiting = max(0, entry.batches - cursor.done) if cursor.position else 0
                if waiting:
                    if cursor.waiting_since is None:
                        cursor.waiting_since = now_ns
                    oldest = max(oldest, now_ns - cursor.waiting_since)
                else:
                    cursor.waiting_since = None
                lag += waiting
        self._lag = lag
        self._lag_oldest_ns = oldest
