"""With ``storage.dir`` the region is a cache of the disk log.

A region of four 1 MiB segments takes three times its size with no
retention key set: a full region drops its oldest segments once they are
durable on disk (a batch waits for the disk writer rather than failing), and
a subscriber from offset 0 gets every message once, in order, the old part
read from the disk log and the rest from the region. Real TCP.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from pathlib import Path

import pytest
import trio
from conftest import MakeConfig, wait_until
from memory import close_log
from rawclient import batch, handshake, parse_framed, payload_for
from tcpclient import connect
from test_cxl import commit, reserve

from trio_embarcadero import Message, open_broker, open_publisher, open_subscriber
from trio_embarcadero.broker.retention import reclaim_stream
from trio_embarcadero.cli import main
from trio_embarcadero.config import Config, config_to_toml
from trio_embarcadero.log import CxlLog, remove_region
from trio_embarcadero.log.layout import file_name, parse_file_name
from trio_embarcadero.log.topics import delete_topic_file
from trio_embarcadero.wire import BATCH_HEADER_SIZE, unpack_batch_header

COUNT = 12_000  # 1000-byte messages: about three times the region


def tiered_config(make_config: MakeConfig, tmp_path: Path, **more: object) -> Config:
    return make_config(
        **more,
        **{
            "cxl.size_mb": 4,
            "cxl.segment_mb": 1,
            "network.staging_pool_buffer_size_mb": 1,
            "network.max_batch_bytes": 256 * 1024,
            "storage.dir": str(tmp_path / "disk"),
            "storage.sync_interval_ms": 5.0,
        },
    )


async def receive(sub: object, count: int) -> list[Message]:
    got: list[Message] = []
    while len(got) < count:
        got.extend(await sub.receive_messages())  # type: ignore[attr-defined]
    return got


@pytest.mark.parametrize("ack", [1, 2])
async def test_a_region_with_a_disk_tier_takes_three_times_its_size_and_serves_it_all(
    make_config: MakeConfig, tmp_path: Path, ack: int
) -> None:
    payloads = [payload_for(5, i, 1000) for i in range(COUNT)]
    with trio.fail_after(60):
        async with open_broker(tiered_config(make_config, tmp_path)) as broker:
            async with open_publisher(
                "127.0.0.1", broker.port, "tier", client_id=5, ack=ack, batch_bytes=256 * 1024
            ) as pub:
                await pub.publish_many(payloads)  # every one acked, no error 4
            stats = broker.statistics()
            assert stats.errors == {}
            stream = broker.log.stream("tier")
            assert stream.next_offset == COUNT
            # The region dropped what the disk holds: the old part is disk-only.
            assert stream.start_offset > COUNT // 2
            assert stream.retained_bytes <= 4 << 20
            async with open_subscriber("127.0.0.1", broker.port, "tier", start=0) as sub:
                got = await receive(sub, COUNT)
                assert sub.skipped == 0
    assert [m.offset for m in got] == list(range(COUNT))
    assert [m.payload for m in got] == payloads


async def test_a_subscriber_from_the_disk_only_range_follows_into_new_commits(
    make_config: MakeConfig, tmp_path: Path
) -> None:
    payloads = [payload_for(6, i, 1000) for i in range(COUNT + 2000)]
    with trio.fail_after(60):
        async with open_broker(tiered_config(make_config, tmp_path)) as broker:
            async with open_publisher(
                "127.0.0.1", broker.port, "tier", client_id=6, batch_bytes=256 * 1024
            ) as pub:
                await pub.publish_many(payloads[:COUNT])
                stream = broker.log.stream("tier")
                start = stream.start_offset // 2 + 7  # inside a batch the region dropped
                assert start < stream.start_offset
                async with open_subscriber("127.0.0.1", broker.port, "tier", start=start) as sub:
                    got = await receive(sub, COUNT - start)
                    await pub.publish_many(payloads[COUNT:])  # new commits, after the drop
                    got += await receive(sub, len(payloads) - COUNT)
                    assert sub.skipped == 0
    assert [m.offset for m in got] == list(range(start, len(payloads)))
    assert [m.payload for m in got] == payloads[start:]


async def test_after_a_restart_the_disk_tier_is_read_again(
    make_config: MakeConfig, tmp_path: Path
) -> None:
    """The disk log's index is rebuilt from its file at start-up, and a
    region whose oldest batches only the disk holds is accepted."""
    config = tiered_config(make_config, tmp_path)
    payloads = [payload_for(7, i, 1000) for i in range(COUNT)]
    with trio.fail_after(60):
        async with open_broker(config) as broker:
            async with open_publisher(
                "127.0.0.1", broker.port, "tier", client_id=7, batch_bytes=256 * 1024
            ) as pub:
                await pub.publish_many(payloads)
            dropped = broker.log.stream("tier").start_offset
        async with open_broker(config) as broker:
            assert broker.log.stream("tier").start_offset == dropped > 0
            async with open_subscriber("127.0.0.1", broker.port, "tier", start=0) as sub:
                got = await receive(sub, COUNT)
                assert sub.skipped == 0
    assert [m.payload for m in got] == payloads


@pytest.mark.parametrize("ack", [1, 2])
async def test_a_lost_region_gets_the_newest_part_of_a_larger_disk_log_back(
    make_config: MakeConfig, tmp_path: Path, caplog: pytest.LogCaptureFixture, ack: int
) -> None:
    """A reboot emptied /dev/shm: the disk log holds three times what the
    region can. The broker starts, replays the newest batches that fit and
    keeps the rest on disk only; a subscriber from 0 gets every message
    once, and publishing goes on at the next offset."""
    config = tiered_config(make_config, tmp_path)
    payloads = [payload_for(8, i, 1000) for i in range(COUNT + 500)]
    with trio.fail_after(90):
        async with open_broker(config) as broker:
            async with open_publisher(
                "127.0.0.1", broker.port, "tier", client_id=8, ack=ack, batch_bytes=256 * 1024
            ) as pub:
                await pub.publish_many(payloads[:COUNT])
            batches = broker.log.stream("tier").batches
        remove_region(config.cxl.path)  # the file and its lock, as a reboot would
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="trio_embarcadero.log.disk"):
            async with open_broker(config) as broker:
                stream = broker.log.stream("tier")
                # Only the newest part is back in the region; the rest is on disk only.
                assert 0 < stream.first_batch < batches == stream.batches
                assert 0 < stream.start_offset < stream.next_offset == COUNT
                assert stream.retained_bytes <= (4 << 20) // 2
                found = re.search(
                    r"replayed (\d+) batch\(es\) of 'tier' .*; (\d+) batch\(es\) "
                    r"\(offsets 0\.\.(\d+)\) stay on disk only",
                    caplog.text,
                )
                assert found is not None, caplog.text
                replayed, disk_only, last = map(int, found.groups())
                assert (replayed, disk_only) == (batches - stream.first_batch, stream.first_batch)
                assert last == stream.start_offset - 1
                async with open_subscriber("127.0.0.1", broker.port, "tier", start=0) as sub:
                    got = await receive(sub, COUNT)
                    async with open_publisher(
                        "127.0.0.1",
                        broker.port,
                        "tier",
                        client_id=8,
                        ack=ack,
                        batch_bytes=256 * 1024,
                    ) as pub:
                        await pub.publish_many(payloads[COUNT:])
                    got += await receive(sub, len(payloads) - COUNT)
                    assert sub.skipped == 0
                assert broker.statistics().errors == {}
    assert [m.offset for m in got] == list(range(len(payloads)))
    assert [m.payload for m in got] == payloads


def open_small(path: str) -> CxlLog:
    return CxlLog.open(
        path, size=4 << 20, segment_size=1 << 20, max_topics=4, max_brokers=1, broker_id=0
    )


def test_a_stream_begun_at_a_later_batch_keeps_its_start_across_restarts(cxl_path: str) -> None:
    """The log core's side of a partial replay: a stream begun at (batch 5,
    offset 100) commits there, and a restart before its first batch, or
    after a batch was reserved but never committed, leaves it there (no
    offset below 100 is handed out again)."""
    log = open_small(cxl_path)
    log.begin_at(log.stream("t"), 5, 100)
    close_log(log)
    log = open_small(cxl_path)  # nothing written yet: no segment linked
    stream = log.stream("t")
    assert (stream.first_batch, stream.batches, stream.start_offset, stream.next_offset) == (
        5,
        5,
        100,
        100,
    )
    reserve(log, "t", [10, 10])  # a segment is linked; the batch never commits
    close_log(log)
    log = open_small(cxl_path)
    stream = log.stream("t")
    assert (stream.first_batch, stream.start_offset, stream.next_offset) == (5, 100, 100)
    assert commit(log, "t", [10, 10, 10])[0] == 100
    assert stream.committed_batch(5).first_offset == 100
    with pytest.raises(ValueError, match="already holds batches"):
        log.begin_at(stream, 9, 200)
    close_log(log)
    log = open_small(cxl_path)
    stream = log.stream("t")
    assert (stream.first_batch, stream.batches, stream.start_offset, stream.next_offset) == (
        5,
        6,
        100,
        103,
    )
    close_log(log)


def disk_offsets(path: Path) -> list[tuple[int, int]]:
    """(first logical offset, records) of every batch in a disk log file."""
    data = path.read_bytes()
    found = []
    at = 0
    while at < len(data):
        header = unpack_batch_header(data[at : at + BATCH_HEADER_SIZE])
        found.append((header.start_logical_offset, header.num_msg))
        at += BATCH_HEADER_SIZE + header.total_size
    assert at == len(data)
    return found


async def test_a_disk_log_added_to_a_trimmed_stream_begins_at_its_first_retained_batch(
    make_config: MakeConfig, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A broker ran without ``storage.dir`` and retention trimmed its stream;
    started with one, it starts, its new file begins at the region's first
    retained batch, ack-2 publishes land in it in order, and the next start
    reconciles the file with the region without complaint."""
    sizes = {
        "cxl.size_mb": 4,
        "cxl.segment_mb": 1,
        "network.staging_pool_buffer_size_mb": 1,
        "network.max_batch_bytes": 256 * 1024,
        "topics.retention_bytes": 1 << 20,
    }
    with_disk = {"storage.dir": str(tmp_path / "disk"), "storage.sync_interval_ms": 5.0}
    payloads = [payload_for(9, i, 1000) for i in range(COUNT + 2000)]
    with trio.fail_after(90):
        async with open_broker(make_config(**sizes)) as broker:
            async with open_publisher(
                "127.0.0.1",
                broker.port,
                "late",
                client_id=9,
                idempotent=False,
                batch_bytes=256 * 1024,
            ) as pub:
                await pub.publish_many(payloads[:COUNT])
            stream = broker.log.stream("late")
            first_batch, start = stream.first_batch, stream.start_offset
            assert first_batch > 0  # retention trimmed it
            assert start > 0
        config = make_config(**sizes, **with_disk)
        async with open_broker(config) as broker:
            stream = broker.log.stream("late")
            assert (stream.first_batch, stream.start_offset) == (first_batch, start)
            async with open_publisher(
                "127.0.0.1",
                broker.port,
                "late",
                client_id=9,
                idempotent=False,
                ack=2,
                batch_bytes=256 * 1024,
            ) as pub:
                await pub.publish_many(payloads[COUNT:])  # every one acked at level 2
            assert broker.statistics().errors == {}
            assert broker.log.stream("late").next_offset == len(payloads)
        file = tmp_path / "disk" / file_name("late", 0, start)
        on_disk = disk_offsets(file)
        # The file begins where the region did, and follows on batch by batch.
        assert on_disk[0][0] == start
        assert [first for first, _ in on_disk[1:]] == [f + n for f, n in on_disk[:-1]]
        assert sum(n for _, n in on_disk) == len(payloads) - start
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            async with open_broker(config) as broker:
                stream = broker.log.stream("late")
                assert stream.next_offset == len(payloads)
                first_retained = stream.start_offset
                async with open_subscriber("127.0.0.1", broker.port, "late", start=0) as sub:
                    got = await receive(sub, len(payloads) - start)
                    # What retention dropped before the disk log began is skipped;
                    # the rest comes from the disk log and the region.
                    assert sub.skipped == start
                assert broker.statistics().errors == {}
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
        assert disk_offsets(file) == on_disk
        assert first_retained >= start
    assert [m.offset for m in got] == list(range(start, len(payloads)))
    assert [m.payload for m in got] == payloads[start:]


