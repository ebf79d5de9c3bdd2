"""The retention task: let each topic's oldest data go when its retention says so.

Every ``cxl.reclaim_interval_ms`` it applies each topic's ``retention_bytes``
and ``retention_ms`` (Kafka's rule: the oldest whole segments go while what
remains still holds the limit) to what the topic keeps in all:

* without a disk log, to the region: the log core says how many of a
  stream's oldest segments may go
  (:meth:`~trio_embarcadero.log.CxlLog.reclaimable_segments`: never the
  segment being written, never one a subscriber is sending from) and they
  are reclaimed;
* with a disk log (``storage.dir``), to the disk tier: a stream's oldest disk
  log files go (:meth:`~trio_embarcadero.log.DiskLog.trimmable`), and then
  the region's segments that hold only offsets below the disk log's new
  start. The region is otherwise a cache of the disk log: a full region
  drops its oldest durable segments (:func:`make_room`), whatever the
  topics' retention says, and subscribers read what it dropped from the disk
  log. Only segments whose every batch is durable on disk ever leave the
  region, so ack level 2 never loses what it promised.

Batches held by a full region (``network.log_full_timeout_s``) are woken
after every pass that freed a segment: they retry on reclaims, not on a timer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NoReturn, Protocol

import trio

from ..log import CxlLog, Stream
from ..log.disk import remove_files
from ..log.region import RetainedSegment
from .durability import Durability

logger = logging.getLogger(__name__)


class Retention(Protocol):
    """A topic's retention limits (-1: none)."""

    @property
    def retention_bytes(self) -> int: ...

    @property
    def retention_ms(self) -> int: ...


def releasable(
    log: CxlLog, stream: Stream, retention: Retention, durability: Durability | None
) -> list[RetainedSegment]:
    """The oldest segments of ``stream`` that ``retention`` lets go now."""
    count = log.reclaimable_segments(
        stream,
        retention_bytes=retention.retention_bytes,
        retention_ms=retention.retention_ms,
        now_ns=log.clock(),
    )
    return _durable_part(stream, count, durability)


def evictable(log: CxlLog, stream: Stream, durability: Durability) -> list[RetainedSegment]:
    """The oldest segments of ``stream`` the region may drop as a cache of
    the disk log: whole, durable on disk, not being read; never the last."""
    count = log.reclaimable_segments(stream, retention_bytes=0, retention_ms=-1, now_ns=0)
    return _durable_part(stream, count, durability)


def _durable_part(
    stream: Stream, count: int, durability: Durability | None
) -> list[RetainedSegment]:
    """The first of ``stream``'s oldest ``count`` segments that are all on disk."""
    durable = durability.disk.durable_batches(stream) if durability is not None else None
    segments = list(stream.segments)[:count]
    end = stream.first_batch
    for i, segment in enumerate(segments):
        end += segment.batches
        if durable is not None and end > durable:
            return segments[:i]  # not all of it is on disk yet
    return segments


def reclaim_stream(
    log: CxlLog, stream: Stream, retention: Retention, durability: Durability | None
) -> int:
    """Reclaim what ``retention`` lets go of ``stream``'s region now; with a
    disk log, the segments below the disk log's start (retention trimmed the
    disk log past them: see :func:`trim_disk`). Returns the segments freed."""
    if durability is None:
        segments = releasable(log, stream, retention, durability)
    else:
        disk_start = durability.disk.first_offset(stream.topic)
        if disk_start is None:
            return 0
        segments = _ending_by(stream, evictable(log, stream, durability), disk_start)
    done = 0
    for _ in segments:
        if log.reclaim_oldest(stream) is None:
            break  # the topic was deleted meanwhile
        done += 1
    return done


def _ending_by(
    stream: Stream, segments: list[RetainedSegment], offset: int
) -> list[RetainedSegment]:
    """The first of ``stream``'s oldest ``segments`` whose offsets all lie below ``offset``."""
    batches = 0
    for i, segment in enumerate(segments):
        batches += segment.batches
        end = stream.index_first[batches] if batches < len(stream.index_first) else None
        if (end if end is not None else stream.next_offset) > offset:
            return segments[:i]
    return segments


