"""The disk log behind ack level 2: committed batches, appended and fdatasync'ed.

The CXL region lives in RAM. With ``storage.dir`` set, every batch this broker
commits is also appended to the disk log of its (topic, broker) stream exactly
as it sits in the log (its 128-byte header, ``batch_complete = 1`` and the
assigned logical offsets included, then its records), in commit order. A
stream's disk log is a run of files, Kafka's segments:
``<dir>/<topic>@<broker id>.<first logical offset, 20 digits>.log``. The
newest one is appended to; once the next batch would take it past
``storage.segment_mb`` a new file begins. Retention trims a stream's disk log
by whole files, oldest first (:meth:`DiskLog.trimmable`, :meth:`DiskLog.trim`):
with a disk log it is the disk tier that a topic's retention limits.

This module is the disk format and its bookkeeping; it knows nothing of Trio.
The broker's writer task (:mod:`trio_embarcadero.broker.durability`) tells it
what was committed, takes the pending appends as :meth:`DiskLog.take_jobs`,
runs :func:`write_and_sync` on a worker thread (group commit: one
``fdatasync`` per file covers every batch committed since the last) and hands
the finished jobs back to :meth:`DiskLog.jobs_done`, which says how far each
stream is durable. A write or sync that fails does not raise:
:func:`write_and_sync` reports the jobs it finished and the
:class:`~trio_embarcadero.errors.StorageError` that stopped it, and the
writer stops.

A file's synced data is only as durable as its directory entry: a file
created after the last sync of its directory can vanish whole in a power
loss. So every directory this module creates is made durable in its parent
(``fsync`` of the parent) and every new log file in the directory before
any of its batches counts as synced. A file is only begun once the one
before it is synced, so a crash never leaves a gap between two files.

On start the disk log is reconciled with the CXL region:

* a torn last batch (the machine died mid-append) is cut off;
* the region has fewer batches than the disk (it was lost: a reboot, or the
  file was removed): the missing batches are replayed into it, getting the
  same logical offsets again; of a stream the region lost whole, only the
  newest batches that fit comfortably (see :meth:`DiskLog._replay_missing`),
  the older ones staying on disk only. A batch of an order-5 topic is
  written to disk only once it is ordered and the broker stamped its
  records (:meth:`DiskLog.take_jobs`, see :mod:`.stamps`), so its header
  and records hold its total orders; replayed, it is marked restored
  (``BH_RESTORED``) with its total order in the header, and the sequencer
  gives it that place again (one the sequencer went past, its ``ordered``
  word 2, gets that word again and stays out of the order); the broker
  then stamps it again (its stamped word is not replayed: given a place
  anew, it gets other total orders);
* the region has more batches (they were acked at level 1 but not synced
  before a crash): the writer appends them.

A stream that has no file yet (``storage.dir`` added to a broker that ran
without one, or the files removed) gets one from its first retained batch:
what retention trimmed before is in neither tier. A file of the earlier
one-file-per-stream form (``<topic>@<broker id>.log``) is renamed to the
segment name of its first batch.

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
from ..wire import BATCH_HEADER_SIZE, BatchHeader, encode_topic, scan_records, unpack_batch_header
from .layout import (
    BH_ORDERED,
    BH_RESTORED,
    BH_TOTAL_ORDER,
    NEVER_ORDERED,
    U32,
    U64,
    read_topic_order,
)
from .layout import file_name as file_name
from .layout import parse_file_name as parse_file_name
from .ownership import BrokerLock, claim_disk_log, open_private_file, sync_directory
from .region import CxlLog, Reservation, Stream
from .stamps import is_stamped

logger = logging.getLogger(__name__)

# Writes go out in runs of at most this many buffers (os.writev's IOV_MAX)
# and about this many bytes.
_IOV_MAX = 1024
_WRITE_BYTES = 256 * 2**20
#: ``storage.segment_mb``'s default, in bytes.
DEFAULT_SEGMENT_BYTES = 256 * 2**20


@attrs.frozen
class DiskStatistics:
    """Counters of the disk log.

    Attributes:
        batches_written: Batches appended and synced.
        bytes_written: Their bytes, headers included.
        syncs: Write-and-sync rounds.
        last_sync_seconds: How long the last round took.
        batches_replayed: Batches replayed into the region at start-up.
        waiting_batches: Batches committed and not yet synced.
        files: Disk log files of every stream.
        bytes_retained: Synced bytes the disk log holds now.
        files_trimmed: Files retention removed.
        bytes_trimmed: Their bytes.
    """

    batches_written: int
    bytes_written: int
    syncs: int
    last_sync_seconds: float
    batches_replayed: int
    waiting_batches: int
    files: int = 0
    bytes_retained: int = 0
    files_trimmed: int = 0
    bytes_trimmed: int = 0


class DiskSegment:
    """One file of a stream's disk log.

    Attributes:
        path: The file.
        first_offset: The logical offset of its first batch (in its name).
        fd: Open for appending and reading; -1 until the writer creates it,
            and once it was trimmed and no reader holds it.
        end: Bytes of its synced batches (headers included).
        batches: Its synced batches.
        last_ns: When a batch was last synced to it (its mtime when found at
            start-up): retention's age of the file.
    """

    def __init__(self, path: Path, first_offset: int, mode: int, fd: int = -1) -> None:
        self.path = path
        self.first_offset = first_offset
        self.mode = mode  # permission bits, for the writer that creates it
        self.fd = fd
        self.end = 0
        self.batches = 0
        self.last_ns = 0
        # Bytes once the jobs taken are written: where the next batch goes.
        self.planned = 0
        # Whether the directory entry is known to be durable: files found at
        # start-up are (open() syncs the directory), new ones once the
        # writer has synced the directory after creating them.
        self.entry_durable = fd >= 0
        # Subscribers reading it on a worker thread: a trimmed file's
        # descriptor is closed only once they are done (see DiskLog.pinned).
        self.readers = 0
        self.trimmed = False

    def _close_if_unused(self) -> None:
        if self.trimmed and self.readers == 0 and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@attrs.frozen
class DiskBatch:
    """Where one synced batch sits in its stream's disk log.

    Attributes:
        position: Byte offset of its header in its file.
        first_offset: Logical offset of its first record.
        num_msg: Records in it.
        total_size: Bytes of its records (the header not included).
        segment: The file that holds it.
    """

    position: int
    first_offset: int
    num_msg: int
    total_size: int
    segment: DiskSegment = attrs.field(eq=False, repr=False)


class _StreamLog:
    """The disk log of one stream: its files and their synced batches."""

    def __init__(self, segments: list[DiskSegment], batches: list[DiskBatch], base: int) -> None:
        self.segments = segments
        # The synced batches, in order, and their first offsets (to bisect);
        # only the event loop changes them (jobs_done, trim).
        self.batches = batches
        self.index_first = [b.first_offset for b in batches]
        # The stream's number of the first batch held: a disk log begun
        # after retention trimmed the region, or trimmed itself, starts past 0.
        self.base = base
        # The stream's batches before this number are on disk and synced
        # (or were trimmed).
        self.synced = base + len(batches)
        self.incarnation = -1  # of the topic it holds (-1: as found at start-up)

    def close(self) -> None:
        """Let every file go (the topic was deleted, or the broker stops)."""
        for segment in self.segments:
            segment.trimmed = True
            segment._close_if_unused()


@attrs.frozen
class _Part:
    """Appends to one file: its buffers and their index entries."""

    segment: DiskSegment
    views: list[memoryview] = attrs.field(factory=list)
    # (first offset, num_msg, total_size) of each view: the file's index after the sync
    batches: list[tuple[int, int, int]] = attrs.field(factory=list)


@attrs.frozen
class WriteJob:
    """Appends to one stream's files, then their syncs.

    Attributes:
        topic: The stream's topic.
        upto: The stream's committed batch count these bring the disk log to.
    """

    topic: str
    upto: int
    _stream: _StreamLog
    _parts: list[_Part]


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
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
    ) -> None:
        self.directory = directory
        self._log = log
        self._mode = mode
        self._segment_bytes = segment_bytes
        self._owner: BrokerLock | None = None
        self._interval = sync_interval
        self._sync_bytes = sync_bytes
        self._streams: dict[str, _StreamLog] = {}
        self.waiting_batches = 0
        self.waiting_bytes = 0
        self._batches_written = 0
        self._bytes_written = 0
        self._syncs = 0
        self._last_sync = 0.0
        self._replayed = 0
        self._files_trimmed = 0
        self._bytes_trimmed = 0

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
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
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
            segment_bytes: A new file begins once the next batch would take
                the newest past this size.

        Raises:
            AlreadyServedError: Another live process serves this broker id
                on the directory.
            UnsafeFileError: A file is a symbolic link or another user's.
            LayoutError: A disk log disagrees with the CXL region.
            OSError: The directory or a file cannot be used.
        """
        owner = claim_disk_log(directory, log.broker_id, mode=mode) if lock is None else lock
        disk = cls(Path(directory), log, sync_interval, sync_bytes, mode, segment_bytes)
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
        found: dict[str, list[tuple[int, Path]]] = {}
        for name in sorted(os.listdir(self.directory)):
            parsed = parse_file_name(name)
            if parsed is None or parsed[1] != self._log.broker_id:
                continue
            topic, _, first = parsed
            path = self.directory / name
            if reset:
                path.unlink()
                continue
            try:
                encode_topic(topic)
            except ValueError:
                logger.warning("ignoring %s: not a topic's disk log", path)
                continue
            if first is None:
                first, path = self._rename_single_file(topic, path)
            found.setdefault(topic, []).append((first, path))
        for topic, files in found.items():
            self._recover(topic, sorted(files))
        # Make what is there durable as it is now: the entries of the files
        # found, and the removal of those a reset discarded (else they could
        # come back after a power loss and be replayed).
        sync_directory(self.directory)
        self._replay_missing()
        # Batches committed in the region but not on disk (acked at level 1,
        # not yet synced when the broker stopped) are the writer's first job.
        for stream in self._log.streams():
            known = self._streams.get(stream.topic)
            # A stream with no file yet gets one from its first retained batch.
            for k in range(known.synced if known else stream.first_batch, stream.batches):
                self.waiting_batches += 1
                self.waiting_bytes += BATCH_HEADER_SIZE + stream.committed_batch(k).total_size

    def _rename_single_file(self, topic: str, path: Path) -> tuple[int, Path]:
        """Give a file of the one-file-per-stream form its segment name."""
        with path.open("rb") as file:
            raw = file.read(BATCH_HEADER_SIZE)
        # (An empty one is removed by _recover whatever its name.)
        first = 0
        if len(raw) == BATCH_HEADER_SIZE:
            first = unpack_batch_header(raw).start_logical_offset
        new = path.with_name(file_name(topic, self._log.broker_id, first))
        if new.exists():
            raise LayoutError(f"{path}: cannot rename it to {new.name}: that file exists")
        path.rename(new)
        logger.info("renamed %s to %s (a disk log is a run of files now)", path.name, new.name)
        return first, new

    def _recover(self, topic: str, files: list[tuple[int, Path]]) -> None:
        """Read ``topic``'s files (in offset order) and match them with the region."""
        stream_log = self._streams[topic] = _StreamLog([], [], 0)
        batches = stream_log.batches
        for first, path in files:
            fd = open_private_file(str(path), os.O_RDWR | os.O_APPEND, self._mode, "disk log")
            segment = DiskSegment(path, first, self._mode, fd)
            # Kept from here on: close() closes it if anything below fails.
            stream_log.segments.append(segment)
            found = _read_batches(segment)
            if not found:
                # Created, then the broker stopped before a batch was in it
                # (or all it held was torn): nothing to keep. The writer
                # begins the file again when it has a batch for it.
                stream_log.segments.pop()
                os.close(fd)
                path.unlink()
                continue
            if found and found[0].first_offset != first:
                raise LayoutError(
                    f"{path}: its name says it begins at logical offset {first} but its first "
                    f"batch is at {found[0].first_offset}; rename or remove it"
                )
            if batches and first != batches[-1].first_offset + batches[-1].num_msg:
                raise LayoutError(
                    f"{path}: the disk log of {topic!r} jumps from logical offset "
                    f"{batches[-1].first_offset + batches[-1].num_msg} to {first} here; the "
                    "offsets between are missing (move the files from this one on aside, or "
                    "start with --reset to discard the stream)"
                )
            segment.batches = len(found)
            segment.end = segment.planned = os.fstat(fd).st_size
            segment.last_ns = os.stat(path).st_mtime_ns
            batches += found
        stream_log.index_first = [b.first_offset for b in batches]
        stream = self._log.stream(topic)
        path = batches[0].segment.path if batches else files[0][1]
        stream_log.base = _file_base(path, stream, batches)
        stream_log.synced = stream_log.base + len(batches)
        # Batches the region no longer holds (reclaimed) are the disk's alone.
        for k in range(
            max(stream_log.base, stream.first_batch), min(stream_log.synced, stream.batches)
        ):
            ours = stream.committed_batch(k).first_offset
            theirs = batches[k - stream_log.base]
            if theirs.first_offset != ours:
                raise LayoutError(
                    f"{theirs.segment.path}: batch {k} starts at logical offset "
                    f"{theirs.first_offset} on disk but at {ours} in the CXL region; they "
                    "hold different histories (start with --reset to discard both)"
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
            (stream, stream_log)
            for topic, stream_log in self._streams.items()
            if (stream := self._log.stream(topic)).batches < stream_log.synced
        ]
        if not needing:
            return
        free = self._log.map.statistics().free * self._log.geometry.unit_size
        share = free // 2 // len(needing)
        for stream, stream_log in needing:
            # Batch numbers are the stream's; the list starts at its base.
            base = stream_log.base
            first = stream.batches
            if not stream.index_first:
                first = max(first, base + _tail_start(stream_log.batches, share))
                if first > stream.batches:
                    self._log.begin_at(stream, first, stream_log.batches[first - base].first_offset)
            for found in stream_log.batches[first - base :]:
                self._replay(stream, found)
            disk_only = (
                f"; {first - base} batch(es) (offsets {stream_log.index_first[0]}.."
                f"{stream.start_offset - 1}) stay on disk only"
                if first > base
                else ""
            )
            logger.info(
                "replayed %d batch(es) of %r from its disk log into the region%s",
                stream_log.synced - first,
                stream.topic,
                disk_only,
            )

    def _replay(self, stream: Stream, found: DiskBatch) -> None:
        fd, path = found.segment.fd, found.segment.path
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
        region = self._log.region.data
        if header.ordered and read_topic_order(region, self._log.geometry, stream.topic_index) == 5:
            at = reservation.header_offset
            if header.ordered == NEVER_ORDERED:
                # The sequencer went past it: it stays out of the total order.
                U32.pack_into(region, at + BH_ORDERED, NEVER_ORDERED)
            else:
                # It had its place in the total order (its records keep their
                # total_order fields): the sequencer gives it the same again.
                U64.pack_into(region, at + BH_TOTAL_ORDER, header.total_order)
                U32.pack_into(region, at + BH_RESTORED, 1)
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
        for stream_log in self._streams.values():
            for segment in stream_log.segments:
                if segment.fd >= 0:
                    os.close(segment.fd)
                    segment.fd = -1
        self._streams.clear()
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
        return self._stream_log(stream).synced

    def committed(self, reservation: Reservation) -> None:
        """Count a newly committed batch as waiting for the disk."""
        self.waiting_batches += 1
        self.waiting_bytes += BATCH_HEADER_SIZE + reservation.header.total_size

    def _stream_log(self, stream: Stream) -> _StreamLog:
        stream_log = self._streams.get(stream.topic)
        if stream_log is not None and stream_log.incarnation == -1:
            stream_log.incarnation = stream.incarnation
        if stream_log is None or stream_log.incarnation != stream.incarnation:
            if stream_log is not None:
                # The topic was deleted (its files renamed aside) and created
                # again: its old files are no longer this broker's.
                stream_log.close()
            # A new disk log from the stream's first batch (the first
            # retention kept: the ones before are in no tier). Its files
            # are created by the writer (write_and_sync, on its worker
            # thread), so the event loop never waits for the file system.
            stream_log = self._streams[stream.topic] = _StreamLog([], [], stream.first_batch)
            stream_log.incarnation = stream.incarnation
        return stream_log

    def take_jobs(self) -> list[WriteJob]:
        """Everything committed and not yet on disk, as one job per stream."""
        self.waiting_batches = self.waiting_bytes = 0
        region = self._log.region
        jobs = []
        for stream in self._log.streams():
            if stream.batches == 0:
                continue
            stream_log = self._stream_log(stream)
            parts: list[_Part] = []
            upto = self._writable(stream, stream_log.synced)
            self.waiting_batches += stream.batches - upto
            for k in range(stream_log.synced, upto):
                batch = stream.committed_batch(k)
                size = BATCH_HEADER_SIZE + batch.total_size
                segment = stream_log.segments[-1] if stream_log.segments else None
                if segment is None or (
                    segment.planned and segment.planned + size > self._segment_bytes
                ):
                    # Only ever the newest file grows; the next begins here.
                    name = file_name(stream.topic, self._log.broker_id, batch.first_offset)
                    segment = DiskSegment(self.directory / name, batch.first_offset, self._mode)
                    stream_log.segments.append(segment)
                if not parts or parts[-1].segment is not segment:
                    parts.append(_Part(segment))
                end = batch.payload_offset + batch.total_size
                parts[-1].views.append(region[batch.header_offset : end].data)
                parts[-1].batches.append((batch.first_offset, batch.num_msg, batch.total_size))
                segment.planned += size
            if parts:
                jobs.append(WriteJob(stream.topic, upto, stream_log, parts))
        return jobs

    def _writable(self, stream: Stream, synced: int) -> int:
        """How many of ``stream``'s committed batches may go to disk now: all
        of them, but for an order-5 topic only those before its first one not
        settled yet: a batch goes to disk once it is ordered and this broker
        wrote its records' total orders (stamped), or is never ordered, so a
        region rebuilt from the disk gets them back. (Not a stream's last
        batch alone tells: a publish session's batch waiting for its
        predecessor is ordered after later batches of its stream.)"""
        region, geometry = self._log.region.data, self._log.geometry
        if read_topic_order(region, geometry, stream.topic_index) != 5:
            return stream.batches

        def settled(k: int) -> bool:
            header = stream.committed_batch(k).header_offset
            if U32.unpack_from(region, header + BH_ORDERED)[0] == NEVER_ORDERED:
                return True
            return is_stamped(region, header)

        # Forward, from the first not on disk: a poll reads only what was
        # committed since the last one wrote.
        return next((k for k in range(synced, stream.batches) if not settled(k)), stream.batches)

    def jobs_done(self, jobs: list[WriteJob], written: int, seconds: float) -> None:
        """Record jobs that :func:`write_and_sync` finished: each job's stream
        is now durable up to ``job.upto`` batches."""
        self._last_sync = seconds
        self._syncs += 1
        self._bytes_written += written
        now = self._log.clock()
        for job in jobs:
            stream_log = job._stream
            self._batches_written += job.upto - stream_log.synced
            stream_log.synced = job.upto
            for part in job._parts:
                segment = part.segment
                for first, num_msg, total in part.batches:
                    stream_log.batches.append(
                        DiskBatch(segment.end, first, num_msg, total, segment)
                    )
                    stream_log.index_first.append(first)
                    segment.end += BATCH_HEADER_SIZE + total
                    segment.batches += 1
                segment.last_ns = now

    # -- retention ----------------------------------------------------------------

    def trimmable(self, topic: str, *, retention_bytes: int, retention_ms: int, now_ns: int) -> int:
        """How many of ``topic``'s oldest files its retention lets go now.

        Kafka's rule, on the disk tier: the oldest whole files go while what
        remains still holds ``retention_bytes``, and every file whose last
        batch was synced more than ``retention_ms`` ago; never the newest file
        that holds synced batches, nor any after it. -1 means no limit.
        """
        stream_log = self._streams.get(topic)
        if stream_log is None:
            return 0
        segments = stream_log.segments
        newest = max((i for i, s in enumerate(segments) if s.batches), default=0)
        remaining = sum(segment.end for segment in segments[: newest + 1])
        count = 0
        while count < newest:
            segment = segments[count]
            too_big = retention_bytes >= 0 and remaining - segment.end >= retention_bytes
            too_old = retention_ms >= 0 and now_ns - segment.last_ns > retention_ms * 1_000_000
            if not (too_big or too_old):
                break
            remaining -= segment.end
            count += 1
        return count

    def trim(self, topic: str, count: int) -> list[DiskSegment]:
        """Let ``topic``'s oldest ``count`` files go (see :meth:`trimmable`).

        They leave the index at once, so no new reader finds them; their
        descriptors close once the readers that have them are done. The
        caller removes the files with :func:`remove_files` (blocking: on a
        worker thread). A crash before that leaves them on disk, still in
        order; the next start reads them again and retention trims them again.

        Returns:
            The files to remove.
        """
        stream_log = self._streams[topic]
        gone = stream_log.segments[:count]
        del stream_log.segments[:count]
        batches = sum(segment.batches for segment in gone)
        del stream_log.batches[:batches]
        del stream_log.index_first[:batches]
        stream_log.base += batches
        for segment in gone:
            segment.trimmed = True
            segment._close_if_unused()
            self._files_trimmed += 1
            self._bytes_trimmed += segment.end
        return gone

    # -- reading the disk tier ----------------------------------------------------

    def first_offset(self, topic: str) -> int | None:
        """The first logical offset ``topic``'s disk log holds synced, or None
        when it holds none (a file begun after retention trimmed the region
        starts past 0, and retention trims the disk log itself)."""
        stream_log = self._streams.get(topic)
        if stream_log is None or not stream_log.index_first:
            return None
        return stream_log.index_first[0]

    def batch_holding(self, topic: str, offset: int) -> DiskBatch | None:
        """The synced batch of ``topic`` that holds logical ``offset``, or None
        when the disk log holds no such record (yet, or any longer)."""
        stream_log = self._streams.get(topic)
        if stream_log is None or not stream_log.batches or offset < stream_log.index_first[0]:
            return None
        batch = stream_log.batches[bisect.bisect_right(stream_log.index_first, offset) - 1]
        return batch if offset < batch.first_offset + batch.num_msg else None

    @contextlib.contextmanager
    def pinned(self, batch: DiskBatch) -> Iterator[None]:
        """Keep ``batch``'s file open while it is read (on a worker thread),
        even if retention trims it meanwhile."""
        segment = batch.segment
        segment.readers += 1
        try:
            yield
        finally:
            segment.readers -= 1
            segment._close_if_unused()

    def read_records(self, batch: DiskBatch) -> npt.NDArray[np.uint8]:
        """The records of ``batch`` (from :meth:`batch_holding`), read from
        its file. Blocking: the broker calls it on a worker thread, inside
        :meth:`pinned`.

        Raises:
            StorageError: The file cannot be read, or is shorter than it was.
        """
        return self.read_batch(batch)[1]

    def read_batch(self, batch: DiskBatch) -> tuple[BatchHeader, npt.NDArray[np.uint8]]:
        """The header and records of ``batch``, as :meth:`read_records`: an
        order-5 topic's header holds its ``ordered`` word and total order
        (a batch goes to disk once it is ordered, or never will be)."""
        segment = batch.segment
        header = bytearray(BATCH_HEADER_SIZE)
        data = np.empty(batch.total_size, dtype=np.uint8)
        if segment.fd < 0:  # trimmed before it was pinned
            raise StorageError("read", str(segment.path), errno.ENOENT)
        with _failing_as("read", segment.path):
            got = os.preadv(segment.fd, [header, data.data], batch.position)
        if got != BATCH_HEADER_SIZE + batch.total_size:
            raise StorageError("read", str(segment.path), errno.EIO)
        return unpack_batch_header(header), data

    def statistics(self) -> DiskStatistics:
        """Return a snapshot of the disk log's counters."""
        files = [s for stream_log in self._streams.values() for s in stream_log.segments]
        return DiskStatistics(
            batches_written=self._batches_written,
            bytes_written=self._bytes_written,
            syncs=self._syncs,
            last_sync_seconds=self._last_sync,
            batches_replayed=self._replayed,
            waiting_batches=self.waiting_batches,
            files=sum(1 for s in files if s.fd >= 0),
            bytes_retained=sum(s.end for s in files),
            files_trimmed=self._files_trimmed,
            bytes_trimmed=self._bytes_trimmed,
        )


