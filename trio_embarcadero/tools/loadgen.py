"""The benchmark's load generator: publishers in a process of their own.

Run by ``trio-embarcadero bench`` (or by hand)::

    python -m trio_embarcadero.tools.loadgen --port 1214 --connections 4 --ack 1 --bytes 2e9

``--port`` may list several brokers' ports (``--port 1214,1215``): connection
``i`` goes to the ``i % n``-th, and the result says what each port received
(``per_port``).

Each connection sends a 64-byte publish handshake, then the same prebuilt
batch over and over (``[128-B header][num_msg message records]``, built once
with correct records; only ``batch_seq`` changes between sends), and with
``--ack 1`` or ``--ack 2`` reads the same-connection ack stream. The two are
handled alike here; the broker decides what a count means (ack 1: the batch
is committed in the CXL log; ack 2: it is also on disk, fdatasync'ed to the
disk log; a broker without ``storage.dir`` refuses ack 2 with error 6, which
is reported). Connections draw batches from one shared budget (``--bytes`` of
message payload, rounded up to whole batches) until it is spent or
``--seconds`` have passed, whichever comes first; each connection's first
batch is its own, so every connection sends one when the budget allows.

Design, chosen so the generator is rarely the bottleneck:

* blocking sockets, one sender thread per connection: ``sendall`` of a whole
  batch releases the GIL for the whole copy into the kernel, so the Python
  work per batch is a ``pack_into`` and a few list appends;
* with acks, one reader thread per connection decodes the counts and records
  each batch's ack latency;
* nothing is validated or allocated per message;
* each socket's send buffer is fixed (``--send-buffer``, default 512 KiB,
  which the kernel doubles), not left to the kernel's autotuning (up to
  ``net.ipv4.tcp_wmem``'s maximum, 4 MiB here). On loopback the receiver's
  window updates run the sender's transmit path on the receiver's CPU: a
  receiver that falls behind sends its publishers' queued bytes for them,
  and the more a send buffer holds, the more of that lands on it. With
  autotuned buffers a broker that fell behind four publishers once stayed
  behind at twice its CPU per GB (0.25 -> 0.5 s/GB, staged, servers pinned
  apart); on a network link the sender's host does that work. A sink fast
  enough never falls behind, so the ratios to it measured mostly this
  effect. ``--send-buffer 0`` gives the kernel's autotuning back.

Output, on stdout, one JSON object per line: a ``progress`` line every
``--interval`` seconds, then one ``result`` line (see :func:`_result`). Times
are ``time.perf_counter`` seconds. The run window is from the first send to
the last ack covering every message (``--ack 1`` or ``2``), or to the
receiver closing the connection after reading it all (``--ack 0``: each
connection half-closes after its last batch and waits for EOF, so kernel
buffers don't count as delivered). Ack latency is per batch, measured from
the *start* of the batch's ``sendall`` (``latency_us``, which includes time
blocked on a full socket, i.e. backpressure) and from its completion
(``latency_after_send_us``, the time the receiver took once the batch was in
the kernel).

With ``--session`` (needs ``--ack 1`` or ``2``) each connection publishes in a
publish session of its own (``client_req = 2``, a random token, its client
id): its batch_seqs run 0, 1, 2, ... as a session's must, the broker admits
each batch in the region's session table before it reads the payload, and
the sender keeps the session's window (a batch goes out only once every
batch 256 or more before it is acked). Next to the same run without it, that
is the cost of a session on the ingest path.

With ``--rate`` the connections are paced: each sends its batches on a fixed
schedule (``--rate`` bytes of message payload per second for all of them
together, each connection an equal share, their schedules staggered), sleeping
until a batch is due; one that falls behind (its ``sendall`` blocked) sends the
late batches back to back until it is on schedule again. Latency is then
measured from each batch's *scheduled* send time, so time a batch spent waiting
behind earlier ones counts (no coordinated omission); ``send_lag_us`` says how
late each send started.
"""

from __future__ import annotations

import argparse
import collections
import gc
import itertools
import math
import random
import re
import socket
import struct
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from ..errors import ErrorCode
from ..wire import (
    ACK_BROKER_ID,
    ACK_COUNT,
    BATCH_HEADER_SIZE,
    ERROR_FRAME_HEAD,
    ERROR_MARKER,
    encode_batch,
    padded_size,
)
from . import clientproc
from .clientproc import ClientFailure, close_all, cpu_seconds, emit, open_connections, watch
from .rawwire import publish_handshake, recv_exactly

