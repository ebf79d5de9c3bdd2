"""Loopback TCP plumbing for tests that talk to a real broker, built on ``rawclient``.

Like ``rawclient`` it uses ``struct`` and ``rawclient``'s frames only, never the
package's wire or client code:

* :func:`connect`, :func:`connections`, :func:`recv_exactly`: connections, and
  exact reads from them.
* :func:`recv_broker_id`, :func:`recv_ack_item`: an ack stream read item by item
  (the ``<i`` broker id, then ``<Q`` cumulative counts or an error frame).
* :func:`error_frame`: the one error frame that makes up all of some bytes.
* :func:`send_and_read`, :func:`exchange`, :func:`publish`: send bytes (a
  handshake and batches) while reading everything the broker writes back.
* :func:`subscribe_bytes`: an exact number of bytes of a topic's record stream.
* :func:`ack_listener`, :func:`closed_port`: a port the broker dials back to
  with acks, or one where nobody listens.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager

import trio
from rawclient import ERROR_MARKER, handshake, read_all

HOST = "127.0.0.1"
ERROR_HEAD = struct.Struct("<QII")


async def connect(port: int, *, local_host: str | None = None) -> trio.SocketStream:
    """A loopback connection to ``port``, from ``local_host`` if given (any of 127/8)."""
    return await trio.open_tcp_stream(HOST, port, local_address=local_host)


@asynccontextmanager
async def connections(port: int, count: int) -> AsyncIterator[list[trio.SocketStream]]:
    """``count`` loopback connections to ``port``, all closed on the way out."""
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(await connect(port)) for _ in range(count)]


async def recv_exactly(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = await stream.receive_some(n - len(data))
        assert chunk, f"EOF after {len(data)} of {n} bytes"
        data += chunk
    return bytes(data)


async def recv_broker_id(stream: trio.abc.ReceiveStream) -> int:
    (broker_id,) = struct.unpack("<i", await recv_exactly(stream, 4))
    return int(broker_id)


async def recv_ack_item(stream: trio.abc.ReceiveStream) -> int | tuple[int, str]:
    """One item of an ack stream after the broker id: a count or an error frame."""
    (value,) = struct.unpack("<Q", await recv_exactly(stream, 8))
    if value != ERROR_MARKER:
        return int(value)
    code, length = struct.unpack("<II", await recv_exactly(stream, 8))
    return code, (await recv_exactly(stream, length)).decode()


def error_frame(data: bytes) -> tuple[int, str]:
    """The error frame that makes up all of ``data``."""
    assert len(data) >= 16, f"no error frame: {data!r}"
    marker, code, length = ERROR_HEAD.unpack_from(data)
    assert marker == ERROR_MARKER
    assert len(data) == 16 + length, "bytes after the error frame"
    return code, data[16:].decode()


async def send_and_read(
    stream: trio.abc.HalfCloseableStream, *pieces: bytes, eof: bool = False, reset_ok: bool = True
) -> bytes:
    """Send ``pieces`` (then EOF) on ``stream``, return all the broker writes until it closes.

    Sending runs beside the reading, so acks never block the sends. A reset
    while sending is tolerated unless ``reset_ok`` is false: a broker may close
    a connection without reading what it was sent.
    """

    async def send() -> None:
        try:
            for piece in pieces:
                await stream.send_all(piece)
            if eof:
                await stream.send_eof()
        except trio.BrokenResourceError:
            if not reset_ok:
                raise

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        return await read_all(stream)


async def exchange(port: int, *pieces: bytes, eof: bool = False, reset_ok: bool = True) -> bytes:
    """Open a connection, send ``pieces`` (then EOF), return all the broker writes.

    As :func:`send_and_read`, on a connection of its own.
    """
    async with await connect(port) as stream:
        return await send_and_read(stream, *pieces, eof=eof, reset_ok=reset_ok)


async def publish(
    port: int,
    topic: str,
    frames: Sequence[bytes],
    *,
    client_id: int,
    ack: int = 1,
    ack_port: int = 0,
    refused: bool = False,
) -> bytes:
    """Send a handshake and ``frames``, half-close, return everything the broker wrote.

    With ``refused``, a reset while sending is expected: the broker closes a
    connection it refuses without reading the rest of what was sent.
    """
    hello = handshake(topic, client_id=client_id, ack=ack, port=ack_port)
    return await exchange(port, hello, *frames, eof=True, reset_ok=refused)


async def subscribe_bytes(port: int, topic: str, nbytes: int, *, last_addr: int = 0) -> bytes:
    """Read exactly ``nbytes`` of a topic's record stream over a subscribe connection."""
    async with await connect(port) as stream:
        await stream.send_all(handshake(topic, client_id=99, ack=0, req=1, last_addr=last_addr))
        return await recv_exactly(stream, nbytes)


@asynccontextmanager
async def ack_listener(host: str = HOST) -> AsyncIterator[tuple[trio.SocketListener, int]]:
    """A loopback listener for dial-back ack connections and its port; closed on the way out."""
    (listener,) = await trio.open_tcp_listeners(0, host=host)
    async with listener:
        yield listener, listener.socket.getsockname()[1]


async def closed_port() -> int:
    """A loopback port that was listened on a moment ago and is closed now."""
    async with ack_listener() as (_, port):
        return port
