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

import contextlib
import os
from typing import Protocol

import trio

from .errors import ConnectionLost


class Receiver(Protocol):
    """Something that fills a caller's buffer from a byte stream."""

    async def receive_into(self, view: memoryview, *, wait_first: bool = False) -> int:
        """Receive at most ``len(view)`` bytes into ``view``; 0 means EOF.

        ``wait_first``: the caller has just found nothing waiting (with
        :meth:`receive_into_nowait`), so the receive may wait before it
        tries to read.
        """
        ...

    def receive_into_nowait(self, view: memoryview) -> int | None:
        """Take what has arrived already into ``view``, without waiting and
        without a checkpoint: None when nothing has (or when this stream
        cannot tell without waiting); 0 means EOF."""
        ...


class SocketReceiver:
    """``recv_into`` straight from a trio socket.

    :meth:`receive_into_nowait` reads the (non-blocking) socket directly:
    Trio's own ``recv_into`` passes through the scheduler after every call,
    even one that found its bytes waiting, and a batch takes two or three of
    them. The broker's receive loop checkpoints once per batch instead.
    """

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self._sock = sock
        self._fd = sock.fileno()

    async def receive_into(self, view: memoryview, *, wait_first: bool = False) -> int:
        # Trio's recv_into, but one pass through the scheduler where it takes
        # two: after waiting for the socket it reads and then checkpoints
        # again, a second pass for every wait of an idle connection. Here the
        # wait is the checkpoint, and the read follows it with no checkpoint
        # between, so a cancelled wait still consumes no bytes.
        if not wait_first:  # else a read now would fail as the caller's just did
            await trio.lowlevel.checkpoint_if_cancelled()
            got = self.receive_into_nowait(view)
            if got is not None:
                await trio.lowlevel.cancel_shielded_checkpoint()
                return got
        while True:
            await trio.lowlevel.wait_readable(self._sock)
            got = self.receive_into_nowait(view)
            if got is not None:
                return got

    def receive_into_nowait(self, view: memoryview) -> int | None:
        try:
            # read(2) on a socket is recv(2) without flags.
            return os.readv(self._fd, [view])
        except BlockingIOError:
            return None
        except OSError as exc:
            raise ConnectionLost(f"receive failed: {exc}") from exc


class StreamReceiver:
    """``receive_some`` plus a copy, for streams that are not sockets."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream

    async def receive_into(self, view: memoryview, *, wait_first: bool = False) -> int:
        try:
            data = await self._stream.receive_some(len(view))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ConnectionLost(f"receive failed: {exc!r}") from exc
        view[: len(data)] = data
        return len(data)

    def receive_into_nowait(self, view: memoryview) -> int | None:
        return None  # a stream's buffered bytes are reached only by waiting


_RMEM_MAX = "/proc/sys/net/core/rmem_max"


def receive_buffer_cap() -> int | None:
    """``net.core.rmem_max``: the most ``SO_RCVBUF`` may ask for (None: unknown)."""
    try:
        with open(_RMEM_MAX) as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def set_receive_buffer(stream: trio.abc.Stream, size: int) -> None:
    """Give an IP socket stream a receive buffer of ``size`` bytes
    (``SO_RCVBUF``, which ends the kernel's autotuning of it); other streams
    have none to set."""
    if isinstance(stream, trio.SocketStream) and is_ip_socket(stream.socket):
        # A connection reset meanwhile fails here: its first read says so.
        with contextlib.suppress(OSError):
            stream.socket.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, size)


def is_ip_socket(sock: trio.socket.SocketType) -> bool:
    """Whether ``sock`` is an IPv4 or IPv6 socket: only those have a peer
    address (a Unix socket an embedding application hands over has none)."""
    return sock.family in (trio.socket.AF_INET, trio.socket.AF_INET6)


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
        self._fd = stream.socket.fileno() if isinstance(stream, trio.SocketStream) else -1
        # The rest of a frame :meth:`send_nowait` could write only in part;
        # the next :meth:`send_all` writes it first.
        self._rest = b""

    async def send_all(self, data: bytes | memoryview) -> None:
        """Write ``data`` whole.

        Raises:
            ConnectionLost: The stream broke or was closed.
        """
        async with self._lock:
            try:
                if self._rest:
                    rest, self._rest = self._rest, b""
                    await self._stream.send_all(rest)
                await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise ConnectionLost(f"send failed: {exc!r}") from exc

    def send_nowait(self, data: bytes) -> bool:
        """Write the small frame ``data`` now, without waiting and without a
        checkpoint, if the socket takes it whole and no :meth:`send_all` is
        under way; False if it did not (then a :meth:`send_all` has to follow:
        it writes whatever part of ``data`` went out only in part first, and
        reports a broken stream)."""
        if self._fd < 0 or self._rest or self._lock.locked():
            return False
        try:
            sent = os.write(self._fd, data)
        except OSError:  # full (BlockingIOError), or broken: send_all tells
            return False
        if sent < len(data):
            self._rest = data[sent:]
            return False
        return True
