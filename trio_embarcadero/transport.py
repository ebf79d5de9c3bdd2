"""Receiving into buffers we own, and sending, with errors translated once.

Trio's ``Stream`` interface has no ``receive_into``; ``receive_some`` returns a
fresh bytes object per call, which then has to be copied into the staging
buffer or the log. On a socket we call ``recv_into`` on the trio socket
directly, so payload bytes land in their buffer with no intermediate copy;
any other stream (memory streams in tests, TLS one day) falls back to
``receive_some`` plus one copy. Both raise :class:`ConnectionLost` and nothing
else on failure: this module is the I/O boundary.
"""

from __future__ import annotations

from typing import Protocol

import trio

from .errors import ConnectionLost


class Receiver(Protocol):
    """Something that fills a caller's buffer from a byte stream."""

    async def receive_into(self, view: memoryview) -> int:
        """Receive at most ``len(view)`` bytes into ``view``; 0 means EOF."""
        ...


class SocketReceiver:
    """``recv_into`` straight from a trio socket."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self._sock = sock

    async def receive_into(self, view: memoryview) -> int:
        try:
            return await self._sock.recv_into(view)
        except OSError as exc:
            raise ConnectionLost(f"receive failed: {exc}") from exc


class StreamReceiver:
    """``receive_some`` plus a copy, for streams that are not sockets."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream

    async def receive_into(self, view: memoryview) -> int:
        try:
            data = await self._stream.receive_some(len(view))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ConnectionLost(f"receive failed: {exc!r}") from exc
        view[: len(data)] = data
        return len(data)


def receiver_for(stream: trio.abc.ReceiveStream) -> Receiver:
    """The fastest receiver that works for ``stream``."""
    if isinstance(stream, trio.SocketStream):
        return SocketReceiver(stream.socket)
    return StreamReceiver(stream)


async def receive_exactly(receiver: Receiver, view: memoryview) -> None:
    """Fill ``view`` completely.

    Raises:
        ConnectionLost: EOF or a broken stream first; ``received`` says how
            many bytes of ``view`` had arrived.
    """
    got = 0
    want = len(view)
    while got < want:
        n = await receiver.receive_into(view[got:])
        if n == 0:
            raise ConnectionLost(f"peer closed after {got} of {want} bytes", received=got)
        got += n


class Sender:
    """Serialises writes of whole frames to one stream.

    The ack sender and the error path of a connection both write to it; a
    trio stream allows one ``send_all`` at a time, and a frame must never be
    interleaved with another.
    """

    def __init__(self, stream: trio.abc.SendStream) -> None:
        self._stream = stream
        self._lock = trio.Lock()

    async def send_all(self, data: bytes | memoryview) -> None:
        """Write ``data`` whole.

        Raises:
            ConnectionLost: The stream broke or was closed.
        """
        async with self._lock:
            try:
                await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise ConnectionLost(f"send failed: {exc!r}") from exc
