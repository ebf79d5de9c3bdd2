"""The emulated CXL region: reservations, commit order, segments, limits, re-attaching."""

from __future__ import annotations

import gc
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import rawclient
from memory import header, lose_lock, read_only_region, walk_file

from trio_embarcadero.errors import LayoutError, LogFullError
from trio_embarcadero.log import CxlLog, Reservation
from trio_embarcadero.log.layout import (
    BATCH_ABANDONED,
    BATCH_COMMITTED,
    BATCH_RESERVED,
    MAGIC,
    NO_SEGMENT,
    SEGMENT_HEADER_SIZE,
    SEGMENT_MAGIC,
    Geometry,
    iter_batches,
    read_geometry,
    segment_chain,
)
from trio_embarcadero.wire import BATCH_HEADER_SIZE, scan_records

SEG = 64 * 1024
DATA_OFFSET = 8192  # 4096 + 4 topics * (64 + 2 brokers * 64), rounded up to a page
NUM_SEGMENTS = 8
SIZE = DATA_OFFSET + NUM_SEGMENTS * SEG
FULL_SEGMENT = [SEG - SEGMENT_HEADER_SIZE - BATCH_HEADER_SIZE - 64]  # one batch fills a segment


class Region:
    """Opens CXL handles on one file and closes whatever is left at the end."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.opened: list[CxlLog] = []

    def open(self, **overrides: object) -> CxlLog:
        params: dict[str, object] = {
            "size": SIZE,
            "segment_size": SEG,
            "max_topics": 4,
            "max_brokers": 2,
            "broker_id": 0,
            "max_inflight_batches": 16,
            "prefault": False,
        }
        params.update(overrides)
        log = CxlLog.open(self.path, **params)  # type: ignore[arg-type]
        self.opened.append(log)
        return log

    def close(self, log: CxlLog) -> None:
        self.opened.remove(log)
        gc.collect()
        log.close()


@pytest.fixture
def region(cxl_path: str) -> Iterator[Region]:
    r = Region(cxl_path)
    yield r
    for log in list(r.opened):
        r.close(log)


def body(sizes: list[int], client_id: int = 1, first_order: int = 0) -> bytes:
    return b"".join(
        rawclient.record(
            rawclient.payload_for(client_id, first_order + i, n), first_order + i, client_id
        )
        for i, n in enumerate(sizes)
    )


def reserve(
    log: CxlLog,
    topic: str,
    sizes: list[int],
    *,
    seq: int = 0,
    client_id: int = 1,
    owner: object = None,
) -> Reservation:
    """Reserve space for a batch and copy its payload in (not committed yet)."""
    data = body(sizes, client_id)
    r = log.get_cxl_buffer(
        topic, header(len(data), len(sizes), batch_seq=seq, client_id=client_id), owner
    )
    r.payload[:] = np.frombuffer(data, dtype=np.uint8)
    return r


def complete(log: CxlLog, r: Reservation) -> list[Reservation]:
    return log.complete(r, scan_records(r.payload, r.header.num_msg))


def commit(log: CxlLog, topic: str, sizes: list[int], *, seq: int = 0) -> tuple[int, int]:
    """Write a whole batch; returns (first logical offset, header offset)."""
    r = reserve(log, topic, sizes, seq=seq)
    complete(log, r)
    assert r.state == BATCH_COMMITTED
    return r.first_offset, r.header_offset


def states(log: CxlLog, topic: str) -> list[int]:
    index = log.topics()[topic]
    return [h.batch_complete for _, h in log.walk(index, log.broker_id)]


def records_of(log: CxlLog, topic: str) -> list[tuple[int, int, int, bytes]]:
    """Every committed record of a stream, read back from the region."""
    stream = log.stream(topic)
    out = []
    for i in range(stream.batches):
        b = stream.committed_batch(i)
        out += rawclient.parse_records(
            bytes(log.region[b.payload_offset : b.payload_offset + b.total_size])
        )
    return out


def stream_counts(log: CxlLog, topic: str) -> tuple[int, int, int]:
    """(messages, batches, payload bytes) from the stream's table entry."""
    offset = log.geometry.stream_offset(log.topics()[topic], log.broker_id) + 16
    return struct.unpack_from("<QQQ", bytes(log.region[offset : offset + 24]))


# -- format -------------------------------------------------------------------------------


