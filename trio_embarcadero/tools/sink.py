"""Baseline receivers for ``trio-embarcadero bench``: the machine's limit.

Each sink speaks the publish side of the wire protocol and nothing else: it
reads the 64-byte handshake, answers ``<i`` broker id 0 when the ack level is
1 or more, then reads ``[128-B batch header][total_size payload bytes]``
repeatedly into one reused buffer and, with acks on, writes the ``<Q``
cumulative message count after every batch. No validation, no log, no copy:
whatever the broker does beyond this is overhead the benchmark shows as a
ratio to these numbers.

Two kinds, each run as its own process::

    python -m trio_embarcadero.tools.sink trio --port 0   # Trio, stream.socket.recv_into
    python -m trio_embarcadero.tools.sink raw --port 0    # blocking sockets, MSG_WAITALL, threads

``trio`` is the fair baseline (the same event loop and receive call the broker
uses); ``raw`` is the best a Python process can do on this machine. Both
print ``listening on HOST:PORT`` on stdout once bound and serve until SIGINT
or SIGTERM, then exit 0.
"""

from __future__ import annotations

import argparse
import functools
import signal
import socket
import sys
import threading
from collections.abc import Sequence
from types import FrameType

import trio

from ..wire import ACK_BROKER_ID, ACK_COUNT, BATCH_HEADER, HANDSHAKE
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


async def _run_trio_sink(host: str, port: int) -> None:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, _serve_trio_connection, port, host=host)
        )
        bound = listeners[0].socket.getsockname()
        print(f"listening on {bound[0]}:{bound[1]}", flush=True)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


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
    parser.add_argument("kind", choices=("trio", "raw"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    if args.kind == "trio":
        trio.run(_run_trio_sink, args.host, args.port)
    else:
        _run_raw_sink(args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
