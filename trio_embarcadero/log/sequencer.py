"""The sequencer: one total order over every broker's stream of an order-5 topic.

The broker that holds the sequencer lease (see :mod:`.lease`) runs it; it
knows nothing of Trio. Each call of
:meth:`Sequencer.step` looks at every live order-5 topic in the region, walks
each broker's stream of it from where the last step stopped, and gives every
batch committed since a place in the topic's total order: per message, gap-free
from 0, in the order the sequencer finds the commits (a stream's batches in
their commit order, so a connection's batches keep the order it sent them in).
It orders a stream's batches found in one step as a run: the total orders
into the headers, the entries appended to the topic's ordered index, one
commit point for the run, then the headers marked ordered; a long run with
one numpy store of each kind. It writes no record, so a batch of any size
costs the same: the broker that stored a batch writes its records' total
orders once it is ordered (see :mod:`.stamps`), which spreads that work
over the brokers.
The layout and the crash-safe order of those stores are described in
:mod:`.layout`; a sequencer that starts again (after a ``kill -9`` at any
point) goes on from the region alone.

The broker's writer commits a stream's batches in log order, so a batch still
being received holds back only its own stream's later batches: they stay
reserved, or are abandoned (given up), and neither kind waits for it. A
committed batch behind a reserved one (a hole: a writer that commits out of
log order) is waited for at most ``hole_timeout_ns``; then the sequencer goes
past it, and that batch is never ordered: its ``ordered`` word becomes 2
(``NEVER_ORDERED``) while it is still reserved, so once it commits (or is
abandoned) nothing waits for its order; the broker answers its publisher
with an error in place of its ack.

A publish session's batches (see :mod:`.sessions`) are ordered by their
batch_seq, also when different brokers stored them: a session batch whose
predecessor is not ordered yet is deferred (the walk of its stream goes on
past it, so sessions spread over brokers never wait for each other) and
ordered once its predecessor is, for at most ``hole_timeout_ns``; then the
batch_seqs still missing before it are skipped and it is ordered. A plain
batch is never deferred, so it never overtakes an earlier plain batch of
its stream. (Batches replayed from a disk log keep their stream's order: a
replayed session batch that waits holds its stream.) A session batch whose
batch_seq was skipped is never ordered: its header's ``ordered`` word
becomes 2 (``NEVER_ORDERED``). A session's batches go into runs like any
others: those of the run being written count as ordered for the next
(:meth:`.sessions.SessionTable.placement`), and the session's next
batch_seq is written after the run's commit point. A batch_seq is skipped,
or a word 2 written, only once the run before it is written whole (see
:mod:`.layout`).

Every step runs under the region's file lock: a topic is not deleted, nor a
segment reclaimed, while the sequencer writes into it.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import logging
import struct
from collections.abc import Callable, Iterator, Sequence
from typing import Any, overload

import attrs
import numpy as np
import numpy.typing as npt

from ..wire import (
    BATCH_HEADER_SIZE,
    BH_BATCH_COMPLETE,
)
from .layout import (
    BATCH_ABANDONED,
    BATCH_COMMITTED,
    BATCH_RESERVED,
    BH_ORDERED,
    BH_RESTORED,
    BH_SESSION,
    BH_TOTAL_ORDER,
    BH_TOTAL_SIZE,
    INDEX_ENTRY,
    INDEX_ENTRY_SIZE,
    INDEX_OWNER,
    NEVER_ORDERED,
    NEXT_GENERATION_OFFSET,
    NO_SEGMENT,
    SEGMENT_HEADER,
    SEGMENT_HEADER_SIZE,
    SEGMENT_MAGIC,
    SEGMENT_NEXT_OFFSET,
    STREAM_COUNTS_OFFSET,
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
    ordered_slots,
    read_index_entry,
    read_ordered_count,
    read_stream_entry,
    read_topic_name,
    read_topic_state,
    read_topics,
)
from .segments import SegmentMap
from .sessions import Placement, SessionTable

logger = logging.getLogger(__name__)

#: Batches one step orders at most, so the file lock is never held long.
DEFAULT_STEP_BUDGET = 4096
#: Batches ordered with one commit point at most (one store of the ordered
#: count covers them all). A sequencer that starts again redoes the
#: ``ordered`` words of the index's last ``RUN_LIMIT`` entries: a run's
#: stores after its commit point.
RUN_LIMIT = 1024
#: A stream entry's committed batches, at +24.
_BATCHES = STREAM_COUNTS_OFFSET + 8
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


class OrderedBatches(Sequence[OrderedBatch]):
    """What one step ordered: its batches in total order per topic, each
    :class:`OrderedBatch` made only when asked for (a step may order
    thousands, and most callers only count them)."""

    def __init__(self) -> None:
        # Per run: topic, broker, first entry, first total order, then its
        # batches' header offsets, message counts and total orders.
        self._runs: list[tuple[str, int, int, list[int], list[int], list[int]]] = []
        self._starts: list[int] = []
        self._count = 0

    def _add(
        self, topic: str, broker: int, entry: int, headers: list[int], num_msgs: list[int],
        totals: list[int],
    ) -> None:  # fmt: skip
        self._runs.append((topic, broker, entry, headers, num_msgs, totals))
        self._starts.append(self._count)
        self._count += len(headers)

    def __len__(self) -> int:
        return self._count

    @overload
    def __getitem__(self, index: int) -> OrderedBatch: ...

    @overload
    def __getitem__(self, index: slice) -> list[OrderedBatch]: ...

    def __getitem__(self, index: int | slice) -> OrderedBatch | list[OrderedBatch]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._count))]
        if index < 0:
            index += self._count
        if not 0 <= index < self._count:
            raise IndexError("ordered batch index out of range")
        run = bisect.bisect_right(self._starts, index) - 1
        topic, broker, entry, headers, num_msgs, totals = self._runs[run]
        k = index - self._starts[run]
        return OrderedBatch(topic, broker, headers[k], num_msgs[k], totals[k], entry + k)

    def __eq__(self, other: object) -> bool:
        # Equal to any list or tuple of the same batches, as a list would be.
        if isinstance(other, OrderedBatches | list | tuple):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"OrderedBatches({list(self)!r})"


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
        holes_skipped: Batches it went past after ``hole_timeout_ns``
            (while reserved; each is marked never ordered at once).
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


#: A batch header's num_msg, state, broker, ordered, session word (see
#: :mod:`.sessions`), total_size and restored word, read at +12.
_HEAD = struct.Struct(f"<IIIIIQ{BH_RESTORED - 40}xI")
assert _HEAD.size == BH_RESTORED + 4 - 12


def _read_head(buf: Any, offset: int) -> tuple[int, int, int, int, int, int] | None:
    """``(state, ordered, session, num_msg, total_size, restored)`` of the
    batch header at ``offset``, or None where none is written yet.

    Another process writes headers as this reads them: the size first (0
    until the whole header is written: the end of the data is marked there
    before, and the header's write ends with it), then the state (committed
    only after that), then the rest. Read in one go, the record count could
    come from before the header was written and the state from after the
    commit (this process preempted between two fields while the other
    reserves, copies and commits a small batch): a batch ordered with 0
    records.
    """
    (total,) = U64.unpack_from(buf, offset + BH_TOTAL_SIZE)
    if not total:
        return None
    (state,) = U32.unpack_from(buf, offset + BH_BATCH_COMPLETE)
    num_msg, _, _, ordered, session, _, restored = _HEAD.unpack_from(buf, offset + 12)
    return state, ordered, session, num_msg, total, restored


def _walk(
    buf: Any, g: Geometry, topic_index: int, broker: int, pos: WalkPosition
) -> Iterator[tuple[int, int, int, int, int, int, int]]:
    """``(offset, state, ordered, session, num_msg, total_size, restored)`` of
    each batch of a stream from ``pos`` on, moving ``pos`` past a batch when the next is asked
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
        head = _read_head(buf, offset) if offset <= header_room else None
        if head is not None:
            state, ordered, session, num_msg, total, restored = head
            end = offset + BATCH_HEADER_SIZE + total
            if end <= pos.end:
                yield offset, state, ordered, session, num_msg, total, restored
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


