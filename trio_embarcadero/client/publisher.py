"""The publisher's I/O: connections to brokers, senders, a linger timer and ack readers.

:meth:`Publisher.publish` packs into the open batch of a
:class:`~trio_embarcadero.client.batches.PublishBatches` and returns; background
tasks do the rest. The linger task seals a batch that has waited long enough
for more messages. For each broker the publisher knows, a task keeps a
connection open: while it lasts, a sender writes sealed batches (any broker's
sender takes the oldest batch waiting) and a reader on the publish connection
(plus one per dial-back connection the broker opens) turns ack counts into
acknowledged batches and released window space.

Failover: when a connection ends because the broker went away or is going
(EOF, reset, error 5, a refused connect), the batches it had not had
acknowledged are queued again, to be sent on another connection with the
same ``batch_seq``, and its task dials that broker again after a backoff. A
watchdog fails the publisher once it has been without any broker for
``delivery_timeout_s``. Any other error frame fails the publisher at once:
it is about the client or its data, and would fail anywhere.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from functools import partial

import attrs
import trio

from ..errors import BROKER_FAILED, BrokerError, ConnectionLost, NoBrokerError
from ..wire import (
    ALIGN,
    DEFAULT_BATCH_BYTES,
    MAX_ACK_LEVEL,
    MESSAGE_HEADER_SIZE,
    AckCount,
    AckDecoder,
    ClientRequest,
    ErrorFrame,
    Handshake,
    encode_topic,
)
from .batches import OPENED, PACKED, SEALED, Payload, PublishBatches, SentBatches
from .connect import choose_client_id, send_handshake
from .failover import (
    DEFAULT_FAILOVER_TIMEOUT,
    Backoff,
    BrokerAddress,
    Endpoint,
    check_timeout,
    connect_first,
    endpoints,
    fails_over,
)

logger = logging.getLogger(__name__)

#: Default time a partly filled batch waits for more messages before it is sent.
DEFAULT_LINGER = 0.005
#: Seconds a closing publisher waits for the broker to confirm the end of the
#: stream (ack level 0) or for the last dial-back acks after an error.
DEFAULT_CLOSE_TIMEOUT = 5.0
#: Default seconds a publisher goes on without any broker before it fails.
DEFAULT_DELIVERY_TIMEOUT = DEFAULT_FAILOVER_TIMEOUT
#: The ``client_req`` of a publish in a session (wire protocol section 4.5).
PUBLISH_SESSION = ClientRequest.PUBLISH_SESSION
#: A session's window (wire protocol section 4.5): batch_seq ``s`` goes out
#: only once every batch up to ``s - 256`` has been acknowledged.
SESSION_WINDOW = 256
#: What ``idempotent=None`` (the default) means for a publisher with acks: a
#: session, so that a resend after a failover is stored once. At ack level 0
#: a publisher never runs one (a session resends until acked).
SESSIONS_BY_DEFAULT = True
_RECEIVE_SIZE = 1 << 16
# publish_many takes messages from its iterable this many at a time.
_PUBLISH_MANY_CHUNK = 4096


@attrs.frozen
class _Failure:
    """Why a connection ended, or why the publisher failed.

    ``brokers`` is set for the failure of having no broker for
    ``delivery_timeout_s``: it raises :class:`NoBrokerError`.
    """

    code: int
    message: str
    cause: BaseException | None = None
    brokers: tuple[str, ...] | None = None


@attrs.frozen
class _Options:
    """Checked publisher options (see :func:`open_publisher`)."""

    topic: str
    ack: int
    batch_bytes: int
    linger: float | None
    client_id: int
    max_inflight_bytes: int
    dial_back: bool
    close_timeout: float
    #: 0: no failover.
    delivery_timeout: float = 0.0
    idempotent: bool = False
    spread: bool = True


def _check_options(
    topic: str,
    ack: int,
    batch_bytes: int,
    linger: float | None,
    client_id: int | None,
    max_inflight_bytes: int | None,
    dial_back: bool,
    close_timeout: float,
) -> _Options:
    """The options of both ``open_publisher*`` functions, checked, defaults filled in."""
    encode_topic(topic)
    if not 0 <= ack <= MAX_ACK_LEVEL:
        raise ValueError(f"ack must be 0..{MAX_ACK_LEVEL}, not {ack}")
    if batch_bytes < ALIGN + MESSAGE_HEADER_SIZE:
        raise ValueError(f"batch_bytes must be at least {ALIGN + MESSAGE_HEADER_SIZE}")
    if linger is not None and not (linger >= 0 and math.isfinite(linger)):
        raise ValueError(f"linger must be a finite number of seconds >= 0, not {linger}")
    window = 4 * batch_bytes if max_inflight_bytes is None else max_inflight_bytes
    if window < batch_bytes:
        raise ValueError(f"max_inflight_bytes ({window}) must be >= batch_bytes ({batch_bytes})")
    if dial_back and ack < 1:
        raise ValueError("dial_back needs ack >= 1")
    chosen_id = choose_client_id(client_id)
    return _Options(topic, ack, batch_bytes, linger, chosen_id, window, dial_back, close_timeout)


def _with_failover(
    options: _Options, delivery_timeout: float, idempotent: bool | None, spread: bool | None
) -> _Options:
    """``options`` with the failover options, checked, the defaults filled in."""
    if idempotent is None:
        idempotent = SESSIONS_BY_DEFAULT and options.ack >= 1
    if idempotent and options.ack < 1:
        raise ValueError("idempotent needs ack >= 1 (a batch is resent until it is acked)")
    timeout = check_timeout("delivery_timeout_s", delivery_timeout)
    return attrs.evolve(
        options,
        delivery_timeout=timeout,
        idempotent=idempotent,
        spread=spread is None or spread,
    )


def random_session_token() -> int:
    """A random non-zero 64-bit session token, from the OS's random source."""
    return random.SystemRandom().randrange(1, 2**64)


