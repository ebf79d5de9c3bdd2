"""Read a CXL region's committed messages directly, from any process on the host.

A broker's log is a shared-memory file (see :mod:`trio_embarcadero.log.layout`).
Another process can map it read-only and read every committed message without
going through TCP::

    with open_log("/dev/shm/trio-embarcadero-0") as log:
        for topic in log.topics():
            print(topic.name, topic.messages)
        for message in log.messages("orders"):
            handle(message.payload, message.offset)  # bytes, yours to keep

:meth:`LogReader.messages` copies each payload out of the mapping;
:meth:`LogReader.message_views` hands out views of it instead (zero copy,
valid until the reader is closed).

A reader only trusts a batch once its header's ``batch_complete`` word says
committed. It reads that word before anything else of the batch: the broker
writes the word last, and on one x86-64 host stores become visible in program
order, so every byte of a batch seen as committed is final. Abandoned batches
are skipped; the first reserved (in-flight) batch ends the iteration, because
batches commit strictly in log order per stream. Consecutive committed
batches hold consecutive logical offsets; a gap between them means the log was
written by two processes at once, and is reported (``LayoutError``) rather
than skipped. Nothing here writes to the file or takes its lock, so readers
never slow the broker down.

The reader keeps, per stream, an index of the committed batches it has seen
and where to resume walking, so calling :meth:`LogReader.messages` again
later (with ``start`` set to the next offset wanted) continues cheaply.

A reader covers the region only. With ``storage.dir`` the broker drops the
oldest durable segments from a full region (the region is a cache of the
disk log); those messages are skipped here like the ones retention
reclaimed (the offsets yielded jump to the region's first retained one).
Subscribers over TCP get them from the disk log instead.
"""

from __future__ import annotations

import bisect
import logging
import mmap
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import attrs
import numpy as np
import numpy.typing as npt

from ..errors import LayoutError, ProtocolError
from ..wire import (
    BATCH_HEADER_SIZE,
    MESSAGE_HEADER,
    MESSAGE_HEADER_SIZE,
    MH_CLIENT_ID,
    MH_CLIENT_ORDER,
    MH_LOGICAL_OFFSET,
    MH_SIZE,
    Message,
    MessageView,
    scan_records,
)
from .layout import (
    BATCH_ABANDONED,
    BATCH_COMMITTED,
    BATCH_RESERVED,
    BH_TOTAL_SIZE,
    NO_SEGMENT,
    SUPERBLOCK_SIZE,
    U64,
    Geometry,
    SegmentReclaimed,
    WalkPosition,
    check_segment,
    iter_batches,
    read_geometry,
    read_stream_entry,
    read_topic_order,
    read_topics,
    unit_map,
)
from .lease import LeaseRecord, read_lease
from .members import BrokerMember, read_members
from .ordered import OrderedIndex
from .ownership import lock_holders

logger = logging.getLogger(__name__)


@attrs.frozen
class StreamInfo:
    """The committed totals of one (topic, broker) stream, from the topic table.

    Attributes:
        broker_id: The broker that writes the stream.
        messages: Committed messages; also the next logical offset.
        batches: Committed batches.
        payload_bytes: Payload bytes (whole message records) the region holds.
        segments: Log segments the stream holds.
        start_offset: The first logical offset retained (Kafka's log-start
            offset): retention let the messages before it go.
    """

    broker_id: int
    messages: int
    batches: int
    payload_bytes: int
    segments: int
    start_offset: int = 0


@attrs.frozen
class TopicInfo:
    """A topic and its streams (one per broker that has written to it).

    Attributes:
        name: The topic name.
        streams: Its streams, by broker id.
        order: Its order level (0 or 5), fixed when it was created.
    """

    name: str
    streams: tuple[StreamInfo, ...]
    order: int = 0

    @property
    def messages(self) -> int:
        """Committed messages over every broker's stream."""
        return sum(s.messages for s in self.streams)

    @property
    def payload_bytes(self) -> int:
        """Committed payload bytes over every broker's stream."""
        return sum(s.payload_bytes for s in self.streams)


@attrs.frozen
class BatchInfo:
    """One batch of a stream as the log holds it (for inspection).

    Attributes:
        header_offset: Byte offset of its header in the region.
        state: ``"committed"``, ``"abandoned"`` or ``"reserved"``.
        batch_seq: The publisher's batch counter.
        client_id: The publisher.
        num_msg: Messages in the batch.
        total_size: Payload bytes.
        first_offset: Logical offset of its first message (committed only).
    """

    header_offset: int
    state: str
    batch_seq: int
    client_id: int
    num_msg: int
    total_size: int
    first_offset: int