_ONE = np.uint32(1)
#: A run of at most this many batches is ordered batch by batch with
#: ``struct`` stores; a longer one with one numpy store per kind of word.
_FEW_BATCHES = 4


def _store(view: npt.NDArray[Any], at: npt.NDArray[np.int64] | slice, values: Any) -> None:
    """``view[at] = values``: every store to the region of ordering a run
    (but its commit point) goes through here, element by element in the
    order of ``at``, so a test can stop it anywhere, as a ``kill -9`` would."""
    view[at] = values


class _Run:
    """Batches of one stream found to order: their header offsets, message
    counts and data segments' generations, and the next
    batch_seq of each publish session with a batch among them."""

    __slots__ = ("generations", "messages", "num_msgs", "offsets", "sessions")

    def __init__(self) -> None:
        self.start()

    def start(self) -> None:
        """Begin anew (new lists: the batches ordered keep the old ones)."""
        self.messages = 0
        self.offsets: list[int] = []
        self.num_msgs: list[int] = []
        self.generations: list[int] = []
        # Entry offset of a session in the table: its batch_seq after the run.
        self.sessions: dict[int, int] = {}


class _Hole:
    __slots__ = ("offset", "since_ns")

    def __init__(self, offset: int, since_ns: int) -> None:
        self.offset = offset
        self.since_ns = since_ns