class _Connection:
    """One connection to a broker, while it lasts.

    Attributes:
        name: The broker's name (``host:port``).
        stream: The publish connection.
        sent: Batches written on it and not acknowledged yet.
        up: The broker accepted the handshake: its ack stream began (ack
            level 0: the handshake was written).
        ended: Set when the connection is over (``end`` says why).
        end: Why it ended; None when the publisher ended it.
    """

    def __init__(self, name: str, stream: trio.abc.Stream) -> None:
        self.name = name
        self.stream = stream
        self.sent = SentBatches()
        self.up = False
        self.ended = trio.Event()
        self.end: _Failure | None = None
        self.eof_sent = False
        self.ack_connections = 0
        self.ack_connections_lot = trio.lowlevel.ParkingLot()
        self.dial_back_acks = 0
        #: It ended with batches unacknowledged that are not queued again yet.
        self.requeue_pending = False
        self.peer_host: str | None = None
        if isinstance(stream, trio.SocketStream):
            try:
                self.peer_host = stream.socket.getpeername()[0]
            except OSError:  # already disconnected: the reader will tell
                pass


@attrs.define(eq=False)
class _Link:
    """A broker the publisher knows, and its connection to it, if one is open."""

    endpoint: Endpoint
    backoff: Backoff = attrs.Factory(Backoff)
    connection: _Connection | None = None
    #: A connection to it has failed before (the next one is a reconnect).
    failed: bool = False