def test_fresh_region_is_formatted(region: Region) -> None:
    log = region.open()
    assert os.path.getsize(region.path) == SIZE
    g = log.geometry
    assert (g.data_offset, g.num_units, g.topic_entry_size) == (DATA_OFFSET, NUM_SEGMENTS, 192)
    assert bytes(log.region[:8]) == MAGIC
    assert read_geometry(log.region) == Geometry(SIZE, SEG, 4, 2, SEG)
    assert log.topics() == {}
    assert log.streams() == []
    for t in range(4):
        for b in range(2):
            offset = g.stream_offset(t, b)
            assert struct.unpack_from("<II", bytes(log.region[offset : offset + 8])) == (
                NO_SEGMENT,
                NO_SEGMENT,
            )
            assert list(iter_batches(log.region, g, t, b)) == []
    stats = log.statistics()
    assert (stats.topics, stats.segments_used, stats.segments_total) == (0, 0, NUM_SEGMENTS)
    assert stats.reservations == stats.batches_committed == stats.log_full == 0


def _mapping_kib(log: CxlLog) -> dict[str, int]:
    """The ``/proc/self/smaps`` counters (kB) of the mapping that holds ``log``'s region."""
    address = log.region.ctypes.data
    counters: dict[str, int] = {}
    inside = False
    with open("/proc/self/smaps", encoding="ascii") as smaps:
        for line in smaps:
            first = line.split()[0]
            if not first.endswith(":"):
                low, high = (int(bound, 16) for bound in first.split("-"))
                inside = low <= address < high
            elif inside and line.split()[-1] == "kB":
                counters[first[:-1]] = int(line.split()[1])
    return counters


def test_prefault_maps_a_region_in_memory_writable(region: Region) -> None:
    # MAP_POPULATE would leave every page clean (Private_Clean), and the first
    # store to each page would then pay for setting its dirty bit.
    log = region.open(prefault=True)
    kib = _mapping_kib(log)
    assert kib["Rss"] >= SIZE // 1024
    assert kib["Private_Dirty"] + kib["Shared_Dirty"] >= SIZE // 1024


def test_prefault_reads_a_region_on_disk_in(tmp_path: Path) -> None:
    # Faulting a file on a disk in for writing would dirty all of it.
    path = str(tmp_path / "region")
    if not os.path.exists("/proc/self/mountinfo") or _on_tmpfs(tmp_path):
        pytest.skip("needs a temporary directory on a disk")
    log = CxlLog.open(path, size=SIZE, segment_size=SEG, max_topics=4, max_brokers=2, broker_id=0)
    try:
        kib = _mapping_kib(log)
        assert kib["Rss"] >= SIZE // 1024
        # Only the tables format_region wrote are dirty.
        assert kib["Private_Dirty"] + kib["Shared_Dirty"] <= DATA_OFFSET // 1024
    finally:
        log.close()


def _on_tmpfs(directory: Path) -> bool:
    device = os.stat(directory).st_dev
    with open("/proc/self/mountinfo", encoding="utf-8") as mounts:
        for line in mounts:
            fields = line.split()
            major, _, minor = fields[2].partition(":")
            if os.makedev(int(major), int(minor)) == device:
                return fields[fields.index("-") + 1] in ("tmpfs", "ramfs")
    return False


def test_region_without_room_for_a_segment_is_refused(region: Region) -> None:
    with pytest.raises(LayoutError, match="has no room for one 65536-byte segment"):
        region.open(size=DATA_OFFSET + SEG - 1)
    assert not os.path.exists(region.path)


# -- the write path -------------------------------------------------------------------------


