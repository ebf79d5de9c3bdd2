"""What the bench's client processes share: the load generator and the reader.

Both are one process with a blocking socket and a thread (or two) per
connection, watched by the main thread, which prints a JSON ``progress``
line every ``--interval`` seconds and one ``result`` line at the end. This
module holds those common steps: opening the connections, the watch loop
(with its way out when the other side is stuck), the JSON lines, the
process's CPU time and the ``main`` wrapper.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar


class ClientFailure(Exception):
    """The run cannot go on (say, a refused handshake); the message says why."""


class Connection(Protocol):
    """What the watch loop needs of a connection."""

    sock: socket.socket
    error: str | None


class Client(Protocol):
    """What :func:`main` needs of a client process's run."""

    def run(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


_C = TypeVar("_C", bound=Connection)


def open_connections(count: int, make: Callable[[int], _C]) -> list[_C]:
    """``make(0)`` ... ``make(count - 1)``; if one fails, the sockets made so far are closed.

    Raises:
        OSError: A connection could not be made.
    """
    made: list[_C] = []
    try:
        # A loop, not a comprehension: what was made before a failure must be closed.
        for i in range(count):
            made.append(make(i))  # noqa: PERF401
    except BaseException:
        close_all(made)
        raise
    return made


def close_all(connections: Sequence[Connection]) -> None:
    """Close every connection's socket."""
    for conn in connections:
        conn.sock.close()


def watch(
    threads: Sequence[threading.Thread],
    connections: Sequence[Connection],
    *,
    t0: float,
    interval: float,
    give_up_at: float,
    stuck: str,
    on_tick: Callable[[float], None],
    stop: threading.Event | None = None,
) -> None:
    """Wait for ``threads``, calling ``on_tick(seconds since t0)`` every ``interval``.

    Past ``give_up_at`` the other side is taken to be stuck: ``stop`` is set,
    and every connection gets the error ``stuck`` and its socket shut down,
    which ends any thread blocked on it.
    """
    next_tick = t0 + interval
    while alive := [t for t in threads if t.is_alive()]:
        alive[0].join(timeout=max(0.0, next_tick - time.perf_counter()))
        now = time.perf_counter()
        if now >= next_tick:
            on_tick(now - t0)
            next_tick += interval
            if now > give_up_at:
                if stop is not None:
                    stop.set()
                for conn in connections:
                    conn.error = conn.error or stuck
                    with contextlib.suppress(OSError):
                        conn.sock.shutdown(socket.SHUT_RDWR)
    for thread in threads:
        thread.join(timeout=5)


def emit(record: dict[str, Any]) -> None:
    """Print ``record`` as one JSON line on stdout, at once."""
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def cpu_seconds() -> float:
    """This process's CPU time so far (user + system), seconds."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(name: str, args: argparse.Namespace, make: Callable[[argparse.Namespace], Client]) -> int:
    """Connect with ``make(args)``, run, print the result line; returns the
    exit status (0 when the result is ok, 1 otherwise)."""
    try:
        client = make(args)
    except OSError as exc:
        print(f"{name}: cannot connect to {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    try:
        result = client.run()
    except (ClientFailure, OSError) as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    # Where it could run (the bench's --pin checks it held).
    result["cpus"] = sorted(os.sched_getaffinity(0))
    emit(result)
    return 0 if result["ok"] else 1
