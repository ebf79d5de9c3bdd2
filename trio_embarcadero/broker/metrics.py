"""The broker's Prometheus metrics: a collector that reads the statistics at scrape time.

Nothing is counted for Prometheus on the ingest path: at every scrape,
:class:`BrokerCollector` takes one :meth:`~.service.Broker.statistics`
snapshot and reads this broker's streams from the topic table, and turns
them into metric families (``prometheus_client`` renders the text). Names
follow the Prometheus conventions: prefixed ``trio_embarcadero_``, the unit
in the name (``_bytes``, ``_seconds``), ``_total`` on counters. The README's
"Operations" section lists them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Protocol, TypeVar

import attrs
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from ..errors import ErrorCode
from ..log import CxlLog, DiskLog, DiskStatistics
from ..log.layout import StreamEntry, read_stream_entry, read_topic_state, read_topics
from ..log.lease import LeaseStatistics
from ..log.sequencer import SequencerStatistics
from .connection import ConnectionPhase
from .statistics import BrokerStatistics, HistogramSnapshot

PREFIX = "trio_embarcadero_"


class Observed(Protocol):
    """What the collector reads from a broker."""

    broker_id: int
    log: CxlLog

    @property
    def disk(self) -> DiskLog | None: ...

    def statistics(self) -> BrokerStatistics: ...

    def committed_bytes(self) -> dict[tuple[str, int], int]: ...


_Value = Callable[[BrokerStatistics], float]


def _of_sessions(field: str) -> _Value:
    """The value of a field of the publish sessions' statistics (0 without them)."""
    return lambda s: float(getattr(s.sessions, field)) if s.sessions is not None else 0.0


#: Counters: name (without ``_total``), help, value.
_COUNTERS: tuple[tuple[str, str, _Value], ...] = (
    ("received_batches", "Batches received whole and valid.", lambda s: s.batches_received),
    ("received_messages", "Messages in the batches received.", lambda s: s.messages_received),
    ("received_bytes", "Payload bytes of the batches received.", lambda s: s.bytes_received),
    ("committed_batches", "Batches committed to the log.", lambda s: s.batches_committed),
    ("committed_messages", "Messages committed to the log.", lambda s: s.messages_committed),
    ("committed_bytes", "Payload bytes committed to the log.", lambda s: s.bytes_committed),
    (
        "discarded_batches",
        "Batches received but never placed in the log (log full, shutdown).",
        lambda s: s.batches_discarded,
    ),
    ("abandoned_batches", "Log reservations given up.", lambda s: s.log.batches_abandoned),
    ("connections_accepted", "Connections accepted.", lambda s: s.connections_accepted),
    (
        "connections_refused",
        "Connections refused (limits, networks).",
        lambda s: s.connections_refused,
    ),
    ("pauses", "Times the pool monitor paused receivers.", lambda s: s.pauses),
    ("resumes", "Times the pool monitor resumed receivers.", lambda s: s.resumes),
    (
        "allocation_retries",
        "Log reservations retried because the log was full.",
        lambda s: s.allocation_retries,
    ),
    (
        "allocation_backoff_seconds",
        "Time spent backing off between those retries.",
        lambda s: s.backoff_seconds,
    ),
    (
        "allocation_failures",
        "Batches refused after every retry (error 4).",
        lambda s: s.allocation_failures,
    ),
    (
        "log_full_waits",
        "Batches that waited for retention to free log space.",
        lambda s: s.log_full_waits,
    ),
    (
        "log_full_wait_seconds",
        "Time batches waited for log space, in all.",
        lambda s: s.log_full_wait_seconds,
    ),
    (
        "log_full_timeouts",
        "Batches that waited log_full_timeout_s in vain (error 4).",
        lambda s: s.log_full_timeouts,
    ),
    (
        "inflight_full",
        "Reservations refused for a while: a stream had max_inflight_batches in flight.",
        lambda s: s.log.ring_full,
    ),
    ("log_full", "Reservations that found no free segment.", lambda s: s.log.log_full),
    (
        "shutdown_notices",
        "Connections told error 5 at a shutdown (expected, not errors).",
        lambda s: s.shutdown_notices,
    ),
    (
        "never_ordered_batches",
        "Committed batches of order-5 topics never ordered (not acked: error 2 or 10).",
        lambda s: s.never_ordered,
    ),
    ("internal_errors", "Bugs caught (see the log).", lambda s: s.internal_errors),
    ("dial_back_dialed", "Dial-back ack connections opened.", lambda s: s.dial_backs.dialed),
    ("dial_back_failed", "Dial-back ack connections that failed.", lambda s: s.dial_backs.failed),
    ("dial_back_lost", "Dial-back ack connections lost while in use.", lambda s: s.dial_backs.lost),
    (
        "sequencer_takeovers",
        "Times this broker took the sequencer lease (a new epoch each).",
        lambda s: s.sequencer_lease.takeovers if s.sequencer_lease else 0,
    ),
    (
        "sequencer_deposed",
        "Times this broker found its sequencer lease taken over and stopped ordering.",
        lambda s: s.sequencer_lease.deposed if s.sequencer_lease else 0,
    ),
    (
        "duplicate_batches",
        "Batches of publish sessions acked as duplicates, not stored again.",
        _of_sessions("duplicates"),
    ),
    ("duplicate_messages", "Messages of those duplicates.", _of_sessions("duplicate_messages")),
    (
        "session_waits",
        "Batches of publish sessions that waited for another connection's copy.",
        _of_sessions("waits"),
    ),
)

