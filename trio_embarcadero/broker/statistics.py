"""What the broker counts, and the frozen snapshot it hands out.

Counting is O(1) per batch: counters, and histograms of fixed buckets whose
counts sit in a list (a bisect over a dozen bounds finds the bucket). What
is derived (rates, the Prometheus exposition, the log line) is computed
when someone asks, from a snapshot.
"""

from __future__ import annotations

import bisect
import collections
import logging
from collections.abc import Sequence
from typing import Any

import attrs

from ..errors import ErrorCode
from ..log import CxlStatistics, DiskStatistics
from ..log.lease import LeaseStatistics
from ..log.sequencer import SequencerStatistics
from ..wire import BatchHeader
from .acks import DialBackStatistics
from .sessions import SessionStatistics
from .staging import StagingPoolStatistics

#: Bucket bounds (seconds) of the ack latency and disk sync histograms:
#: 0.5 ms to 10 s, about 2.5x apart.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

#: Bucket bounds (bytes) of the batch size histogram: 1 KiB to 32 MiB (the
#: largest segment), powers of two from 256 KiB on, where batches usually are.
BATCH_SIZE_BUCKETS: tuple[float, ...] = tuple(
    float(2**k) for k in (10, 12, 14, 16, 18, 19, 20, 21, 22, 23, 24, 25)
)


@attrs.frozen
class HistogramSnapshot:
    """A histogram's counts at one moment.

    Attributes:
        bounds: The upper bounds of the buckets (a value lands in the first
            bucket whose bound is >= it), ascending.
        counts: Observations per bucket, one more than ``bounds``: the last
            counts those above every bound.
        sum: The sum of every observation.
    """

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    sum: float

    @property
    def count(self) -> int:
        """Observations in all."""
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations <= it) pairs, ending with (inf, count):
        Prometheus' ``le`` buckets."""
        out, total = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += n
            out.append((bound, total))
        return out


