"""Ack level 2 and the disk log: durability, group commit, replay, refusal of foreign logs."""

from __future__ import annotations

import errno
import logging
import os
import struct
import threading
from pathlib import Path

import pytest
import trio
from conftest import MakeConfig, wait_until
from rawclient import batch, handshake, parse_ack_stream, parse_records, read_all

from trio_embarcadero import (
    BrokerError,
    ErrorCode,
    LayoutError,
    StorageError,
    open_broker,
    open_publisher,
    serve,
)
from trio_embarcadero.broker import Broker
from trio_embarcadero.config import Config
from trio_embarcadero.log.disk import DiskSegment, WriteJob, file_name


async def publish(
    port: int, topic: str, client_id: int, batches: int, *, ack: int = 2, first: int = 0
) -> list[int]:
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(handshake(topic, client_id=client_id, ack=ack))
        for k in range(batches):
            await stream.send_all(batch(k, client_id, first + 10 * k, 10, 100 + k)[0])
        await stream.send_eof()
        broker_id, counts, error = parse_ack_stream(await read_all(stream))
    assert error is None
    assert broker_id == 0
    return counts


def committed_bytes(broker: Broker, topic: str) -> bytes:
    """The stream's committed batches exactly as they sit in the region."""
    stream = broker.log.existing_stream(topic)
    assert stream is not None
    out = []
    for k in range(stream.batches):
        b = stream.committed_batch(k)
        out.append(bytes(broker.log.region[b.header_offset : b.payload_offset + b.total_size]))
    return b"".join(out)


def stored(config_dir: str, topic: str) -> bytes:
    return (Path(config_dir) / file_name(topic, 0)).read_bytes()


@pytest.fixture
def storage_dir(tmp_path: Path) -> str:
    return str(tmp_path / "disk")


async def test_ack2_counts_only_after_the_sync(make_config: MakeConfig, storage_dir: str) -> None:
    config = make_config(**{"storage.dir": storage_dir, "storage.sync_interval_ms": 1.0})
    with trio.fail_after(10):
        async with open_broker(config) as broker:
            counts = await publish(broker.port, "durable", 7, 5)
            assert counts[-1] == 50
            disk = broker.statistics().disk
            assert disk is not None
            assert disk.batches_written == 5
            assert disk.syncs >= 1
            assert disk.waiting_batches == 0
            # What was acked at level 2 is on disk, byte for byte as in the log.
            assert stored(storage_dir, "durable") == committed_bytes(broker, "durable")


async def test_group_commit_covers_many_batches(make_config: MakeConfig, storage_dir: str) -> None:
    config = make_config(**{"storage.dir": storage_dir, "storage.sync_interval_ms": 50.0})
    with trio.fail_after(10):
        async with open_broker(config) as broker:
            async with trio.open_nursery() as nursery:
                for client in range(4):
                    nursery.start_soon(publish, broker.port, "grouped", 100 + client, 10)
            disk = broker.statistics().disk
            assert disk is not None
            assert disk.batches_written == 40
            assert disk.syncs < 40


async def test_lost_region_is_rebuilt_from_disk(
    make_config: MakeConfig, storage_dir: str, cxl_path: str
) -> None:
    config = make_config(**{"storage.dir": storage_dir})
    with trio.fail_after(10):
        async with open_broker(config) as broker:
            await publish(broker.port, "t", 1, 4)
            before = committed_bytes(broker, "t")
        os.unlink(cxl_path)  # the machine rebooted: /dev/shm is gone
        async with open_broker(config) as broker:
            assert committed_bytes(broker, "t") == before
            stream = broker.log.existing_stream("t")
            assert stream is not None
            assert stream.next_offset == 40
            disk = broker.statistics().disk
            assert disk is not None
            assert disk.batches_replayed == 4
            # New batches continue the offsets; the disk log grows in step.
            await publish(broker.port, "t", 1, 1, first=40)
            assert stream.next_offset == 50
            records = parse_records(
                b"".join(
                    bytes(broker.log.region[b.payload_offset : b.payload_offset + b.total_size])
                    for b in map(stream.committed_batch, range(stream.batches))
                )
            )
            assert [r[0] for r in records] == list(range(50))
            assert stored(storage_dir, "t") == committed_bytes(broker, "t")


async def test_writer_catches_up_with_batches_committed_before_storage(
    make_config: MakeConfig, storage_dir: str
) -> None:
    with trio.fail_after(10):
        async with open_broker(make_config()) as broker:
            await publish(broker.port, "late", 3, 3, ack=1)
        async with open_broker(make_config(**{"storage.dir": storage_dir})) as broker:
            await wait_until(lambda: getattr(broker.statistics().disk, "batches_written", 0) == 3)
            assert stored(storage_dir, "late") == committed_bytes(broker, "late")