#: Gauges: name, help, value.
_GAUGES: tuple[tuple[str, str, _Value], ...] = (
    ("paused", "1 while the pool monitor holds receivers.", lambda s: float(s.paused)),
    ("draining", "1 while the broker drains for a shutdown.", lambda s: float(s.draining)),
    (
        "log_full_held_batches",
        "Batches waiting for log space now (their publishers are held).",
        lambda s: s.log_full_held,
    ),
    (
        "staging_buffers_peak_used",
        "Most staging buffers in use at once.",
        lambda s: s.pool.peak_used,
    ),
    ("staging_buffer_size_bytes", "Bytes of one staging buffer.", lambda s: s.pool.buffer_size),
    (
        "staging_queued_batches",
        "Staged batches waiting for an allocator.",
        lambda s: s.queued_batches,
    ),
    ("log_topics", "Topics in the region.", lambda s: s.log.topics),
    ("log_unit_size_bytes", "Bytes of an allocation unit of the region.", lambda s: s.unit_bytes),
    (
        "log_size_bytes",
        "Bytes of the region's allocation units.",
        lambda s: s.log.segments_total * s.unit_bytes,
    ),
    ("log_free_bytes", "Bytes of the region's free allocation units.", lambda s: s.log_free_bytes),
    ("dial_back_connections", "Dial-back ack connections open.", lambda s: s.dial_backs.active),
    (
        "order_waits",
        "Committed batches of order-5 topics whose acks wait for their order.",
        lambda s: s.order_waits,
    ),
    (
        "sequencer_lease_epoch",
        "The epoch of the region's sequencer lease (0: never held).",
        lambda s: s.sequencer_lease.epoch if s.sequencer_lease else 0,
    ),
    (
        "sequencer_lease_holder",
        "The broker id that holds the sequencer lease (runs the sequencer); -1: none.",
        lambda s: _lease_holder(s.sequencer_lease),
    ),
    (
        "sequencer_lease_held",
        "1 while this broker holds the sequencer lease.",
        lambda s: float(bool(s.sequencer_lease and s.sequencer_lease.held)),
    ),
    (
        "sessions",
        "Publish sessions in the region's table (every broker's).",
        _of_sessions("sessions"),
    ),
    (
        "session_connections",
        "Connections of publish sessions open on this broker.",
        _of_sessions("connections"),
    ),
)


def _lease_holder(lease: LeaseStatistics | None) -> float:
    return -1 if lease is None or lease.holder is None else lease.holder


_DiskValue = Callable[[DiskStatistics], float]
_SequencerValue = Callable[[SequencerStatistics], float]
_T = TypeVar("_T")

