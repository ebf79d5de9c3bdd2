"""Where everything is in a CXL region: the one description of the file layout.

Layout (version 4, all integers little-endian)::

    offset 0          superblock (4096 B)
                        0  magic  b"TEMBCXL4"       8  layout version (u32)
                       12  max_topics (u32)        16  max_brokers (u32)
                       20  num_units (u32)         24  region size (u64)
                       32  largest segment (u64)   40  data offset (u64)
                       48  largest order (u32)     56  unit size (u64)
                       64  map offset (u64)        72  next segment generation (u64)
                      384  the session table (64 B; layout 4): its first
                           segment's first unit + 1 (u32; 0: none yet), then
                           zeros (see .sessions)
                      512  the sequencer lease (see .lease; zero: never held):
                             0 epoch (u64)        8 holder broker id (u32)
                            12 holder pid (u32)  16 expiry (u64, ns of the
                            host's monotonic clock; 0: released)
                            24 granted (u64, same clock); the rest of the
                            512 B stays zero
                     1024  the broker table: 32 entries of 96 B, one per
                           broker id (see .members):
                             0 sequence (u32, odd while the entry is written)
                             4 state (u32: 0 absent, 1 live, 2 draining)
                             8 pid (u32)           12 port (u32)
                            16 start time (u64, ns since the epoch)
                            24 heartbeat (u64, ns of the host's monotonic clock)
                            32 heartbeats (u64)   40 heartbeat timeout (u32, ms)
                            44 heartbeat interval (u32, ms)
                            48 host[48] (UTF-8, NUL padded)
    offset 4096       topic table: max_topics entries of 64 + 64 * max_brokers B
                        topic header: name[32] (NUL padded), state u32 @32
                        (0 free, 1 live, 2 being deleted), order u32 @36
                        (0 or 5, fixed when the topic is created),
                        incarnation u64 @40 (new at every creation of a
                        topic in the slot), ordered index head u32 @48
                        (its first index segment + 1; 0: none yet),
                        ordered batches u64 @56 (entries in the ordered
                        index: the sequencer's commit point; see below),
                        then one 64-B stream entry per broker:
                          0 first segment (u32)   4 last segment (u32)
                          8 segment count (u32)  16 committed messages (u64)
                         24 committed batches    32 retained payload bytes
                         40 first retained offset (u64): the log-start offset
                         48 first retained batch (u64)
                         56 attached publishers (u32): the broker's publish
                            sessions of the topic (a topic is not deleted
                            while any is attached)
    map offset        the unit map: one u32 per allocation unit (see .segments)
    data offset       num_units allocation units of unit size bytes each; a
                      segment is 2**order units, named by its first unit
                        segment header (64 B): magic u32 "SGM2", topic u32,
                        broker u32, chain index u32, next segment u32 @16,
                        order u32 @20, generation u64 @24,
                        last commit time u64 @32 (ns, for time retention)
                        then batches back to back from +64:
                        [128-B batch header][payload of total_size bytes]

The ordered index of an order-5 topic (written by the sequencer, see
:mod:`.sequencer`) is a chain of one-unit segments whose map owner is
``INDEX_OWNER`` and whose header names the topic with broker
``INDEX_OWNER``; from +64 each holds ``(unit_size - 64) // 32`` entries of
32 B, entry ``k`` of the topic in the segment at chain position
``k // per_segment`` (its header's chain index; the sequencer lets the
first segment go once every batch it names is gone, so the chain may start
later):
                          0 broker (u32)          4 num_msg (u32)
                          8 total order of its first message (u64)
                         16 batch header offset (u64)
                         24 generation of the data segment then (u64): a
                            reader that finds another one there knows the
                            batch is gone (retention), like an offset
The sequencer orders a *run* of batches at a time (consecutive batches of
one stream, at most ``RUN_LIMIT`` of :mod:`.sequencer`) and writes, in this
order: each header's ``total_order``, the index entries, the topic's
ordered count (the commit point: one aligned 8-byte store covering the whole
run), then the headers' ``ordered`` words (1), then the next batch_seq to
order of each publish session (see below) with a batch in the run (one
8-byte store a session). It writes no record: the broker that stored a
batch writes every record's ``total_order`` (the header's + the record's
index) once the batch's ``ordered`` word is 1, then the header's stamped
word (``BH_STAMPED``, +76, in the padding the writer zeroes) to 1, and
only then acks it, writes it to disk or lets retention have its segment;
a broker that starts stamps what its previous process left unstamped
(see :mod:`.stamps`). A reader takes a record's total order from the
header or index entry, not from a record of a batch not stamped yet. A batch is ordered
once the count covers its entry; a sequencer that starts again redoes the
``ordered`` words of the last ``RUN_LIMIT`` entries (those of batches still
in the region) and their sessions' next batch_seqs, and goes on from the
count, so a ``kill -9`` at any store neither assigns a total order twice nor
skips one. The next total order is the last entry's plus its ``num_msg``;
each broker's stream is ordered in its commit order but for publish
session batches deferred for their predecessors (ordered later, once those
are), so a restart resumes after the last batch whose ``ordered`` word is
1 (passing again the batches after it whose word is 2, ``NEVER_ORDERED``),
and the committed batches before it whose word is 0 are the deferred ones.
The sequencer writes 2 into a batch's ``ordered`` word only once the run
before it in its stream is written whole. A stream's ``ordered`` (and
stamped) words are thus set in its order but for deferred batches: the
disk writer and retention look at every batch, not at a stream's last.

The session table of publish sessions (``client_req = 2``, see
:mod:`.sessions`) is a chain of segments whose map owner is
``SESSION_OWNER``, whose header names no topic (``NO_TOPIC``) and broker
``SESSION_OWNER``; from +64 each holds entries of 2 KiB. A session's batch
names its entry in its header's padding word at +28 (``BH_SESSION``: 1 + the
entry's index, 0 for any other batch) and carries the session's token in
``batch_off_to_export`` (+64, ``BH_SESSION_TOKEN``). The sequencer writes
2 in the ``ordered`` word of a session batch that is never ordered (its
batch_seq was skipped).

A batch of an order-5 topic goes to the disk log once its ``ordered`` word
is set (see :mod:`.disk`). Replayed into a region rebuilt after it was lost,
a batch that had a total order gets it back in its header's ``total_order``
and 1 in its restored word (``BH_RESTORED``, +72, in the padding the writer
zeroes), both before its commit, and the sequencer gives it that place
again, before any batch that was not replayed; one that was never ordered
gets 2 in its ``ordered`` word again, and stays so.

A *stream* is one (topic, broker) pair: its own chain of segments, its own
logical offsets. Its first segment is one unit, and each next one twice the
size of the one before up to the largest segment, so a region holds
thousands of small topics while busy ones get large segments. A segment is
recycled once its stream lets it go (retention): the generation in its
header, new at every allocation, tells a reader that was inside it that it is
gone. The writer ends what it has written with an empty header (total_size
0) before it publishes a batch header, so a walk never runs into what a
recycled segment held before. A batch header's ``batch_complete`` word is the commit point
other processes read: 0 = reserved (payload possibly incomplete; a reader
stops there), 1 = committed (``start_logical_offset`` and every record's
``logical_offset`` and ``next_msg_diff`` are final), 2 = abandoned (never
visible; readers skip ``total_size`` bytes). A header whose ``total_size`` is
0 is unwritten space: the end of the segment's data.

On real CXL every store of a commit would be followed by a cache-line flush
and fence; on a /dev/shm file shared by processes of one x86-64 host, stores
become visible in program order, so writing ``batch_complete`` last (and
reading it first) is enough. The writer refuses other machines unless told
otherwise (:func:`~trio_embarcadero.log.region.check_memory_ordering`).

Everything here works on any buffer holding the region: the broker's
read-write mapping or a read-only mapping in another process.
"""

