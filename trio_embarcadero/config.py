"""The broker's configuration: a frozen attrs tree and the code that loads it.

Values come from four layers, each overriding the one before:

1. the defaults written on the classes below,
2. a TOML file (one table per section: ``[broker]``, ``[cluster]``,
   ``[network]``, ``[cxl]``, ``[storage]``, ``[http]``, ``[logging]``,
   ``[topics]``; per-topic overrides are sub-tables of ``[topics]``, e.g.
   ``[topics."orders.eu"]``, and come from the file only),
3. the environment (see :func:`load_config` for the variable names),
4. overrides, normally the command line flags that were actually given.

Everything is checked in one pass and every problem is reported at once in a
single :class:`~trio_embarcadero.errors.ConfigError`, one line per problem, each
ending with the ``$.section.key`` path it concerns, for example::

    'staging_pool_num_buffers' must be > 0: 0 @ $.network.staging_pool_num_buffers

Example:
    >>> config = load_config(env={}, overrides={"broker.port": 0})
    >>> config.broker.port, config.network.staging_buffer_bytes
    (0, 4194304)
"""

import ipaddress
import json
import math
import operator
import os
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar, Final, TypeAlias, TypeVar

import attrs
import cattrs
import cattrs.preconf.tomllib
import cattrs.v
import tomli_w
from cattrs.errors import AttributeValidationNote, ClassValidationError, ForbiddenExtraKeysError

from .errors import ConfigError
from .wire import MAX_BROKER_ID, encode_topic

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python < 3.11
    import tomli as tomllib  # type: ignore[no-redef, import-not-found, unused-ignore]

__all__ = [
    "BrokerConfig",
    "ClusterConfig",
    "Config",
    "CxlConfig",
    "ENV_PREFIX",
    "HttpConfig",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "LoggingConfig",
    "NetworkConfig",
    "SEED_ENV_VARS",
    "StorageConfig",
    "TopicOverride",
    "TopicSettings",
    "TopicsConfig",
    "config_to_toml",
    "load_config",
]

_MIB: Final = 2**20

#: Prefix of the general environment scheme, ``TRIO_EMBARCADERO_<SECTION>__<KEY>``.
ENV_PREFIX: Final = "TRIO_EMBARCADERO_"

#: The C++ original's variable names and the keys they set. The general
#: ``TRIO_EMBARCADERO_NETWORK__<KEY>`` variable wins when both are set.
SEED_ENV_VARS: Final[Mapping[str, str]] = {
    "EMBARCADERO_USE_NONBLOCKING": "network.use_nonblocking",
    "EMBARCADERO_STAGING_POOL_BUFFER_SIZE_MB": "network.staging_pool_buffer_size_mb",
    "EMBARCADERO_STAGING_POOL_NUM_BUFFERS": "network.staging_pool_num_buffers",
    "EMBARCADERO_NUM_PUBLISH_RECEIVE_THREADS": "network.num_publish_receive_threads",
    "EMBARCADERO_NUM_CXL_ALLOCATION_WORKERS": "network.num_cxl_allocation_workers",
}

#: The accepted ``logging.level`` values (input is case-insensitive).
LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

#: The accepted ``logging.format`` values: lines for people, or one JSON object a line.
LOG_FORMATS: Final = ("text", "json")

# A batch lands in a single CXL segment together with its 128-byte batch
# header and 64 more bytes of log bookkeeping, so a batch's payload may use at
# most the segment size minus this.
_SEGMENT_BATCH_OVERHEAD: Final = 192

_E = TypeVar("_E", bound=Exception)
_T = TypeVar("_T")

# Stands for an environment value that failed to parse (already reported).
_UNPARSABLE: Final = object()


class _Invalid(ValueError):
    """A problem whose text is already the final message (no cattrs rewording)."""


def _finite(_instance: object, attribute: "attrs.Attribute[float]", value: float) -> None:
    # TOML allows nan and inf; neither makes sense for a fraction or a duration.
    if not math.isfinite(value):
        raise ValueError(f"'{attribute.name}' must be finite: {value}")


def _non_empty(_instance: object, attribute: "attrs.Attribute[str]", value: str) -> None:
    if not value:
        raise ValueError(f"'{attribute.name}' must not be empty")


def _networks(_instance: object, attribute: "attrs.Attribute[str]", value: str) -> None:
    try:
        parse_networks(value)
    except ValueError as exc:
        raise ValueError(f"'{attribute.name}' {exc}") from None


