"""The ``trio-embarcadero`` command line.

``main(argv) -> int`` returns the exit status: 0 after a clean run (a broker
that drained after SIGINT/SIGTERM), 1 on a runtime failure (also a broker
that drained and stopped because its disk log failed), 2 on a usage or
configuration error. Only this module configures logging and signals; the
library never does.

The tools (``bench``) are imported only when their command runs: the broker
that ``serve`` starts, and ``import trio_embarcadero.cli``, never load them.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import math
import os
import signal
import stat
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any, Protocol, TextIO
from urllib.parse import quote

import trio

from . import __version__
from .broker import Broker, serve
from .broker.cluster import (
    Cluster,
    ClusterBroker,
    check_cluster_size,
    describe_exit,
    report_to_supervisor,
    run_cluster,
)
from .config import LOG_FORMATS, ORDER_LEVELS, Config, config_to_toml, load_config
from .errors import (
    AdminApiError,
    ClusterError,
    ConfigError,
    EmbarcaderoError,
    StartupError,
    StorageError,
)

logger = logging.getLogger(__name__)


class _HelpFormatter(argparse.HelpFormatter):
    """Shows an option's default after its help, when it has one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help
        if (
            text is None
            or "%(default)" in text
            or not action.option_strings
            or any(action.default is nothing for nothing in (None, False, argparse.SUPPRESS))
        ):
            return text
        return f"{text} (default: %(default)s)"


def _positive_int(text: str) -> int:
    """An argparse type: an integer > 0 (counts and sizes)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {value}")
    return value


def _positive_seconds(text: str) -> float:
    """An argparse type: a finite number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text}")
    return value


def _start_offset(text: str) -> int | str:
    """An argparse type for ``subscribe --from``: an offset, "end", or -N (the last N)."""
    if text == "end":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be an offset >= 0, 'end' or -N (the last N messages), not {text!r}"
        ) from None


