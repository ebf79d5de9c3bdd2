"""The emulated CXL region: a shared-memory file holding every topic's log.

Layout (version 1, all integers little-endian)::

    offset 0          superblock (4096 B)
                        0  magic  b"TEMBCXL1"       8  layout version (u32)
                       12  max_topics (u32)        16  max_brokers (u32)
                       20  num_segments (u32)      24  region size (u64)
                       32  segment size (u64)      40  data offset (u64)
                       48  next free segment (u32), the bump allocator
    offset 4096       topic table: max_topics entries of 64 + 64 * max_brokers B
                        topic header: name[32] (NUL padded), state u32 @32
                        (0 free, 1 live), then one 64-B stream entry per broker:
                          0 first segment (u32)   4 last segment (u32)
                          8 segment count (u32)  16 committed messages (u64)
                         24 committed batches    32 committed payload bytes
    data offset       num_segments segments of segment size bytes each
                        segment header (64 B): magic u32 "SGM1", topic u32,
                        broker u32, chain index u32, next segment u32 @16
                        then batches back to back from +64:
                        [128-B batch header][payload of total_size bytes]

A *stream* is one (topic, broker) pair: its own chain of segments, its own
logical offsets. Segments are handed out on demand from the shared bump
allocator, so one topic can fill almost the whole region, and the batch
headers live inline in front of their payloads: the per-stream batch-header
log grows with the message log, so it can never fill before the log does.
The transient "ring full" of the C++ original survives as the in-flight
window: a stream holds at most ``max_inflight_batches`` reserved but not yet
committed batches, and :meth:`CxlLog.get_cxl_buffer` reports it full (the
``ring_full`` counter; allocators back off) beyond that. "Log full" is the
permanent case: no free segment is left.

A batch header's ``batch_complete`` word is the commit point other processes
read: 0 = reserved, payload possibly incomplete (a reader stops there);
1 = committed (``start_logical_offset`` and every record's ``logical_offset``
and ``next_msg_diff`` are final); 2 = abandoned (never visible; readers skip
``total_size`` bytes). A header whose ``total_size`` is 0 is unwritten space:
the end of the segment's data. Batches are committed strictly in log order per
stream, which is what keeps logical offsets gap-free when a batch reserved
earlier is abandoned or finishes later than one reserved after it.

On real CXL every store of a commit would be followed by a cache-line flush
and fence; on a /dev/shm file shared by processes of one x86-64 host, stores
become visible in program order, so writing ``batch_complete`` last is enough.

Shared structures (superblock allocator, topic table) are changed under an
``flock`` of the file, so brokers in other processes can share the region.
Each broker writes only its own streams.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import struct
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import numpy as np
import numpy.typing as npt
import trio

from .errors import LayoutError, LogFullError
from .wire import (
    BATCH_HEADER,
    BATCH_HEADER_SIZE,
    BH_BATCH_COMPLETE,
    BH_START_LOGICAL_OFFSET,
    BatchHeader,
    encode_topic,
    stamp_records,
    unpack_batch_header,
)

logger = logging.getLogger(__name__)

MAGIC = b"TEMBCXL1"
LAYOUT_VERSION = 1
SUPERBLOCK_SIZE = 4096
SEGMENT_MAGIC = 0x314D4753  # "SGM1"
SEGMENT_HEADER_SIZE = 64
TOPIC_HEADER_SIZE = 64
STREAM_ENTRY_SIZE = 64
NO_SEGMENT = 0xFFFFFFFF

BATCH_RESERVED = 0
BATCH_COMMITTED = 1
BATCH_ABANDONED = 2

_SUPERBLOCK = struct.Struct("<8sIIIIQQQI")
_NEXT_FREE_OFFSET = 48
_SEGMENT_HEADER = struct.Struct("<IIIII")
_SEGMENT_NEXT_OFFSET = 16
_STREAM_SEGMENTS = struct.Struct("<III")
_STREAM_COUNTS = struct.Struct("<QQQ")
_STREAM_COUNTS_OFFSET = 16
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


@attrs.frozen
class Geometry:
    """Sizes that fix where everything is in a region."""

    region_size: int
    segment_size: int
    max_topics: int
    max_brokers: int

    @property
    def topic_entry_size(self) -> int:
        return TOPIC_HEADER_SIZE + STREAM_ENTRY_SIZE * self.max_brokers

    @property
    def data_offset(self) -> int:
        end = SUPERBLOCK_SIZE + self.max_topics * self.topic_entry_size
        return -(-end // 4096) * 4096

    @property
    def num_segments(self) -> int:
        return max(0, (self.region_size - self.data_offset) // self.segment_size)

    def topic_offset(self, topic_index: int) -> int:
        return SUPERBLOCK_SIZE + topic_index * self.topic_entry_size

    def stream_offset(self, topic_index: int, broker_id: int) -> int:
        return self.topic_offset(topic_index) + TOPIC_HEADER_SIZE + broker_id * STREAM_ENTRY_SIZE

    def segment_offset(self, segment: int) -> int:
        return self.data_offset + segment * self.segment_size


@attrs.frozen
class CommittedBatch:
    """Where a committed batch is, as readers see it."""

    header_offset: int
    payload_offset: int
    total_size: int
    num_msg: int
    first_offset: int
    client_id: int
    batch_seq: int


@attrs.frozen
class CxlStatistics:
    """A snapshot of the log's counters."""

    topics: int
    segments_used: int
    segments_total: int
    reservations: int
    batches_committed: int
    messages_committed: int
    bytes_committed: int
    batches_abandoned: int
    ring_full: int
    log_full: int