def parse_networks(value: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """Parse a comma-separated list of networks (``"127.0.0.0/8, ::1/128"``).

    Raises:
        ValueError: Naming the first entry that is not an IP network.
    """
    networks = []
    for part in value.split(","):
        text = part.strip()
        if not text:
            continue
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise ValueError(f"has an entry that is not an IP network: {text!r}") from None
    return tuple(networks)


def _file_mode(_instance: object, attribute: "attrs.Attribute[int]", value: int) -> None:
    # The broker must read and write its own files; anything beyond rwx (setuid,
    # sticky) makes no sense for a log.
    if not isinstance(value, int) or not 0 <= value <= 0o777 or value & 0o600 != 0o600:
        shown = f"{value:#o}" if isinstance(value, int) else repr(value)
        raise ValueError(
            f"'{attribute.name}' must be a file mode from 0o600 to 0o777 that lets the owner "
            f"read and write, written in octal (TOML 0o600, environment 600 or 0o600): {shown}"
        )


#: Metadata of the fields that hold file modes: read from the environment in octal.
_OCTAL: Final = {"octal": True}


def _upper(value: str) -> str:
    return value.upper()


def _lower(value: str) -> str:
    return value.lower()


def _int_in(low: int, high: int) -> list[Callable[[Any, "attrs.Attribute[int]", int], None]]:
    return [
        attrs.validators.instance_of(int),
        attrs.validators.ge(low),
        attrs.validators.le(high),
    ]


def _limit(_instance: object, attribute: "attrs.Attribute[int]", value: int) -> None:
    if value != -1 and value <= 0:
        raise ValueError(f"'{attribute.name}' must be -1 (no limit) or > 0: {value}")


#: The order levels a topic can have (Embarcadero's 0 and 5).
ORDER_LEVELS: Final = (0, 5)


def _order(_instance: object, attribute: "attrs.Attribute[int]", value: int) -> None:
    if type(value) is not int or value not in ORDER_LEVELS:
        raise ValueError(
            f"'{attribute.name}' must be 0 (each broker's own order) or 5 (one total "
            f"order across brokers): {value!r}"
        )


_positive_int = [attrs.validators.instance_of(int), attrs.validators.gt(0)]
_positive_float = [attrs.validators.instance_of(float), _finite, attrs.validators.gt(0.0)]
_non_negative_float = [attrs.validators.instance_of(float), _finite, attrs.validators.ge(0.0)]
_limit_int = [attrs.validators.instance_of(int), _limit]


# Cross-field checks. Each is (the fields it reads, the check); the check gets
# every valid field value of one class (defaults filled in) and yields
# (path relative to that class, message) pairs. They live outside the classes
# so the loader can run them even when unrelated fields of the same class are
# invalid, while ``__attrs_post_init__`` runs the same code on direct
# construction.
_Problem: TypeAlias = tuple[str, str]
_Check: TypeAlias = tuple[frozenset[str], Callable[[Mapping[str, Any]], Iterator[_Problem]]]
_CHECKS: dict[type, list[_Check]] = {}


def _check(
    cls: type, *needs: str
) -> Callable[
    [Callable[[Mapping[str, Any]], Iterator[_Problem]]],
    Callable[[Mapping[str, Any]], Iterator[_Problem]],
]:
    def register(
        fn: Callable[[Mapping[str, Any]], Iterator[_Problem]],
    ) -> Callable[[Mapping[str, Any]], Iterator[_Problem]]:
        _CHECKS.setdefault(cls, []).append((frozenset(needs), fn))
        return fn

    return register


_ORDERS: Final[Mapping[str, Callable[[Any, Any], bool]]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">=": operator.ge,
}


def _check_order(cls: type, name: str, relation: str, other: str) -> None:
    """Registers the check that field ``name`` stands in ``relation`` to field ``other``."""
    holds = _ORDERS[relation]

    @_check(cls, name, other)
    def check(v: Mapping[str, Any]) -> Iterator[_Problem]:
        if not holds(v[name], v[other]):
            yield (name, f"'{name}' must be {relation} '{other}' ({v[other]}): {v[name]}")


def _cross_field_problems(cls: type, values: Mapping[str, Any]) -> list[_Problem]:
    return [
        problem
        for needs, check in _CHECKS.get(cls, [])
        if needs <= values.keys()
        for problem in check(values)
    ]


class _Checked:
    """Base of the config classes: construction runs the class's cross-field checks."""

    __slots__ = ()
    # Set by attrs on each subclass; declared so type checkers see an attrs class.
    __attrs_attrs__: ClassVar[Any]

    def __attrs_post_init__(self) -> None:
        cls = type(self)
        problems = _cross_field_problems(
            cls, {a.name: getattr(self, a.name) for a in attrs.fields(cls)}
        )
        if problems:
            raise ValueError("; ".join(message for _, message in problems))


#: A broker table entry holds this many bytes of ``broker.host``.
_MAX_HOST_BYTES: Final = 47


def _host(_instance: object, attribute: "attrs.Attribute[str]", value: str) -> None:
    if len(value.encode("utf-8")) > _MAX_HOST_BYTES:
        raise ValueError(
            f"'{attribute.name}' must be at most {_MAX_HOST_BYTES} bytes (the region's broker "
            f"table has room for that much of the address others reach the broker at): {value!r}"
        )


@attrs.frozen(kw_only=True)
class BrokerConfig(_Checked):
    """Who this broker is, where it listens, and how it tells it is alive.

    Attributes:
        id: The broker's id, 0 to 31 (the wire protocol's limit); must also be
            below ``cxl.max_brokers``. Several brokers (different ids) can
            serve one region.
        host: The address the listeners bind to (at most 47 bytes: the
            region's broker table lists it for other processes).
        port: The base port: the broker listens on ``port + id``. 0 asks the
            OS for an ephemeral port (tests do that).
        heartbeat_interval_s: How often the broker renews its heartbeat in
            the region's broker table.
        heartbeat_timeout_s: After how long without a heartbeat readers count
            the broker as gone (where they cannot ask its lock); at least
            twice ``heartbeat_interval_s``. The broker writes it beside its
            heartbeat, so readers need no config.
    """

    id: int = attrs.field(default=0, validator=_int_in(0, MAX_BROKER_ID))
    host: str = attrs.field(
        default="127.0.0.1", validator=[attrs.validators.instance_of(str), _host]
    )
    port: int = attrs.field(default=1214, validator=_int_in(0, 65535))
    # 200 ms: cheap (one small write), and a reader learns of a hung broker
    # within a couple of seconds.
    heartbeat_interval_s: float = attrs.field(
        default=0.2, validator=[*_positive_float, attrs.validators.le(60.0)]
    )
    # 2 s = 10 beats: a broker busy with one long step (a 32 MiB copy, a
    # collection) is not taken for gone.
    heartbeat_timeout_s: float = attrs.field(
        default=2.0, validator=[*_positive_float, attrs.validators.le(3600.0)]
    )

    @property
    def data_port(self) -> int:
        """The data port, ``port + id``; 0 when ``port`` is 0 (ephemeral)."""
        # Several brokers on one host share a base port, as in the C++ original.
        return 0 if self.port == 0 else self.port + self.id


@_check(BrokerConfig, "port", "id")
def _check_data_port(v: Mapping[str, Any]) -> Iterator[_Problem]:
    if v["port"] != 0 and v["port"] + v["id"] > 65535:
        yield (
            "port",
            f"'port' + 'id' (the data port) must be <= 65535: {v['port']} + {v['id']}",
        )


@_check(BrokerConfig, "heartbeat_interval_s", "heartbeat_timeout_s")
def _check_heartbeat(v: Mapping[str, Any]) -> Iterator[_Problem]:
    if v["heartbeat_timeout_s"] < 2 * v["heartbeat_interval_s"]:
        yield (
            "heartbeat_timeout_s",
            f"'heartbeat_timeout_s' must be at least twice 'heartbeat_interval_s' "
            f"({v['heartbeat_interval_s']}), so one late beat is not taken for a dead "
            f"broker: {v['heartbeat_timeout_s']}",
        )


@attrs.frozen(kw_only=True)
class ClusterConfig(_Checked):
    """The brokers of a region as a cluster: how ``trio-embarcadero cluster``
    (and ``open_cluster``) supervise them, and the cluster service the stock
    C++ client asks the head for.

    Attributes:
        restart_backoff_initial_s: How long after a broker process died it is
            started again.
        restart_backoff_max_s: The delay doubles with every death in a row,
            up to this; a broker that served this long before it died starts
            from the initial delay again.
        max_start_failures: A broker that exits this many times in a row
            before it listens is given up: the others drain and the cluster
            stops with an error (exit 1).
        grpc_port: The port of the head's gRPC cluster service
            (``heartbeat_system.HeartBeat``, which the C++ Embarcadero client
            asks for the broker list and to create topics); 0, the default,
            turns it off. Only broker 0 (the head) serves it, on
            ``broker.host``; the others ignore the key. The C++ client looks
            for it on 12140 unless told otherwise (its
            ``EMBARCADERO_BROKER_PORT_ALT``). A head on an ephemeral data port
            (``broker.port = 0``: tests, an embedding application) serves it
            on an ephemeral port too.
    """

    restart_backoff_initial_s: float = attrs.field(default=0.1, validator=_positive_float)
    restart_backoff_max_s: float = attrs.field(default=10.0, validator=_positive_float)
    max_start_failures: int = attrs.field(default=5, validator=_positive_int)
    grpc_port: int = attrs.field(default=0, validator=_int_in(0, 65535))

    def grpc_port_for(self, broker: "BrokerConfig") -> int | None:
        """The port ``broker`` serves the gRPC cluster service on: None when
        it serves none (the service is off, or it is not broker 0), 0
        (ephemeral) when ``broker.port`` is 0."""
        if self.grpc_port == 0 or broker.id != 0:
            return None
        return 0 if broker.port == 0 else self.grpc_port


_check_order(ClusterConfig, "restart_backoff_max_s", ">=", "restart_backoff_initial_s")


@attrs.frozen(kw_only=True)
class NetworkConfig(_Checked):
    """The ingest path: connections, staging pool, allocators, flow control.

    Attributes:
        use_nonblocking: True for the staged path (receive into a staging
            buffer, copy into the log later); False to receive straight into
            the log.
        staging_pool_buffer_size_mb: Size of one staging buffer, in MiB.
        staging_pool_num_buffers: Number of staging buffers.
        num_publish_receive_threads: How many connections may be receiving a
            batch at once.
        num_cxl_allocation_workers: Number of allocator tasks.
        max_batch_bytes: Largest accepted batch payload; None means the
            staging buffer size.
        allocation_queue_size: Capacity of the channel between connections and
            allocators.
        pause_high_watermark: Fraction of staging buffers queued for the log
            (whole batches waiting for or held by an allocator) at which
            connections pause, in (0, 1].
        resume_low_watermark: Fraction queued at or below which paused
            connections resume; 0 <= x < ``pause_high_watermark``.
        backoff_initial_us: First allocator retry delay, in microseconds.
        backoff_max_us: Cap of the retry delay (>= ``backoff_initial_us``).
        backoff_max_retries: Retries before an allocation gives up.
        log_full_timeout_s: How long a batch that finds the region without a
            free segment after the backoff waits for retention to free one
            (its publisher is not read meanwhile) before the publisher gets
            error 4; 0 never waits. Nobody waits when no topic of the region
            has a retention limit: then no segment can ever come back.
        handshake_timeout_s: Time allowed for the 64-byte handshake.
        header_timeout_s: Time allowed from a batch's first header byte to
            its 128th. The header holds no receive slot; this only keeps a
            connection from sitting half-way through one.
        batch_timeout_s: Time the client may take from a batch's first header
            byte to its last payload byte. The broker's own waits in between
            (receive slot, in-flight window, staging buffer, log space) do
            not count.
        payload_stall_timeout_s: Time a payload may make no progress at all
            before the batch is given up; it bounds how long a stalled
            publisher holds a receive slot and, on the direct path, the
            commits of its topic.
        idle_timeout_s: Time a connection may sit between batches; 0 means
            forever.
        ack_connect_timeout_s: Time allowed to dial back an ack connection.
        ack_coalesce_kb: While a connection reads batches that have already
            arrived, one count on its ack stream may cover this many KiB of
            acked batches; it goes out at the latest when the connection
            waits for anything. 0 writes a count for every acked batch.
            (Same-connection acks; a dial-back ack stream, shared by several
            connections, always gets one per batch.)
        socket_receive_buffer_kb: Receive buffer (``SO_RCVBUF``) of each
            client connection, KiB; 0 leaves it to the kernel's autotuning.
            Linux caps it at ``net.core.rmem_max``: where that is lower, the
            broker keeps the autotuning (a capped buffer would be smaller)
            and says so.
        shutdown_grace_s: Time connections get to finish on shutdown.
        stats_interval_s: Period of the statistics log line.
        max_connections: Connections accepted at once.
        max_connections_per_host: Connections accepted at once from one
            client address (connections without one, such as in-memory
            streams, are not counted).
        max_buffers_per_connection: Batches one connection may have in flight
            (received whole, not yet acked at its ack level): on the staged
            path each holds a staging buffer; on either path it bounds how
            far a publisher can run ahead of the disk log at ack level 2.
            (A publish session's batches waiting only for the total order,
            and its duplicates, do not count: wire protocol, section 8.3.)
        allowed_networks: Comma-separated client networks allowed to connect
            (CIDR, IPv4 or IPv6); empty allows every address that can reach
            ``broker.host``. Others get error 6 and are closed.
        subscriber_send_timeout_s: Time one write to a subscriber (one
            batch's records) may take before the subscriber is closed, so one
            that stopped reading cannot hold its connection, or a graceful
            shutdown, forever.
    """

    use_nonblocking: bool = attrs.field(default=True, validator=attrs.validators.instance_of(bool))
    staging_pool_buffer_size_mb: int = attrs.field(default=4, validator=_positive_int)
    staging_pool_num_buffers: int = attrs.field(default=32, validator=_positive_int)
    num_publish_receive_threads: int = attrs.field(default=4, validator=_positive_int)
    num_cxl_allocation_workers: int = attrs.field(default=2, validator=_positive_int)
    max_batch_bytes: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(_positive_int)
    )
    allocation_queue_size: int = attrs.field(default=128, validator=_positive_int)
    pause_high_watermark: float = attrs.field(
        default=0.875,
        validator=[
            attrs.validators.instance_of(float),
            _finite,
            attrs.validators.gt(0.0),
            attrs.validators.le(1.0),
        ],
    )
    resume_low_watermark: float = attrs.field(default=0.5, validator=_non_negative_float)
    backoff_initial_us: int = attrs.field(default=100, validator=_positive_int)
    backoff_max_us: int = attrs.field(default=1600, validator=_positive_int)
    backoff_max_retries: int = attrs.field(
        default=10, validator=[attrs.validators.instance_of(int), attrs.validators.ge(0)]
    )
    # 30 s: the same budget a client has for one batch (batch_timeout_s),
    # many retention passes (cxl.reclaim_interval_ms, 1 s) and disk syncs, so
    # a region that retention is about to free holds publishers rather than
    # failing them, while one that will not free learns it within a client's
    # usual request timeout.
    log_full_timeout_s: float = attrs.field(default=30.0, validator=_non_negative_float)
    handshake_timeout_s: float = attrs.field(default=10.0, validator=_positive_float)
    # The header is one client write, normally one TCP segment: 2 s leaves
    # room for a few retransmissions of a lost segment (Linux's minimum RTO
    # is 200 ms, doubling each time) and ends a half-sent header long before
    # batch_timeout_s would.
    header_timeout_s: float = attrs.field(default=2.0, validator=_positive_float)
    batch_timeout_s: float = attrs.field(default=30.0, validator=_positive_float)
    payload_stall_timeout_s: float = attrs.field(default=1.0, validator=_positive_float)
    idle_timeout_s: float = attrs.field(default=0.0, validator=_non_negative_float)
    ack_connect_timeout_s: float = attrs.field(default=5.0, validator=_positive_float)
    # A count per 64 KiB batch costs the broker about as much as reading the
    # batch; 512 KiB makes it one per 8 such batches and one per batch of
    # 512 KiB or more, and delays a count by at most the time it takes to
    # read 512 KiB that has already arrived.
    ack_coalesce_kb: int = attrs.field(
        default=512, validator=[attrs.validators.instance_of(int), attrs.validators.ge(0)]
    )
    # A publisher that gets ahead of the broker for a few milliseconds (a
    # pause of the machine, a burst) leaves its bytes in this buffer. Once it
    # is full the TCP window closes, and every read of the broker reopens it
    # and sets the publisher's queued bytes moving again, in small pieces;
    # on loopback the broker's CPU does that sending too, and a broker paced
    # near its peak then never caught up (benchmarks/README.md). Autotuning
    # sizes the buffer for the rate, not for a backlog (0.1-0.9 MiB here at
    # 0.25 GB/s a connection); 4 MiB holds ~16 ms of such a publisher.
    socket_receive_buffer_kb: int = attrs.field(
        default=4096,
        validator=[
            attrs.validators.instance_of(int),
            attrs.validators.ge(0),
            attrs.validators.le(1 << 20),
        ],
    )
    shutdown_grace_s: float = attrs.field(default=5.0, validator=_non_negative_float)
    stats_interval_s: float = attrs.field(default=5.0, validator=_positive_float)
    max_connections: int = attrs.field(default=1024, validator=_positive_int)
    max_connections_per_host: int = attrs.field(default=256, validator=_positive_int)
    max_buffers_per_connection: int = attrs.field(default=8, validator=_positive_int)
    allowed_networks: str = attrs.field(
        default="", validator=[attrs.validators.instance_of(str), _networks]
    )
    subscriber_send_timeout_s: float = attrs.field(default=10.0, validator=_positive_float)

    @property
    def staging_buffer_bytes(self) -> int:
        """Size of one staging buffer in bytes."""
        return self.staging_pool_buffer_size_mb * _MIB

    @property
    def effective_max_batch_bytes(self) -> int:
        """``max_batch_bytes``, or the staging buffer size when it is None."""
        if self.max_batch_bytes is None:
            return self.staging_buffer_bytes
        return self.max_batch_bytes