def test_complete_commits_with_gap_free_offsets(region: Region) -> None:
    log = region.open()
    committed: list[tuple[int, int]] = []
    sizes = [[10, 20, 30], [0], [100] * 5]
    for seq, batch in enumerate(sizes):
        r = reserve(log, "a", batch, seq=seq)
        assert r.state == BATCH_RESERVED
        assert r.first_offset == -1
        assert complete(log, r) == [r]
        committed.append((r.batch_index, r.first_offset))
        assert r.state == BATCH_COMMITTED
    assert committed == [(0, 0), (1, 3), (2, 4)]
    stream = log.stream("a")
    assert (stream.next_offset, stream.batches) == (9, 3)
    assert stream.index_first == [0, 3, 4]
    payload_bytes = sum(len(body(b)) for b in sizes)
    assert stream.payload_bytes == payload_bytes
    assert stream_counts(log, "a") == (9, 3, payload_bytes)
    # Records carry their logical offsets, in order, and the client's data.
    records = records_of(log, "a")
    assert [r[0] for r in records] == list(range(9))
    assert [r[3] for r in records] == [
        rawclient.payload_for(1, i, n) for b in sizes for i, n in enumerate(b)
    ]
    # Batch headers in the log: committed, stamped, where the index says.
    for i, (_, h) in enumerate(log.walk(log.topics()["a"], 0)):
        b = stream.committed_batch(i)
        assert (h.batch_seq, h.num_msg, h.batch_complete) == (i, len(sizes[i]), 1)
        assert h.start_logical_offset == stream.index_first[i] == b.first_offset
        assert h.log_idx == b.payload_offset == stream.index_header[i] + BATCH_HEADER_SIZE
        assert h.broker_id == 0
    stats = log.statistics()
    assert (stats.reservations, stats.batches_committed, stats.messages_committed) == (3, 3, 9)
    assert stats.bytes_committed == payload_bytes


def test_out_of_order_completion_commits_in_reservation_order(region: Region) -> None:
    log = region.open()
    owner = object()
    r1 = reserve(log, "a", [1, 2], seq=1, owner=owner)
    r2 = reserve(log, "a", [3, 4, 5], seq=2, owner=owner)
    r3 = reserve(log, "a", [6], seq=3, owner=owner)
    assert complete(log, r2) == []
    assert complete(log, r3) == []
    assert (r2.state, r3.state) == (BATCH_RESERVED, BATCH_RESERVED)
    assert log.stream("a").next_offset == 0
    assert states(log, "a") == [0, 0, 0]
    assert stream_counts(log, "a") == (0, 0, 0)
    # The call that unblocks them returns every batch it committed, in order,
    # each with the owner it was reserved for.
    committed = complete(log, r1)
    assert committed == [r1, r2, r3]
    assert all(r.owner is owner for r in committed)
    assert [r.first_offset for r in (r1, r2, r3)] == [0, 2, 5]
    assert states(log, "a") == [1, 1, 1]
    assert [r[0] for r in records_of(log, "a")] == list(range(6))