def _broker_address(text: str) -> tuple[str, int]:
    """An argparse type: ``HOST:PORT`` (``[ADDR]:PORT`` for IPv6)."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise argparse.ArgumentTypeError(
            f"must be HOST:PORT with a port of 1..65535 (e.g. 127.0.0.1:1214), not {text!r}"
        )
    return host, int(port)


def _add_broker_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--broker",
        dest="brokers",
        action="append",
        type=_broker_address,
        metavar="HOST:PORT",
        help=f"a broker's data address (instead of --host/--port); repeat it to {what}",
    )


def _add_config_options(parser: argparse.ArgumentParser, *, broker_id: bool = True) -> None:
    parser.add_argument("--config", metavar="PATH", help="TOML config file (default: built-ins)")
    if broker_id:
        parser.add_argument("--broker-id", type=int, metavar="N", help="overrides broker.id")
    parser.add_argument("--host", metavar="ADDR", help="overrides broker.host")
    parser.add_argument("--port", type=int, metavar="N", help="overrides broker.port (base port)")
    parser.add_argument("--log-level", metavar="LEVEL", help="overrides logging.level")
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        help="overrides logging.format: text lines, or one JSON object a line",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="trio-embarcadero",
        description="Embarcadero broker ingest path on Trio.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    command = partial(commands.add_parser, formatter_class=_HelpFormatter)
    serve_cmd = command("serve", help="run a broker until SIGINT/SIGTERM")
    _add_config_options(serve_cmd)
    serve_cmd.add_argument(
        "--reset",
        action="store_true",
        help="start empty: discard the CXL file (every broker's streams in it) and this "
        "broker's disk log files in storage.dir; refused while any broker serves the file",
    )
    serve_cmd.add_argument(
        "--http-port",
        type=int,
        metavar="N",
        help="overrides http.port (base port: the HTTP endpoint listens on N + broker id)",
    )
    serve_cmd.add_argument(
        "--supervisor-fd",
        type=int,
        metavar="FD",
        help="for a supervisor (the cluster command): write 'listening HOST PORT HTTP_PORT' on the "
        "inherited socket FD once listening, and drain when its other end closes",
    )
    cluster_cmd = command(
        "cluster",
        help="run and supervise N brokers (ids 0..N-1) on one CXL region",
        description="Run broker ids 0..N-1 of the config as child processes on the same CXL "
        "file, broker i on port + i. Prints a line per broker when it listens, restarts a "
        "broker that dies (with a backoff, see [cluster]), and on SIGINT/SIGTERM drains them "
        "all and exits 0 (a second signal stops them at once). A broker that keeps failing "
        "at start-up is given up: the others drain and the exit status is 1.",
    )
    _add_config_options(cluster_cmd, broker_id=False)
    cluster_cmd.add_argument(
        "--brokers", type=_positive_int, required=True, metavar="N", help="how many brokers"
    )
    cluster_cmd.add_argument(
        "--reset",
        action="store_true",
        help="start empty: broker 0 recreates the CXL file before the others start "
        "(never on a restart)",
    )
    check = command("check-config", help="validate a config and print it in full")
    _add_config_options(check)
    _add_client_commands(command)
    # The bench parses its own options (in the tools, loaded only when it
    # runs): what follows "bench" is handed to it untouched.
    commands.add_parser(
        "bench",
        help="measure throughput and ack latency against minimal receivers",
        add_help=False,
    )
    return parser


def _load(args: argparse.Namespace) -> Config:
    overrides: dict[str, object] = {}
    for flag, key in (
        ("broker_id", "broker.id"),
        ("host", "broker.host"),
        ("port", "broker.port"),
        ("http_port", "http.port"),
        ("log_level", "logging.level"),
        ("log_format", "logging.format"),
    ):
        value = getattr(args, flag, None)
        if value is not None:
            overrides[key] = value
    return load_config(args.config, overrides=overrides)


class JsonLogFormatter(logging.Formatter):
    """One JSON object a line (``--log-format json``): ``time`` (UTC, ISO
    8601), ``level``, ``logger``, ``message``, and for a statistics line its
    numbers under ``stats``; ``exception`` with a traceback when there is one.

    Args:
        source: Whose lines they are (``"broker 2"``, ``"cluster"``) where
            several processes share stderr; "" for none.
    """

    def __init__(self, source: str = "") -> None:
        super().__init__()
        self.source = source

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.source:
            data["source"] = self.source
        stats = getattr(record, "stats", None)
        if stats is not None:
            data["stats"] = stats
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


def _set_up_logging(config: Config, who: str = "") -> None:
    """Log to stderr at ``logging.level`` in ``logging.format``; ``who`` says
    whose lines they are where several processes share stderr (a cluster)."""
    handler = logging.StreamHandler()
    if config.logging.format == "json":
        handler.setFormatter(JsonLogFormatter(who.strip()))
    else:
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s {who}%(levelname)s %(name)s: %(message)s")
        )
    logging.basicConfig(level=config.logging.level, handlers=[handler])


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit status."""
    parser = build_parser()
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else list(argv))
    if args.command == "bench":  # its own options; the broker configs are its own too
        from .tools.bench import main as bench_main

        return bench_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        config = _load(args)
    except ConfigError as exc:
        print(f"trio-embarcadero: {exc}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        print(config_to_toml(config), end="")
        return 0
    if args.command in _CLIENT_COMMANDS:
        return _run_client_command(args, config)
    if args.command == "cluster":
        return _run_cluster(args, config)
    if args.supervisor_fd is not None and not _is_socket(args.supervisor_fd):
        print(
            f"trio-embarcadero: --supervisor-fd {args.supervisor_fd} is not an open socket "
            "(it is for a supervisor such as the cluster command, which passes one)",
            file=sys.stderr,
        )
        return 2
    if argv is None and config.cxl.streaming_copies:
        # Only as the process's own program: a caller's process is not replaced.
        _run_with_streaming_copies()
    # Under a supervisor the brokers share its stderr: each line says whose it is.
    who = f"broker {config.broker.id} " if args.supervisor_fd is not None else ""
    _set_up_logging(config, who)
    failures: list[BaseException] = []
    try:
        trio.run(
            partial(
                _serve_until_signalled,
                config,
                reset=args.reset,
                supervisor_fd=args.supervisor_fd,
            )
        )
    except* (EmbarcaderoError, OSError) as group:
        failures.extend(_leaves(group))
    for failure in failures:
        if isinstance(failure, StorageError):
            pass  # logged by the broker when it happened
        elif isinstance(failure, StartupError):  # says what to do already
            logger.error("%s", failure)
        else:
            logger.error("cannot serve: %s", failure)
    return 1 if failures else 0


#: glibc copies at least this many bytes with non-temporal stores, when set.
_STREAMING_TUNABLE = "glibc.cpu.x86_non_temporal_threshold"
_STREAMING_THRESHOLD = 256 * 1024


def _run_with_streaming_copies() -> None:
    """Run this command again, in this process, with glibc's threshold for
    non-temporal copies lowered (``cxl.streaming_copies``), unless it is set
    already or this is not x86-64 with glibc.

    glibc reads ``GLIBC_TUNABLES`` once, at process start, so the only way
    to set it for ourselves is to start again; ``exec`` keeps the pid, the
    arguments and every open descriptor (none is open yet).
    """
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if _STREAMING_TUNABLE in tunables or not _is_x86_64_glibc():
        return
    setting = f"{_STREAMING_TUNABLE}={_STREAMING_THRESHOLD:#x}"
    env = dict(os.environ, GLIBC_TUNABLES=f"{tunables}:{setting}" if tunables else setting)
    sys.stdout.flush()
    sys.stderr.flush()
    # orig_argv: the interpreter's own options too (-X, -W ...), and the
    # program as it was named (a console script or -m).
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def _is_x86_64_glibc() -> bool:
    import platform

    return platform.machine() in ("x86_64", "AMD64") and platform.libc_ver()[0] == "glibc"


# -- client commands: publish, subscribe, topics, inspect ------------------------------

_CLIENT_COMMANDS = ("publish", "subscribe", "topics", "inspect", "create-topic", "delete-topic")

_AddCommand = Callable[..., argparse.ArgumentParser]


class _CommandFailed(Exception):
    """A client command cannot go on; its message says why (exit status 1)."""


def _add_client_commands(command: _AddCommand) -> None:
    from .client import DEFAULT_BATCH_BYTES

    publish = command(
        "publish",
        help="publish stdin's lines (one message each) or --count generated messages",
        description="Publish to a broker (the config's broker.host and data port, or "
        "--host/--port) and report how many messages were acked, and how fast.",
    )
    _add_config_options(publish)
    _add_broker_option(
        publish,
        "publish through several brokers (batches are spread, and sent again to "
        "another when one fails)",
    )
    publish.add_argument("--topic", required=True, help="topic to publish to")
    publish.add_argument("--ack", type=int, choices=(0, 1, 2), default=1, help="ack level")
    publish.add_argument(
        "--count", type=_positive_int, metavar="N", help="send N generated messages, not stdin"
    )
    publish.add_argument(
        "--size", type=_positive_int, default=1024, metavar="B", help="bytes per generated message"
    )
    publish.add_argument(
        "--batch-bytes",
        type=_positive_int,
        default=DEFAULT_BATCH_BYTES,
        metavar="B",
        help="batch size",
    )
    publish.add_argument(
        "--dial-back", action="store_true", help="receive acks on a connection the broker opens"
    )
    publish.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        help="with --count, a line on stderr updated every second: count, acks, rate "
        "(default: when stderr is a terminal)",
    )
    subscribe = command(
        "subscribe",
        help="print a topic's messages, one per line",
        description="Print a topic's messages (payload bytes, one per line) until caught up "
        "(no new message for --idle seconds), or forever with --follow. A summary goes to "
        "stderr, or alone to stdout with --summary. Without --follow, a topic that does not "
        "exist is an error; that check and --from end / -N read the broker's CXL file "
        "(cxl.path of --config, or --cxl-path), so run them on the broker's host.",
    )
    _add_config_options(subscribe)
    _add_broker_option(
        subscribe,
        "give --ordered several brokers to go on from (one broker's stream is on that broker only)",
    )
    subscribe.add_argument("--cxl-path", metavar="PATH", help="the CXL file (overrides cxl.path)")
    subscribe.add_argument("--topic", required=True, help="topic to read")
    subscribe.add_argument(
        "--from",
        dest="start",
        type=_start_offset,
        default=0,
        metavar="OFFSET",
        help="first logical offset; 'end': only messages committed from now on; "
        "-N: the last N committed messages, then what follows",
    )
    subscribe.add_argument("--follow", action="store_true", help="wait for new messages")
    subscribe.add_argument("--count", type=_positive_int, metavar="N", help="stop after N messages")
    subscribe.add_argument(
        "--idle",
        type=_positive_seconds,
        default=0.5,
        metavar="SECONDS",
        help="caught up after this long without a message",
    )
    subscribe.add_argument(
        "--offsets", action="store_true", help="prefix lines with offset, client id, client order"
    )
    subscribe.add_argument(
        "--summary", action="store_true", help="print only the message count and bytes"
    )
    subscribe.add_argument(
        "--ordered",
        action="store_true",
        help="read an order-5 topic's total order (every broker's messages, from this one); "
        "--from and the offsets are then total orders",
    )
    for name, text in (
        ("topics", "list the topics of a CXL file (or of a broker, --url) with their totals"),
        ("inspect", "the CXL file's geometry, topics, and with --topic its batches"),
    ):
        cmd = command(name, help=text, description=text)
        _add_topic_source_options(cmd)
        if name == "inspect":
            cmd.add_argument("--topic", help="also list this topic's batches (not with --url)")
    create = command(
        "create-topic",
        help="create a topic ahead of its first batch, with retention of its own",
        description="Create a topic in the CXL file (cxl.path of --config, or --cxl-path), "
        "or through a broker's admin API (--url), with its own retention; it is kept beside "
        "the region (<cxl.path>.topics.json) and wins over the config file's. Refused (exit 1) "
        "when the topic exists or the topic table is full.",
    )
    create.add_argument("name", help="the topic")
    create.add_argument(
        "--retention-bytes", type=_retention, metavar="N", help="bytes it keeps (-1: no limit)"
    )
    create.add_argument(
        "--retention-ms", type=_retention, metavar="MS", help="how long it keeps them (-1: forever)"
    )
    create.add_argument(
        "--order",
        type=int,
        choices=ORDER_LEVELS,
        help="its order level: 0 (each broker's stream in its own order) or 5 (one total "
        "order across brokers) (default: the config's topics.order for it)",
    )
    _add_topic_source_options(create)
    delete = command(
        "delete-topic",
        help="delete a topic: its segments, its table slot and its disk log files",
        description="Delete a topic from the CXL file (cxl.path of --config, or --cxl-path), "
        "or through a broker's admin API (--url), also while brokers serve it: every broker's "
        "stream of it is freed, and the name can be published again from offset 0. Its disk "
        "log files in storage.dir (if the config sets one) are renamed to "
        "<topic>@<broker>.log.deleted-<ns>. Refused (exit 1, nothing changed) while a running "
        "broker has publishers attached to the topic; its subscribers are ended with error 6.",
    )
    delete.add_argument("name", help="the topic")
    _add_topic_source_options(delete)