@_check(NetworkConfig, "use_nonblocking", "staging_pool_buffer_size_mb", "max_batch_bytes")
def _check_batch_fits_staging(v: Mapping[str, Any]) -> Iterator[_Problem]:
    # A staged batch is received whole into one staging buffer.
    staging = v["staging_pool_buffer_size_mb"] * _MIB
    if v["use_nonblocking"] and v["max_batch_bytes"] is not None and v["max_batch_bytes"] > staging:
        yield (
            "max_batch_bytes",
            f"'max_batch_bytes' must be <= the staging buffer size ({staging}) "
            f"when use_nonblocking is true: {v['max_batch_bytes']}",
        )


_check_order(NetworkConfig, "resume_low_watermark", "<", "pause_high_watermark")
_check_order(NetworkConfig, "backoff_max_us", ">=", "backoff_initial_us")


@attrs.frozen(kw_only=True)
class CxlConfig(_Checked):
    """The emulated CXL region (a shared memory file).

    Attributes:
        path: The file backing the region.
        size_mb: Region size in MiB.
        segment_mb: The largest log segment, in MiB (<= ``size_mb``); a batch
            never spans two segments, so it bounds ``network.max_batch_bytes``.
        segment_unit_kb: The allocation unit, in KiB: a stream's first
            segment is one unit and each next one doubles, up to
            ``segment_mb``. ``segment_mb`` must be a power-of-two multiple of it.
            The default (64 KiB) lets a 1 GiB region hold 1,024 topics with
            a small batch each in a tenth of its space.
        max_topics: Topics the region has room for; a topic takes its slot
            with its first valid batch.
        max_brokers: Brokers the region has room for, 1 to 32.
        max_inflight_batches: Per (topic, broker): reservations not yet
            committed.
        prefault: Fault every page in at start-up so the first batches don't
            pay for page faults; a region in memory (tmpfs, as ``/dev/shm``)
            is faulted in writable, so no store pays for its page's first
            write either.
        mode: Permission bits of the file and its lock file (default 0o600:
            only the broker's user may read the log); 0o640 lets the file's
            group read it with ``open_log``. Existing files are set to it too.
        reclaim_interval_ms: How often retention (``[topics]``) checks every
            stream for segments it may let go.
        allow_weak_memory_ordering: Run on a machine that is not x86-64. The
            commit protocol relies on x86-64 store ordering: elsewhere a
            process reading the CXL file (``open_log``, ``topics``,
            ``inspect``) may see a batch as committed before its bytes and
            read stale data. The broker and its TCP subscribers are not
            affected (they read the log in the thread that writes it).
        streaming_copies: Copy batches into the region with streaming
            (non-temporal) stores. The region is written once and read much
            later, so an ordinary copy, which first reads every destination
            cache line it writes, moves twice the bytes through memory. On
            x86-64 with glibc, ``trio-embarcadero serve`` runs itself with
            glibc's threshold for such copies lowered to 256 KiB (the
            ``GLIBC_TUNABLES`` environment variable, read at process start;
            one it already sets is left alone). An application that embeds
            the broker sets the variable itself (see the README).
        sequencer_interval_ms: How often the broker that runs the sequencer
            looks for batches other broker processes committed to order-5
            topics (its own process's commits wake it at once).
        sequencer_hole_timeout_s: How long the sequencer waits for a batch
            that stays reserved while a committed one follows it in its
            stream, and for a publish session's missing batch_seq while a
            later one waits; then it goes past it, and that batch (that
            batch_seq) is never ordered.
        session_timeout_s: How long a publish session (``client_req = 2``)
            is kept in the region's session table after it was last active
            (a batch of it arrived, or a connection of it was open on a
            running broker); then it is forgotten, and its client id on its
            topic may begin a new session. A client that resends after a
            failure must do so within it.
        sequencer_lease_s: How long the sequencer's lease lasts in the
            region. The broker that runs the sequencer renews it with every
            step; another live broker takes the sequencer over (a new epoch)
            once it was not renewed this long, or at once when the holder's
            process is gone. At least four ``sequencer_interval_ms``, so the
            holder renews it several times a lease.
    """

    path: str = attrs.field(
        default="/dev/shm/trio-embarcadero-0",
        validator=[attrs.validators.instance_of(str), _non_empty],
    )
    size_mb: int = attrs.field(default=1024, validator=_positive_int)
    segment_mb: int = attrs.field(default=32, validator=_positive_int)
    segment_unit_kb: int = attrs.field(default=64, validator=_positive_int)
    max_topics: int = attrs.field(default=1024, validator=_positive_int)
    max_brokers: int = attrs.field(default=4, validator=_int_in(1, MAX_BROKER_ID + 1))
    max_inflight_batches: int = attrs.field(default=1024, validator=_positive_int)
    prefault: bool = attrs.field(default=True, validator=attrs.validators.instance_of(bool))
    mode: int = attrs.field(default=0o600, validator=_file_mode, metadata=_OCTAL)
    allow_weak_memory_ordering: bool = attrs.field(
        default=False, validator=attrs.validators.instance_of(bool)
    )
    reclaim_interval_ms: float = attrs.field(default=1000.0, validator=_positive_float)
    streaming_copies: bool = attrs.field(default=True, validator=attrs.validators.instance_of(bool))
    sequencer_interval_ms: float = attrs.field(default=5.0, validator=_positive_float)
    sequencer_hole_timeout_s: float = attrs.field(default=5.0, validator=_positive_float)
    sequencer_lease_s: float = attrs.field(default=1.0, validator=_positive_float)
    session_timeout_s: float = attrs.field(default=300.0, validator=_positive_float)

    @property
    def size_bytes(self) -> int:
        """Region size in bytes."""
        return self.size_mb * _MIB

    @property
    def segment_bytes(self) -> int:
        """The largest segment, in bytes."""
        return self.segment_mb * _MIB

    @property
    def unit_bytes(self) -> int:
        """The allocation unit (the smallest segment), in bytes."""
        return self.segment_unit_kb * 1024