async def test_torn_tail_is_cut_off(
    make_config: MakeConfig, storage_dir: str, cxl_path: str
) -> None:
    config = make_config(**{"storage.dir": storage_dir})
    with trio.fail_after(10):
        async with open_broker(config) as broker:
            await publish(broker.port, "torn", 2, 3)
        path = Path(storage_dir) / file_name("torn", 0)
        whole = path.read_bytes()
        path.write_bytes(whole + whole[:200])  # half a batch appended by a dying writer
        os.unlink(cxl_path)
        async with open_broker(config) as broker:
            stream = broker.log.existing_stream("torn")
            assert stream is not None
            assert stream.next_offset == 30
        assert path.read_bytes() == whole


async def test_disk_log_of_another_history_is_refused(
    make_config: MakeConfig, storage_dir: str, cxl_path: str
) -> None:
    config = make_config(**{"storage.dir": storage_dir})
    with trio.fail_after(10):
        async with open_broker(config) as broker:
            await publish(broker.port, "h", 2, 2)
        foreign = (Path(storage_dir) / file_name("h", 0)).read_bytes()
        async with open_broker(config, reset=True) as broker:  # reset wipes both logs
            assert not (Path(storage_dir) / file_name("h", 0)).exists()
            await publish(broker.port, "h", 2, 1)
        # Splice in the other history's first batch: offsets now disagree at batch 1.
        path = Path(storage_dir) / file_name("h", 0)
        path.write_bytes(path.read_bytes() + foreign)
        with pytest.raises(LayoutError, match=r"different histories"):
            async with open_broker(config):
                pass


async def test_allow_list_refuses_other_networks(make_config: MakeConfig) -> None:
    with trio.fail_after(10):
        async with open_broker(make_config(**{"network.allowed_networks": "10.0.0.0/8"})) as broker:
            async with await trio.open_tcp_stream("127.0.0.1", broker.port) as stream:
                data = await read_all(stream)
            _, counts, error = parse_ack_stream(data, with_broker_id=False)
            assert counts == []
            assert error == (6, "127.0.0.1 is not an allowed network")
            assert broker.statistics().errors == {"not_allowed": 1}
        config = make_config(**{"network.allowed_networks": "10.0.0.0/8, 127.0.0.0/8"})
        async with open_broker(config) as broker:
            assert await publish(broker.port, "ok", 1, 1, ack=1) == [10]


def one_file_job(topic: str, segment: DiskSegment, views: list[memoryview]) -> WriteJob:
    """A write job that appends ``views`` to one file."""
    from trio_embarcadero.log import disk as storage

    part = storage._Part(segment, views)
    return storage.WriteJob(topic, len(views), storage._StreamLog([segment], [], 0), [part])