from __future__ import annotations

import functools
import re
import struct
from collections.abc import Iterator
from typing import Any

import attrs
import numpy as np
import numpy.typing as npt

from ..errors import LayoutError
from ..wire import (
    BATCH_HEADER,
    BH_BATCH_COMPLETE,
    MAX_BROKER_ID,
    BatchHeader,
    unpack_batch_header,
)

MAGIC = b"TEMBCXL4"
#: Layout 4 added the session table; layout 3 the broker table and a
#: topic's order, which layout 2 had not.
LAYOUT_VERSION = 4
#: The magic of the layouts before: such a region is read as it is and
#: upgraded by the first broker that attaches (:func:`upgrade_layout`).
MAGIC_2 = b"TEMBCXL2"
MAGIC_3 = b"TEMBCXL3"
_MAGIC_VERSION = struct.Struct("<8sI")
SUPERBLOCK_SIZE = 4096
#: Where the session table starts (layout 4; zero in layout 3): the first
#: unit + 1 of its first segment (u32), then zeros to 448.
SESSION_TABLE_OFFSET = 384
SESSION_TABLE_SIZE = 64
#: The segment map's owner (and segment header's broker) of the session
#: table's segments; no broker id is this large.
SESSION_OWNER = 0xFE
#: The topic a session table segment's header names: none.
NO_TOPIC = 0xFFFFFFFF
#: The sequencer lease (see .lease): 512 B reserved since layout 3, zero until
#: a broker first takes the lease, so layout 3 needs no new version for it.
LEASE_OFFSET = 512
LEASE_SIZE = 512
#: epoch, holder broker id, holder pid, expiry, granted.
LEASE_RECORD = struct.Struct("<QIIQQ")
assert LEASE_RECORD.size <= LEASE_SIZE
#: The broker table: one entry per possible broker id, inside the superblock
#: page, so adding it moved nothing else.
BROKER_TABLE_OFFSET = 1024
MEMBER_ENTRY_SIZE = 96
BROKER_TABLE_ENTRIES = MAX_BROKER_ID + 1
#: sequence, state, pid, port, start time, heartbeat, heartbeats, timeout
#: (ms), interval (ms), host.
MEMBER_ENTRY = struct.Struct("<IIIIQQQII48s")
MEMBER_HOST_BYTES = 48
assert MEMBER_ENTRY.size == MEMBER_ENTRY_SIZE
assert BROKER_TABLE_OFFSET + BROKER_TABLE_ENTRIES * MEMBER_ENTRY_SIZE <= SUPERBLOCK_SIZE
SEGMENT_MAGIC = 0x324D4753  # "SGM2"
SEGMENT_HEADER_SIZE = 64
TOPIC_HEADER_SIZE = 64
STREAM_ENTRY_SIZE = 64
NO_SEGMENT = 0xFFFFFFFF
TOPIC_NAME_BYTES = 32
TOPIC_FREE = 0
TOPIC_LIVE = 1
#: A deletion was started (and maybe cut short): see :mod:`.topics`.
TOPIC_DELETING = 2