_check_order(CxlConfig, "segment_mb", "<=", "size_mb")


@_check(CxlConfig, "sequencer_lease_s", "sequencer_interval_ms")
def _check_sequencer_lease(v: Mapping[str, Any]) -> Iterator[_Problem]:
    if v["sequencer_lease_s"] * 1000 < 4 * v["sequencer_interval_ms"]:
        yield (
            "sequencer_lease_s",
            f"'sequencer_lease_s' must be at least four 'sequencer_interval_ms' "
            f"({v['sequencer_interval_ms']} ms), so the sequencer renews its lease several "
            f"times before it expires: {v['sequencer_lease_s']}",
        )


@_check(CxlConfig, "segment_mb", "segment_unit_kb")
def _check_segment_unit(v: Mapping[str, Any]) -> Iterator[_Problem]:
    ratio, rest = divmod(v["segment_mb"] * 1024, v["segment_unit_kb"])
    if rest or ratio & (ratio - 1):
        yield (
            "segment_unit_kb",
            f"'segment_unit_kb' must divide 'segment_mb' into a power of two of units "
            f"(e.g. 64 KiB units of 32 MiB segments): {v['segment_unit_kb']} KiB units of "
            f"{v['segment_mb']} MiB",
        )


@attrs.frozen(kw_only=True)
class StorageConfig(_Checked):
    """The disk log behind ack level 2 (see :mod:`trio_embarcadero.log.disk`).

    Attributes:
        dir: Directory of the disk log; "" means none, so ack level 2 is
            refused. When set, every committed batch is appended to it.
        sync_interval_ms: How long the writer gathers commits after the first
            unsynced one before it writes and syncs them (group commit).
        sync_bytes: Bytes waiting that trigger the write and sync sooner.
        mode: Permission bits of the disk log files and their lock file
            (default 0o600), and, plus the matching x bits, of ``dir`` when the
            broker creates it. Existing files are set to it too.
        segment_mb: A stream's disk log is a run of files; a new one begins
            once the next batch would take the newest past this many MiB.
            Retention trims the disk log by whole files, so this is also how
            finely it trims.
    """

    dir: str = attrs.field(default="", validator=attrs.validators.instance_of(str))
    sync_interval_ms: float = attrs.field(default=5.0, validator=_positive_float)
    sync_bytes: int = attrs.field(default=64 * _MIB, validator=_positive_int)
    mode: int = attrs.field(default=0o600, validator=_file_mode, metadata=_OCTAL)
    segment_mb: int = attrs.field(default=256, validator=_positive_int)

    @property
    def segment_bytes(self) -> int:
        """The size at which a disk log file is followed by the next, in bytes."""
        return self.segment_mb * _MIB