_STATE_NAMES = {
    BATCH_RESERVED: "reserved",
    BATCH_COMMITTED: "committed",
    BATCH_ABANDONED: "abandoned",
}


@attrs.define
class _Cursor:
    """What a reader learned about one stream: its committed batches so far
    and where to look for the next one."""

    firsts: list[int] = attrs.Factory(list)  # first logical offset per batch
    headers: list[int] = attrs.Factory(list)  # header offset per batch
    nums: list[int] = attrs.Factory(list)  # messages per batch
    # (segment, generation) per batch: its bytes are good while they match
    segments: list[tuple[int, int]] = attrs.Factory(list)
    position: WalkPosition = attrs.Factory(WalkPosition)  # where the next batch is


class LogReader:
    """A read-only view of a CXL region file.

    Use :func:`open_log`. :meth:`messages` copies each payload out of the
    mapping; :meth:`message_views` hands out zero-copy views of it, valid
    until the reader is closed.

    Attributes:
        path: The region file.
        geometry: The region's sizes, from its superblock.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            if size < SUPERBLOCK_SIZE:
                raise LayoutError(f"{self.path} is {size} bytes: not a CXL region")
            self._mmap = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        try:
            try:
                self.geometry: Geometry = read_geometry(self._mmap)
            except LayoutError as exc:
                raise LayoutError(f"{self.path} is {exc}") from None
            if self.geometry.region_size != size:
                raise LayoutError(
                    f"{self.path} is {size} bytes but its superblock says "
                    f"{self.geometry.region_size}"
                )
        except BaseException:
            self._mmap.close()
            raise
        self._region: npt.NDArray[np.uint8] = np.frombuffer(self._mmap, dtype=np.uint8)
        self._words: npt.NDArray[np.uint64] = self._region.view("<u8")
        self._view = memoryview(self._mmap)
        self._cursors: dict[tuple[str, int], _Cursor] = {}
        self._closed = False

    # -- lifetime ---------------------------------------------------------------

    def close(self) -> None:
        """Unmap the file. Payload views handed out earlier become invalid."""
        if self._closed:
            return
        self._closed = True
        self._view.release()
        del self._words, self._region
        try:
            self._mmap.close()
        except BufferError:
            # A caller still holds a payload view; the mapping goes with it.
            logger.debug("%s: payload views still referenced; the GC unmaps the file", self.path)

    def __enter__(self) -> LogReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def units_used(self) -> int:
        """Allocation units in segments, over every stream."""
        return int(np.count_nonzero(unit_map(self._mmap, self.geometry)))

    # -- the topic table ----------------------------------------------------------

    def _topic_indexes(self) -> dict[str, int]:
        return read_topics(self._mmap, self.geometry)

    def topics(self) -> list[TopicInfo]:
        """Every topic in the region, with each broker stream's committed totals."""
        return read_topic_infos(self._mmap, self.geometry)

    def topic(self, name: str) -> TopicInfo:
        """One topic's totals.

        Raises:
            KeyError: No such topic.
        """
        for info in self.topics():
            if info.name == name:
                return info
        raise KeyError(name)

    # -- the brokers ------------------------------------------------------------------

    def brokers(self) -> list[BrokerMember]:
        """The brokers that serve the region, or were left listed by one that died.

        Each broker's entry of the region's broker table, judged with its
        broker id's lock where the lock file (``<path>.lock``) can be read,
        and by its heartbeat alone where it cannot (see
        :mod:`~trio_embarcadero.log.members`). ``alive`` tells the brokers
        that serve clients now; ``address`` where they listen.
        """
        return region_brokers(self._mmap, self.path, self.geometry.max_brokers)

    def sequencer_lease(self) -> LeaseRecord:
        """The region's sequencer lease: which broker orders its order-5
        topics, at which epoch, until when (see :mod:`~trio_embarcadero.log.lease`)."""
        return read_lease(self._mmap)

    # -- the total order of an order-5 topic --------------------------------------------

    def ordered_end(self, topic: str) -> int:
        """The total order the next ordered message of ``topic`` gets (0 for a
        topic that does not exist or has order 0)."""
        index = self._topic_indexes().get(topic)
        if index is None:
            return 0
        ordered = OrderedIndex(self._mmap, self.geometry, index)
        count = ordered.count()
        if not count:
            return 0
        last = ordered.entry(count - 1)
        return 0 if last is None else last.total_order + last.num_msg

    def ordered_messages(self, topic: str, start: int = 0) -> Iterator[Message]:
        """Yield the ordered messages of the order-5 ``topic``, every broker's,
        in total order from total order ``start`` on; each message's
        ``offset`` is its total order.

        Stops at the end of what is ordered so far (call again from the next
        total order to go on). Messages whose segment retention let go are
        skipped: total orders then jump forward. A topic that does not
        exist, or of order 0, yields nothing.

        Raises:
            ValueError: ``start`` is negative.
        """
        if start < 0:
            raise ValueError(f"start must be >= 0, not {start}")
        index = self._topic_indexes().get(topic)
        if index is None:
            return
        ordered = OrderedIndex(self._mmap, self.geometry, index)
        count = ordered.count()
        for k in range(ordered.find(start, count), count):
            entry = ordered.entry(k)
            records = None if entry is None else ordered.records(entry)
            if entry is None or records is None:
                continue  # reclaimed by retention
            skip = max(0, start - entry.total_order)
            starts = scan_records(records, entry.num_msg)
            data = records.tobytes()
            for i in range(skip, entry.num_msg):
                at = int(starts[i])
                _, _, _, _, _, order, client, size = MESSAGE_HEADER.unpack_from(data, at)
                body = data[at + MESSAGE_HEADER_SIZE : at + MESSAGE_HEADER_SIZE + size]
                yield Message(body, entry.total_order + i, client, order)

    # -- walking a stream -------------------------------------------------------------

    def _cursor(self, topic: str, broker_id: int) -> tuple[_Cursor, int] | None:
        if not 0 <= broker_id < self.geometry.max_brokers:
            raise ValueError(f"broker_id {broker_id} is not in 0..{self.geometry.max_brokers - 1}")
        index = self._topic_indexes().get(topic)
        if index is None:
            return None
        key = (topic, broker_id)
        cursor = self._cursors.get(key)
        if cursor is None:
            cursor = self._cursors[key] = _Cursor()
        return cursor, index

    def _refresh(
        self, cursor: _Cursor, topic_index: int, broker_id: int, *, check_offsets: bool = True
    ) -> list[BatchInfo]:
        """Walk from the cursor to the first reserved batch or the end of the
        written log; index the committed batches found. Returns every batch
        passed (committed and abandoned) and, last, a reserved one if any.

        Raises:
            LayoutError: With ``check_offsets``, a committed batch does not
                start where the one before it ended.
        """
        seen: list[BatchInfo] = []
        # Retention moves a stream's start: batches below it are gone even if
        # a reclaim was cut short and their segment is still linked.
        start = read_stream_entry(self._mmap, self.geometry, topic_index, broker_id).start_offset
        for offset, h in iter_batches(
            self._mmap, self.geometry, topic_index, broker_id, cursor.position
        ):
            state = h.batch_complete
            info = BatchInfo(
                offset,
                _STATE_NAMES.get(state, f"state {state}"),
                h.batch_seq,
                h.client_id,
                h.num_msg,
                h.total_size,
                h.start_logical_offset if state == BATCH_COMMITTED else -1,
            )
            seen.append(info)
            if state == BATCH_RESERVED:
                break  # batches commit in log order: nothing after it is visible yet
            if state == BATCH_COMMITTED:
                if not cursor.firsts and h.start_logical_offset < start:
                    continue
                expected = self._end_of(cursor) if cursor.firsts else h.start_logical_offset
                if check_offsets and h.start_logical_offset != expected:
                    # Skipping would silently lose messages a subscriber was owed.
                    raise LayoutError(
                        f"{self.path}: broker {broker_id}'s committed batch at byte {offset} "
                        f"starts at logical offset {h.start_logical_offset} where "
                        f"{expected} is due: the stream has a gap or overlap (it was written "
                        "by two processes at once, or changed after it was read)"
                    )
                cursor.firsts.append(h.start_logical_offset)
                cursor.headers.append(offset)
                cursor.nums.append(h.num_msg)
                cursor.segments.append((cursor.position.segment, cursor.position.generation))
            elif state != BATCH_ABANDONED:
                raise LayoutError(f"{self.path}: batch at byte {offset} has state {state}")
        return seen

    def batches(self, topic: str, broker_id: int = 0) -> list[BatchInfo]:
        """Every batch of a stream up to and including the first reserved one
        (for inspection; walks the whole stream).

        Raises:
            ValueError: ``broker_id`` is out of the region's range.
        """
        found = self._cursor(topic, broker_id)
        if found is None:
            return []
        _, index = found
        # Inspection shows a damaged stream as it is rather than refusing it.
        return self._refresh(_Cursor(), index, broker_id, check_offsets=False)

    def messages(self, topic: str, broker_id: int = 0, start: int = 0) -> Iterator[Message]:
        """Yield the committed messages of ``(topic, broker_id)`` from logical
        offset ``start`` on, in order.

        Stops at the first batch that is not committed yet (or at the end of
        the log); call again later with ``start`` set to the next offset to
        continue. A topic that does not exist yields nothing.

        Messages that retention reclaimed, or that a region with a disk
        tier dropped (the disk log still holds those; this reads the region
        only), are skipped: the first message
        yielded is then past ``start`` (at the stream's first retained
        offset), and a reader whose place was reclaimed while it read goes on
        from there. It never yields bytes of a segment reused meanwhile.

        Each :class:`~trio_embarcadero.wire.Message` payload is a copy
        (``bytes``), valid after the reader is closed.

        Raises:
            LayoutError: A committed batch's records are inconsistent, or a
                committed batch does not start at the offset after the
                previous one (offsets would be missing).
            ValueError: ``broker_id`` is out of the region's range.
        """
        return self._walk(topic, broker_id, start, copy=True)

    def message_views(
        self, topic: str, broker_id: int = 0, start: int = 0
    ) -> Iterator[MessageView]:
        """As :meth:`messages`, without copying the payloads.

        Each :class:`~trio_embarcadero.wire.MessageView` payload is a
        read-only view of the mapped log, valid until the reader is closed
        and only while retention has not reclaimed its segment: retention
        can reuse the bytes under a view at any time (copy what you keep, or
        use :meth:`messages`).
        """
        return self._walk(topic, broker_id, start, copy=False)

    def _walk(self, topic: str, broker_id: int, start: int, *, copy: bool) -> Iterator[Any]:
        """The body of :meth:`messages` and :meth:`message_views`."""
        if start < 0:
            raise ValueError(f"start must be >= 0, not {start}")
        found = self._cursor(topic, broker_id)
        if found is None:
            return
        cursor, index = found
        next_offset = start
        position = 0  # index in cursor.firsts of the batch holding next_offset
        while True:
            try:
                if not cursor.firsts or next_offset >= self._end_of(cursor):
                    self._refresh(cursor, index, broker_id)
                    if not cursor.firsts or next_offset >= self._end_of(cursor):
                        return
                position = max(position, bisect.bisect_right(cursor.firsts, next_offset) - 1)
                while position < len(cursor.firsts):
                    first, num = cursor.firsts[position], cursor.nums[position]
                    yield from self._batch_messages(cursor, position, max(next_offset, first), copy)
                    next_offset = max(next_offset, first + num)
                    position += 1
            except SegmentReclaimed:
                # Retention let our place go: walk again from the stream's start.
                cursor = self._cursors[(topic, broker_id)] = _Cursor()
                position = 0

    @staticmethod
    def _end_of(cursor: _Cursor) -> int:
        """The logical offset after the last committed batch indexed."""
        return cursor.firsts[-1] + cursor.nums[-1]

    def _batch_messages(
        self, cursor: _Cursor, position: int, start: int, copy: bool
    ) -> Iterator[Any]:
        header, first, num = (
            cursor.headers[position],
            cursor.firsts[position],
            cursor.nums[position],
        )
        segment, generation = cursor.segments[position]
        (total,) = U64.unpack_from(self._mmap, header + BH_TOTAL_SIZE)
        if start >= first + num:
            return
        payload = header + BATCH_HEADER_SIZE
        try:
            starts = scan_records(self._region[payload : payload + total], num)
        except ProtocolError as exc:
            self._check_generation(segment, generation)  # reused, not corrupt?
            raise LayoutError(f"{self.path}: committed batch at byte {header}: {exc}") from exc
        index = (payload + starts) // 8
        words = self._words
        offsets = words[index + MH_LOGICAL_OFFSET]
        expected = np.arange(first, first + num, dtype=np.uint64)
        if not np.array_equal(offsets, expected):
            self._check_generation(segment, generation)
            raise LayoutError(
                f"{self.path}: committed batch at byte {header} has logical offsets "
                f"{int(offsets[0])}.. where {first}.. are due"
            )
        skip = max(0, start - first)
        data_starts = (payload + starts[skip:] + MESSAGE_HEADER_SIZE).tolist()
        sizes = words[index[skip:] + MH_SIZE].tolist()
        orders = words[index[skip:] + MH_CLIENT_ORDER].tolist()
        clients = words[index[skip:] + MH_CLIENT_ID].tolist()
        # Slicing the mmap copies into bytes; slicing its memoryview does not.
        source: mmap.mmap | memoryview = self._mmap if copy else self._view
        make: Any = Message if copy else MessageView
        messages = [
            make(source[data : data + size], first + skip + i, client, order)
            for i, (data, size, order, client) in enumerate(
                zip(data_starts, sizes, orders, clients, strict=True)
            )
        ]
        # Read after the bytes: if the segment is still the one the walk
        # entered, nobody reused it while they were copied.
        self._check_generation(segment, generation)
        yield from messages

    def _check_generation(self, segment: int, generation: int) -> None:
        check_segment(
            self._mmap, self.geometry, WalkPosition(segment=segment, generation=generation)
        )


