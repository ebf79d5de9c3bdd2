"""The disk log behind ack level 2: committed batches, appended and fdatasync'ed.

The CXL region lives in RAM. With ``storage.dir`` set, every batch this broker
commits is also appended to ``<dir>/<topic>@<broker id>.log`` exactly as it
sits in the log (its 128-byte header, ``batch_complete = 1`` and the assigned
logical offsets included, then its records), in commit order. One writer task
does the appends and the ``fdatasync`` on a worker thread, so the event loop
never blocks on the disk, and one sync covers every batch committed since the
last (group commit): a sync happens ``storage.sync_interval_ms`` after the
first unsynced commit, or sooner once ``storage.sync_bytes`` are waiting.
Publishers with ack level 2 get their count only after the sync.

On start the disk log is reconciled with the CXL region:

* a torn last batch (the machine died mid-append) is cut off;
* the region has fewer batches than the disk (it was lost: a reboot, or the
  file was removed): the missing batches are replayed into it, getting the
  same logical offsets again;
* the region has more batches (they were acked at level 1 but not synced
  before a crash): the writer appends them.

A disk log that disagrees with the region about a batch's logical offset is
refused: the two belong to different histories.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable
from pathlib import Path

import attrs
import trio

from .cxl import CxlLog, Reservation, Stream
from .errors import LayoutError
from .wire import BATCH_HEADER_SIZE, encode_topic, scan_records, unpack_batch_header

logger = logging.getLogger(__name__)

# Writes go out in runs of at most this many buffers (os.writev's IOV_MAX)
# and about this many bytes.
_IOV_MAX = 1024
_WRITE_BYTES = 256 * 2**20


def file_name(topic: str, broker_id: int) -> str:
    """The disk log file of one (topic, broker) stream; ``@`` is not a topic character."""
    return f"{topic}@{broker_id}.log"


@attrs.frozen
class DiskStatistics:
    """Counters of the disk log."""

    batches_written: int
    bytes_written: int
    syncs: int
    last_sync_seconds: float
    batches_replayed: int
    waiting_batches: int


class _StreamFile:
    def __init__(self, path: Path, fd: int, on_disk: int) -> None:
        self.path = path
        self.fd = fd
        self.synced = on_disk  # batches of the stream that are on disk and synced
        self.durable_waiters: deque[tuple[int, Callable[[], None]]] = deque()


@attrs.frozen
class _Job:
    file: _StreamFile
    views: list[memoryview]
    upto: int


class DiskLog:
    """This broker's disk logs; see the module docstring.

    Use :meth:`open` (blocking: run it on a worker thread at start-up).
    """

    def __init__(self, directory: Path, log: CxlLog, sync_interval: float, sync_bytes: int) -> None:
        self.directory = directory
        self._log = log
        self._interval = sync_interval
        self._sync_bytes = sync_bytes
        self._files: dict[str, _StreamFile] = {}
        self._waiting_batches = 0
        self._waiting_bytes = 0
        self._finishing = False
        self._wakeup = trio.lowlevel.ParkingLot()
        self._batches_written = 0
        self._bytes_written = 0
        self._syncs = 0
        self._last_sync = 0.0
        self._replayed = 0

    # -- start-up ------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        directory: str,
        log: CxlLog,
        *,
        sync_interval: float,
        sync_bytes: int,
        reset: bool = False,
    ) -> DiskLog:
        """Open (or create) the disk logs of ``log``'s broker and reconcile them.

        Raises:
            LayoutError: A disk log disagrees with the CXL region.
            OSError: The directory or a file cannot be used.
        """
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        disk = cls(path, log, sync_interval, sync_bytes)
        log.add_commit_listener(disk._committed)
        suffix = f"@{log.broker_id}.log"
        for file in sorted(path.glob(f"*{suffix}")):
            if reset:
                file.unlink()
                continue
            topic = file.name[: -len(suffix)]
            try:
                encode_topic(topic)
            except ValueError:
                logger.warning("ignoring %s: not a topic's disk log", file)
                continue
            disk._files[topic] = disk._recover(topic, file)
        # Batches committed in the region but not on disk (acked at level 1,
        # not yet synced when the broker stopped) are the writer's first job.
        disk._waiting_batches = disk._waiting_bytes = 0
        for stream in log.streams():
            known = disk._files.get(stream.topic)
            for k in range(known.synced if known else 0, stream.batches):
                disk._waiting_batches += 1
                disk._waiting_bytes += BATCH_HEADER_SIZE + stream.committed_batch(k).total_size
        return disk

    def _recover(self, topic: str, path: Path) -> _StreamFile:
        fd = os.open(path, os.O_RDWR | os.O_APPEND)
        try:
            batches = _read_batches(fd, path)
            stream = self._log.stream(topic)
            for k in range(min(len(batches), stream.batches)):
                ours = stream.committed_batch(k).first_offset
                if batches[k][1] != ours:
                    raise LayoutError(
                        f"{path}: batch {k} starts at logical offset {batches[k][1]} on disk "
                        f"but at {ours} in the CXL region; they hold different histories "
                        "(start with --reset to discard both)"
                    )
            missing = len(batches) - stream.batches
            for file_offset, first, total in batches[stream.batches :]:
                self._replay(fd, stream, path, file_offset, first, total)
            if missing > 0:
                logger.info("replayed %d batch(es) of %r from %s", missing, topic, path)
            return _StreamFile(path, fd, len(batches))
        except BaseException:
            os.close(fd)
            raise

    def _replay(
        self, fd: int, stream: Stream, path: Path, file_offset: int, first: int, total: int
    ) -> None:
        raw = os.pread(fd, BATCH_HEADER_SIZE, file_offset)
        header = unpack_batch_header(raw)
        reservation = self._log.get_cxl_buffer(stream.topic, header)
        try:
            got = os.preadv(fd, [reservation.payload.data], file_offset + BATCH_HEADER_SIZE)
            if got != total:
                raise LayoutError(f"{path}: batch at byte {file_offset} is short")
            starts = scan_records(reservation.payload, header.num_msg)
        except BaseException:
            self._log.abandon(reservation)
            raise
        self._log.complete(reservation, starts)
        if reservation.first_offset != first:
            raise LayoutError(
                f"{path}: replayed batch got logical offset {reservation.first_offset}, "
                f"the disk says {first}"
            )
        self._replayed += 1

    def close(self) -> None:
        """Close every file (after :meth:`run` has returned)."""
        for file in self._files.values():
            os.close(file.fd)
        self._files.clear()

    # -- ack level 2 ---------------------------------------------------------------

    def when_durable(self, reservation: Reservation, callback: Callable[[], None]) -> None:
        """Call ``callback`` once the committed ``reservation`` is synced to disk."""
        file = self._file(reservation.stream)
        if reservation.batch_index < file.synced:
            callback()
        else:
            file.durable_waiters.append((reservation.batch_index, callback))

    def finish(self) -> None:
        """Let :meth:`run` return once everything committed is synced."""
        self._finishing = True
        self._wakeup.unpark_all()

    # -- the writer --------------------------------------------------------------------

    def _file(self, stream: Stream) -> _StreamFile:
        file = self._files.get(stream.topic)
        if file is None:
            path = self.directory / file_name(stream.topic, self._log.broker_id)
            # O_APPEND + create: a file opened once per topic, on its first commit.
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            file = self._files[stream.topic] = _StreamFile(path, fd, 0)
        return file

    def _committed(self, reservation: Reservation) -> None:
        self._waiting_batches += 1
        self._waiting_bytes += BATCH_HEADER_SIZE + reservation.header.total_size
        self._wakeup.unpark_all()

    def _jobs(self) -> list[_Job]:
        region = self._log.region
        jobs = []
        for stream in self._log.streams():
            if stream.batches == 0:
                continue
            file = self._file(stream)
            views = []
            for k in range(file.synced, stream.batches):
                start = stream.index_header[k]
                end = start + BATCH_HEADER_SIZE + stream.committed_batch(k).total_size
                views.append(region[start:end].data)
            if views:
                jobs.append(_Job(file, views, stream.batches))
        return jobs

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Append and sync committed batches until :meth:`finish` and drained."""
        task_status.started()
        while True:
            while self._waiting_batches == 0:
                if self._finishing:
                    return
                await self._wakeup.park()
            # Group commit: gather for up to the sync interval, or until enough
            # bytes wait, so one fdatasync covers many batches.
            with trio.move_on_after(self._interval):
                while self._waiting_bytes < self._sync_bytes and not self._finishing:
                    await self._wakeup.park()
            self._waiting_batches = self._waiting_bytes = 0
            jobs = self._jobs()
            started = trio.current_time()
            written = await trio.to_thread.run_sync(_write_and_sync, jobs)
            self._last_sync = trio.current_time() - started
            self._syncs += 1
            self._bytes_written += written
            for job in jobs:
                self._batches_written += job.upto - job.file.synced
                job.file.synced = job.upto
                waiters = job.file.durable_waiters
                while waiters and waiters[0][0] < job.upto:
                    waiters.popleft()[1]()

    def statistics(self) -> DiskStatistics:
        """Return a snapshot of the disk log's counters."""
        return DiskStatistics(
            batches_written=self._batches_written,
            bytes_written=self._bytes_written,
            syncs=self._syncs,
            last_sync_seconds=self._last_sync,
            batches_replayed=self._replayed,
            waiting_batches=sum(len(f.durable_waiters) for f in self._files.values()),
        )


