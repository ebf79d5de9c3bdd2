"""Where everything is in a CXL region: the one description of the file layout.

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
logical offsets. A batch header's ``batch_complete`` word is the commit point
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

import struct
from collections.abc import Iterator
from typing import Any

import attrs

from ..errors import LayoutError
from ..wire import BATCH_HEADER, BH_BATCH_COMPLETE, BatchHeader, unpack_batch_header

MAGIC = b"TEMBCXL1"
LAYOUT_VERSION = 1
SUPERBLOCK_SIZE = 4096
SEGMENT_MAGIC = 0x314D4753  # "SGM1"
SEGMENT_HEADER_SIZE = 64
TOPIC_HEADER_SIZE = 64
STREAM_ENTRY_SIZE = 64
NO_SEGMENT = 0xFFFFFFFF
TOPIC_NAME_BYTES = 32
TOPIC_LIVE = 1

BATCH_RESERVED = 0
BATCH_COMMITTED = 1
BATCH_ABANDONED = 2

SUPERBLOCK = struct.Struct("<8sIIIIQQQI")
NEXT_FREE_OFFSET = 48
SEGMENT_HEADER = struct.Struct("<IIIII")
SEGMENT_NEXT_OFFSET = 16
TOPIC_STATE_OFFSET = 32
#: A stream entry: first, last segment, segment count.
STREAM_SEGMENTS = struct.Struct("<III")
#: Then, at +16: committed messages, batches and payload bytes.
STREAM_COUNTS = struct.Struct("<QQQ")
STREAM_COUNTS_OFFSET = 16
_STREAM_ENTRY = struct.Struct("<III4xQQQ")
BH_TOTAL_SIZE = 32
U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")


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
class StreamEntry:
    """A stream's entry in the topic table.

    Attributes:
        first_segment: Its first segment (``NO_SEGMENT``: never written).
        last_segment: Its last segment.
        segments: Segments in its chain.
        messages: Committed messages; also its next logical offset.
        batches: Committed batches.
        payload_bytes: Committed payload bytes.
    """

    first_segment: int
    last_segment: int
    segments: int
    messages: int
    batches: int
    payload_bytes: int


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
        g.num_segments,
        g.region_size,
        g.segment_size,
        g.data_offset,
        0,
    )
    for t in range(g.max_topics):
        for b in range(g.max_brokers):
            STREAM_SEGMENTS.pack_into(buf, g.stream_offset(t, b), NO_SEGMENT, NO_SEGMENT, 0)


def read_geometry(buf: Any) -> Geometry:
    """Read a region's geometry from its superblock.

    Raises:
        LayoutError: The buffer does not start with a layout-1 superblock.
    """
    magic, version, topics, brokers, _segments, region, segment, _data, _ = SUPERBLOCK.unpack_from(
        buf, 0
    )
    if magic != MAGIC or version != LAYOUT_VERSION:
        raise LayoutError(
            f"not a trio-embarcadero CXL region of layout {LAYOUT_VERSION} "
            f"(magic {magic!r}, version {version})"
        )
    return Geometry(region, segment, topics, brokers)


def check_layout(buf: Any, geometry: Geometry, path: str) -> None:
    """Refuse a region that was made with another geometry than ``geometry``.

    Raises:
        LayoutError: Saying what differs and how to go on.
    """
    try:
        found = read_geometry(buf)
    except LayoutError as exc:
        raise LayoutError(f"{path} is {exc}; start with --reset to discard it") from None
    _, _, _, _, segments, _, _, data, _ = SUPERBLOCK.unpack_from(buf, 0)
    names = {
        "max_topics": "max_topics",
        "max_brokers": "max_brokers",
        "segment_size": "segment size",
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
        or segments != geometry.num_segments
    ):
        raise LayoutError(
            f"{path} was made with another layout: {', '.join(diffs) or 'sizes differ'}; "
            "start with --reset to discard it, or fix the config"
        )


def segments_handed_out(buf: Any, geometry: Geometry) -> int:
    """Segments the bump allocator has handed out, over every stream."""
    (used,) = U32.unpack_from(buf, NEXT_FREE_OFFSET)
    return min(int(used), geometry.num_segments)


# -- the topic table ------------------------------------------------------------------------


def read_topic_name(buf: Any, geometry: Geometry, index: int) -> str | None:
    """The name in topic table slot ``index``, or None for a free slot."""
    off = geometry.topic_offset(index)
    (state,) = U32.unpack_from(buf, off + TOPIC_STATE_OFFSET)
    if state != TOPIC_LIVE:
        return None
    return bytes(buf[off : off + TOPIC_NAME_BYTES]).rstrip(b"\0").decode("ascii", "replace")


def read_topics(buf: Any, geometry: Geometry) -> dict[str, int]:
    """Every live topic in the region and its table slot."""
    found: dict[str, int] = {}
    for i in range(geometry.max_topics):
        name = read_topic_name(buf, geometry, i)
        if name is not None:
            found[name] = i
    return found


def write_topic(buf: Any, geometry: Geometry, index: int, raw_name: bytes) -> None:
    """Make slot ``index`` a live topic named ``raw_name`` (caller holds the lock)."""
    off = geometry.topic_offset(index)
    buf[off : off + TOPIC_NAME_BYTES] = raw_name.ljust(TOPIC_NAME_BYTES, b"\0")
    # The name first, then the state word: a reader never sees a live half-name.
    U32.pack_into(buf, off + TOPIC_STATE_OFFSET, TOPIC_LIVE)


def read_stream_entry(
    buf: Any, geometry: Geometry, topic_index: int, broker_id: int
) -> StreamEntry:
    """A stream's entry in the topic table."""
    return StreamEntry(
        *_STREAM_ENTRY.unpack_from(buf, geometry.stream_offset(topic_index, broker_id))
    )