def _add_topic_source_options(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--config", metavar="PATH", help="TOML config file (for cxl.path)")
    cmd.add_argument("--cxl-path", metavar="PATH", help="the CXL file (overrides cxl.path)")
    cmd.add_argument(
        "--url",
        type=_http_url,
        metavar="URL",
        help="a broker's HTTP endpoint (http://host:9214) instead of the local CXL file",
    )


def _http_url(text: str) -> str:
    """An argparse type: an ``http://host[:port]`` URL."""
    from urllib.parse import urlsplit

    parts = urlsplit(text)
    if parts.scheme != "http" or not parts.hostname or parts.path not in ("", "/"):
        raise argparse.ArgumentTypeError(
            f"must be a broker's HTTP endpoint, http://host:port (e.g. http://127.0.0.1:9214), "
            f"not {text!r}"
        )
    return text.rstrip("/")


def _retention(text: str) -> int:
    """An argparse type: a retention limit, -1 (none) or > 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value != -1 and value <= 0:
        raise argparse.ArgumentTypeError(f"must be -1 (no limit) or > 0, not {value}")
    return value


def _run_client_command(args: argparse.Namespace, config: Config) -> int:
    _set_up_logging(config)
    if args.command in _TOPIC_COMMANDS:
        try:
            return _TOPIC_COMMANDS[args.command](args, config)
        except (_CommandFailed, EmbarcaderoError, OSError) as exc:
            print(f"trio-embarcadero {args.command}: {exc}", file=sys.stderr)
            return 1
    brokers: list[tuple[str, int]] = args.brokers or []
    if not brokers and config.broker.data_port == 0:
        print(
            "trio-embarcadero: give the broker's port (--port or broker.port) or --broker",
            file=sys.stderr,
        )
        return 2
    if len(brokers) > 1 and args.command == "subscribe" and not args.ordered:
        print(
            "trio-embarcadero subscribe: several --broker need --ordered (one broker's "
            "stream is read from that broker only)",
            file=sys.stderr,
        )
        return 2
    brokers = brokers or [(config.broker.host, config.broker.data_port)]
    try:
        if args.command == "publish":
            return trio.run(_publish, args, brokers)
        start, note = _subscription_start(args, config)
        return trio.run(_subscribe, args, brokers, start, note)
    except (_CommandFailed, EmbarcaderoError, ValueError) as exc:
        print(f"trio-embarcadero {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


async def _publish(args: argparse.Namespace, brokers: list[tuple[str, int]]) -> int:
    import os

    from .client import open_publisher

    start = trio.current_time()
    show_progress = args.count is not None and (
        args.progress if args.progress is not None else sys.stderr.isatty()
    )
    async with open_publisher(
        topic=args.topic,
        brokers=brokers,
        ack=args.ack,
        batch_bytes=args.batch_bytes,
        dial_back=args.dial_back,
    ) as pub:
        if args.count is not None:
            progress = ProgressLine(pub, args.count, args.size, args.ack, sys.stderr, start)
            await pub.publish_many(_generated(args.count, args.size, progress, show_progress))
            progress.close()
        else:
            # Whatever a pipe or terminal has, without waiting for a full 64 KiB.
            read = partial(os.read, sys.stdin.fileno(), 1 << 16)
            rest = b""
            while chunk := await trio.to_thread.run_sync(read, abandon_on_cancel=True):
                lines = (rest + chunk).split(b"\n")
                rest = lines.pop()
                await pub.publish_many(lines)
            if rest:
                await pub.publish(rest)
    elapsed = max(trio.current_time() - start, 1e-9)
    confirmed = pub.acked if args.ack else pub.sent
    print(
        f"published {pub.published} messages to {args.topic!r}, "
        f"{'acked' if args.ack else 'sent'} {confirmed}, in {elapsed:.3f} s "
        f"({confirmed / elapsed:,.0f} msg/s)"
    )
    return 0


def _generated(count: int, size: int, progress: ProgressLine, show: bool) -> Iterator[bytes]:
    """``count`` messages of ``size`` bytes, each starting with its number;
    ticks the progress line as they are taken."""
    for i in range(count):
        if show and not i % 1024:
            progress.tick(trio.current_time())
        yield f"{i:012d} ".encode().ljust(size, b".")[:size]


class _Counts(Protocol):
    """What the progress line reads from a publisher."""

    @property
    def published(self) -> int: ...

    @property
    def sent(self) -> int: ...

    @property
    def acked(self) -> int: ...


class ProgressLine:
    """One line on a terminal, rewritten at most every ``interval`` seconds
    while a long ``publish --count`` runs: how many of ``total`` messages are
    published and confirmed, and the rate since the last update.

    Args:
        pub: The publisher.
        total: Messages to publish.
        size: Bytes each.
        ack: The ack level (0: "sent" counts instead of "acked").
        out: Where the line goes (stderr).
        start: When publishing began.
        interval: Seconds between updates.
    """

    def __init__(
        self,
        pub: _Counts,
        total: int,
        size: int,
        ack: int,
        out: TextIO,
        start: float,
        interval: float = 1.0,
    ) -> None:
        self._pub = pub
        self._total = total
        self._size = size
        self._ack = ack
        self._out = out
        self._interval = interval
        self._then = start
        self._before = 0
        self._written = False

    def tick(self, now: float) -> None:
        """Rewrite the line if ``interval`` has passed since the last time."""
        if now - self._then < self._interval:
            return
        done = self._pub.published
        rate = (done - self._before) / (now - self._then)
        confirmed = self._pub.acked if self._ack else self._pub.sent
        self._out.write(
            f"\r{done:,} of {self._total:,} messages published "
            f"({100 * done / self._total:.0f}%), {confirmed:,} "
            f"{'acked' if self._ack else 'sent'}; {rate:,.0f} msg/s, "
            f"{rate * self._size / 1e6:.1f} MB/s "
        )
        self._out.flush()
        self._written = True
        self._before, self._then = done, now

    def close(self) -> None:
        """End the line, if one was written (the summary goes below it)."""
        if self._written:
            self._out.write("\n")
            self._out.flush()


def _subscription_start(args: argparse.Namespace, config: Config) -> tuple[int, str]:
    """Check that the topic exists and resolve ``--from`` against its committed count.

    The subscribe protocol cannot tell either: the broker holds a subscription
    to a missing topic, or from beyond the end, until messages arrive. The
    broker's CXL file can, exactly: the topic table lists every topic and each
    stream's committed count (this broker's stream is ``broker.id``'s). So
    both are read from the file the config names, before subscribing.

    Returns:
        The logical offset to subscribe from, and a note for a subscription
        that receives nothing ("" when the topic was checked).

    Raises:
        _CommandFailed: The topic does not exist (and ``--follow`` is not
            given), or ``--from end`` / ``-N`` but the file cannot be read.
    """
    from .log import open_log

    wanted: int | str = args.start
    back: int | None = None  # how far before the committed end to start
    if isinstance(wanted, str):  # "end"
        back = 0
    elif wanted < 0:
        back = -wanted
    elif args.follow:
        return wanted, ""  # nothing to check: a missing topic is waited for
    path = args.cxl_path or config.cxl.path
    try:
        with open_log(path) as log:
            topic = next((t for t in log.topics() if t.name == args.topic), None)
    except (EmbarcaderoError, OSError) as exc:
        if back is not None:
            raise _CommandFailed(
                f"--from {wanted} needs the broker's CXL file to find the end of "
                f"{args.topic!r}: {exc} (run it on the broker's host with its --config, "
                "or give --cxl-path)"
            ) from None
        # A broker on another host: subscribe without the check.
        return int(wanted), f"could not check that {args.topic!r} exists: {exc}"
    if topic is None and not args.follow:
        raise _CommandFailed(
            f"topic {args.topic!r} does not exist in {path} (the topics command lists "
            "them; --follow waits for it)"
        )
    if topic is not None and (topic.order == 5) != args.ordered:
        raise _CommandFailed(
            f"topic {args.topic!r} has order 5: read its total order with --ordered"
            if topic.order == 5
            else f"topic {args.topic!r} has order 0 (each broker's own order): drop --ordered"
        )
    if back is None:
        return int(wanted), ""
    if args.ordered:
        with open_log(path) as log:
            return max(0, log.ordered_end(args.topic) - back), ""
    streams = () if topic is None else topic.streams
    committed = next((s.messages for s in streams if s.broker_id == config.broker.id), 0)
    return max(0, committed - back), ""


async def _subscribe(
    args: argparse.Namespace, brokers: list[tuple[str, int]], start: int, note: str
) -> int:
    from .client import MessageView, open_subscriber

    out = sys.stdout.buffer
    count = nbytes = 0
    limit = args.count
    first = last = None
    async with open_subscriber(
        topic=args.topic, brokers=brokers, start=start, ordered=args.ordered
    ) as sub:
        while limit is None or count < limit:
            messages: list[MessageView] = []
            with trio.move_on_after(float("inf") if args.follow else args.idle):
                # Zero copy: each payload is written out before the next receive.
                messages = await sub.receive_views()
            if not messages:
                break  # caught up
            if first is None and messages[0].offset > start:
                print(
                    f"note: offsets {start}..{messages[0].offset - 1} of {args.topic!r} were "
                    f"reclaimed by retention; starting at {messages[0].offset}",
                    file=sys.stderr,
                )
            if limit is not None:
                messages = messages[: limit - count]
            for m in messages:
                if not args.summary:
                    if args.offsets:
                        out.write(f"{m.offset}\t{m.client_id}\t{m.client_order}\t".encode())
                    out.write(m.payload)
                    out.write(b"\n")
                nbytes += len(m.payload)
            count += len(messages)
            first = messages[0].offset if first is None else first
            last = messages[-1].offset
        out.flush()
    span = "" if first is None else f", offsets {first}..{last}"
    summary = f"{count} messages, {nbytes} bytes from {args.topic!r}{span}"
    if note and not count:
        summary += f" ({note})"
    print(summary, file=sys.stdout if args.summary else sys.stderr)
    return 0


# -- topics, inspect, create-topic, delete-topic: the local file or a broker (--url) ------


def _admin_request(url: str, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """One request to a broker's admin API; its JSON answer.

    Raises:
        AdminApiError: The broker answered with an error (its message), or
            could not be reached.
    """
    import urllib.error
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url + path,
        data=data,
        method=method,
        headers={"content-type": "application/json"} if data is not None else {},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read())["message"]
        except (ValueError, KeyError, TypeError):
            message = str(exc.reason)
        raise AdminApiError(exc.code, message) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise AdminApiError(0, f"cannot reach the broker at {url}: {reason}") from None


def _local_listing(path: str, storage_dir: str | None, topic: str | None) -> dict[str, Any]:
    """What ``GET /v1/topics`` answers, read from the CXL file (and the disk log's names)."""
    from .log import open_log
    from .log.disk import stream_files
    from .log.reader import describe_brokers, describe_region, describe_streams

    with open_log(path) as log:
        topics = sorted(log.topics(), key=lambda t: t.name)
        if topic is not None and topic not in {t.name for t in topics}:
            raise _CommandFailed(f"topic {topic!r} does not exist in {path}")
        # With a disk tier the stream begins where its disk log does.
        on_disk = None
        if storage_dir:
            on_disk = stream_files(storage_dir) if os.path.isdir(storage_dir) else {}
        return {
            "region": describe_region(path, log.geometry, log.units_used),
            "brokers": describe_brokers(log.brokers()),
            "storage_dir": storage_dir,
            "topics": [
                {"name": t.name, "order": t.order, "streams": describe_streams(t, on_disk)}
                for t in topics
            ],
        }


def _topics_command(args: argparse.Namespace, config: Config) -> int:
    """``topics`` and ``inspect``: the same listing from the file or a broker."""
    topic = getattr(args, "topic", None)
    if args.url is not None:
        if topic is not None:
            raise _CommandFailed(
                "--topic lists batches from the CXL file: run inspect on the broker's host, "
                "without --url"
            )
        listing = _admin_request(args.url, "GET", "/v1/topics")
        source = f"{args.url} (broker {listing.get('broker')})"
    else:
        path = args.cxl_path or config.cxl.path
        listing = _local_listing(path, config.storage.dir or None, topic)
        source = path
    if args.command == "inspect":
        r = listing["region"]
        print(
            f"{source}: {r['size_bytes']} bytes, {r['units_used']} of {r['units']} allocation "
            f"units of {r['unit_bytes']} bytes in segments (largest "
            f"{r['largest_segment_bytes']} bytes), {len(listing['topics'])} of "
            f"{r['max_topics']} topics, {r['max_brokers']} brokers"
        )
        _print_brokers(listing["brokers"])
    _print_topic_table(listing["topics"], with_disk=bool(listing["storage_dir"]))
    if topic is not None:
        _print_batches(args.cxl_path or config.cxl.path, topic)
    return 0


def _print_topic_table(topics: list[dict[str, Any]], *, with_disk: bool) -> None:
    # With a disk tier the stream begins where its disk log does (START); the
    # region holds a part of it, from IN-REGION on.
    disk_columns = f" {'IN-REGION':>12} {'DISK-FILES':>10} {'DISK-BYTES':>14}"
    print(
        f"{'TOPIC':<32} {'ORDER':>5} {'BROKER':>6} {'MESSAGES':>12} {'BATCHES':>9} "
        f"{'BYTES':>14} {'START':>12}{disk_columns if with_disk else ''}"
    )
    for topic in topics:
        for s in topic["streams"]:
            disk = (
                f" {s['region_first_offset']:>12} {s['disk_files']:>10} {s['disk_bytes']:>14}"
                if with_disk
                else ""
            )
            print(
                f"{topic['name']:<32} {topic['order']:>5} {s['broker']:>6} {s['messages']:>12} "
                f"{s['batches']:>9} {s['bytes']:>14} {s['first_offset']:>12}{disk}"
            )


def _print_brokers(members: Sequence[dict[str, Any]]) -> None:
    """The brokers of a region (``describe_brokers``): who serves it, where, since when."""
    if not members:
        print("no broker serves it")
        return
    print(f"{'BROKER':>6} {'STATUS':<12} {'PID':>8} {'ADDRESS':<24} {'STARTED':<19} HEARTBEAT")
    for m in members:
        started = (
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m["started_ns"] / 1e9))
            if m["started_ns"]
            else "-"
        )
        age = m["heartbeat_age_s"]
        beat = "-" if age is None else f"{age:.1f} s ago"
        address = m["address"] if m["port"] else "-"
        pid = "-" if m["pid"] is None else str(m["pid"])
        print(f"{m['broker_id']:>6} {m['status']:<12} {pid:>8} {address:<24} {started:<19} {beat}")