def test_abandon_in_the_middle_keeps_offsets_gap_free(region: Region) -> None:
    log = region.open()
    r1 = reserve(log, "a", [1, 2], seq=1)
    r2 = reserve(log, "a", [3, 4, 5], seq=2)
    r3 = reserve(log, "a", [6], seq=3)
    r4 = reserve(log, "a", [7, 8], seq=4)
    assert complete(log, r3) == []
    assert log.abandon(r2) == []
    assert r2.state == BATCH_ABANDONED
    assert states(log, "a") == [0, 2, 0, 0]  # r3 still waits for r1
    assert complete(log, r1) == [r1, r3]  # r3 was held back only by r1
    assert complete(log, r4) == [r4]
    assert (r1.first_offset, r2.first_offset, r3.first_offset, r4.first_offset) == (0, -1, 2, 3)
    assert states(log, "a") == [1, 2, 1, 1]
    assert log.abandon(r2) == []  # idempotent
    assert log.abandon(r1) == []  # committed: no effect
    assert r1.state == BATCH_COMMITTED
    assert log.statistics().batches_abandoned == 1
    stream = log.stream("a")
    assert stream.batches == 3
    assert stream.index_first == [0, 2, 3]
    assert [stream.committed_batch(i).batch_seq for i in range(3)] == [1, 3, 4]
    assert [r[0] for r in records_of(log, "a")] == [0, 1, 2, 3, 4]
    # The abandoned payload is never stamped.
    assert int(log.words[r2.payload_offset // 8 + 2]) == 2**64 - 1  # as the client sent it


def test_complete_copy_stamps_the_source_only_for_the_next_batch(region: Region) -> None:
    log = region.open()
    sizes = [[1, 2], [3, 4, 5], [6], [7] * 4]

    def staged(seq: int) -> tuple[Reservation, np.ndarray]:
        data = np.frombuffer(bytearray(body(sizes[seq], first_order=seq * 10)), dtype=np.uint8)
        r = log.get_cxl_buffer("a", header(len(data), len(sizes[seq]), batch_seq=seq))
        return r, data

    # Next in commit order: its records are stamped in the source, not again at commit.
    r0, source0 = staged(0)
    assert log.complete_copy(r0, source0, scan_records(source0, 2)) == [r0]
    assert r0.stamped == 0
    assert [rec[0] for rec in rawclient.parse_records(source0.tobytes())] == [0, 1]
    # Behind a batch still being received: copied as it is, stamped at commit,
    # at the offset the batch ahead leaves it (here it is given up: none).
    r1, _ = staged(1)
    r2, source2 = staged(2)
    r3, source3 = staged(3)
    sent = source2.tobytes()
    assert log.complete_copy(r2, source2, scan_records(source2, 1)) == []
    assert r2.stamped == -1
    assert source2.tobytes() == sent
    assert log.abandon(r1) == [r2]
    assert r2.first_offset == 2
    assert log.complete_copy(r3, source3, scan_records(source3, 4)) == [r3]
    assert r3.stamped == 3
    records = records_of(log, "a")
    assert [rec[0] for rec in records] == list(range(7))
    assert [rec[3] for rec in records] == [
        rawclient.payload_for(1, seq * 10 + i, n)
        for seq in (0, 2, 3)
        for i, n in enumerate(sizes[seq])
    ]


def test_segment_rollover(region: Region) -> None:
    log = region.open()
    batch = [6000] * 3  # 3 x 6080 = 18240 payload bytes: three batches per segment
    placed = [commit(log, "a", batch, seq=k) for k in range(7)]
    g = log.geometry
    stream = log.stream("a")
    assert stream.num_segments == 3
    assert log.statistics().segments_used == 3
    chain = list(segment_chain(log.region, g, log.topics()["a"], 0))
    assert chain == [0, 1, 2]
    for k, (first, offset) in enumerate(placed):
        assert first == 3 * k
        segment, slot = divmod(k, 3)
        assert offset == g.segment_offset(segment) + SEGMENT_HEADER_SIZE + slot * (128 + 18240)
    for s in chain:
        base = g.segment_offset(s)
        assert struct.unpack_from("<IIIII", bytes(log.region[base : base + 20])) == (
            SEGMENT_MAGIC,
            log.topics()["a"],
            0,
            s,
            s + 1 if s < 2 else NO_SEGMENT,
        )
    assert states(log, "a") == [1] * 7
    assert [r[0] for r in records_of(log, "a")] == list(range(21))


def test_a_batch_larger_than_a_segment_is_refused(region: Region) -> None:
    log = region.open()
    too_big = SEG - SEGMENT_HEADER_SIZE - BATCH_HEADER_SIZE + 64
    with pytest.raises(ValueError, match="cannot fit in a segment"):
        log.get_cxl_buffer("a", header(too_big, 1))
    commit(log, "a", FULL_SEGMENT)  # exactly one segment
    assert log.stream("a").write_offset == log.geometry.segment_offset(1)


def test_one_topic_can_take_nearly_every_segment(region: Region) -> None:
    log = region.open(size=DATA_OFFSET + 4 * SEG)
    commit(log, "small", [10])  # takes segment 0
    for k in range(3):
        commit(log, "big", FULL_SEGMENT, seq=k)
    assert log.stream("big").num_segments == 3
    assert log.statistics().segments_used == 4
    # The region is full: the big topic's next batch has nowhere to go...
    with pytest.raises(LogFullError) as info:
        reserve(log, "big", [10])
    assert info.value.transient is False
    assert "no free segment" in str(info.value)
    # ...while the small one still has room in its own segment.
    assert commit(log, "small", [10], seq=1)[0] == 1


def test_region_full_changes_nothing_committed(region: Region) -> None:
    log = region.open(size=DATA_OFFSET + 2 * SEG)
    commit(log, "a", FULL_SEGMENT, seq=0)
    commit(log, "a", [100] * 10, seq=1)
    before = bytes(log.region)
    stream = log.stream("a")
    snapshot = (stream.next_offset, stream.batches, stream.write_offset, len(stream.pending))
    for _ in range(3):
        with pytest.raises(LogFullError) as info:
            log.get_cxl_buffer("a", header(FULL_SEGMENT[0] + 64, 1))
        assert info.value.transient is False
    assert bytes(log.region) == before
    assert (
        stream.next_offset,
        stream.batches,
        stream.write_offset,
        len(stream.pending),
    ) == snapshot
    stats = log.statistics()
    assert (stats.log_full, stats.reservations, stats.segments_used) == (3, 2, 2)
    # Smaller batches still fit in what is left of the last segment.
    assert commit(log, "a", [1], seq=2)[0] == 11


def test_inflight_window_full_is_transient(region: Region) -> None:
    log = region.open(max_inflight_batches=2)
    r1 = reserve(log, "a", [1])
    r2 = reserve(log, "a", [1])
    with pytest.raises(LogFullError) as info:
        reserve(log, "a", [1])
    assert info.value.transient is True
    assert "2 batches in flight" in str(info.value)
    assert log.statistics().ring_full == 1
    # Other topics have their own window.
    complete(log, reserve(log, "b", [1]))
    complete(log, r2)  # still waits for r1: the window stays full
    with pytest.raises(LogFullError):
        reserve(log, "a", [1])
    complete(log, r1)
    r3 = reserve(log, "a", [1])
    complete(log, r3)
    assert r3.first_offset == 2
    assert log.statistics().ring_full == 2


def test_topic_table_full(region: Region) -> None:
    log = region.open(max_topics=2)
    commit(log, "a", [1])
    log.check_topic_room("b")  # creates nothing
    assert set(log.topics()) == {"a"}
    log.stream("b")
    log.check_topic_room("a")
    log.check_topic_room("b")
    for attempt in (log.check_topic_room, log.stream):
        with pytest.raises(LogFullError) as info:
            attempt("c")
        assert info.value.transient is False
        assert str(info.value) == "topic table full (2 topics); cannot create 'c'"
    assert set(log.topics()) == {"a", "b"}
    assert commit(log, "a", [1])[0] == 1


def test_brokers_share_segments_but_not_offsets(region: Region) -> None:
    log0 = region.open(broker_id=0)
    log1 = region.open(broker_id=1)
    assert commit(log0, "a", [5, 5])[0] == 0
    assert commit(log1, "a", [7])[0] == 0
    assert commit(log0, "a", [5])[0] == 2
    assert log0.topics() == log1.topics() == {"a": 0}
    chain0 = list(segment_chain(log0.region, log0.geometry, 0, 0))
    chain1 = list(segment_chain(log0.region, log0.geometry, 0, 1))
    assert (chain0, chain1) == ([0], [1])
    assert log0.statistics().segments_used == 2


# -- re-attaching --------------------------------------------------------------------------


def test_reattach_restores_committed_batches(region: Region) -> None:
    log = region.open()
    for k in range(4):
        commit(log, "a", [6000] * 3, seq=k)  # crosses into a second segment
    commit(log, "b", [1, 2, 3])
    before_a = (log.stream("a").index_first[:], log.stream("a").index_header[:])
    records_a = records_of(log, "a")
    region.close(log)

    log = region.open()
    assert log.topics() == {"a": 0, "b": 1}
    a = log.stream("a")
    assert (a.next_offset, a.batches, a.num_segments) == (12, 4, 2)
    assert (a.index_first, a.index_header) == before_a
    assert records_of(log, "a") == records_a
    assert log.stream("b").next_offset == 3
    assert stream_counts(log, "a") == (12, 4, 4 * 18240)
    # New batches continue the offsets and go after the last one.
    first, offset = commit(log, "a", [1], seq=9)
    assert first == 12
    assert offset == before_a[1][-1] + BATCH_HEADER_SIZE + 18240
    assert states(log, "a") == [1] * 5


def test_reattach_abandons_a_batch_left_reserved(region: Region) -> None:
    crashed = region.open()
    commit(crashed, "a", [10, 10], seq=0)
    commit(crashed, "a", [10], seq=1)
    left = reserve(crashed, "a", [20, 20, 20], seq=2)  # its owner dies before committing
    left_offset = left.header_offset
    assert [h.batch_complete for h in walk_file(region.path)] == [1, 1, 0]

    lose_lock(crashed)  # as its process dying would
    log = region.open()  # the next owner re-attaches
    assert [h.batch_complete for h in walk_file(region.path)] == [1, 1, 2]
    a = log.stream("a")
    assert (a.next_offset, a.batches) == (3, 2)
    first, offset = commit(log, "a", [30], seq=3)
    assert first == 3  # no gap for the abandoned batch
    assert offset == left_offset + BATCH_HEADER_SIZE + 3 * 128
    assert [h.batch_complete for h in walk_file(region.path)] == [1, 1, 2, 1]
    assert [h.batch_seq for h in walk_file(region.path)] == [0, 1, 2, 3]
    assert [r[0] for r in records_of(log, "a")] == [0, 1, 2, 3]
    # The dead handle finds its batch changed: it neither overwrites it nor commits more.
    assert crashed.abandon(left) == []
    assert [h.batch_complete for h in walk_file(region.path)] == [1, 1, 2, 1]
    del left


def test_close_with_a_pending_reservation(region: Region) -> None:
    log = region.open()
    reserve(log, "a", [1])
    region.close(log)
    assert [h.batch_complete for h in walk_file(region.path)] == [0]


def test_reattach_with_another_segment_size_is_refused(region: Region) -> None:
    region.close(region.open())
    with pytest.raises(LayoutError) as info:
        region.open(segment_size=SEG // 2)
    message = str(info.value)
    assert region.path in message
    assert "segment size 65536 (config: 32768)" in message
    assert "--reset" in message


def test_reattach_with_other_table_sizes_is_refused(region: Region) -> None:
    region.close(region.open())
    with pytest.raises(LayoutError, match=r"max_topics 4 \(config: 5\)"):
        region.open(max_topics=5)
    with pytest.raises(LayoutError, match=r"max_brokers 2 \(config: 3\)"):
        region.open(max_brokers=3)


def test_reattach_with_another_size_is_refused(region: Region) -> None:
    region.close(region.open())
    with pytest.raises(LayoutError) as info:
        region.open(size=SIZE + SEG)
    assert str(info.value) == (
        f"{region.path} is {SIZE} bytes but the config asks for {SIZE + SEG} "
        "(cxl.size_mb); start with --reset to discard it, or fix the config"
    )
    assert os.path.getsize(region.path) == SIZE  # untouched


def test_foreign_file_is_refused(region: Region) -> None:
    with open(region.path, "wb") as f:
        f.write(b"not a region".ljust(SIZE, b"\0"))
    with pytest.raises(LayoutError, match="is not a trio-embarcadero CXL region"):
        region.open()


def test_reset_starts_empty(region: Region) -> None:
    log = region.open()
    commit(log, "a", [1, 2])
    region.close(log)
    log = region.open(reset=True)
    assert log.topics() == {}
    assert walk_file(region.path) == []
    assert commit(log, "a", [3])[0] == 0
    assert log.statistics().segments_used == 1


def test_reader_mapping_tells_committed_from_inflight(region: Region) -> None:
    log = region.open()
    r1 = reserve(log, "a", [1], seq=1)
    r2 = reserve(log, "a", [2, 2], seq=2)
    r3 = reserve(log, "a", [3], seq=3)
    r4 = reserve(log, "a", [4], seq=4)
    complete(log, r1)
    complete(log, r3)  # done, but waits for r2
    log.abandon(r4)
    with read_only_region(region.path) as view:
        geometry = read_geometry(view)
        assert geometry == log.geometry
        seen = [(h.batch_seq, h.batch_complete) for _, h in iter_batches(view, geometry, 0, 0)]
        assert seen == [
            (1, BATCH_COMMITTED),
            (2, BATCH_RESERVED),
            (3, BATCH_RESERVED),
            (4, BATCH_ABANDONED),
        ]
        complete(log, r2)  # stores become visible in the other mapping
        seen = [(h.batch_seq, h.batch_complete) for _, h in iter_batches(view, geometry, 0, 0)]
        assert seen == [
            (1, BATCH_COMMITTED),
            (2, BATCH_COMMITTED),
            (3, BATCH_COMMITTED),
            (4, BATCH_ABANDONED),
        ]
        starts = [h.start_logical_offset for _, h in iter_batches(view, geometry, 0, 0)]
        assert starts[:3] == [0, 1, 3]
    del r1, r2, r3, r4


def test_read_geometry_refuses_other_data() -> None:
    with pytest.raises(LayoutError, match="not a trio-embarcadero CXL region"):
        read_geometry(bytes(4096))