def describe_region(path: str, geometry: Geometry, units_used: int) -> dict[str, Any]:
    """A region's sizes as the topic listings show them (JSON values: the
    ``region`` of ``GET /v1/topics``, the first line of ``inspect``)."""
    return {
        "path": path,
        "size_bytes": geometry.region_size,
        "unit_bytes": geometry.unit_size,
        "largest_segment_bytes": geometry.segment_size,
        "units": geometry.num_units,
        "units_used": units_used,
        "units_free": geometry.num_units - units_used,
        "max_topics": geometry.max_topics,
        "max_brokers": geometry.max_brokers,
    }


def region_brokers(buf: Any, path: str, max_brokers: int) -> list[BrokerMember]:
    """The brokers of the region ``buf`` maps (the file ``path``): see
    :meth:`LogReader.brokers`."""
    try:
        holders: dict[int, int | None] | None = lock_holders(path)
    except OSError:
        holders = None  # another user's lock file: the heartbeats decide
    return read_members(buf, max_brokers, holders)


def describe_brokers(members: list[BrokerMember]) -> list[dict[str, Any]]:
    """A region's brokers (:meth:`LogReader.brokers`) as the listings show
    them (JSON values: the ``brokers`` of ``GET /v1/topics``, ``inspect``)."""
    return [
        {**attrs.asdict(m), "status": m.status.value, "address": m.address, "alive": m.alive}
        for m in members
    ]


