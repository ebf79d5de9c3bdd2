"""The command line's arguments: every subcommand and its options.

Building the parser loads nothing beyond the configuration: ``serve`` decides
whether to start itself again (see :mod:`.main`) before the broker is loaded.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from functools import partial

from .. import __version__
from ..config import LOG_FORMATS, ORDER_LEVELS
from ..wire import DEFAULT_BATCH_BYTES

#: The commands that talk to a broker or read its files (:mod:`.clients`).
CLIENT_COMMANDS = ("publish", "subscribe", "topics", "inspect", "create-topic", "delete-topic")

_AddCommand = Callable[..., argparse.ArgumentParser]


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


def _add_client_commands(command: _AddCommand) -> None:
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
