"""The disk log behind ack level 2: committed batches, appended and fdatasync'ed.

The CXL region lives in RAM. With ``storage.dir`` set, every batch this broker
commits is also appended to ``<dir>/<topic>@<broker id>.log`` exactly as it
sits in the log (its 128-byte header, ``batch_complete = 1`` and the assigned
logical offsets included, then its records), in commit order. This module is
the disk format and its bookkeeping; it knows nothing of Trio. The broker's
writer task (:mod:`trio_embarcadero.broker.durability`) tells it what was
committed, takes the pending appends as :meth:`DiskLog.take_jobs`, runs
:func:`write_and_sync` on a worker thread (group commit: one ``fdatasync``
covers every batch committed since the last) and hands the finished jobs
back to :meth:`DiskLog.jobs_done`, which says how far each stream is durable.
A write or sync that fails does not raise: :func:`write_and_sync` reports
the jobs it finished and the :class:`~trio_embarcadero.errors.StorageError`
that stopped it, and the writer stops.

A file's synced data is only as durable as its directory entry: a file
created after the last sync of its directory can vanish whole in a power
loss. So every directory this module creates is made durable in its parent
(``fsync`` of the parent) and every new log file in the directory before
any of its batches counts as synced.

On start the disk log is reconciled with the CXL region:

* a torn last batch (the machine died mid-append) is cut off;
* the region has fewer batches than the disk (it was lost: a reboot, or the
  file was removed): the missing batches are replayed into it, getting the
  same logical offsets again; of a stream the region lost whole, only the
  newest batches that fit comfortably (see :meth:`DiskLog._replay_missing`),
  the older ones staying on disk only;
* the region has more batches (they were acked at level 1 but not synced
  before a crash): the writer appends them.

A stream that has no file yet (``storage.dir`` added to a broker that ran
without one, or the file removed) gets one from its first retained batch:
what retention trimmed before is in neither tier. A file's first batch is
numbered by matching its logical offset against the region's.

A disk log that disagrees with the region about a batch's logical offset is
refused: the two belong to different histories.

Only one process writes a broker's files: :meth:`DiskLog.open` holds the
directory's lock on the broker id (:mod:`.ownership`) until :meth:`DiskLog.close`.
Files are created with ``storage.mode`` (0600 by default), and a link or
another user's file in their place is refused.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import attrs
import numpy as np
import numpy.typing as npt

from ..errors import LayoutError, LogFullError, StartupError, StorageError, UnsafeFileError
from ..wire import BATCH_HEADER_SIZE, encode_topic, scan_records, unpack_batch_header
from .layout import file_name as file_name
from .ownership import BrokerLock, claim_disk_log, open_private_file, sync_directory
from .region import CxlLog, Reservation, Stream

logger = logging.getLogger(__name__)

# Writes go out in runs of at most this many buffers (os.writev's IOV_MAX)
# and about this many bytes.
_IOV_MAX = 1024
_WRITE_BYTES = 256 * 2**20


@attrs.frozen
class DiskStatistics:
    """Counters of the disk log."""

    batches_written: int
    bytes_written: int
    syncs: int
    last_sync_seconds: float
    batches_replayed: int
    waiting_batches: int


@attrs.frozen
class DiskBatch:
    """Where one synced batch sits in its stream's disk log.

    Attributes:
        position: Byte offset of its header in the file.
        first_offset: Logical offset of its first record.
        num_msg: Records in it.
        total_size: Bytes of its records (the header not included).
    """

    position: int
    first_offset: int
    num_msg: int
    total_size: int


class _StreamFile:
    def __init__(
        self, path: Path, fd: int, batches: list[DiskBatch], mode: int, base: int = 0
    ) -> None:
        self.path = path
        self.mode = mode  # permission bits, for the writer that creates it
        self.fd = fd  # -1 until the writer creates the file
        # The synced batches, in order, and their first offsets (to bisect);
        # only the event loop changes them (jobs_done), after each sync.
        self.batches = batches
        self.index_first = [b.first_offset for b in batches]
        # The stream's number of the file's first batch: a file begun after
        # retention trimmed the region starts at the region's first batch.
        self.base = base
        # The stream's batches before this number are on disk and synced
        # (or were trimmed before the file began).
        self.synced = base + len(batches)
        self.end = (
            batches[-1].position + BATCH_HEADER_SIZE + batches[-1].total_size if batches else 0
        )
        # Whether the directory entry is known to be durable: files found at
        # start-up are (open() syncs the directory), new ones once the
        # writer has synced the directory after creating them.
        self.entry_durable = fd >= 0
        self.incarnation = -1  # of the topic it holds (-1: as found at start-up)


@attrs.frozen
class WriteJob:
    """Appends to one stream's file, then its sync.

    Attributes:
        topic: The stream's topic.
        views: The batches to append, as views of the region.
        upto: The stream's committed batch count these bring the file to.
    """

    topic: str
    views: list[memoryview]
    upto: int
    _file: _StreamFile
    # (first offset, num_msg, total_size) of each view: the file's index after the sync
    _batches: list[tuple[int, int, int]] = attrs.field(factory=list)


class DiskLog:
    """This broker's disk logs; see the module docstring.

    Use :meth:`open` (blocking: run it on a worker thread at start-up).

    Attributes:
        waiting_bytes: Bytes committed since the last :meth:`take_jobs`.
    """

    def __init__(
        self,
        directory: Path,
        log: CxlLog,
        sync_interval: float,
        sync_bytes: int,
        mode: int = 0o600,
    ) -> None:
        self.directory = directory
        self._log = log
        self._mode = mode
        self._owner: BrokerLock | None = None
        self._interval = sync_interval
        self._sync_bytes = sync_bytes
        self._files: dict[str, _StreamFile] = {}
        self.waiting_batches = 0
        self.waiting_bytes = 0
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
        mode: int = 0o600,
        lock: BrokerLock | None = None,
    ) -> DiskLog:
        """Open (or create) the disk logs of ``log``'s broker and reconcile them.

        Before any file is removed (``reset``) or replayed, the broker id is
        locked on the directory (:func:`~.ownership.claim_disk_log`); the
        disk log keeps the lock until :meth:`close`.

        Args:
            directory: The disk log directory (created if need be).
            log: The broker's CXL log.
            sync_interval: Seconds to gather commits before a sync.
            sync_bytes: Bytes waiting that trigger a sync sooner.
            reset: Remove this broker's files first.
            mode: Permission bits of the files (and of the directory, plus x,
                if it is created).
            lock: The lock, already taken by the caller; the disk log takes
                it over. None: take it here.

        Raises:
            AlreadyServedError: Another live process serves this broker id
                on the directory.
            UnsafeFileError: A file is a symbolic link or another user's.
            LayoutError: A disk log disagrees with the CXL region.
            OSError: The directory or a file cannot be used.
        """
        owner = claim_disk_log(directory, log.broker_id, mode=mode) if lock is None else lock
        disk = cls(Path(directory), log, sync_interval, sync_bytes, mode)
        try:
            disk._reconcile(reset)
        except BaseException:
            disk.close()
            if lock is None:  # a lock the caller gave stays the caller's on failure
                owner.close()
            raise
        disk._owner = owner
        return disk

    def _reconcile(self, reset: bool) -> None:
        suffix = f"@{self._log.broker_id}.log"
        for file in sorted(self.directory.glob(f"*{suffix}")):
            if reset:
                file.unlink()
                continue
            topic = file.name[: -len(suffix)]
            try:
                encode_topic(topic)
            except ValueError:
                logger.warning("ignoring %s: not a topic's disk log", file)
                continue
            self._recover(topic, file)
        # Make what is there durable as it is now: the entries of the files
        # found, and the removal of those a reset discarded (else they could
        # come back after a power loss and be replayed).
        sync_directory(self.directory)
        self._replay_missing()
        # Batches committed in the region but not on disk (acked at level 1,
        # not yet synced when the broker stopped) are the writer's first job.
        for stream in self._log.streams():
            known = self._files.get(stream.topic)
            # A stream with no file yet gets one from its first retained batch.
            for k in range(known.synced if known else stream.first_batch, stream.batches):
                self.waiting_batches += 1
                self.waiting_bytes += BATCH_HEADER_SIZE + stream.committed_batch(k).total_size

    def _recover(self, topic: str, path: Path) -> None:
        fd = open_private_file(str(path), os.O_RDWR | os.O_APPEND, self._mode, "disk log")
        try:
            batches = _read_batches(fd, path)
        except BaseException:
            os.close(fd)
            raise
        # Kept from here on: close() closes it if anything below fails.
        file = self._files[topic] = _StreamFile(path, fd, batches, self._mode)
        stream = self._log.stream(topic)
        file.base = _file_base(path, stream, batches)
        file.synced = file.base + len(batches)
        # Batches the region no longer holds (reclaimed) are the disk's alone.
        for k in range(max(file.base, stream.first_batch), min(file.synced, stream.batches)):
            ours = stream.committed_batch(k).first_offset
            theirs = batches[k - file.base].first_offset
            if theirs != ours:
                raise LayoutError(
                    f"{path}: batch {k} starts at logical offset {theirs} on disk "
                    f"but at {ours} in the CXL region; they hold different histories "
                    "(start with --reset to discard both)"
                )

    def _replay_missing(self) -> None:
        """Replay into the region what it lacks of each disk log.

        A region that lost a stream whole (a reboot emptied /dev/shm) gets
        only the newest part back: the region is a cache of the disk log,
        which may hold far more than the region can. The streams to replay
        share half the region's free space (the other half stays for new
        batches, and covers the room segment ends waste); each gets its
        newest batches that fit in its share, and at least its last batch.
        The stream then begins at the first batch replayed
        (:meth:`CxlLog.begin_at`); the batches before it are read from disk
        (:meth:`batch_holding`). A stream that the region still holds part
        of gets every batch it lacks, so that it has no gap.
        """
        needing = [
            (stream, file)
            for topic, file in self._files.items()
            if (stream := self._log.stream(topic)).batches < file.synced
        ]
        if not needing:
            return
        free = self._log.map.statistics().free * self._log.geometry.unit_size
        share = free // 2 // len(needing)
        for stream, file in needing:
            # Batch numbers are the stream's; the file's list starts at its base.
            first = stream.batches
            if not stream.index_first:
                first = max(first, file.base + _tail_start(file.batches, share))
                if first > stream.batches:
                    self._log.begin_at(stream, first, file.batches[first - file.base].first_offset)
            for found in file.batches[first - file.base :]:
                self._replay(file.fd, stream, file.path, found)
            disk_only = (
                f"; {first - file.base} batch(es) (offsets {file.index_first[0]}.."
                f"{stream.start_offset - 1}) stay on disk only"
                if first > file.base
                else ""
            )
            logger.info(
                "replayed %d batch(es) of %r from %s into the region%s",
                file.synced - first,
                stream.topic,
                file.path,
                disk_only,
            )

    def _replay(self, fd: int, stream: Stream, path: Path, found: DiskBatch) -> None:
        file_offset, first, total = found.position, found.first_offset, found.total_size
        raw = os.pread(fd, BATCH_HEADER_SIZE, file_offset)
        header = unpack_batch_header(raw)
        try:
            reservation = self._log.get_cxl_buffer(stream.topic, header)
        except LogFullError as exc:
            raise StartupError(
                f"{path}: the CXL region has no room to replay {stream.topic!r} from the disk "
                f"log ({exc}); give the region more room (cxl.size_mb)"
            ) from exc
        try:
            got = os.preadv(fd, [reservation.payload.data], file_offset + BATCH_HEADER_SIZE)
            if got != total:
                raise LayoutError(f"{path}: batch at byte {file_offset} is short")
            starts = scan_records(reservation.payload, header.num_msg)
        except BaseException:
            self._log.abandon(reservation)
            raise
        # Nothing else is reserved at start-up, so this commits it at once.
        self._log.complete(reservation, starts)
        if reservation.first_offset != first:
            raise LayoutError(
                f"{path}: replayed batch got logical offset {reservation.first_offset}, "
                f"the disk says {first}"
            )
        self._replayed += 1

    def close(self) -> None:
        """Close every file (once the writer has stopped) and release the lock."""
        for file in self._files.values():
            if file.fd >= 0:
                os.close(file.fd)
        self._files.clear()
        if self._owner is not None:
            self._owner.close()
            self._owner = None

    # -- what the writer task calls -----------------------------------------------

    @property
    def sync_interval(self) -> float:
        """Seconds to gather commits before a sync (``storage.sync_interval_ms``)."""
        return self._interval

    @property
    def sync_bytes(self) -> int:
        """Bytes waiting that trigger a sync before the interval is over."""
        return self._sync_bytes

    def durable_batches(self, stream: Stream) -> int:
        """How many of ``stream``'s committed batches are synced to disk."""
        return self._file(stream).synced

    def committed(self, reservation: Reservation) -> None:
        """Count a newly committed batch as waiting for the disk."""
        self.waiting_batches += 1
        self.waiting_bytes += BATCH_HEADER_SIZE + reservation.header.total_size

    def _file(self, stream: Stream) -> _StreamFile:
        file = self._files.get(stream.topic)
        if file is not None and file.incarnation == -1:
            file.incarnation = stream.incarnation
        if file is None or file.incarnation != stream.incarnation:
            # New, or the topic was deleted (its file renamed aside) and
            # created again: a new file from the stream's first batch (the
            # first retention kept: the ones before are in no tier).
            # Created by the writer (write_and_sync, on its worker thread),
            # so the event loop never waits for the file system.
            path = self.directory / file_name(stream.topic, self._log.broker_id)
            file = self._files[stream.topic] = _StreamFile(
                path, -1, [], self._mode, stream.first_batch
            )
            file.incarnation = stream.incarnation
        return file

    def take_jobs(self) -> list[WriteJob]:
        """Everything committed and not yet on disk, as one job per stream."""
        self.waiting_batches = self.waiting_bytes = 0
        region = self._log.region
        jobs = []
        for stream in self._log.streams():
            if stream.batches == 0:
                continue
            file = self._file(stream)
            views = []
            batches = []
            for k in range(file.synced, stream.batches):
                batch = stream.committed_batch(k)
                end = batch.payload_offset + batch.total_size
                views.append(region[batch.header_offset : end].data)
                batches.append((batch.first_offset, batch.num_msg, batch.total_size))
            if views:
                jobs.append(WriteJob(stream.topic, views, stream.batches, file, batches))
        return jobs

    def jobs_done(self, jobs: list[WriteJob], written: int, seconds: float) -> None:
        """Record jobs that :func:`write_and_sync` finished: each job's stream
        is now durable up to ``job.upto`` batches."""
        self._last_sync = seconds
        self._syncs += 1
        self._bytes_written += written
        for job in jobs:
            file = job._file
            self._batches_written += job.upto - file.synced
            file.synced = job.upto
            for first, num_msg, total in job._batches:
                file.batches.append(DiskBatch(file.end, first, num_msg, total))
                file.index_first.append(first)
                file.end += BATCH_HEADER_SIZE + total

    # -- reading the disk tier ----------------------------------------------------

    def first_offset(self, topic: str) -> int | None:
        """The first logical offset ``topic``'s disk log holds synced, or None
        when it holds none (a file begun after retention trimmed the region
        starts past 0)."""
        file = self._files.get(topic)
        return file.index_first[0] if file is not None and file.index_first else None

    def batch_holding(self, topic: str, offset: int) -> DiskBatch | None:
        """The synced batch of ``topic`` that holds logical ``offset``, or None
        when the disk log holds no such record (yet)."""
        file = self._files.get(topic)
        if file is None or not file.batches or offset < file.index_first[0]:
            return None
        batch = file.batches[bisect.bisect_right(file.index_first, offset) - 1]
        return batch if offset < batch.first_offset + batch.num_msg else None

    def read_records(self, topic: str, batch: DiskBatch) -> npt.NDArray[np.uint8]:
        """The records of ``batch`` (from :meth:`batch_holding`), read from
        ``topic``'s file. Blocking: the broker calls it on a worker thread.

        Raises:
            StorageError: The file cannot be read, or is shorter than it was.
        """
        file = self._files[topic]
        data = np.empty(batch.total_size, dtype=np.uint8)
        with _failing_as("read", file.path):
            got = os.preadv(file.fd, [data.data], batch.position + BATCH_HEADER_SIZE)
        if got != batch.total_size:
            raise StorageError("read", str(file.path), errno.EIO)
        return data

    def statistics(self) -> DiskStatistics:
        """Return a snapshot of the disk log's counters."""
        return DiskStatistics(
            batches_written=self._batches_written,
            bytes_written=self._bytes_written,
            syncs=self._syncs,
            last_sync_seconds=self._last_sync,
            batches_replayed=self._replayed,
            waiting_batches=self.waiting_batches,
        )


