"""What the broker counts, and the frozen snapshot it hands out."""

from __future__ import annotations

import collections
import logging

import attrs

from ..errors import ErrorCode
from ..log import CxlStatistics, DiskStatistics
from ..log.sequencer import SequencerStatistics
from ..wire import BatchHeader
from .acks import DialBackStatistics
from .staging import StagingPoolStatistics


@attrs.define
class IngestCounters:
    """Counters the connection tasks keep."""

    connections_accepted: int = 0
    connections_refused: int = 0
    batches_received: int = 0
    messages_received: int = 0
    bytes_received: int = 0
    batches_discarded: int = 0
    internal_errors: int = 0
    errors: collections.Counter[str] = attrs.Factory(collections.Counter)
    shutdown_notices: int = 0

    def count_received(self, header: BatchHeader) -> None:
        """A whole, valid batch arrived."""
        self.batches_received += 1
        self.messages_received += header.num_msg
        self.bytes_received += header.total_size

    def count_error(self, code: ErrorCode) -> None:
        """An error frame with ``code`` is being sent.

        Error 5 is what every client is told at a graceful shutdown: expected,
        not a fault, so it is counted in :attr:`shutdown_notices` instead.
        """
        if code == ErrorCode.SHUTTING_DOWN:
            self.shutdown_notices += 1
        else:
            self.errors[code.name.lower()] += 1


def error_frame_log_level(code: ErrorCode) -> int:
    """How loudly to log sending an error frame: a fault is a warning; error 5
    at shutdown is expected and goes to INFO."""
    return logging.INFO if code == ErrorCode.SHUTTING_DOWN else logging.WARNING


@attrs.frozen
class BrokerStatistics:
    """A snapshot of everything the broker counts.

    Attributes:
        connections: Open connections by :class:`ConnectionPhase` value.
        pool: Staging pool occupancy.
        log: CXL log counters (commits, full events, segments).
        errors: Error frames sent for faults, by lower-case error code name.
        shutdown_notices: Connections sent error 5 because the broker is
            shutting down (expected at a shutdown, so not in ``errors``).
        paused: Whether the pool monitor is holding receivers.
        pauses: Times the pool monitor paused receivers.
        resumes: Times it resumed them.
        allocation_retries: Reservation attempts retried after a full log.
        backoff_seconds: Total time spent in those retries' sleeps.
        allocation_failures: Batches refused after every retry (error 4).
        log_full_waits: Batches that waited for retention to make room in a
            full region (``network.log_full_timeout_s``).
        log_full_wait_seconds: Time they waited, in all.
        log_full_timeouts: Batches that waited the whole timeout (error 4).
        log_full_held: Batches waiting for room now: their publishers are
            held (not read) meanwhile.
        segments_reclaimable: Allocation units retention would free now
            (``log`` has the free and used ones).
        queued_batches: Staged batches waiting for an allocator.
        dial_backs: Dial-back ack connection counters.
        disk: Disk log counters (None without ``storage.dir``).
        order_waits: Committed batches of order-5 topics whose acks wait
            for their place in the total order.
        sequencer: The sequencer's counters and lag (broker 0 only, else None).
    """

    connections: dict[str, int]
    connections_accepted: int
    connections_refused: int
    batches_received: int
    messages_received: int
    bytes_received: int
    batches_committed: int
    messages_committed: int
    bytes_committed: int
    batches_discarded: int
    pool: StagingPoolStatistics
    paused: bool
    pauses: int
    resumes: int
    allocation_retries: int
    backoff_seconds: float
    allocation_failures: int
    log_full_waits: int
    log_full_wait_seconds: float
    log_full_timeouts: int
    log_full_held: int
    segments_reclaimable: int
    queued_batches: int
    errors: dict[str, int]
    shutdown_notices: int
    internal_errors: int
    log: CxlStatistics
    dial_backs: DialBackStatistics
    disk: DiskStatistics | None
    order_waits: int = 0
    sequencer: SequencerStatistics | None = None

    def summary(self) -> str:
        """One log line: what moved and where the pressure is."""
        busy = ",".join(f"{k}={v}" for k, v in sorted(self.connections.items()) if v)
        return (
            f"conns[{busy or 'none'}] recv {self.batches_received}b/{self.messages_received}m/"
            f"{self.bytes_received / 2**20:.1f}MiB committed {self.batches_committed}b/"
            f"{self.messages_committed}m pool {self.pool.used}/{self.pool.num_buffers} "
            f"(peak {self.pool.peak_used}) pauses {self.pauses} retries {self.allocation_retries} "
            f"ring_full {self.log.ring_full} log_full {self.log.log_full} "
            f"units free/used/reclaimable {self.log.segments_free}/{self.log.segments_used}/"
            f"{self.segments_reclaimable} errors {sum(self.errors.values())}"
            + (f" order_waits {self.order_waits}" if self.order_waits else "")
            + (
                f" sequencer {self.sequencer.batches_ordered}b lag {self.sequencer.lag_batches}b/"
                f"{self.sequencer.lag_oldest_s:.3f}s"
                if self.sequencer is not None and self.sequencer.topics
                else ""
            )
            + (
                f" HELD: {self.log_full_held} batch(es) wait for retention to free log space"
                if self.log_full_held
                else ""
            )
        )