def describe_streams(
    topic: TopicInfo, disk_files: Mapping[tuple[str, int], list[tuple[int, int]]] | None
) -> list[dict[str, Any]]:
    """``topic``'s streams as the topic listings show them (JSON values: the
    ``streams`` of a topic of ``GET /v1/topics``, the rows of ``topics``).

    Args:
        topic: The topic, from the topic table.
        disk_files: With a disk log, its files (``stream_files``): a stream
            then begins where its disk log does, and the region holds a part
            of it. None without a disk log.
    """
    rows = []
    for s in topic.streams:
        files = disk_files.get((topic.name, s.broker_id), []) if disk_files is not None else []
        rows.append(
            {
                "broker": s.broker_id,
                "messages": s.messages,
                "batches": s.batches,
                "bytes": s.payload_bytes,
                # Below the disk log's start nothing is served any longer.
                "first_offset": files[0][0] if files else s.start_offset,
                "next_offset": s.messages,
                "region_first_offset": s.start_offset,
                "disk_files": len(files) if disk_files is not None else None,
                "disk_bytes": sum(n for _, n in files) if disk_files is not None else None,
            }
        )
    return rows


def read_topic_infos(buf: Any, geometry: Geometry) -> list[TopicInfo]:
    """Every topic in the region ``buf`` holds, with each broker stream's
    committed totals (a stream not written yet is left out)."""
    out = []
    for name, index in read_topics(buf, geometry).items():
        streams = []
        for broker_id in range(geometry.max_brokers):
            entry = read_stream_entry(buf, geometry, index, broker_id)
            if entry.first_segment != NO_SEGMENT:
                streams.append(
                    StreamInfo(
                        broker_id,
                        entry.messages,
                        entry.batches,
                        entry.payload_bytes,
                        entry.segments,
                        entry.start_offset,
                    )
                )
        out.append(TopicInfo(name, tuple(streams), read_topic_order(buf, geometry, index)))
    return out


@contextmanager
def open_log(path: str | os.PathLike[str]) -> Iterator[LogReader]:
    """Map a CXL region file read-only for the duration of a ``with`` block.

    The reader covers the region only, not a broker's disk log: messages
    below a stream's first retained offset are skipped (see
    :meth:`LogReader.messages`).

    Args:
        path: The region file (a broker's ``cxl.path``).

    Yields:
        A :class:`LogReader`.

    Raises:
        LayoutError: The file is not a trio-embarcadero region.
        OSError: The file cannot be opened or mapped.
    """
    reader = LogReader(path)
    try:
        yield reader
    finally:
        reader.close()


__all__ = ["BatchInfo", "BrokerMember", "LogReader", "StreamInfo", "TopicInfo", "open_log"]