# -- walking a stream ------------------------------------------------------------------------


def segment_chain(buf: Any, geometry: Geometry, topic_index: int, broker_id: int) -> Iterator[int]:
    """Yield the segment numbers of a stream, in order."""
    (segment,) = U32.unpack_from(buf, geometry.stream_offset(topic_index, broker_id))
    seen = 0
    while segment != NO_SEGMENT and seen < geometry.num_segments:
        yield segment
        seen += 1
        (segment,) = U32.unpack_from(buf, geometry.segment_offset(segment) + SEGMENT_NEXT_OFFSET)


@attrs.define
class WalkPosition:
    """Where a walk of a stream stands: resume a later walk from here.

    Attributes:
        segment: The segment being walked (``NO_SEGMENT``: not started).
        offset: Absolute offset of the next batch header to look at.
    """

    segment: int = NO_SEGMENT
    offset: int = 0


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

    The state word is read before the rest of the header: the broker writes
    it last, so a header seen as committed is final.
    """
    g = geometry
    pos = position if position is not None else WalkPosition()
    if pos.segment == NO_SEGMENT:
        (first,) = U32.unpack_from(buf, g.stream_offset(topic_index, broker_id))
        if first == NO_SEGMENT:
            return
        pos.segment = first
        pos.offset = g.segment_offset(first) + SEGMENT_HEADER_SIZE
    while True:
        segment_end = g.segment_offset(pos.segment) + g.segment_size
        offset = pos.offset
        # Read the link to the next segment before the header: the broker
        # writes a batch header before it links a new segment, so a link seen
        # now means an empty header here is final.
        (next_segment,) = U32.unpack_from(buf, g.segment_offset(pos.segment) + SEGMENT_NEXT_OFFSET)
        state = total = 0
        if offset + BATCH_HEADER.size <= segment_end:
            (state,) = U32.unpack_from(buf, offset + BH_BATCH_COMPLETE)
            (total,) = U64.unpack_from(buf, offset + BH_TOTAL_SIZE)
        if total == 0 or offset + BATCH_HEADER.size + total > segment_end:
            if next_segment == NO_SEGMENT or next_segment >= g.num_segments:
                return  # the end of what is written
            pos.segment = next_segment
            pos.offset = g.segment_offset(next_segment) + SEGMENT_HEADER_SIZE
            continue
        header = unpack_batch_header(buf[offset : offset + BATCH_HEADER.size])
        if header.batch_complete != state:  # committed since: report what was read first
            header = attrs.evolve(header, batch_complete=state)
        yield offset, header
        pos.offset = offset + BATCH_HEADER.size + total