async def trim_disk(durability: Durability, topic: str, retention: Retention, now_ns: int) -> int:
    """Remove the oldest disk log files of ``topic`` that ``retention`` lets
    go now; returns how many."""
    disk = durability.disk
    count = disk.trimmable(
        topic,
        retention_bytes=retention.retention_bytes,
        retention_ms=retention.retention_ms,
        now_ns=now_ns,
    )
    if count:
        gone = disk.trim(topic, count)
        # Removing a large file takes the file system a while.
        await trio.to_thread.run_sync(remove_files, gone)
    return count


def reclaimable_units(
    log: CxlLog, retention_for: Callable[[str], Retention], durability: Durability | None
) -> int:
    """Allocation units retention (with a disk log: the cache) would free now,
    in every stream."""
    return sum(
        1 << segment.order
        for stream in log.streams()
        for segment in (
            evictable(log, stream, durability)
            if durability is not None
            else releasable(log, stream, retention_for(stream.topic), durability)
        )
    )


def retention_configured(
    log: CxlLog, retention_for: Callable[[str], Retention], durability: Durability | None = None
) -> bool:
    """Whether a full region may get room back: with a disk log it always
    may (its durable segments go); else only if some topic of the region has
    a retention limit. When not, it never will."""
    if durability is not None:
        return True
    for topic in log.topics():
        retention = retention_for(topic)
        if retention.retention_bytes >= 0 or retention.retention_ms >= 0:
            return True
    return False


def make_room(
    log: CxlLog, retention_for: Callable[[str], Retention], durability: Durability | None
) -> int:
    """Reclaim whatever retention lets go in every stream now (the region
    is full); returns the segments freed.

    With a disk log the region is its cache: when retention frees nothing,
    the oldest segment (by last commit) of any stream that is durable on
    disk and not being read goes; the caller calls again while it needs room.
    """
    freed = sum(
        reclaim_stream(log, stream, retention_for(stream.topic), durability)
        for stream in log.streams()
    )
    if freed or durability is None:
        return freed
    oldest: Stream | None = None
    oldest_ns = 0
    for stream in log.streams():
        candidates = evictable(log, stream, durability)
        if candidates and (oldest is None or candidates[0].last_commit_ns < oldest_ns):
            oldest, oldest_ns = stream, candidates[0].last_commit_ns
    if oldest is None:
        return 0
    log.reclaim_oldest(oldest)
    logger.debug(
        "region full: %r's oldest segment dropped (it is on disk); first offset in the region %d",
        oldest.topic,
        oldest.start_offset,
    )
    return 1


async def run_retention(
    log: CxlLog,
    retention_for: Callable[[str], Retention],
    durability: Durability | None,
    interval: float,
    *,
    room_made: Callable[[], None] | None = None,
    held: Callable[[], int] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Apply every topic's retention every ``interval`` seconds, until cancelled.

    ``room_made`` is called after a pass that freed segments, and after any
    pass while batches are ``held`` if the region has free units (another
    broker's retention freed them), so batches waiting for room try again.
    """
    task_status.started()
    while True:
        await trio.sleep(interval)
        freed_any = False
        for stream in list(log.streams()):
            retention = retention_for(stream.topic)
            if durability is not None:
                trimmed = await trim_disk(durability, stream.topic, retention, log.clock())
                if trimmed:
                    logger.info(
                        "retention of %r: %d disk log file(s) removed; first retained offset %d",
                        stream.topic,
                        trimmed,
                        durability.disk.first_offset(stream.topic),
                    )
            freed = reclaim_stream(log, stream, retention, durability)
            if freed:
                freed_any = True
                logger.log(
                    # With a disk log the region only follows the disk's start.
                    logging.DEBUG if durability is not None else logging.INFO,
                    "retention of %r: %d segment(s) reclaimed; first offset in the region %d",
                    stream.topic,
                    freed,
                    stream.start_offset,
                )
        if room_made is not None and (
            freed_any or (held is not None and held() and log.map.statistics().free)
        ):
            room_made()
