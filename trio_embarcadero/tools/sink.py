"""Baselines for ``trio-embarcadero bench``: the machine's limit.

Two receivers for the ingest path and one sender for the read path.

Each receiving sink speaks the publish side of the wire protocol and nothing else: it
reads the 64-byte handshake, answers ``<i`` broker id 0 when the ack level is
1 or more, then reads ``[128-B batch header][total_size payload bytes]``
repeatedly into one reused buffer and, with acks on, writes the ``<Q``
cumulative message count after every batch. No validation, no log, no copy:
whatever the broker does beyond this is overhead the benchmark shows as a
ratio to these numbers.

Three kinds, each run as its own process::

    python -m trio_embarcadero.tools.sink trio --port 0   # Trio, stream.socket.recv_into
    python -m trio_embarcadero.tools.sink raw --port 0    # blocking sockets, MSG_WAITALL, threads
    python -m trio_embarcadero.tools.sink read --batches 100 --port 0   # Trio sender

``trio`` is the fair baseline (the same event loop and receive call the broker
uses); ``raw`` is the best a Python process can do on this machine.

``read`` is the read path's baseline, a subscriber's minimal sender: it fills
a file under ``--dir`` (``/dev/shm``) with ``--batches`` batches' message
records, stamped with logical offsets as the broker's log holds them, maps it
shared and faulted in as the broker maps its region (the file itself is
unlinked at once: the mapping keeps it), then answers every subscribe
handshake with those bytes from its ``last_addr`` on, one batch's records per
``send_all`` as the broker sends them, and waits for the reader to close.
No index, no commit feed, no lock: whatever the broker's subscriber does
beyond this is overhead.

All print ``listening on HOST:PORT`` on stdout once ready and serve until
SIGINT or SIGTERM, then exit 0.
"""

from __future__ import annotations

import argparse
import functools
import mmap
import os
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Awaitable, Callable, Sequence
from types import FrameType

import numpy as np
import trio

from ..wire import (
    ACK_BROKER_ID,
    ACK_COUNT,
    BATCH_HEADER,
    BATCH_HEADER_SIZE,
    HANDSHAKE,
    padded_size,
    stamp_records,
)
from .loadgen import DEFAULT_BATCH_MESSAGES, DEFAULT_MESSAGE_SIZE, build_batch
from .rawwire import recv_exactly, trio_recv_exactly

# Receive buffers start at this size and grow to the largest batch seen.
_INITIAL_BUFFER = 4 * 2**20


def _batch_size(header: memoryview) -> tuple[int, int]:
    """(num_msg, total_size) of a batch header."""
    fields = BATCH_HEADER.unpack(header)
    return fields[2], fields[7]


def _new_buffers() -> tuple[memoryview, memoryview, bytearray]:
    """A connection's receive buffers: handshake, batch header, first payload buffer."""
    return (
        memoryview(bytearray(HANDSHAKE.size)),
        memoryview(bytearray(BATCH_HEADER.size)),
        bytearray(_INITIAL_BUFFER),
    )


# -- Trio sink ---------------------------------------------------------------------


async def _serve_trio_connection(stream: trio.SocketStream) -> None:
    sock = stream.socket
    handshake, header, buffer = _new_buffers()
    view = memoryview(buffer)
    count = 0
    try:
        if not await trio_recv_exactly(sock, handshake):
            return
        ack = HANDSHAKE.unpack(handshake)[1]
        if ack:
            await stream.send_all(ACK_BROKER_ID.pack(0))
        while await trio_recv_exactly(sock, header):
            num_msg, total = _batch_size(header)
            if total > len(buffer):
                buffer = bytearray(total)
                view = memoryview(buffer)
            await trio_recv_exactly(sock, view[:total])
            count += num_msg
            if ack:
                await stream.send_all(ACK_COUNT.pack(count))
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def _serve_until_signalled(
    handler: Callable[[trio.SocketStream], Awaitable[None]], host: str, port: int
) -> None:
    """Serve ``handler`` on ``host:port``, say where, and stop at SIGINT or SIGTERM."""
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, port, host=host))
        bound = listeners[0].socket.getsockname()
        print(f"listening on {bound[0]}:{bound[1]}", flush=True)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


# -- read sink: the read path's sender -----------------------------------------------