def _print_batches(path: str, topic: str) -> None:
    from .log import open_log

    with open_log(path) as log:
        for broker_id in range(log.geometry.max_brokers):
            batches = log.batches(topic, broker_id)
            if batches:
                print(f"\n{topic} broker {broker_id}:")
                print(
                    f"{'HEADER@':>12} {'STATE':<10} {'CLIENT':>7} {'SEQ':>7} "
                    f"{'MSGS':>6} {'BYTES':>9} {'FIRST':>10}"
                )
            for b in batches:
                first = "" if b.first_offset < 0 else str(b.first_offset)
                print(
                    f"{b.header_offset:>12} {b.state:<10} {b.client_id:>7} "
                    f"{b.batch_seq:>7} {b.num_msg:>6} {b.total_size:>9} {first:>10}"
                )


def _create_topic(args: argparse.Namespace, config: Config) -> int:
    from .log.topics import create_topic_file

    retention = {
        key: value
        for key, value in (
            ("retention_bytes", args.retention_bytes),
            ("retention_ms", args.retention_ms),
        )
        if value is not None
    }
    if args.url is not None:
        body = {"name": args.name, **retention}
        if args.order is not None:
            body["order"] = args.order
        created = _admin_request(args.url, "POST", "/v1/topics", body)
        order = created["order"]
        settings = {k: created[k] for k in ("retention_bytes", "retention_ms")}
        where = args.url
    else:
        path = args.cxl_path or config.cxl.path
        defaults = config.topics.settings_for(args.name)
        order = defaults.order if args.order is None else args.order
        try:
            create_topic_file(path, args.name, order=order, mode=config.cxl.mode, **retention)
        except FileNotFoundError:
            raise _CommandFailed(
                f"no CXL file at {path}: a broker makes it at its first start (or give "
                "--url to create the topic through a running broker)"
            ) from None
        except ValueError as exc:  # the name
            raise _CommandFailed(str(exc)) from None
        # What the topic keeps, as this config sees it: the recorded keys win.
        settings = {
            "retention_bytes": defaults.retention_bytes,
            "retention_ms": defaults.retention_ms,
            **retention,
        }
        where = path
    kept = ", ".join(f"{k} {v}" for k, v in settings.items())
    print(f"created topic {args.name!r} in {where} (order {order}, {kept})")
    return 0


