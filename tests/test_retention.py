"""Variable-size segments and retention in the log core (synchronous, no event loop).

A region of small allocation units holds many small topics; a busy stream's
segments double; retention lets the oldest whole segments go by size
(Kafka's rule) or age, moves the log-start offset, gives the units back for
other streams, and survives a re-attach and a crash at every step. A reader
that stood in a segment that was reclaimed and reused learns it is gone.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import rawclient
import trio
import trio.testing
from conftest import MakeConfig
from memory import close_log, memory_broker, open_client, read_only_region, settle
from rawclient import payload_for
from test_cxl import commit

from trio_embarcadero import Message, open_broker, open_publisher, open_subscriber
from trio_embarcadero.broker.retention import reclaim_stream
from trio_embarcadero.log import CxlLog, open_log
from trio_embarcadero.log.layout import (
    STREAM_START,
    STREAM_START_OFFSET,
    SegmentReclaimed,
    WalkPosition,
    iter_batches,
    read_geometry,
)

UNIT = 64 * 1024
LARGEST = 16 * UNIT
RECORD = 64 + 1024  # one 1 KiB message
PER_UNIT = (UNIT - 64) // (128 + 8 * RECORD)  # 8-message batches in a one-unit segment


def open_units(path: str, *, size_mb: int = 8, max_topics: int = 16, **kw: object) -> CxlLog:
    params: dict[str, object] = {
        "size": size_mb << 20,
        "segment_size": LARGEST,
        "unit_size": UNIT,
        "max_topics": max_topics,
        "max_brokers": 2,
        "broker_id": 0,
        "prefault": False,
    }
    params.update(kw)
    return CxlLog.open(path, **params)  # type: ignore[arg-type]


@pytest.fixture
def log(cxl_path: str) -> Iterator[CxlLog]:
    log = open_units(cxl_path)
    yield log
    close_log(log)


def fill(log: CxlLog, topic: str, batches: int, first_seq: int = 0) -> None:
    for k in range(batches):
        commit(log, topic, [1024] * 8, seq=first_seq + k)


def test_many_small_topics_take_one_unit_each(cxl_path: str) -> None:
    log = open_units(cxl_path, size_mb=64, max_topics=1024)
    try:
        for t in range(900):
            commit(log, f"t{t}", [100])
        assert log.statistics().segments_used == 900  # one 64 KiB unit each
        assert all(s.num_segments == 1 for s in log.streams())
    finally:
        close_log(log)


def test_a_busy_streams_segments_double_up_to_the_largest(log: CxlLog) -> None:
    fill(log, "busy", 200)
    stream = log.stream("busy")
    orders = [s.order for s in stream.segments]
    assert orders[:5] == [0, 1, 2, 3, 4]
    assert set(orders[5:]) <= {4}  # 16 units = the largest segment
    assert next(s.batches for s in stream.segments) == PER_UNIT


def test_retention_by_bytes_keeps_at_least_the_limit(log: CxlLog) -> None:
    fill(log, "t", 200)
    stream = log.stream("t")
    limit = 300 * 1024
    n = log.reclaimable_segments(stream, retention_bytes=limit, retention_ms=-1, now_ns=0)
    assert n >= 1
    freed_before = log.statistics().segments_used
    for _ in range(n):
        log.reclaim_oldest(stream)
    assert stream.retained_bytes >= limit
    # One more would go below the limit (Kafka: whole segments while what remains holds it).
    assert stream.retained_bytes - stream.segments[0].data_bytes < limit
    assert log.reclaimable_segments(stream, retention_bytes=limit, retention_ms=-1, now_ns=0) == 0
    assert log.statistics().segments_used < freed_before
    assert stream.start_offset == stream.index_first[0] > 0
    assert stream.batches == 200
    with pytest.raises(IndexError, match="not in the region"):
        stream.committed_batch(stream.first_batch - 1)  # reclaimed: never another batch
    assert stream.committed_batch(stream.first_batch).first_offset == stream.start_offset
    # Readers see the retained messages only, from the new start, gap-free.
    with open_log(cxl_path_of(log)) as reader:
        offsets = [m.offset for m in reader.messages("t")]
        (info,) = reader.topic("t").streams
    assert info.start_offset == stream.start_offset  # what `topics` and `inspect` show
    assert offsets == list(range(stream.start_offset, stream.next_offset))


def cxl_path_of(log: CxlLog) -> str:
    return log.path


def test_retention_by_age(log: CxlLog) -> None:
    now = [1_000_000_000]
    log.clock = lambda: now[0]
    fill(log, "t", 3 * PER_UNIT)  # three segments (1, 2, 4 units), the last partly filled
    now[0] += 10_000_000_000  # 10 s later
    fill(log, "t", 1, first_seq=100)
    stream = log.stream("t")
    # 5 s: every segment whose last commit is older than that, but not the one written now.
    assert log.reclaimable_segments(stream, retention_bytes=-1, retention_ms=5000, now_ns=now[0])
    assert (
        log.reclaimable_segments(stream, retention_bytes=-1, retention_ms=20_000, now_ns=now[0])
        == 0
    )
    assert log.reclaimable_segments(stream, retention_bytes=-1, retention_ms=-1, now_ns=now[0]) == 0


def test_the_segment_being_written_is_never_reclaimed(log: CxlLog) -> None:
    fill(log, "t", 1)
    stream = log.stream("t")
    assert log.reclaimable_segments(stream, retention_bytes=1, retention_ms=0, now_ns=2**62) == 0
    with pytest.raises(ValueError, match="still in use"):
        log.reclaim_oldest(stream)


def test_a_reused_segment_shows_nothing_of_its_last_owner(log: CxlLog, cxl_path: str) -> None:
    fill(log, "old", 3 * PER_UNIT)
    old = log.stream("old")
    gone = log.reclaim_oldest(old)
    # The freed unit is the first free one-unit block: a new small topic gets it.
    commit(log, "new", [10])
    new = log.stream("new")
    assert new.segments[0].unit == gone.unit
    with read_only_region(cxl_path) as region:
        g = read_geometry(region)
        walked = list(iter_batches(region, g, log.topics()["new"], 0))
    assert [h.num_msg for _, h in walked] == [1]  # not the old batches behind it


def test_a_reader_inside_a_reclaimed_and_reused_segment_is_told(log: CxlLog, cxl_path: str) -> None:
    fill(log, "old", 3 * PER_UNIT)
    with read_only_region(cxl_path) as region:
        g = read_geometry(region)
        position = WalkPosition()
        walk = iter_batches(region, g, log.topics()["old"], 0, position)
        next(walk)  # the reader stands in the first segment
        log.reclaim_oldest(log.stream("old"))
        commit(log, "new", [10])  # reuses it
        with pytest.raises(SegmentReclaimed):
            list(walk)


def test_reattach_keeps_the_start_and_the_batch_numbers(cxl_path: str) -> None:
    log = open_units(cxl_path)
    fill(log, "t", 60)
    stream = log.stream("t")
    log.reclaim_oldest(stream)
    log.reclaim_oldest(stream)
    before = (stream.start_offset, stream.first_batch, stream.batches, stream.next_offset)
    used = log.statistics().segments_used
    close_log(log)
    log = open_units(cxl_path)
    try:
        s = log.stream("t")
        assert (s.start_offset, s.first_batch, s.batches, s.next_offset) == before
        assert log.statistics().segments_used == used
        assert s.committed_batch(s.first_batch).first_offset == s.start_offset
        fill(log, "t", 1, first_seq=99)  # and it goes on
        assert s.batches == before[2] + 1
    finally:
        close_log(log)


@pytest.mark.parametrize("cut", ["after-the-start", "after-the-unlink"])
def test_a_reclaim_cut_short_is_finished_at_reattach(cxl_path: str, cut: str) -> None:
    log = open_units(cxl_path)
    fill(log, "t", 60)
    stream = log.stream("t")
    oldest = stream.segments[0]
    new_start = stream.index_first[oldest.batches]
    used = log.statistics().segments_used
    # The steps of reclaim_oldest, stopped where a kill -9 could stop them.
    STREAM_START.pack_into(
        log._mmap, stream.entry_offset + STREAM_START_OFFSET, new_start, oldest.batches
    )
    if cut == "after-the-unlink":
        log._unlink_first(stream)
    log.close()  # the process dies: no free, no in-memory update
    log = open_units(cxl_path)
    try:
        s = log.stream("t")
        assert (s.start_offset, s.first_batch, s.batches) == (new_start, oldest.batches, 60)
        assert s.segments[0].unit != oldest.unit
        assert log.statistics().segments_used == used - 1  # the segment is back in the region
        with open_log(cxl_path) as reader:
            assert next(m.offset for m in reader.messages("t")) == new_start
    finally:
        close_log(log)


def test_a_reader_whose_place_is_reclaimed_goes_on_from_the_new_start(
    log: CxlLog, cxl_path: str
) -> None:
    fill(log, "old", 3 * PER_UNIT)
    stream = log.stream("old")
    with open_log(cxl_path) as reader:
        messages = reader.messages("old")
        assert next(messages).offset == 0
        log.reclaim_oldest(stream)
        commit(log, "new", [10] * 3)  # reuses the unit the reader stood in
        rest = [m.offset for m in messages]
    # The batch it was in had been copied whole before the reclaim; the rest
    # of the old segment is gone, so it resumes at the first retained offset,
    # never with another topic's bytes.
    assert rest == list(range(1, 8)) + list(range(stream.start_offset, stream.next_offset))
    assert stream.start_offset == 8 * PER_UNIT


# -- retention in a running broker --------------------------------------------------------------


async def test_retention_by_bytes_keeps_a_small_region_taking_data(
    make_config: MakeConfig,
) -> None:
    """Ten times the region's size goes through; retention makes the room (when
    the region is full, before any error 4) and subscribers skip what it let go."""
    config = make_config(
        **{
            "cxl.size_mb": 4,
            "cxl.segment_mb": 1,
            "network.staging_pool_buffer_size_mb": 1,
            "network.max_batch_bytes": 256 * 1024,
            "topics.retention_bytes": 1 << 20,
        }
    )
    payloads = [payload_for(5, i, 1000) for i in range(40_000)]  # ~42 MiB of records
    with trio.fail_after(60):
        async with open_broker(config) as broker:
            async with open_publisher(
                "127.0.0.1", broker.port, "busy", client_id=5, batch_bytes=256 * 1024
            ) as pub:
                await pub.publish_many(payloads)  # every one acked, no error
            stream = broker.log.stream("busy")
            assert stream.next_offset == len(payloads)
            assert stream.start_offset > 0
            # Between passes the stream grows past the limit (up to what the
            # region holds); a pass brings it back to the limit and at most
            # one segment more.
            reclaim_stream(broker.log, stream, config.topics.settings_for("busy"), None)
            assert (1 << 20) <= stream.retained_bytes <= (1 << 20) + (1 << 20)
            assert broker.statistics().errors == {}
            async with open_subscriber("127.0.0.1", broker.port, "busy", start=0) as sub:
                got: list[Message] = []
                while len(got) < len(payloads) - stream.start_offset:
                    got.extend(await sub.receive_messages())
                assert sub.skipped == stream.start_offset
    assert [m.offset for m in got] == list(range(stream.start_offset, len(payloads)))
    assert [m.payload for m in got] == payloads[stream.start_offset :]


async def test_retention_by_age_on_the_mock_clock(
    make_config: MakeConfig, autojump_clock: trio.testing.MockClock
) -> None:
    config = make_config(
        **{
            "cxl.segment_mb": 2,
            "topics.retention_ms": 5000,
            "cxl.reclaim_interval_ms": 100.0,
            "network.idle_timeout_s": 0.0,
        }
    )
    async with trio.open_nursery() as nursery, memory_broker(config) as (broker, listener):
        broker.log.clock = lambda: int(trio.current_time() * 1e9)
        client = await open_client(listener, nursery)
        await client.send(rawclient.handshake("aging", client_id=7, ack=1))
        order = 0
        for seq in range(40):  # 40 x 64 KiB: several segments
            data, _ = rawclient.batch(seq, 7, order, 60, 1000)
            order += 60
            await client.send(data)
        await settle()
        stream = broker.log.stream("aging")
        assert stream.start_offset == 0
        segments = len(stream.segments)
        assert segments > 2
        await trio.sleep(4.9)  # younger than 5 s: kept
        assert stream.start_offset == 0
        data, _ = rawclient.batch(40, 7, order, 60, 1000)
        await client.send(data)
        await trio.sleep(0.5)  # now the first batches are over 5 s old
        assert stream.start_offset > 0
        assert len(stream.segments) < segments
        # The segment being written stays, whatever its age.
        await trio.sleep(60)
        assert len(stream.segments) >= 1
        assert stream.next_offset == order + 60
        await client.close()