class Publisher:
    """Publishes messages to one topic through one or more brokers.

    Get one from :func:`open_publisher` or :func:`open_publisher_on_stream`;
    the constructor is internal.

    Attributes:
        topic: The topic it publishes to.
        client_id: Its client id (message headers and ack streams name it).
        ack: The ack level asked for: 0 none, 1 stored in the log, 2 durable.
        broker_id: The broker id from the latest ack stream that began.
        idempotent: It publishes in a session (``client_req = 2``).
        session_token: The session's token (the handshakes' ``last_addr``);
            0 unless ``idempotent``.
        reconnects: Connections opened to a broker after one to it failed.
        brokers: The brokers it knows, by name (``host:port``).
    """

    def __init__(self, links: Sequence[Endpoint], options: _Options, *, failover: bool) -> None:
        self.topic = options.topic
        self.client_id = options.client_id
        self.ack = options.ack
        self.broker_id: int | None = None
        self.idempotent = options.idempotent
        self.session_token = random_session_token() if options.idempotent else 0
        self.reconnects = 0
        self.brokers = tuple(endpoint.name for endpoint in links)
        self._links = [_Link(endpoint) for endpoint in links]
        self._failover = failover
        self._delivery_timeout = options.delivery_timeout
        self._linger = options.linger
        self._close_timeout = options.close_timeout
        self._dial_back = options.dial_back
        self._same_connection_acks = options.ack >= 1 and not options.dial_back
        # With several brokers a connection gets batches only once its broker
        # took the handshake, so one that accepts TCP but never answers (a
        # stopped process) holds none; a single broker's connection sends at
        # once, as there is nowhere else to send to.
        self._send_when_up = len(links) > 1
        # Not spreading: only this connection gets batches, until it ends.
        self._spread = options.spread or len(links) == 1
        self._active: _Connection | None = None
        self._batches = PublishBatches(
            options.client_id,
            batch_bytes=options.batch_bytes,
            max_inflight_bytes=options.max_inflight_bytes,
            release_on_send=not options.ack,
            max_unacked_batches=SESSION_WINDOW if options.idempotent else 0,
        )
        self._batch_started = 0.0
        self._progress = trio.lowlevel.ParkingLot()  # acks, sends, failure
        self._sealed_lot = trio.lowlevel.ParkingLot()  # wakes the senders
        self._batch_opened = trio.lowlevel.ParkingLot()  # wakes the linger task
        self._links_lot = trio.lowlevel.ParkingLot()  # a connection went up or down
        self._up = 0  # connections whose broker took the handshake
        # Connections that ended with unacknowledged batches not yet queued
        # again: no sender takes a batch meanwhile (see _connection_ended).
        self._requeues_pending = 0
        self._last_failure = _Failure(BROKER_FAILED, "no connection was tried")
        self._failure: _Failure | None = None
        self._closing = False
        self._closed = False

    # -- the public API ---------------------------------------------------------

    @property
    def published(self) -> int:
        """Messages accepted by :meth:`publish` so far."""
        return self._batches.published

    @property
    def sent(self) -> int:
        """Messages whose batch has been handed to the kernel (once or more)."""
        return self._batches.sent

    @property
    def acked(self) -> int:
        """Messages the broker acknowledged at the ack level (always 0 with
        ``ack=0``), counted without a gap from the first: the first ``acked``
        messages are stored. (With several brokers, later batches may be
        acknowledged already, out of order.)"""
        return self._batches.acked

    @property
    def resent(self) -> int:
        """Batches sent again after the connection they went out on failed."""
        return self._batches.resent

    @property
    def connected(self) -> int:
        """Connections open now whose broker took the handshake."""
        return self._up

    @property
    def failed(self) -> bool:
        """Whether the publisher failed: the broker reported an error that
        another broker would report too, or no broker was reached for
        ``delivery_timeout_s``."""
        return self._failure is not None

    def publish_nowait(self, payload: Payload) -> None:
        """Add one message to the current batch if the in-flight window has
        room for it, without waiting and without a checkpoint.

        The non-blocking form of :meth:`publish` (as
        :meth:`trio.MemorySendChannel.send_nowait` is of ``send``): a plain
        function, so it neither yields to other tasks nor checks for
        cancellation. The message is either packed when it returns or not at
        all when it raises. The background tasks run when the caller next
        reaches a checkpoint; with ``linger`` 0 each call seals its batch.

        Raises:
            trio.WouldBlock: The window is full; nothing was published.
                :meth:`publish` waits for room.
            BrokerError: As for :meth:`publish`.
            trio.ClosedResourceError: The publisher's context has exited.
        """
        if not self._append(payload) & PACKED:
            raise trio.WouldBlock

    async def publish(self, payload: Payload) -> None:
        """Add one message (any bytes-like object of bytes) to the current batch.

        The payload is copied, so the caller may reuse its buffer at once. The
        batch is sent when it is full, when :meth:`flush` is called, or after
        the linger time. Waits while the in-flight window is full.

        Raises:
            BrokerError: The publisher failed: a broker reported an error that
                another would report too, or (with failover off) failed; a
                :class:`~trio_embarcadero.errors.NoBrokerError` after
                ``delivery_timeout_s`` without any broker. ``acked`` says how
                many messages are stored. A broker that merely went away
                raises nothing: its batches go to another.
            trio.ClosedResourceError: The publisher's context has exited.

        Checkpoints and cancellation:
            Every call is a cancellation point: it checks for cancellation
            first (``trio.lowlevel.checkpoint_if_cancelled``) and, if the
            window is full, while it waits. It yields to other tasks only when
            it waits, or when the message sealed a batch (so the sender starts
            writing it); most calls pack the message and return without a
            schedule point, which is what makes one call per message cheap.
            A loop of calls therefore still lets the sender, the ack reader
            and the linger timer run at least once per batch. If a call
            raises ``Cancelled``, its message was not published; if it
            returns, it was.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        flags = self._append(payload)
        while not flags & PACKED:
            await self._progress.park()
            flags = self._append(payload)
        if flags & SEALED:
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def publish_many(self, payloads: Iterable[Payload]) -> None:
        """Publish several messages, in order, with one checkpoint per batch.

        Faster than calling :meth:`publish` in a loop: runs of messages are
        packed together, and it only yields to the scheduler when a batch is
        sealed or the window is full.

        Raises:
            BrokerError: As for :meth:`publish`.
            trio.ClosedResourceError: The publisher's context has exited.

        Checkpoints and cancellation:
            It checks for cancellation first, yields to other tasks once per
            batch it seals and waits while the window is full (where it can
            be cancelled), and ends with a schedule point. If cancelled (or
            failed), a prefix of ``payloads`` has been published;
            :attr:`published` says how many messages in total. It takes
            messages from ``payloads`` a few thousand at a time, so from an
            iterator it may have taken more than it published.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        self._check_usable()
        batches = self._batches
        remaining = iter(payloads)
        # Packing runs without a checkpoint, so a failure can only have come
        # while a message waited for the window or after a checkpoint below.
        while chunk := list(itertools.islice(remaining, _PUBLISH_MANY_CHUNK)):
            index = batches.append_run(chunk, 0)
            while index < len(chunk):
                payload = chunk[index]
                flags = self._append(payload, seal=False)
                while not flags & PACKED:
                    await self._progress.park()
                    flags = self._append(payload, seal=False)
                if flags & SEALED:
                    # Let the sender start writing the sealed batch.
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    self._check_usable()
                index = batches.append_run(chunk, index + 1)
        if not self._linger:
            self._seal()
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def flush(self) -> None:
        """Send the current batch and wait until every message published so
        far reached the ack level (with ``ack=0``: was handed to the kernel).

        Raises:
            BrokerError: As for :meth:`publish`, before that.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        self._check_usable()
        self._seal()
        batches = self._batches
        target = batches.published
        while (batches.acked if self.ack else batches.sent) < target:
            self._raise_if_failed()
            await self._progress.park()
        await trio.lowlevel.cancel_shielded_checkpoint()

    # -- driving the batches ----------------------------------------------------------

    def _check_usable(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the publisher's context has exited")
        self._raise_if_failed()

    def _append(self, payload: Payload, *, seal: bool = True) -> int:
        """Pack one message if the window has room, wake the tasks a new or
        sealed batch concerns, and with ``linger`` 0 seal (unless ``seal`` is
        False: ``publish_many`` seals once, at its end).

        Returns:
            The flags of :meth:`PublishBatches.append` (:data:`SEALED` also
            for the linger-0 seal).

        Raises:
            BrokerError: The publisher failed.
            trio.ClosedResourceError: Its context has exited.
        """
        if self._failure is not None or self._closed:
            self._check_usable()
        flags = self._batches.append(payload)
        if flags != PACKED or not self._linger:
            flags = self._appended(flags, seal=seal)
        return flags

    def _appended(self, flags: int, *, seal: bool = True) -> int:
        """The part of :meth:`_append` after packing, for flags other than a
        bare PACKED or for ``linger`` 0."""
        if flags & OPENED:
            self._batch_started = trio.current_time()
            self._batch_opened.unpark_all()
        if flags & SEALED:
            self._sealed_lot.unpark_all()
        if seal and not self._linger and flags & PACKED and self._batches.seal():
            self._sealed_lot.unpark_all()
            flags |= SEALED
        return flags

    def _seal(self) -> None:
        if self._batches.seal():
            self._sealed_lot.unpark_all()

    def _on_ack(self, connection: _Connection, count: int) -> None:
        batches = self._batches
        progressed = False
        for batch in connection.sent.ack(count):
            progressed |= batches.acknowledge(batch)
        if progressed:
            self._progress.unpark_all()
            if self.idempotent:
                self._sealed_lot.unpark_all()  # senders may wait for the window

    def _without_broker(self) -> bool:
        return not self._up and self._failure is None

    def _undelivered(self) -> bool:
        """Whether messages wait for a broker (their ack, or at ack level 0
        their write)."""
        batches = self._batches
        return batches.published > (batches.acked if self.ack else batches.sent)

    # -- failures -------------------------------------------------------------------

    def _fail(self, failure: _Failure) -> None:
        if self._failure is None:
            self._failure = failure
            logger.debug("publisher %d: %s", self.client_id, failure.message)
        self._progress.unpark_all()
        self._sealed_lot.unpark_all()
        self._links_lot.unpark_all()

    def _raise_if_failed(self) -> None:
        failure = self._failure
        if failure is None:
            return
        if failure.brokers is not None:
            raise NoBrokerError(
                failure.code,
                failure.message,
                self.acked,
                brokers=failure.brokers,
                timeout=self._delivery_timeout,
            ) from failure.cause
        raise BrokerError(failure.code, failure.message, self.acked) from failure.cause

    def _connection_up(self, connection: _Connection) -> None:
        if connection.up or connection.ended.is_set():
            return
        connection.up = True
        self._up += 1
        self._links_lot.unpark_all()
        self._sealed_lot.unpark_all()  # its sender may wait for this

    def _connection_ended(self, connection: _Connection, end: _Failure | None) -> None:
        if connection.ended.is_set():
            return
        connection.end = end
        connection.ended.set()
        if len(connection.sent):
            # Its batches are queued again only once its tasks are over (its
            # sender may be writing one). Until then no sender takes a newer
            # batch: one broker would store it before the older ones it then
            # gets, and in a session on an order-5 topic the sequencer would
            # have to hold the newer batch back until its predecessors, resent
            # behind it, are ordered (the wire protocol's resend rule, 4.5).
            connection.requeue_pending = True
            self._requeues_pending += 1
        if connection.up:
            self._up -= 1
            self._links_lot.unpark_all()
        if connection is self._active:
            self._active = None
            self._sealed_lot.unpark_all()  # another connection takes over

    def _may_send(self, connection: _Connection) -> bool:
        """Whether ``connection``'s sender may take a batch now."""
        if self._spread:
            return connection.up or not self._send_when_up
        if self._active is None:
            # The first broker of the list whose connection took the handshake.
            self._active = next(
                (
                    link.connection
                    for link in self._links
                    if link.connection is not None
                    and link.connection.up
                    and not link.connection.ended.is_set()
                ),
                None,
            )
        return connection is self._active

    # -- background tasks -----------------------------------------------------------

    async def _keep_connected(self, link: _Link, stream: trio.abc.Stream | None) -> None:
        """Keep a connection to one broker open until the publisher closes or
        fails: dial it (after a backoff once it failed), run the connection,
        and when it ends, queue its unacknowledged batches again."""
        endpoint = link.endpoint
        while self._failure is None and not self._closing:
            if stream is None:
                try:
                    stream = await endpoint.open()
                except ConnectionLost as exc:
                    failure = _Failure(BROKER_FAILED, str(exc), exc)
                    if not self._failover:
                        self._fail(failure)
                        return
                    self._last_failure = failure
                    await trio.sleep(link.backoff.next_delay())
                    continue
                if link.failed:
                    self.reconnects += 1
            connection = await self._run_connection(link, stream)
            stream = None
            end = connection.end
            if end is None:
                return  # the publisher ended it
            link.failed = True
            if connection.up:
                # The broker had taken the handshake: a new failure, not one
                # more of a broker that keeps refusing (error 5 as it drains).
                link.backoff.reset()
            if not self._failover or not fails_over(end.code):
                self._fail(end)
                return
            logger.info("publisher %d: %s: %s", self.client_id, endpoint.name, end.message)
            self._last_failure = attrs.evolve(end, message=f"{endpoint.name}: {end.message}")
            await trio.sleep(link.backoff.next_delay())

    async def _run_connection(self, link: _Link, stream: trio.abc.Stream) -> _Connection:
        """Run one connection until it ends (its ``end`` says why; None: the
        publisher ended it). Its unacknowledged batches are queued again."""
        connection = _Connection(link.endpoint.name, stream)
        link.connection = connection
        try:
            async with trio.open_nursery() as nursery:
                try:
                    ack_port = 0
                    if self._dial_back:
                        ack_port = await self._listen_for_acks(nursery, connection)
                    await send_handshake(stream, self._handshake(ack_port))
                except ConnectionLost as exc:
                    self._connection_ended(connection, _Failure(BROKER_FAILED, str(exc), exc))
                else:
                    if not self.ack:
                        self._connection_up(connection)  # nothing else will tell
                    nursery.start_soon(self._read_publish_connection, connection)
                    nursery.start_soon(self._send_batches, connection)
                    await connection.ended.wait()
                nursery.cancel_scope.cancel()
        finally:
            self._connection_ended(connection, connection.end)
            link.connection = None
            again = connection.sent.take_all()
            if again:
                self._batches.requeue(again)
            if connection.requeue_pending:
                connection.requeue_pending = False
                self._requeues_pending -= 1
                self._sealed_lot.unpark_all()
            await trio.aclose_forcefully(stream)
        return connection

    def _handshake(self, ack_port: int) -> Handshake:
        return Handshake(
            client_id=self.client_id,
            ack=self.ack,
            num_msg=0,
            # A session's connections all carry its token (wire protocol:
            # sessions); a plain publish connection ignores the field.
            last_addr=self.session_token,
            port=ack_port,
            request=PUBLISH_SESSION if self.idempotent else ClientRequest.PUBLISH,
            topic=self.topic,
        )

    async def _send_batches(self, connection: _Connection) -> None:
        """Write batches on one connection until it ends, or the publisher
        closes (ack level 0: then end the stream)."""
        batches = self._batches
        while True:
            batch = None
            while batch is None:
                if connection.ended.is_set() or self._failure is not None:
                    return
                if not self._requeues_pending and self._may_send(connection):
                    batch = batches.take()
                    if batch is None and self._closing:
                        await self._end_stream(connection)
                        return
                if batch is None:
                    await self._sealed_lot.park()
            if self.ack:
                connection.sent.add(batch)
            written = False
            try:
                assert batch.data is not None
                await connection.stream.send_all(batch.data)
                written = True
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                # The reader sees the same end of the connection, with the
                # broker's error frame if there is one; it reports the end.
                logger.debug("publisher %d: send failed: %r", self.client_id, exc)
                return
            finally:
                batches.mark_sent(batch, written=written)
                if not written:
                    self._sealed_lot.unpark_all()  # at ack 0 the batch is queued again
            self._progress.unpark_all()

    async def _end_stream(self, connection: _Connection) -> None:
        """At ack level 0, end a closing publisher's stream in order: the
        broker closes the connection once it dealt with every batch, so an
        error on the last batches is still reported."""
        stream = connection.stream
        if self.ack or not isinstance(stream, trio.abc.HalfCloseableStream):
            return
        connection.eof_sent = True
        try:
            await stream.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def _linger_loop(self) -> None:
        """Seal a batch that has waited ``linger`` seconds for more messages."""
        assert self._linger
        batches = self._batches
        while True:
            while not batches.open_count:
                await self._batch_opened.park()
            seq = batches.batch_seq
            await trio.sleep_until(self._batch_started + self._linger)
            if batches.batch_seq == seq:
                self._seal()

    async def _watch_delivery(self) -> None:
        """Fail the publisher once it has had no broker for ``delivery_timeout_s``
        while messages waited for one."""
        timeout = self._delivery_timeout
        while True:
            while self._up and self._failure is None:
                await self._links_lot.park()
            with trio.move_on_after(timeout):
                while self._without_broker():
                    await self._links_lot.park()
            if not self._without_broker():
                if self._failure is not None:
                    return
                continue
            if not self._undelivered():
                # Nothing waits: the timeout counts from the next sealed batch.
                while self._without_broker() and not self._undelivered():
                    await self._sealed_lot.park()
                continue
            last = self._last_failure
            self._fail(
                _Failure(
                    last.code,
                    f"no broker for {timeout:g} s (tried {', '.join(self.brokers)}); "
                    f"last failure: {last.message}",
                    last.cause,
                    brokers=self.brokers,
                )
            )

    async def _read_publish_connection(self, connection: _Connection) -> None:
        """Read acks (same-connection mode) and error frames until the
        connection ends; never raises."""
        # Error frames can come where the broker id would (a refused
        # handshake); the decoder tells them apart.
        decoder = AckDecoder(expect_broker_id=self._same_connection_acks)
        stream = connection.stream
        try:
            while True:
                try:
                    data = await stream.receive_some(_RECEIVE_SIZE)
                except trio.BrokenResourceError as exc:
                    await self._broker_failed(
                        connection, f"connection to the broker broke: {exc!r}", exc
                    )
                    return
                except trio.ClosedResourceError:
                    return  # we closed it
                if not data:
                    if not connection.eof_sent:
                        await self._broker_failed(
                            connection, "the broker closed the connection without an error frame"
                        )
                    return
                for event in decoder.feed(data):
                    if isinstance(event, ErrorFrame):
                        await self._wait_ack_connections(connection)
                        self._connection_ended(connection, _Failure(event.code, event.text))
                        return
                    if not self._same_connection_acks:
                        self._fail(
                            _Failure(
                                BROKER_FAILED,
                                "the broker sent an ack count on a connection without acks",
                            )
                        )
                        return
                    self._on_ack(connection, event.count)
                if decoder.broker_id is not None and not connection.up:
                    self.broker_id = decoder.broker_id
                    self._connection_up(connection)
        finally:
            self._connection_ended(connection, connection.end)

    async def _broker_failed(
        self, connection: _Connection, message: str, cause: BaseException | None = None
    ) -> None:
        await self._wait_ack_connections(connection)
        self._connection_ended(connection, _Failure(BROKER_FAILED, message, cause))

    async def _wait_ack_connections(self, connection: _Connection) -> None:
        # Dial-back counts travel on their own connection and may still be on
        # the way when the publish connection reports the end; the broker
        # closes the ack connection after its final count.
        with trio.move_on_after(self._close_timeout):
            while connection.ack_connections:
                await connection.ack_connections_lot.park()

    async def _read_ack_connection(self, connection: _Connection, stream: trio.abc.Stream) -> None:
        """Handle one dial-back ack connection: broker id, then counts."""
        if isinstance(stream, trio.SocketStream) and connection.peer_host is not None:
            peer = stream.socket.getpeername()[0]
            if peer != connection.peer_host:
                logger.warning(
                    "publisher %d: ignoring an ack connection from %s", self.client_id, peer
                )
                await trio.aclose_forcefully(stream)
                return
        connection.ack_connections += 1
        decoder = AckDecoder(expect_broker_id=True)
        last = 0
        try:
            async with stream:
                while data := await stream.receive_some(_RECEIVE_SIZE):
                    for event in decoder.feed(data):
                        if isinstance(event, AckCount):
                            # Like the C++ client: sum the increases of every
                            # ack connection (of this publish connection: each
                            # listens on a port of its own).
                            connection.dial_back_acks += event.count - last
                            last = event.count
                            self._on_ack(connection, connection.dial_back_acks)
                        else:  # never sent on an ack connection (spec section 4)
                            logger.warning(
                                "publisher %d: error frame on the ack connection: %s",
                                self.client_id,
                                event.text,
                            )
                    if decoder.broker_id is not None and not connection.up:
                        self.broker_id = decoder.broker_id
                        self._connection_up(connection)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            logger.debug("publisher %d: ack connection ended: %r", self.client_id, exc)
        finally:
            connection.ack_connections -= 1
            connection.ack_connections_lot.unpark_all()

    # -- starting and closing -------------------------------------------------------

    def _start(self, nursery: trio.Nursery, first: int, stream: trio.abc.Stream) -> None:
        """Start the tasks: a connection per broker (``stream`` is already
        open to broker ``first``), the linger timer and the watchdog."""
        for index, link in enumerate(self._links):
            nursery.start_soon(self._keep_connected, link, stream if index == first else None)
        if self._linger:
            nursery.start_soon(self._linger_loop)
        if self._failover:
            nursery.start_soon(self._watch_delivery)

    async def _listen_for_acks(self, nursery: trio.Nursery, connection: _Connection) -> int:
        """Serve dial-back ack connections of ``connection`` on an ephemeral
        port; return it."""
        stream = connection.stream
        if not isinstance(stream, trio.SocketStream):
            self._fail(_Failure(BROKER_FAILED, "dial_back needs TCP connections to the brokers"))
            raise ConnectionLost("dial_back needs a TCP connection")
        local = stream.socket.getsockname()[0]
        try:
            listeners = await trio.open_tcp_listeners(0, host=local)
        except OSError as exc:
            self._fail(
                _Failure(BROKER_FAILED, f"cannot listen for dial-back acks on {local}: {exc}")
            )
            raise ConnectionLost(f"cannot listen for dial-back acks on {local}: {exc}") from exc
        port: int = listeners[0].socket.getsockname()[1]
        handler = partial(self._read_ack_connection, connection)
        try:
            await nursery.start(partial(trio.serve_listeners, handler, listeners))
        except BaseException:
            for listener in listeners:
                await trio.aclose_forcefully(listener)
            raise
        return port

    async def _finish(self) -> None:
        """Flush, then end the streams in order (the clean exit)."""
        await self.flush()
        self._closing = True
        self._sealed_lot.unpark_all()
        if self.ack:
            return
        # Ack level 0 has no confirmations: the senders end their streams,
        # and the broker closes each once it dealt with every batch.
        with trio.move_on_after(self._close_timeout) as scope:
            for link in self._links:
                connection = link.connection
                if connection is not None:
                    await connection.ended.wait()
        if scope.cancelled_caught:
            logger.debug("publisher %d: no end of stream from the broker", self.client_id)
        self._raise_if_failed()


