"""A broker's read-write handle on the CXL region: reserve, commit, recover.

The file layout is described in :mod:`trio_embarcadero.log.layout`. Segments
are handed out on demand from the shared segment map (:mod:`.segments`),
each stream's twice the size of its last, so one topic can fill almost the
whole region, and retention gives them back; the batch headers live inline in front of
their payloads: the per-stream batch-header log grows with the message log,
so it can never fill before the log does. The transient "ring full" of the
C++ original survives as the in-flight window: a stream holds at most
``max_inflight_batches`` reserved but not yet committed batches, and
:meth:`CxlLog.get_cxl_buffer` reports it full (the ``ring_full`` counter;
allocators back off) beyond that. "Log full" is the permanent case: no free
segment is left.

Batches are committed strictly in log order per stream, which is what keeps
logical offsets gap-free when a batch reserved earlier is abandoned or
finishes later than one reserved after it. :meth:`CxlLog.complete` and
:meth:`CxlLog.abandon` return the batches they committed; this module calls
nobody back, and knows nothing of Trio or sockets: the broker fans committed
batches out to acks, subscribers and the disk.

Shared structures (the segment map, the topic table) are changed under an
``flock`` of the file, so brokers in other processes can share the region.
Each broker writes only its own streams, and holds a lock on its broker id
for its whole life (:mod:`.ownership`), so no other process writes them. A
commit still checks that its batch's state word is the "reserved" it wrote:
if another process changed it, this handle stops writing (see
:meth:`CxlLog.complete`).

The commit protocol relies on x86-64 store ordering (see
:mod:`.layout`); :func:`check_memory_ordering` refuses other machines unless
told otherwise.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import mmap
import os
import platform
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence

import attrs
import numpy as np
import numpy.typing as npt

from ..errors import LayoutError, LogFullError, StartupError
from ..wire import (
    BATCH_HEADER,
    BATCH_HEADER_SIZE,
    BH_BATCH_COMPLETE,
    BH_START_LOGICAL_OFFSET,
    BatchHeader,
    encode_topic,
    stamp_records,
    unpack_batch_header,
)
from .layout import (
    BATCH_ABANDONED,
    BATCH_COMMITTED,
    BATCH_RESERVED,
    BH_ORDERED,
    BH_TOTAL_SIZE,
    LAYOUT_VERSION,
    NEVER_ORDERED,
    NEXT_GENERATION_OFFSET,
    NO_SEGMENT,
    SEGMENT_HEADER,
    SEGMENT_HEADER_SIZE,
    SEGMENT_MAGIC,
    SEGMENT_NEXT_OFFSET,
    SEGMENT_TIME_OFFSET,
    STREAM_ATTACHED_OFFSET,
    STREAM_COUNTS,
    STREAM_COUNTS_OFFSET,
    STREAM_SEGMENTS,
    STREAM_START,
    STREAM_START_OFFSET,
    TOPIC_FREE,
    TOPIC_LIVE,
    U32,
    U64,
    Geometry,
    WalkPosition,
    check_layout,
    find_topic,
    format_region,
    iter_batches,
    read_segment_header,
    read_stream_entry,
    read_topic_order,
    read_topic_state,
    read_topics,
    segment_chain,
    topic_states,
    unit_map,
    upgrade_layout,
    write_topic,
)
from .lease import SequencerLease
from .members import BrokerMember
from .ownership import (
    BrokerLock,
    check_replaceable,
    claim_region,
    open_private_file,
    region_lock_path,
)
from .segments import SegmentMap, order_for
from .sequencer import Sequencer
from .sessions import Claim, SessionTable
from .stamps import is_stamped
from .topics import attached_publishers, finish_deletions

logger = logging.getLogger(__name__)

#: How long a publish session is kept without activity, unless the broker
#: says otherwise (``cxl.session_timeout_s``).
DEFAULT_SESSION_TIMEOUT_NS = 300 * 10**9

#: ``platform.machine()`` of the machines whose stores become visible to other
#: cores in program order (x86-64's total store order), lower case.
STRONGLY_ORDERED_MACHINES = frozenset({"x86_64", "amd64"})


def check_memory_ordering(allow_weak: bool = False) -> None:
    """Refuse to write a region on a machine without x86-64 store ordering.

    A commit writes a batch's payload and logical offsets, then its
    ``batch_complete`` word, with plain stores and no fences: on x86-64 other
    processes see those stores in that order. On a weakly ordered machine
    (ARM, POWER, RISC-V) a reader in another process could see the batch as
    committed before its bytes, and read stale data.

    Args:
        allow_weak: Run anyway (``cxl.allow_weak_memory_ordering``).

    Raises:
        StartupError: The machine is not x86-64 and ``allow_weak`` is false.
    """
    machine = platform.machine()
    if allow_weak or machine.lower() in STRONGLY_ORDERED_MACHINES:
        return
    raise StartupError(
        f"this machine is {machine or 'of unknown architecture'}, not x86-64: the CXL log's "
        "commit protocol relies on x86-64 store ordering (a batch's bytes become visible to "
        "other processes before its commit word), so a process reading the CXL file could "
        "see a committed batch with stale bytes; set cxl.allow_weak_memory_ordering = true "
        "to run anyway if no other process reads the CXL file while the broker writes it"
    )


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
    """A snapshot of the log's counters.

    ``segments_*`` count allocation units of the region (every broker's).
    """

    topics: int
    segments_used: int
    segments_free: int
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
        owner: Whatever the caller of :meth:`CxlLog.get_cxl_buffer` tied to the
            batch (the broker: where its ack goes); the log never looks at it.
        session: The claim of a publish session's batch (see :mod:`.sessions`),
            or None.
        stamped: The logical offset its records were stamped with before
            they were copied in (see :meth:`CxlLog.complete_copy`), or -1.
    """

    __slots__ = (
        "batch_index",
        "first_offset",
        "header",
        "header_offset",
        "owner",
        "payload",
        "session",
        "stamped",
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
        owner: object = None,
        session: Claim | None = None,
    ) -> None:
        self.stream = stream
        self.header = header
        self.header_offset = header_offset
        self.payload = payload
        self.session = session
        self.state = BATCH_RESERVED
        self.starts: npt.NDArray[np.int64] | None = None
        self.first_offset = -1
        self.batch_index = -1
        self.owner = owner
        self.stamped = -1

    @property
    def payload_offset(self) -> int:
        return self.header_offset + BATCH_HEADER_SIZE

    @property
    def resolved(self) -> bool:
        """True once committed or abandoned."""
        return self.state != BATCH_RESERVED


@attrs.define
class RetainedSegment:
    """A segment of a stream's chain, as retention sees it.

    Attributes:
        unit: Its first allocation unit (its name).
        order: It spans ``2**order`` units.
        start: Absolute offset of its data in the region.
        end: Where it ends.
        batches: Committed batches in it.
        data_bytes: Bytes of those batches, headers included.
        last_commit_ns: When its last batch was committed (0: none yet).
        pins: Readers in this process that are using its bytes (see
            :meth:`Stream.pinned`); retention waits for them.
    """

    unit: int
    order: int
    start: int
    end: int
    batches: int = 0
    data_bytes: int = 0
    last_commit_ns: int = 0
    pins: int = 0


class Stream:
    """The in-memory writer state of one (topic, broker) stream.

    Committed batches are numbered from 0 for the stream's whole life;
    ``first_batch`` is the number of the first one retention kept, and
    ``start_offset`` its first logical offset (Kafka's log-start offset).
    """

    def __init__(
        self, log: CxlLog, topic: str, topic_index: int, broker_id: int, incarnation: int = 0
    ) -> None:
        self.log = log
        self.topic = topic
        self.topic_index = topic_index
        #: The topic's incarnation in its slot (see :mod:`.topics`): once
        #: the slot says otherwise, the topic was deleted.
        self.incarnation = incarnation
        self.broker_id = broker_id
        #: The topic's order level (0 or 5): fixed while the topic lives
        #: (see :func:`~.layout.write_topic`), and a stream is forgotten
        #: with its topic's incarnation; read here once, not every commit.
        self.order = read_topic_order(log.region, log.geometry, topic_index)
        self.entry_offset = log.geometry.stream_offset(topic_index, broker_id)
        self.last_segment = NO_SEGMENT
        self.last_order = -1  # the order of the last segment (-1: none yet)
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
        self.first_batch = 0
        self.start_offset = 0
        self.segments: deque[RetainedSegment] = deque()
        self._commit_segment = 0  # index in segments of the one commits are in

    def committed_batch(self, i: int) -> CommittedBatch:
        """Committed batch number ``i`` (``first_batch <= i < batches``).

        Raises:
            IndexError: Batch ``i`` is not in the region (reclaimed, or not
                committed yet).
        """
        if not self.first_batch <= i < self.batches:
            raise IndexError(
                f"{self.topic!r}: batch {i} is not in the region "
                f"(it holds {self.first_batch}..{self.batches - 1})"
            )
        return self.log.batch_at(self.index_header[i - self.first_batch])

    @contextlib.contextmanager
    def pinned(self, header_offset: int) -> Iterator[RetainedSegment]:
        """Keep retention off the segment holding ``header_offset`` meanwhile
        (an in-process reader, e.g. a subscriber sending from the region)."""
        segment = next(s for s in self.segments if s.start <= header_offset < s.end)
        segment.pins += 1
        try:
            yield segment
        finally:
            segment.pins -= 1

    @property
    def retained_bytes(self) -> int:
        """Bytes of the committed batches the region still holds."""
        return sum(segment.data_bytes for segment in self.segments)

    def _segment_of(self, header_offset: int) -> RetainedSegment:
        # Commits go in log order, so the segment only ever moves forward.
        segments = self.segments
        while (
            not segments[self._commit_segment].start
            <= header_offset
            < (segments[self._commit_segment].end)
        ):
            self._commit_segment += 1
        return segments[self._commit_segment]


#: ``madvise`` advice (Linux 5.14): fault every page in writable, as a store would.
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
#: Filesystems whose files live in memory (``statfs`` would say so; Python has no ``fstatfs``).
_MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs", "hugetlbfs"})


def _map_region(fd: int, size: int, prefault: bool) -> mmap.mmap:
    """Map the region file shared, with every page faulted in if ``prefault``.

    ``MAP_POPULATE`` faults a shared mapping's pages in for reading: each
    page table entry starts clean, and the first store to each 4 KiB page
    then pays for the CPU setting its dirty bit (on the 2-core VM this
    project is measured on, a 2 MiB copy into such a region ran at 3-4.5
    GB/s, into one faulted in for writing at 8.7-12.5 GB/s). So a file in
    memory is faulted in writable (``MADV_POPULATE_WRITE``: nothing is
    written, pages another process fills stay as they are). A file on a
    disk is not: that would dirty every page of it and write it all back.
    """
    if not prefault:
        return mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
    if _in_memory(fd):
        mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        try:
            mapping.madvise(_MADV_POPULATE_WRITE)
            return mapping
        except OSError:  # a kernel before 5.14 (EINVAL): read faults it is
            mapping.close()
    return mmap.mmap(fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)


def _in_memory(fd: int) -> bool:
    """Whether ``fd``'s file is on a filesystem in memory (tmpfs, as ``/dev/shm``)."""
    device = os.fstat(fd).st_dev
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as mounts:
            for line in mounts:
                # "36 35 0:22 / /dev/shm rw,... shared:4 - tmpfs tmpfs rw,..."
                fields = line.split()
                major, _, minor = fields[2].partition(":")
                if os.makedev(int(major), int(minor)) == device:
                    kind = fields[fields.index("-") + 1]
                    return kind in _MEMORY_FILESYSTEMS
    except (OSError, ValueError, IndexError):
        pass
    return False


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
        path: str = "",
    ) -> None:
        self._fd = fd
        self.path = path
        self._owner: BrokerLock | None = None
        # Set when another process changed one of our batches: nothing more is written.
        self._foreign: str | None = None
        self._mmap = mapping
        self.geometry = geometry
        self.broker_id = broker_id
        self.max_inflight_batches = max_inflight_batches
        self.region: npt.NDArray[np.uint8] = np.frombuffer(mapping, dtype=np.uint8)
        self.words: npt.NDArray[np.uint64] = self.region.view("<u8")
        self.map = SegmentMap(unit_map(mapping, geometry), geometry.max_order)
        #: Wall-clock nanoseconds, stamped on segments at commit (time-based
        #: retention); replaceable for tests.
        self.clock: Callable[[], int] = time.time_ns
        #: The order level (0 or 5) a topic this handle creates gets: the
        #: broker sets its config's; fixed in the region from then on.
        self.topic_order: Callable[[str], int] = lambda _topic: 0
        self._streams: dict[str, Stream] = {}
        #: topic -> (table slot, incarnation), as last seen.
        self._topic_index: dict[str, tuple[int, int]] = {}
        self._sessions: SessionTable | None = None
        self._reservations = 0
        self._abandoned = 0
        self._ring_full = 0
        self._log_full = 0
        self._reclaimed = 0
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
        unit_size: int | None = None,
        max_inflight_batches: int = 1024,
        reset: bool = False,
        prefault: bool = True,
        mode: int = 0o600,
        lock: BrokerLock | None = None,
        allow_weak_memory_ordering: bool = False,
    ) -> CxlLog:
        """Map the region file, creating or re-attaching to it.

        A file that exists and has this layout is re-attached: committed
        batches stay, and any batch that was reserved but not committed when
        the previous owner stopped is marked abandoned so it never becomes
        visible. ``reset=True`` starts from an empty region.

        Before anything is reset or recovered, broker ``broker_id`` is locked
        on the region (:func:`~.ownership.claim_region`; with ``reset``, every
        broker id is, until the region is recreated). The handle keeps the
        lock until :meth:`close`.

        Args:
            mode: Permission bits of the file (and its lock file).
            lock: The lock, already taken by the caller with
                :func:`~.ownership.claim_region` (``reset`` must match); the
                handle takes it over. None: take it here.
            allow_weak_memory_ordering: See :func:`check_memory_ordering`.

        Raises:
            AlreadyServedError: Another live process serves this broker id on
                the region (or, with ``reset``, any broker id).
            UnsafeFileError: The file is a symbolic link or another user's.
            StartupError: The machine is not x86-64 (see :func:`check_memory_ordering`).
            LayoutError: The file exists with another layout or size.
            OSError: The file cannot be created or mapped.
        """
        check_memory_ordering(allow_weak_memory_ordering)
        geometry = Geometry(size, segment_size, max_topics, max_brokers, unit_size or segment_size)
        if geometry.num_units < 1:
            raise LayoutError(
                f"{path}: a region of {size} bytes has no room for one "
                f"{geometry.unit_size}-byte segment after its {geometry.map_offset}-byte tables"
            )
        if lock is None:
            owner = claim_region(path, broker_id, mode=mode, reset=reset)
        elif lock.broker_id != broker_id or lock.whole != reset:
            raise ValueError("the lock given is not this broker's (or not whole for a reset)")
        else:
            owner = lock
        try:
            log = cls._map_file(
                path, geometry, broker_id, max_inflight_batches, reset, prefault, mode
            )
            try:
                log._recover()
            except BaseException:
                log.close()
                raise
        except BaseException:
            if lock is None:
                owner.close()
            raise
        log._owner = owner
        owner.keep_own_slot()  # the region is recreated: other brokers may attach
        return log

    @classmethod
    def _map_file(
        cls,
        path: str,
        geometry: Geometry,
        broker_id: int,
        max_inflight_batches: int,
        reset: bool,
        prefault: bool,
        mode: int,
    ) -> CxlLog:
        size = geometry.region_size
        flags = os.O_RDWR | os.O_CREAT
        if reset:
            check_replaceable(path, "CXL file")
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            flags |= os.O_EXCL  # nothing may have slipped into its place
        fd = open_private_file(path, flags, mode, "CXL file")
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
                mapping = _map_region(fd, size, prefault)
                log = cls(fd, mapping, geometry, broker_id, max_inflight_batches, path)
                if fresh:
                    format_region(mapping, geometry)
                else:
                    upgraded = upgrade_layout(mapping, path)
                    if upgraded is not None:
                        logger.info(
                            "%s: upgraded the region from layout %d to %d in place",
                            path,
                            upgraded,
                            LAYOUT_VERSION,
                        )
                    check_layout(mapping, geometry, path)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        except BaseException:
            os.close(fd)
            raise
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
            if self._sessions is not None:
                self._sessions.close()
                self._sessions = None
            del self.words, self.region, self.map
            self._mmap.close()
        finally:
            os.close(self._fd)
            if self._owner is not None:
                self._owner.close()
                self._owner = None

    # -- topics and segments (shared; under flock) ---------------------------------

    def _lock(self) -> _FileLock:
        return _FileLock(self._fd)

    def _try_lock(self) -> _FileLock:
        return _FileLock(self._fd, wait=False)

    def sequencer(self, hole_timeout_ns: int, lease: SequencerLease | None = None) -> Sequencer:
        """A :class:`~.sequencer.Sequencer` of this region, which orders the
        batches of a publish session by batch_seq.

        Args:
            hole_timeout_ns: See :class:`~.sequencer.Sequencer`.
            lease: The sequencer lease this process holds: every step then
                checks it under the region's lock first and writes nothing
                once it is stale (:meth:`~.lease.SequencerLease.fenced`).
                None: no check (a region only this process orders).
        """
        lock = self._lock if lease is None else lease.fenced
        return Sequencer(
            self._mmap,
            self.geometry,
            self.map,
            lock,
            hole_timeout_ns=hole_timeout_ns,
            sessions=self.sessions,
        )

    def sequencer_lease(
        self,
        duration_ns: int,
        *,
        members: Callable[[], Sequence[BrokerMember]],
        clock: Callable[[], int] = time.monotonic_ns,
        pid: int | None = None,
    ) -> SequencerLease:
        """This broker's side of the region's sequencer lease (see :mod:`.lease`).

        Args:
            duration_ns: How long a grant or renewal lasts.
            members: The region's brokers now (who is alive).
            clock: The host's monotonic clock, ns.
            pid: The process the lease names (default: this one).
        """
        return SequencerLease(
            self._mmap,
            self.broker_id,
            self._lock,
            self._try_lock,
            duration_ns=duration_ns,
            members=members,
            clock=clock,
            pid=pid,
        )

    @property
    def sessions(self) -> SessionTable:
        """This broker's handle on the region's session table (see
        :mod:`.sessions`); its ``timeout_ns`` and ``clock`` are the broker's to set."""
        if self._sessions is None:
            self._sessions = SessionTable(
                self._mmap,
                self.geometry,
                self.map,
                self._lock,
                region_lock_path(self.path),
                self.broker_id,
                timeout_ns=DEFAULT_SESSION_TIMEOUT_NS,
            )
        return self._sessions

    def topics(self) -> dict[str, int]:
        """Every live topic in the region and its table index."""
        return read_topics(self._mmap, self.geometry)

    def check_topic_room(self, topic: str) -> None:
        """Check that ``topic`` exists or the topic table has a free slot for it.

        Creates nothing: a topic takes its slot with its first reservation
        (:meth:`get_cxl_buffer`), so the answer can change before then.

        Raises:
            LogFullError: The topic is new and the table is full.
        """
        if self._known_topic(topic) is not None or self._slot_of(topic) is not None:
            return
        if self._free_topic_slot() is None:
            raise self._topic_table_full(topic)

    def _slot_of(self, topic: str) -> int | None:
        """The slot of ``topic`` in the table now (another broker may have made it)."""
        return find_topic(self._mmap, self.geometry, topic)

    def _free_topic_slot(self) -> int | None:
        free = np.flatnonzero(topic_states(self._mmap, self.geometry) == TOPIC_FREE)
        return int(free[0]) if len(free) else None

    def _topic_table_full(self, topic: str) -> LogFullError:
        return LogFullError(
            f"topic table full ({self.geometry.max_topics} topics); cannot create {topic!r}",
            transient=False,
        )

    def _known_topic(self, topic: str) -> tuple[int, int] | None:
        """``topic``'s (slot, incarnation) as last seen, if it still holds;
        forgets the topic and its stream if it was deleted since."""
        known = self._topic_index.get(topic)
        if known is None:
            return None
        if read_topic_state(self._mmap, self.geometry, known[0]) == (TOPIC_LIVE, known[1]):
            return known
        self._forget(topic)
        return None

    def _forget(self, topic: str) -> None:
        del self._topic_index[topic]
        stream = self._streams.pop(topic, None)
        if stream is not None:
            stream.pending.clear()
            logger.info("topic %r was deleted: its stream starts again from offset 0", topic)

    def _find_or_create_topic(self, topic: str) -> tuple[int, int]:
        """``topic``'s (slot, incarnation), creating it if needed (the caller holds the lock)."""
        known = self._known_topic(topic)
        if known is not None:
            return known
        raw = encode_topic(topic)
        found = self._slot_of(topic)
        if found is not None:
            index = found
            self._check_order(topic, index)  # another broker created it
        else:
            free = self._free_topic_slot()
            if free is None:
                self._log_full += 1
                raise self._topic_table_full(topic)
            order = self.topic_order(topic)
            write_topic(self._mmap, self.geometry, free, raw, order)
            index = free
            logger.info("created topic %r (table slot %d, order %d)", topic, index, order)
        known = self._topic_index[topic] = (
            index,
            read_topic_state(self._mmap, self.geometry, index)[1],
        )
        return known

    def order_of(self, topic: str) -> int | None:
        """The order level ``topic`` was created with; None if it does not exist."""
        index = self._slot_of(topic)
        return None if index is None else read_topic_order(self._mmap, self.geometry, index)

    def check_topic_orders(self) -> None:
        """Warn about every topic whose order is not the one :attr:`topic_order` gives it."""
        for topic, index in self.topics().items():
            self._check_order(topic, index)

    def _check_order(self, topic: str, index: int) -> None:
        stored = read_topic_order(self._mmap, self.geometry, index)
        wanted = self.topic_order(topic)
        if stored != wanted:
            logger.warning(
                "topic %r has order %d, fixed when it was created; the config's order %d "
                "does not apply to it (delete the topic to create it anew with another order)",
                topic,
                stored,
                wanted,
            )

    def _segment_order(self, stream: Stream, need: int) -> tuple[int, int]:
        """(smallest order that holds ``need`` bytes, order to try first)."""
        g = self.geometry
        units = -(-(SEGMENT_HEADER_SIZE + need) // g.unit_size)
        least = order_for(units)
        # Each segment of a stream twice the one before: a topic that stays
        # small costs one unit, a busy one soon gets the largest segments.
        return least, min(g.max_order, max(least, stream.last_order + 1))

    def _take_segment(self, stream: Stream, need: int) -> int:
        g = self.geometry
        least, order = self._segment_order(stream, need)
        with self._lock():
            segment = None
            while segment is None and order >= least:
                segment = self.map.allocate(order, self.broker_id)
                if segment is None:
                    order -= 1  # fragmented or nearly full: take what fits
            if segment is None:
                return NO_SEGMENT
            (generation,) = U64.unpack_from(self._mmap, NEXT_GENERATION_OFFSET)
            U64.pack_into(self._mmap, NEXT_GENERATION_OFFSET, generation + 1)
            base = g.segment_offset(segment)
            # Under the lock: a topic's deletion tells its segments by this
            # header, so no head is seen with its last owner's header.
            SEGMENT_HEADER.pack_into(
                self._mmap,
                base,
                SEGMENT_MAGIC,
                stream.topic_index,
                stream.broker_id,
                stream.num_segments,
                NO_SEGMENT,
                order,
                generation,
            )
        # A recycled segment still holds its last owner's batches: end the
        # (empty) data here before anyone can reach the segment.
        U64.pack_into(self._mmap, base + SEGMENT_HEADER_SIZE + BH_TOTAL_SIZE, 0)
        # Link only after the new segment is initialised, so a reader that
        # follows the link never sees a half-written segment header.
        if stream.last_segment == NO_SEGMENT:
            U32.pack_into(self._mmap, stream.entry_offset, segment)
        else:
            prev = g.segment_offset(stream.last_segment)
            U32.pack_into(self._mmap, prev + SEGMENT_NEXT_OFFSET, segment)
        stream.num_segments += 1
        stream.last_segment = segment
        stream.last_order = order
        stream.segments.append(RetainedSegment(segment, order, base, base + g.segment_bytes(order)))
        STREAM_SEGMENTS.pack_into(
            self._mmap,
            stream.entry_offset,
            U32.unpack_from(self._mmap, stream.entry_offset)[0],
            segment,
            stream.num_segments,
        )
        stream.write_offset = base + SEGMENT_HEADER_SIZE
        stream.segment_end = base + g.segment_bytes(order)
        return int(segment)

    # -- the write path ------------------------------------------------------------

    def stream(self, topic: str) -> Stream:
        """This broker's stream of ``topic``, creating the topic if needed.

        Raises:
            LogFullError: The topic table is full.
        """
        if self._known_topic(topic) is not None and topic in self._streams:
            return self._streams[topic]
        with self._lock():
            return self._stream_locked(topic)

    def _stream_locked(self, topic: str) -> Stream:
        index, incarnation = self._find_or_create_topic(topic)
        stream = self._streams.get(topic)
        if stream is None:
            stream = Stream(self, topic, index, self.broker_id, incarnation)
            self._streams[topic] = stream
        return stream

    def streams(self) -> list[Stream]:
        """This broker's open streams (of topics not deleted)."""
        for topic in list(self._topic_index):
            self._known_topic(topic)
        return list(self._streams.values())

    def existing_stream(self, topic: str) -> Stream | None:
        """This broker's stream of ``topic`` if the topic exists, else None."""
        if self._known_topic(topic) is not None or self._slot_of(topic) is not None:
            return self.stream(topic)
        return None

    def attach_publisher(self, topic: str) -> Stream:
        """Count a publish session of ``topic`` in the region, creating the
        topic if needed: the topic is not deleted (see :mod:`.topics`)
        until :meth:`detach_publisher`.

        Raises:
            LogFullError: The topic table is full.
        """
        with self._lock():
            stream = self._stream_locked(topic)
            offset = stream.entry_offset + STREAM_ATTACHED_OFFSET
            (count,) = U32.unpack_from(self._mmap, offset)
            U32.pack_into(self._mmap, offset, count + 1)
        return stream

    def detach_publisher(self, stream: Stream) -> None:
        """Undo one :meth:`attach_publisher` of ``stream``."""
        with self._lock():
            offset = stream.entry_offset + STREAM_ATTACHED_OFFSET
            count = attached_publishers(
                self._mmap, self.geometry, stream.topic_index, self.broker_id
            )
            if count and self._known_topic(stream.topic) == (
                stream.topic_index,
                stream.incarnation,
            ):
                U32.pack_into(self._mmap, offset, count - 1)

    def get_cxl_buffer(
        self,
        topic: str,
        header: BatchHeader,
        owner: object = None,
        session: Claim | None = None,
    ) -> Reservation:
        """Reserve log space for a batch of ``topic`` and write its header.

        The batch is invisible to readers until :meth:`complete` commits it;
        logical offsets are assigned at commit, in reservation order.

        Args:
            topic: The batch's topic (created on first use).
            header: The validated batch header from the publisher.
            owner: Kept on the reservation for the caller (see :class:`Reservation`).
            session: The claim of a publish session's batch (see
                :mod:`.sessions`): its entry and token go into the header,
                where the batch is into the claim (before it can commit),
                and the claim onto the reservation; :meth:`complete` settles
                it, :meth:`abandon` gives it up.

        Returns:
            The reservation, whose ``payload`` array is where the payload goes.

        Raises:
            LogFullError: ``transient=True`` when the stream already holds
                ``max_inflight_batches`` uncommitted reservations;
                ``transient=False`` when no segment is left for the batch.
        """
        self._refuse_if_foreign()
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
            if self._take_segment(stream, need) == NO_SEGMENT:
                self._log_full += 1
                used = self.map.statistics().used
                raise LogFullError(
                    f"{topic!r}: the region has no free segment for {need} bytes "
                    f"({used} of {self.geometry.num_units} allocation units in use)",
                    transient=False,
                )
        offset = stream.write_offset
        if session is not None:
            # Where it will be, before anything is written there: a claim
            # whose broker dies is judged by the header found there.
            self.sessions.locate(session, offset)
        stream.write_offset += need
        if stream.write_offset + BATCH_HEADER_SIZE <= stream.segment_end:
            # The end of the data, written before this batch's header can be
            # seen, so a walk stops there even in a recycled segment.
            U64.pack_into(self._mmap, stream.write_offset + BH_TOTAL_SIZE, 0)
        BATCH_HEADER.pack_into(
            self._mmap,
            offset,
            header.batch_seq,
            header.client_id,
            header.num_msg,
            BATCH_RESERVED,
            self.broker_id,
            0,
            session.word if session is not None else 0,
            header.total_size,
            0,
            offset + BATCH_HEADER_SIZE,
            0,
            session.token if session is not None else 0,
        )
        payload = self.region[offset + BATCH_HEADER_SIZE : offset + need]
        reservation = Reservation(stream, header, offset, payload, owner, session)
        stream.pending.append(reservation)
        self._reservations += 1
        return reservation

    def complete(
        self, reservation: Reservation, starts: npt.NDArray[np.int64]
    ) -> list[Reservation]:
        """Mark a reservation's payload as fully in place and commit what can be.

        The batch commits now if every batch reserved before it on its stream
        is resolved; otherwise it commits when they are.

        Before it commits a batch, it checks that the batch's state word in
        the region is still the "reserved" that :meth:`get_cxl_buffer` wrote.
        If another process changed it (say, its recovery marked the batch
        abandoned), committing over that would hide the change from readers
        that already acted on it, and that process may be writing this
        broker's streams: the batch is left as it is, never committed nor
        acked, and this handle writes nothing more (every later call raises).

        Args:
            reservation: A reservation from :meth:`get_cxl_buffer`.
            starts: The record offsets from :func:`~trio_embarcadero.wire.scan_records`.

        Returns:
            The batches this call committed, in log order: possibly none (an
            earlier batch is still being received), possibly several (this
            one was the last that held them back).

        Raises:
            LayoutError: Another process changed a batch of this broker.
        """
        self._refuse_if_foreign()
        reservation.starts = starts
        committed = self._advance(reservation.stream)
        self._refuse_if_foreign()
        return committed

    def complete_copy(
        self,
        reservation: Reservation,
        source: npt.NDArray[np.uint8],
        starts: npt.NDArray[np.int64],
    ) -> list[Reservation]:
        """Copy a batch's payload in from ``source``, then :meth:`complete` it.

        A batch next in its stream's commit order gets its records stamped
        (the fields the log sets, as at commit) in ``source``, which this
        changes, before the copy rather than in the region after it: a copy
        this large streams past the CPU caches (non-temporal stores), so
        stamping the region afterwards would read every record header back
        from memory (~130 us for 1928 records of a 2 MiB batch, ~20 us in
        ``source``, which the receive just wrote). Should the batch commit
        at another offset after all, the commit stamps it as usual.

        Args:
            reservation: A reservation from :meth:`get_cxl_buffer`.
            source: The payload, as long as the reservation's, 8-byte aligned.
            starts: The record offsets from :func:`~trio_embarcadero.wire.scan_records`.

        Returns:
            What :meth:`complete` returns.

        Raises:
            LayoutError: Another process changed a batch of this broker.
        """
        self._refuse_if_foreign()
        stream = reservation.stream
        if stream.pending and stream.pending[0] is reservation:
            stamp_records(source.view("<u8"), 0, starts, stream.next_offset)
            reservation.stamped = stream.next_offset
        np.copyto(reservation.payload, source)
        return self.complete(reservation, starts)

    def _settle_sessions(self, committed: list[Reservation]) -> None:
        """Mark the publish session batches among ``committed`` stored (see
        :mod:`.sessions`): after their commit, before anyone acks them."""
        claims = [r.session for r in committed if r.session is not None]
        if claims:
            self.sessions.settle(claims)

    def abandon(self, reservation: Reservation) -> list[Reservation]:
        """Give up a reservation whose payload will never be whole.

        Its space stays in the log, marked abandoned; readers skip it and it
        consumes no logical offsets.

        It never raises (it runs on error paths): if another process changed
        the batch's state word, the word is left alone, this handle stops
        writing (see :meth:`complete`) and nothing is returned.

        Returns:
            The later batches of its stream that it held back and that are
            committed now (see :meth:`complete`).
        """
        if reservation.resolved or self._foreign is not None:
            return []
        if not self._still_reserved(reservation):
            return []
        reservation.state = BATCH_ABANDONED
        U32.pack_into(self._mmap, reservation.header_offset + BH_BATCH_COMPLETE, BATCH_ABANDONED)
        self._abandoned += 1
        if reservation.session is not None:
            self.sessions.release(reservation.session)
        return self._advance(reservation.stream)

    def _advance(self, stream: Stream) -> list[Reservation]:
        pending = stream.pending
        committed: list[Reservation] = []
        while pending:
            head = pending[0]
            if head.state == BATCH_ABANDONED:
                pending.popleft()
                continue
            if head.starts is None or not self._still_reserved(head):
                break
            pending.popleft()
            self._commit(stream, head)
            committed.append(head)
        if committed:
            self._write_counts(stream)
            self._settle_sessions(committed)
        return committed

    def _still_reserved(self, reservation: Reservation) -> bool:
        """Whether the region still says "reserved" for ``reservation``; if
        not, another process wrote it: stop writing."""
        if self._foreign is not None:
            return False
        offset = reservation.header_offset
        (state,) = U32.unpack_from(self._mmap, offset + BH_BATCH_COMPLETE)
        if state == BATCH_RESERVED:
            return True
        self._foreign = (
            f"{self.path}: broker {self.broker_id}'s batch at byte {offset} of topic "
            f"{reservation.stream.topic!r} is no longer reserved (its state word is {state}): "
            "another process has written this broker's streams, so this broker commits "
            "nothing more"
        )
        logger.error("%s", self._foreign)
        return False

    def _refuse_if_foreign(self) -> None:
        if self._foreign is not None:
            raise LayoutError(self._foreign)

    def _commit(self, stream: Stream, reservation: Reservation) -> None:
        assert reservation.starts is not None
        first = stream.next_offset
        num = len(reservation.starts)
        if reservation.stamped != first:
            stamp_records(self.words, reservation.payload_offset, reservation.starts, first)
        U64.pack_into(self._mmap, reservation.header_offset + BH_START_LOGICAL_OFFSET, first)
        # The commit point: everything above is in place before this store.
        U32.pack_into(self._mmap, reservation.header_offset + BH_BATCH_COMPLETE, BATCH_COMMITTED)
        reservation.state = BATCH_COMMITTED
        reservation.first_offset = first
        reservation.batch_index = stream.batches
        stream.next_offset = first + num
        stream.batches += 1
        stream.payload_bytes += reservation.header.total_size
        stream.index_first.append(first)
        stream.index_header.append(reservation.header_offset)
        segment = stream._segment_of(reservation.header_offset)
        segment.batches += 1
        segment.data_bytes += BATCH_HEADER_SIZE + reservation.header.total_size
        segment.last_commit_ns = now = self.clock()
        U64.pack_into(self._mmap, segment.start + SEGMENT_TIME_OFFSET, now)
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
        in log order and whatever its state."""
        return iter_batches(self._mmap, self.geometry, topic_index, broker_id)

    def _recover(self) -> None:
        with self._lock():
            # Deletions cut short by a kill: finish them before anything else.
            for index in finish_deletions(self._mmap, self.geometry, self.map):
                logger.info("finished the deletion of the topic in table slot %d", index)
            # A dead broker has no publishers attached.
            for index in range(self.geometry.max_topics):
                offset = self.geometry.stream_offset(index, self.broker_id)
                U32.pack_into(self._mmap, offset + STREAM_ATTACHED_OFFSET, 0)
        for topic in self.topics():
            # Under the lock, one stream at a time: no deletion runs meanwhile.
            with self._lock():
                slot = self.topics().get(topic)
                if slot is None:
                    continue  # deleted meanwhile
                incarnation = read_topic_state(self._mmap, self.geometry, slot)[1]
                self._topic_index[topic] = (slot, incarnation)
                stream = self._recover_stream(topic, slot)
                if stream is None:
                    continue
                stream.incarnation = incarnation
                self._streams[topic] = stream
        # Segments taken but not linked, or unlinked but not freed, when the
        # last owner of this broker id died: give them back.
        with self._lock():
            reachable = [
                unit
                for stream in self.streams()
                for unit in (segment.unit for segment in stream.segments)
            ]
            freed = self.map.recover(self.broker_id, reachable)
        if freed:
            logger.info("recovered %d segment(s) no stream held", len(freed))

    def _recover_stream(self, topic: str, index: int) -> Stream | None:
        g = self.geometry
        entry = read_stream_entry(self._mmap, g, index, self.broker_id)
        if entry.first_segment == NO_SEGMENT:
            if entry.first_batch == 0 and entry.start_offset == 0:
                return None  # never written
            # Begun at a later position (see begin_at) and nothing written
            # since: it still starts there, so no offset is handed out twice.
            stream = Stream(self, topic, index, self.broker_id)
            self._position(stream, entry.first_batch, entry.start_offset)
            return stream
        stream = Stream(self, topic, index, self.broker_id)
        for unit in segment_chain(self._mmap, g, index, self.broker_id):
            found = read_segment_header(self._mmap, g, unit)
            if found is None:
                raise LayoutError(f"{self.path}: {topic!r} has a segment without a valid header")
            base = g.segment_offset(unit)
            (stamp,) = U64.unpack_from(self._mmap, base + SEGMENT_TIME_OFFSET)
            end = base + g.segment_bytes(found.order)
            stream.segments.append(
                RetainedSegment(unit, found.order, base, end, last_commit_ns=stamp)
            )
        discarded = 0
        end = 0
        position = WalkPosition()
        last_written = NO_SEGMENT  # the segment of the last batch found
        reclaimed: set[int] = set()  # segments holding only offsets below the start
        for offset, header in iter_batches(self._mmap, g, index, self.broker_id, position):
            end = offset + BATCH_HEADER_SIZE + header.total_size
            last_written = position.segment
            if header.batch_complete == BATCH_RESERVED:
                U32.pack_into(self._mmap, offset + BH_BATCH_COMPLETE, BATCH_ABANDONED)
                discarded += 1
            elif header.batch_complete == BATCH_COMMITTED:
                stream.next_offset = header.start_logical_offset + header.num_msg
                if header.start_logical_offset < entry.start_offset:
                    reclaimed.add(position.segment)  # a reclaim cut short
                    continue
                segment = stream._segment_of(offset)
                segment.batches += 1
                segment.data_bytes += BATCH_HEADER_SIZE + header.total_size
                stream.index_first.append(header.start_logical_offset)
                stream.index_header.append(offset)
                stream.payload_bytes += header.total_size
        stream.first_batch = entry.first_batch
        if stream.index_first:
            stream.start_offset = stream.index_first[0]
        else:
            # Nothing retained (a stream begun at a later position whose
            # first batch is not committed yet): it goes on from its start.
            stream.next_offset = max(stream.next_offset, entry.start_offset)
            stream.start_offset = stream.next_offset
        stream.batches = stream.first_batch + len(stream.index_first)
        last = stream.segments[-1]
        stream.last_segment, stream.last_order = last.unit, last.order
        stream.segment_end = last.end
        # The last segment may still be empty (linked, nothing written yet).
        written = last_written == last.unit
        stream.write_offset = end if written else last.start + SEGMENT_HEADER_SIZE
        while len(stream.segments) > 1 and stream.segments[0].unit in reclaimed:
            self._unlink_first(stream)  # finish it: the next recovery step frees it
        stream.num_segments = len(stream.segments)
        stream._commit_segment = len(stream.segments) - 1
        self._write_counts(stream)
        logger.info(
            "re-attached topic %r: %d messages in %d batches (%d retained from offset %d)%s",
            topic,
            stream.next_offset,
            stream.batches,
            len(stream.index_first),
            stream.start_offset,
            f", discarded {discarded} uncommitted batch(es)" if discarded else "",
        )
        return stream

    def begin_at(self, stream: Stream, first_batch: int, start_offset: int) -> None:
        """Let ``stream``, which retains no committed batch, go on from batch
        number ``first_batch`` at logical offset ``start_offset``: the
        batches and offsets before are not in the region (another tier
        holds them), as if retention had reclaimed them. Its next commit is
        batch ``first_batch``, at ``start_offset``.

        Used when a disk log replays only the newest part of a stream into a
        region that lost it. The start is written to the stream's entry
        before anything is committed, so a restart keeps it.

        Raises:
            ValueError: The stream retains a batch or has one in flight, or
                the position is behind where it already is.
        """
        if stream.index_first or stream.pending:
            raise ValueError(f"{stream.topic!r} already holds batches: it cannot begin elsewhere")
        if first_batch < stream.batches or start_offset < stream.next_offset:
            raise ValueError(
                f"{stream.topic!r} is at batch {stream.batches}, offset {stream.next_offset}: "
                f"it cannot begin again at batch {first_batch}, offset {start_offset}"
            )
        # Under the lock: the topic may not be deleted meanwhile.
        with self._lock():
            if self._known_topic(stream.topic) != (stream.topic_index, stream.incarnation):
                raise ValueError(f"{stream.topic!r} was deleted")
            self._position(stream, first_batch, start_offset)

    def _position(self, stream: Stream, first_batch: int, start_offset: int) -> None:
        """Set an empty ``stream``'s start and counts, in memory and in its entry."""
        stream.first_batch = stream.batches = first_batch
        stream.start_offset = stream.next_offset = start_offset
        STREAM_START.pack_into(
            self._mmap, stream.entry_offset + STREAM_START_OFFSET, start_offset, first_batch
        )
        self._write_counts(stream)

    # -- retention ------------------------------------------------------------------------

    def reclaimable_segments(
        self, stream: Stream, *, retention_bytes: int, retention_ms: int, now_ns: int
    ) -> int:
        """How many of the oldest segments ``stream``'s retention lets go now.

        Kafka's rule: the oldest whole segments go while what remains still
        holds ``retention_bytes``, and every segment whose last commit is
        older than ``retention_ms``; never the segment being written, and
        never one with a batch not yet resolved, nor, for an order-5 topic,
        one with a batch not yet ordered (its ack waits for that). -1 means
        no limit.
        """
        segments = stream.segments
        ordered_topic = stream.order == 5
        batches = 0
        # Only segments commits have moved past are whole.
        candidates = min(stream._commit_segment, len(segments) - 1)
        count = 0
        remaining = stream.retained_bytes
        while count < candidates:
            segment = segments[count]
            if segment.pins:
                break  # a reader is using it: the next check will do
            batches += segment.batches
            too_big = retention_bytes >= 0 and remaining - segment.data_bytes >= retention_bytes
            too_old = (
                retention_ms >= 0 and now_ns - segment.last_commit_ns > retention_ms * 1_000_000
            )
            if not (too_big or too_old):
                break
            # Every batch of it, not its last alone: a publish session's
            # batch waiting for its predecessor is ordered after later ones.
            if ordered_topic and not all(
                self._ordered(stream, k) for k in range(batches - segment.batches, batches)
            ):
                break  # the sequencer (or this broker's stamping) has not got past it yet
            remaining -= segment.data_bytes
            count += 1
        return count

    def _ordered(self, stream: Stream, retained: int) -> bool:
        """Whether the ``retained``-th batch the stream retains is ordered
        and its records stamped with their total orders (by this broker,
        which must not find its segment gone), or never ordered."""
        header = stream.index_header[retained]
        (ordered,) = U32.unpack_from(self._mmap, header + BH_ORDERED)
        return ordered == NEVER_ORDERED or is_stamped(self._mmap, header)

    def reclaim_oldest(self, stream: Stream) -> RetainedSegment | None:
        """Let ``stream``'s oldest segment go and give it back to the region.

        Its batches are gone for readers: the log-start offset moves to the
        first batch of the next segment. Crash-safe at every step: the new
        start is written first, then the segment is unlinked, then freed;
        recovery finishes whatever was cut short.

        Returns:
            The segment, or None if the topic was deleted meanwhile (its
            segments are gone already).

        Raises:
            ValueError: The segment is the one being written, or holds a
                batch not yet resolved.
        """
        if len(stream.segments) < 2 or stream._commit_segment < 1 or stream.segments[0].pins:
            raise ValueError(f"{stream.topic!r}: its oldest segment is still in use")
        # Under the lock throughout: the topic may not be deleted meanwhile.
        with self._lock():
            if self._known_topic(stream.topic) != (stream.topic_index, stream.incarnation):
                return None
            gone = self._reclaim_locked(stream)
        self._reclaimed += 1
        return gone

    def _reclaim_locked(self, stream: Stream) -> RetainedSegment:
        gone = stream.segments[0]
        stream.first_batch += gone.batches
        del stream.index_first[: gone.batches]
        del stream.index_header[: gone.batches]
        stream.start_offset = stream.index_first[0] if stream.index_first else stream.next_offset
        stream.payload_bytes -= gone.data_bytes - BATCH_HEADER_SIZE * gone.batches
        STREAM_START.pack_into(
            self._mmap,
            stream.entry_offset + STREAM_START_OFFSET,
            stream.start_offset,
            stream.first_batch,
        )
        self._unlink_first(stream)
        stream._commit_segment -= 1
        stream.num_segments = len(stream.segments)
        self._write_counts(stream)
        self.map.free(gone.unit)
        return gone

    def _unlink_first(self, stream: Stream) -> None:
        stream.segments.popleft()
        STREAM_SEGMENTS.pack_into(
            self._mmap,
            stream.entry_offset,
            stream.segments[0].unit,
            stream.segments[-1].unit,
            len(stream.segments),
        )

    def _write_counts(self, stream: Stream) -> None:
        STREAM_COUNTS.pack_into(
            self._mmap,
            stream.entry_offset + STREAM_COUNTS_OFFSET,
            stream.next_offset,
            stream.batches,
            stream.payload_bytes,
        )

    def statistics(self) -> CxlStatistics:
        """Return a snapshot of this broker's log counters."""
        units = self.map.statistics()
        return CxlStatistics(
            topics=len(self._streams),
            segments_used=units.used,
            segments_free=units.free,
            segments_total=self.geometry.num_units,
            reservations=self._reservations,
            batches_committed=self._batches,
            messages_committed=self._messages,
            bytes_committed=self._bytes,
            batches_abandoned=self._abandoned,
            ring_full=self._ring_full,
            log_full=self._log_full,
        )


class _FileLock:
    """``flock`` of the region file around changes to shared tables.

    The lock is held for a few microseconds (a table scan or a counter bump),
    so taking it synchronously on the event loop is cheaper than a thread hop.
    """

    def __init__(self, fd: int, *, wait: bool = True) -> None:
        self._fd = fd
        self._flags = fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB

    def __enter__(self) -> None:
        # Without wait: BlockingIOError while another process holds it.
        fcntl.flock(self._fd, self._flags)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
