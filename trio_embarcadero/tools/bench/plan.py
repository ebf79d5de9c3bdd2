"""What the bench runs: its arguments, the variants, and the sizes they imply.

Everything here is fixed before the first process starts: :func:`make_plan`
turns the parsed command line into a :class:`Plan`, which also derives the
batch and CXL-region sizes every run uses.
"""

from __future__ import annotations

import argparse
import math
import re
import tempfile
import tomllib

import attrs

from ...wire import BATCH_HEADER_SIZE, padded_size
from ..loadgen import DEFAULT_MESSAGE_SIZE, parse_size

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
#: How often the load generator reports progress (the plot's resolution), seconds.
PROGRESS_INTERVAL = 0.1

_VARIANT_RE = re.compile(r"(trio-sink|raw-sink|staged|direct)(?:-ack([012]))?")
#: What ``trio-embarcadero bench --help`` says the command does.
DESCRIPTION = (
    "Run the broker (staged and direct path, ack 0 and 1; ack 2, durable on disk, "
    "on request) and two minimal receivers against one load generator, in "
    "interleaved rounds, each in its own process. Prints a live line per second "
    "and a table of medians [min-max]."
)


# -- what to run ---------------------------------------------------------------------


@attrs.frozen
class Variant:
    """One receiver + ack level to measure."""

    name: str
    kind: str  # trio-sink, raw-sink, staged, direct
    ack: int

    @property
    def is_broker(self) -> bool:
        """The broker (staged or direct path), not a sink."""
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
        """Whole batches a run sends: ``bytes`` rounded up."""
        return max(1, -(-self.bytes // self.batch_payload))

    @property
    def segment_mb(self) -> int:
        """``cxl.segment_mb``: as given, else 32 MiB or room for two batches."""
        given = self.broker_options.get("cxl.segment_mb")
        if isinstance(given, int) and not isinstance(given, bool) and given > 0:
            return given
        return max(32, 2 * -(-self.batch_total_size // 2**20))

    @property
    def cxl_size_mb(self) -> int:
        """``cxl.size_mb``: as given (say, the shipped 1 GiB with a retention
        limit, for a run through more than the region holds), else a region
        a run cannot fill."""
        given = self.broker_options.get("cxl.size_mb")
        if isinstance(given, int) and not isinstance(given, bool) and given > 0:
            return given
        segment_mb = self.segment_mb
        segment = segment_mb * 2**20
        per_batch = BATCH_HEADER_SIZE + self.batch_total_size + 256
        per_segment = max(1, (segment - 64) // per_batch)
        segments = -(-self.batches_per_run // per_segment) + 2
        return segments * segment_mb + 4


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


def _parse_option(text: str) -> tuple[str, object]:
    """``SECTION.KEY=VALUE`` (VALUE in TOML syntax, else a string) as ``(key, value)``."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or key.count(".") != 1:
        raise ValueError(f"--broker-option wants SECTION.KEY=VALUE: {text!r}")
    try:
        value: object = tomllib.loads(f"v = {raw.strip()}")["v"]
    except ValueError:
        value = raw.strip()
    return key, value


# -- the command line ----------------------------------------------------------------


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Give ``parser`` (``trio-embarcadero bench``'s) its description and options."""
    parser.description = DESCRIPTION
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