def _delete_topic(args: argparse.Namespace, config: Config) -> int:
    from .log.topics import delete_topic_file

    if args.url is not None:
        done = _admin_request(args.url, "DELETE", f"/v1/topics/{quote(args.name, safe='')}")
        segments, renamed = done["segments_freed"], done["disk_files_renamed"]
    else:
        path = args.cxl_path or config.cxl.path
        try:
            deleted = delete_topic_file(
                path, args.name, config.storage.dir or None, mode=config.cxl.mode
            )
        except KeyError:
            raise _CommandFailed(f"no topic {args.name!r} in {path}") from None
        segments, renamed = deleted.segments, [str(p) for p in deleted.renamed]
    print(f"deleted topic {args.name!r}: {segments} segment(s) freed")
    for name in renamed:
        print(f"disk log renamed to {name}")
    return 0


_TOPIC_COMMANDS: dict[str, Callable[[argparse.Namespace, Config], int]] = {
    "topics": _topics_command,
    "inspect": _topics_command,
    "create-topic": _create_topic,
    "delete-topic": _delete_topic,
}


def _is_socket(fd: int) -> bool:
    try:
        return stat.S_ISSOCK(os.fstat(fd).st_mode)
    except OSError:
        return False


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        found.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found


async def _watch_signals(
    stop: trio.CancelScope,
    abort: Callable[[], None],
    *,
    what: str = "",
    task_status: trio.TaskStatus[None],
) -> None:
    """The first SIGINT/SIGTERM cancels ``stop`` (a graceful drain); a second
    one calls ``abort`` (stop at once)."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as received:
        task_status.started()
        async for signum in received:
            name = signal.Signals(signum).name
            if not stop.cancel_called:
                logger.info("%s: draining%s (send it again to stop at once)", name, what)
                stop.cancel()
            else:
                logger.warning("%s: stopping%s without finishing the drain", name, what)
                abort()


async def _serve_until_signalled(
    config: Config, *, reset: bool, supervisor_fd: int | None = None
) -> None:
    """Serve until the first SIGINT/SIGTERM (or, with ``supervisor_fd``, until
    the supervisor is gone), then drain; a second signal aborts."""
    serve_scope = trio.CancelScope()
    brokers: list[Broker] = []

    def abort() -> None:
        for broker in brokers:
            broker.abort()

    async with trio.open_nursery() as nursery:

        async def run_broker(*, task_status: trio.TaskStatus[Broker]) -> None:
            with serve_scope:
                await serve(config, reset=reset, task_status=task_status)
            nursery.cancel_scope.cancel()  # drained: stop watching signals

        await nursery.start(partial(_watch_signals, serve_scope, abort))
        broker = await nursery.start(run_broker)
        brokers.append(broker)
        # What start-up made (modules, config, the region's tables) lives as
        # long as the process: out of the collector's sight, a full
        # collection no longer walks it. Unfrozen, one took 21-25 ms of the
        # event loop in each 2 GB run paced at 2 GB/s, holding up every
        # connection's acks (p99 17-20 ms against 7.6 ms frozen).
        gc.freeze()
        if supervisor_fd is not None:
            nursery.start_soon(
                report_to_supervisor,
                supervisor_fd,
                broker.host,
                broker.port,
                broker.http_port,
                serve_scope.cancel,
            )


# -- cluster ---------------------------------------------------------------------------------


def _run_cluster(args: argparse.Namespace, config: Config) -> int:
    try:
        check_cluster_size(config, args.brokers)
    except ConfigError as exc:
        print(f"trio-embarcadero: {exc}", file=sys.stderr)
        return 2
    _set_up_logging(config, "cluster ")
    clusters: list[Cluster] = []
    failures: list[BaseException] = []
    try:
        trio.run(partial(_cluster_until_signalled, config, args.brokers, args.reset, clusters))
    except* (EmbarcaderoError, OSError) as group:
        failures.extend(_leaves(group))
    for failure in failures:
        if not isinstance(failure, ClusterError):  # logged when it happened
            logger.error("cannot run the cluster: %s", failure)
    if failures:
        return 1
    # SIGTERM's default action ends a broker stopped before it listened: nothing lost.
    clean = (0, -signal.SIGTERM)
    unclean = [
        f"broker {b.broker_id} {describe_exit(b.exit_statuses[-1])}"
        for cluster in clusters
        for b in cluster.brokers
        if b.exit_statuses and b.exit_statuses[-1] not in clean
    ]
    if unclean:
        logger.error("not every broker stopped cleanly: %s", "; ".join(unclean))
        return 1
    return 0


def _print_serving(broker: ClusterBroker) -> None:
    again = f", restart {broker.restarts}" if broker.restarts else ""
    host = f"[{broker.host}]" if ":" in broker.host else broker.host
    print(
        f"broker {broker.broker_id} listening on {host}:{broker.port} (pid {broker.pid}{again})",
        flush=True,
    )


async def _cluster_until_signalled(
    config: Config, brokers: int, reset: bool, clusters: list[Cluster]
) -> None:
    """Run the cluster until the first SIGINT/SIGTERM, then drain every broker;
    a second signal stops them at once."""
    stop = trio.CancelScope()

    def abort() -> None:
        for cluster in clusters:
            cluster.abort()

    async with trio.open_nursery() as nursery:
        await nursery.start(partial(_watch_signals, stop, abort, what=" every broker"))
        with stop:
            async with trio.open_nursery() as running:
                clusters.append(
                    await running.start(
                        partial(
                            run_cluster, config, brokers, reset=reset, on_serving=_print_serving
                        )
                    )
                )
        nursery.cancel_scope.cancel()  # drained: stop watching signals