BATCH_RESERVED = 0
BATCH_COMMITTED = 1
BATCH_ABANDONED = 2

SUPERBLOCK = struct.Struct("<8sIIIIQQQI4xQQQ")
NEXT_GENERATION_OFFSET = 72
#: magic, topic, broker, chain index, next segment, order, generation
SEGMENT_HEADER = struct.Struct("<IIIIIIQ")
SEGMENT_NEXT_OFFSET = 16
TOPIC_STATE_OFFSET = 32
#: A topic's order level (0 or 5), at +36 of its header: fixed at creation.
TOPIC_ORDER_OFFSET = 36
#: A topic's incarnation, at +40 of its header: a broker's in-memory stream
#: of an older incarnation is of a topic deleted since.
TOPIC_INCARNATION_OFFSET = 40
#: An order-5 topic's ordered index: its first segment + 1 (0: none), at +48.
TOPIC_INDEX_HEAD_OFFSET = 48
#: The entries in that index (the sequencer's commit point), at +56.
TOPIC_ORDERED_OFFSET = 56
#: The segment map's owner (and segment header's broker) of index segments:
#: no broker id is this large.
INDEX_OWNER = 0xFF
#: broker, num_msg, total order, batch header offset, data segment generation.
INDEX_ENTRY = struct.Struct("<IIQQQ")
INDEX_ENTRY_SIZE = INDEX_ENTRY.size
#: Byte offsets of the batch-header words the sequencer writes.
BH_ORDERED = 24
BH_TOTAL_ORDER = 56
#: A session batch's header (see .sessions): 1 + its session's entry, and its token.
BH_SESSION = 28
BH_SESSION_TOKEN = 64
#: The ``ordered`` word of a batch that is never ordered.
NEVER_ORDERED = 2
#: A batch header's restored word (in the padding after the wire's fields,
#: which the writer zeroes): 1 on a batch of an order-5 topic replayed from
#: the disk log with the total order it had (in ``total_order``), which the
#: sequencer gives it again.
BH_RESTORED = 72
#: A batch header's stamped word (in the same padding): 1 once every record
#: of an ordered batch of an order-5 topic carries its total order, written
#: by the broker that stored the batch (see .stamps).
BH_STAMPED = 76
#: A stream entry's count of attached publish sessions, at +56.
STREAM_ATTACHED_OFFSET = 56
#: A stream entry: first, last segment, segment count.
STREAM_SEGMENTS = struct.Struct("<III")
#: Then, at +16: committed messages, batches and payload bytes.
STREAM_COUNTS = struct.Struct("<QQQ")
STREAM_COUNTS_OFFSET = 16
#: At +40: the first retained logical offset and the first retained batch
#: (its index among every batch the stream ever committed).
STREAM_START = struct.Struct("<QQ")
STREAM_START_OFFSET = 40
_STREAM_ENTRY = struct.Struct("<III4xQQQQQ")
#: A segment header's last-commit time (ns since the epoch), at +32.
SEGMENT_TIME_OFFSET = 32
BH_TOTAL_SIZE = 32
U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")