def stream_files(directory: str) -> dict[tuple[str, int], list[tuple[int, int]]]:
    """Every disk log file in ``directory``, from the names alone (no lock,
    nothing opened): (topic, broker id) -> [(first logical offset, bytes)],
    in offset order. For tools that show what a disk log holds.

    Raises:
        OSError: The directory cannot be listed.
    """
    found: dict[tuple[str, int], list[tuple[int, int]]] = {}
    for entry in os.scandir(directory):
        parsed = parse_file_name(entry.name)
        if parsed is None:
            continue
        topic, broker, first = parsed
        if first is None:
            continue  # the earlier one-file form: renamed by the next start
        with contextlib.suppress(FileNotFoundError):  # trimmed meanwhile
            found.setdefault((topic, broker), []).append((first, entry.stat().st_size))
    return {key: sorted(files) for key, files in found.items()}


def remove_files(segments: list[DiskSegment]) -> None:
    """Remove trimmed files (from :meth:`DiskLog.trim`). Blocking: the broker
    runs it on a worker thread. A file that cannot be removed is logged and
    left: retention trims it again after the next start."""
    for segment in segments:
        try:
            os.unlink(segment.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.warning("cannot remove the trimmed disk log file %s: %s", segment.path, exc)


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
    """Append each job's buffers to its files and fdatasync them. Blocking: the
    broker runs it on a worker thread.

    A file's first append creates it; the directory is then synced too,
    before this returns, so that no batch of a new file counts as durable
    while the file itself could still vanish. A job's files are written in
    order, each synced before the next is begun.

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
            created = False
            for part in job._parts:
                segment = part.segment
                if segment.fd < 0:
                    with _failing_as("create", segment.path):
                        # O_APPEND: every write goes to the end, whatever the offset.
                        segment.fd = open_private_file(
                            str(segment.path),
                            os.O_RDWR | os.O_APPEND | os.O_CREAT,
                            segment.mode,
                            "disk log",
                        )
                with _failing_as("write", segment.path):
                    written += _append(segment.fd, part.views)
                with _failing_as("fdatasync", segment.path):
                    os.fdatasync(segment.fd)
                created = created or not segment.entry_durable
            (new if created else done).append(job)
        if new:
            directory = new[0]._parts[0].segment.path.parent  # one directory holds every file
            with _failing_as("fsync directory", directory):
                sync_directory(directory)
            for job in new:
                for part in job._parts:
                    part.segment.entry_durable = True
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


def _read_batches(segment: DiskSegment) -> list[DiskBatch]:
    """Where each whole batch of ``segment``'s file is; a torn tail is
    truncated away."""
    fd, path = segment.fd, segment.path
    size = os.fstat(fd).st_size
    batches: list[DiskBatch] = []
    offset = 0
    # Within a file each batch follows on from the one before.
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
            DiskBatch(
                offset, header.start_logical_offset, header.num_msg, header.total_size, segment
            )
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
    "DiskSegment",
    "DiskStatistics",
    "SyncResult",
    "WriteJob",
    "file_name",
    "parse_file_name",
    "remove_files",
    "stream_files",
    "write_and_sync",
]
