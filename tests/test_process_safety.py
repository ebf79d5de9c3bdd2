"""One broker process per (log, broker id); bind before touching the log; commits and readers
that notice another writer.

* Multi-process: a second ``serve`` with the same CXL file and broker id, on another port or
  with ``--reset``, exits 1 naming the file, the id and the pid that serves it, and changes
  nothing: the first keeps serving and everything it acked is intact. One on the same port
  fails on the port first. Other broker ids share a region, but a ``--reset`` while any of
  them runs, or a second broker on a shared disk log directory, is refused.
* In-process: the same locks between two handles of one process; the commit that finds its
  batch changed by another process refuses (no overwrite, no ack, the broker stops); the
  reader raises on an offset gap instead of skipping it.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import re
import struct
import sys
import time
from pathlib import Path

import pytest
import trio
from conftest import MakeConfig
from memory import close_log, memory_broker, open_client, open_small_log, settle, walk_file
from rawclient import batch, handshake
from test_cxl import commit, reserve

from trio_embarcadero import open_broker, open_publisher
from trio_embarcadero.errors import AlreadyServedError, LayoutError
from trio_embarcadero.log import open_log, remove_region
from trio_embarcadero.log.layout import (
    BATCH_ABANDONED,
    BATCH_COMMITTED,
    BATCH_RESERVED,
    BROKER_TABLE_ENTRIES,
    LEASE_OFFSET,
    LEASE_SIZE,
    member_offset,
    read_geometry,
)
from trio_embarcadero.log.ownership import lock_holders
from trio_embarcadero.log.topics import attached_publishers
from trio_embarcadero.tools.noloss import BrokerProcess, clean_environment, write_broker_config
from trio_embarcadero.wire import BATCH_HEADER_SIZE, BH_BATCH_COMPLETE, scan_records

TIMEOUT = 30
TOPIC = "safety"


def payload(index: int) -> bytes:
    return f"message {index:06d} ".encode() * (1 + index % 5)


async def publish(port: int, first: int, count: int, *, topic: str = TOPIC) -> int:
    """Publish messages ``first .. first+count-1`` at ack level 2; returns how many were acked."""
    async with open_publisher("127.0.0.1", port, topic, ack=2) as pub:
        await pub.publish_many(payload(i) for i in range(first, first + count))
        await pub.flush()
        return pub.acked


def messages(cxl_path: str, topic: str = TOPIC, broker_id: int = 0) -> list[tuple[int, bytes]]:
    with open_log(cxl_path) as log:
        return [(m.offset, bytes(m.payload)) for m in log.messages(topic, broker_id)]


def expected(count: int) -> list[tuple[int, bytes]]:
    return [(i, payload(i)) for i in range(count)]


def wait_detached(cxl_path: str) -> None:
    """Wait until no publish session is attached in the region: a broker
    counts its sessions there, and a session ends just after its client has
    its last ack (the count is part of the bytes a snapshot compares)."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        with open(cxl_path, "rb") as f:
            region = f.read()
        g = read_geometry(region)
        if not any(
            attached_publishers(region, g, t, b)
            for t in range(g.max_topics)
            for b in range(g.max_brokers)
        ):
            return
        assert time.monotonic() < deadline, "publish sessions still attached"
        time.sleep(0.01)


def without_heartbeats(region: bytes) -> bytes:
    """A CXL file's bytes with every broker's heartbeat (and the sequence word
    written around it) and the sequencer lease zeroed: running brokers renew
    those all the time (and a broker takes the lease soon after it listens);
    the rest of their entries (state, pid, address) must hold still."""
    data = bytearray(region)
    for broker_id in range(BROKER_TABLE_ENTRIES):
        entry = member_offset(broker_id)
        data[entry : entry + 4] = bytes(4)  # the sequence word
        data[entry + 24 : entry + 40] = bytes(16)  # heartbeat time and count
    data[LEASE_OFFSET : LEASE_OFFSET + LEASE_SIZE] = bytes(LEASE_SIZE)
    return bytes(data)