@attrs.frozen(kw_only=True)
class HttpConfig(_Checked):
    """The HTTP endpoint for operators: Prometheus metrics and the admin API.

    Attributes:
        enabled: Serve it (from the broker's nursery, like the data port).
        host: The address it binds.
        port: The base port: broker ``id`` serves on ``port + id`` (9214 for
            broker 0, 9215 for broker 1, ...), as the data port does. 0 asks
            the OS for an ephemeral port, and so does a broker whose
            ``broker.port`` is 0: a broker on an ephemeral data port (tests,
            an embedding application) never takes a fixed HTTP port.
    """

    enabled: bool = attrs.field(default=True, validator=attrs.validators.instance_of(bool))
    host: str = attrs.field(
        default="127.0.0.1", validator=[attrs.validators.instance_of(str), _non_empty]
    )
    # The data port's 1214 behind a 9, clear of the data ports of 32 brokers.
    port: int = attrs.field(default=9214, validator=_int_in(0, 65535))

    def port_for(self, broker: "BrokerConfig") -> int:
        """The port ``broker`` serves HTTP on: ``port + id``; 0 (ephemeral)
        when ``port`` or ``broker.port`` is 0."""
        return 0 if self.port == 0 or broker.port == 0 else self.port + broker.id


@attrs.frozen(kw_only=True)
class LoggingConfig(_Checked):
    """Logging set-up done by the command line tool.

    Attributes:
        level: One of :data:`LOG_LEVELS`; any case is accepted, stored upper
            case.
        format: One of :data:`LOG_FORMATS`: ``text`` lines for people, or
            ``json``, one object a line (``time``, ``level``, ``logger``,
            ``message``, and the numbers of a statistics line under ``stats``)
            for log collectors.
    """

    level: str = attrs.field(
        default="INFO",
        converter=_upper,
        validator=[attrs.validators.instance_of(str), attrs.validators.in_(LOG_LEVELS)],
    )
    format: str = attrs.field(
        default="text",
        converter=_lower,
        validator=[attrs.validators.instance_of(str), attrs.validators.in_(LOG_FORMATS)],
    )


@attrs.frozen(kw_only=True)
class TopicSettings(_Checked):
    """The settings of one topic: what it keeps (retention) and its order level.

    What a topic keeps: the oldest whole segments go while what remains still
    holds the limit (Kafka's rule); -1 keeps everything.

    Attributes:
        retention_bytes: How many bytes a topic keeps in all; -1 (the
            default) means no limit, otherwise > 0.
        retention_ms: How long a topic keeps its batches, in milliseconds; -1
            (the default) means forever, otherwise > 0.
        order: The order level a topic gets when it is created: 0 (the
            default: each broker's stream has its own order) or 5 (every
            batch, on any broker, gets a place in one total order). It is
            stored with the topic in the region; a later change of the
            config does not change an existing topic's order.
    """

    retention_bytes: int = attrs.field(default=-1, validator=_limit_int)
    retention_ms: int = attrs.field(default=-1, validator=_limit_int)
    order: int = attrs.field(default=0, validator=_order)


_TOPIC_KEYS: Final = frozenset(a.name for a in attrs.fields(TopicSettings))


@attrs.frozen(kw_only=True)
class TopicOverride(_Checked):
    """The keys one ``[topics.<name>]`` table sets; None leaves the default.

    It has one optional field per :class:`TopicSettings` field, validated the
    same way.
    """

    retention_bytes: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(_limit_int)
    )
    retention_ms: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(_limit_int)
    )
    order: int | None = attrs.field(default=None, validator=attrs.validators.optional(_order))

    def over(self, defaults: TopicSettings) -> TopicSettings:
        """``defaults`` with the keys this override sets replaced."""
        changes = {k: v for k, v in attrs.asdict(self).items() if v is not None}
        return attrs.evolve(defaults, **changes) if changes else defaults


def _check_topic_name(name: str) -> None:
    """Raises ValueError unless ``name`` can have a ``[topics.<name>]`` table."""
    encode_topic(name)  # raises ValueError naming the rule
    if name in _TOPIC_KEYS:
        # [topics] would hold both the default and the table under one key.
        raise ValueError(f"topic {name!r} is named like a [topics] key: it can't have a table")


def _topic_name(_instance: object, _attribute: object, name: str) -> None:
    _check_topic_name(name)


class _ReadOnlyMapping(Mapping[str, _T]):
    """A read-only copy of a mapping; unlike ``MappingProxyType`` it pickles and copies."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, _T]) -> None:
        self._items = dict(items)

    def __getitem__(self, key: str) -> _T:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return repr(self._items)


def _read_only(value: Mapping[str, TopicOverride]) -> Mapping[str, TopicOverride]:
    # A copy, so a frozen config can't be changed through the dict it was
    # built from.
    return _ReadOnlyMapping(value)


@attrs.frozen(kw_only=True)
class TopicsConfig(_Checked):
    """Per-topic settings: defaults for every topic plus per-topic overrides.

    In TOML the defaults are the keys of ``[topics]`` and each override is a
    sub-table named after its topic, quoted when the name has a dot::

        [topics]
        retention_ms = 604800000

        [topics."orders.eu"]
        retention_bytes = 1073741824

    The defaults can also be set from the environment and the command line
    (``TRIO_EMBARCADERO_TOPICS__RETENTION_MS``, ``topics.retention_ms``);
    overrides come from the TOML file only. A topic named like a key
    (``retention_ms``) can't have an override table.

    Attributes:
        defaults: The settings of every topic without an override.
        overrides: Topic name (1-31 of ``[A-Za-z0-9._-]``) to the keys its
            table sets; read-only.
    """

    defaults: TopicSettings = attrs.field(
        factory=TopicSettings, validator=attrs.validators.instance_of(TopicSettings)
    )
    # Left out of the hash: a mapping has none, and equal configs still hash
    # equal by their defaults.
    overrides: Mapping[str, TopicOverride] = attrs.field(
        factory=dict,
        converter=_read_only,
        validator=attrs.validators.deep_mapping(
            key_validator=_topic_name,
            value_validator=attrs.validators.instance_of(TopicOverride),
        ),
        hash=False,
    )

    def settings_for(self, topic: str) -> TopicSettings:
        """The settings of ``topic``: its override's keys over the defaults."""
        override = self.overrides.get(topic)
        return self.defaults if override is None else override.over(self.defaults)


