"""``trio-embarcadero bench``: broker throughput and ack latency next to the machine's limit.

One invocation runs every *variant* against the same load generator, in
interleaved rounds (round 1: every variant once, round 2: again, ...), because
shared machines drift by tens of percent within minutes; figures are medians
with their min-max spread, and every ratio compares runs of the same
invocation. A variant is a receiver and an ack level:

* ``trio-sink``: a minimal Trio receiver (``stream.socket.recv_into`` into
  one reused buffer, same framing, an 8-byte ack per batch); the fair baseline.
* ``raw-sink``: blocking-socket ``recv_into`` with ``MSG_WAITALL`` in a plain
  Python process; the best raw receiver, and the measure of what the load
  generator alone can push.
* ``staged`` / ``direct``: the broker with ``network.use_nonblocking`` true
  or false.

Written ``NAME-ack0`` or ``NAME-ack1``; plain ``trio-sink`` and ``raw-sink``
mean ack 1. The broker also runs as ``staged-ack2`` / ``direct-ack2`` (not in
the default list): the broker config gets ``storage.dir``, a fresh directory
under ``--storage-dir`` removed after the run, and every ack waits for the
disk log's group-committed ``fdatasync``; the load generator counts those
acks like ack 1, so the difference to ``NAME-ack1`` is the cost of
durability on disk.

Every receiver and every load generator is a process of its own
(:mod:`trio_embarcadero.sink`, :mod:`trio_embarcadero.loadgen`, and
``python -m trio_embarcadero serve``), so the broker's event loop never
shares an interpreter with its client; this process only watches.

What is measured (see :mod:`trio_embarcadero.loadgen` for the client side):

* throughput: message payload bytes (``message_size x messages``, the C++
  evaluation's formula, without record and batch headers) from the first
  send to the last ack (ack 1; ack 2: the last ack saying it is on disk) or
  to the receiver closing the connection after reading everything (ack 0);
  GB = 10**9 bytes;
* ack latency per batch, from the start of its ``sendall`` to the ack
  covering it, pooled over every round of a variant;
* the receiver's CPU seconds per GB (``/proc/PID/stat`` utime + stime over
  the run) and its peak RSS (``VmHWM``; for the broker that includes the
  mapped CXL region, so the private part, peak ``RssAnon``, is shown too);
* for ack 2, the bytes the disk log holds after the run (``storage_bytes``;
  it must equal the wire bytes sent).

Optional: ``hdrhistogram`` (the ``bench`` extra) for percentiles, otherwise
numpy; ``matplotlib`` for ``--plot``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import attrs
import numpy as np
import trio

from .config import StorageConfig, load_config
from .errors import ConfigError
from .loadgen import DEFAULT_MESSAGE_SIZE
from .wire import BATCH_HEADER_SIZE, padded_size

DEFAULT_VARIANTS = (
    "trio-sink",
    "raw-sink",
    "staged-ack0",
    "staged-ack1",
    "direct-ack0",
    "direct-ack1",
)
#: Variants that need the disk log (``storage.dir``); not run by default.
ACK2_VARIANTS = ("staged-ack2", "direct-ack2")
#: The C++ evaluation's batch size; a batch is sealed once header + records reach it.
DEFAULT_BATCH_SIZE = 2 * 2**20
DEFAULT_BYTES = 4 * 10**9
BASELINE = "trio-sink"
BEST_RAW = "raw-sink"
#: Targets from issue 4, printed next to the measured ratios.
TARGET_VS_TRIO_SINK = 0.90
TARGET_VS_RAW_SINK = 0.75

_VARIANT_RE = re.compile(r"(trio-sink|raw-sink|staged|direct)(?:-ack([012]))?")
_LISTENING_RE = re.compile(r"listening on (\S+):(\d+)")
_STATS_RE = re.compile(r"pool (\d+)/(\d+) \(peak (\d+)\) pauses (\d+)")
# Keys the bench sets itself; environment overrides of them are not passed on.
_CONTROLLED_ENV = frozenset(
    {
        "EMBARCADERO_USE_NONBLOCKING",
        "TRIO_EMBARCADERO_BROKER__HOST",
        "TRIO_EMBARCADERO_BROKER__PORT",
        "TRIO_EMBARCADERO_NETWORK__USE_NONBLOCKING",
        "TRIO_EMBARCADERO_NETWORK__STATS_INTERVAL_S",
        "TRIO_EMBARCADERO_CXL__PATH",
        "TRIO_EMBARCADERO_CXL__SIZE_MB",
        "TRIO_EMBARCADERO_CXL__SEGMENT_MB",
        "TRIO_EMBARCADERO_LOGGING__LEVEL",
        "TRIO_EMBARCADERO_STORAGE__DIR",
    }
)
_PROGRESS_INTERVAL = 0.1  # loadgen progress lines (the plot's resolution)
_LIVE_INTERVAL = 1.0  # live lines printed here
_STATS_INTERVAL = 0.5  # the broker's statistics log line
_SERVER_STOP_TIMEOUT = 20.0
_ATTEMPTS = 3  # per run, when the receiver fails (not when it is merely slow)
_LATENCY_MAX_US = 600 * 10**6


class BenchError(Exception):
    """A run could not be carried out (receiver failed to start, died, ...)."""


# -- arguments ---------------------------------------------------------------------


def parse_size(text: str) -> int:
    """A byte count: ``2e9``, ``2G``/``2GB`` (10**9) or ``2GiB`` (2**30); K, M, G, T."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKmMgGtT]?)(i?)[bB]?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    number, unit, binary = match.groups()
    try:
        value = float(number)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
    power = "kmgt".find(unit.lower()) + 1 if unit else 0
    value *= (1024 if binary else 1000) ** power
    if not 0 < value < 2**63 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"size must be > 0: {text!r}")
    return int(value)