def snapshot(*paths: str, wait: bool = True) -> dict[str, tuple[int, str]]:
    """(inode, sha256) of every file at or under ``paths``, the first being
    a CXL file (hashed without heartbeats), once its publish sessions have
    ended (unless not ``wait``)."""
    if wait:
        wait_detached(paths[0])
    files: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            files += [os.path.join(root, n) for root, _, names in os.walk(path) for n in names]
        else:
            files.append(path)
    out = {}
    for name in sorted(files):
        with open(name, "rb") as f:
            data = f.read()
            if name == paths[0]:
                data = without_heartbeats(data)
            out[name] = (os.fstat(f.fileno()).st_ino, hashlib.sha256(data).hexdigest())
    return out


def exists(path: str) -> bool:
    return os.path.exists(path)


def config_file(tmp_path: Path, cxl_path: str, storage_dir: str, name: str = "broker.toml") -> str:
    path = tmp_path / name
    write_broker_config(path, cxl_path=cxl_path, cxl_mb=16, storage_dir=storage_dir)
    return str(path)


async def serve_to_exit(config: str, *args: str) -> tuple[int, list[str]]:
    """Run ``serve`` that is expected to give up; its exit status and stderr lines."""
    with trio.fail_after(15):  # a broker that starts serving instead fails the test here
        result = await trio.run_process(
            [sys.executable, "-m", "trio_embarcadero", "serve", "--config", config, *args],
            stdin=b"",
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=clean_environment(),
        )
    return result.returncode, result.stderr.decode().splitlines()


# -- two processes ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # The config's port 0 gives the second broker another port than the first.
        ([], "{cxl} broker 0 is already served by pid {pid}: stop that broker first"),
        (["--reset"], "{cxl} broker 0 is already served by pid {pid}: stop that broker first"),
        (["--port", "{port}"], "cannot listen on 127.0.0.1:{port}: address already in use"),
    ],
    ids=["another-port", "reset", "same-port"],
)
async def test_a_second_broker_with_the_same_id_changes_nothing(
    tmp_path: Path, cxl_path: str, args: list[str], message: str
) -> None:
    storage = str(tmp_path / "disk")
    config = config_file(tmp_path, cxl_path, storage)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            first = BrokerProcess(config)
            port = await first.start(nursery)
            assert first.process is not None
            assert await publish(port, 0, 100) == 100  # ack 2: in the region and on disk
            before = snapshot(cxl_path, storage)

            code, lines = await serve_to_exit(config, *(a.format(port=port) for a in args))
            assert code == 1, lines
            assert len(lines) == 1, lines  # one line, no traceback
            assert message.format(cxl=cxl_path, pid=first.process.pid, port=port) in lines[0]
            # No unlink, no recovery, no replay: every byte and inode as it was.
            assert snapshot(cxl_path, storage) == before

            # The first broker never noticed: it goes on serving and acking.
            assert await publish(port, 100, 50) == 50
            assert await first.stop() == 0
    assert messages(cxl_path) == expected(150)


async def test_other_ids_share_a_region_but_not_a_reset_or_a_disk_log(
    tmp_path: Path, cxl_path: str
) -> None:
    storage = str(tmp_path / "disk")
    config = config_file(tmp_path, cxl_path, storage)
    other_cxl = f"{cxl_path}-other"
    try:
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                zero, one = BrokerProcess(config), BrokerProcess(config)
                ports = [await zero.start(nursery), await one.start(nursery, "--broker-id", "1")]
                assert zero.process is not None
                assert one.process is not None
                pids = {0: zero.process.pid, 1: one.process.pid}
                for port in ports:
                    assert await publish(port, 0, 40) == 40
                before = snapshot(cxl_path, storage)

                # A reset discards every broker's streams: refused while any of them runs.
                code, lines = await serve_to_exit(config, "--broker-id", "2", "--reset")
                assert code == 1, lines
                found = re.search(
                    rf"{re.escape(cxl_path)} broker ([01]) is already served by pid (\d+): "
                    r"--reset would discard its streams too",
                    lines[-1],
                )
                assert found is not None, lines
                assert pids[int(found.group(1))] == int(found.group(2))

                # Another CXL file but the same disk log directory and id: refused too,
                # before the other CXL file is even created.
                other = config_file(tmp_path, other_cxl, storage, "other.toml")
                code, lines = await serve_to_exit(other)
                assert code == 1, lines
                assert f"{storage} broker 0 is already served by pid {pids[0]}" in lines[-1]
                assert not exists(other_cxl)

                assert snapshot(cxl_path, storage) == before
                assert await zero.stop() == 0
                assert await one.stop() == 0
    finally:
        remove_region(other_cxl)
    assert messages(cxl_path, broker_id=0) == expected(40)
    assert messages(cxl_path, broker_id=1) == expected(40)


