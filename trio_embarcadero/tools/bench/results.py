"""One run's figures (:class:`RunResult`) and the latency percentiles computed from them.

Percentiles come from ``hdrhistogram`` (the ``bench`` extra) when it is
installed, else from numpy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import attrs
import numpy as np

PERCENTILES = (50.0, 90.0, 99.0, 99.9)
_LATENCY_MAX_US = 600 * 10**6


@attrs.define
class RunResult:
    """One run of one variant."""

    variant: str
    round: int
    ok: bool
    errors: list[str] = attrs.Factory(list)
    payload_bytes: int = 0
    wire_bytes: int = 0
    messages: int = 0
    batches: int = 0
    elapsed_s: float = 0.0
    time_bounded: bool = False
    server_cpu_s: float = 0.0
    server_peak_rss: int = 0
    server_peak_anon: int = 0
    loadgen_cpu_s: float = 0.0
    pool_peak: int | None = None
    pool_size: int | None = None
    pauses: int | None = None
    series: list[tuple[float, int]] = attrs.Factory(list)
    latency_us: list[int] = attrs.Factory(list)
    latency_after_send_us: list[int] = attrs.Factory(list)
    receiver_failed: bool = False
    storage_bytes: int | None = None  # ack 2: what the disk log holds after the run
    attempts: int = 1
    earlier_errors: list[str] = attrs.Factory(list)
    #: ``--rate``: the fraction of the peak offered (None: unpaced, as fast as it goes).
    rate: float | None = None
    offered_bytes_per_s: float | None = None
    #: Paced runs: how late each batch's send started after its scheduled time.
    send_lag_us: list[int] = attrs.Factory(list)
    #: Read runs of the broker: how long filling the topic took (not measured).
    fill_s: float | None = None
    #: Cluster runs, per broker (by id): message payload it received, its CPU seconds.
    broker_payload_bytes: list[int] = attrs.Factory(list)
    broker_cpu_s: list[float] = attrs.Factory(list)
    #: The CPUs the servers' threads and the client process could run on.
    server_cpus: list[int] = attrs.Factory(list)
    client_cpus: list[int] = attrs.Factory(list)
    #: The client's measured window, on the ``time.monotonic()`` clock.
    window: tuple[float, float] | None = None
    #: ``--stall-probe``: each stall of a probed CPU in the window, ms (None: no probe).
    machine_stalls_ms: list[float] | None = None

    @property
    def longest_stall_ms(self) -> float | None:
        """The longest stall of the machine in the run (0.0: none; None: not probed)."""
        stalls = self.machine_stalls_ms
        return None if stalls is None else max(stalls, default=0.0)

    @property
    def broker_gb_per_s(self) -> list[float]:
        """Each broker's share of the throughput, over the run's window."""
        return [
            b / self.elapsed_s / 1e9 if self.elapsed_s else 0.0 for b in self.broker_payload_bytes
        ]

    @property
    def gb_per_s(self) -> float:
        """Message payload throughput, 10**9 bytes per second."""
        return self.payload_bytes / self.elapsed_s / 1e9 if self.elapsed_s else 0.0

    @property
    def msgs_per_s(self) -> float:
        """Messages per second."""
        return self.messages / self.elapsed_s if self.elapsed_s else 0.0

    @property
    def cpu_s_per_gb(self) -> float:
        """The receiver's CPU seconds per 10**9 bytes of message payload."""
        return self.server_cpu_s / (self.payload_bytes / 1e9) if self.payload_bytes else 0.0

    def to_json(self) -> dict[str, Any]:
        """The run's entry in the report's ``runs`` list."""
        return {
            "variant": self.variant,
            "round": self.round,
            "ok": self.ok,
            "errors": self.errors,
            "attempts": self.attempts,
            "earlier_errors": self.earlier_errors,
            "payload_bytes": self.payload_bytes,
            "wire_bytes": self.wire_bytes,
            "messages": self.messages,
            "batches": self.batches,
            "elapsed_s": self.elapsed_s,
            "time_bounded": self.time_bounded,
            "gb_per_s": self.gb_per_s,
            "wire_gb_per_s": self.wire_bytes / self.elapsed_s / 1e9 if self.elapsed_s else 0.0,
            "msgs_per_s": self.msgs_per_s,
            "latency_ms": percentiles_ms(self.latency_us),
            "server_cpu_s": self.server_cpu_s,
            "server_cpu_s_per_gb": self.cpu_s_per_gb,
            "server_peak_rss_bytes": self.server_peak_rss,
            "server_peak_anon_bytes": self.server_peak_anon,
            "loadgen_cpu_s": self.loadgen_cpu_s,
            "pool_peak": self.pool_peak,
            "pool_size": self.pool_size,
            "pauses": self.pauses,
            "storage_bytes": self.storage_bytes,
            "rate": self.rate,
            "offered_gb_per_s": (
                None if self.offered_bytes_per_s is None else self.offered_bytes_per_s / 1e9
            ),
            "send_lag_ms": percentiles_ms(self.send_lag_us),
            "fill_s": self.fill_s,
            "broker_gb_per_s": self.broker_gb_per_s,
            "broker_cpu_s": self.broker_cpu_s,
            "server_cpus": self.server_cpus,
            "client_cpus": self.client_cpus,
            "machine_stalls_ms": self.machine_stalls_ms,
            "longest_stall_ms": self.longest_stall_ms,
            "series": [[round(t, 3), b] for t, b in self.series],
        }


def percentiles(values_us: Sequence[int], points: Sequence[float] = PERCENTILES) -> list[float]:
    """Percentiles of latencies in microseconds: hdrhistogram if installed, else numpy."""
    if not values_us:
        return [math.nan for _ in points]
    try:
        from hdrh.histogram import HdrHistogram  # type: ignore[import-untyped, unused-ignore]
    except ImportError:
        array = np.asarray(values_us, dtype=np.float64)
        return [float(v) for v in np.percentile(array, list(points), method="higher")]
    histogram = HdrHistogram(1, _LATENCY_MAX_US, 3)
    for value in values_us:
        histogram.record_value(min(max(int(value), 1), _LATENCY_MAX_US))
    return [float(histogram.get_value_at_percentile(p)) for p in points]


def percentiles_ms(values_us: Sequence[int]) -> dict[str, float | int | None]:
    """The :data:`PERCENTILES`, the maximum (in ms) and the count of latencies in us."""
    found = percentiles(values_us)
    out: dict[str, float | int | None] = {
        f"p{p:g}": (None if math.isnan(v) else v / 1000)
        for p, v in zip(PERCENTILES, found, strict=True)
    }
    out["max"] = max(values_us) / 1000 if values_us else None
    out["count"] = len(values_us)
    return out


def percentile_source() -> str:
    """Which library :func:`percentiles` uses: ``"hdrhistogram"`` or ``"numpy"``."""
    try:
        import hdrh.histogram  # type: ignore[import-untyped, unused-ignore]  # noqa: F401
    except ImportError:
        return "numpy"
    return "hdrhistogram"