class Reservation:
    """Log space given to one batch by :meth:`CxlLog.get_cxl_buffer`.

    Attributes:
        stream: The stream the batch goes to.
        header: The batch header as received (client fields only trusted).
        header_offset: Byte offset of the batch header in the region.
        payload: The payload's place in the region, a writable uint8 array.
        first_offset: Logical offset of the first message, once committed.
        batch_index: Position among the stream's committed batches, once committed.
    """

    __slots__ = (
        "_on_commit",
        "batch_index",
        "first_offset",
        "header",
        "header_offset",
        "payload",
        "starts",
        "state",
        "stream",
    )

    def __init__(
        self,
        stream: Stream,
        header: BatchHeader,
        header_offset: int,
        payload: npt.NDArray[np.uint8],
    ) -> None:
        self.stream = stream
        self.header = header
        self.header_offset = header_offset
        self.payload = payload
        self.state = BATCH_RESERVED
        self.starts: npt.NDArray[np.int64] | None = None
        self.first_offset = -1
        self.batch_index = -1
        self._on_commit: Callable[[Reservation], None] | None = None

    @property
    def payload_offset(self) -> int:
        return self.header_offset + BATCH_HEADER_SIZE

    @property
    def resolved(self) -> bool:
        """True once committed or abandoned."""
        return self.state != BATCH_RESERVED


class Stream:
    """The in-memory writer state of one (topic, broker) stream."""

    def __init__(self, log: CxlLog, topic: str, topic_index: int, broker_id: int) -> None:
        self.log = log
        self.topic = topic
        self.topic_index = topic_index
        self.broker_id = broker_id
        self.entry_offset = log.geometry.stream_offset(topic_index, broker_id)
        self.last_segment = NO_SEGMENT
        self.num_segments = 0
        self.write_offset = 0  # absolute offset of the next free byte
        self.segment_end = 0
        self.pending: deque[Reservation] = deque()
        self.next_offset = 0
        self.batches = 0
        self.payload_bytes = 0
        # Parallel lists for readers: first logical offset and header offset of
        # every committed batch, in order (bisect by logical offset).
        self.index_first: list[int] = []
        self.index_header: list[int] = []
        self._committed = trio.lowlevel.ParkingLot()

    async def wait_committed(self) -> None:
        """Return after the next batch of this stream commits."""
        await self._committed.park()

    def committed_batch(self, i: int) -> CommittedBatch:
        """The ``i``-th committed batch of this stream."""
        return self.log.batch_at(self.index_header[i])


