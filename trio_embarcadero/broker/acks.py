"""Ack counts and the two ways they travel back to a publisher.

An :class:`AckCounter` holds the cumulative number of a publisher's messages
that reached the ack level; commits advance it. An ack sender task turns its
growth into ``<Q`` counts on a stream, coalescing: a publisher that falls
behind gets the latest count, never a backlog.

* Same-connection mode (handshake ``port == 0``): the counter belongs to the
  publish connection and the counts go back on it.
* Dial-back mode: one counter and one outbound connection per
  (client id, topic), shared by every publish connection of that client; the
  :class:`DialBackRegistry` owns them. Error frames never travel there (the
  C++ client would read one as a huge count).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import attrs
import trio

from ..errors import ConnectionLost
from ..wire import encode_ack, encode_ack_start

logger = logging.getLogger(__name__)


class AckCounter:
    """A cumulative count that ack senders wait on.

    Attributes:
        count: Messages that reached the ack level so far.
        sent: The last count an ack sender wrote.
    """

    def __init__(self) -> None:
        self.count = 0
        self.sent = 0
        self._closed = False
        self._lot = trio.lowlevel.ParkingLot()

    @property
    def closed(self) -> bool:
        return self._closed

    def advance(self, messages: int) -> None:
        """Add ``messages`` newly acked messages."""
        self.count += messages
        self._lot.unpark_all()

    def close(self) -> None:
        """No more advances; senders flush the final count and stop."""
        self._closed = True
        self._lot.unpark_all()

    async def wait_news(self) -> bool:
        """Wait until there is a count to send; False once closed and flushed."""
        while self.count == self.sent:
            if self._closed:
                await trio.lowlevel.checkpoint()
                return False
            await self._lot.park()
        await trio.lowlevel.checkpoint()
        return True


SendAll = Callable[[bytes], Awaitable[None]]


async def run_ack_sender(
    counter: AckCounter,
    send_all: SendAll,
    broker_id: int,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Write the ack stream: the broker id, then every growth of ``counter``.

    Returns once the counter is closed and its final count is written.

    Raises:
        ConnectionLost: The stream broke (the caller decides what that means).
    """
    await send_all(encode_ack_start(broker_id))
    task_status.started()
    while await counter.wait_news():
        counter.sent = counter.count
        await send_all(encode_ack(counter.sent))


@attrs.define
class _DialBack:
    counter: AckCounter
    port: int
    users: int = 0
    ready: trio.Event = attrs.Factory(trio.Event)
    failure: str | None = None


@attrs.frozen
class DialBackStatistics:
    """Counters of the dial-back ack connections."""

    active: int
    dialed: int
    failed: int


class DialBackRegistry:
    """One outbound ack connection per (client id, topic), shared by all of
    that client's publish connections to this broker.

    Args:
        nursery: Where the ack connection tasks run (outlives connections).
        broker_id: Written first on every ack stream.
        connect_timeout: Seconds allowed to dial the client.
    """

    def __init__(self, nursery: trio.Nursery, broker_id: int, connect_timeout: float) -> None:
        self._nursery = nursery
        self._broker_id = broker_id
        self._timeout = connect_timeout
        self._entries: dict[tuple[int, str], _DialBack] = {}
        self._dialed = 0
        self._failed = 0

    async def attach(self, client_id: int, topic: str, host: str, port: int) -> AckCounter:
        """Join (or open) the ack connection of ``(client_id, topic)``.

        Every successful call must be paired with :meth:`detach`.

        Raises:
            ConnectionLost: The client's ack port could not be reached.
        """
        key = (client_id, topic)
        entry = self._entries.get(key)
        if entry is None:
            # The first user dials; the ack task then lives in the registry's
            # nursery, outliving this connection while others still use it.
            entry = _DialBack(AckCounter(), port)
            self._entries[key] = entry
            entry.users += 1
            try:
                await self._nursery.start(self._run, key, entry, host)
            except BaseException:
                self._release(key, entry)
                raise
            return entry.counter
        if entry.port != port:
            logger.warning(
                "client %d topic %r asked for acks on port %d; its ack connection uses port %d",
                client_id,
                topic,
                port,
                entry.port,
            )
        entry.users += 1
        await entry.ready.wait()
        if entry.failure is not None:
            self._release(key, entry)
            raise ConnectionLost(entry.failure)
        return entry.counter

    def detach(self, client_id: int, topic: str) -> None:
        """Leave the ack connection; the last user's leave flushes and closes it."""
        key = (client_id, topic)
        entry = self._entries.get(key)
        if entry is not None:
            self._release(key, entry)

    def _release(self, key: tuple[int, str], entry: _DialBack) -> None:
        entry.users -= 1
        if entry.users == 0:
            entry.counter.close()
            if self._entries.get(key) is entry:
                del self._entries[key]

    async def _run(
        self,
        key: tuple[int, str],
        entry: _DialBack,
        host: str,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        client_id, topic = key
        try:
            with trio.fail_after(self._timeout):
                stream = await trio.open_tcp_stream(host, entry.port)
        except (OSError, trio.TooSlowError) as exc:
            self._failed += 1
            entry.failure = f"cannot open the ack connection to {host}:{entry.port}: {exc!r}"
            logger.warning("client %d topic %r: %s", client_id, topic, entry.failure)
            entry.ready.set()
            raise ConnectionLost(entry.failure) from exc
        self._dialed += 1
        entry.ready.set()
        task_status.started()
        async with stream:

            async def send_all(data: bytes) -> None:
                try:
                    await stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    raise ConnectionLost(f"ack connection lost: {exc!r}") from exc

            try:
                await run_ack_sender(entry.counter, send_all, self._broker_id)
            except ConnectionLost as exc:
                logger.info("client %d topic %r: %s", client_id, topic, exc)
            if self._entries.get(key) is entry:  # the peer went away first
                del self._entries[key]

    def statistics(self) -> DialBackStatistics:
        return DialBackStatistics(
            active=len(self._entries), dialed=self._dialed, failed=self._failed
        )