@attrs.frozen(kw_only=True)
class Config(_Checked):
    """The whole configuration, one attribute per TOML table.

    Attributes:
        broker: Identity, listening address and heartbeat.
        cluster: How a cluster of broker processes is supervised.
        network: The ingest path.
        cxl: The CXL region.
        storage: The disk log.
        http: The metrics and admin endpoint.
        logging: Log level and format.
        topics: Per-topic settings (retention), defaults and overrides.
    """

    broker: BrokerConfig = attrs.field(factory=BrokerConfig)
    cluster: ClusterConfig = attrs.field(factory=ClusterConfig)
    network: NetworkConfig = attrs.field(factory=NetworkConfig)
    cxl: CxlConfig = attrs.field(factory=CxlConfig)
    storage: StorageConfig = attrs.field(factory=StorageConfig)
    http: HttpConfig = attrs.field(factory=HttpConfig)
    logging: LoggingConfig = attrs.field(factory=LoggingConfig)
    topics: TopicsConfig = attrs.field(factory=TopicsConfig)


@_check(Config, "network", "cxl")
def _check_batch_fits_segment(v: Mapping[str, Any]) -> Iterator[_Problem]:
    network: NetworkConfig = v["network"]
    cxl: CxlConfig = v["cxl"]
    limit = cxl.segment_bytes - _SEGMENT_BATCH_OVERHEAD
    if network.effective_max_batch_bytes > limit:
        what = (
            "'max_batch_bytes'"
            if network.max_batch_bytes is not None
            else "'max_batch_bytes' (unset, so the staging buffer size)"
        )
        yield (
            "network.max_batch_bytes",
            f"{what} must be <= the CXL segment size minus {_SEGMENT_BATCH_OVERHEAD} "
            f"header bytes ({limit}): {network.effective_max_batch_bytes}",
        )


@_check(Config, "broker", "cxl")
def _check_broker_id(v: Mapping[str, Any]) -> Iterator[_Problem]:
    broker: BrokerConfig = v["broker"]
    cxl: CxlConfig = v["cxl"]
    if broker.id >= cxl.max_brokers:
        yield (
            "broker.id",
            f"'id' must be < cxl.max_brokers ({cxl.max_brokers}): {broker.id} (raise "
            "cxl.max_brokers; a region made for fewer brokers must then be recreated "
            "with --reset)",
        )


@_check(Config, "broker", "http")
def _check_http_port(v: Mapping[str, Any]) -> Iterator[_Problem]:
    broker: BrokerConfig = v["broker"]
    http: HttpConfig = v["http"]
    port = http.port_for(broker)
    if not http.enabled or http.port == 0:
        return
    if http.port + broker.id > 65535:
        yield (
            "http.port",
            f"'port' + broker 'id' (the HTTP port) must be <= 65535: {http.port} + {broker.id}",
        )
    elif port != 0 and port == broker.data_port:
        yield (
            "http.port",
            f"'port' + broker 'id' (the HTTP port, {port}) must differ from the data port "
            f"(broker.port + id): set http.port to another base port, e.g. 9214",
        )


@_check(Config, "broker", "cluster", "cxl", "http")
def _check_grpc_port(v: Mapping[str, Any]) -> Iterator[_Problem]:
    broker: BrokerConfig = v["broker"]
    cluster: ClusterConfig = v["cluster"]
    cxl: CxlConfig = v["cxl"]
    http: HttpConfig = v["http"]
    port = cluster.grpc_port
    if port == 0 or broker.port == 0:
        return  # off, or ephemeral
    # Every broker of the region uses the config's base ports: the head's
    # gRPC port must be none of their data or HTTP ports.
    for i in range(cxl.max_brokers):
        taken = [("data port (broker.port + id)", broker.port + i)]
        if http.enabled and http.port != 0:
            taken.append(("HTTP port (http.port + id)", http.port + i))
        for what, other in taken:
            if other == port:
                yield (
                    "cluster.grpc_port",
                    f"'grpc_port' ({port}) is broker {i}'s {what}: set cluster.grpc_port to "
                    "another port, e.g. 12140",
                )
                return


_SECTIONS: Final[Mapping[str, Any]] = {a.name: a.type for a in attrs.fields(Config)}
# The class whose fields are a section's own keys: those of [topics] are the
# default TopicSettings (its sub-tables are the overrides).
_SECTION_KEYS: Final[Mapping[str, Any]] = {
    section: TopicSettings if cls is TopicsConfig else cls for section, cls in _SECTIONS.items()
}
# The classes structured by _make_checked_hook; TopicsConfig has its own hook.
_CLASSES: Final = frozenset([Config, TopicOverride, *_SECTION_KEYS.values()])


# ---------------------------------------------------------------------------
# Structuring
# ---------------------------------------------------------------------------


def _type_name(value: object) -> str:
    return type(value).__name__


def _structure_exactly(type_: type[_T]) -> Callable[[object, object], _T]:
    """A structure hook that takes values of exactly ``type_`` and nothing else."""

    def structure(value: object, _: object) -> _T:
        # type() and not isinstance(): bool is an int subclass, and TOML `true`
        # must not become 1.
        if type(value) is not type_:
            raise _Invalid(f"invalid value for type, expected {type_.__name__}: {value!r}")
        return value

    return structure


_structure_int: Final = _structure_exactly(int)


def _structure_optional_int(value: object, _: object) -> int | None:
    return None if value is None else _structure_int(value, int)


def _structure_float(value: object, _: object) -> float:
    # TOML `5` for a float key is fine; `true` is not.
    if type(value) is float:
        return value
    if type(value) is int:
        try:
            return float(value)
        except OverflowError:
            pass
    raise _Invalid(f"invalid value for type, expected float: {value!r}")


def _note(exc: _E, cls: type, name: str, type_: Any) -> _E:
    # The note is what cattrs.transform_error reads to build the `$.a.b` path.
    exc.add_note(
        AttributeValidationNote(f"Structuring class {cls.__qualname__} @ {name}", name, type_)
    )
    return exc


def _default_of(a: "attrs.Attribute[Any]") -> Any:
    default: Any = a.default
    if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
        return default.factory()
    return default