@asynccontextmanager
async def _publishing(
    links: Sequence[Endpoint],
    options: _Options,
    first: int,
    stream: trio.abc.Stream,
    *,
    failover: bool,
) -> AsyncIterator[Publisher]:
    """Run a publisher whose connection to broker ``first`` is open: the body
    of both ``open_publisher*``."""
    publisher = Publisher(links, options, failover=failover)
    # Exceptions of the block, and from the final flush, are re-raised after
    # the nursery has exited, so the caller gets them as they are rather than
    # wrapped in an exception group; the background tasks never raise.
    error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            publisher._start(nursery, first, stream)
            try:
                yield publisher
                await publisher._finish()
            except BaseException as exc:
                error = exc
            nursery.cancel_scope.cancel()
    finally:
        publisher._closed = True
        await trio.aclose_forcefully(stream)  # if its task never ran
    if error is not None:
        raise error


@asynccontextmanager
async def open_publisher(
    host: str = "",
    port: int = 0,
    topic: str = "",
    *,
    brokers: Sequence[BrokerAddress] | None = None,
    ack: int = 1,
    batch_bytes: int = DEFAULT_BATCH_BYTES,
    linger: float | None = DEFAULT_LINGER,
    client_id: int | None = None,
    max_inflight_bytes: int | None = None,
    dial_back: bool = False,
    close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
    delivery_timeout_s: float = DEFAULT_DELIVERY_TIMEOUT,
    idempotent: bool | None = None,
    spread: bool | None = None,
) -> AsyncIterator[Publisher]:
    """Connect to a broker (or several) over TCP and publish to ``topic``.

    ``open_publisher(host, port, topic)`` publishes through one broker;
    ``open_publisher(topic=..., brokers=[(host, port), ...])`` through
    several: the publisher keeps a connection to each and hands each sealed
    batch to whichever connection is free to write it (a session, one broker
    at a time: see ``spread``).

    Leaving the block normally flushes (waits until every message reached the
    ack level) and closes the connections; leaving it with an exception
    closes at once, and unacknowledged messages may be lost.

    Failover:
        When a broker goes away (its connection ends without an error frame,
        or is reset; it refuses connections; or it sends error 5, shutting
        down), the publisher sends every batch that broker had not
        acknowledged again, with the same ``batch_seq``, on another
        connection (or on a new one to the same broker once it is back),
        before any batch it had not sent yet, and dials the broker again
        after a pause that grows from 50 ms to 1 s (with jitter). The
        application sees only the delay: no call raises and no message is
        lost. Only after ``delivery_timeout_s`` without any broker while
        messages wait does the publisher fail: every later call
        raises :class:`~trio_embarcadero.errors.NoBrokerError`, which names
        the brokers tried and the last failure. Error frames with other codes
        are about the client or its data (a bad batch, a full log, an ack
        level the broker cannot give, ...): they fail the publisher at once.

        What a resend means depends on ``idempotent``. In a session (the
        default with ``ack >= 1``: ``client_req = 2``, a random session
        token in every handshake, ``batch_seq`` counted from 0 across all
        its connections) the brokers store a resent batch only once,
        whichever broker it reaches. In a plain publish (``idempotent=False``,
        and always at ``ack=0``: ``client_req = 0``) a batch the failed
        broker had stored but not yet acknowledged is stored again: a
        broker that is killed may leave such duplicates (at most the batches
        it had not acknowledged); a broker that shuts down in order (error 5)
        acknowledges everything it stored first, so its failover duplicates
        nothing. With several brokers, batches go out on several connections,
        so they are stored in each broker's stream in the order each broker
        got them, not in one order across the brokers.

        At ack level 0 nothing tells what a broker stored: a batch written
        whole to a connection that then fails is not sent again (it may be
        lost), one whose write did not finish is.

    Args:
        host: The broker's address (with ``port``; or use ``brokers``).
        port: The broker's data port (``broker.port + broker.id``).
        topic: Topic name, 1-31 characters of ``[A-Za-z0-9._-]``.
        brokers: Several brokers, each a ``(host, port)`` pair or an async
            function that opens a stream to one (a Unix socket, TLS, an
            in-memory stream to a broker in the same process). Give either
            this or ``host`` and ``port``.
        ack: 0 (no acks: flushing waits until the data is handed to the
            kernel), 1 (stored in the log) or 2 (durable; needs a broker
            with a disk log).
        batch_bytes: Largest batch payload; a batch is sealed before a
            message would overflow it. Must not exceed the broker's
            ``network.max_batch_bytes`` (by default its staging buffer size).
            A single larger message is sent alone in a batch of its own.
        linger: Seconds a partly filled batch waits for more messages before
            it is sent. 0 or None: a batch is sent at the end of every
            :meth:`~Publisher.publish` / :meth:`~Publisher.publish_many` call.
        client_id: Names this publisher in message headers; default random in
            ``[32, 999999]``.
        max_inflight_bytes: Record bytes that may be published but not yet
            acknowledged (sent, with ``ack=0``); :meth:`~Publisher.publish`
            waits beyond that. Default ``4 * batch_bytes``. The batches kept
            for a resend are those, so this bounds their memory too (batches
            that fill less than half of ``batch_bytes`` are kept as copies of
            their own size).
        dial_back: Receive acks on connections the brokers open to this
            client (the C++ client's mode) instead of on the publish
            connections. Each publish connection listens on an ephemeral port
            of its own local address; error frames still arrive on the publish
            connection. Needs ``ack >= 1`` and TCP. Two such publishers on one
            host must not share ``client_id`` and topic: a broker refuses the
            second with ``NOT_ALLOWED``.
        close_timeout: Seconds to wait, when closing with ``ack=0``, for the
            brokers to end the streams, and after an error for the last
            dial-back acks.
        delivery_timeout_s: Seconds the publisher goes on without any broker
            (while messages wait to be delivered) before it fails with
            :class:`~trio_embarcadero.errors.NoBrokerError`. 0 turns failover
            off: the first failure of a connection fails the publisher with
            the broker's error, as a :class:`~trio_embarcadero.errors.BrokerError`.
        idempotent: Publish in a session (``client_req = 2``), so that a
            resend is stored once. Needs ``ack >= 1`` and brokers that know
            sessions (an older broker refuses the handshake with error 1).
            None (the default): a session with ``ack >= 1``
            (:data:`SESSIONS_BY_DEFAULT`), a plain publish at ``ack=0``;
            False: a plain publish (``client_req = 0``).
        spread: With several brokers, hand batches to every broker's
            connection (True), or send on one connection at a time, the
            first broker of the list that answers, and move to the next only
            when it fails (False). Default: spread, also in a session: on an
            order-5 topic the sequencer orders a session's batches in
            ``batch_seq`` order across the brokers' streams, and orders a
            stream's later batches past one that waits for its predecessor
            (stored by another broker, or resent behind it), so spreading
            holds no stream up.

    Yields:
        The :class:`Publisher`.

    Raises:
        ConnectionLost: No broker can be reached when the block is entered
            (each is tried once, in order).
        BrokerError: The publisher failed (from the block's calls, or at exit
            while flushing): a :class:`~trio_embarcadero.errors.NoBrokerError`
            after ``delivery_timeout_s`` without a broker, else the error a
            broker reported.
        ValueError: Invalid options (raised before connecting).
    """
    options = _check_options(
        topic, ack, batch_bytes, linger, client_id, max_inflight_bytes, dial_back, close_timeout
    )
    options = _with_failover(options, delivery_timeout_s, idempotent, spread)
    links = endpoints(host, port, brokers)
    first, stream = await connect_first(links)
    failover = options.delivery_timeout > 0
    async with _publishing(links, options, first, stream, failover=failover) as publisher:
        yield publisher


