"""What the bench runs: its arguments, the variants, and the sizes they imply.

Everything here is fixed before the first process starts: :func:`make_plan`
turns the parsed command line into a :class:`Plan`, which also derives the
batch and CXL-region sizes of every variant's runs.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import tempfile
import tomllib
from collections.abc import Collection, Sequence

import attrs

from ...wire import BATCH_HEADER_SIZE, MAX_BROKER_ID, padded_size
from ..loadgen import DEFAULT_MESSAGE_SIZE, DEFAULT_SEND_BUFFER, parse_size, parse_size_or_zero
from ..procfs import cpu_list_text, parse_cpu_list

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
#: The read path, 1 and 4 readers: the minimal sender and the broker's subscribers.
READ_VARIANTS = ("read-sink1", "read-sub1", "read-sink4", "read-sub4")
#: Several broker processes on one region, a topic of order 0 or 5 (one total
#: order across them), next to one broker: the cost of the order and of a
#: second broker on this machine.
CLUSTER_VARIANTS = ("cluster1-order0", "cluster1-order5", "cluster2-order0", "cluster2-order5")
#: Connections each broker of a cluster variant gets at least.
CLUSTER_CONNECTIONS_PER_BROKER = 2
#: Broker settings a variant takes by name: ``staged-ack1+retention``. Retention
#: runs through the shipped 1 GiB region and keeps 256 MiB of the topic, so a
#: run may send more than the region holds.
PRESETS: dict[str, dict[str, object]] = {
    "retention": {"cxl.size_mb": 1024, "topics.retention_bytes": 256 * 2**20},
}
#: The C++ evaluation's batch size; a batch is sealed once header + records reach it.
DEFAULT_BATCH_SIZE = 2 * 2**20
DEFAULT_BYTES = 4 * 10**9
#: How often the load generator reports progress (the plot's resolution), seconds.
PROGRESS_INTERVAL = 0.1

_VARIANT_RE = re.compile(
    r"(?:(?P<kind>trio-sink|raw-sink|staged|direct)(?:-ack(?P<ack>[012]))?"
    r"|cluster(?P<brokers>[0-9]+)-order(?P<order>[0-9]+)(?:-ack(?P<cluster_ack>[012]))?"
    r"|read-(?P<read>sink|sub)(?P<readers>[0-9]*))"
    r"(?P<session>-session)?"
    r"(?P<tags>(?:\+[A-Za-z0-9_-]+)*)"
)
#: What ``trio-embarcadero bench --help`` says the command does.
DESCRIPTION = (
    "Run the broker (staged and direct path, ack 0 and 1; ack 2, durable on disk, "
    "on request) and two minimal receivers against one load generator, in "
    "interleaved rounds, each in its own process; on request also the read path "
    "(subscribers of a filled topic next to a minimal sender), paced load "
    "(ack latency at fractions of the peak) and clusters (several brokers on one "
    "region, topics of order 0 or 5). Prints a live line per second and a table "
    "of medians [min-max]."
)


# -- what to run ---------------------------------------------------------------------


@attrs.frozen
class Variant:
    """One receiver (or, on the read path, sender) and its settings.

    Attributes:
        name: As listed (``staged-ack1+retention``), with ``@SIZE`` appended
            when several batch sizes run.
        kind: ``trio-sink``, ``raw-sink``, ``staged``, ``direct``,
            ``cluster`` (the ingest path), ``read-sink`` or ``read-sub`` (the
            read path).
        ack: The publishers' ack level (0 on the read path, which has no acks).
        readers: Reader connections of a read variant (0 otherwise).
        tags: The ``+NAME`` parts of the name.
        options: The variant's own broker settings (``SECTION.KEY``: value):
            its presets, then its ``--variant-option`` values.
        batch: The ``--batch-size`` it runs with, as written, when several
            are given ("" otherwise).
        batch_messages: Messages per batch (0 until :func:`make_plan` sets it).
        brokers: Broker processes on the region (``cluster`` variants; 1 otherwise).
        order: The topic's order level (``cluster`` variants: 0 or 5; 0 otherwise).
        session: The load generator publishes in sessions (``-session``:
            ``client_req = 2``, one session a connection); the broker's
            ingest path with acks only.
    """

    name: str
    kind: str
    ack: int
    readers: int = 0
    tags: tuple[str, ...] = ()
    options: dict[str, object] = attrs.field(factory=dict, hash=False)
    batch: str = ""
    batch_messages: int = 0
    brokers: int = 1
    order: int = 0
    session: bool = False

    @property
    def is_broker(self) -> bool:
        """The broker (staged, direct, a cluster, or its subscribers), not a sink."""
        return self.kind in ("staged", "direct", "cluster", "read-sub")

    @property
    def is_cluster(self) -> bool:
        """Broker processes on one region (``clusterN-orderO``), any number."""
        return self.kind == "cluster"

    @property
    def is_read(self) -> bool:
        """A read-path variant: readers subscribe to a topic filled beforehand."""
        return self.kind in ("read-sink", "read-sub")

    @property
    def durable(self) -> bool:
        """Ack 2: the broker runs with a disk log and acks once a batch is synced."""
        return self.ack == 2

    @property
    def paced(self) -> bool:
        """Whether ``--rate`` runs it paced: the ingest path with acks to time."""
        return not self.is_read and self.ack > 0


@attrs.frozen
class Pinning:
    """``--pin``: the CPUs the servers may run on (brokers, sinks, the read
    path's minimal sender) and those of the clients (load generator, readers).

    Kept apart, the scheduler cannot wake a receiver onto the core its load
    generator is sending from, where the two take turns: on two cores that
    was most of the minimal sink's paced p99 (0.5 ms pinned against 12.5 ms).
    """

    servers: tuple[int, ...]
    clients: tuple[int, ...]

    def describe(self) -> str:
        """``"servers on CPU 1, clients on CPU 0"``."""
        return f"servers on {_cpus_text(self.servers)}, clients on {_cpus_text(self.clients)}"

    def to_json(self) -> dict[str, list[int]]:
        """The report's ``setup.pin``."""
        return {"servers": list(self.servers), "clients": list(self.clients)}


def _cpus_text(cpus: Sequence[int]) -> str:
    return f"CPU{'s' if len(cpus) > 1 else ''} {cpu_list_text(cpus)}"


def pinning(text: str, available: Collection[int]) -> Pinning:
    """``--pin``'s CPU sets out of the CPUs this process may use (``available``).

    ``auto`` gives the servers the upper half (the larger one if odd) and the
    clients the rest; ``SERVERS/CLIENTS`` names both as kernel CPU lists
    (``1/0``, ``2-3/0,1``).

    Raises:
        ValueError: The sets are not two CPU lists, share a CPU, or name one
            this process may not use; or ``auto`` with a single CPU.
    """
    usable = sorted(available)
    if text == "auto":
        if len(usable) < 2:
            raise ValueError(
                f"--pin keeps the servers and the clients on different CPUs, and this process "
                f"may use only {_cpus_text(usable)}: run without --pin"
            )
        half = len(usable) // 2
        return Pinning(servers=tuple(usable[half:]), clients=tuple(usable[:half]))
    servers_text, slash, clients_text = text.partition("/")
    try:
        if not slash:
            raise ValueError(f"not SERVERS/CLIENTS: {text!r}")
        servers, clients = parse_cpu_list(servers_text), parse_cpu_list(clients_text)
    except ValueError as exc:
        raise ValueError(f"--pin {text}: {exc}; give auto or SERVERS/CLIENTS, e.g. 1/0") from None
    shared = sorted(set(servers) & set(clients))
    if shared:
        raise ValueError(
            f"--pin {text}: the servers and the clients share {_cpus_text(shared)}; "
            "give them separate CPUs"
        )
    missing = sorted(set(servers + clients) - set(usable))
    if missing:
        raise ValueError(
            f"--pin {text}: {_cpus_text(missing)} not among the CPUs this process may use "
            f"({cpu_list_text(usable)})"
        )
    return Pinning(servers=tuple(servers), clients=tuple(clients))


@attrs.frozen
class Plan:
    """Everything a run needs, fixed for the whole invocation."""

    variants: list[Variant]
    rounds: int
    connections: int
    message_size: int
    bytes: int
    seconds: float
    host: str
    broker_options: dict[str, object]
    cxl_dir: str
    storage_dir: str = attrs.field(factory=tempfile.gettempdir)
    #: ``--rate``: fractions of each variant's peak to offer in paced runs.
    rates: tuple[float, ...] = ()
    #: ``--pin``: the servers' and the clients' CPUs (None: wherever the scheduler puts them).
    pin: Pinning | None = None
    #: ``--send-buffer``: the load generator's SO_SNDBUF a connection (0: autotuned).
    send_buffer: int = DEFAULT_SEND_BUFFER
    #: ``--stall-probe``: watch the CPUs in use for stalls of the machine itself.
    stall_probe: bool = False

    def probe_cpus(self) -> list[int]:
        """The CPUs ``--stall-probe`` watches: those the servers and clients
        run on (``--pin``'s, or every CPU this process may use)."""
        if self.pin is not None:
            return sorted({*self.pin.servers, *self.pin.clients})
        return sorted(os.sched_getaffinity(0))

    def connections_for(self, variant: Variant) -> int:
        """Publisher connections of ``variant``'s runs: ``--connections``, and
        for a cluster at least :data:`CLUSTER_CONNECTIONS_PER_BROKER` a broker."""
        if variant.is_cluster:
            return max(self.connections, CLUSTER_CONNECTIONS_PER_BROKER * variant.brokers)
        return self.connections

    def batch_payload(self, variant: Variant) -> int:
        """Message payload bytes per batch (what throughput counts)."""
        return variant.batch_messages * self.message_size

    def batch_total_size(self, variant: Variant) -> int:
        """The batch header's ``total_size``: records with their headers and padding."""
        return variant.batch_messages * padded_size(self.message_size)

    def batches_per_run(self, variant: Variant) -> int:
        """Whole batches a run sends: ``bytes`` rounded up."""
        return max(1, -(-self.bytes // self.batch_payload(variant)))

    def options(self, variant: Variant) -> dict[str, object]:
        """The broker settings asked for: ``--broker-option``, then the variant's own."""
        return {**self.broker_options, **variant.options}

    def segment_mb(self, variant: Variant) -> int:
        """``cxl.segment_mb``: as given, else 32 MiB or room for two batches."""
        given = self.options(variant).get("cxl.segment_mb")
        if isinstance(given, int) and not isinstance(given, bool) and given > 0:
            return given
        return max(32, 2 * -(-self.batch_total_size(variant) // 2**20))

    def cxl_size_mb(self, variant: Variant) -> int:
        """``cxl.size_mb``: as given (say, the shipped 1 GiB with a retention
        limit, for a run through more than the region holds), else a region
        a run cannot fill."""
        given = self.options(variant).get("cxl.size_mb")
        if isinstance(given, int) and not isinstance(given, bool) and given > 0:
            return given
        segment_mb = self.segment_mb(variant)
        segment = segment_mb * 2**20
        per_batch = BATCH_HEADER_SIZE + self.batch_total_size(variant) + 256
        per_segment = max(1, (segment - 64) // per_batch)
        # Two more segments a broker: each has a stream (and half-full ends).
        segments = -(-self.batches_per_run(variant) // per_segment) + 2 * variant.brokers
        return segments * segment_mb + 4

    def counterpart(
        self,
        variant: Variant,
        *,
        kind: str | None = None,
        ack: int | None = None,
        tags: tuple[str, ...] | None = None,
        brokers: int | None = None,
        order: int | None = None,
        session: bool | None = None,
    ) -> Variant | None:
        """The first planned variant that is ``variant`` with another ``kind``,
        ``ack``, ``tags``, ``brokers``, ``order`` or ``session``, at the same
        batch size, if any: what a ratio compares it with."""
        wanted = (
            variant.kind if kind is None else kind,
            variant.ack if ack is None else ack,
            variant.readers,
            variant.tags if tags is None else tags,
            variant.batch_messages,
            variant.brokers if brokers is None else brokers,
            variant.order if order is None else order,
            variant.session if session is None else session,
        )
        return next(
            (
                other
                for other in self.variants
                if (
                    other.kind,
                    other.ack,
                    other.readers,
                    other.tags,
                    other.batch_messages,
                    other.brokers,
                    other.order,
                    other.session,
                )
                == wanted
            ),
            None,
        )


def make_plan(args: argparse.Namespace) -> Plan:
    """Turn parsed arguments into a :class:`Plan` (raises ValueError on bad input)."""
    options = dict(_parse_option(o) for o in args.broker_option)
    if "storage.dir" in options:
        raise ValueError(
            "--broker-option storage.dir: the bench gives the -ack2 variants a fresh disk log "
            "per run and the others none; use --storage-dir to say where"
        )
    listed: list[Variant] = list(args.variants)
    own = _variant_options(args.variant_option, [v.name for v in listed])
    sizes = _batch_shapes(args)
    variants = [
        attrs.evolve(
            variant,
            name=variant.name + (f"@{label}" if len(sizes) > 1 else ""),
            options=_own_options(variant, own.get(variant.name, {})),
            batch=label if len(sizes) > 1 else "",
            batch_messages=messages,
        )
        for variant in listed
        for label, messages in sizes
    ]
    rates = tuple(args.rate or ())
    if rates and not any(v.paced for v in variants):
        raise ValueError(
            "--rate paces the ingest variants with acks (sinks at ack 1, staged/direct at "
            "ack 1 or 2); none is listed"
        )
    return Plan(
        variants=variants,
        rounds=args.rounds,
        connections=args.connections,
        message_size=args.message_size,
        bytes=args.bytes,
        seconds=args.seconds,
        host=args.host,
        broker_options=options,
        cxl_dir=args.cxl_dir,
        storage_dir=args.storage_dir or tempfile.gettempdir(),
        rates=rates,
        pin=None if args.pin is None else pinning(args.pin, os.sched_getaffinity(0)),
        send_buffer=args.send_buffer,
        stall_probe=args.stall_probe,
    )


def _batch_shapes(args: argparse.Namespace) -> list[tuple[str, int]]:
    """``(label, messages per batch)`` for each batch size to run."""
    if args.batch_messages is not None:
        return [(f"{n}msgs", n) for n in args.batch_messages]
    # The C++ client seals a batch once header + records reach the batch size.
    padded = padded_size(args.message_size)
    return [
        (label, max(1, -(-max(size - BATCH_HEADER_SIZE, 1) // padded)))
        for label, size in args.batch_size
    ]


def _own_options(variant: Variant, given: dict[str, object]) -> dict[str, object]:
    """A variant's own broker settings: its presets, then ``given``
    (its ``--variant-option`` values); raises ValueError if it can have none."""
    if not variant.is_broker and (variant.tags or given):
        raise ValueError(
            f"variant {variant.name!r}: a sink runs no broker, so it takes no broker options"
        )
    own: dict[str, object] = {}
    for tag in variant.tags:
        if tag in PRESETS:
            if tag == "retention" and variant.is_read:
                raise ValueError(
                    f"variant {variant.name!r}: retention would trim the topic its "
                    "subscribers read from offset 0"
                )
            own.update(PRESETS[tag])
        elif not given:
            raise ValueError(
                f"variant {variant.name!r}: +{tag} is not a preset ({', '.join(PRESETS)}); "
                f"give its settings with --variant-option {variant.name}:SECTION.KEY=VALUE"
            )
    own.update(given)
    if "storage.dir" in own:
        raise ValueError(
            f"variant {variant.name!r}: storage.dir is the bench's to set (see --storage-dir)"
        )
    return own


def _variant_options(texts: Sequence[str], names: Sequence[str]) -> dict[str, dict[str, object]]:
    """``--variant-option NAME:SECTION.KEY=VALUE`` values, by variant name."""
    found: dict[str, dict[str, object]] = {}
    for text in texts:
        name, sep, option = text.partition(":")
        name = name.strip()
        if not sep:
            raise ValueError(f"--variant-option wants VARIANT:SECTION.KEY=VALUE: {text!r}")
        if name not in names:
            raise ValueError(
                f"--variant-option {text!r}: {name!r} is not one of --variants ({', '.join(names)})"
            )
        key, value = _parse_option(option, "--variant-option")
        found.setdefault(name, {})[key] = value
    return found


def _parse_option(text: str, flag: str = "--broker-option") -> tuple[str, object]:
    """``SECTION.KEY=VALUE`` (VALUE in TOML syntax, else a string) as ``(key, value)``."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or key.count(".") != 1:
        raise ValueError(f"{flag} wants SECTION.KEY=VALUE: {text!r}")
    try:
        value: object = tomllib.loads(f"v = {raw.strip()}")["v"]
    except ValueError:
        value = raw.strip()
    return key, value


# -- the command line ----------------------------------------------------------------


def _variant(text: str) -> Variant:
    name = text.strip()
    match = _VARIANT_RE.fullmatch(name)
    if not match:
        raise argparse.ArgumentTypeError(
            f"unknown variant {text!r}: use trio-sink, raw-sink, staged or direct, "
            "optionally with -ack0 or -ack1 (staged and direct also -ack2), "
            "read-sinkN / read-subN (N readers), or clusterN-orderO (N brokers, a topic "
            "of order O: 0 or 5); then -session (publish in sessions; the broker with "
            "acks), then any +NAME (e.g. +retention)"
        )
    kind, ack, read, readers, tags = match.group("kind", "ack", "read", "readers", "tags")
    tag_list = tuple(t for t in tags.split("+") if t)
    if len(set(tag_list)) != len(tag_list):
        raise argparse.ArgumentTypeError(f"variant {text!r} names a +tag twice")
    brokers, order, cluster_ack = match.group("brokers", "order", "cluster_ack")
    session = match.group("session") is not None
    if session and (
        kind not in ("staged", "direct", None)
        or read is not None
        or (ack or cluster_ack or "1") == "0"
    ):
        raise argparse.ArgumentTypeError(
            f"variant {text!r}: -session is the broker's ingest path with acks: "
            "staged-ack1-session, direct-ack2-session, cluster2-order5-session, ..."
        )
    if brokers is not None:
        if not 1 <= int(brokers) <= MAX_BROKER_ID + 1 or int(order) not in (0, 5):
            raise argparse.ArgumentTypeError(
                f"variant {text!r}: a cluster has 1 to {MAX_BROKER_ID + 1} brokers and a topic "
                "of order 0 or 5: cluster2-order5, cluster1-order0, ..."
            )
        ack_level = 1 if cluster_ack is None else int(cluster_ack)
        return Variant(
            name,
            "cluster",
            ack_level,
            0,
            tag_list,
            brokers=int(brokers),
            order=int(order),
            session=session,
        )
    if read is not None:
        if not readers or int(readers) < 1:
            raise argparse.ArgumentTypeError(
                f"say the number of readers: read-{read}1, read-{read}4, ..."
            )
        return Variant(name, f"read-{read}", 0, int(readers), tag_list)
    if ack is None and kind in ("staged", "direct"):
        raise argparse.ArgumentTypeError(
            f"say the ack level: {kind}-ack0, {kind}-ack1 or {kind}-ack2"
        )
    if ack == "2" and kind not in ("staged", "direct"):
        raise argparse.ArgumentTypeError(
            f"variant {text!r}: ack 2 needs the broker's disk log; a sink has none "
            "(use staged-ack2 or direct-ack2)"
        )
    return Variant(name, kind, 1 if ack is None else int(ack), 0, tag_list, session=session)


def _variants(text: str) -> list[Variant]:
    names = [t for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("no variants given")
    found = [_variant(t) for t in names]
    if len({v.name for v in found}) != len(found):
        raise argparse.ArgumentTypeError(f"a variant is listed twice: {text!r}")
    return found


def _items(text: str) -> list[str]:
    """The parts of a comma-separated list, none twice."""
    parts = [t.strip() for t in text.split(",") if t.strip()]
    if not parts:
        raise argparse.ArgumentTypeError("empty list")
    if len(set(parts)) != len(parts):
        raise argparse.ArgumentTypeError(f"listed twice: {text!r}")
    return parts


def _batch_sizes(text: str) -> list[tuple[str, int]]:
    return [(part, parse_size(part)) for part in _items(text)]


def _counts(text: str) -> list[int]:
    return [_positive_int(part) for part in _items(text)]


def _fractions(text: str) -> list[float]:
    values = [float(part.removesuffix("%")) / (100 if "%" in part else 1) for part in _items(text)]
    for value in values:
        if not 0 < value <= 1:
            raise argparse.ArgumentTypeError(f"a fraction of the peak is > 0 and <= 1: {text!r}")
    return values


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
        "the broker acking once the batch is fdatasync'ed to its disk log; "
        f"{','.join(READ_VARIANTS)}, the read path; {','.join(CLUSTER_VARIANTS)}, "
        "N broker processes on one region with a topic of order 0 or 5 (also -ack0/-ack2); "
        "any broker variant +retention "
        "(1 GiB region keeping 256 MiB) or +NAME with --variant-option)",
    )
    parser.add_argument("--rounds", type=_positive_int, default=3, help="default: 3")
    parser.add_argument(
        "--connections",
        type=_positive_int,
        default=4,
        help="publisher connections (default: 4; the read variants' fill uses them too; "
        f"a cluster variant gets at least {CLUSTER_CONNECTIONS_PER_BROKER} a broker)",
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
        type=_batch_sizes,
        default=[("2MiB", DEFAULT_BATCH_SIZE)],
        metavar="SIZE[,SIZE...]",
        help="seal a batch once its header and records reach SIZE, as the C++ client does "
        "(default: 2MiB, i.e. 1928 messages of 1 KiB, 2,097,664 payload bytes); with several "
        "sizes (e.g. 64KiB,2MiB) every variant runs at each, named VARIANT@SIZE",
    )
    parser.add_argument(
        "--batch-messages",
        type=_counts,
        metavar="N[,N...]",
        help="messages per batch (overrides --batch-size; several: VARIANT@Nmsgs)",
    )
    parser.add_argument(
        "--bytes",
        type=parse_size,
        default=DEFAULT_BYTES,
        metavar="SIZE",
        help="message payload per run, rounded up to whole batches (default: 4G = 4*10**9); "
        "the read variants' topic, which each reader reads whole",
    )
    parser.add_argument(
        "--seconds",
        type=_positive_float,
        default=30.0,
        help="stop a run's sending after this many seconds (default: 30)",
    )
    parser.add_argument(
        "--rate",
        type=_fractions,
        metavar="FRACTIONS",
        help="after each unpaced run of an ingest variant with acks, run it paced at these "
        "fractions of that run's GB/s (e.g. 0.25,0.5,0.8) and report ack latency from each "
        "batch's scheduled send",
    )
    parser.add_argument(
        "--pin",
        nargs="?",
        const="auto",
        metavar="SERVERS/CLIENTS",
        help="keep the servers (brokers, sinks) and the clients (load generator, readers) on "
        "separate CPUs: kernel CPU lists such as 1/0 or 2-3/0-1; alone, the upper half of "
        "the CPUs for the servers and the rest for the clients (recommended with --rate: "
        "otherwise the scheduler may put a receiver on its load generator's core)",
    )
    parser.add_argument(
        "--send-buffer",
        type=parse_size_or_zero,
        default=DEFAULT_SEND_BUFFER,
        metavar="SIZE",
        help="the load generator's SO_SNDBUF a connection (default: 512KiB; 0: the kernel "
        "autotunes it, up to net.ipv4.tcp_wmem's maximum, and a receiver that falls behind "
        "then also runs its publishers' loopback transmits: see benchmarks/README.md)",
    )
    parser.add_argument(
        "--stall-probe",
        action="store_true",
        help="watch each CPU in use for stalls of the machine itself (a process per CPU "
        "sleeping 2 ms in a loop at real-time priority, where allowed, and noting each "
        "wake-up over 1 ms late) and report each run's beside its latencies",
    )
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to use")
    parser.add_argument(
        "--broker-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set a broker config key for every broker variant, e.g. "
        "network.staging_pool_num_buffers=64 (repeatable; VALUE in TOML syntax)",
    )
    parser.add_argument(
        "--variant-option",
        action="append",
        default=[],
        metavar="VARIANT:KEY=VALUE",
        help="set a broker config key for one listed variant only, e.g. "
        "staged-ack1+big:cxl.size_mb=8192 (repeatable; over --broker-option and presets)",
    )
    parser.add_argument(
        "--cxl-dir",
        default="/dev/shm",
        help="where the per-run CXL files (and the read-sink's file) go (default: /dev/shm)",
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
        "--plot",
        metavar="PATH.png",
        help="throughput over time and latency CDFs (needs matplotlib)",
    )
    parser.add_argument("--quiet", action="store_true", help="no live lines")
