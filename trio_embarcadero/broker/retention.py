"""The retention task: let each stream's oldest segments go when its topic's
retention says so.

Every ``cxl.reclaim_interval_ms`` it asks the log core, stream by stream, how
many of the oldest whole segments the topic's ``retention_bytes`` and
``retention_ms`` let go (:meth:`~trio_embarcadero.log.CxlLog.reclaimable_segments`:
Kafka's rule, never the segment being written, never one a subscriber is
sending from) and reclaims them. With a disk log only segments whose every
batch is durable on disk go, so ack level 2 never loses what it promised.

Batches held by a full region (``network.log_full_timeout_s``) are woken
after every pass that freed a segment: they retry on reclaims, not on a timer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NoReturn, Protocol

import trio

from ..log import CxlLog, Stream
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
    """Reclaim what ``retention`` lets go of ``stream`` now; returns the segments freed."""
    done = 0
    for _ in releasable(log, stream, retention, durability):
        if log.reclaim_oldest(stream) is None:
            break  # the topic was deleted meanwhile
        done += 1
    return done


def reclaimable_units(
    log: CxlLog, retention_for: Callable[[str], Retention], durability: Durability | None
) -> int:
    """Allocation units retention would free now, in every stream."""
    return sum(
        1 << segment.order
        for stream in log.streams()
        for segment in releasable(log, stream, retention_for(stream.topic), durability)
    )


def retention_configured(log: CxlLog, retention_for: Callable[[str], Retention]) -> bool:
    """Whether any topic of the region has a retention limit, so that a full
    region may get room back; when none has, it never will."""
    for topic in log.topics():
        retention = retention_for(topic)
        if retention.retention_bytes >= 0 or retention.retention_ms >= 0:
            return True
    return False


def make_room(
    log: CxlLog, retention_for: Callable[[str], Retention], durability: Durability | None
) -> int:
    """Reclaim whatever retention lets go in every stream now (the region
    is full); returns the segments freed."""
    return sum(
        reclaim_stream(log, stream, retention_for(stream.topic), durability)
        for stream in log.streams()
    )


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
        for stream in log.streams():
            freed = reclaim_stream(log, stream, retention_for(stream.topic), durability)
            if freed:
                freed_any = True
                logger.info(
                    "retention of %r: %d segment(s) reclaimed; first retained offset %d",
                    stream.topic,
                    freed,
                    stream.start_offset,
                )
        if room_made is not None and (
            freed_any or (held is not None and held() and log.map.statistics().free)
        ):
            room_made()