class CxlLog:
    """A broker's handle on the emulated CXL region.

    Use :meth:`open`; the constructor takes an already mapped region.

    Args:
        fd: The open region file (kept for ``flock``).
        mapping: The shared mapping of the whole file.
        geometry: The region's sizes.
        broker_id: Which broker's streams this handle writes.
        max_inflight_batches: Reservations a stream may hold before
            :meth:`get_cxl_buffer` reports it (transiently) full.
    """

    def __init__(
        self,
        fd: int,
        mapping: mmap.mmap,
        geometry: Geometry,
        broker_id: int,
        max_inflight_batches: int,
    ) -> None:
        self._fd = fd
        self._mmap = mapping
        self.geometry = geometry
        self.broker_id = broker_id
        self.max_inflight_batches = max_inflight_batches
        self.region: npt.NDArray[np.uint8] = np.frombuffer(mapping, dtype=np.uint8)
        self.words: npt.NDArray[np.uint64] = self.region.view("<u8")
        self._streams: dict[str, Stream] = {}
        self._topic_index: dict[str, int] = {}
        self._new_stream = trio.lowlevel.ParkingLot()
        self._commit_listeners: list[Callable[[Reservation], None]] = []
        self._reservations = 0
        self._abandoned = 0
        self._ring_full = 0
        self._log_full = 0
        self._batches = 0
        self._messages = 0
        self._bytes = 0

    # -- opening -------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str,
        *,
        size: int,
        segment_size: int,
        max_topics: int,
        max_brokers: int,
        broker_id: int,
        max_inflight_batches: int = 1024,
        reset: bool = False,
        prefault: bool = True,
    ) -> CxlLog:
        """Map the region file, creating or re-attaching to it.

        A file that exists and has this layout is re-attached: committed
        batches stay, and any batch that was reserved but not committed when
        the previous owner stopped is marked abandoned so it never becomes
        visible. ``reset=True`` starts from an empty region.

        Raises:
            LayoutError: The file exists with another layout or size.
            OSError: The file cannot be created or mapped.
        """
        geometry = Geometry(size, segment_size, max_topics, max_brokers)
        if geometry.num_segments < 1:
            raise LayoutError(
                f"{path}: a region of {size} bytes has no room for one {segment_size}-byte segment "
                f"after its {geometry.data_offset}-byte tables"
            )
        if reset:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                existing = os.fstat(fd).st_size
                fresh = existing == 0
                if fresh:
                    os.ftruncate(fd, size)
                elif existing != size:
                    raise LayoutError(
                        f"{path} is {existing} bytes but the config asks for {size} "
                        "(cxl.size_mb); start with --reset to discard it, or fix the config"
                    )
                flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if prefault else 0)
                mapping = mmap.mmap(fd, size, flags=flags)
                log = cls(fd, mapping, geometry, broker_id, max_inflight_batches)
                if fresh:
                    log._format()
                else:
                    log._check_layout(path)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        except BaseException:
            os.close(fd)
            raise
        log._recover()
        return log

    def close(self) -> None:
        """Unmap the region and close the file.

        Raises:
            BufferError: A view of the region is still referenced elsewhere;
                the file is closed anyway and the mapping goes with the view.
        """
        try:
            # Pending reservations and their streams refer to each other, and
            # each holds a view of the mapping: break the cycle first.
            for stream in self._streams.values():
                stream.pending.clear()
            self._streams.clear()
            del self.words, self.region
            self._mmap.close()
        finally:
            os.close(self._fd)

    def _format(self) -> None:
        g = self.geometry
        _SUPERBLOCK.pack_into(
            self._mmap,
            0,
            MAGIC,
            LAYOUT_VERSION,
            g.max_topics,
            g.max_brokers,
            g.num_segments,
            g.region_size,
            g.segment_size,
            g.data_offset,
            0,
        )
        for t in range(g.max_topics):
            for b in range(g.max_brokers):
                _STREAM_SEGMENTS.pack_into(
                    self._mmap, g.stream_offset(t, b), NO_SEGMENT, NO_SEGMENT, 0
                )

    def _check_layout(self, path: str) -> None:
        magic, version, topics, brokers, segments, region, segment, data, _ = (
            _SUPERBLOCK.unpack_from(self._mmap, 0)
        )
        if magic != MAGIC or version != LAYOUT_VERSION:
            raise LayoutError(
                f"{path} is not a trio-embarcadero CXL region of layout {LAYOUT_VERSION} "
                f"(magic {magic!r}, version {version}); start with --reset to discard it"
            )
        g = self.geometry
        found = {"max_topics": topics, "max_brokers": brokers, "segment size": segment}
        wanted = {
            "max_topics": g.max_topics,
            "max_brokers": g.max_brokers,
            "segment size": g.segment_size,
        }
        diffs = [f"{k} {found[k]} (config: {wanted[k]})" for k in found if found[k] != wanted[k]]
        if diffs or region != g.region_size or data != g.data_offset or segments != g.num_segments:
            raise LayoutError(
                f"{path} was made with another layout: {', '.join(diffs) or 'sizes differ'}; "
                "start with --reset to discard it, or fix the config"
            )

    # -- topics and segments (shared; under flock) ---------------------------------

    def _lock(self) -> _FileLock:
        return _FileLock(self._fd)

    def _read_topic_name(self, index: int) -> str | None:
        off = self.geometry.topic_offset(index)
        (state,) = _U32.unpack_from(self._mmap, off + 32)
        if state != 1:
            return None
        return bytes(self._mmap[off : off + 32]).rstrip(b"\0").decode("ascii")

    def topics(self) -> dict[str, int]:
        """Every live topic in the region and its table index."""
        found: dict[str, int] = {}
        for i in range(self.geometry.max_topics):
            name = self._read_topic_name(i)
            if name is not None:
                found[name] = i
        return found

    def _find_or_create_topic(self, topic: str) -> int:
        index = self._topic_index.get(topic)
        if index is not None:
            return index
        raw = encode_topic(topic)
        with self._lock():
            existing = self.topics()
            if topic in existing:
                index = existing[topic]
            else:
                free = next(
                    (
                        i
                        for i in range(self.geometry.max_topics)
                        if self._read_topic_name(i) is None
                    ),
                    None,
                )
                if free is None:
                    self._log_full += 1
                    raise LogFullError(
                        f"topic table is full ({self.geometry.max_topics} topics); "
                        f"cannot create {topic!r}",
                        transient=False,
                    )
                off = self.geometry.topic_offset(free)
                self._mmap[off : off + 32] = raw
                _U32.pack_into(self._mmap, off + 32, 1)
                index = free
                logger.info("created topic %r (table slot %d)", topic, index)
        self._topic_index[topic] = index
        return index

    def _take_segment(self, stream: Stream) -> int:
        g = self.geometry
        with self._lock():
            (segment,) = _U32.unpack_from(self._mmap, _NEXT_FREE_OFFSET)
            if segment >= g.num_segments:
                return NO_SEGMENT
            _U32.pack_into(self._mmap, _NEXT_FREE_OFFSET, segment + 1)
        base = g.segment_offset(segment)
        _SEGMENT_HEADER.pack_into(
            self._mmap,
            base,
            SEGMENT_MAGIC,
            stream.topic_index,
            stream.broker_id,
            stream.num_segments,
            NO_SEGMENT,
        )
        # Link only after the new segment is initialised, so a reader that
        # follows the link never sees a half-written segment header.
        if stream.last_segment == NO_SEGMENT:
            _U32.pack_into(self._mmap, stream.entry_offset, segment)
        else:
            prev = g.segment_offset(stream.last_segment)
            _U32.pack_into(self._mmap, prev + _SEGMENT_NEXT_OFFSET, segment)
        stream.num_segments += 1
        stream.last_segment = segment
        _STREAM_SEGMENTS.pack_into(
            self._mmap,
            stream.entry_offset,
            _U32.unpack_from(self._mmap, stream.entry_offset)[0],
            segment,
            stream.num_segments,
        )
        stream.write_offset = base + SEGMENT_HEADER_SIZE
        stream.segment_end = base + g.segment_size
        return int(segment)

    # -- the write path ------------------------------------------------------------

    def stream(self, topic: str) -> Stream:
        """This broker's stream of ``topic``, creating the topic if needed.

        Raises:
            LogFullError: The topic table is full.
        """
        stream = self._streams.get(topic)
        if stream is None:
            index = self._find_or_create_topic(topic)
            stream = Stream(self, topic, index, self.broker_id)
            self._streams[topic] = stream
            self._new_stream.unpark_all()
        return stream

    def add_commit_listener(self, listener: Callable[[Reservation], None]) -> None:
        """Call ``listener`` with every reservation this log commits, in order,
        before the reservation's own ``on_commit``."""
        self._commit_listeners.append(listener)

    def streams(self) -> list[Stream]:
        """This broker's open streams."""
        return list(self._streams.values())

    async def wait_new_stream(self) -> None:
        """Return after this broker opens its next stream (a topic's first publish)."""
        await self._new_stream.park()

    def existing_stream(self, topic: str) -> Stream | None:
        """This broker's stream of ``topic`` if the topic exists, else None."""
        if topic in self._streams:
            return self._streams[topic]
        if topic in self._topic_index or topic in self.topics():
            return self.stream(topic)
        return None

    def get_cxl_buffer(
        self,
        topic: str,
        header: BatchHeader,
        on_commit: Callable[[Reservation], None] | None = None,
    ) -> Reservation:
        """Reserve log space for a batch of ``topic`` and write its header.

        The batch is invisible to readers until :meth:`complete` commits it;
        logical offsets are assigned at commit, in reservation order.

        Args:
            topic: The batch's topic (created on first use).
            header: The validated batch header from the publisher.
            on_commit: Called once with the reservation when it commits.

        Returns:
            The reservation, whose ``payload`` array is where the payload goes.

        Raises:
            LogFullError: ``transient=True`` when the stream already holds
                ``max_inflight_batches`` uncommitted reservations;
                ``transient=False`` when no segment is left for the batch.
        """
        stream = self.stream(topic)
        if len(stream.pending) >= self.max_inflight_batches:
            self._ring_full += 1
            raise LogFullError(
                f"{topic!r}: {len(stream.pending)} batches in flight", transient=True
            )
        need = BATCH_HEADER_SIZE + header.total_size
        if stream.write_offset + need > stream.segment_end:
            if SEGMENT_HEADER_SIZE + need > self.geometry.segment_size:
                raise ValueError(f"a batch of {need} bytes cannot fit in a segment")
            if self._take_segment(stream) == NO_SEGMENT:
                self._log_full += 1
                raise LogFullError(
                    f"{topic!r}: the region has no free segment "
                    f"({self.geometry.num_segments} in use)",
                    transient=False,
                )
        offset = stream.write_offset
        stream.write_offset += need
        BATCH_HEADER.pack_into(
            self._mmap,
            offset,
            header.batch_seq,
            header.client_id,
            header.num_msg,
            BATCH_RESERVED,
            self.broker_id,
            0,
            0,
            header.total_size,
            0,
            offset + BATCH_HEADER_SIZE,
            0,
            0,
        )
        payload = self.region[offset + BATCH_HEADER_SIZE : offset + need]
        reservation = Reservation(stream, header, offset, payload)
        reservation._on_commit = on_commit
        stream.pending.append(reservation)
        self._reservations += 1
        return reservation

    def complete(self, reservation: Reservation, starts: npt.NDArray[np.int64]) -> None:
        """Mark a reservation's payload as fully in place and commit what can be.

        The batch commits now if every batch reserved before it on its stream
        is resolved; otherwise it commits when they are.

        Args:
            reservation: A reservation from :meth:`get_cxl_buffer`.
            starts: The record offsets from :func:`~trio_embarcadero.wire.scan_records`.
        """
        reservation.starts = starts
        self._advance(reservation.stream)

    def abandon(self, reservation: Reservation) -> None:
        """Give up a reservation whose payload will never be whole.

        Its space stays in the log, marked abandoned; readers skip it and it
        consumes no logical offsets.
        """
        if reservation.resolved:
            return
        reservation.state = BATCH_ABANDONED
        _U32.pack_into(self._mmap, reservation.header_offset + BH_BATCH_COMPLETE, BATCH_ABANDONED)
        self._abandoned += 1
        self._advance(reservation.stream)

    def _advance(self, stream: Stream) -> None:
        pending = stream.pending
        committed = []
        while pending:
            head = pending[0]
            if head.state == BATCH_ABANDONED:
                pending.popleft()
                continue
            if head.starts is None:
                break
            pending.popleft()
            self._commit(stream, head)
            committed.append(head)
        if committed:
            _STREAM_COUNTS.pack_into(
                self._mmap,
                stream.entry_offset + _STREAM_COUNTS_OFFSET,
                stream.next_offset,
                stream.batches,
                stream.payload_bytes,
            )
            stream._committed.unpark_all()
            for reservation in committed:
                for listener in self._commit_listeners:
                    listener(reservation)
                if reservation._on_commit is not None:
                    reservation._on_commit(reservation)

    def _commit(self, stream: Stream, reservation: Reservation) -> None:
        assert reservation.starts is not None
        first = stream.next_offset
        num = len(reservation.starts)
        stamp_records(self.words, reservation.payload_offset, reservation.starts, first)
        _U64.pack_into(self._mmap, reservation.header_offset + BH_START_LOGICAL_OFFSET, first)
        # The commit point: everything above is in place before this store.
        _U32.pack_into(self._mmap, reservation.header_offset + BH_BATCH_COMPLETE, BATCH_COMMITTED)
        reservation.state = BATCH_COMMITTED
        reservation.first_offset = first
        reservation.batch_index = len(stream.index_header)
        stream.next_offset = first + num
        stream.batches += 1
        stream.payload_bytes += reservation.header.total_size
        stream.index_first.append(first)
        stream.index_header.append(reservation.header_offset)
        self._batches += 1
        self._messages += num
        self._bytes += reservation.header.total_size

    # -- reading and recovery --------------------------------------------------------

    def batch_at(self, header_offset: int) -> CommittedBatch:
        """The committed batch whose header is at ``header_offset``."""
        h = unpack_batch_header(self._mmap[header_offset : header_offset + BATCH_HEADER_SIZE])
        return CommittedBatch(
            header_offset=header_offset,
            payload_offset=header_offset + BATCH_HEADER_SIZE,
            total_size=h.total_size,
            num_msg=h.num_msg,
            first_offset=h.start_logical_offset,
            client_id=h.client_id,
            batch_seq=h.batch_seq,
        )

    def walk(self, topic_index: int, broker_id: int) -> Iterator[tuple[int, BatchHeader]]:
        """Yield ``(header_offset, header)`` of every batch written to a stream,
        in log order and whatever its state, stopping at the first unwritten
        header of the last segment."""
        return walk_stream(self._mmap, self.geometry, topic_index, broker_id)

    def _recover(self) -> None:
        for topic, index in self.topics().items():
            self._topic_index[topic] = index
            (first_segment,) = _U32.unpack_from(
                self._mmap, self.geometry.stream_offset(index, self.broker_id)
            )
            if first_segment == NO_SEGMENT:
                continue
            stream = Stream(self, topic, index, self.broker_id)
            discarded = 0
            end = 0
            for offset, header in self.walk(index, self.broker_id):
                end = offset + BATCH_HEADER_SIZE + header.total_size
                if header.batch_complete == BATCH_RESERVED:
                    _U32.pack_into(self._mmap, offset + BH_BATCH_COMPLETE, BATCH_ABANDONED)
                    discarded += 1
                elif header.batch_complete == BATCH_COMMITTED:
                    stream.index_first.append(header.start_logical_offset)
                    stream.index_header.append(offset)
                    stream.next_offset = header.start_logical_offset + header.num_msg
                    stream.batches += 1
                    stream.payload_bytes += header.total_size
            segments = list(segment_chain(self._mmap, self.geometry, index, self.broker_id))
            stream.num_segments = len(segments)
            stream.last_segment = segments[-1]
            base = self.geometry.segment_offset(stream.last_segment)
            stream.segment_end = base + self.geometry.segment_size
            # Bump allocation makes a stream's last segment its highest, so a
            # walk that ended below it means the last segment is still empty.
            stream.write_offset = end if end > base else base + SEGMENT_HEADER_SIZE
            _STREAM_COUNTS.pack_into(
                self._mmap,
                stream.entry_offset + _STREAM_COUNTS_OFFSET,
                stream.next_offset,
                stream.batches,
                stream.payload_bytes,
            )
            self._streams[topic] = stream
            logger.info(
                "re-attached topic %r: %d messages in %d batches%s",
                topic,
                stream.next_offset,
                stream.batches,
                f", discarded {discarded} uncommitted batch(es)" if discarded else "",
            )

    def statistics(self) -> CxlStatistics:
        """Return a snapshot of this broker's log counters."""
        (next_free,) = _U32.unpack_from(self._mmap, _NEXT_FREE_OFFSET)
        return CxlStatistics(
            topics=len(self._streams),
            segments_used=next_free,
            segments_total=self.geometry.num_segments,
            reservations=self._reservations,
            batches_committed=self._batches,
            messages_committed=self._messages,
            bytes_committed=self._bytes,
            batches_abandoned=self._abandoned,
            ring_full=self._ring_full,
            log_full=self._log_full,
        )