@attrs.frozen
class SyncResult:
    """What :func:`write_and_sync` got done.

    Attributes:
        done: The jobs whose batches are now on disk and synced (hand them to
            :meth:`DiskLog.jobs_done`).
        written: Bytes written.
        failure: The failure that stopped it before every job was done, or
            None.
    """

    done: list[WriteJob]
    written: int
    failure: StorageError | None = None


def write_and_sync(jobs: list[WriteJob]) -> SyncResult:
    """Append each job's buffers to its file and fdatasync it. Blocking: the
    broker runs it on a worker thread.

    A stream's first job creates its file; the directory is then synced too,
    before this returns, so that no batch of a new file counts as durable
    while the file itself could still vanish.

    Returns:
        The jobs done; the first ``OSError`` ends the call and is reported
        in it as a :class:`~trio_embarcadero.errors.StorageError` (nothing
        more is tried: after a failed sync the file's state is unknown).
    """
    done: list[WriteJob] = []
    new: list[WriteJob] = []
    written = 0
    try:
        for job in jobs:
            file = job._file
            if file.fd < 0:
                with _failing_as("create", file.path):
                    # O_APPEND: every write goes to the end, whatever the offset.
                    file.fd = open_private_file(
                        str(file.path), os.O_RDWR | os.O_APPEND | os.O_CREAT, file.mode, "disk log"
                    )
            with _failing_as("write", file.path):
                written += _append(file.fd, job.views)
            with _failing_as("fdatasync", file.path):
                os.fdatasync(file.fd)
            (done if file.entry_durable else new).append(job)
        if new:
            directory = new[0]._file.path.parent  # one directory holds every file
            with _failing_as("fsync directory", directory):
                sync_directory(directory)
            for job in new:
                job._file.entry_durable = True
            done += new
    except StorageError as failure:
        return SyncResult(done, written, failure)
    return SyncResult(done, written)