# -- retention trims the disk tier ----------------------------------------------------------


async def test_retention_trims_the_disk_tier_and_the_region_follows(
    make_config: MakeConfig,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """With a disk log, ``retention_bytes`` is what the disk keeps: the
    retention task removes the oldest whole files while the rest holds the
    limit, the region lets go of what lies below the disk's new start, and a
    subscriber from 0 skips to it and gets the rest once, in order, also
    after a restart."""
    config = make_config(
        **{
            "cxl.size_mb": 4,
            "cxl.segment_mb": 1,
            "cxl.reclaim_interval_ms": 20.0,
            "network.staging_pool_buffer_size_mb": 1,
            "network.max_batch_bytes": 256 * 1024,
            "storage.dir": str(tmp_path / "disk"),
            "storage.sync_interval_ms": 5.0,
            "storage.segment_mb": 1,
            "topics.retention_bytes": 2 << 20,
        }
    )
    payloads = [payload_for(4, i, 1000) for i in range(COUNT)]
    with trio.fail_after(90):
        with caplog.at_level(logging.INFO, logger="trio_embarcadero.broker.retention"):
            async with open_broker(config) as broker:
                async with open_publisher(
                    "127.0.0.1", broker.port, "kept", client_id=4, ack=2, batch_bytes=256 * 1024
                ) as pub:
                    await pub.publish_many(payloads)
                disk = broker.disk
                assert disk is not None
                # Retention runs every 20 ms; wait for the pass after the last sync.
                await wait_until(lambda: len(disk_files(tmp_path / "disk", "kept")) <= 3)
                start = disk.first_offset("kept")
                assert start is not None
                assert start > 0
                stream = broker.log.stream("kept")
                # At its next pass the region lets go of every segment below the
                # disk's start: what stays of it begins in its first segment.
                retention = config.topics.settings_for("kept")
                reclaim_stream(broker.log, stream, retention, broker.durability)
                first_segment = stream.segments[0].batches
                assert stream.index_first[first_segment] > start
                stats = broker.statistics()
                assert stats.errors == {}
                assert stats.disk is not None
                assert stats.disk.files_trimmed >= 8
                async with open_subscriber("127.0.0.1", broker.port, "kept", start=0) as sub:
                    got = await receive(sub, COUNT - start)
                    assert sub.skipped == start
        assert "disk log file(s) removed; first retained offset" in caplog.text
        sizes = [size for _, size in disk_files(tmp_path / "disk", "kept")]
        # Kafka's rule: what remains holds the limit, and would not without the oldest.
        assert sum(sizes) >= 2 << 20 > sum(sizes[1:])
        assert disk_files(tmp_path / "disk", "kept")[0][0] == start
        # `topics` shows where the stream begins in all, and what the disk holds.
        config_file = tmp_path / "broker.toml"
        config_file.write_text(config_to_toml(config))
        capsys.readouterr()
        assert main(["topics", "--config", str(config_file)]) == 0
        rows = [row.split() for row in capsys.readouterr().out.splitlines()]
        assert rows[0][6:] == ["START", "IN-REGION", "DISK-FILES", "DISK-BYTES"]
        (row,) = rows[1:]
        assert row[:3] == ["kept", "0", "0"]  # topic, order, broker
        assert int(row[6]) == start
        assert row[8:] == [str(len(sizes)), str(sum(sizes))]
        async with open_broker(config) as broker:
            async with open_subscriber("127.0.0.1", broker.port, "kept", start=0) as sub:
                again = await receive(sub, COUNT - start)
                assert sub.skipped == start
    assert [m.offset for m in got] == list(range(start, COUNT))
    assert [m.payload for m in got] == payloads[start:]
    assert [m.payload for m in again] == payloads[start:]


def disk_files(directory: Path, topic: str) -> list[tuple[int, int]]:
    """(first offset, size) of each of ``topic``'s disk log files, in order."""
    found = []
    for path in sorted(directory.iterdir()):
        parsed = parse_file_name(path.name)
        if parsed is not None and parsed[0] == topic and parsed[2] is not None:
            found.append((parsed[2], path.stat().st_size))
    return found


async def test_a_deleted_topic_leaves_no_file_open(make_config: MakeConfig, tmp_path: Path) -> None:
    """The writer lets go of a deleted topic's files (renamed aside) when the
    name is created again, instead of keeping their descriptors for good."""
    config = tiered_config(make_config, tmp_path)

    def open_aside() -> list[str]:
        fds = Path("/proc/self/fd")
        targets = []
        for fd in fds.iterdir():
            with contextlib.suppress(OSError):
                targets.append(os.readlink(fd))
        return [t for t in targets if ".deleted-" in t]

    payloads = [payload_for(3, i, 1000) for i in range(600)]
    with trio.fail_after(60):
        async with open_broker(config) as broker:
            for _ in range(3):
                async with open_publisher(
                    "127.0.0.1", broker.port, "again", client_id=3, ack=2, batch_bytes=256 * 1024
                ) as pub:
                    await pub.publish_many(payloads)
                deleted = delete_topic_file(config.cxl.path, "again", config.storage.dir)
                assert deleted.renamed
            async with open_publisher(
                "127.0.0.1", broker.port, "again", client_id=3, ack=2, batch_bytes=256 * 1024
            ) as pub:
                await pub.publish_many(payloads)
            assert open_aside() == []
            assert broker.statistics().errors == {}


async def test_an_order_5_streams_disk_tier_is_sent_ordered_behind_batch_metadata(
    make_config: MakeConfig, tmp_path: Path
) -> None:
    """client_req 1 on an order-5 topic reads this broker's stream; the part
    the region dropped comes from the disk log exactly as the region would
    send it: each batch behind its BatchMetadata, records with their total
    orders (before, the disk part came as bare records)."""
    config = tiered_config(make_config, tmp_path, **{"topics.order": 5})
    payloads = [payload_for(8, i, 1000) for i in range(COUNT)]
    with trio.fail_after(60):
        async with open_broker(config) as broker:
            async with open_publisher(
                "127.0.0.1", broker.port, "tier5", client_id=8, batch_bytes=256 * 1024
            ) as pub:
                await pub.publish_many(payloads)
            stream = broker.log.stream("tier5")
            assert stream.start_offset > COUNT // 2  # the old part is disk-only
            start = stream.start_offset // 2 + 7  # inside a batch the region dropped
            async with await connect(broker.port) as sub:
                await sub.send_all(handshake("tier5", client_id=99, ack=0, req=1, last_addr=start))
                data = bytearray()
                frames: list[tuple[int, int, list[tuple[int, int, int]]]] = []
                while sum(count for _, count, _ in frames) < COUNT - start:
                    data += await sub.receive_some(1 << 20)
                    frames = whole_frames(data)
    # With one broker and one connection, total order is logical offset.
    assert frames[0][:2] == (start, frames[0][1])
    records = [record for _, _, rs in frames for record in rs]
    assert [(t, c, o) for t, c, o in records] == [(i, 8, i) for i in range(start, COUNT)]
    for first, count, rs in frames:
        assert [t for t, _, _ in rs] == list(range(first, first + count))


def whole_frames(data: bytearray) -> list[tuple[int, int, list[tuple[int, int, int]]]]:
    """The whole ``BatchMetadata`` frames at the front of ``data``, as
    test_ordering's ``parse_ordered`` reads them."""
    frames = parse_framed(data)[0]
    return [(first, count, [r[1:] for r in records]) for first, count, records in frames]


async def test_an_order_5_stream_goes_on_from_the_ordered_index_at_the_hand_off(
    make_config: MakeConfig, tmp_path: Path
) -> None:
    """client_req 1 on an order-5 topic from offset 0: the part only the disk
    holds comes in stream order, with session A's batch 2 (ordered after its
    batch 1, which the region still holds); from the region's start on, the
    ordered index in total order, with session B's batch 2 after the later
    plain batch (before, the region part came in stream order too). Every
    offset once: A2 is not sent again from the index, A1 not from the disk."""
    config = tiered_config(make_config, tmp_path, **{"topics.order": 5})

    def session_hello(client_id: int) -> bytes:
        return handshake("hand", client_id=client_id, ack=1, req=2, last_addr=client_id << 8)

    def small(seq: int, client_id: int) -> bytes:
        return batch(seq, client_id, 10 * seq, 3, 100)[0]

    plain_seq = 0

    def plain() -> bytes:
        nonlocal plain_seq
        plain_seq += 1
        return batch(plain_seq - 1, 3, 10 * (plain_seq - 1), 10, 1000)[0]

    with trio.fail_after(20):
        async with open_broker(config) as broker:
            async with (
                await connect(broker.port) as a,
                await connect(broker.port) as b,
                await connect(broker.port) as p,
            ):
                await p.send_all(handshake("hand", client_id=3, ack=0))
                await a.send_all(session_hello(7) + small(0, 7) + small(2, 7))
                await wait_until(lambda: broker.log.existing_stream("hand") is not None)
                stream = broker.log.stream("hand")
                await wait_until(lambda: stream.next_offset == 6)
                for _ in range(8):  # past the stream's first segment (64 KiB)
                    await p.send_all(plain())
                await wait_until(lambda: stream.next_offset == 86)
                await a.send_all(small(1, 7))  # A1, then A2 is ordered
                await b.send_all(session_hello(8) + small(0, 8) + small(2, 8))
                await wait_until(lambda: stream.next_offset == 95)
                await p.send_all(plain())
                await wait_until(lambda: stream.next_offset == 105)
                await b.send_all(small(1, 8))  # B1, then B2 is ordered
                disk = broker.durability.disk  # type: ignore[union-attr]
                await wait_until(
                    lambda: stream.next_offset == 108 and disk.durable_batches(stream) == 15
                )
                # The region lets its first segment go (the disk holds it).
                assert broker.log.reclaim_oldest(stream) is not None
                region_start = stream.start_offset
                assert 6 < region_start <= 86 - 10
                async with await connect(broker.port) as sub:
                    await sub.send_all(handshake("hand", client_id=99, ack=0, req=1))
                    data = bytearray()
                    frames: list[tuple[int, int, list[tuple[int, int, int, int]]]] = []
                    while sum(count for _, count, _ in frames) < 108:
                        data += await sub.receive_some(1 << 20)
                        frames = offset_frames(data)
    firsts = [rs[0][0] for _, _, rs in frames]
    offsets = sorted(o for _, _, rs in frames for o, _, _, _ in rs)
    assert offsets == list(range(108))  # each once
    on_disk = firsts[: sum(first < region_start for first in firsts)]
    assert on_disk == sorted(on_disk)  # stream order, A2 (3) in it
    assert on_disk[:2] == [0, 3]
    from_index = frames[len(on_disk) :]
    assert all(rs[0][0] >= region_start for _, _, rs in from_index)
    totals = [t for _, _, rs in from_index for _, t, _, _ in rs]
    assert totals == sorted(set(totals))  # total order
    # B2 (offsets 92..94) after the plain batch and B1, committed behind it.
    assert [rs[0][0] for _, _, rs in from_index[-3:]] == [95, 105, 92]


def offset_frames(data: bytearray) -> list[tuple[int, int, list[tuple[int, int, int, int]]]]:
    """As :func:`whole_frames`, each record as (logical offset, total
    order, client id, client order)."""
    return parse_framed(data)[0]