def segment_chain(buf: Any, geometry: Geometry, topic_index: int, broker_id: int) -> Iterator[int]:
    """Yield the segment numbers of a stream, in order."""
    (segment,) = _U32.unpack_from(buf, geometry.stream_offset(topic_index, broker_id))
    seen = 0
    while segment != NO_SEGMENT and seen < geometry.num_segments:
        yield segment
        seen += 1
        (segment,) = _U32.unpack_from(buf, geometry.segment_offset(segment) + _SEGMENT_NEXT_OFFSET)


def walk_stream(
    buf: Any, geometry: Geometry, topic_index: int, broker_id: int
) -> Iterator[tuple[int, BatchHeader]]:
    """Yield ``(header_offset, header)`` for every batch written to a stream.

    Works on any buffer holding the region (a broker's mapping or a read-only
    mapping in another process).
    """
    for segment in segment_chain(buf, geometry, topic_index, broker_id):
        base = geometry.segment_offset(segment)
        end = base + geometry.segment_size
        offset = base + SEGMENT_HEADER_SIZE
        while offset + BATCH_HEADER_SIZE <= end:
            header = unpack_batch_header(buf[offset : offset + BATCH_HEADER_SIZE])
            if header.total_size == 0 or offset + BATCH_HEADER_SIZE + header.total_size > end:
                break
            yield offset, header
            offset += BATCH_HEADER_SIZE + header.total_size


def read_geometry(buf: Any) -> Geometry:
    """Read a region's geometry from its superblock.

    Raises:
        LayoutError: The buffer does not start with a layout-1 superblock.
    """
    magic, version, topics, brokers, _segments, region, segment, _data, _ = _SUPERBLOCK.unpack_from(
        buf, 0
    )
    if magic != MAGIC or version != LAYOUT_VERSION:
        raise LayoutError(f"not a trio-embarcadero CXL region (magic {magic!r}, version {version})")
    return Geometry(region, segment, topics, brokers)


class _FileLock:
    """``flock`` of the region file around changes to shared tables.

    The lock is held for a few microseconds (a table scan or a counter bump),
    so taking it synchronously on the event loop is cheaper than a thread hop.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def __enter__(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