class _Deferred:
    """A committed session batch that waits for its predecessor, behind the
    stream's walk: where it is (its header, its data segment's generation)
    and since when it waits."""

    __slots__ = ("generation", "offset", "since_ns")

    def __init__(self, offset: int, generation: int, since_ns: int) -> None:
        self.offset = offset
        self.generation = generation
        self.since_ns = since_ns


class _StreamCursor:
    """Where the sequencer stands in one broker's stream of a topic."""

    __slots__ = ("deferred", "done", "held", "hole", "new_seen", "passed", "position",
                 "waiting_since")  # fmt: skip

    def __init__(self) -> None:
        self.position: WalkPosition | None = None
        # Committed batches of the stream behind the position (ordered,
        # skipped or reclaimed), numbered as the stream's entry counts them.
        self.done = 0
        self.hole: _Hole | None = None
        # A replayed session batch waiting for its predecessor (since when).
        self.held: _Hole | None = None
        # Session batches behind the position that wait for their
        # predecessors, in the stream's order (the walk went on past them).
        self.deferred: list[_Deferred] = []
        self.waiting_since: int | None = None
        # A batch not replayed from the disk log was seen: none comes after.
        self.new_seen = False
        # Batches behind the position gone past while reserved (never
        # ordered), until they commit (then counted in ``done``) or not: their
        # header offsets and segments' generations.
        self.passed: list[tuple[int, int]] = []