def test_writes_larger_than_one_writev_resume_without_loss(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A short writev (Linux caps one call near 2 GiB) resumes where it stopped."""
    from trio_embarcadero.log import disk as storage

    path = tmp_path / "big.log"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        segment = storage.DiskSegment(path, 0, 0o600, fd)
        views = [memoryview(bytes([i]) * (3 * 2**20 + i)) for i in range(5)]
        real_writev = os.writev
        calls: list[int] = []

        def short_writev(fd: int, buffers: list[memoryview]) -> int:
            # Accept at most 1 MiB + 7 bytes per call, like a filesystem under pressure.
            calls.append(len(buffers))
            budget = 2**20 + 7
            taken = []
            for b in buffers:
                if budget <= 0:
                    break
                taken.append(b[:budget])
                budget -= len(taken[-1])
            return real_writev(fd, taken)

        monkeypatch.setattr(os, "writev", short_writev)
        job = one_file_job("t", segment, views)
        result = storage.write_and_sync([job])
        assert result == storage.SyncResult([job], sum(len(v) for v in views))
        assert path.read_bytes() == b"".join(bytes(v) for v in views)
        assert len(calls) > 5
    finally:
        os.close(fd)


def test_a_failed_directory_sync_leaves_the_new_file_not_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """write_and_sync reports the jobs it finished before a failure: an existing
    file's job is done, a new file's is not while its directory entry is not synced."""
    from trio_embarcadero.log import disk as storage

    fd = os.open(tmp_path / "old.log", os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    existing = storage.DiskSegment(tmp_path / "old.log", 0, 0o600, fd)
    fresh = storage.DiskSegment(tmp_path / "new.log", 0, 0o600)
    try:
        jobs = [
            one_file_job(name, segment, [memoryview(b"x" * 64)])
            for name, segment in (("old", existing), ("new", fresh))
        ]
        real_fsync = os.fsync

        def fsync(fd: int) -> None:
            if os.readlink(f"/proc/self/fd/{fd}") == str(tmp_path):
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            real_fsync(fd)

        monkeypatch.setattr(os, "fsync", fsync)
        result = storage.write_and_sync(jobs)
        assert result.done == jobs[:1]
        assert result.written == 128
        assert result.failure is not None
        assert (result.failure.operation, result.failure.path) == ("fsync directory", str(tmp_path))
        assert str(result.failure) == (
            f"disk log {tmp_path}: fsync directory failed: EIO (Input/output error)"
        )
        assert not fresh.entry_durable
    finally:
        os.close(fd)
        if fresh.fd >= 0:
            os.close(fresh.fd)


class FileSystemCalls:
    """Records creations and syncs (``os`` is patched to go through it), in order.

    Events are ``("mkdir", path)``, ``("create", path)`` (an ``open`` with
    ``O_CREAT``), ``("sync", path)`` (``fsync`` or ``fdatasync``, of a file or a
    directory) and whatever a test appends itself. Worker threads append too;
    ``list.append`` is atomic.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[tuple[str, str]] = []
        real_open, real_mkdir = os.open, os.mkdir
        real_syncs = {"fsync": os.fsync, "fdatasync": os.fdatasync}

        def recording_open(path: str | Path, flags: int, mode: int = 0o777, **kw: object) -> int:
            fd = real_open(path, flags, mode, **kw)  # type: ignore[arg-type]
            if flags & os.O_CREAT:
                self.events.append(("create", str(path)))
            return fd

        def recording_mkdir(path: str | Path, mode: int = 0o777, **kw: object) -> None:
            real_mkdir(path, mode, **kw)  # type: ignore[arg-type]
            self.events.append(("mkdir", str(path)))

        def recording_sync(name: str) -> object:
            def sync(fd: int) -> None:
                real_syncs[name](fd)
                self.events.append(("sync", os.readlink(f"/proc/self/fd/{fd}")))

            return sync

        monkeypatch.setattr(os, "open", recording_open)
        monkeypatch.setattr(os, "mkdir", recording_mkdir)
        for name in real_syncs:
            monkeypatch.setattr(os, name, recording_sync(name))

    def index(self, event: tuple[str, str], after: int = -1) -> int:
        """Where ``event`` first happened after index ``after``."""
        later = self.events[after + 1 :]
        assert event in later, f"{event} never happened after #{after}: {self.events}"
        return after + 1 + later.index(event)


async def test_new_directories_and_files_are_synced_in_their_parent_before_ack2(
    make_config: MakeConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A power loss must not take a file (or directory) away whose batches were acked at
    level 2: its entry is synced in its directory before the first count goes out."""
    base = str(tmp_path)  # pytest's is resolved, like the paths /proc/self/fd shows
    outer, storage = f"{base}/disk", f"{base}/disk/broker0"
    log_file = f"{storage}/{file_name('fresh', 0)}"
    calls = FileSystemCalls(monkeypatch)
    config = make_config(**{"storage.dir": storage, "storage.sync_interval_ms": 1.0})
    with trio.fail_after(10):
        async with open_broker(config) as broker:
            # Both directories are new: each is synced in its parent once made.
            assert calls.index(("mkdir", outer)) < calls.index(("sync", base))
            assert calls.index(("mkdir", storage)) < calls.index(("sync", outer))
            async with await trio.open_tcp_stream("127.0.0.1", broker.port) as stream:
                await stream.send_all(handshake("fresh", client_id=3, ack=2))
                await stream.send_all(batch(0, 3, 0, 10, 100)[0])
                assert await receive_exactly(stream, 12) == struct.pack("<iQ", 0, 10)
                calls.events.append(("acked", "10"))
                await stream.send_eof()
                await read_all(stream)
    created = calls.index(("create", log_file))
    data_synced = calls.index(("sync", log_file))
    entry_synced = calls.index(("sync", storage), after=created)
    acked = calls.index(("acked", "10"))
    assert created < data_synced < acked
    assert created < entry_synced < acked


async def receive_exactly(stream: trio.abc.ReceiveStream, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = await stream.receive_some(size - len(data))
        assert chunk, f"EOF after {len(data)} of {size} bytes"
        data += chunk
    return data


# -- a disk that fails -------------------------------------------------------------------


class FailingDisk:
    """``os.fdatasync`` of the named files fails with EIO once armed, after
    blocking until released (so a test can act while the writer is stuck)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *paths: str) -> None:
        self.paths = set(paths)
        self.armed = False
        self.entered = threading.Event()
        self.release = threading.Event()
        real_fdatasync = os.fdatasync

        def fdatasync(fd: int) -> None:
            if self.armed and os.readlink(f"/proc/self/fd/{fd}") in self.paths:
                self.entered.set()
                self.release.wait(10)
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            real_fdatasync(fd)

        monkeypatch.setattr(os, "fdatasync", fdatasync)


async def open_raw_publisher(port: int, topic: str, client_id: int, ack: int) -> trio.SocketStream:
    """A publish connection whose first batch (10 messages) is acked."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(handshake(topic, client_id=client_id, ack=ack))
    await stream.send_all(batch(0, client_id, 0, 10, 100)[0])
    assert await receive_exactly(stream, 12) == struct.pack("<iQ", 0, 10)
    return stream


async def test_a_failing_disk_stops_the_broker_after_telling_every_publisher(
    make_config: MakeConfig,
    storage_dir: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """EIO from fdatasync: ack-2 publishers waiting for it get error 8 after their
    durable count, ack-1 publishers their counts and error 5, and open_broker raises
    one StorageError once the broker has drained."""
    doomed, other = (f"{storage_dir}/{file_name(t, 0)}" for t in ("doomed", "other"))
    disk = FailingDisk(monkeypatch, doomed, other)
    config = make_config(**{"storage.dir": storage_dir, "storage.sync_interval_ms": 1.0})
    with trio.fail_after(10), pytest.raises(StorageError) as stopped:
        await publish_while_the_disk_fails(config, disk)
    failure = stopped.value
    assert (failure.operation, failure.path, failure.errno) == ("fdatasync", doomed, errno.EIO)
    assert isinstance(failure.__cause__, OSError)
    # One line says what broke, naming the file and the errno.
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert doomed in errors[0]
    assert "EIO" in errors[0]


async def publish_while_the_disk_fails(config: Config, disk: FailingDisk) -> None:
    async with open_broker(config) as broker:
        durable = await open_raw_publisher(broker.port, "doomed", 1, ack=2)
        stored = await open_raw_publisher(broker.port, "fine", 2, ack=1)
        async with durable, stored:
            with pytest.raises(BrokerError) as refused:
                await publish_until_refused(broker, disk, durable, stored)
            # The Python client: error 8, with the durable count.
            assert refused.value.code == ErrorCode.STORAGE_FAILURE == 8
            assert refused.value.acked == 1
            assert refused.value.message.startswith(
                "storage failure: the disk log failed (fdatasync: EIO (Input/output error))"
            )
            # On the wire: no count after the durable one, then error 8 ...
            _, counts, error = parse_ack_stream(await read_all(durable), with_broker_id=False)
            assert (counts, error) == ([], (8, refused.value.message))
            # ... and the ack-1 publisher had all its counts; it is told the broker stops.
            _, counts, error = parse_ack_stream(await read_all(stored), with_broker_id=False)
            assert (counts, error) == ([], (5, "broker is shutting down"))
        assert broker.statistics().errors == {"storage_failure": 2, "shutting_down": 1}
        await trio.sleep_forever()  # the broker ends the block once it has drained


async def publish_until_refused(
    broker: Broker, disk: FailingDisk, durable: trio.SocketStream, stored: trio.SocketStream
) -> None:
    async with open_publisher(
        "127.0.0.1", broker.port, "other", ack=2, linger=None, client_id=3
    ) as publisher:
        await publisher.publish(b"synced")
        await publisher.flush()
        disk.armed = True
        await durable.send_all(batch(1, 1, 10, 10, 100)[0])
        await trio.to_thread.run_sync(disk.entered.wait, 10, abandon_on_cancel=True)
        # The disk hangs: level 2 waits for it, level 1 does not.
        await publisher.publish(b"never synced")
        await wait_until(lambda: getattr(broker.statistics().disk, "waiting_batches", 0) == 2)
        await stored.send_all(batch(1, 2, 10, 10, 100)[0])
        assert await receive_exactly(stored, 8) == struct.pack("<Q", 20)
        disk.release.set()  # and now it fails
        await publisher.flush()


async def test_serve_raises_the_storage_error_itself(
    make_config: MakeConfig, storage_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    doomed = f"{storage_dir}/{file_name('doomed', 0)}"
    disk = FailingDisk(monkeypatch, doomed)
    disk.armed = True
    disk.release.set()
    raised: list[BaseException] = []

    async def embedder(*, task_status: trio.TaskStatus[Broker]) -> None:
        try:
            await serve(make_config(**{"storage.dir": storage_dir}), task_status=task_status)
        except BaseException as exc:
            raised.append(exc)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            broker = await nursery.start(embedder)
            async with await trio.open_tcp_stream("127.0.0.1", broker.port) as stream:
                await stream.send_all(handshake("doomed", ack=1) + batch(0, 1, 0, 10, 100)[0])
                _, counts, error = parse_ack_stream(await read_all(stream))
            assert (counts, error) == ([10], (5, "broker is shutting down"))
    assert len(raised) == 1
    assert isinstance(raised[0], StorageError)
    assert raised[0].path == doomed
