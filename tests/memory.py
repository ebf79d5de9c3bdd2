"""In-memory transport for broker tests: no sockets, so the mock clock is safe.

* :class:`MemoryListener` is a ``trio.abc.Listener``: :meth:`MemoryListener.connect`
  makes a ``memory_stream_pair()`` (or, for a peer that never reads, a
  ``lockstep_stream_pair()``), queues the server end for ``accept()`` (the
  broker's real ``serve_listeners`` loop) and returns the client end.
* Every server end is wrapped in a :class:`CountingStream`, so a test can see
  exactly how many bytes the broker has read from a connection and whether it
  is blocked in a receive (a paused connection reads nothing).
* :class:`MemoryClient` is the client end plus a background reader that keeps
  every chunk the broker sent with the virtual time it arrived at.
"""

from __future__ import annotations

import gc
import math
import mmap
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import attrs
import trio
import trio.testing
from rawclient import BATCH_HEADER, parse_ack_stream

from trio_embarcadero import open_broker
from trio_embarcadero.broker import Broker
from trio_embarcadero.config import Config
from trio_embarcadero.log import CxlLog
from trio_embarcadero.log.layout import iter_batches, read_geometry
from trio_embarcadero.wire import BatchHeader

ClientStream = trio.StapledStream[trio.testing.MemorySendStream, trio.testing.MemoryReceiveStream]
LockstepStream = trio.StapledStream[trio.abc.SendStream, trio.abc.ReceiveStream]


class CountingStream(trio.abc.HalfCloseableStream):
    """A server end that counts what the broker reads from it.

    Attributes:
        bytes_received: Bytes handed to the broker so far.
        receiving: Whether a ``receive_some`` call is in progress.
        asked: The ``max_bytes`` of every ``receive_some`` call, in order.
    """

    def __init__(self, inner: ClientStream | LockstepStream) -> None:
        self.inner = inner
        self.bytes_received = 0
        self.receiving = False
        self.asked: list[int | None] = []

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        self.asked.append(max_bytes)
        self.receiving = True
        try:
            data = await self.inner.receive_some(max_bytes)
        finally:
            self.receiving = False
        self.bytes_received += len(data)
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


@attrs.define(eq=False)
class MemoryListener(trio.abc.Listener[trio.abc.Stream]):
    """A listener whose connections are in-memory stream pairs.

    Attributes:
        accepted: The server end of every connection made, in order.
    """

    _queue: tuple[
        trio.MemorySendChannel[CountingStream], trio.MemoryReceiveChannel[CountingStream]
    ] = attrs.Factory(lambda: trio.open_memory_channel[CountingStream](math.inf))
    accepted: list[CountingStream] = attrs.Factory(list)
    closed: bool = False

    async def connect(self) -> ClientStream:
        """Open a connection; returns the client end."""
        client, server = trio.testing.memory_stream_pair()
        await self._enqueue(server)
        return client

    async def connect_lockstep(self) -> LockstepStream:
        """Open a connection without buffering: every send waits for the other
        side to receive it, so a client that never reads blocks the broker's
        sends for good (a TCP peer whose window stays shut)."""
        client, server = trio.testing.lockstep_stream_pair()
        await self._enqueue(server)
        return client

    async def _enqueue(self, server: ClientStream | LockstepStream) -> None:
        counting = CountingStream(server)
        self.accepted.append(counting)
        await self._queue[0].send(counting)

    async def accept(self) -> trio.abc.Stream:
        if self.closed:
            raise trio.ClosedResourceError
        return await self._queue[1].receive()

    async def aclose(self) -> None:
        self.closed = True
        await trio.lowlevel.checkpoint()


