"""Retention survives ``kill -9`` at every step (multi-process).

A child process writes two topics into a small region and applies retention
all the time, so segments are reclaimed and recycled between the topics. It
is killed with SIGKILL at one step of a reclaim (``CxlLog.reclaim_oldest``)
or of a segment allocation (``CxlLog._take_segment``). It prints every batch
it committed (acknowledged) and every reclaim it starts before the step, so
this process knows what the region must still hold. Then a new
``CxlLog.open`` recovers the region, and the checks are:

* every acknowledged batch retention did not let go is there, byte for byte,
  with gap-free offsets from the stream's start; the start is the one the
  killed reclaim moved from, or to, depending on whether it was written;
* the segment map is consistent: each allocated segment is in exactly one
  chain, each chain segment is allocated, no unit is in two segments, free
  and used units add up;
* the streams go on: a new commit gets the next offset, and more retention
  runs without trouble.

Last, a real broker process with a tiny ``topics.retention_bytes`` in a
small region is killed mid-run several times while a publisher writes; the
no-loss checker counts what retention let go apart from what was lost.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import trio
from conftest import wait_until
from test_recovery import MAX_SIZE as BROKER_MAX_SIZE
from test_recovery import publish

from trio_embarcadero import open_subscriber
from trio_embarcadero.log import CxlLog, open_log
from trio_embarcadero.log.layout import parse_file_name, read_segment_header, segment_chain
from trio_embarcadero.log.segments import BODY
from trio_embarcadero.tools.noloss import (
    TOPIC,
    BrokerProcess,
    Client,
    clean_environment,
    encode_batch,
    log_start_offset,
    payload,
    verify,
    write_broker_config,
)
from trio_embarcadero.wire import BATCH_HEADER_SIZE, scan_records, unpack_batch_header

UNIT = 64 * 1024
MAX_SIZE = 2000
PER_BATCH = 8
TOPICS = {"a": 1, "b": 2}  # topic -> client id
#: The region: ~28 units of 64 KiB, segments up to 4 units; retention keeps
#: about 150 KiB a topic, so units are reclaimed and reused all the time.
REGION = {
    "size": 2 << 20,
    "segment_size": 4 * UNIT,
    "unit_size": UNIT,
    "max_topics": 4,
    "max_brokers": 2,
    "broker_id": 0,
    "prefault": False,
}
RETENTION_BYTES = 150 * 1024

# The child: open the region, write, apply retention, and die at the Nth time
# the chosen step is reached. argv: path, step, n, batches.
CHILD = r"""
import os, signal, sys
from trio_embarcadero.log import region as region_module
from trio_embarcadero.log.region import CxlLog
from trio_embarcadero.log.segments import BODY, SegmentMap
from trio_embarcadero.tools.noloss import encode_batch
from trio_embarcadero.wire import BATCH_HEADER_SIZE, scan_records, unpack_batch_header
import numpy as np

path, step, nth, batches = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
REGION, TOPICS, RETENTION, PER_BATCH, MAX_SIZE = eval(sys.argv[5])
seen = 0