@asynccontextmanager
async def open_publisher_on_stream(
    stream: trio.abc.Stream,
    topic: str,
    *,
    ack: int = 1,
    batch_bytes: int = DEFAULT_BATCH_BYTES,
    linger: float | None = DEFAULT_LINGER,
    client_id: int | None = None,
    max_inflight_bytes: int | None = None,
    dial_back: bool = False,
    close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
    idempotent: bool | None = None,
) -> AsyncIterator[Publisher]:
    """Publish to ``topic`` over an already open stream to a broker.

    Use it for in-memory streams (a broker started with
    ``open_broker(config, listeners=[...])``), Unix sockets or TLS. The stream
    is closed when the block exits. Arguments and behaviour as for
    :func:`open_publisher`, except that a stream cannot be opened again: the
    first failure of the connection fails the publisher (for failover, give
    :func:`open_publisher` ``brokers=[...]`` with a function that opens such
    streams). ``dial_back`` needs a :class:`trio.SocketStream`.

    Raises:
        ValueError: Invalid options; the stream is left open.
    """
    options = _check_options(
        topic, ack, batch_bytes, linger, client_id, max_inflight_bytes, dial_back, close_timeout
    )
    options = _with_failover(options, 0.0, idempotent, True)
    if dial_back and not isinstance(stream, trio.SocketStream):
        raise ValueError("dial_back needs a TCP connection (a trio.SocketStream)")

    async def reopen() -> trio.abc.Stream:
        raise ConnectionLost("the stream given to open_publisher_on_stream cannot be reopened")

    links = [Endpoint("the stream", reopen)]
    async with _publishing(links, options, 0, stream, failover=False) as publisher:
        yield publisher