@contextlib.contextmanager
def _failing_as(operation: str, path: Path) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise StorageError(operation, str(path), exc.errno) from exc
    except UnsafeFileError as exc:  # a link or a stranger's file appeared at the path
        raise StorageError(operation, str(path), errno.EPERM) from exc


def _append(fd: int, views: list[memoryview]) -> int:
    """Write every view to ``fd``, in order; returns the bytes written."""
    written = 0
    pending = list(views)
    while pending:
        # One writev moves at most about 2 GiB on Linux; keep each call
        # well below that and below IOV_MAX, and resume a short write
        # where it stopped, without copying anything.
        chunk: list[memoryview] = []
        size = 0
        while pending and len(chunk) < _IOV_MAX and (not chunk or size < _WRITE_BYTES):
            chunk.append(pending[0])
            size += len(pending.pop(0))
        done = os.writev(fd, chunk)
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
    return written


def _tail_start(batches: list[DiskBatch], budget: int) -> int:
    """Where the newest ``batches`` that fit in ``budget`` bytes (headers
    included) begin; at least the last batch."""
    start = len(batches) - 1
    used = BATCH_HEADER_SIZE + batches[start].total_size
    while start > 0:
        used += BATCH_HEADER_SIZE + batches[start - 1].total_size
        if used > budget:
            break
        start -= 1
    return start