def _write_and_sync(jobs: list[_Job]) -> int:
    """Append each job's buffers to its file and fdatasync it (worker thread)."""
    written = 0
    for job in jobs:
        pending = list(job.views)
        while pending:
            # One writev moves at most about 2 GiB on Linux; keep each call
            # well below that and below IOV_MAX, and resume a short write
            # where it stopped, without copying anything.
            chunk: list[memoryview] = []
            size = 0
            while pending and len(chunk) < _IOV_MAX and (not chunk or size < _WRITE_BYTES):
                chunk.append(pending[0])
                size += len(pending.pop(0))
            done = os.writev(job.file.fd, chunk)
            written += done
            if done < size:
                rest = []
                for view in chunk:
                    if done >= len(view):
                        done -= len(view)
                        continue
                    rest.append(view[done:])
                    done = 0
                pending[:0] = rest
        os.fdatasync(job.file.fd)
    return written


def _read_batches(fd: int, path: Path) -> list[tuple[int, int, int]]:
    """``(file offset, first logical offset, total_size)`` of each whole batch;
    a torn tail is truncated away."""
    size = os.fstat(fd).st_size
    batches: list[tuple[int, int, int]] = []
    offset = 0
    expected_first = 0
    while offset + BATCH_HEADER_SIZE <= size:
        header = unpack_batch_header(os.pread(fd, BATCH_HEADER_SIZE, offset))
        end = offset + BATCH_HEADER_SIZE + header.total_size
        if end > size:
            break  # the batch an interrupted append left short
        # Appends copy headers verbatim from the log, so a whole batch whose
        # header is wrong is not a torn write but another history: refuse it.
        if (
            header.batch_complete != 1
            or header.total_size == 0
            or header.start_logical_offset != expected_first
        ):
            raise LayoutError(
                f"{path}: batch {len(batches)} at byte {offset} is not the next batch of this "
                f"log (logical offset {header.start_logical_offset}, expected {expected_first}); "
                "the file holds different histories"
            )
        batches.append((offset, header.start_logical_offset, header.total_size))
        expected_first = header.start_logical_offset + header.num_msg
        offset = end
    if offset != size:
        logger.warning("%s: cutting off %d bytes of a torn last batch", path, size - offset)
        os.ftruncate(fd, offset)
    return batches


__all__ = ["DiskLog", "DiskStatistics", "file_name"]