def build_topic(directory: str, batches: int, batch_messages: int, message_size: int) -> mmap.mmap:
    """A shared, faulted-in mapping of ``batches`` batches' records, as a
    stream of the broker's log holds them (logical offsets from 0).

    The file goes under ``directory`` and is unlinked before this returns.
    """
    records = build_batch(1, batch_messages, message_size)[BATCH_HEADER_SIZE:]
    batch_bytes = len(records)
    fd, path = tempfile.mkstemp(prefix="trio-embarcadero-read-sink-", dir=directory)
    try:
        os.ftruncate(fd, batches * batch_bytes)
        # MAP_POPULATE, as the broker prefaults its region: no first-touch faults while sending.
        mapping = mmap.mmap(fd, batches * batch_bytes, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
    finally:
        os.close(fd)
        os.unlink(path)
    words = np.frombuffer(mapping, dtype=np.uint64)
    starts = np.arange(batch_messages, dtype=np.int64) * padded_size(message_size)
    for i in range(batches):
        mapping[i * batch_bytes : (i + 1) * batch_bytes] = records
        stamp_records(words, i * batch_bytes, starts, i * batch_messages)
    del words  # the mapping cannot close while numpy holds it
    return mapping


async def _serve_topic(
    topic: memoryview, batch_bytes: int, record_size: int, stream: trio.SocketStream
) -> None:
    """One subscriber: the handshake, the records from its offset, then wait for its EOF."""
    handshake = memoryview(bytearray(HANDSHAKE.size))
    try:
        if not await trio_recv_exactly(stream.socket, handshake):
            return
        start = HANDSHAKE.unpack(handshake)[3] * record_size
        for batch_start in range(start - start % batch_bytes, len(topic), batch_bytes):
            await stream.send_all(topic[max(start, batch_start) : batch_start + batch_bytes])
        # A subscription stays open after the last record, as the broker's does.
        while await stream.receive_some(1 << 16):
            pass
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


# -- raw sink ----------------------------------------------------------------------


def _serve_raw_connection(sock: socket.socket) -> None:
    handshake, header, buffer = _new_buffers()
    view = memoryview(buffer)
    count = 0
    with sock:
        try:
            if not recv_exactly(sock, handshake):
                return
            ack = HANDSHAKE.unpack(handshake)[1]
            if ack:
                sock.sendall(ACK_BROKER_ID.pack(0))
            while recv_exactly(sock, header):
                num_msg, total = _batch_size(header)
                if total > len(buffer):
                    buffer = bytearray(total)
                    view = memoryview(buffer)
                recv_exactly(sock, view[:total])
                count += num_msg
                if ack:
                    sock.sendall(ACK_COUNT.pack(count))
        except OSError:
            pass


class _Stop(Exception):
    pass


def _raise_stop(_signum: int, _frame: FrameType | None) -> None:
    raise _Stop


def _run_raw_sink(host: str, port: int) -> None:
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    listener = socket.create_server((host, port), backlog=128)
    bound = listener.getsockname()
    print(f"listening on {bound[0]}:{bound[1]}", flush=True)
    try:
        while True:
            sock, _ = listener.accept()
            # Daemon threads: a stop signal ends the process without joining them.
            threading.Thread(target=_serve_raw_connection, args=(sock,), daemon=True).start()
    except _Stop:
        pass
    finally:
        listener.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Run one sink until SIGINT/SIGTERM; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m trio_embarcadero.tools.sink",
        description="Minimal receivers of the publish protocol (benchmark baselines).",
    )
    parser.add_argument("kind", choices=("trio", "raw", "read"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    read = parser.add_argument_group("read (the read path's sender)")
    read.add_argument("--batches", type=int, default=1, help="batches the topic holds")
    read.add_argument("--batch-messages", type=int, default=DEFAULT_BATCH_MESSAGES)
    read.add_argument("--message-size", type=int, default=DEFAULT_MESSAGE_SIZE)
    read.add_argument("--dir", default="/dev/shm", help="where its file goes (default: /dev/shm)")
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    if args.kind == "trio":
        trio.run(_serve_until_signalled, _serve_trio_connection, args.host, args.port)
    elif args.kind == "read":
        if min(args.batches, args.batch_messages, args.message_size) < 1:
            parser.error("--batches, --batch-messages and --message-size must be >= 1")
        topic = build_topic(args.dir, args.batches, args.batch_messages, args.message_size)
        record_size = padded_size(args.message_size)
        handler = functools.partial(
            _serve_topic, memoryview(topic), args.batch_messages * record_size, record_size
        )
        trio.run(_serve_until_signalled, handler, args.host, args.port)
    else:
        _run_raw_sink(args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