def _file_base(path: Path, stream: Stream, batches: list[DiskBatch]) -> int:
    """The stream's number of the first of a disk log's ``batches``.

    Found by matching logical offsets: where the two overlap, the file's
    first batch in the region's index or, when the region was trimmed past
    it, the region's first retained batch (or its next offset) in the file.

    Raises:
        LayoutError: The file and the region do not meet: a gap between them,
            or batch boundaries that differ (another history).
    """
    if not batches:
        return stream.first_batch  # nothing on disk yet: it starts with the region
    if stream.batches == 0:
        return 0  # the region lost the stream whole: the file is the history
    head = batches[0].first_offset
    end = batches[-1].first_offset + batches[-1].num_msg
    if head >= stream.start_offset:
        i = bisect.bisect_left(stream.index_first, head)
        if i < len(stream.index_first) and stream.index_first[i] == head:
            return stream.first_batch + i
        if head == stream.next_offset:
            return stream.batches
    else:
        firsts = [b.first_offset for b in batches]
        j = bisect.bisect_left(firsts, stream.start_offset)
        meets = (j < len(firsts) and firsts[j] == stream.start_offset) or (
            stream.start_offset == end
        )
        if meets and j <= stream.first_batch:
            return stream.first_batch - j
    if end < stream.start_offset or head > stream.next_offset:
        raise LayoutError(
            f"{path}: the disk log holds {stream.topic!r}'s logical offsets {head}..{end - 1} "
            f"but the CXL region {stream.start_offset}..{stream.next_offset - 1}; the offsets "
            "between are in neither, so the file cannot go on (move it aside: a new one starts "
            "at the region's first batch)"
        )
    raise LayoutError(
        f"{path}: the disk log's batches do not line up with the CXL region's "
        f"(disk from logical offset {head}, region from {stream.start_offset}); they hold "
        "different histories (start with --reset to discard both)"
    )


def _read_batches(fd: int, path: Path) -> list[DiskBatch]:
    """Where each whole batch is; a torn tail is truncated away."""
    size = os.fstat(fd).st_size
    batches: list[DiskBatch] = []
    offset = 0
    # A file begun after retention trimmed the region starts where the region
    # did then, not at logical offset 0; from there on the batches follow on.
    expected_first: int | None = None
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
            or (expected_first is not None and header.start_logical_offset != expected_first)
        ):
            raise LayoutError(
                f"{path}: batch {len(batches)} at byte {offset} is not the next batch of this "
                f"log (logical offset {header.start_logical_offset}, expected {expected_first}); "
                "the file holds different histories"
            )
        batches.append(
            DiskBatch(offset, header.start_logical_offset, header.num_msg, header.total_size)
        )
        expected_first = header.start_logical_offset + header.num_msg
        offset = end
    if offset != size:
        logger.warning("%s: cutting off %d bytes of a torn last batch", path, size - offset)
        os.ftruncate(fd, offset)
    return batches


__all__ = [
    "DiskBatch",
    "DiskLog",
    "DiskStatistics",
    "SyncResult",
    "WriteJob",
    "file_name",
    "write_and_sync",
]