#: The sequencer's counters and gauges, from the broker that runs it (holds
#: its lease); the other brokers have none (``trio_embarcadero_sequencer_lease_held``).
_SEQUENCER_COUNTERS: tuple[tuple[str, str, _SequencerValue], ...] = (
    (
        "sequencer_ordered_batches",
        "Batches this broker's sequencer ordered.",
        lambda q: q.batches_ordered,
    ),
    ("sequencer_ordered_messages", "Their messages.", lambda q: q.messages_ordered),
    (
        "sequencer_holes_skipped",
        "Batches the sequencer went past after sequencer_hole_timeout_s (never ordered).",
        lambda q: q.holes_skipped,
    ),
    (
        "sequencer_session_skips",
        "Batch_seqs of publish sessions the sequencer skipped (never ordered).",
        lambda q: q.session_skips,
    ),
)
_SEQUENCER_GAUGES: tuple[tuple[str, str, _SequencerValue], ...] = (
    ("sequencer_topics", "Order-5 topics the sequencer orders.", lambda q: q.topics),
    (
        "sequencer_lag_batches",
        "Batches committed (on any broker) and not ordered yet, at the sequencer's last step.",
        lambda q: q.lag_batches,
    ),
    (
        "sequencer_lag_oldest_seconds",
        "How long the oldest of those has waited for its order.",
        lambda q: q.lag_oldest_s,
    ),
)

#: The disk log's counters and gauges (with ``storage.dir``).
_DISK_COUNTERS: tuple[tuple[str, str, _DiskValue], ...] = (
    (
        "disk_written_batches",
        "Batches appended to the disk log and synced.",
        lambda d: d.batches_written,
    ),
    ("disk_written_bytes", "Bytes appended to the disk log and synced.", lambda d: d.bytes_written),
    ("disk_syncs", "Write-and-sync rounds of the disk log.", lambda d: d.syncs),
    (
        "disk_replayed_batches",
        "Batches replayed into the region at start-up.",
        lambda d: d.batches_replayed,
    ),
    ("disk_trimmed_files", "Disk log files retention removed.", lambda d: d.files_trimmed),
    (
        "disk_trimmed_bytes",
        "Bytes of the disk log files retention removed.",
        lambda d: d.bytes_trimmed,
    ),
)
_DISK_GAUGES: tuple[tuple[str, str, _DiskValue], ...] = (
    ("disk_waiting_batches", "Ack-2 batches waiting for a sync.", lambda d: d.waiting_batches),
    ("disk_files", "Disk log files of this broker's streams.", lambda d: d.files),
    ("disk_retained_bytes", "Synced bytes the disk log holds.", lambda d: d.bytes_retained),
    ("disk_last_sync_seconds", "How long the last sync round took.", lambda d: d.last_sync_seconds),
)


def _families(
    counters: Sequence[tuple[str, str, Callable[[_T], float]]],
    gauges: Sequence[tuple[str, str, Callable[[_T], float]]],
    of: _T,
) -> Iterator[Metric]:
    """The counters and gauges of one part of a snapshot (the disk log's, the sequencer's)."""
    for name, text, value in counters:
        yield CounterMetricFamily(PREFIX + name, text, value=value(of))
    for name, text, value in gauges:
        yield GaugeMetricFamily(PREFIX + name, text, value=value(of))


@attrs.frozen
class _TopicStream:
    """What the per-topic metrics read of this broker's stream of a topic."""

    entry: StreamEntry  # its entry in the topic table
    committed_bytes: int  # payload bytes committed since the broker started
    first_offset: int  # with a disk log, where the disk log begins


#: Per-topic metrics (label ``topic``): kind, name, help, value.
_TOPIC_METRICS: tuple[
    tuple[type[CounterMetricFamily | GaugeMetricFamily], str, str, Callable[[_TopicStream], float]],
    ...,
] = (
    (
        CounterMetricFamily,
        "topic_committed_messages",
        "Messages this broker's stream of the topic committed (its next offset).",
        lambda t: t.entry.messages,
    ),
    (
        CounterMetricFamily,
        "topic_committed_batches",
        "Batches this broker's stream of the topic committed.",
        lambda t: t.entry.batches,
    ),
    (
        CounterMetricFamily,
        "topic_committed_bytes",
        "Payload bytes this broker committed to the topic since it started.",
        lambda t: t.committed_bytes,
    ),
    (
        GaugeMetricFamily,
        "topic_retained_bytes",
        "Payload bytes of this broker's stream of the topic that the region holds.",
        lambda t: t.entry.payload_bytes,
    ),
    (
        GaugeMetricFamily,
        "topic_first_offset",
        "The first offset of the stream still retained (the log-start offset; "
        "with a disk log, where the disk log begins).",
        lambda t: t.first_offset,
    ),
)