def _variant(text: str) -> Variant:
    match = _VARIANT_RE.fullmatch(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(
            f"unknown variant {text!r}: use trio-sink, raw-sink, staged or direct, "
            "optionally with -ack0 or -ack1 (staged and direct also -ack2)"
        )
    kind, ack = match.groups()
    if ack is None and kind in ("staged", "direct"):
        raise argparse.ArgumentTypeError(
            f"say the ack level: {kind}-ack0, {kind}-ack1 or {kind}-ack2"
        )
    if ack == "2" and kind not in ("staged", "direct"):
        raise argparse.ArgumentTypeError(
            f"variant {text!r}: ack 2 needs the broker's disk log; a sink has none "
            "(use staged-ack2 or direct-ack2)"
        )
    return Variant(text.strip(), kind, 1 if ack is None else int(ack))


def _variants(text: str) -> list[Variant]:
    names = [t for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("no variants given")
    found = [_variant(t) for t in names]
    if len({v.name for v in found}) != len(found):
        raise argparse.ArgumentTypeError(f"a variant is listed twice: {text!r}")
    return found


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1: {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be > 0: {text}")
    return value


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand to the CLI's subparsers."""
    parser: argparse.ArgumentParser = commands.add_parser(
        "bench",
        help="measure throughput and ack latency against minimal receivers",
        description=(
            "Run the broker (staged and direct path, ack 0 and 1; ack 2, durable on disk, "
            "on request) and two minimal receivers against one load generator, in "
            "interleaved rounds, each in its own process. Prints a live line per second "
            "and a table of medians [min-max]."
        ),
    )
    parser.add_argument(
        "--variants",
        type=_variants,
        default=[_variant(v) for v in DEFAULT_VARIANTS],
        metavar="LIST",
        help="comma-separated, run in this order each round "
        f"(default: {','.join(DEFAULT_VARIANTS)}; also {','.join(ACK2_VARIANTS)}, "
        "the broker acking once the batch is fdatasync'ed to its disk log)",
    )
    parser.add_argument("--rounds", type=_positive_int, default=3, help="default: 3")
    parser.add_argument(
        "--connections", type=_positive_int, default=4, help="publisher connections (default: 4)"
    )
    parser.add_argument(
        "--message-size",
        type=_positive_int,
        default=DEFAULT_MESSAGE_SIZE,
        metavar="BYTES",
        help="message payload size (default: 1024)",
    )
    parser.add_argument(
        "--batch-size",
        type=parse_size,
        default=DEFAULT_BATCH_SIZE,
        metavar="SIZE",
        help="seal a batch once its header and records reach SIZE, as the C++ client does "
        "(default: 2MiB, i.e. 1928 messages of 1 KiB, 2,097,664 payload bytes)",
    )
    parser.add_argument(
        "--batch-messages",
        type=_positive_int,
        metavar="N",
        help="messages per batch (overrides --batch-size)",
    )
    parser.add_argument(
        "--bytes",
        type=parse_size,
        default=DEFAULT_BYTES,
        metavar="SIZE",
        help="message payload per run, rounded up to whole batches (default: 4G = 4*10**9)",
    )
    parser.add_argument(
        "--seconds",
        type=_positive_float,
        default=30.0,
        help="stop a run's sending after this many seconds (default: 30)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to use")
    parser.add_argument(
        "--broker-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set a broker config key, e.g. network.staging_pool_num_buffers=64 (repeatable; "
        "VALUE in TOML syntax)",
    )
    parser.add_argument(
        "--cxl-dir", default="/dev/shm", help="where the per-run CXL files go (default: /dev/shm)"
    )
    parser.add_argument(
        "--storage-dir",
        metavar="DIR",
        help="where the -ack2 variants' per-run disk-log directories go; must be a disk, "
        f"not tmpfs (default: the system temp dir, here {tempfile.gettempdir()})",
    )
    parser.add_argument(
        "--json",
        nargs="?",
        const="-",
        metavar="PATH",
        help="write the results as JSON to PATH (or stdout: the table then goes to stderr)",
    )
    parser.add_argument(
        "--plot", metavar="PATH.png", help="throughput over time and latency CDF (needs matplotlib)"
    )
    parser.add_argument("--quiet", action="store_true", help="no live lines")
    return parser


# -- records -----------------------------------------------------------------------


@attrs.frozen
class Variant:
    """One receiver + ack level to measure."""

    name: str
    kind: str  # trio-sink, raw-sink, staged, direct
    ack: int

    @property
    def is_broker(self) -> bool:
        return self.kind in ("staged", "direct")

    @property
    def durable(self) -> bool:
        """Ack 2: the broker runs with a disk log and acks once a batch is synced."""
        return self.ack == 2


@attrs.frozen
class Plan:
    """Everything a run needs, fixed for the whole invocation."""

    variants: list[Variant]
    rounds: int
    connections: int
    message_size: int
    batch_messages: int
    bytes: int
    seconds: float
    host: str
    broker_options: dict[str, object]
    cxl_dir: str
    storage_dir: str = attrs.field(factory=tempfile.gettempdir)

    @property
    def batch_payload(self) -> int:
        """Message payload bytes per batch (what throughput counts)."""
        return self.batch_messages * self.message_size

    @property
    def batch_total_size(self) -> int:
        """The batch header's ``total_size``: records with their headers and padding."""
        return self.batch_messages * padded_size(self.message_size)

    @property
    def batches_per_run(self) -> int:
        return max(1, -(-self.bytes // self.batch_payload))


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

    @property
    def gb_per_s(self) -> float:
        return self.payload_bytes / self.elapsed_s / 1e9 if self.elapsed_s else 0.0

    @property
    def msgs_per_s(self) -> float:
        return self.messages / self.elapsed_s if self.elapsed_s else 0.0

    @property
    def cpu_s_per_gb(self) -> float:
        return self.server_cpu_s / (self.payload_bytes / 1e9) if self.payload_bytes else 0.0

    def to_json(self) -> dict[str, Any]:
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
            "latency_ms": _percentiles_ms(self.latency_us),
            "server_cpu_s": self.server_cpu_s,
            "server_cpu_s_per_gb": self.cpu_s_per_gb,
            "server_peak_rss_bytes": self.server_peak_rss,
            "server_peak_anon_bytes": self.server_peak_anon,
            "loadgen_cpu_s": self.loadgen_cpu_s,
            "pool_peak": self.pool_peak,
            "pool_size": self.pool_size,
            "pauses": self.pauses,
            "storage_bytes": self.storage_bytes,
            "series": [[round(t, 3), b] for t, b in self.series],
        }


# -- statistics --------------------------------------------------------------------

PERCENTILES = (50.0, 90.0, 99.0, 99.9)


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


def _percentiles_ms(values_us: Sequence[int]) -> dict[str, float | int | None]:
    found = percentiles(values_us)
    out: dict[str, float | int | None] = {
        f"p{p:g}": (None if math.isnan(v) else v / 1000)
        for p, v in zip(PERCENTILES, found, strict=True)
    }
    out["max"] = max(values_us) / 1000 if values_us else None
    out["count"] = len(values_us)
    return out


def _spread(values: Sequence[float]) -> dict[str, Any]:
    if not values:
        return {"median": None, "min": None, "max": None, "values": []}
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "values": list(values),
    }


def summarize(plan: Plan, runs: Sequence[RunResult]) -> dict[str, Any]:
    """Per-variant medians, spreads, ratios and pooled latency percentiles."""
    good = [r for r in runs if r.ok]
    medians: dict[str, float] = {}
    per_round: dict[tuple[str, int], float] = {}
    for run in good:
        per_round[(run.variant, run.round)] = run.gb_per_s
    for v in plan.variants:
        values = [r.gb_per_s for r in good if r.variant == v.name]
        if values:
            medians[v.name] = statistics.median(values)

    def ratio(name: str, base: str) -> float | None:
        if name not in medians or base not in medians or not medians[base]:
            return None
        return medians[name] / medians[base]

    def paired(name: str, base: str) -> float | None:
        # Same-round ratios, so drift between rounds cancels out.
        pairs = [
            per_round[(name, rnd)] / per_round[(base, rnd)]
            for rnd in range(1, plan.rounds + 1)
            if (name, rnd) in per_round and per_round.get((base, rnd))
        ]
        return statistics.median(pairs) if pairs else None

    variants: dict[str, Any] = {}
    for v in plan.variants:
        mine = [r for r in good if r.variant == v.name]
        # The broker at ack 0 or 2 next to the same path at ack 1: the cost of
        # durability (ack 2) or of waiting for acks at all (ack 0).
        ack1 = f"{v.kind}-ack1" if v.is_broker and v.ack != 1 else None
        latency = [x for r in mine for x in r.latency_us]
        after_send = [x for r in mine for x in r.latency_after_send_us]
        pool_peaks = [r.pool_peak for r in mine if r.pool_peak is not None]
        pauses = [r.pauses for r in mine if r.pauses is not None]
        variants[v.name] = {
            "receiver": v.kind,
            "ack": v.ack,
            "runs": len(mine),
            "failed_runs": sum(1 for r in runs if r.variant == v.name and not r.ok),
            "gb_per_s": _spread([r.gb_per_s for r in mine]),
            "msgs_per_s": _spread([r.msgs_per_s for r in mine]),
            "ratio_to_trio_sink": ratio(v.name, BASELINE),
            "ratio_to_raw_sink": ratio(v.name, BEST_RAW),
            "paired_ratio_to_trio_sink": paired(v.name, BASELINE),
            "paired_ratio_to_raw_sink": paired(v.name, BEST_RAW),
            "ratio_to_ack1": ratio(v.name, ack1) if ack1 else None,
            "paired_ratio_to_ack1": paired(v.name, ack1) if ack1 else None,
            "latency_ms": _percentiles_ms(latency),
            "latency_after_send_ms": _percentiles_ms(after_send),
            "server_cpu_s_per_gb": _spread([r.cpu_s_per_gb for r in mine]),
            "server_peak_rss_bytes": max((r.server_peak_rss for r in mine), default=None),
            "server_peak_anon_bytes": max((r.server_peak_anon for r in mine), default=None),
            "loadgen_cpu_s_per_gb": _spread(
                [r.loadgen_cpu_s / (r.payload_bytes / 1e9) for r in mine if r.payload_bytes]
            ),
            "pool_peak": max(pool_peaks, default=None),
            "pool_size": next((r.pool_size for r in mine if r.pool_size is not None), None),
            "pauses": _spread([float(p) for p in pauses]),
            "time_bounded_runs": sum(1 for r in mine if r.time_bounded),
            "storage_bytes": _spread(
                [float(r.storage_bytes) for r in mine if r.storage_bytes is not None]
            ),
        }
    return variants


# -- /proc -------------------------------------------------------------------------

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from ``/proc/PID/stat`` (0.0 if unreadable)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # The command name may contain spaces and parentheses; fields follow the last ')'.
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def process_memory(pid: int) -> dict[str, int]:
    """VmHWM, VmRSS and RssAnon of a process in bytes (empty if unreadable)."""
    found: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return found
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon"):
            found[key] = int(rest.split()[0]) * 1024
    return found


def filesystem(path: str) -> str:
    """What backs ``path``: ``"ext4 on /dev/vda"`` (from ``/proc/self/mounts``), or "unknown"."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return "unknown"
    target = os.path.realpath(path)
    best: tuple[int, str] = (-1, "unknown")
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        # Spaces and the like are octal escapes (\040) in this file.
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= best[0]:  # the last of equal mounts is on top
            best = (len(point), f"{fields[2]} on {fields[0]}")
    return best[1]


def _tree_bytes(directory: str) -> int:
    """The sizes of the files under ``directory``, added up."""
    return sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(directory)
        for name in names
    )


# -- processes ---------------------------------------------------------------------


async def _lines(stream: trio.abc.ReceiveStream) -> AsyncIterator[str]:
    pending = b""
    while True:
        data = await stream.receive_some(1 << 16)
        if not data:
            break
        pending += data
        *complete, pending = pending.split(b"\n")
        for line in complete:
            yield line.decode("utf-8", "replace")
    if pending:
        yield pending.decode("utf-8", "replace")


async def _pump(stream: trio.abc.ReceiveStream | None, on_line: Callable[[str], None]) -> None:
    if stream is None:
        return
    try:
        async for line in _lines(stream):
            on_line(line)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def _stop_process(process: trio.Process, sig: int) -> None:
    """Signal, wait (bounded), then kill; shielded so cleanup survives cancellation."""
    with trio.CancelScope(shield=True):
        if process.returncode is None:
            try:
                process.send_signal(sig)
            except ProcessLookupError:
                pass
            with trio.move_on_after(_SERVER_STOP_TIMEOUT):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()


class Server:
    """A receiver process (sink or broker) and what its output says."""

    def __init__(self, variant: Variant, process: trio.Process) -> None:
        self.variant = variant
        self.process = process
        self.address: tuple[str, int] | None = None
        self.listening = trio.Event()
        self.tail: deque[str] = deque(maxlen=30)
        self.pool_used: int | None = None
        self.pool_size: int | None = None
        self.pool_peak: int | None = None
        self.pauses: int | None = None
        self.stats_seen = trio.Event()

    def on_line(self, line: str) -> None:
        self.tail.append(line)
        if self.address is None and (m := _LISTENING_RE.search(line)):
            self.address = (m.group(1), int(m.group(2)))
            self.listening.set()
        elif m := _STATS_RE.search(line):
            used, size, peak, pauses = (int(g) for g in m.groups())
            self.pool_used, self.pool_size, self.pool_peak, self.pauses = used, size, peak, pauses
            self.stats_seen.set()


# -- the bench ---------------------------------------------------------------------


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


def _parse_option(text: str) -> tuple[str, object]:
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or key.count(".") != 1:
        raise ValueError(f"--broker-option wants SECTION.KEY=VALUE: {text!r}")
    try:
        import tomllib

        value: object = tomllib.loads(f"v = {raw.strip()}")["v"]
    except ValueError:
        value = raw.strip()
    return key, value


class Bench:
    """Runs the plan; holds the results."""

    def __init__(self, plan: Plan, *, live: TextIO | None) -> None:
        self.plan = plan
        self.live = live
        self.runs: list[RunResult] = []
        self.broker_env = {
            k: v
            for k, v in os.environ.items()
            if (k.startswith("TRIO_EMBARCADERO_") or k.startswith("EMBARCADERO_"))
            and k not in _CONTROLLED_ENV
        }
        self._tmp = tempfile.TemporaryDirectory(prefix="trio-embarcadero-bench-")
        self._storage: StorageConfig | None = None

    def close(self) -> None:
        self._tmp.cleanup()

    # -- broker config ---------------------------------------------------------------

    def segment_mb(self) -> int:
        """``cxl.segment_mb``: as given, else 32 MiB or room for two batches."""
        given = self.plan.broker_options.get("cxl.segment_mb")
        if isinstance(given, int) and not isinstance(given, bool) and given > 0:
            return given
        return max(32, 2 * -(-self.plan.batch_total_size // 2**20))

    def cxl_size_mb(self) -> int:
        """A region the run cannot fill: the log never wraps."""
        segment_mb = self.segment_mb()
        segment = segment_mb * 2**20
        per_batch = BATCH_HEADER_SIZE + self.plan.batch_total_size + 256
        per_segment = max(1, (segment - 64) // per_batch)
        segments = -(-self.plan.batches_per_run // per_segment) + 2
        return segments * segment_mb + 4

    def broker_settings(
        self, variant: Variant, cxl_path: str, storage_path: str | None = None
    ) -> dict[str, object]:
        """The broker's config keys for one run; ``storage_path`` is the ack-2 disk log."""
        plan = self.plan
        settings: dict[str, object] = {}
        needed_mb = -(-plan.batch_total_size // 2**20)
        if needed_mb > 4:  # the default staging buffer: make room for the batch
            settings["network.staging_pool_buffer_size_mb"] = needed_mb
        settings.update(plan.broker_options)
        settings.update(
            {
                "broker.host": plan.host,
                "broker.port": 0,
                "network.use_nonblocking": variant.kind == "staged",
                "network.stats_interval_s": _STATS_INTERVAL,
                "cxl.path": cxl_path,
                "cxl.segment_mb": self.segment_mb(),
                "cxl.size_mb": self.cxl_size_mb(),
                "logging.level": "INFO",
                # Only ack-2 runs get a disk log: with one, the broker writes
                # every committed batch to disk, whatever the ack level.
                "storage.dir": (storage_path or plan.storage_dir) if variant.durable else "",
            }
        )
        return settings

    def write_broker_config(
        self, variant: Variant, cxl_path: str, storage_path: str | None = None
    ) -> str:
        tables: dict[str, list[str]] = {}
        for key, value in self.broker_settings(variant, cxl_path, storage_path).items():
            section, name = key.split(".")
            tables.setdefault(section, []).append(f"{name} = {_toml_value(value)}")
        text = "".join(f"[{s}]\n" + "\n".join(lines) + "\n\n" for s, lines in tables.items())
        path = Path(self._tmp.name) / f"{variant.name}.toml"
        path.write_text(text)
        return str(path)

    def check_broker_config(self) -> None:
        """Fail before running anything if the broker would refuse its config."""
        env = {**self.broker_env}
        for v in self.plan.variants:
            if v.is_broker:
                config = load_config(self.write_broker_config(v, "/dev/shm/unused"), env=env)
                if v.durable and self._storage is None:
                    self._storage = config.storage

    def storage_config(self) -> StorageConfig | None:
        """The ack-2 runs' ``[storage]`` settings (None without ack-2 variants)."""
        if self._storage is None and any(v.durable for v in self.plan.variants):
            self.check_broker_config()
        return self._storage

    def storage_setup(self) -> dict[str, Any] | None:
        """Where the ack-2 disk logs go and the group commit they use (for the report)."""
        storage = self.storage_config()
        if storage is None:
            return None
        return {
            "dir": self.plan.storage_dir,
            "filesystem": filesystem(self.plan.storage_dir),
            "sync_interval_ms": storage.sync_interval_ms,
            "sync_bytes": storage.sync_bytes,
        }

    def check_storage_dir(self) -> str | None:
        """Why the ack-2 variants cannot run (None if they can, or if there are none)."""
        if not any(v.durable for v in self.plan.variants):
            return None
        where = self.plan.storage_dir
        if not os.path.isdir(where):
            return f"--storage-dir {where}: not a directory"
        if not os.access(where, os.W_OK | os.X_OK):
            return f"--storage-dir {where}: not writable"
        return None

    # -- running ---------------------------------------------------------------------

    def say(self, text: str) -> None:
        if self.live is not None:
            print(text, file=self.live, flush=True)

    async def run(self) -> None:
        total = len(self.plan.variants) * self.plan.rounds
        done = 0
        for rnd in range(1, self.plan.rounds + 1):
            for variant in self.plan.variants:
                done += 1
                label = f"[{done}/{total} r{rnd}] {variant.name}"
                started = time.monotonic()
                earlier: list[str] = []
                for attempt in range(1, _ATTEMPTS + 1):
                    try:
                        result = await self.run_once(variant, rnd, label)
                    except* BenchError as group:
                        errors = [str(e) for e in group.exceptions]
                        result = RunResult(
                            variant.name, rnd, ok=False, errors=errors, receiver_failed=True
                        )
                    result.attempts = attempt
                    result.earlier_errors = earlier
                    # A receiver that died or never started (a stray signal, a port
                    # race) says nothing about throughput: try that run again.
                    if result.ok or not result.receiver_failed or attempt == _ATTEMPTS:
                        break
                    self.say(f"{label}: retrying: {'; '.join(result.errors)[:300]}")
                    earlier = [*earlier, *result.errors]
                self.runs.append(result)
                self.say(self.run_line(label, result, time.monotonic() - started))

    def run_line(self, label: str, r: RunResult, wall: float) -> str:
        if not r.ok:
            return f"{label}: FAILED: {'; '.join(r.errors)}"
        lat = percentiles(r.latency_us, (50.0, 99.0))
        lat_text = (
            f"ack p50 {lat[0] / 1000:.1f} ms p99 {lat[1] / 1000:.1f} ms"
            if r.latency_us
            else "no acks"
        )
        pool = f", pool peak {r.pool_peak}/{r.pool_size}, pauses {r.pauses}" if r.pool_size else ""
        disk = f", {r.storage_bytes / 1e9:.2f} GB on disk" if r.storage_bytes is not None else ""
        return (
            f"{label}: {r.gb_per_s:.2f} GB/s, {r.msgs_per_s / 1e6:.2f} M msg/s, {lat_text}, "
            f"receiver CPU {r.cpu_s_per_gb:.2f} s/GB{pool}{disk} "
            f"({r.payload_bytes / 1e9:.2f} GB in {r.elapsed_s:.2f} s; wall {wall:.1f} s)"
        )

    async def start_server(
        self, nursery: trio.Nursery, variant: Variant, cxl: str, storage: str | None = None
    ) -> Server:
        python = sys.executable
        env = dict(os.environ)
        if variant.is_broker:
            for key in _CONTROLLED_ENV:
                env.pop(key, None)
            config = self.write_broker_config(variant, cxl, storage)
            cmd = [python, "-m", "trio_embarcadero", "serve", "--config", config, "--reset"]
        else:
            kind = variant.kind.removesuffix("-sink")
            cmd = [python, "-m", "trio_embarcadero.sink", kind, "--host", self.plan.host]
        process = await trio.lowlevel.open_process(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
        server = Server(variant, process)
        nursery.start_soon(_pump, process.stdout, server.on_line)
        nursery.start_soon(_pump, process.stderr, server.on_line)
        # Broker start-up faults the whole CXL region in (~1 GB/s here).
        with trio.move_on_after(60 + self.cxl_size_mb() / 200):
            while not server.listening.is_set():
                if process.poll() is not None:
                    break
                with trio.move_on_after(0.1):
                    await server.listening.wait()
        if server.address is None:
            await _stop_process(process, signal.SIGKILL)
            tail = " | ".join(server.tail)
            raise BenchError(f"{variant.name}: receiver did not start: {tail}")
        return server

    async def run_once(self, variant: Variant, rnd: int, label: str) -> RunResult:
        plan = self.plan
        cxl = str(Path(plan.cxl_dir) / f"trio-embarcadero-bench-{uuid.uuid4().hex[:12]}")
        result = RunResult(variant.name, rnd, ok=False)
        storage: str | None = None
        try:
            if variant.durable:
                # A fresh disk log per run, on --storage-dir (a disk).
                try:
                    storage = tempfile.mkdtemp(
                        prefix="trio-embarcadero-bench-", dir=plan.storage_dir
                    )
                except OSError as exc:
                    raise BenchError(f"{variant.name}: no disk-log directory: {exc}") from None
            async with trio.open_nursery() as nursery:
                server = await self.start_server(nursery, variant, cxl, storage)
                try:
                    await self.drive(server, variant, result, label, nursery)
                finally:
                    await _stop_process(
                        server.process, signal.SIGINT if variant.is_broker else signal.SIGTERM
                    )
                if variant.is_broker and server.process.returncode not in (0, None):
                    result.receiver_failed = True
                    result.errors.append(
                        f"broker exited with {server.process.returncode}: "
                        + " | ".join(list(server.tail)[-5:])
                    )
                    result.ok = False
            if storage is not None:
                # The broker has stopped: everything it acked is in the files.
                result.storage_bytes = _tree_bytes(storage)
                if result.ok and result.storage_bytes != result.wire_bytes:
                    result.ok = False
                    result.errors.append(
                        f"the disk log holds {result.storage_bytes} bytes after acking "
                        f"{result.wire_bytes} wire bytes at ack 2"
                    )
        finally:
            try:
                os.unlink(cxl)
            except FileNotFoundError:
                pass
            if storage is not None:
                shutil.rmtree(storage, ignore_errors=True)
        return result

    async def drive(
        self,
        server: Server,
        variant: Variant,
        result: RunResult,
        label: str,
        nursery: trio.Nursery,
    ) -> None:
        plan = self.plan
        assert server.address is not None
        host, port = server.address
        pid = server.process.pid
        cmd = [
            sys.executable,
            "-m",
            "trio_embarcadero.loadgen",
            "--host",
            host,
            "--port",
            str(port),
            "--connections",
            str(plan.connections),
            "--ack",
            str(variant.ack),
            "--message-size",
            str(plan.message_size),
            "--batch-messages",
            str(plan.batch_messages),
            "--bytes",
            str(plan.bytes),
            "--seconds",
            str(plan.seconds),
            "--interval",
            str(_PROGRESS_INTERVAL),
        ]
        final: dict[str, Any] = {}
        loadgen_err: deque[str] = deque(maxlen=10)
        last_live = [0.0, 0]  # elapsed, bytes at the previous live line
        peak_anon = 0

        def on_loadgen_line(line: str) -> None:
            try:
                record = json.loads(line)
            except ValueError:
                loadgen_err.append(line)
                return
            if record.get("type") == "result":
                final.update(record)
                return
            if record.get("type") != "progress":
                return
            elapsed, sent = record["elapsed"], record["sent_bytes"]
            result.series.append((elapsed, sent))
            if elapsed - last_live[0] >= _LIVE_INTERVAL - 1e-3:
                span = elapsed - last_live[0]
                rate = (sent - last_live[1]) / span
                sent_msgs = record["sent_msgs"]
                acked = record["acked_msgs"] / sent_msgs if variant.ack and sent_msgs else None
                self.say(self.live_line(label, elapsed, rate, acked, server))
                last_live[:] = [elapsed, sent]

        cpu0 = process_cpu_seconds(pid)
        memory0 = process_memory(pid)
        loadgen = await trio.lowlevel.open_process(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        try:
            async with trio.open_nursery() as pumps:
                pumps.start_soon(_pump, loadgen.stdout, on_loadgen_line)
                pumps.start_soon(_pump, loadgen.stderr, loadgen_err.append)
                with trio.move_on_after(plan.seconds + 120) as scope:
                    while loadgen.poll() is None:
                        peak_anon = max(peak_anon, process_memory(pid).get("RssAnon", 0))
                        if server.process.poll() is not None:
                            break
                        with trio.move_on_after(0.5):
                            await loadgen.wait()
                if scope.cancelled_caught:
                    result.errors.append("load generator did not finish in time")
        finally:
            await _stop_process(loadgen, signal.SIGKILL if result.errors else signal.SIGTERM)
        if variant.is_broker and server.process.returncode is None:
            # One more statistics line, so short runs get their pool peak too.
            server.stats_seen = trio.Event()
            with trio.move_on_after(_STATS_INTERVAL * 1.5):
                await server.stats_seen.wait()
        cpu1 = process_cpu_seconds(pid)
        memory1 = process_memory(pid)
        if server.process.returncode is not None:
            result.receiver_failed = True
            result.errors.append(
                f"receiver died ({server.process.returncode}): " + " | ".join(server.tail)
            )
        if not final:
            result.errors.append("load generator failed: " + " | ".join(loadgen_err))
            return
        result.errors.extend(final["errors"])
        result.ok = bool(final["ok"]) and not result.errors
        result.payload_bytes = final["payload_bytes"]
        result.wire_bytes = final["wire_bytes"]
        result.messages = final["messages"]
        result.batches = final["batches"]
        result.elapsed_s = final["elapsed_s"]
        result.time_bounded = final["time_bounded"]
        result.latency_us = final["latency_us"]
        result.latency_after_send_us = final["latency_after_send_us"]
        result.loadgen_cpu_s = final["loadgen_cpu_s"]
        result.server_cpu_s = cpu1 - cpu0
        result.server_peak_rss = memory1.get("VmHWM", memory0.get("VmHWM", 0))
        result.server_peak_anon = max(peak_anon, memory1.get("RssAnon", 0))
        result.pool_peak, result.pool_size, result.pauses = (
            server.pool_peak,
            server.pool_size,
            server.pauses,
        )

    def live_line(
        self, label: str, elapsed: float, rate: float, acked: float | None, server: Server
    ) -> str:
        parts = [
            f"  {label} {elapsed:5.1f}s",
            f"{rate / 1e6:8.0f} MB/s",
            f"{rate / self.plan.message_size / 1e6:6.2f} M msg/s",
        ]
        if acked is not None:
            parts.append(f"acked {acked:4.0%}")
        if server.pool_size is not None:
            parts.append(
                f"pool {server.pool_used}/{server.pool_size} (peak {server.pool_peak})"
                f" pauses {server.pauses}"
            )
        return "  ".join(parts)


# -- report ------------------------------------------------------------------------


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return (
        "-"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else format(value, spec)
    )


def render_table(report: dict[str, Any]) -> str:
    """The human-readable summary of a report made by :func:`build_report`."""
    setup = report["setup"]
    head = (
        f"trio-embarcadero bench: {setup['rounds']} round(s) of "
        f"{', '.join(setup['variants'])}; {setup['connections']} connection(s), "
        f"{setup['message_size']} B messages, {setup['batch_messages']} per batch "
        f"({setup['batch_total_size']:,} B batch payload), "
        f"{setup['bytes_per_run'] / 1e9:.2f} GB of message payload per run"
    )
    columns = (
        "variant",
        "GB/s median [min-max]",
        "M msg/s",
        "x trio-sink",
        "x raw-sink",
        "ack ms p50/p99/p99.9",
        "CPU s/GB",
        "RSS MiB (anon)",
        "pool peak",
        "pauses",
    )
    rows: list[tuple[str, ...]] = []
    for name, v in report["variants"].items():
        gb = v["gb_per_s"]
        lat = v["latency_ms"]
        rss = v["server_peak_rss_bytes"]
        anon = v["server_peak_anon_bytes"]
        pauses = v["pauses"]["median"]
        rows.append(
            (
                name + ("" if not v["failed_runs"] else f" ({v['failed_runs']} failed)"),
                f"{_fmt(gb['median'])} [{_fmt(gb['min'])}-{_fmt(gb['max'])}]",
                _fmt(v["msgs_per_s"]["median"] and v["msgs_per_s"]["median"] / 1e6),
                _fmt(v["ratio_to_trio_sink"]),
                _fmt(v["ratio_to_raw_sink"]),
                "/".join(_fmt(lat[k], ".1f") for k in ("p50", "p99", "p99.9"))
                if lat["count"]
                else "- (ack 0)",
                _fmt(v["server_cpu_s_per_gb"]["median"]),
                f"{rss / 2**20:.0f} ({anon / 2**20:.0f})" if rss else "-",
                f"{v['pool_peak']}/{v['pool_size']}" if v["pool_size"] else "-",
                _fmt(pauses, ".0f"),
            )
        )
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    lines = [head, ""]
    lines.append("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)
    lines.append("")
    lines.extend(report["notes"])
    return "\n".join(lines)


def _notes(plan: Plan, variants: dict[str, Any], storage: dict[str, Any] | None) -> list[str]:
    notes = [
        "GB/s: message payload (message size x messages, 10**9 B) from the first send to the "
        "last ack (ack 1 and 2) or to the receiver closing after reading everything (ack 0).",
        "x trio-sink / x raw-sink: ratio of medians; same-round (paired) ratios are in --json.",
        "ack ms: per batch, from the start of its sendall to the ack covering it (includes "
        "time blocked on a full socket), pooled over rounds; after-send latency is in --json.",
        "CPU s/GB: the receiver process (broker or sink), utime+stime over the run. "
        "RSS: VmHWM, which for the broker includes the mapped CXL region; (anon) is the "
        "private part (peak RssAnon sampled every 0.5 s).",
    ]
    for name, raw in variants.items():
        if raw["receiver"] == BEST_RAW and raw["gb_per_s"]["median"]:
            notes.append(
                f"Load generator alone: {raw['gb_per_s']['median']:.2f} GB/s median "
                f"[{raw['gb_per_s']['min']:.2f}-{raw['gb_per_s']['max']:.2f}] into {name} "
                f"(its own CPU {_fmt(raw['loadgen_cpu_s_per_gb']['median'])} s/GB)."
            )
    if storage is not None:
        notes.append(
            f"ack 2: the count comes once the batch is fdatasync'ed to the broker's disk log "
            f"(a fresh directory per run under {storage['dir']}, {storage['filesystem']}); "
            f"group commit: one sync {storage['sync_interval_ms']:g} ms after the first "
            f"unsynced commit, or once {storage['sync_bytes'] / 2**20:g} MiB wait."
        )
    for kind in ("staged", "direct"):
        durable, acked = variants.get(f"{kind}-ack2"), variants.get(f"{kind}-ack1")
        if durable is None or acked is None or durable["ratio_to_ack1"] is None:
            continue
        lat2, lat1 = durable["latency_ms"], acked["latency_ms"]
        paired = durable["paired_ratio_to_ack1"]
        notes.append(
            f"Ack-2 cost ({kind}): {kind}-ack2 moves {durable['ratio_to_ack1']:.0%} of "
            f"{kind}-ack1's GB/s (same-round median {_fmt(paired and paired * 100, '.0f')}"
            f"%); ack p50 {_fmt(lat1['p50'], '.1f')} -> {_fmt(lat2['p50'], '.1f')} ms, "
            f"p99 {_fmt(lat1['p99'], '.1f')} -> {_fmt(lat2['p99'], '.1f')} ms."
        )
    for name in ("staged-ack1", "staged-ack0"):
        v = variants.get(name)
        if v is None:
            continue
        vs_trio, vs_raw = v["ratio_to_trio_sink"], v["ratio_to_raw_sink"]
        if vs_trio is not None or vs_raw is not None:
            notes.append(
                f"Targets ({name}): >= {TARGET_VS_TRIO_SINK:.0%} of {BASELINE} -> "
                f"{_fmt(vs_trio and vs_trio * 100, '.0f')}%; >= {TARGET_VS_RAW_SINK:.0%} of "
                f"{BEST_RAW} -> {_fmt(vs_raw and vs_raw * 100, '.0f')}%."
            )
    bounded = [n for n, v in variants.items() if v["time_bounded_runs"]]
    if bounded:
        notes.append(f"Stopped by --seconds {plan.seconds:g} before --bytes: {', '.join(bounded)}.")
    return notes


def build_report(bench: Bench) -> dict[str, Any]:
    """The JSON-ready report of a finished bench."""
    plan = bench.plan
    variants = summarize(plan, bench.runs)
    storage = bench.storage_setup()
    return {
        "setup": {
            "variants": [v.name for v in plan.variants],
            "rounds": plan.rounds,
            "connections": plan.connections,
            "message_size": plan.message_size,
            "batch_messages": plan.batch_messages,
            "batch_payload_bytes": plan.batch_payload,
            "batch_total_size": plan.batch_total_size,
            "bytes_requested": plan.bytes,
            "bytes_per_run": plan.batches_per_run * plan.batch_payload,
            "seconds_limit": plan.seconds,
            "broker_options": plan.broker_options,
            "broker_env": bench.broker_env,
            "cxl_size_mb": bench.cxl_size_mb(),
            "storage": storage,
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "trio": trio.__version__,
            "percentiles_from": _percentile_source(),
        },
        "units": {
            "gb_per_s": "10**9 bytes of message payload per second",
            "latency_ms": "per batch, send start to covering ack (ack 2: durable on disk)",
            "latency_after_send_ms": "per batch, send completion to covering ack",
            "storage_bytes": "bytes in the ack-2 run's disk log after the broker stopped",
        },
        "variants": variants,
        "runs": [r.to_json() for r in bench.runs],
        "notes": _notes(plan, variants, storage),
        "ok": all(r.ok for r in bench.runs),
    }


def _percentile_source() -> str:
    try:
        import hdrh.histogram  # type: ignore[import-untyped, unused-ignore]  # noqa: F401
    except ImportError:
        return "numpy"
    return "hdrhistogram"


def plot(report: dict[str, Any], runs: Sequence[RunResult], path: str) -> None:
    """Throughput over time (every run) and the latency CDF (every variant) as a PNG."""
    import matplotlib  # type: ignore[import-not-found, unused-ignore]

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    colors: dict[str, Any] = {}
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for name in report["variants"]:
        colors[name] = cycle[len(colors) % len(cycle)]
    labelled: set[str] = set()
    for run in runs:
        if not run.ok:
            continue
        # From the first send (0, 0) to the end of the window (everything sent).
        series = [(0.0, 0), *run.series, (run.elapsed_s, run.payload_bytes)]
        points = [
            (t1, (b1 - b0) / (t1 - t0) / 1e9)
            for (t0, b0), (t1, b1) in itertools.pairwise(series)
            if t1 > t0
        ]
        left.plot(
            [t for t, _ in points],
            [rate for _, rate in points],
            marker=".",
            color=colors[run.variant],
            label=None if run.variant in labelled else run.variant,
            alpha=0.8,
        )
        labelled.add(run.variant)
    left.set_xlabel("seconds since first send")
    left.set_ylabel("GB/s sent (message payload)")
    left.set_title(f"Throughput over time (every run, {_PROGRESS_INTERVAL:g} s steps)")
    if labelled:
        left.legend(fontsize="small")
    curves = 0
    for name in report["variants"]:
        values = np.sort(
            np.array([x for r in runs if r.ok and r.variant == name for x in r.latency_us])
        )
        if len(values):
            right.plot(
                values / 1000,
                np.arange(1, len(values) + 1) / len(values),
                color=colors[name],
                label=name,
            )
            curves += 1
    right.set_xscale("log")
    right.set_xlabel("ack latency per batch, ms (send start to ack)")
    right.set_ylabel("fraction of batches")
    right.set_title("Ack latency CDF (ack 1 and 2 variants, pooled rounds)")
    if curves:
        right.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- entry point -------------------------------------------------------------------


def make_plan(args: argparse.Namespace) -> Plan:
    """Turn parsed arguments into a :class:`Plan` (raises ValueError on bad input)."""
    if args.batch_messages is not None:
        batch_messages = args.batch_messages
    else:
        # The C++ client seals a batch once header + records reach the batch size.
        room = max(args.batch_size - BATCH_HEADER_SIZE, 1)
        batch_messages = max(1, -(-room // padded_size(args.message_size)))
    options = dict(_parse_option(o) for o in args.broker_option)
    if "storage.dir" in options:
        raise ValueError(
            "--broker-option storage.dir: the bench gives the -ack2 variants a fresh disk log "
            "per run and the others none; use --storage-dir to say where"
        )
    return Plan(
        variants=list(args.variants),
        rounds=args.rounds,
        connections=args.connections,
        message_size=args.message_size,
        batch_messages=batch_messages,
        bytes=args.bytes,
        seconds=args.seconds,
        host=args.host,
        broker_options=options,
        cxl_dir=args.cxl_dir,
        storage_dir=args.storage_dir or tempfile.gettempdir(),
    )


def run(args: argparse.Namespace) -> int:
    """Run ``trio-embarcadero bench``; returns the exit status (1 if a run failed)."""
    if args.plot:
        try:
            import matplotlib  # type: ignore[import-not-found, unused-ignore]  # noqa: F401
        except ImportError:
            print(
                "trio-embarcadero bench: --plot needs matplotlib, which is not installed "
                "(pip install matplotlib); run without --plot or install it",
                file=sys.stderr,
            )
            return 2
    try:
        plan = make_plan(args)
    except ValueError as exc:
        print(f"trio-embarcadero bench: {exc}", file=sys.stderr)
        return 2
    table_out = sys.stderr if args.json == "-" else sys.stdout
    bench = Bench(plan, live=None if args.quiet else sys.stderr)
    try:
        try:
            bench.check_broker_config()
        except ConfigError as exc:
            print(
                f"trio-embarcadero bench: the broker config would be refused:\n{exc}",
                file=sys.stderr,
            )
            return 2
        problem = bench.check_storage_dir()
        if problem:
            print(f"trio-embarcadero bench: {problem}", file=sys.stderr)
            return 2
        bench.say(
            f"bench: {len(plan.variants)} variant(s) x {plan.rounds} round(s), "
            f"{plan.batches_per_run * plan.batch_payload / 1e9:.2f} GB per run "
            f"({plan.batches_per_run} batches of {plan.batch_messages} x {plan.message_size} B), "
            f"{plan.connections} connection(s); broker CXL region {bench.cxl_size_mb()} MiB"
        )
        storage = bench.storage_setup()
        if storage is not None:
            bench.say(
                f"bench: ack-2 disk logs under {storage['dir']} ({storage['filesystem']}), "
                f"sync after {storage['sync_interval_ms']:g} ms or "
                f"{storage['sync_bytes'] / 2**20:g} MiB"
            )
            if storage["filesystem"].split()[0] in ("tmpfs", "ramfs"):
                print(
                    f"trio-embarcadero bench: warning: --storage-dir {storage['dir']} is "
                    f"{storage['filesystem']}, memory rather than a disk: ack 2 will not "
                    "measure a disk",
                    file=sys.stderr,
                )
        try:
            trio.run(bench.run)
        except* KeyboardInterrupt:
            print("trio-embarcadero bench: interrupted; reporting the runs done", file=sys.stderr)
        report = build_report(bench)
    finally:
        bench.close()
    print(render_table(report), file=table_out, flush=True)
    if args.json == "-":
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        plot(report, bench.runs, args.plot)
        print(f"plot written to {args.plot}", file=table_out)
    return 0 if report["ok"] and bench.runs else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m trio_embarcadero.bench``: the same as ``trio-embarcadero bench``."""
    parser = argparse.ArgumentParser(prog="trio-embarcadero")
    commands = parser.add_subparsers(dest="command", required=True)
    add_parser(commands)
    return run(parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(main())
