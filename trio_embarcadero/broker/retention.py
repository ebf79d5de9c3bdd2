"""The retention task: let each stream's oldest segments go when its topic's
retention says so.

Every ``cxl.reclaim_interval_ms`` it asks the log core, stream by stream, how
many of the oldest whole segments the topic's ``retention_bytes`` and
``retention_ms`` let go (:meth:`~trio_embarcadero.log.CxlLog.reclaimable_segments`:
Kafka's rule, never the segment being written, never one a subscriber is
sending from) and reclaims them. With a disk log only segments whose every
batch is durable on disk go, so ack level 2 never loses what it promised.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NoReturn, Protocol

import trio

from ..log import CxlLog, Stream
from .durability import Durability

logger = logging.getLogger(__name__)


class Retention(Protocol):
    """A topic's retention limits (-1: none)."""

    @property
    def retention_bytes(self) -> int: ...

    @property
    def retention_ms(self) -> int: ...


def reclaim_stream(
    log: CxlLog, stream: Stream, retention: Retention, durability: Durability | None
) -> int:
    """Reclaim what ``retention`` lets go of ``stream`` now; returns the segments freed."""
    count = log.reclaimable_segments(
        stream,
        retention_bytes=retention.retention_bytes,
        retention_ms=retention.retention_ms,
        now_ns=log.clock(),
    )
    durable = durability.disk.durable_batches(stream) if durability is not None else None
    done = 0
    for segment in list(stream.segments)[:count]:
        if durable is not None and stream.first_batch + segment.batches > durable:
            break  # not all of it is on disk yet
        if log.reclaim_oldest(stream) is None:
            break  # the topic was deleted meanwhile
        done += 1
    return done


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
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Apply every topic's retention every ``interval`` seconds, until cancelled."""
    task_status.started()
    while True:
        await trio.sleep(interval)
        for stream in log.streams():
            freed = reclaim_stream(log, stream, retention_for(stream.topic), durability)
            if freed:
                logger.info(
                    "retention of %r: %d segment(s) reclaimed; first retained offset %d",
                    stream.topic,
                    freed,
                    stream.start_offset,
                )