class _TopicOrder:
    """The sequencer's state of one order-5 topic."""

    def __init__(self, name: str, index: int, incarnation: int, geometry: Geometry) -> None:
        max_brokers = geometry.max_brokers
        self.name = name
        self.index = index
        self.incarnation = incarnation
        # Where each broker's stream entry is (looked at every step).
        self.streams = [geometry.stream_offset(index, broker) for broker in range(max_brokers)]
        self.chain = IndexChain()
        self.entries = 0
        self.next_total = 0
        self.cursors = [_StreamCursor() for _ in range(max_brokers)]
        # Streams whose next batch is one replayed from the disk log with a
        # total order after the next one (other streams' batches come
        # first): the total order it waits for, by broker.
        self.restored_waiting: dict[int, int] = {}
        # Since when a step found nothing to order but such batches; after
        # one wait of the hole timeout, later gaps are not waited for.
        self.gap_since: int | None = None
        self.gap_waited = False


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
        self._u32: npt.NDArray[np.uint32] = np.frombuffer(buf, dtype="<u4")
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
        del self._words, self._u32, self._map

    # -- one step ------------------------------------------------------------------

    def step(self, now_ns: int, budget: int = DEFAULT_STEP_BUDGET) -> OrderedBatches:
        """Order what was committed since the last step, up to ``budget`` batches.

        Args:
            now_ns: The time now (any monotonic nanosecond clock; it times
                holes and the lag).
            budget: At most this many batches are ordered.

        Returns:
            The batches ordered, in total order per topic.
        """
        ordered = OrderedBatches()
        with self._lock():
            self._refresh_topics()
            for topic in self._topics.values():
                if self._order_restored(topic, now_ns, budget, ordered):
                    self._order_streams(topic, now_ns, budget, ordered)
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
        live = ordered_slots(self._buf, self._g)
        for index in list(self._topics):
            state, incarnation = read_topic_state(self._buf, self._g, index)
            if index not in live or (state, incarnation) != (
                TOPIC_LIVE,
                self._topics[index].incarnation,
            ):
                del self._topics[index]  # deleted (maybe made anew since)
        for index in live:
            if index not in self._topics:
                name = read_topic_name(self._buf, self._g, index)
                if name is not None:
                    self._topics[index] = self._recover_topic(name, index)

    def _recover_topic(self, name: str, index: int) -> _TopicOrder:
        """Pick up a topic's order from the region (a new topic, or a restart)."""
        _, incarnation = read_topic_state(self._buf, self._g, index)
        topic = _TopicOrder(name, index, incarnation, self._g)
        topic.chain = index_chain(self._buf, self._g, index)
        topic.entries = read_ordered_count(self._buf, self._g, index)
        if topic.entries:
            last = read_index_entry(self._buf, self._g, topic.chain, topic.entries - 1)
            topic.next_total = last.total_order + last.num_msg
            self._redo_ordered_words(topic)
            logger.info(
                "sequencer: topic %r resumes at total order %d (%d batches ordered)",
                name,
                topic.next_total,
                topic.entries,
            )
        return topic

    def _redo_ordered_words(self, topic: _TopicOrder) -> None:
        """Write the ``ordered`` words of the index's last entries again, and
        the next batch_seq to order of the publish sessions among them: a
        sequencer cut short after a run's commit point may not have written
        them all. (Not those of batches retention took since.)"""
        per = index_per_segment(self._g)
        chain = topic.chain
        start = max(topic.entries - RUN_LIMIT, chain.first * per)
        while start < topic.entries:
            unit = chain.units[start // per - chain.first]
            count = min(topic.entries - start, per - start % per)
            entries = np.frombuffer(
                self._buf,
                dtype=_ENTRIES,
                count=count,
                offset=self._g.segment_offset(unit)
                + SEGMENT_HEADER_SIZE
                + start % per * INDEX_ENTRY_SIZE,
            )
            generations, first = np.unique(entries["generation"], return_index=True)
            kept = [
                int(generation)
                for generation, header in zip(generations, entries["header"][first], strict=True)
                if generation_holding(self._buf, self._g, int(header)) == int(generation)
            ]
            headers = entries["header"][np.isin(entries["generation"], kept)].astype(np.int64)
            _store(self._u32, (headers + BH_ORDERED) // 4, _ONE)
            if self._sessions is not None:
                sessions = headers[self._u32[(headers + BH_SESSION) // 4] != 0]
                for header in sessions.tolist():
                    self._sessions.ordered(header)
            start += count

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

    def _frontier(
        self, topic: _TopicOrder, broker: int, cursor: _StreamCursor, now_ns: int
    ) -> None:
        """Set ``cursor`` after the stream's last ordered batch: a new stream's
        start, or where a sequencer that stopped had got to. The committed
        batches before it not ordered (word 0) are session batches the walk
        went past while they waited for their predecessors: they wait again,
        from now. (Batches never ordered after it are passed again: a
        region rebuilt from the disk log has them among batches it orders
        anew.)"""
        entry = read_stream_entry(self._buf, self._g, topic.index, broker)
        position = WalkPosition()
        after = WalkPosition()
        done = walked = 0
        passed: list[tuple[int, int]] = []
        waiting: list[_Deferred] = []
        kept = deferred = 0
        for offset, state, is_ordered, _, _, total, _ in _walk(
            self._buf, self._g, topic.index, broker, position
        ):
            if state == BATCH_RESERVED and is_ordered == NEVER_ORDERED:
                passed.append((offset, position.generation))
            if state != BATCH_COMMITTED:
                continue
            walked += 1
            if is_ordered == 0:
                waiting.append(_Deferred(offset, position.generation, now_ns))
            elif is_ordered == 1:
                done = walked
                kept = len(passed)
                deferred = len(waiting)
                after = attrs.evolve(position, offset=offset + BATCH_HEADER_SIZE + total)
        cursor.position = after
        cursor.done = entry.first_batch + done - deferred
        cursor.passed = passed[:kept]  # those after it are walked again
        cursor.deferred = waiting[:deferred]

    def _order_restored(
        self, topic: _TopicOrder, now_ns: int, budget: int, ordered: OrderedBatches
    ) -> bool:
        """Order the batches replayed from the disk log with their total
        orders (a region rebuilt after it was lost), each stream's before any
        of its others; returns whether the others may be ordered now (no
        replayed batch waits for another stream's)."""
        while True:
            before = topic.entries
            topic.restored_waiting.clear()
            for broker, cursor in enumerate(topic.cursors):
                if not cursor.new_seen and len(ordered) < budget:
                    self._order_stream(topic, broker, now_ns, budget, ordered, restored_only=True)
            if not topic.restored_waiting:
                topic.gap_since = None
                topic.gap_waited = False
                return True
            if len(ordered) >= budget:
                return False
            if topic.entries != before:
                topic.gap_since = None
                continue  # streams interleave: another pass orders more
            # Nothing replayed holds the next total order (yet): a broker
            # that has not replayed its stream may still. After the hole
            # timeout (once: a broker that replays later has its batches
            # ordered anew), go on at the first total order that is there.
            if topic.gap_since is None:
                topic.gap_since = now_ns
            if not topic.gap_waited and now_ns - topic.gap_since < self.hole_timeout_ns:
                return False
            topic.gap_waited = True
            resume = min(topic.restored_waiting.values())
            logger.warning(
                "sequencer: topic %r: no batch replayed from a disk log holds total orders "
                "%d..%d; going on at %d",
                topic.name,
                topic.next_total,
                resume - 1,
                resume,
            )
            topic.next_total = resume
            topic.gap_since = None

    def _order_streams(
        self, topic: _TopicOrder, now_ns: int, budget: int, ordered: OrderedBatches
    ) -> None:
        """Order what every stream of ``topic`` committed since the last step."""
        while True:
            before = len(ordered)
            held = False
            for broker in range(self._g.max_brokers):
                if len(ordered) >= budget:
                    break
                held |= self._order_stream(topic, broker, now_ns, budget, ordered)
            # A session batch held in one stream may be free to go now that
            # another stream's batches are ordered: look again.
            if not held or len(ordered) in (before, budget):
                return

    def _order_stream(
        self,
        topic: _TopicOrder,
        broker: int,
        now_ns: int,
        budget: int,
        ordered: OrderedBatches,
        *,
        restored_only: bool = False,
    ) -> bool:
        """Order what a stream committed since the last step (with
        ``restored_only``: only its batches replayed with their total orders,
        up to the first it has to wait for); True if a publish session's
        batch waits for its predecessor.

        A session batch that waits is deferred: the walk goes on past it, so
        other sessions' batches and plain ones behind it are ordered (a plain
        batch still never overtakes an earlier plain one: the walk keeps the
        stream's order for all but deferred batches), and it is ordered once
        its predecessor is (:meth:`_order_deferred`), also in a later step.
        Replayed batches keep their stream's order: one that waits stops the
        walk."""
        cursor = topic.cursors[broker]
        if cursor.position is None:
            (first,) = U32.unpack_from(self._buf, topic.streams[broker])
            if first == NO_SEGMENT:
                return False
            try:
                self._frontier(topic, broker, cursor, now_ns)
            except SegmentReclaimed:
                return False
        position = cursor.position
        assert position is not None
        held = False
        if cursor.deferred and not restored_only:
            held = self._order_deferred(topic, broker, now_ns, budget, ordered)
        run = _Run()
        sessions = self._sessions
        per = index_per_segment(self._g)
        chain = topic.chain
        capacity = (chain.first + len(chain.units)) * per  # index entries with a place
        try:
            for offset, state, is_ordered, session, num_msg, total, restored in _walk(
                self._buf, self._g, topic.index, broker, position
            ):
                if state == BATCH_ABANDONED:
                    continue
                if state == BATCH_RESERVED:
                    if is_ordered != NEVER_ORDERED:  # (else gone past before)
                        if not self._past_hole(cursor, position, offset, total, now_ns):
                            break
                        # It stays out of the order, also once it commits (its
                        # writer writes no more of its header than the state):
                        # one store, once the run before it is written whole.
                        self._flush(topic, broker, run, ordered)
                        U32.pack_into(self._buf, offset + BH_ORDERED, NEVER_ORDERED)
                    cursor.passed.append((offset, position.generation))
                    continue
                cursor.hole = None
                if is_ordered:
                    cursor.done += 1
                    continue
                if len(ordered) + len(run.offsets) >= budget:
                    break
                if restored:
                    (was,) = U64.unpack_from(self._buf, offset + BH_TOTAL_ORDER)
                    due = topic.next_total + run.messages
                    if was > due:
                        topic.restored_waiting[broker] = was
                        break
                    if was < due:
                        logger.warning(
                            "sequencer: topic %r: a batch replayed from broker %d's disk log "
                            "had total order %d, given again since; it is ordered anew at %d",
                            topic.name,
                            broker,
                            was,
                            due,
                        )
                elif restored_only:
                    cursor.new_seen = True
                    break
                if len(run.offsets) >= RUN_LIMIT:
                    self._flush(topic, broker, run, ordered)
                if topic.entries + len(run.offsets) >= capacity:
                    if self._index_slot(topic, capacity) is None:
                        break  # no room for the index: the next step tries again
                    capacity += per
                # A publish session's batch names its session (BH_SESSION).
                if session and sessions is not None:
                    since = now_ns
                    if restored_only:
                        if cursor.held is None or cursor.held.offset != offset:
                            cursor.held = _Hole(offset, now_ns)
                        since = cursor.held.since_ns
                    placement = self._place_session_batch(
                        topic, broker, run, offset, since, now_ns, ordered
                    )
                    if placement is Placement.HOLD:
                        held = True
                        if restored_only:
                            break
                        cursor.deferred.append(_Deferred(offset, position.generation, now_ns))
                        continue
                    cursor.held = None
                    if placement is Placement.NEVER:
                        cursor.done += 1
                        continue
                    sessions.add_to_run(offset, run.sessions)
                run.offsets.append(offset)
                run.messages += num_msg
                run.num_msgs.append(num_msg)
                run.generations.append(position.generation)
        except SegmentReclaimed:
            # Retention let the segment go; it keeps unordered batches of an
            # order-5 topic, so only ordered ones went: find the frontier anew
            # (after ordering the batches found before, which are still there:
            # the file lock keeps retention out while the step runs).
            cursor.position = None
        self._flush(topic, broker, run, ordered)
        return held

    def _place_session_batch(
        self,
        topic: _TopicOrder,
        broker: int,
        run: _Run,
        offset: int,
        since_ns: int,
        now_ns: int,
        ordered: OrderedBatches,
    ) -> Placement:
        """Whether to order the session batch at ``offset`` now (after the
        batches of ``run``), wait, or never.

        One whose predecessor is missing waits ``hole_timeout_ns`` (from
        ``since_ns``, when it was first found waiting); then the missing
        batch_seqs are skipped. One whose batch_seq was skipped gets
        ``NEVER_ORDERED`` in its ``ordered`` word (one store: a sequencer that
        dies before it decides the same again). Both are written only once
        ``run`` is ordered (written whole, its sessions' next batch_seqs too):
        a restart resumes after a stream's last batch whose ``ordered`` word
        is set, and decides from the session table.
        """
        sessions = self._sessions
        assert sessions is not None
        placement = sessions.placement(offset, run.sessions)
        if placement is Placement.ORDER:
            return placement
        if placement is Placement.NEVER:
            self._flush(topic, broker, run, ordered)
            U32.pack_into(self._buf, offset + BH_ORDERED, NEVER_ORDERED)
            return placement
        waited = now_ns - since_ns
        if waited < self.hole_timeout_ns:
            return Placement.HOLD
        self._flush(topic, broker, run, ordered)
        skipped = sessions.skip_before(offset)
        self._session_skips += skipped
        logger.warning(
            "sequencer: a publish session's batch at byte %d waited %.1f s for the batch_seq "
            "before it; %d missing batch_seq(s) skipped (never ordered)",
            offset,
            waited / 1e9,
            skipped,
        )
        return Placement.ORDER

    def _order_deferred(
        self, topic: _TopicOrder, broker: int, now_ns: int, budget: int, ordered: OrderedBatches
    ) -> bool:
        """Order the stream's deferred session batches whose predecessors are
        ordered now (or that waited ``hole_timeout_ns``: the batch_seqs
        missing before them are skipped), as one run in the stream's order,
        and write 2 into those never ordered; True if any still waits.

        Crash-safe like any run: a sequencer that starts again finds them
        among the stream's committed batches before its last ordered one
        whose ``ordered`` word is 0 (:meth:`_frontier`)."""
        sessions = self._sessions
        cursor = topic.cursors[broker]
        run = _Run()
        waiting: list[_Deferred] = []
        per = index_per_segment(self._g)
        chain = topic.chain
        capacity = (chain.first + len(chain.units)) * per
        for k, item in enumerate(cursor.deferred):
            if len(ordered) + len(run.offsets) >= budget:
                waiting += cursor.deferred[k:]
                break
            if generation_holding(self._buf, self._g, item.offset) != item.generation:
                continue  # its topic went (retention keeps batches not ordered)
            if len(run.offsets) >= RUN_LIMIT:
                self._flush(topic, broker, run, ordered)
            if topic.entries + len(run.offsets) >= capacity:
                if self._index_slot(topic, capacity) is None:
                    waiting += cursor.deferred[k:]
                    break
                capacity += per
            if sessions is not None:
                placement = self._place_session_batch(
                    topic, broker, run, item.offset, item.since_ns, now_ns, ordered
                )
                if placement is Placement.HOLD:
                    waiting.append(item)
                    continue
                if placement is Placement.NEVER:
                    cursor.done += 1
                    continue
                sessions.add_to_run(item.offset, run.sessions)
            (num_msg,) = U32.unpack_from(self._buf, item.offset + 12)
            run.offsets.append(item.offset)
            run.messages += num_msg
            run.num_msgs.append(num_msg)
            run.generations.append(item.generation)
        cursor.deferred = waiting
        self._flush(topic, broker, run, ordered)
        return bool(waiting)

    def _past_hole(
        self,
        cursor: _StreamCursor,
        position: WalkPosition,
        offset: int,
        total_size: int,
        now_ns: int,
    ) -> bool:
        """Whether to go past the reserved batch at ``offset``: only once a
        committed batch follows it and it has waited ``hole_timeout_ns``.

        Abandoned batches behind it are looked past: they wait for nothing.
        (The broker's writer commits in log order, so its batches behind a
        reserved one stay reserved until it is settled; one that a
        connection gave up meanwhile is no reason to go past it.)
        """
        end = offset + BATCH_HEADER_SIZE + total_size
        while True:
            if end + BATCH_HEADER_SIZE > position.end:
                return False
            (next_total,) = U64.unpack_from(self._buf, end + BH_TOTAL_SIZE)
            (next_state,) = U32.unpack_from(self._buf, end + BH_BATCH_COMPLETE)
            if next_total == 0 or next_state not in (BATCH_COMMITTED, BATCH_ABANDONED):
                return False  # nothing committed behind it (yet): no hole
            if next_state == BATCH_COMMITTED:
                break
            end += BATCH_HEADER_SIZE + next_total
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

    def _flush(self, topic: _TopicOrder, broker: int, run: _Run, ordered: OrderedBatches) -> None:
        """Order ``run`` (if it holds any batch) and begin a new one."""
        if run.offsets:
            self._order_run(topic, broker, run, ordered)
            topic.cursors[broker].done += len(run.offsets)
            run.start()

    def _order_run(
        self, topic: _TopicOrder, broker: int, run: _Run, ordered: OrderedBatches
    ) -> None:
        """Order a run of a stream's batches (consecutive in its commit order)
        whose index entries have room: the stores of :mod:`.layout`'s order,
        each for the whole run before the next, with one commit point."""
        n = len(run.offsets)
        if not n:
            return
        if not all(run.num_msgs):
            # A committed batch holds at least one record: its header was
            # read where no header is (or while one was being written).
            logger.error(
                "sequencer: topic %r: broker %d's batches at bytes %s have record counts %s "
                "(headers %s)",
                topic.name,
                broker,
                run.offsets,
                run.num_msgs,
                [bytes(self._buf[o : o + BATCH_HEADER_SIZE]).hex() for o in run.offsets],
            )
        entry = topic.entries
        totals = list(itertools.accumulate(run.num_msgs, initial=topic.next_total))
        if n <= _FEW_BATCHES:
            self._write_few(topic, broker, run, totals, entry)
        else:
            self._write_many(topic, broker, run, totals, entry)
        # The commit point: the run has its place once the count covers it.
        U64.pack_into(
            self._buf, self._g.topic_offset(topic.index) + TOPIC_ORDERED_OFFSET, entry + n
        )
        if n <= _FEW_BATCHES:
            for header in run.offsets:
                U32.pack_into(self._buf, header + BH_ORDERED, 1)
        else:
            _store(self._u32, (np.array(run.offsets) + BH_ORDERED) // 4, _ONE)
        if run.sessions:
            assert self._sessions is not None
            self._sessions.mark_ordered(run.sessions)
        topic.entries = entry + n
        self._batches += n
        self._messages += totals[-1] - topic.next_total
        topic.next_total = totals[-1]
        ordered._add(topic.name, broker, entry, run.offsets, run.num_msgs, totals)

    def _write_few(
        self, topic: _TopicOrder, broker: int, run: _Run, totals: list[int], entry: int
    ) -> None:
        """The stores before the commit point, batch by batch (a short run:
        cheaper than setting up arrays)."""
        buf = self._buf
        for k, header in enumerate(run.offsets):
            U64.pack_into(buf, header + BH_TOTAL_ORDER, totals[k])
        for k, header in enumerate(run.offsets):
            INDEX_ENTRY.pack_into(
                buf,
                index_entry_offset(self._g, topic.chain, entry + k),
                broker,
                run.num_msgs[k],
                totals[k],
                header,
                run.generations[k],
            )

    def _write_many(
        self, topic: _TopicOrder, broker: int, run: _Run, totals: list[int], entry: int
    ) -> None:
        """The stores before the commit point, each for the whole run at once."""
        headers = np.array(run.offsets, dtype=np.int64)
        num_msgs = np.array(run.num_msgs, dtype=np.int64)
        firsts = np.array(totals[:-1], dtype=np.uint64)
        _store(self._words, (headers + BH_TOTAL_ORDER) // 8, firsts)
        entries = np.empty(len(headers), dtype=_ENTRIES)
        entries["broker"] = broker
        entries["num_msg"] = num_msgs
        entries["total"] = firsts
        entries["header"] = headers
        entries["generation"] = run.generations
        per = index_per_segment(self._g)
        chain = topic.chain
        done = 0
        while done < len(entries):
            slot = (entry + done) % per
            unit = chain.units[(entry + done) // per - chain.first]
            view = np.frombuffer(
                self._buf,
                dtype=_ENTRIES,
                count=per,
                offset=self._g.segment_offset(unit) + SEGMENT_HEADER_SIZE,
            )
            count = min(len(entries) - done, per - slot)
            _store(view, np.arange(slot, slot + count), entries[done : done + count])
            done += count

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
                if cursor.passed:
                    self._settle_passed(cursor)
                waiting = 0
                if cursor.position:
                    (batches,) = U64.unpack_from(self._buf, topic.streams[broker] + _BATCHES)
                    waiting = max(0, batches - cursor.done)
                if waiting:
                    if cursor.waiting_since is None:
                        cursor.waiting_since = now_ns
                    oldest = max(oldest, now_ns - cursor.waiting_since)
                else:
                    cursor.waiting_since = None
                lag += waiting
        self._lag = lag
        self._lag_oldest_ns = oldest

    def _settle_passed(self, cursor: _StreamCursor) -> None:
        """Count the batches gone past while reserved that committed since
        (never ordered: nothing is waited for), and forget those settled (or
        gone with their segment)."""
        waiting = []
        for offset, generation in cursor.passed:
            if generation_holding(self._buf, self._g, offset) != generation:
                continue
            (state,) = U32.unpack_from(self._buf, offset + BH_BATCH_COMPLETE)
            if state == BATCH_COMMITTED:
                cursor.done += 1
            elif state == BATCH_RESERVED:
                waiting.append((offset, generation))
        cursor.passed = waiting
