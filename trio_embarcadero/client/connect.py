"""What publishers and subscribers both do to start: a client id, a TCP
connection and the handshake, with failures translated to ConnectionLost."""

from __future__ import annotations

import random

import trio

from ..errors import ConnectionLost
from ..wire import Handshake


def random_client_id() -> int:
    """A client id in ``[32, 999999]``, from the OS's random source.

    Seeding :mod:`random` in an application does not make two publishers of
    it pick the same id.
    """
    return random.SystemRandom().randint(32, 999_999)


def choose_client_id(client_id: int | None) -> int:
    """``client_id``, checked, or a random one for None.

    Raises:
        ValueError: It does not fit the handshake's 32-bit field.
    """
    if client_id is None:
        return random_client_id()
    if not 0 <= client_id < 2**32:
        raise ValueError(f"client_id must fit in 32 bits, not {client_id}")
    return client_id


async def connect(host: str, port: int) -> trio.SocketStream:
    """Open a TCP connection to a broker.

    Raises:
        ConnectionLost: The broker cannot be reached.
    """
    try:
        return await trio.open_tcp_stream(host, port)
    except OSError as exc:
        raise ConnectionLost(f"cannot connect to a broker at {host}:{port}: {exc}") from exc


async def send_handshake(stream: trio.abc.Stream, handshake: Handshake) -> None:
    """Write the handshake that opens every connection.

    Raises:
        ConnectionLost: The stream broke or was closed.
    """
    try:
        await stream.send_all(handshake.encode())
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise ConnectionLost(f"cannot send the handshake: {exc!r}") from exc