@attrs.define(eq=False)
class MemoryClient:
    """A client end and everything the broker sent on it, with arrival times.

    Attributes:
        stream: The client end of the memory stream pair.
        server: The broker's end (counts what the broker read).
        chunks: ``(virtual time, bytes)`` of every chunk received.
        eof_at: Virtual time of the broker's close, None while open.
    """

    stream: ClientStream
    server: CountingStream
    chunks: list[tuple[float, bytes]] = attrs.Factory(list)
    eof_at: float | None = None

    @property
    def data(self) -> bytes:
        return b"".join(chunk for _, chunk in self.chunks)

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def close(self) -> None:
        """Half-close: the broker sees EOF and can still answer."""
        await self.stream.send_eof()

    async def read_until_eof(self) -> None:
        async for chunk in self.stream:
            self.chunks.append((trio.current_time(), bytes(chunk)))
        self.eof_at = trio.current_time()

    def acks(
        self, *, with_broker_id: bool = True
    ) -> tuple[int | None, list[int], tuple[int, str] | None]:
        """Parse everything received as an ack stream (broker id, counts, error)."""
        return parse_ack_stream(self.data, with_broker_id=with_broker_id)

    def arrival_of(self, offset: int) -> float:
        """Virtual time at which byte ``offset`` of the stream arrived."""
        seen = 0
        for at, chunk in self.chunks:
            seen += len(chunk)
            if offset < seen:
                return at
        raise AssertionError(f"byte {offset} never arrived ({seen} received)")


async def open_client(listener: MemoryListener, nursery: trio.Nursery) -> MemoryClient:
    """Connect and start reading the broker's answers in ``nursery``."""
    stream = await listener.connect()
    client = MemoryClient(stream, listener.accepted[-1])
    nursery.start_soon(client.read_until_eof)
    return client


@asynccontextmanager
async def memory_broker(config: Config) -> AsyncIterator[tuple[Broker, MemoryListener]]:
    """A broker that accepts only in-memory connections."""
    listener = MemoryListener()
    async with open_broker(config, listeners=[listener]) as broker:
        yield broker, listener
    # Whatever a test's clients did, the broker must not have failed internally.
    assert broker.counters.internal_errors == 0


async def settle() -> None:
    """Let every task run until all are blocked, at the current virtual instant."""
    await trio.testing.wait_all_tasks_blocked()


def next_deadline() -> float:
    """Seconds from now to the earliest pending timer."""
    return trio.lowlevel.current_statistics().seconds_to_next_deadline


def header(
    total_size: int, num_msg: int = 1, *, batch_seq: int = 0, client_id: int = 1
) -> BatchHeader:
    return BatchHeader(
        batch_seq=batch_seq, client_id=client_id, num_msg=num_msg, total_size=total_size
    )


def raw_header(seq: int, client_id: int, num_msg: int, total_size: int) -> bytes:
    return BATCH_HEADER.pack(seq, client_id, num_msg, 0, 0, 0, 0, total_size, 0, 0, 0, 0)


@contextmanager
def read_only_region(path: str) -> Iterator[mmap.mmap]:
    """A second, read-only mapping of a CXL file, as another process would have."""
    fd = os.open(path, os.O_RDONLY)
    try:
        with mmap.mmap(fd, 0, prot=mmap.PROT_READ) as region:
            yield region
    finally:
        os.close(fd)


def walk_file(path: str, topic_index: int = 0, broker_id: int = 0) -> list[BatchHeader]:
    """Every batch header of a stream, read from the file (committed or not)."""
    with read_only_region(path) as region:
        geometry = read_geometry(region)
        return [h for _, h in iter_batches(region, geometry, topic_index, broker_id)]


def open_small_log(path: str, **overrides: object) -> CxlLog:
    """A CXL log of eight 64 KiB segments, four topics, two brokers."""
    params: dict[str, object] = {
        "size": 8192 + 8 * 65536,
        "segment_size": 65536,
        "max_topics": 4,
        "max_brokers": 2,
        "broker_id": 0,
        "max_inflight_batches": 16,
        "prefault": False,
    }
    params.update(overrides)
    return CxlLog.open(path, **params)  # type: ignore[arg-type]


def lose_lock(log: CxlLog) -> None:
    """Release ``log``'s broker lock as its process dying would, leaving it open,
    so another handle in this process can re-attach as the next broker."""
    owner = log._owner
    assert owner is not None
    owner.close()
    log._owner = None


def close_log(log: CxlLog) -> None:
    """Close a log once nothing a test held still views its mapping."""
    gc.collect()
    log.close()