# -- two handles in one process -----------------------------------------------------------------


def test_a_second_handle_with_the_same_id_is_refused_before_recovery(cxl_path: str) -> None:
    log = open_small_log(cxl_path)
    try:
        commit(log, "a", [10, 10])
        reserve(log, "a", [20], seq=1)  # in flight: a recovery would abandon it
        inode = os.stat(cxl_path).st_ino
        for reset in (False, True):
            with pytest.raises(AlreadyServedError) as info:
                open_small_log(cxl_path, reset=reset)
            assert (info.value.path, info.value.broker_id, info.value.pid) == (
                cxl_path,
                0,
                os.getpid(),
            )
        assert [h.batch_complete for h in walk_file(cxl_path)] == [1, 0]
        assert os.stat(cxl_path).st_ino == inode
        other = open_small_log(cxl_path, broker_id=1)  # another id shares the region
    finally:
        log.close()
    try:
        # Broker 0's id is free again, but a reset would discard broker 1's streams.
        with pytest.raises(AlreadyServedError, match=r"broker 1 is .* --reset would discard"):
            open_small_log(cxl_path, reset=True)
        assert os.stat(cxl_path).st_ino == inode
        # The next owner of id 0 recovers: its in-flight batch is abandoned.
        open_small_log(cxl_path).close()
        assert [h.batch_complete for h in walk_file(cxl_path)] == [1, 2]
    finally:
        other.close()


@pytest.mark.parametrize("broker_id", [0, 1])
def test_a_reset_keeps_its_own_broker_ids_lock(cxl_path: str, broker_id: int) -> None:
    # After recreating the region a reset lets the other ids in again, and
    # keeps its own: readers see it served, a second handle is refused.
    log = open_small_log(cxl_path, broker_id=broker_id, reset=True)
    try:
        assert lock_holders(cxl_path) == {broker_id: os.getpid()}
        with pytest.raises(AlreadyServedError):
            open_small_log(cxl_path, broker_id=broker_id)
        open_small_log(cxl_path, broker_id=1 - broker_id).close()
    finally:
        log.close()


async def test_two_embedded_brokers_on_one_log(make_config: MakeConfig, tmp_path: Path) -> None:
    config = make_config(**{"storage.dir": str(tmp_path / "disk")})
    with trio.fail_after(10):
        async with open_broker(config) as broker:
            with pytest.raises(AlreadyServedError) as info:
                async with open_broker(config):
                    pass  # pragma: no cover - refused
            assert info.value.path == config.cxl.path
            other = make_config(
                **{"cxl.path": f"{config.cxl.path}-b", "storage.dir": str(tmp_path / "disk")}
            )
            try:
                with pytest.raises(AlreadyServedError) as info:
                    async with open_broker(other):
                        pass  # pragma: no cover - refused
                assert info.value.path == str(tmp_path / "disk")
                assert not exists(other.cxl.path)
            finally:
                remove_region(other.cxl.path)
            assert await publish(broker.port, 0, 10) == 10


# -- the commit checks its batch is still reserved ------------------------------------------------


def set_state(path: str, header_offset: int, state: int) -> None:
    """Write a batch's state word through a mapping of our own, as another process would."""
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as region:
        struct.pack_into("<I", region, header_offset + BH_BATCH_COMPLETE, state)


