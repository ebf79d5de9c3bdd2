"""The client commands: ``publish`` and ``subscribe`` talk to a broker;
``topics``, ``inspect``, ``create-topic`` and ``delete-topic`` read or change
the broker's CXL file, or ask a broker's admin API (``--url``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any, Protocol, TextIO
from urllib.parse import quote

import trio

from ..config import Config
from ..errors import AdminApiError, EmbarcaderoError


class _CommandFailed(Exception):
    """A client command cannot go on; its message says why (exit status 1)."""


def run_client_command(args: argparse.Namespace, config: Config) -> int:
    """Run a client command; its exit status."""
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
    from ..client import open_publisher

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
    from ..log import open_log

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
    from ..client import MessageView, open_subscriber

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
    from ..log import open_log
    from ..log.disk import stream_files
    from ..log.reader import describe_brokers, describe_region, describe_streams

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
    from ..log import open_log

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
    from ..log.topics import create_topic_file

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
    from ..log.topics import delete_topic_file

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
