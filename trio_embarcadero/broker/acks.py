"""Ack counts and the two ways they travel back to a publisher.

An :class:`AckCounter` holds the cumulative number of a publisher's messages
that reached the ack level; commits advance it. An ack sender task turns its
growth into ``<Q`` counts on a stream, coalescing: a publisher that falls
behind gets the latest count, never a backlog.

* Same-connection mode (handshake ``port == 0``): the counter belongs to the
  publish connection and the counts go back on it.
* Dial-back mode: one counter and one outbound connection per (client
  address, client id, topic), shared by every publish connection of that
  client; the :class:`DialBackRegistry` owns them and hands each publish
  connection a :class:`DialBackLease`. Error frames never travel there (the
  C++ client would read one as a huge count).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import attrs
import trio

from ..errors import ConnectionLost, ErrorCode, ProtocolError
from ..wire import encode_ack, encode_ack_start

logger = logging.getLogger(__name__)


class AckCounter:
    """A cumulative count that ack senders wait on.

    A counter may be *held* (:meth:`hold`) while its connection works through
    batches that have already arrived: advances then only add up, and the
    count goes out once ``hold_bytes`` of batches were acked since the last
    one, or at :meth:`release`, which the connection calls before it waits for
    anything. A count written per 64 KiB batch costs the broker as much as
    receiving the batch (one loopback segment each, and the wake-up of the
    publisher's reader). A publisher whose batches queue up loses little by
    getting one count for several: a count waits at most while the broker
    reads what has already arrived, ``hold_bytes`` of acked batches at most.

    Args:
        hold_bytes: How many bytes of acked batches a held count may cover
            before it is written anyway; 0 never holds.

    Attributes:
        count: Messages that reached the ack level so far.
        sent: The last count an ack sender wrote.
    """

    def __init__(self, hold_bytes: int = 0) -> None:
        self.count = 0
        self.sent = 0
        self._closed = False
        self._lot = trio.lowlevel.ParkingLot()
        # While an ack sender runs that can write a count without waiting:
        # True if it wrote it (see write_at_once).
        self._write_now: Callable[[int], bool] | None = None
        self._hold_bytes = hold_bytes
        self._held = False
        self._held_bytes = 0  # acked since the last count went out, while held

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def held(self) -> bool:
        """Whether advances are adding up without being written."""
        return self._held

    def hold(self) -> None:
        """Let advances add up until :meth:`release` (or ``hold_bytes``);
        a closed counter is never held (its last count must go out)."""
        self._held = self._hold_bytes > 0 and not self._closed

    def release(self) -> None:
        """Stop holding; a count held back goes out now."""
        if self._held:
            self._held = False
            self._held_bytes = 0
            if self.count != self.sent:
                self._send()

    def advance(self, messages: int, nbytes: int = 0) -> None:
        """Add ``messages`` newly acked messages, of batches of ``nbytes`` in all."""
        self.count += messages
        if self._held:
            self._held_bytes += nbytes
            if self._held_bytes < self._hold_bytes:
                return
            self._held_bytes = 0
        self._send()

    def _send(self) -> None:
        """Write the count now if the socket takes it, else wake the sender."""
        write_now = self._write_now
        if write_now is not None and write_now(self.count):
            # Written where it was acked: the ack sender need not wake (a
            # task switch and a pass through the scheduler for every batch).
            self.sent = self.count
            return
        self._lot.unpark_all()

    def write_at_once(self, write: Callable[[int], bool] | None) -> None:
        """Have :meth:`advance` try ``write(count)`` itself (True: written),
        waking the ack sender only when it did not; None stops it."""
        self._write_now = write

    def close(self) -> None:
        """No more advances; senders flush the final count and stop."""
        self._closed = True
        self._held = False
        self._lot.unpark_all()

    def _news(self) -> bool:
        """Whether there is a count to send now (one held back is not)."""
        return self.count != self.sent and not self._held

    async def wait_news(self) -> bool:
        """Wait until there is a count to send; False once closed and flushed."""
        if self._news():
            await trio.lowlevel.checkpoint()
            return True
        # Parking is the checkpoint: no second pass through the scheduler
        # for every count.
        while not self._news():
            if self._closed:
                await trio.lowlevel.checkpoint()
                return False
            await self._lot.park()
        return True


SendAll = Callable[[bytes], Awaitable[None]]


async def run_ack_sender(
    counter: AckCounter,
    send_all: SendAll,
    broker_id: int,
    *,
    send_nowait: Callable[[bytes], bool] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Write the ack stream: the broker id, then every growth of ``counter``.

    With ``send_nowait`` (a frame written at once, or False), a count is
    written by whoever advances the counter when the socket takes it at
    once; this task writes the rest.

    Returns once the counter is closed and its final count is written.

    Raises:
        ConnectionLost: The stream broke (the caller decides what that means).
    """
    await send_all(encode_ack_start(broker_id))
    task_status.started()
    if send_nowait is not None:
        counter.write_at_once(lambda count: send_nowait(encode_ack(count)))
    try:
        while await counter.wait_news():
            if counter.count == counter.sent:
                continue  # written meanwhile, where it was acked
            counter.sent = counter.count
            await send_all(encode_ack(counter.sent))
    finally:
        counter.write_at_once(None)


#: Who shares a dial-back ack connection: the client's address as the broker
#: sees it, its client id, and the topic.
DialBackKey = tuple[str, int, str]

Connect = Callable[[str, int], Awaitable[trio.abc.Stream]]

# Clients send nothing on an ack connection; the broker reads it only to notice
# its close, and throws away whatever arrives anyway.
_WATCH_BYTES = 4096


@attrs.define(eq=False)
class _AckLink:
    """One dial-back ack connection, from its dial to its close."""

    key: DialBackKey
    port: int
    counter: AckCounter = attrs.Factory(AckCounter)
    users: int = 0
    ready: trio.Event = attrs.Factory(trio.Event)
    failure: str | None = None
    lost: bool = False
    dial_scope: trio.CancelScope = attrs.Factory(trio.CancelScope)

    @property
    def name(self) -> str:
        host, client_id, topic = self.key
        return f"client {client_id} at {host} topic {topic!r} (ack port {self.port})"


class DialBackLease:
    """One publish connection's share of a dial-back ack connection.

    Returned by :meth:`DialBackRegistry.attach`. :meth:`release` (or leaving
    the ``with`` block) gives the share back; only the first call counts, so
    a connection can never release a share twice, nor release another
    connection's.

    Attributes:
        counter: Where the connection's acked messages are counted.
    """

    __slots__ = ("_link", "_registry", "counter")

    def __init__(self, registry: DialBackRegistry, link: _AckLink) -> None:
        self._registry: DialBackRegistry | None = registry
        self._link = link
        self.counter = link.counter
        link.users += 1

    def release(self) -> None:
        """Give the share back; the last share's release flushes and closes the connection."""
        registry, self._registry = self._registry, None
        if registry is not None:
            registry._release(self._link)

    def __enter__(self) -> DialBackLease:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


@attrs.frozen
class DialBackStatistics:
    """Counters of the dial-back ack connections.

    Attributes:
        active: Ack connections being dialed or open that publish connections
            join (one per client address, client id and topic).
        dialed: Ack connections opened.
        failed: Dials that failed (refused, unreachable or too slow).
        lost: Ack connections the client closed or that broke while in use.
    """

    active: int
    dialed: int
    failed: int
    lost: int


class DialBackRegistry:
    """One outbound ack connection per (client address, client id, topic),
    shared by all of that client's publish connections to this broker.

    An ack connection is joined only while it is being dialed or is open and
    sound: once it failed, was closed by the client or broke, it is retired
    (later publish connections dial a new one), and the connections that
    still hold a share of it keep counting into it until they end.

    Args:
        nursery: Where the ack connection tasks run (outlives connections).
        broker_id: Written first on every ack stream.
        connect_timeout: Seconds allowed to dial the client.
        connect: Opens a stream to ``(host, port)``; TCP unless a test says otherwise.
    """

    def __init__(
        self,
        nursery: trio.Nursery,
        broker_id: int,
        connect_timeout: float,
        connect: Connect = trio.open_tcp_stream,
    ) -> None:
        self._nursery = nursery
        self._broker_id = broker_id
        self._timeout = connect_timeout
        self._connect = connect
        self._links: dict[DialBackKey, _AckLink] = {}
        self._dialed = 0
        self._failed = 0
        self._lost = 0

    async def attach(self, client_id: int, topic: str, host: str, port: int) -> DialBackLease:
        """Join (or dial) the ack connection of ``(host, client_id, topic)``.

        Waits until the connection is open. The returned lease must be
        released once; if this call raises (also when it is cancelled while
        waiting for the dial) it holds no share.

        Raises:
            ProtocolError: ``NOT_ALLOWED``: that client already has an ack
                connection for the topic on another port.
            ConnectionLost: The client's ack port could not be reached.
        """
        key = (host, client_id, topic)
        link = self._links.get(key)
        if link is None:
            # The dial belongs to the registry, not to this connection: others
            # may join while it runs, and it goes on if this one goes away.
            link = self._links[key] = _AckLink(key, port)
            self._nursery.start_soon(self._run, link)
        elif link.port != port:
            raise ProtocolError(
                ErrorCode.NOT_ALLOWED,
                f"client {client_id} at {host} already receives acks for topic {topic!r} on "
                f"port {link.port}, this connection asks for port {port}: the publish "
                f"connections of one client id share one ack port; use port {link.port}, "
                f"or another client id",
            )
        lease = DialBackLease(self, link)
        try:
            await link.ready.wait()
            if link.failure is not None:
                raise ConnectionLost(link.failure)
        except BaseException:
            lease.release()
            raise
        return lease

    def _release(self, link: _AckLink) -> None:
        link.users -= 1
        if link.users == 0:
            self._retire(link)
            link.counter.close()
            link.dial_scope.cancel()  # a dial still under way is for nobody now

    def _retire(self, link: _AckLink) -> None:
        """Let no later publish connection join ``link``."""
        if self._links.get(link.key) is link:
            del self._links[link.key]

    def _lose(self, link: _AckLink, reason: str) -> None:
        self._retire(link)
        if not link.lost:
            link.lost = True
            self._lost += 1
            logger.info("%s: %s; later publish connections dial anew", link.name, reason)

    async def _run(self, link: _AckLink) -> None:
        host = link.key[0]
        stream: trio.abc.Stream | None = None
        try:
            with link.dial_scope, trio.fail_after(self._timeout):
                stream = await self._connect(host, link.port)
        except (OSError, trio.TooSlowError) as exc:
            self._failed += 1
            link.failure = f"cannot open the ack connection to {host}:{link.port}: {exc!r}"
            logger.warning("%s: %s", link.name, link.failure)
        finally:
            if stream is None:  # failed, abandoned by every waiter, or broker stopped
                if link.failure is None:
                    link.failure = f"the ack connection to {host}:{link.port} was not opened"
                self._retire(link)
                link.ready.set()
        if stream is None:
            return
        self._dialed += 1
        link.ready.set()

        async def send_all(data: bytes) -> None:
            try:
                await stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise ConnectionLost(f"ack connection lost: {exc!r}") from exc

        try:
            async with stream, trio.open_nursery() as nursery:
                nursery.start_soon(self._watch, link, stream)
                try:
                    await run_ack_sender(link.counter, send_all, self._broker_id)
                except ConnectionLost as exc:
                    self._lose(link, str(exc))
                nursery.cancel_scope.cancel()
        finally:
            self._retire(link)

    async def _watch(self, link: _AckLink, stream: trio.abc.Stream) -> None:
        # A dead ack connection shows only here as long as no count is due, so
        # this is what keeps a later publish connection from joining it.
        try:
            while await stream.receive_some(_WATCH_BYTES):
                pass
            reason = "the client closed the ack connection"
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            reason = f"ack connection lost: {exc!r}"
        if not link.counter.closed:  # else it is being flushed and closed anyway
            self._lose(link, reason)

    def statistics(self) -> DialBackStatistics:
        return DialBackStatistics(
            active=len(self._links), dialed=self._dialed, failed=self._failed, lost=self._lost
        )