def _align(value: int, to: int) -> int:
    return -(-value // to) * to


@attrs.frozen
class Geometry:
    """Sizes that fix where everything is in a region.

    Attributes:
        region_size: Bytes of the whole file.
        segment_size: The largest segment, a power-of-two multiple of ``unit_size``.
        max_topics: Slots in the topic table.
        max_brokers: Stream entries per topic.
        unit_size: The allocation unit: the smallest segment.
    """

    region_size: int
    segment_size: int
    max_topics: int
    max_brokers: int
    unit_size: int

    def __attrs_post_init__(self) -> None:
        ratio = self.segment_size // self.unit_size if self.unit_size > 0 else 0
        if ratio < 1 or ratio * self.unit_size != self.segment_size or ratio & (ratio - 1):
            raise LayoutError(
                f"the segment size {self.segment_size} is not a power-of-two multiple of "
                f"the allocation unit {self.unit_size}"
            )

    @property
    def topic_entry_size(self) -> int:
        return TOPIC_HEADER_SIZE + STREAM_ENTRY_SIZE * self.max_brokers

    @property
    def max_order(self) -> int:
        """The order of the largest segment (``2**max_order`` units)."""
        return (self.segment_size // self.unit_size).bit_length() - 1

    @property
    def map_offset(self) -> int:
        return _align(SUPERBLOCK_SIZE + self.max_topics * self.topic_entry_size, 64)

    @functools.cached_property
    def num_units(self) -> int:
        # Cached: every segment offset depends on it, and the loop is slow.
        # The map takes 4 bytes a unit out of the same space as the units.
        room = self.region_size - self.map_offset
        units = max(0, room // (self.unit_size + 4))
        while units and _align(self.map_offset + 4 * units, 4096) + units * self.unit_size > (
            self.region_size
        ):
            units -= 1
        return units

    @functools.cached_property
    def data_offset(self) -> int:
        return _align(self.map_offset + 4 * self.num_units, 4096)

    def topic_offset(self, topic_index: int) -> int:
        return SUPERBLOCK_SIZE + topic_index * self.topic_entry_size

    def stream_offset(self, topic_index: int, broker_id: int) -> int:
        return self.topic_offset(topic_index) + TOPIC_HEADER_SIZE + broker_id * STREAM_ENTRY_SIZE

    def segment_offset(self, segment: int) -> int:
        """Where the segment whose first unit is ``segment`` starts."""
        return self.data_offset + segment * self.unit_size

    def segment_bytes(self, order: int) -> int:
        """Bytes of a segment of ``order``."""
        return self.unit_size << order


@attrs.frozen
class StreamEntry:
    """A stream's entry in the topic table.

    Attributes:
        first_segment: Its first segment (``NO_SEGMENT``: never written).
        last_segment: Its last segment.
        segments: Segments in its chain.
        messages: Committed messages; also its next logical offset.
        batches: Committed batches.
        payload_bytes: Committed payload bytes.
        start_offset: The first logical offset still retained (the
            log-start offset); the messages before it were reclaimed.
        first_batch: How many of the committed batches were reclaimed.
    """

    first_segment: int
    last_segment: int
    segments: int
    messages: int
    batches: int
    payload_bytes: int
    start_offset: int
    first_batch: int


def file_name(topic: str, broker_id: int, first_offset: int = 0) -> str:
    """The disk log file of one (topic, broker) stream that begins at logical
    ``first_offset`` (a stream's disk log is a run of such files, Kafka's
    segments). ``@`` is not a topic character, so the name parses back
    (:func:`parse_file_name`); the offset is zero-padded so that names sort
    in offset order."""
    return f"{topic}@{broker_id}.{first_offset:020d}.log"


_FILE_NAME = re.compile(r"(?P<topic>[^@]+)@(?P<broker>[0-9]+)(?:\.(?P<first>[0-9]{20}))?\.log")


def parse_file_name(name: str) -> tuple[str, int, int | None] | None:
    """The (topic, broker id, first logical offset) of a disk log file's
    ``name``, or None when it is not one. The offset is None for a file of
    the earlier one-file-per-stream form (``<topic>@<broker>.log``)."""
    match = _FILE_NAME.fullmatch(name)
    if match is None:
        return None
    first = match["first"]
    return match["topic"], int(match["broker"]), None if first is None else int(first)


# -- the superblock ---------------------------------------------------------------------


def format_region(buf: Any, geometry: Geometry) -> None:
    """Write an empty region's superblock and topic table into a zeroed ``buf``."""
    g = geometry
    SUPERBLOCK.pack_into(
        buf,
        0,
        MAGIC,
        LAYOUT_VERSION,
        g.max_topics,
        g.max_brokers,
        g.num_units,
        g.region_size,
        g.segment_size,
        g.data_offset,
        g.max_order,
        g.unit_size,
        g.map_offset,
        1,
    )
    for t in range(g.max_topics):
        for b in range(g.max_brokers):
            STREAM_SEGMENTS.pack_into(buf, g.stream_offset(t, b), NO_SEGMENT, NO_SEGMENT, 0)


def read_geometry(buf: Any) -> Geometry:
    """Read a region's geometry from its superblock.

    Raises:
        LayoutError: The buffer does not start with a superblock of layout
            2 to 4; the message tells a region of an older layout from other
            data.
    """
    magic, version, topics, brokers, _, region, segment, _, _, unit, _, _ = SUPERBLOCK.unpack_from(
        buf, 0
    )
    if (magic, version) in ((MAGIC_2, 2), (MAGIC_3, 3)):
        # Layouts 2 and 3 keep their tables where layout 4 does; layout 2
        # has no broker table (its zeros read as "absent") and every topic's
        # order is 0; neither has a session table (zero: none yet).
        return Geometry(region, segment, topics, brokers, unit)
    if magic[:-1] == MAGIC[:-1] and (magic != MAGIC or version != LAYOUT_VERSION):
        # Ours, but of another layout: its tables are not where this one looks.
        raise LayoutError(
            f"a CXL region of layout {version} (this version of trio-embarcadero "
            f"reads layouts 2 to {LAYOUT_VERSION})"
        )
    if magic != MAGIC or version != LAYOUT_VERSION:
        raise LayoutError(
            f"not a trio-embarcadero CXL region of layout {LAYOUT_VERSION} "
            f"(magic {magic!r}, version {version})"
        )
    return Geometry(region, segment, topics, brokers, unit)


def upgrade_layout(buf: Any, path: str) -> int | None:
    """Make a region of layout 2 or 3 one of layout 4, in place; the caller
    holds the region's file lock and maps it read-write.

    Each layout only adds what the one before left as zeros: layout 3 the
    broker table and the sequencer lease in the superblock's page and a
    topic's order (0) in its header's padding, layout 4 the session table's
    start in the superblock's page (and the session words of batch headers,
    which are 0 for every batch written before). So the upgrade is the new
    magic and version, written once the new areas are seen to be empty;
    every batch stays where it is.

    Returns:
        The layout the region was of (2 or 3), or None when it needed no upgrade.

    Raises:
        LayoutError: The superblock's page holds data where the old layout
            has none: not a region an earlier version wrote.
    """
    magic, version = _MAGIC_VERSION.unpack_from(buf, 0)
    if (magic, version) == (MAGIC_2, 2):
        start, end = SUPERBLOCK.size, SUPERBLOCK_SIZE
        where = "past the superblock"
    elif (magic, version) == (MAGIC_3, 3):
        start, end = SESSION_TABLE_OFFSET, SESSION_TABLE_OFFSET + SESSION_TABLE_SIZE
        where = "where layout 4 keeps the session table"
    else:
        return None
    if np.frombuffer(buf, np.uint8, end - start, start).any():
        raise LayoutError(
            f"{path} says it is a CXL region of layout {version}, but its superblock's page "
            f"is not empty {where}; start with --reset to discard it"
        )
    _MAGIC_VERSION.pack_into(buf, 0, MAGIC, LAYOUT_VERSION)
    return int(version)


def check_layout(buf: Any, geometry: Geometry, path: str) -> None:
    """Refuse a region that was made with another geometry than ``geometry``.

    Raises:
        LayoutError: Saying what differs and how to go on.
    """
    try:
        found = read_geometry(buf)
    except LayoutError as exc:
        raise LayoutError(f"{path} is {exc}; start with --reset to discard it") from None
    _, _, _, _, units, _, _, data, _, _, _, _ = SUPERBLOCK.unpack_from(buf, 0)
    names = {
        "max_topics": "max_topics",
        "max_brokers": "max_brokers",
        "segment_size": "segment size",
        "unit_size": "allocation unit",
    }
    diffs = [
        f"{label} {getattr(found, field)} (config: {getattr(geometry, field)})"
        for field, label in names.items()
        if getattr(found, field) != getattr(geometry, field)
    ]
    if (
        diffs
        or found.region_size != geometry.region_size
        or data != geometry.data_offset
        or units != geometry.num_units
    ):
        raise LayoutError(
            f"{path} was made with another layout: {', '.join(diffs) or 'sizes differ'}; "
            "start with --reset to discard it, or fix the config"
        )


def unit_map(buf: Any, geometry: Geometry) -> npt.NDArray[np.uint32]:
    """The region's unit map as a numpy array (writable if ``buf`` is)."""
    return np.frombuffer(buf, dtype="<u4", count=geometry.num_units, offset=geometry.map_offset)


@attrs.frozen
class SegmentHeader:
    """The 64-byte header of a segment.

    Attributes:
        topic: The topic table slot of the stream it belongs to.
        broker_id: That stream's broker.
        chain_index: Its position in the stream's chain since it was created.
        next_segment: The next segment of the chain (``NO_SEGMENT``: none yet).
        order: It spans ``2**order`` units.
        generation: New at every allocation of the segment.
    """

    topic: int
    broker_id: int
    chain_index: int
    next_segment: int
    order: int
    generation: int


def read_segment_header(buf: Any, geometry: Geometry, segment: int) -> SegmentHeader | None:
    """The header of the segment at unit ``segment``; None if it is not one."""
    magic, topic, broker, index, nxt, order, generation = SEGMENT_HEADER.unpack_from(
        buf, geometry.segment_offset(segment)
    )
    if magic != SEGMENT_MAGIC or order > geometry.max_order:
        return None
    return SegmentHeader(topic, broker, index, nxt, order, generation)


# -- the topic table ------------------------------------------------------------------------


def read_topic_name(buf: Any, geometry: Geometry, index: int) -> str | None:
    """The name in topic table slot ``index``, or None for a free slot."""
    off = geometry.topic_offset(index)
    (state,) = U32.unpack_from(buf, off + TOPIC_STATE_OFFSET)
    if state != TOPIC_LIVE:
        return None
    return bytes(buf[off : off + TOPIC_NAME_BYTES]).rstrip(b"\0").decode("ascii", "replace")


def topic_states(buf: Any, geometry: Geometry) -> npt.NDArray[np.uint32]:
    """The state word of every topic table slot, in one vectorised read (a
    table of thousands of slots is scanned at every topic creation)."""
    stride = geometry.topic_entry_size
    table = np.frombuffer(
        buf,
        dtype=np.uint8,
        count=geometry.max_topics * stride,
        offset=geometry.topic_offset(0),
    )
    return (
        table.reshape(geometry.max_topics, stride)[:, TOPIC_STATE_OFFSET : TOPIC_STATE_OFFSET + 4]
        .copy()
        .view("<u4")
        .ravel()
    )


def _topic_table(buf: Any, geometry: Geometry) -> npt.NDArray[np.uint8]:
    """The topic table as one row of bytes per slot."""
    stride = geometry.topic_entry_size
    return np.frombuffer(
        buf,
        dtype=np.uint8,
        count=geometry.max_topics * stride,
        offset=geometry.topic_offset(0),
    ).reshape(geometry.max_topics, stride)


def ordered_slots(buf: Any, geometry: Geometry) -> list[int]:
    """The slot of every live topic of order 5: one vectorised scan of the
    state and order words (the head's sequencer looks every few ms, and a
    region may hold thousands of order-0 topics)."""
    stride = geometry.topic_entry_size // 4
    words = np.frombuffer(
        buf, dtype="<u4", count=geometry.max_topics * stride, offset=geometry.topic_offset(0)
    )
    # Strided columns, compared in place: no copy of the table's rows.
    states = words[TOPIC_STATE_OFFSET // 4 :: stride]
    orders = words[TOPIC_ORDER_OFFSET // 4 :: stride]
    return np.flatnonzero((states == TOPIC_LIVE) & (orders == 5)).tolist()


def ordered_topics(buf: Any, geometry: Geometry) -> dict[int, str]:
    """Every live topic of order 5, slot to name (see :func:`ordered_slots`)."""
    names = {i: read_topic_name(buf, geometry, i) for i in ordered_slots(buf, geometry)}
    return {i: name for i, name in names.items() if name is not None}


def find_topic(buf: Any, geometry: Geometry, name: str) -> int | None:
    """The slot of the live topic ``name``, or None (one vectorised compare)."""
    raw = np.frombuffer(name.encode("ascii").ljust(TOPIC_NAME_BYTES, b"\0"), dtype=np.uint8)
    table = _topic_table(buf, geometry)
    matches = (table[:, :TOPIC_NAME_BYTES] == raw).all(axis=1) & (
        topic_states(buf, geometry) == TOPIC_LIVE
    )
    found = np.flatnonzero(matches)
    return int(found[0]) if len(found) else None


def read_topics(buf: Any, geometry: Geometry) -> dict[str, int]:
    """Every live topic in the region and its table slot."""
    found: dict[str, int] = {}
    for i in np.flatnonzero(topic_states(buf, geometry) == TOPIC_LIVE).tolist():
        name = read_topic_name(buf, geometry, i)
        if name is not None:
            found[name] = i
    return found


def write_topic(buf: Any, geometry: Geometry, index: int, raw_name: bytes, order: int = 0) -> None:
    """Make slot ``index`` a live topic named ``raw_name`` of order level
    ``order`` (caller holds the lock).

    The topic gets a new incarnation, taken from the superblock's generation
    counter, so a stream of a topic deleted meanwhile is told apart from it.
    Its order is fixed from here on: nothing rewrites it while the topic lives.
    """
    off = geometry.topic_offset(index)
    buf[off : off + TOPIC_NAME_BYTES] = raw_name.ljust(TOPIC_NAME_BYTES, b"\0")
    U32.pack_into(buf, off + TOPIC_ORDER_OFFSET, order)
    # A new topic has no ordered index (a deleted one's segments are freed).
    U32.pack_into(buf, off + TOPIC_INDEX_HEAD_OFFSET, 0)
    U64.pack_into(buf, off + TOPIC_ORDERED_OFFSET, 0)
    (incarnation,) = U64.unpack_from(buf, NEXT_GENERATION_OFFSET)
    U64.pack_into(buf, NEXT_GENERATION_OFFSET, incarnation + 1)
    U64.pack_into(buf, off + TOPIC_INCARNATION_OFFSET, incarnation)
    # The name first, then the state word: a reader never sees a live half-name.
    U32.pack_into(buf, off + TOPIC_STATE_OFFSET, TOPIC_LIVE)


def read_topic_state(buf: Any, geometry: Geometry, index: int) -> tuple[int, int]:
    """Slot ``index``'s state word and incarnation."""
    off = geometry.topic_offset(index)
    (state,) = U32.unpack_from(buf, off + TOPIC_STATE_OFFSET)
    (incarnation,) = U64.unpack_from(buf, off + TOPIC_INCARNATION_OFFSET)
    return state, incarnation


def read_topic_order(buf: Any, geometry: Geometry, index: int) -> int:
    """The order level (0 or 5) slot ``index``'s topic was created with."""
    (order,) = U32.unpack_from(buf, geometry.topic_offset(index) + TOPIC_ORDER_OFFSET)
    return int(order)


@attrs.frozen
class IndexEntry:
    """One entry of an order-5 topic's ordered index.

    Attributes:
        broker_id: The broker whose stream holds the batch.
        num_msg: Its messages.
        total_order: The total order of its first message.
        header_offset: Where its batch header is in the region.
        generation: The generation of its segment when it was ordered.
    """

    broker_id: int
    num_msg: int
    total_order: int
    header_offset: int
    generation: int


def index_per_segment(geometry: Geometry) -> int:
    """Ordered index entries in one index segment (one allocation unit)."""
    return (geometry.unit_size - SEGMENT_HEADER_SIZE) // INDEX_ENTRY_SIZE


def read_ordered_count(buf: Any, geometry: Geometry, topic_index: int) -> int:
    """Entries in slot ``topic_index``'s ordered index (its ordered batches)."""
    (count,) = U64.unpack_from(buf, geometry.topic_offset(topic_index) + TOPIC_ORDERED_OFFSET)
    return int(count)


@attrs.define
class IndexChain:
    """The segments of an ordered index, as last read.

    Attributes:
        first: The chain position of its first segment: retention let the
            ones before go (their entries are gone), so entry ``e`` is in
            ``units[e // per_segment - first]``.
        units: Its segments (first units), in order.
        generations: Each segment's generation when it was read: another
            one there now means the segment was let go (and maybe reused).
    """

    first: int = 0
    units: list[int] = attrs.Factory(list)
    generations: list[int] = attrs.Factory(list)


def index_chain(buf: Any, geometry: Geometry, topic_index: int) -> IndexChain:
    """The segments of slot ``topic_index``'s ordered index, in order."""
    (head,) = U32.unpack_from(buf, geometry.topic_offset(topic_index) + TOPIC_INDEX_HEAD_OFFSET)
    chain = IndexChain()
    segment = head - 1 if head else NO_SEGMENT
    while segment < geometry.num_units and len(chain.units) < geometry.num_units:
        found = read_segment_header(buf, geometry, segment)
        if found is None or (found.topic, found.broker_id) != (topic_index, INDEX_OWNER):
            break
        if not chain.units:
            chain.first = found.chain_index
        chain.units.append(segment)
        chain.generations.append(found.generation)
        segment = found.next_segment
    return chain


def index_entry_offset(geometry: Geometry, chain: IndexChain, entry: int) -> int:
    """Where entry ``entry`` of an index whose chain is ``chain`` is.

    Raises:
        IndexError: The entry is not in the chain (let go, or beyond it).
    """
    per = index_per_segment(geometry)
    position = entry // per - chain.first
    if not 0 <= position < len(chain.units):
        raise IndexError(f"ordered index entry {entry} is not in the chain read")
    unit = chain.units[position]
    return geometry.segment_offset(unit) + SEGMENT_HEADER_SIZE + (entry % per) * INDEX_ENTRY_SIZE


def read_index_entry(buf: Any, geometry: Geometry, chain: IndexChain, entry: int) -> IndexEntry:
    """Entry ``entry`` of an index whose chain is ``chain`` (see :func:`index_chain`).

    Raises:
        IndexError: As for :func:`index_entry_offset`.
    """
    return IndexEntry(*INDEX_ENTRY.unpack_from(buf, index_entry_offset(geometry, chain, entry)))


def generation_holding(buf: Any, geometry: Geometry, offset: int) -> int | None:
    """The generation of the segment that holds byte ``offset`` now (from the
    unit map: the head whose block covers its unit), or None if no segment
    does."""
    unit = (offset - geometry.data_offset) // geometry.unit_size
    if not 0 <= unit < geometry.num_units:
        return None
    words = unit_map(buf, geometry)
    for order in range(geometry.max_order + 1):
        head = unit & ~((1 << order) - 1)
        word = int(words[head])
        # A head word: bit 31, the order in the low byte (see .segments).
        if word & (1 << 31) and (word & 0xFF) >= order and head + (1 << (word & 0xFF)) > unit:
            (generation,) = U64.unpack_from(buf, geometry.segment_offset(head) + 24)
            return int(generation)
    return None


def member_offset(broker_id: int) -> int:
    """Where broker ``broker_id``'s entry of the broker table is."""
    if not 0 <= broker_id < BROKER_TABLE_ENTRIES:
        raise ValueError(f"broker id {broker_id} is not in 0..{BROKER_TABLE_ENTRIES - 1}")
    return BROKER_TABLE_OFFSET + broker_id * MEMBER_ENTRY_SIZE


def read_stream_entry(
    buf: Any, geometry: Geometry, topic_index: int, broker_id: int
) -> StreamEntry:
    """A stream's entry in the topic table."""
    return StreamEntry(
        *_STREAM_ENTRY.unpack_from(buf, geometry.stream_offset(topic_index, broker_id))
    )


# -- walking a stream ------------------------------------------------------------------------


def segment_chain(buf: Any, geometry: Geometry, topic_index: int, broker_id: int) -> Iterator[int]:
    """Yield the segments (first units) of a stream, in order."""
    (segment,) = U32.unpack_from(buf, geometry.stream_offset(topic_index, broker_id))
    seen = 0
    while segment != NO_SEGMENT and segment < geometry.num_units and seen < geometry.num_units:
        yield segment
        seen += 1
        (segment,) = U32.unpack_from(buf, geometry.segment_offset(segment) + SEGMENT_NEXT_OFFSET)


class SegmentReclaimed(Exception):
    """The segment a walk was in was reclaimed (and maybe reused) meanwhile."""


@attrs.define
class WalkPosition:
    """Where a walk of a stream stands: resume a later walk from here.

    Attributes:
        segment: The segment being walked (``NO_SEGMENT``: not started).
        offset: Absolute offset of the next batch header to look at.
        end: Where that segment ends.
        generation: The segment's generation when the walk entered it.
    """

    segment: int = NO_SEGMENT
    offset: int = 0
    end: int = 0
    generation: int = 0


def enter_segment(
    buf: Any, g: Geometry, pos: WalkPosition, segment: int, topic_index: int, broker_id: int
) -> bool:
    """Move ``pos`` to the start of ``segment`` if it is one of the stream's;
    False if it is not (any more)."""
    header = read_segment_header(buf, g, segment) if segment < g.num_units else None
    if header is None or (header.topic, header.broker_id) != (topic_index, broker_id):
        return False
    pos.segment = segment
    pos.offset = g.segment_offset(segment) + SEGMENT_HEADER_SIZE
    pos.end = g.segment_offset(segment) + g.segment_bytes(header.order)
    pos.generation = header.generation
    return True


def check_segment(buf: Any, geometry: Geometry, position: WalkPosition) -> None:
    """Raise :class:`SegmentReclaimed` if ``position``'s segment is no longer
    the one the walk entered (read it after reading a batch's bytes: they
    are good only if the segment was not reclaimed meanwhile)."""
    (generation,) = U64.unpack_from(buf, geometry.segment_offset(position.segment) + 24)
    if generation != position.generation:
        raise SegmentReclaimed(f"segment {position.segment} was reclaimed")


def iter_batches(
    buf: Any,
    geometry: Geometry,
    topic_index: int,
    broker_id: int,
    position: WalkPosition | None = None,
) -> Iterator[tuple[int, BatchHeader]]:
    """Yield ``(header_offset, header)`` for every batch written to a stream.

    Batches come in log order whatever their state, up to the end of what is
    written. With ``position``, the walk starts there and moves it past each
    batch once the caller asks for the next one, so a caller that stops at a
    batch (say, one still reserved) resumes at that batch next time.

    The size word is read first, then the state word, then the rest of the
    header: the size is 0 until the broker has written the whole header (the
    end of the data is marked there before), and the state is committed only
    after that, so a header seen with a size is whole and one seen committed
    is final (a state read first could be a recycled segment's old one).

    Raises:
        SegmentReclaimed: The segment the walk stood in was reclaimed (the
            stream's retention let it go) since the walk entered it.
    """
    g = geometry
    pos = position if position is not None else WalkPosition()
    if pos.segment == NO_SEGMENT:
        (first,) = U32.unpack_from(buf, g.stream_offset(topic_index, broker_id))
        if first == NO_SEGMENT or not enter_segment(buf, g, pos, first, topic_index, broker_id):
            return
    while True:
        offset = pos.offset
        base = g.segment_offset(pos.segment)
        # Read the link to the next segment before the header: the broker
        # writes a batch header before it links a new segment, so a link seen
        # now means an empty header here is final.
        (next_segment,) = U32.unpack_from(buf, base + SEGMENT_NEXT_OFFSET)
        state = total = 0
        if offset + BATCH_HEADER.size <= pos.end:
            (total,) = U64.unpack_from(buf, offset + BH_TOTAL_SIZE)
            (state,) = U32.unpack_from(buf, offset + BH_BATCH_COMPLETE)
        check_segment(buf, g, pos)  # what was just read is the walk's own segment
        if total == 0 or offset + BATCH_HEADER.size + total > pos.end:
            if next_segment == NO_SEGMENT:
                return  # the end of what is written
            if not enter_segment(buf, g, pos, next_segment, topic_index, broker_id):
                raise SegmentReclaimed(f"segment {pos.segment}'s successor is gone")
            continue
        header = unpack_batch_header(buf[offset : offset + BATCH_HEADER.size])
        check_segment(buf, g, pos)
        if header.batch_complete != state:  # committed since: report what was read first
            header = attrs.evolve(header, batch_complete=state)
        yield offset, header
        pos.offset = offset + BATCH_HEADER.size + total