def test_a_commit_refuses_a_batch_another_process_changed(cxl_path: str) -> None:
    log = open_small_log(cxl_path)
    commit(log, "a", [10] * 3)
    taken = reserve(log, "a", [10] * 4, seq=1)
    behind = reserve(log, "a", [10] * 5, seq=2)
    assert log.complete(behind, scan_records(behind.payload, 5)) == []  # waits for `taken`
    # Another process's recovery marks our in-flight batch abandoned; a reader may
    # already have walked past it.
    set_state(cxl_path, taken.header_offset, BATCH_ABANDONED)
    with pytest.raises(LayoutError, match=r"is no longer reserved.*another process"):
        log.complete(taken, scan_records(taken.payload, 4))
    # Nothing overwritten, nothing committed, nothing returned to ack.
    assert [h.batch_complete for h in walk_file(cxl_path)] == [1, 2, 0]
    assert not taken.resolved
    assert not behind.resolved
    assert log.stream("a").next_offset == 3
    # The handle writes nothing more.
    with pytest.raises(LayoutError, match="no longer reserved"):
        reserve(log, "a", [10], seq=3)
    assert log.abandon(behind) == []
    assert [h.batch_complete for h in walk_file(cxl_path)] == [1, 2, 0]
    del taken, behind
    close_log(log)


async def test_a_broker_whose_batch_another_process_changed_stops_without_acking(
    make_config: MakeConfig, cxl_path: str, autojump_clock: trio.testing.MockClock
) -> None:
    config = make_config(
        **{
            "network.use_nonblocking": False,  # reserve, then receive
            "network.payload_stall_timeout_s": 60.0,  # the payload waits for us below
        }
    )
    first, _ = batch(0, 5, 0, 10, 100)  # creates the topic (a new topic's batch is received aside)
    data, _ = batch(1, 5, 10, 10, 100)
    with trio.fail_after(60), pytest.RaisesGroup(LayoutError, flatten_subgroups=True):
        async with memory_broker(config) as (broker, listener), trio.open_nursery() as nursery:
            client = await open_client(listener, nursery)
            await client.send(handshake("t", client_id=5) + first)
            await settle()
            assert client.acks()[1] == [10]
            await client.send(data[:BATCH_HEADER_SIZE])
            await settle()  # its log space is reserved, the payload not yet here
            (_, (offset, header)) = broker.log.walk(broker.log.topics()["t"], 0)
            assert header.batch_complete == BATCH_RESERVED
            set_state(cxl_path, offset, BATCH_ABANDONED)
            await client.send(data[BATCH_HEADER_SIZE:])
            await trio.sleep_forever()  # until the broker stops
    assert client.acks()[1] == [10]  # no ack for the batch the log refused
    assert [h.batch_complete for h in walk_file(cxl_path)] == [BATCH_COMMITTED, BATCH_ABANDONED]


# -- the reader reports a gap ----------------------------------------------------------------------


def test_the_reader_raises_on_an_offset_gap(cxl_path: str) -> None:
    log = open_small_log(cxl_path)
    commit(log, "a", [10] * 10)
    second = reserve(log, "a", [10] * 10, seq=1)
    third = reserve(log, "a", [10] * 10, seq=2)
    log.complete(third, scan_records(third.payload, 10))
    with open_log(cxl_path) as tailing:
        # A tailing reader has read up to the batch in flight.
        assert [m.offset for m in tailing.messages("a")] == list(range(10))
        assert log.complete(second, scan_records(second.payload, 10)) == [second, third]
        # Another process marks the batch abandoned (as a second broker's recovery did),
        # just as the reader walks past it: offsets 10-19 are not there for it, and it
        # says so instead of going on from 20.
        set_state(cxl_path, second.header_offset, BATCH_ABANDONED)
        with pytest.raises(LayoutError, match="starts at logical offset 20 where 10 is due"):
            list(tailing.messages("a", start=10))
    with open_log(cxl_path) as fresh:
        with pytest.raises(LayoutError, match="starts at logical offset 20 where 10 is due"):
            list(fresh.messages("a"))
        # Inspection still shows the stream as it is.
        assert [(b.state, b.first_offset) for b in fresh.batches("a")] == [
            ("committed", 0),
            ("abandoned", -1),
            ("committed", 20),
        ]
    del second, third
    close_log(log)