def _make_checked_hook(
    converter: cattrs.Converter, cls: type
) -> Callable[[object, object], object]:
    """A structure hook for one config class that reports every problem.

    cattrs' generated hook validates each field's type, but attrs validators
    only run inside ``cls(...)``, which stops at the first failure and blames the
    whole table. This hook runs every field's validators itself, then the
    cross-field checks whose fields are all valid, and raises one
    ``ClassValidationError`` with per-field notes.
    """
    fields = attrs.fields(cls)
    names = frozenset(a.name for a in fields)

    def hook(data: object, _: object) -> object:
        if not isinstance(data, Mapping):
            raise _Invalid(f"expected a table, got {_type_name(data)}: {data!r}")
        errors: list[Exception] = []
        values: dict[str, Any] = {}
        failed: set[str] = set()
        for a in fields:
            if a.name not in data:
                continue
            try:
                value = converter.structure(data[a.name], a.type)
                if a.converter is not None:
                    value = a.converter(value)
                if a.validator is not None:
                    try:
                        a.validator(None, a, value)
                    except (TypeError, ValueError) as exc:
                        # attrs puts (message, attribute, ...) in args; keep the message.
                        raise _Invalid(str(exc.args[0]) if exc.args else str(exc)) from exc
            except Exception as exc:
                errors.append(_note(exc, cls, a.name, a.type))
                failed.add(a.name)
            else:
                values[a.name] = value
        extra = data.keys() - names
        if extra:
            errors.append(ForbiddenExtraKeysError("", cls, {str(k) for k in extra}))
        complete = {
            a.name: values[a.name] if a.name in values else _default_of(a)
            for a in fields
            if a.name not in failed
        }
        for path, message in _cross_field_problems(cls, complete):
            errors.append(_note(_Invalid(message), cls, path, None))
        if errors:
            raise ClassValidationError(f"While structuring {cls.__name__}", errors, cls)
        return cls(**values)

    return hook


_BARE_KEY: Final = re.compile(r"[A-Za-z0-9_-]+")


def _path_key(name: str) -> str:
    """A table name as it goes in a ``$.`` path: quoted, as in TOML, unless bare."""
    return name if _BARE_KEY.fullmatch(name) else json.dumps(name, ensure_ascii=False)


def _make_topics_hook(converter: cattrs.Converter) -> Callable[[object, object], TopicsConfig]:
    """The structure hook of ``[topics]``: its keys are the defaults, its tables the overrides.

    Like :func:`_make_checked_hook` it reports every problem at once: bad
    defaults at ``$.topics.<key>``, a bad topic name at ``$.topics.<name>``,
    a bad or unknown key of an override at ``$.topics.<name>.<key>`` (names
    with a dot are quoted, ``$.topics."orders.eu".retention_ms``), and other
    unknown keys of ``[topics]``.
    """

    def hook(data: object, _: object) -> TopicsConfig:
        if not isinstance(data, Mapping):
            raise _Invalid(f"expected a table, got {_type_name(data)}: {data!r}")
        errors: list[Exception] = []
        defaults = TopicSettings()
        try:
            defaults = converter.structure(
                {k: v for k, v in data.items() if k in _TOPIC_KEYS and not isinstance(v, Mapping)},
                TopicSettings,
            )
        except ClassValidationError as exc:
            # Its notes name the keys, so the paths come out as $.topics.<key>.
            errors.extend(exc.exceptions)
        overrides: dict[str, TopicOverride] = {}
        extra: set[str] = set()
        for name, table in data.items():
            if not isinstance(table, Mapping):
                if name not in _TOPIC_KEYS:
                    extra.add(str(name))
                continue
            path = _path_key(name)
            try:
                _check_topic_name(name)
            except ValueError as exc:
                errors.append(_note(_Invalid(str(exc)), TopicsConfig, path, None))
            nested = sorted(str(k) for k, v in table.items() if isinstance(v, Mapping))
            if nested:
                # [topics.orders.eu] is table "eu" inside table "orders".
                quoted = json.dumps(f"{name}.{nested[0]}", ensure_ascii=False)
                message = (
                    f"a topic's table holds no tables ({', '.join(nested)}): "
                    f"quote a topic name that has a dot, [topics.{quoted}]"
                )
                errors.append(_note(_Invalid(message), TopicsConfig, path, None))
                table = {k: v for k, v in table.items() if k not in nested}
            try:
                overrides[name] = converter.structure(table, TopicOverride)
            except Exception as exc:
                errors.append(_note(exc, TopicsConfig, path, TopicOverride))
        if extra:
            errors.append(ForbiddenExtraKeysError("", TopicsConfig, extra))
        if errors:
            raise ClassValidationError("While structuring TopicsConfig", errors, TopicsConfig)
        return TopicsConfig(defaults=defaults, overrides=overrides)

    return hook


def _unstructure_topics(converter: cattrs.Converter) -> Callable[[TopicsConfig], dict[str, Any]]:
    # The inverse of the hook above: the defaults' keys, then a table per override.
    def unstructure(topics: TopicsConfig) -> dict[str, Any]:
        table: dict[str, Any] = converter.unstructure(topics.defaults)
        for name, override in topics.overrides.items():
            table[name] = {k: v for k, v in attrs.asdict(override).items() if v is not None}
        return table

    return unstructure


def _make_converter() -> cattrs.Converter:
    converter = cattrs.preconf.tomllib.make_converter(forbid_extra_keys=True)
    converter.register_structure_hook(int, _structure_int)
    converter.register_structure_hook(float, _structure_float)
    converter.register_structure_hook(bool, _structure_exactly(bool))
    converter.register_structure_hook(str, _structure_exactly(str))
    # Spelled out so max_batch_bytes doesn't depend on how the preconf
    # converter's union strategy treats bool; None only comes from overrides.
    converter.register_structure_hook_func(lambda t: t == int | None, _structure_optional_int)
    converter.register_structure_hook_factory(
        lambda t: t in _CLASSES, lambda t: _make_checked_hook(converter, t)
    )
    converter.register_structure_hook(TopicsConfig, _make_topics_hook(converter))
    converter.register_unstructure_hook(TopicsConfig, _unstructure_topics(converter))
    return converter


_converter: Final = _make_converter()


def _format_exception(exc: BaseException, type_: type | None) -> str:
    if isinstance(exc, _Invalid):
        return str(exc)
    return cattrs.v.format_exception(exc, type_)


# ---------------------------------------------------------------------------
# Environment and overrides
# ---------------------------------------------------------------------------

_INT_RE: Final = re.compile(r"[+-]?[0-9]+")
_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})


def _field_types() -> dict[str, Any]:
    return {
        f"{section}.{a.name}": a.type
        for section, cls in _SECTION_KEYS.items()
        for a in attrs.fields(cls)
    }


_FIELD_TYPES: Final = _field_types()
_OCTAL_KEYS: Final = frozenset(
    f"{section}.{a.name}"
    for section, cls in _SECTION_KEYS.items()
    for a in attrs.fields(cls)
    if a.metadata.get("octal")
)
_OCTAL_RE: Final = re.compile(r"(?:0o)?([0-7]+)", re.IGNORECASE)
_GENERAL_ENV_VARS: Final = {
    ENV_PREFIX + key.upper().replace(".", "__"): key for key in _FIELD_TYPES
}