def reached():
    global seen
    seen += 1
    if seen == nth:
        print("KILL", step, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

class Cut:
    # A struct of the region module whose pack_into dies before or after
    # writing, when called from the function named.
    def __init__(self, real, caller, after):
        self.real, self.caller, self.after = real, caller, after
    def __getattr__(self, name):
        return getattr(self.real, name)
    def pack_into(self, *args):
        ours = sys._getframe(1).f_code.co_name == self.caller
        if ours and not self.after:
            reached()
        self.real.pack_into(*args)
        if ours and self.after:
            reached()

def cut(name, caller, after=True):
    setattr(region_module, name, Cut(getattr(region_module, name), caller, after))

real_free, real_allocate = SegmentMap.free, SegmentMap.allocate

def free_head_only(self, unit):
    if seen + 1 == nth:
        self.words[unit] = 0  # a free cut short: the head gone, the bodies not yet
    reached()
    real_free(self, unit)

def free_then_die(self, unit):
    real_free(self, unit)
    reached()

def allocate_bodies_only(self, order, broker_id):
    if seen + 1 == nth:
        unit = self._find_free(order)
        self.words[unit + 1 : unit + (1 << order)] = BODY  # the head not yet
    reached()
    return real_allocate(self, order, broker_id)

def allocate_then_die(self, order, broker_id):
    unit = real_allocate(self, order, broker_id)
    if unit is not None:
        reached()
    return unit

steps = {
    "before-start": lambda: cut("STREAM_START", "_reclaim_locked", after=False),
    "after-start": lambda: cut("STREAM_START", "_reclaim_locked"),
    "after-unlink": lambda: cut("STREAM_SEGMENTS", "_unlink_first"),
    "mid-free": lambda: setattr(SegmentMap, "free", free_head_only),
    "after-free": lambda: setattr(SegmentMap, "free", free_then_die),
    "mid-allocate": lambda: setattr(SegmentMap, "allocate", allocate_bodies_only),
    "after-allocate": lambda: setattr(SegmentMap, "allocate", allocate_then_die),
    "after-header": lambda: cut("SEGMENT_HEADER", "_take_segment"),
    "after-link": lambda: cut("U32", "_take_segment"),
    "after-entry": lambda: cut("STREAM_SEGMENTS", "_take_segment"),
}
steps[step]()

log = CxlLog.open(path, reset=True, **REGION)
for k in range(batches):
    for topic, client in TOPICS.items():
        data = encode_batch(client, k, k * PER_BATCH, PER_BATCH, MAX_SIZE)
        header = unpack_batch_header(data[:BATCH_HEADER_SIZE])
        r = log.get_cxl_buffer(topic, header)
        r.payload[:] = np.frombuffer(data, dtype=np.uint8)[BATCH_HEADER_SIZE:]
        (done,) = log.complete(r, scan_records(r.payload, PER_BATCH))
        print("C", topic, done.first_offset, PER_BATCH, flush=True)
        stream = log.stream(topic)
        while log.reclaimable_segments(
            stream, retention_bytes=RETENTION, retention_ms=-1, now_ns=0
        ):
            gone = stream.segments[0]
            new = stream.index_first[gone.batches]
            print("R", topic, stream.start_offset, new, flush=True)
            log.reclaim_oldest(stream)
            print("D", topic, flush=True)
print("END", flush=True)
"""

RECLAIM_STEPS = ["before-start", "after-start", "after-unlink", "mid-free", "after-free"]
ALLOCATE_STEPS = ["mid-allocate", "after-allocate", "after-header", "after-link", "after-entry"]
BATCHES = 400


def run_child(path: str, step: str, nth: int) -> list[list[str]]:
    """Run the child until it kills itself; its output lines, split."""
    params = repr((REGION, TOPICS, RETENTION_BYTES, PER_BATCH, MAX_SIZE))
    done = subprocess.run(
        [sys.executable, "-c", CHILD, path, step, str(nth), str(BATCHES), params],
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_environment(),
        check=False,
    )
    lines = [line.split() for line in done.stdout.splitlines()]
    assert done.returncode == -9, (done.returncode, done.stderr[-3000:])
    assert lines[-1] == ["KILL", step]
    return lines[:-1]


def check_map(log: CxlLog) -> None:
    """Each allocated segment in exactly one chain, and the other way round."""
    g = log.geometry
    chained: list[int] = []
    for index in log.topics().values():
        for broker in range(g.max_brokers):
            for unit in segment_chain(log._mmap, g, index, broker):
                chained.append(unit)
                header = read_segment_header(log._mmap, g, unit)
                segment = log.map.segment_at(unit)
                assert header is not None, unit
                assert segment is not None, unit
                assert (header.topic, header.broker_id, header.order) == (
                    index,
                    broker,
                    segment.order,
                )
    assert len(chained) == len(set(chained)), "a segment in two chains"
    allocated = list(log.map.segments())
    assert sorted(chained) == [s.unit for s in allocated], "a segment lost or in no chain"
    owner = np.full(g.num_units, -1)
    for segment in allocated:
        span = owner[segment.unit : segment.unit + segment.units]
        assert (span == -1).all(), f"unit in two segments: {segment}"
        span[:] = segment.unit
    words = log.map.words
    assert ((words == BODY) == ((owner >= 0) & (owner != np.arange(g.num_units)))).all()
    assert (words[owner == -1] == 0).all()
    stats = log.map.statistics()
    assert stats.free + stats.used == g.num_units == stats.free + int((owner >= 0).sum())


def expected_starts(lines: list[list[str]], step: str) -> dict[str, int]:
    """Each topic's log-start offset after recovery, from the child's story."""
    starts = dict.fromkeys(TOPICS, 0)
    for i, line in enumerate(lines):
        if line[0] == "R":
            old, new = int(line[2]), int(line[3])
            # A reclaim cut short (no "D" after it) moved the start unless it
            # died before writing it.
            cut_short = i == len(lines) - 1
            starts[line[1]] = old if cut_short and step == "before-start" else new
    return starts


def check_region(path: str, lines: list[list[str]], step: str) -> None:
    ends = dict.fromkeys(TOPICS, 0)
    for line in lines:
        if line[0] == "C":
            assert int(line[2]) == ends[line[1]]
            ends[line[1]] += int(line[3])
    starts = expected_starts(lines, step)
    log = CxlLog.open(path, **REGION)  # type: ignore[arg-type]
    try:
        check_map(log)
        for topic in TOPICS:
            stream = log.stream(topic)
            assert (stream.start_offset, stream.next_offset) == (starts[topic], ends[topic])
            assert stream.batches - stream.first_batch == len(stream.index_first)
        with open_log(path) as reader:
            for topic, client in TOPICS.items():
                messages = list(reader.messages(topic))
                assert [m.offset for m in messages] == list(range(starts[topic], ends[topic]))
                for m in messages:
                    assert (m.client_id, m.client_order) == (client, m.offset)
                    assert m.payload == payload(client, m.offset, MAX_SIZE)
        # The streams go on: retention again, then a commit at the next offset.
        for topic, client in TOPICS.items():
            stream = log.stream(topic)
            while log.reclaimable_segments(
                stream, retention_bytes=RETENTION_BYTES, retention_ms=-1, now_ns=0
            ):
                log.reclaim_oldest(stream)
            first = commit_batch(log, topic, client, ends[topic])
            assert first == ends[topic]
        check_map(log)
    finally:
        gc.collect()
        log.close()


def commit_batch(log: CxlLog, topic: str, client: int, first: int) -> int:
    data = encode_batch(client, first // PER_BATCH, first, PER_BATCH, MAX_SIZE)
    r = log.get_cxl_buffer(topic, unpack_batch_header(data[:BATCH_HEADER_SIZE]))
    r.payload[:] = np.frombuffer(bytes(data[BATCH_HEADER_SIZE:]), dtype=np.uint8)
    (done,) = log.complete(r, scan_records(r.payload, PER_BATCH))
    return done.first_offset


@pytest.mark.parametrize("nth", [1, 9])
@pytest.mark.parametrize("step", RECLAIM_STEPS)
def test_kill_9_in_a_reclaim(cxl_path: str, step: str, nth: int) -> None:
    lines = run_child(cxl_path, step, nth)
    reclaims = [line for line in lines if line[0] == "R"]
    assert len(reclaims) == nth
    assert len([line for line in lines if line[0] == "D"]) == nth - 1
    check_region(cxl_path, lines, step)


@pytest.mark.parametrize("nth", [1, 2, 12])
@pytest.mark.parametrize("step", ALLOCATE_STEPS)
def test_kill_9_in_a_segment_allocation(cxl_path: str, step: str, nth: int) -> None:
    lines = run_child(cxl_path, step, nth)
    if nth == 12:
        # Late enough that the segment taken is one a reclaim gave back.
        assert any(line[0] == "D" for line in lines)
    check_region(cxl_path, lines, step)


# -- a real broker, killed while retention runs ----------------------------------------------


def small_region_config(
    tmp_path: Path, cxl_path: str, *, retention_bytes: int, storage: str = ""
) -> Path:
    """A 4 MiB region of 1 MiB segments, 256 KiB batches, and the retention given."""
    config = tmp_path / "broker.toml"
    write_broker_config(
        config,
        cxl_path=cxl_path,
        cxl_mb=4,
        segment_mb=1,
        extra=(
            f"max_batch_bytes = 262144\n\n[topics]\nretention_bytes = {retention_bytes}\n\n"
            + storage
        ),
    )
    return config


def moved_on(
    start_offset: Callable[[], int], gone: int, clients: list[Client]
) -> Callable[[], bool]:
    """A check of whether, since now, more than ``gone`` messages went (the
    start moved on) and every client got new acks."""
    start, acked = start_offset(), [c.acked for c in clients]

    def check() -> bool:
        new_acks = all(c.acked > a for c, a in zip(clients, acked, strict=True))
        return new_acks and start_offset() > start + gone

    return check


async def kill_while_publishing(
    nursery: trio.Nursery,
    config: Path,
    clients: list[Client],
    kills: int,
    progressed: Callable[[], Callable[[], bool]],
    *,
    ack: int = 1,
) -> tuple[BrokerProcess, int]:
    """Start a broker (reset), then ``kills`` times: publish from every
    client until ``progressed()``'s check passes, ``kill -9`` the broker and
    start it again, which must log no error. Returns it and its port."""
    broker = BrokerProcess(config)
    port = await broker.start(nursery, "--reset")
    for _ in range(kills):
        check = progressed()
        async with trio.open_nursery() as load:
            for client in clients:
                load.start_soon(partial(publish, port, client, ack=ack))
            await wait_until(check)
            assert await broker.kill() == -9
        port = await broker.start(nursery)
        started = broker.stderr.rsplit("--- start", 1)[1]
        assert " ERROR " not in started
        assert "Traceback" not in started
    return broker, port


async def test_kill_9_a_broker_while_retention_runs(tmp_path: Path, cxl_path: str) -> None:
    """A 4 MiB region and 256 KiB of retention: the region fills again and
    again, and every reservation that finds it full reclaims first. Kills land
    anywhere in that; each restart recovers without an error, and at the end
    every acked message from the log start on is there once."""
    config = small_region_config(tmp_path, cxl_path, retention_bytes=262144)
    clients = [Client(client_id=k) for k in (1, 2)]
    kills = 3
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            # Several regions' worth between kills, so retention ran.
            progressed = partial(moved_on, partial(log_start_offset, cxl_path), 40_000, clients)
            broker, port = await kill_while_publishing(nursery, config, clients, kills, progressed)
            for client in clients:  # the stream goes on after the last restart
                acked = client.acked
                await publish(port, client, batches=5)
                assert client.acked == acked + 5 * 20
            assert await broker.stop() == 0
    assert broker.internal_errors == 0
    report = verify(cxl_path, clients, BROKER_MAX_SIZE)
    assert report.problems == []
    assert report.lost == report.offset_errors == report.repeated_batches == 0
    assert report.reclaimed >= kills * 40_000
    assert 0 < report.acked_reclaimed < report.acked
    # What the log holds from its start on covers every acked message after
    # each client's first retained one.
    assert report.present >= report.acked - report.acked_reclaimed


def committed_messages(cxl_path: str) -> int:
    """The checker topic's next offset in the region."""
    with open_log(cxl_path) as reader:
        return reader.topic(TOPIC).streams[0].messages


def disk_start(storage: Path) -> int:
    """The first offset of the checker topic's disk log (0 while it has no file)."""
    firsts = [
        parsed[2]
        for name in os.listdir(storage)
        if (parsed := parse_file_name(name)) is not None and parsed[0] == TOPIC and parsed[2]
    ]
    return min(firsts, default=0)


async def test_kill_9_a_broker_while_retention_trims_its_disk_log(
    tmp_path: Path, cxl_path: str
) -> None:
    """With a disk log and ack 2, retention trims the disk tier (1 MiB files,
    2 MiB kept) and the 4 MiB region is a cache that fills again and again.
    Kills land anywhere in that; each restart reconciles the files and the
    region without an error, and a subscriber from 0 at the end gets, for
    each client, every acked message from the first one retained on, with
    the bytes it sent."""
    storage = tmp_path / "disk"
    config = small_region_config(
        tmp_path,
        cxl_path,
        retention_bytes=2097152,
        storage=f'[storage]\ndir = "{storage}"\nsync_interval_ms = 2.0\nsegment_mb = 1\n',
    )
    clients = [Client(client_id=k) for k in (1, 2)]
    kills = 3
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            # Several files trimmed between kills.
            progressed = partial(moved_on, partial(disk_start, storage), 20_000, clients)
            broker, port = await kill_while_publishing(
                nursery, config, clients, kills, progressed, ack=2
            )
            first = disk_start(storage)
            end = committed_messages(cxl_path)
            # (offset, client id, client order, payload) of every message read.
            read: list[tuple[int, int, int, bytes]] = []
            async with open_subscriber("127.0.0.1", port, TOPIC, start=0) as sub:
                async for message in sub:
                    read.append(
                        (
                            message.offset,
                            message.client_id,
                            message.client_order,
                            bytes(message.payload),
                        )
                    )
                    if message.offset == end - 1:
                        break
                skipped = sub.skipped
            assert await broker.stop() == 0
    assert broker.internal_errors == 0
    # The restarted broker's retention may still be trimming what the last
    # kill left on disk while the subscriber reads, so the start may move on
    # ahead of it: it skips what went (at least what had gone before it
    # began) and gets every message after the last gap.
    assert skipped >= first
    assert len(read) == end - skipped
    offsets = [offset for offset, *_ in read]
    gaps = [k for k in range(1, len(read)) if offsets[k] != offsets[k - 1] + 1]
    tail = read[gaps[-1] if gaps else 0 :]
    assert tail[0][0] >= first
    assert [offset for offset, *_ in tail] == list(range(tail[0][0], end))
    for client in clients:
        orders = {order for _, client_id, order, _ in tail if client_id == client.client_id}
        assert orders, "every client has messages retained"
        # From the first retained message on, every acked one is there.
        assert set(range(min(orders), client.acked)) <= orders
    for _, client_id, order, data in read:
        assert data == payload(client_id, order, BROKER_MAX_SIZE)
