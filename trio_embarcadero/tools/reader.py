"""The read path's reader: subscribers in a process of their own.

Run by ``trio-embarcadero bench`` for its read variants (or by hand)::

    python -m trio_embarcadero.tools.reader --port 1214 --connections 4 --records 3906250

Each connection subscribes to ``--topic`` from offset 0 and reads the record
stream with blocking ``recv_into(MSG_WAITALL)`` into one reused buffer (a
whole number of records, about 1 MiB), counting bytes, until it holds
``--records`` records, or ``--seconds`` have passed (then the result says
``time_bounded`` and counts what was read); then it closes. A thread per
connection; nothing is
parsed or copied per record, so the figure is the sender's (the broker's or
the minimal sender's), not the reader's. All messages are ``--message-size``
bytes, so the stream is record-aligned and the reader checks only the first
and the last record's header (payload size, logical offset): a stream that
skipped or repeated records, or carried anything but records, fails.

Output, on stdout, one JSON object per line: a ``progress`` line every
``--interval`` seconds (``received_bytes``, and ``payload_bytes``, the
message payload in them), then one ``result`` line. The window runs from the
subscribe handshakes to the last byte of the last connection; every
connection reads the whole topic, so ``payload_bytes`` adds up the
connections.
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from ..wire import MESSAGE_HEADER, MH_LOGICAL_OFFSET, MH_SIZE, padded_size
from . import clientproc
from .clientproc import close_all, cpu_seconds, emit, open_connections, watch
from .loadgen import DEFAULT_MESSAGE_SIZE
from .rawwire import recv_exactly, subscribe_handshake

#: About this much is received per call (rounded down to whole records).
_CHUNK = 1 << 20


class _Subscription:
    """One subscribe connection and what it has read."""

    def __init__(self, reader: Reader, index: int) -> None:
        self.reader = reader
        self.index = index
        self.sock = socket.create_connection((reader.host, reader.port))
        self.received = 0
        self.done_at = 0.0
        self.error: str | None = None

    def read_loop(self, start: threading.Event) -> None:
        reader = self.reader
        record = reader.record_size
        want = reader.records * record
        buffer = bytearray(max(1, _CHUNK // record) * record)
        view = memoryview(buffer)
        start.wait()
        try:
            self.sock.sendall(subscribe_handshake(reader.topic))
            while self.received < want:
                if time.perf_counter() > reader.deadline:
                    return
                n = min(len(view), want - self.received)
                if not recv_exactly(self.sock, view[:n]):
                    self.error = (
                        f"connection {self.index}: closed after {self.received} of {want} bytes"
                    )
                    return
                if not self.received:
                    self._check(view[:record], 0)
                self.received += n
            self._check(view[n - record : n], reader.records - 1)
        except OSError as exc:
            self.error = f"connection {self.index}: receive failed: {exc}"
        finally:
            self.done_at = time.perf_counter()
            self.sock.close()

    def _check(self, header: memoryview, offset: int) -> None:
        fields = MESSAGE_HEADER.unpack(header[: MESSAGE_HEADER.size])
        found = (fields[MH_LOGICAL_OFFSET], fields[MH_SIZE])
        if found != (offset, self.reader.message_size) and self.error is None:
            self.error = (
                f"connection {self.index}: record {offset} has (offset, size) {found}, "
                f"not {(offset, self.reader.message_size)}"
            )


class Reader:
    """The subscriptions and the run's bookkeeping."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.host: str = args.host
        self.port: int = args.port
        self.topic: str = args.topic
        self.records: int = args.records
        self.message_size: int = args.message_size
        self.record_size = padded_size(args.message_size)
        self.seconds: float = args.seconds
        self.deadline = float("inf")
        self.interval: float = args.interval
        self.subscriptions = open_connections(args.connections, lambda i: _Subscription(self, i))

    def close(self) -> None:
        """Close every connection's socket."""
        close_all(self.subscriptions)

    def run(self) -> dict[str, Any]:
        """Subscribe, read until every connection has the whole topic (or the
        time is up); prints progress lines meanwhile and returns the result."""
        start = threading.Event()
        threads = [
            threading.Thread(target=s.read_loop, args=(start,), daemon=True)
            for s in self.subscriptions
        ]
        for thread in threads:
            thread.start()
        cpu0 = cpu_seconds()
        t0 = time.perf_counter()
        self.deadline = t0 + self.seconds
        start.set()
        watch(
            threads,
            self.subscriptions,
            t0=t0,
            interval=self.interval,
            # Past the bound plus a grace period: the sender is stuck.
            give_up_at=self.deadline + max(30.0, self.seconds),
            stuck="timed out waiting for records",
            on_tick=lambda elapsed: emit({"type": "progress", **self._counts(elapsed)}),
        )
        elapsed = max(max(s.done_at for s in self.subscriptions) - t0, 1e-9)
        counts = self._counts(elapsed)
        errors = [s.error for s in self.subscriptions if s.error]
        return {
            "type": "result",
            "ok": not errors,
            "errors": errors,
            "connections": len(self.subscriptions),
            "records_per_connection": self.records,
            "message_size": self.message_size,
            "messages": counts["received_bytes"] // self.record_size,
            **counts,
            "time_bounded": any(
                s.received < self.records * self.record_size for s in self.subscriptions
            ),
            "elapsed_s": elapsed,
            "payload_bytes_per_s": counts["payload_bytes"] / elapsed,
            "window": "subscribe handshakes to the last byte of every connection",
            "reader_cpu_s": cpu_seconds() - cpu0,
        }

    def _counts(self, elapsed: float) -> dict[str, Any]:
        received = sum(s.received for s in self.subscriptions)
        return {
            "elapsed": round(elapsed, 6),
            "received_bytes": received,
            "payload_bytes": received // self.record_size * self.message_size,
        }


def build_parser() -> argparse.ArgumentParser:
    """The reader's command line."""
    parser = argparse.ArgumentParser(
        prog="python -m trio_embarcadero.tools.reader",
        description="Raw subscribers reading a whole topic from offset 0 (one process, a "
        "thread per connection).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--topic", default="bench")
    parser.add_argument(
        "--records", type=int, required=True, help="records each connection reads (the topic's)"
    )
    parser.add_argument("--message-size", type=int, default=DEFAULT_MESSAGE_SIZE)
    parser.add_argument("--seconds", type=float, default=60.0, help="stop reading after this")
    parser.add_argument("--interval", type=float, default=1.0, help="progress line period")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Read the topic; prints JSON lines; returns 0 when every connection read all of it."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    if min(args.connections, args.records, args.message_size) < 1:
        print("connections, records and message size must be >= 1", file=sys.stderr)
        return 2
    return clientproc.main("reader", args, Reader)


if __name__ == "__main__":
    sys.exit(main())
