"""What the tools' raw protocol endpoints share.

The load generator, the baseline sinks and the no-loss checker speak the wire
protocol on plain sockets rather than through :mod:`trio_embarcadero.client`:
they must control every byte (a batch resent as is, a connection dropped in
the middle of one) or cost nothing beyond the receive itself. The layouts
come from :mod:`trio_embarcadero.wire`; this module holds the few steps they
all take: the publish and subscribe handshakes and receiving an exact number
of bytes, on a blocking socket and on a Trio socket.

The broker's own exact receive is :func:`trio_embarcadero.transport.receive_exactly`
(any Trio stream, errors as ``ConnectionLost``); the Trio one here calls
``recv_into`` on the socket itself, so that the baseline sink pays for nothing
the broker's receive path might add.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

from ..wire import ClientRequest, Handshake

if TYPE_CHECKING:
    import trio


def publish_handshake(client_id: int, ack: int, topic: str, session_token: int = 0) -> bytes:
    """The 64-byte handshake that opens a publish connection (acks on it, if any).

    Args:
        client_id: The publisher's id.
        ack: Ack level, 0 to 2.
        topic: The topic to publish to.
        session_token: Non-zero: publish in a session with this token
            (``client_req = 2``, the wire protocol's section 4.5).
    """
    if session_token:
        return _handshake(
            ClientRequest.PUBLISH_SESSION,
            topic,
            client_id=client_id,
            ack=ack,
            last_addr=session_token,
        )
    return _handshake(ClientRequest.PUBLISH, topic, client_id=client_id, ack=ack)


def subscribe_handshake(topic: str, offset: int = 0) -> bytes:
    """The 64-byte handshake that opens a subscribe connection.

    Args:
        topic: The topic to read.
        offset: The logical offset of the first message wanted (``last_addr``).
    """
    return _handshake(ClientRequest.SUBSCRIBE, topic, last_addr=offset)


def _handshake(
    request: ClientRequest, topic: str, *, client_id: int = 0, ack: int = 0, last_addr: int = 0
) -> bytes:
    return Handshake(
        client_id=client_id,
        ack=ack,
        num_msg=0,
        last_addr=last_addr,
        port=0,
        request=request,
        topic=topic,
    ).encode()


def recv_exactly(sock: socket.socket, view: memoryview) -> bool:
    """Fill ``view`` from a blocking socket.

    ``MSG_WAITALL`` lets the kernel fill the whole view in one call whenever it
    can, which is what makes the raw sink the best receiver Python can be.

    Returns:
        True once ``view`` is full; False if the peer closed before its first byte.

    Raises:
        ConnectionResetError: The peer closed part way through ``view``.
        OSError: The receive failed.
    """
    got = 0
    want = len(view)
    while got < want:
        n = sock.recv_into(view[got:], want - got, socket.MSG_WAITALL)
        if n == 0:
            return _closed(got, want)
        got += n
    return True


async def trio_recv_exactly(sock: trio.socket.SocketType, view: memoryview) -> bool:
    """Fill ``view`` from a Trio socket; the same contract as :func:`recv_exactly`."""
    got = 0
    want = len(view)
    while got < want:
        n = await sock.recv_into(view[got:])
        if n == 0:
            return _closed(got, want)
        got += n
    return True


def _closed(got: int, want: int) -> bool:
    """The peer closed after ``got`` of ``want`` bytes: False at a boundary, else raise."""
    if got == 0:
        return False
    raise ConnectionResetError(f"peer closed after {got} of {want} bytes")