class Histogram:
    """Observations counted in fixed buckets; O(1) each (a bisect over the
    few bounds, an increment, an addition).

    Args:
        bounds: The buckets' upper bounds, ascending.
    """

    __slots__ = ("_bounds", "_counts", "_sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        if list(bounds) != sorted(set(bounds)):
            raise ValueError(f"bucket bounds must be ascending and distinct: {bounds}")
        self._bounds = tuple(bounds)
        self._counts = [0] * (len(self._bounds) + 1)
        self._sum = 0.0

    def observe(self, value: float) -> None:
        """Count one observation."""
        self._counts[bisect.bisect_left(self._bounds, value)] += 1
        self._sum += value

    def snapshot(self) -> HistogramSnapshot:
        """The counts now."""
        return HistogramSnapshot(self._bounds, tuple(self._counts), self._sum)


def _latency_histograms() -> dict[int, Histogram]:
    return {1: Histogram(LATENCY_BUCKETS), 2: Histogram(LATENCY_BUCKETS)}


@attrs.define
class IngestCounters:
    """Counters the connection tasks keep.

    Attributes:
        batch_bytes: Sizes of the batches received whole (payload bytes).
        ack_latency: Per ack level (1, 2): seconds from a batch received
            whole to its messages counted as acked (stored in the log; at
            level 2 also synced to disk).
    """

    connections_accepted: int = 0
    connections_refused: int = 0
    batches_received: int = 0
    messages_received: int = 0
    bytes_received: int = 0
    batches_discarded: int = 0
    internal_errors: int = 0
    errors: collections.Counter[str] = attrs.Factory(collections.Counter)
    shutdown_notices: int = 0
    batch_bytes: Histogram = attrs.Factory(lambda: Histogram(BATCH_SIZE_BUCKETS))
    ack_latency: dict[int, Histogram] = attrs.Factory(_latency_histograms)

    def count_received(self, header: BatchHeader) -> None:
        """A whole, valid batch arrived."""
        self.batches_received += 1
        self.messages_received += header.num_msg
        self.bytes_received += header.total_size
        self.batch_bytes.observe(header.total_size)

    def count_acked(self, ack: int, seconds: float) -> None:
        """A batch of a publisher at ack level ``ack`` (1 or 2) was acked
        ``seconds`` after it was received whole."""
        histogram = self.ack_latency.get(ack)
        if histogram is not None:
            histogram.observe(seconds)

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
        batch_bytes: The sizes of the batches received.
        ack_latency: Per ack level (``"1"``, ``"2"``): seconds from a batch
            received whole to its ack.
        disk_sync_seconds: How long each write-and-sync round of the disk
            log took (None without ``storage.dir``).
        unit_bytes: The size of an allocation unit of the region (``log``
            counts units).
        draining: Whether the broker is shutting down (a graceful drain).
        order_waits: Committed batches of order-5 topics whose acks wait
            for their place in the total order.
        never_ordered: Committed batches of order-5 topics that turned out
            never to be ordered (a publish session's skipped batch_seq, or
            one the sequencer went past): their publishers got an error
            (2 or 10) in place of their acks.
        sequencer: The sequencer's counters and lag while this broker runs
            it (holds its lease), else None.
        sequencer_lease: Who holds the region's sequencer lease, at which
            epoch, and this broker's takeovers.
        sessions: Publish sessions (``client_req = 2``): the region's, this
            broker's connections, duplicates and waits.
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
    batch_bytes: HistogramSnapshot
    ack_latency: dict[str, HistogramSnapshot]
    disk_sync_seconds: HistogramSnapshot | None
    unit_bytes: int
    draining: bool
    order_waits: int = 0
    never_ordered: int = 0
    sequencer: SequencerStatistics | None = None
    sequencer_lease: LeaseStatistics | None = None
    sessions: SessionStatistics | None = None

    @property
    def log_free_bytes(self) -> int:
        """Bytes of the region's free allocation units."""
        return self.log.segments_free * self.unit_bytes

    def to_json(self) -> dict[str, Any]:
        """The snapshot as plain JSON values (``GET /v1/stats``)."""
        data: dict[str, Any] = attrs.asdict(self, recurse=True)
        data["log_free_bytes"] = self.log_free_bytes
        return data

    def summary(self, previous: BrokerStatistics | None = None, seconds: float = 0.0) -> str:
        """The statistics line, in words: rates over the ``seconds`` since
        ``previous`` (when given), totals, connections, staging, log space.

        Example::

            last 5.0 s: received 152.3 MB/s (148,700 msg/s), committed 152.1 MB/s
            (148,500 msg/s); since start 1,234,567 messages (1.2 GiB) committed;
            3 connections (2 receiving, 1 subscribed); staging 3 of 32 buffers in
            use (peak 12); log 812.0 MiB free of 1.0 GiB (79%), 12.0 MiB more
            reclaimable; 0 pauses, 0 allocation retries, 0 errors
        """
        f = self.report(previous, seconds)
        parts = []
        if "interval_s" in f:
            parts.append(
                f"last {f['interval_s']:.1f} s: received {_rate(f['received_bytes_per_s'])} "
                f"({f['received_messages_per_s']:,.0f} msg/s), committed "
                f"{_rate(f['committed_bytes_per_s'])} ({f['committed_messages_per_s']:,.0f} msg/s)"
            )
        parts.append(
            f"since start {self.messages_committed:,} messages ({_size(self.bytes_committed)}) "
            "committed"
        )
        by_word: collections.Counter[str] = collections.Counter()
        for phase, n in self.connections.items():
            by_word[PHASE_WORDS.get(phase, phase)] += n
        busy = [f"{n} {word}" for word, n in by_word.most_common() if n]
        total = sum(self.connections.values())
        parts.append(_count(total, "connection") + (f" ({', '.join(busy)})" if busy else ""))
        parts.append(
            f"staging {self.pool.used} of {self.pool.num_buffers} buffers in use "
            f"(peak {self.pool.peak_used})"
        )
        size = f["log_size_bytes"]
        free = f["log_free_bytes"]
        parts.append(
            f"log {_size(free)} free of {_size(size)} ({100 * free / max(size, 1):.0f}%)"
            + (
                f", {_size(f['log_reclaimable_bytes'])} more reclaimable"
                if f["log_reclaimable_bytes"]
                else ""
            )
        )
        parts.append(
            ", ".join(
                _count(n, word)
                for n, word in (
                    (self.pauses, "pause"),
                    (self.allocation_retries, "allocation retry"),
                    (f["errors"], "error"),
                )
            )
        )
        lease = self.sequencer_lease
        if self.order_waits:
            parts.append(
                f"{self.order_waits} batch(es) of order-5 topics wait for their order"
                + (f" ({_lease_words(lease)})" if lease is not None and not lease.held else "")
            )
        if self.never_ordered:
            parts.append(f"{self.never_ordered} batch(es) of order-5 topics never ordered")
        seq = self.sequencer
        if seq is not None and seq.topics:
            epoch = f" (lease epoch {lease.epoch})" if lease is not None else ""
            parts.append(
                f"sequencer{epoch}: {seq.batches_ordered:,} batches ordered, "
                f"{seq.lag_batches} waiting (oldest {seq.lag_oldest_s:.3f} s)"
            )
        sessions = self.sessions
        if sessions is not None and (sessions.connections or sessions.duplicates):
            parts.append(
                f"sessions: {_count(sessions.connections, 'connection')} open here, "
                f"{_count(sessions.duplicates, 'duplicate')} acked without storing them again, "
                f"{_count(sessions.waits, 'wait')} for another copy"
            )
        line = "; ".join(parts)
        if self.log_full_held:
            line += f"; HELD: {self.log_full_held} batch(es) wait for retention to free log space"
        return line

    def report(
        self, previous: BrokerStatistics | None = None, seconds: float = 0.0
    ) -> dict[str, Any]:
        """The numbers of :meth:`summary`, for machines (``--log-format json``)."""
        fields: dict[str, Any] = {}
        if previous is not None and seconds > 0:
            fields["interval_s"] = seconds
            for name, now, before in (
                ("received_bytes_per_s", self.bytes_received, previous.bytes_received),
                ("received_messages_per_s", self.messages_received, previous.messages_received),
                ("committed_bytes_per_s", self.bytes_committed, previous.bytes_committed),
                ("committed_messages_per_s", self.messages_committed, previous.messages_committed),
            ):
                fields[name] = max(0, now - before) / seconds
        fields.update(
            messages_received=self.messages_received,
            bytes_received=self.bytes_received,
            messages_committed=self.messages_committed,
            bytes_committed=self.bytes_committed,
            connections={k: v for k, v in self.connections.items() if v},
            staging_used=self.pool.used,
            staging_buffers=self.pool.num_buffers,
            staging_peak=self.pool.peak_used,
            log_size_bytes=self.log.segments_total * self.unit_bytes,
            log_free_bytes=self.log_free_bytes,
            log_reclaimable_bytes=self.segments_reclaimable * self.unit_bytes,
            pauses=self.pauses,
            allocation_retries=self.allocation_retries,
            errors=sum(self.errors.values()),
            held_batches=self.log_full_held,
        )
        return fields


#: How the statistics line names the connection phases.
PHASE_WORDS = {
    "init": "starting",
    "wait_header": "between batches",
    "paused": "paused",
    "wait_payload": "receiving",
    "wait_cxl": "waiting for the log",
    "complete": "between batches",
    "subscribed": "subscribed",
    "draining": "draining",
    "closed": "closing",
}


def _lease_words(lease: LeaseStatistics) -> str:
    """Who orders, for a broker that does not: ``sequencer: broker 1, epoch 3``."""
    if lease.holder is None:
        return "no broker runs the sequencer"
    return f"sequencer: broker {lease.holder}, epoch {lease.epoch}"


def _count(n: int, thing: str) -> str:
    """``n`` things: 1 pause, 2 pauses, 0 allocation retries."""
    if n == 1:
        return f"1 {thing}"
    return f"{n:,} " + (f"{thing[:-1]}ies" if thing.endswith("y") else f"{thing}s")


def _rate(bytes_per_s: float) -> str:
    """A byte rate for people, in decimal units: 152.3 MB/s, 48.0 kB/s."""
    for unit, scale in (("GB/s", 1e9), ("MB/s", 1e6), ("kB/s", 1e3)):
        if bytes_per_s >= scale:
            return f"{bytes_per_s / scale:.1f} {unit}"
    return f"{bytes_per_s:.0f} B/s"


def _size(n: float) -> str:
    """``n`` bytes for people: 812.0 MiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")  # pragma: no cover