class BrokerCollector(Collector):
    """Reads a broker's statistics at every scrape.

    Args:
        broker: The broker.
    """

    def __init__(self, broker: Observed) -> None:
        self._broker = broker

    def collect(self) -> Iterator[Metric]:
        """The metric families of one snapshot."""
        stats = self._broker.statistics()
        for name, text, value in _COUNTERS:
            yield CounterMetricFamily(PREFIX + name, text, value=value(stats))
        for name, text, value in _GAUGES:
            yield GaugeMetricFamily(PREFIX + name, text, value=value(stats))
        yield from self._labelled(stats)
        yield from self._histograms(stats)
        if stats.disk is not None:
            yield from _families(_DISK_COUNTERS, _DISK_GAUGES, stats.disk)
        if stats.sequencer is not None:
            yield from _families(_SEQUENCER_COUNTERS, _SEQUENCER_GAUGES, stats.sequencer)
        yield from self._topics()

    def _labelled(self, stats: BrokerStatistics) -> Iterator[Metric]:
        errors = CounterMetricFamily(
            PREFIX + "errors",
            "Error frames sent for faults, by error code.",
            labels=["code"],
        )
        for code in ErrorCode:
            if code is not ErrorCode.SHUTTING_DOWN:  # shutdown_notices
                errors.add_metric([code.name.lower()], stats.errors.get(code.name.lower(), 0))
        yield errors
        phases = GaugeMetricFamily(
            PREFIX + "connections", "Open connections by phase.", labels=["phase"]
        )
        for phase in ConnectionPhase:
            phases.add_metric([phase.value], stats.connections.get(phase.value, 0))
        yield phases
        staging = GaugeMetricFamily(
            PREFIX + "staging_buffers", "Staging buffers by state.", labels=["state"]
        )
        staging.add_metric(["used"], stats.pool.used)
        staging.add_metric(["free"], stats.pool.free)
        yield staging
        units = GaugeMetricFamily(
            PREFIX + "log_units",
            "Allocation units of the region: free, in segments (used), and of the used "
            "ones those retention would free now (reclaimable).",
            labels=["state"],
        )
        units.add_metric(["free"], stats.log.segments_free)
        units.add_metric(["used"], stats.log.segments_used)
        units.add_metric(["reclaimable"], stats.segments_reclaimable)
        yield units

    def _histograms(self, stats: BrokerStatistics) -> Iterator[Metric]:
        sizes = HistogramMetricFamily(
            PREFIX + "batch_size_bytes", "Payload bytes of the batches received."
        )
        _add_histogram(sizes, [], stats.batch_bytes)
        yield sizes
        acks = HistogramMetricFamily(
            PREFIX + "ack_latency_seconds",
            "Seconds from a batch received whole to its ack (ack 1: stored in the log; "
            "ack 2: also synced to disk).",
            labels=["ack"],
        )
        for level, histogram in sorted(stats.ack_latency.items()):
            _add_histogram(acks, [level], histogram)
        yield acks
        if stats.disk_sync_seconds is not None:
            syncs = HistogramMetricFamily(
                PREFIX + "disk_sync_seconds",
                "Seconds of each write-and-fdatasync round of the disk log.",
            )
            _add_histogram(syncs, [], stats.disk_sync_seconds)
            yield syncs

    def _topics(self) -> Iterator[Metric]:
        broker = self._broker
        region, geometry = broker.log.region, broker.log.geometry
        disk = broker.disk
        committed = broker.committed_bytes()
        families = [
            (kind(PREFIX + name, text, labels=["topic"]), value)
            for kind, name, text, value in _TOPIC_METRICS
        ]
        for name, index in sorted(read_topics(region, geometry).items()):
            entry = read_stream_entry(region, geometry, index, broker.broker_id)
            _, incarnation = read_topic_state(region, geometry, index)
            on_disk = disk.first_offset(name) if disk is not None else None
            stream = _TopicStream(
                entry,
                committed.get((name, incarnation), 0),
                entry.start_offset if on_disk is None else on_disk,
            )
            for family, value in families:
                family.add_metric([name], value(stream))
        yield from (family for family, _ in families)


def _add_histogram(family: HistogramMetricFamily, labels: list[str], h: HistogramSnapshot) -> None:
    buckets = [
        ("+Inf" if bound == float("inf") else _bound(bound), count)
        for bound, count in h.cumulative()
    ]
    family.add_metric(labels, buckets, sum_value=h.sum)


def _bound(bound: float) -> str:
    # 1024.0 reads better as 1024; 0.0005 stays as it is.
    return str(int(bound)) if bound == int(bound) else repr(bound)