def _parse_env_value(raw: str, type_: Any, *, octal: bool = False) -> object:
    """Converts an environment string to ``type_``; raises ``_Invalid``."""
    if octal:
        # A mode is octal whether written 640, 0640 or 0o640.
        match = _OCTAL_RE.fullmatch(raw)
        if match is None:
            raise _Invalid(f"invalid value for type, expected an octal file mode: {raw!r}")
        return int(match.group(1), 8)
    if type_ is bool:
        lowered = raw.lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise _Invalid(f"invalid value for type, expected bool: {raw!r}")
    if type_ is int or type_ == int | None:
        # int() would also take "1_000", " 7 " and non-ASCII digits.
        if not _INT_RE.fullmatch(raw):
            raise _Invalid(f"invalid value for type, expected int: {raw!r}")
        return int(raw)
    if type_ is float:
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise _Invalid(f"invalid value for type, expected float: {raw!r}")
        return value
    return raw


def _env_layer(env: Mapping[str, str], problems: list[str]) -> list[tuple[str, object, str]]:
    """The environment's settings as (dotted key, value, variable), in apply order.

    Seed names come first so the general names, applied after them, win.
    Variables that fail to parse are reported in ``problems`` and returned
    with the value ``_UNPARSABLE`` so the key is still known to be set.
    """
    layer: list[tuple[str, str, str]] = []
    for var, key in SEED_ENV_VARS.items():
        if var in env:
            layer.append((key, env[var], var))
    for var in sorted(env):
        if not var.startswith(ENV_PREFIX):
            continue
        general_key = _GENERAL_ENV_VARS.get(var)
        if general_key is None:
            problems.append(
                f"unknown environment variable (expected "
                f"{ENV_PREFIX}<SECTION>__<KEY> naming a config key) @ $env.{var}"
            )
            continue
        layer.append((general_key, env[var], var))
    parsed: list[tuple[str, object, str]] = []
    for key, raw, var in layer:
        try:
            value = _parse_env_value(raw, _FIELD_TYPES[key], octal=key in _OCTAL_KEYS)
            parsed.append((key, value, var))
        except _Invalid as exc:
            problems.append(f"{exc} @ $.{key} (from {var})")
            parsed.append((key, _UNPARSABLE, var))
    return parsed


def _apply(
    data: dict[str, Any],
    key: str,
    value: object,
    source: str,
    sources: dict[str, str],
) -> None:
    section, name = key.split(".")
    table = data.setdefault(section, {})
    # A section that isn't a table is reported by the structuring step.
    if not isinstance(table, dict):
        return
    if value is _UNPARSABLE:
        # Already reported; drop a lower layer's value so it isn't judged too.
        table.pop(name, None)
        sources.pop(f"$.{key}", None)
        return
    table[name] = value
    sources[f"$.{key}"] = source


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


def _read_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            text = f.read().decode("utf-8")
    except OSError as exc:
        raise ConfigError([f"cannot read config file {name!r}: {exc.strerror or exc} @ $"]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([f"config file {name!r} is not UTF-8: {exc} @ $"]) from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"invalid TOML in config file {name!r}: {exc} @ $"]) from exc


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> Config:
    """Builds the configuration from defaults, a TOML file, the environment and overrides.

    Later layers win: defaults < file < environment < overrides.

    Environment variables:
        * ``TRIO_EMBARCADERO_<SECTION>__<KEY>`` for every key, upper case with
          a double underscore between section and key, e.g.
          ``TRIO_EMBARCADERO_CXL__SIZE_MB=64``. Any other variable starting
          with ``TRIO_EMBARCADERO_`` is an error.
        * The C++ original's names (:data:`SEED_ENV_VARS`), e.g.
          ``EMBARCADERO_STAGING_POOL_NUM_BUFFERS``. When a seed name and the
          general name of the same key are both set, the general name wins.

        Values are converted by the key's type: int is an optional sign and
        decimal digits; float is anything ``float()`` takes except nan and
        infinities; bool is 1/true/yes/on or 0/false/no/off in any case; str
        is taken as is; a file mode (``cxl.mode``, ``storage.mode``) is octal,
        written 640, 0640 or 0o640. ``network.max_batch_bytes`` can't be
        reset to None from the environment.

        The ``[topics]`` defaults are keys like any other
        (``TRIO_EMBARCADERO_TOPICS__RETENTION_MS``, override
        ``"topics.retention_ms"``); per-topic overrides (``[topics.<name>]``
        tables) come from the TOML file only.

    Args:
        path: The TOML file, or None for no file.
        env: The environment; None means ``os.environ``.
        overrides: Dotted keys (``"broker.port"``) to typed values, applied
            last, normally the command line flags that were given. None is a
            value here (only valid for ``network.max_batch_bytes``), so leave
            out flags that weren't given.

    Returns:
        The validated configuration.

    Raises:
        ConfigError: With every problem found: an unreadable file or a TOML
            syntax error, unknown keys or variables, values of the wrong type
            or out of range, and inconsistent combinations.
    """
    problems: list[str] = []
    file_problem: ConfigError | None = None
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = _read_file(path)
        except ConfigError as exc:
            file_problem = exc
            problems.extend(exc.problems)

    sources: dict[str, str] = {}
    for key, value, var in _env_layer(os.environ if env is None else env, problems):
        _apply(data, key, value, f"from {var}", sources)
    for key, value in (overrides or {}).items():
        if key not in _FIELD_TYPES:
            problems.append(f"unknown key @ $.{key} (from override)")
            continue
        _apply(data, key, value, "from override", sources)

    if file_problem is not None:
        # Without the file's values, judging the rest would blame keys the
        # file may well set right.
        raise ConfigError(problems) from file_problem.__cause__

    try:
        config = _converter.structure(data, Config)
    except Exception as exc:
        problems.extend(
            _with_source(line, sources)
            for line in cattrs.transform_error(exc, format_exception=_format_exception)
        )
        raise ConfigError(problems) from exc
    if problems:
        raise ConfigError(problems)
    return config


def _with_source(line: str, sources: Mapping[str, str]) -> str:
    # Tell the user which variable or flag a bad value came from.
    _, _, path = line.rpartition(" @ ")
    source = sources.get(path)
    return f"{line} ({source})" if source else line


# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------


def config_to_toml(config: Config) -> str:
    """Renders a configuration as TOML, every key, sections in order.

    The configuration is unstructured by the module's converter and each
    section dumped by ``tomli_w``, ``[topics]`` followed by a table per
    override with the keys it sets. ``load_config`` on the text gives back an
    equal configuration. An unset ``network.max_batch_bytes`` is left out
    (TOML has no null); a comment at the end of the ``[network]`` table says
    what unset means.

    Args:
        config: The configuration to render.

    Returns:
        The TOML text.
    """
    data: dict[str, dict[str, Any]] = _converter.unstructure(config)
    notes: dict[str, str] = {}
    if data["network"]["max_batch_bytes"] is None:
        # The only key that can be None.
        del data["network"]["max_batch_bytes"]
        notes["network"] = (
            f"# max_batch_bytes is unset: the staging buffer size "
            f"({config.network.staging_buffer_bytes} bytes)\n"
        )
    # One dump per table so the comment lands inside the table it is about.
    return "\n".join(
        _octal_modes(section, tomli_w.dumps({section: table})) + notes.get(section, "")
        for section, table in data.items()
    )


def _octal_modes(section: str, text: str) -> str:
    """Write the file modes of a dumped table as octal literals (``0o600``, not ``384``)."""
    for key in _OCTAL_KEYS:
        table, _, name = key.partition(".")
        if table == section:
            text = re.sub(
                rf"^({name} = )(\d+)$",
                lambda m: f"{m.group(1)}0o{int(m.group(2)):o}",
                text,
                flags=re.MULTILINE,
            )
    return text