# batch_seq is the header's first field; it is the only one that changes.
_BATCH_SEQ = struct.Struct("<Q")
#: A session's window (wire protocol section 4.5): batch_seq ``s`` goes out
#: only once every batch up to ``s - 256`` has been acked.
SESSION_WINDOW = 256

#: The C++ evaluation's batch: 2 MiB + one padded 1 KiB message of payload.
DEFAULT_BATCH_MESSAGES = 1928
DEFAULT_MESSAGE_SIZE = 1024
#: SO_SNDBUF of each connection (see the module docstring); 0: autotuned.
DEFAULT_SEND_BUFFER = 512 * 1024


def build_batch(client_id: int, num_msg: int, message_size: int) -> bytearray:
    """Header plus ``num_msg`` message records, as one buffer (``batch_seq`` 0).

    Records carry ``client_order`` 0 to ``num_msg - 1``; the same batch is
    resent, so later batches repeat those numbers (the broker does not check
    them).
    """
    payload = (bytes(range(256)) * (message_size // 256 + 1))[:message_size]
    return encode_batch([payload] * num_msg, client_id=client_id)


#: The result's ``window``, by ack level.
_WINDOWS = {
    0: "first send to receiver EOF",
    1: "first send to last ack",
    2: "first send to last ack (durable on disk)",
}


class _Connection:
    """One publisher connection: a sender thread and, with acks, a reader thread."""

    def __init__(self, gen: LoadGenerator, index: int) -> None:
        self.gen = gen
        self.index = index
        self.client_id = gen.first_client_id + index
        self.batch = build_batch(self.client_id, gen.num_msg, gen.message_size)
        self.port = gen.ports[index % len(gen.ports)]
        self.sock = socket.create_connection((gen.host, self.port))
        if gen.send_buffer:
            # Before the first byte: the handshake is this socket's first send.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, gen.send_buffer)
        # What the kernel made of it (Linux doubles the value set).
        self.send_buffer_actual = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        # With --session: its token; the reader wakes a sender that waits
        # for the session's window.
        self.token = random.SystemRandom().randrange(1, 2**64) if gen.session else 0
        self.window = threading.Condition() if gen.session else None
        self.sent_batches = 0
        self.sent_msgs = 0
        self.acked_msgs = 0
        # One entry per batch sent with acks on: [cumulative messages after the
        # batch, latency start (the scheduled time when paced, else the send
        # start), send end, ack time, send start]. The entry is queued before
        # the send, as the ack may arrive before sendall() returns.
        self.timings: list[list[float]] = []
        self.pending: collections.deque[list[float]] = collections.deque()
        self.last_ack_at = 0.0
        self.done_at = 0.0
        self.error: str | None = None
        self.sending_done = False

    def handshake(self) -> None:
        gen = self.gen
        self.sock.sendall(publish_handshake(self.client_id, gen.ack, gen.topic, self.token))
        if gen.ack:
            head = self._receive(ACK_BROKER_ID.size)
            if head is None:
                raise ClientFailure(f"connection {self.index}: closed before the ack stream began")
            if head == b"\xff" * ACK_BROKER_ID.size:
                # A refused handshake: an error frame where the broker id would be.
                raise ClientFailure(f"connection {self.index}: refused: {self._error_frame(head)}")

    def _error_frame(self, head: bytes) -> str:
        """The rest of an error frame whose first bytes are ``head``, as text."""
        rest = self._receive(ERROR_FRAME_HEAD.size - len(head))
        if rest is None:
            return "truncated error frame"
        _, code, length = ERROR_FRAME_HEAD.unpack(head + rest)
        text = self._receive(length)
        try:
            name = ErrorCode(code).name
        except ValueError:
            name = "unknown code"
        return f"error {code} ({name}): {(text or b'').decode('utf-8', 'replace')}"

    def _receive(self, n: int) -> bytes | None:
        """The next ``n`` bytes, or None if the receiver closed the connection first."""
        data = bytearray(n)
        try:
            return bytes(data) if recv_exactly(self.sock, memoryview(data)) else None
        except ConnectionResetError:  # closed part way: as short as closed before
            return None

    def send_loop(self, start: threading.Event) -> None:
        gen = self.gen
        batch = self.batch
        num_msg = gen.num_msg
        pending = self.pending
        start.wait()
        interval = gen.pace_interval
        window = self.window
        # Staggered, so paced connections do not all send at the same instants.
        due = gen.t0 + interval * self.index / len(gen.connections)
        # Each connection's first batch is its own (while the budget has one for
        # each): drawn from the shared count, a connection whose thread started
        # late could find the budget spent, and a small run to several brokers
        # would leave one of them nothing to measure.
        owns_first = self.index < gen.reserved_batches
        try:
            seq = 0
            while (
                owns_first if seq == 0 else next(gen.budget) < gen.total_batches
            ) and time.perf_counter() < gen.deadline:
                if window is not None and seq - self.acked_msgs // num_msg >= SESSION_WINDOW:
                    if not self._wait_for_window(window, seq):
                        break
                _BATCH_SEQ.pack_into(batch, 0, seq)
                now = time.perf_counter()
                if interval:
                    if now < due:
                        # The stop event, not a plain sleep: an abandoned run wakes us.
                        if gen.stop.wait(due - now):
                            break
                        now = time.perf_counter()
                    entry = [float(self.sent_msgs + num_msg), due, 0.0, 0.0, now]
                    due += interval
                else:
                    entry = [float(self.sent_msgs + num_msg), now, 0.0, 0.0, now]
                if gen.ack:
                    self.timings.append(entry)
                    pending.append(entry)
                self.sock.sendall(batch)
                entry[2] = time.perf_counter()
                seq += 1
                self.sent_batches = seq
                self.sent_msgs += num_msg
            self.sending_done = True
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self.error = f"connection {self.index}: send failed: {exc}"
            self.sending_done = True

    def _wait_for_window(self, window: threading.Condition, seq: int) -> bool:
        """Wait until batch_seq ``seq`` is inside the session's window; False
        if the run ends first (an error, or the run was abandoned)."""
        num_msg = self.gen.num_msg
        with window:
            while seq - self.acked_msgs // num_msg >= SESSION_WINDOW:
                if self.error or self.done_at or self.gen.stop.is_set():
                    return False
                window.wait(0.1)
        return True

    def read_loop(self) -> None:
        """Read acks (or, with ack 0, wait for EOF); record per-batch latencies."""
        buf = bytearray(1 << 16)
        view = memoryview(buf)
        have = 0
        pending = self.pending
        try:
            while True:
                n = self.sock.recv_into(view[have:])
                now = time.perf_counter()
                if n == 0:
                    if have:
                        self.error = f"connection {self.index}: {have} stray bytes before EOF"
                    break
                have += n
                if not self.gen.ack:
                    self.error = f"connection {self.index}: unexpected bytes {bytes(buf[:have])!r}"
                    break
                whole = have - have % 8
                for (count,) in ACK_COUNT.iter_unpack(view[:whole]):
                    if count == ERROR_MARKER:
                        self.error = f"connection {self.index}: error frame {bytes(buf[:have])!r}"
                        return
                    self.acked_msgs = count
                    self.last_ack_at = now
                    while pending and pending[0][0] <= count:
                        pending.popleft()[3] = now
                if self.window is not None and whole:
                    with self.window:
                        self.window.notify()
                if whole:
                    buf[: have - whole] = buf[whole:have]
                    have -= whole
            # EOF: the receiver has read everything (it closes after our half-close).
            self.done_at = now
            if self.gen.ack and self.acked_msgs == self.sent_msgs and self.sent_msgs:
                self.done_at = self.last_ack_at
        except OSError as exc:
            self.error = f"connection {self.index}: receive failed: {exc}"
        finally:
            if not self.done_at:
                self.done_at = time.perf_counter()
            if self.window is not None:  # a sender waiting for acks stops
                with self.window:
                    self.window.notify()


class LoadGenerator:
    """The shared budget, the connections and the run's bookkeeping."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.host: str = args.host
        self.ports: list[int] = args.port
        self.ack: int = args.ack
        self.topic: str = args.topic
        self.message_size: int = args.message_size
        self.num_msg: int = args.batch_messages
        self.first_client_id: int = args.client_id
        self.seconds: float = args.seconds
        self.interval: float = args.interval
        self.send_buffer: int = args.send_buffer
        batch_payload = self.num_msg * self.message_size
        self.requested_bytes = int(args.bytes)
        self.total_batches = max(1, -(-self.requested_bytes // batch_payload))
        # Batches reserved one per connection (the first of each), then the shared count.
        self.reserved_batches = min(args.connections, self.total_batches)
        self.budget = itertools.count(self.reserved_batches)
        self.t0 = 0.0
        self.deadline = float("inf")
        self.stop = threading.Event()
        self.rate: float | None = args.rate
        self.session: bool = args.session
        # Seconds between one connection's batches when paced (0: as fast as it can).
        self.pace_interval = batch_payload * args.connections / args.rate if args.rate else 0.0
        self.connections = open_connections(args.connections, lambda i: _Connection(self, i))

    def close(self) -> None:
        """Close every connection's socket."""
        close_all(self.connections)

    def run(self) -> dict[str, Any]:
        """Handshake, send until the budget or the time is spent, wait for the last
        acks (or EOF); prints progress lines meanwhile and returns the result record."""
        for conn in self.connections:
            conn.handshake()
        start = threading.Event()
        senders = [
            threading.Thread(target=c.send_loop, args=(start,), daemon=True)
            for c in self.connections
        ]
        readers = [threading.Thread(target=c.read_loop, daemon=True) for c in self.connections]
        for thread in senders + readers:
            thread.start()
        cpu0 = cpu_seconds()
        t0 = self.t0 = time.perf_counter()
        self.deadline = t0 + self.seconds
        start.set()
        watch(
            senders + readers,
            self.connections,
            t0=t0,
            interval=self.interval,
            # Past the bound plus a grace period: the receiver is stuck.
            give_up_at=self.deadline + max(30.0, self.seconds),
            stuck="timed out waiting for acks/EOF",
            on_tick=lambda elapsed: emit({"type": "progress", **self._counts(elapsed)}),
            stop=self.stop,
        )
        t_end = max(c.done_at for c in self.connections)
        return self._result(t0, t_end, cpu_seconds() - cpu0)

    def _counts(self, elapsed: float) -> dict[str, Any]:
        return {
            "elapsed": round(elapsed, 6),
            "sent_msgs": sum(c.sent_msgs for c in self.connections),
            "sent_bytes": sum(c.sent_msgs for c in self.connections) * self.message_size,
            "acked_msgs": sum(c.acked_msgs for c in self.connections),
        }

    def _result(self, t0: float, t_end: float, cpu: float) -> dict[str, Any]:
        conns = self.connections
        messages = sum(c.sent_msgs for c in conns)
        batches = sum(c.sent_batches for c in conns)
        errors = [c.error for c in conns if c.error]
        acked = sum(c.acked_msgs for c in conns)
        acked_batches = [e for c in conns for e in c.timings if e[3]]
        elapsed = max(t_end - t0, 1e-9)
        payload = messages * self.message_size
        wire = batches * (BATCH_HEADER_SIZE + self.num_msg * padded_size(self.message_size))
        return {
            "type": "result",
            "ok": not errors and (self.ack == 0 or acked == messages),
            "errors": errors,
            "ack": self.ack,
            "session": self.session,
            "connections": len(conns),
            "message_size": self.message_size,
            "batch_messages": self.num_msg,
            "requested_bytes": self.requested_bytes,
            "batches": batches,
            "messages": messages,
            "acked_messages": acked,
            "payload_bytes": payload,
            "wire_bytes": wire,
            "elapsed_s": elapsed,
            "payload_bytes_per_s": payload / elapsed,
            "messages_per_s": messages / elapsed,
            "time_bounded": batches < self.total_batches,
            "window": _WINDOWS[self.ack],
            "send_buffer": self.send_buffer,
            "send_buffer_actual": conns[0].send_buffer_actual,
            "rate_bytes_per_s": self.rate,
            "latency_from": (
                None if not self.ack else "scheduled send" if self.rate else "send start"
            ),
            "latency_us": [round((e[3] - e[1]) * 1e6) for e in acked_batches],
            # An ack can beat sendall()'s return by a hair: count that as 0.
            "latency_after_send_us": [
                max(0, round((e[3] - e[2]) * 1e6)) for e in acked_batches if e[2]
            ],
            "send_lag_us": [max(0, round((e[4] - e[1]) * 1e6)) for e in acked_batches]
            if self.rate
            else [],
            "loadgen_cpu_s": cpu,
            "per_port": [
                {
                    "port": port,
                    "connections": sum(1 for c in conns if c.port == port),
                    "messages": sum(c.sent_msgs for c in conns if c.port == port),
                    "payload_bytes": sum(c.sent_msgs for c in conns if c.port == port)
                    * self.message_size,
                }
                for port in self.ports
            ],
        }


def _ports(text: str) -> list[int]:
    """``--port``: one port, or several separated by commas."""
    try:
        ports = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port or list of ports: {text!r}") from None
    if not all(0 < port < 65536 for port in ports):
        raise argparse.ArgumentTypeError(f"ports are 1..65535: {text!r}")
    return ports


def parse_size(text: str) -> int:
    """A byte count: ``2e9``, ``2G``/``2GB`` (10**9) or ``2GiB`` (2**30); K, M, G, T.

    The one size syntax of the tools (the bench's ``--bytes`` and
    ``--batch-size`` too).

    Raises:
        argparse.ArgumentTypeError: Not a size, or not above 0.
    """
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


def parse_size_or_zero(text: str) -> int:
    """:func:`parse_size`, or 0 (a setting left to the kernel)."""
    return 0 if text.strip() == "0" else parse_size(text)


def build_parser() -> argparse.ArgumentParser:
    """The load generator's command line."""
    parser = argparse.ArgumentParser(
        prog="python -m trio_embarcadero.tools.loadgen",
        description="Publish load generator (one process, a thread pair per connection).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument(
        "--port",
        type=_ports,
        required=True,
        help="the broker's port, or several brokers' (comma-separated): connections "
        "are spread over them round-robin",
    )
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument(
        "--ack",
        type=int,
        choices=(0, 1, 2),
        default=1,
        help="handshake ack level; 2 (durable on disk) is counted like 1 (default: 1)",
    )
    parser.add_argument("--topic", default="bench")
    parser.add_argument("--client-id", type=int, default=1, help="first client id")
    parser.add_argument("--message-size", type=int, default=DEFAULT_MESSAGE_SIZE)
    parser.add_argument("--batch-messages", type=int, default=DEFAULT_BATCH_MESSAGES)
    parser.add_argument(
        "--bytes", type=parse_size, default=2 * 10**9, help="message payload bytes to send in all"
    )
    parser.add_argument("--seconds", type=float, default=60.0, help="stop sending after this")
    parser.add_argument(
        "--rate",
        type=parse_size,
        metavar="BYTES_PER_S",
        help="pace the connections: message payload per second, all together (default: unpaced)",
    )
    parser.add_argument(
        "--session",
        action="store_true",
        help="publish in sessions (client_req 2): one per connection, batch_seq 0, 1, 2, ... "
        "(needs --ack 1 or 2)",
    )
    parser.add_argument("--interval", type=float, default=1.0, help="progress line period")
    parser.add_argument(
        "--send-buffer",
        type=parse_size_or_zero,
        default=DEFAULT_SEND_BUFFER,
        metavar="SIZE",
        help="SO_SNDBUF of each connection (default: 512KiB; 0: the kernel autotunes it)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one load; prints JSON lines; returns 0 when every message got through."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    if args.connections < 1 or args.message_size < 1 or args.batch_messages < 1:
        print("connections, message size and batch messages must be >= 1", file=sys.stderr)
        return 2
    if args.session and not args.ack:
        print("--session needs --ack 1 or 2 (a session resends until acked)", file=sys.stderr)
        return 2
    # Every batch sent leaves a timing record (a list) behind, so each full
    # collection walks all of them holding the GIL, and every sender and ack
    # reader stops meanwhile: 10-20 ms stalls, which were the sink's p99 ack
    # latency at 0.7 GB/s paced (13 ms collected, 0.7-1.1 ms not). A run
    # makes no garbage cycles worth collecting.
    collecting = gc.isenabled()
    gc.disable()
    try:
        return clientproc.main("loadgen", args, LoadGenerator)
    finally:
        if collecting:  # main() also runs in the tests' process
            gc.enable()


if __name__ == "__main__":
    sys.exit(main())
