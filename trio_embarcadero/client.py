"""Trio clients of a trio-embarcadero broker: a publisher and a subscriber.

Both speak the wire protocol of ``shared/reference/wire-protocol.md`` and come
as async context managers, in two flavours each:

* :func:`open_publisher` / :func:`open_subscriber` dial a broker over TCP;
* :func:`open_publisher_on_stream` / :func:`open_subscriber_on_stream` run the
  same protocol over a stream you already have: an in-memory stream to a
  broker started with ``open_broker(config, listeners=[...])`` (deterministic
  tests with a mock clock), a Unix socket, TLS.

A publisher packs messages into batches in preallocated buffers (one
``struct.pack_into`` and one slice copy per message), a sender task writes
sealed batches while the application goes on publishing, and a reader task
turns the broker's ack counts into :attr:`Publisher.acked`. Memory is bounded
by an in-flight window: :meth:`Publisher.publish` waits while too many bytes
are published but not yet acknowledged.

A subscriber receives into a buffer it owns and hands out messages whose
payloads are memoryviews of that buffer (no copy per message).

Error handling:
    Failures the broker reports arrive as :class:`~trio_embarcadero.errors.BrokerError`
    (its ``code`` is the error frame's; ``acked`` says how many of the
    publisher's messages were acknowledged before it). A connection that ends
    without an error frame means the broker failed; that is a ``BrokerError``
    with code :data:`BROKER_FAILED` (0). Neither context manager wraps errors
    in exception groups: its background tasks report failures to the calling
    task instead of raising in a nursery.
"""

from __future__ import annotations

import logging
import math
import random
import struct
from collections import deque
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from functools import partial
from typing import NamedTuple

import attrs
import trio

from .errors import BROKER_FAILED, BrokerError, ConnectionLost, ErrorCode, ProtocolError
from .transport import Receiver, receiver_for
from .wire import (
    ALIGN,
    BATCH_HEADER,
    BATCH_HEADER_SIZE,
    ERROR_FRAME_HEAD,
    ERROR_MARKER,
    MAX_ACK_LEVEL,
    MESSAGE_HEADER,
    MESSAGE_HEADER_SIZE,
    UNASSIGNED_OFFSET,
    AckCount,
    AckDecoder,
    ClientRequest,
    ErrorFrame,
    Handshake,
    Message,
    encode_topic,
    padded_size,
)

logger = logging.getLogger(__name__)

#: Default batch payload size; must not exceed the broker's ``max_batch_bytes``.
DEFAULT_BATCH_BYTES = 2 * 2**20
#: Default time a partly filled batch waits for more messages before it is sent.
DEFAULT_LINGER = 0.005
#: Seconds a closing publisher waits for the broker to confirm the end of the
#: stream (ack level 0) or for the last dial-back acks after an error.
DEFAULT_CLOSE_TIMEOUT = 5.0
#: Default size of a subscriber's receive buffer (it grows for larger records).
DEFAULT_RECEIVE_BUFFER = 1 << 20
#: Largest record a subscriber accepts; anything larger is a corrupt stream.
MAX_RECORD_BYTES = 1 << 30
_RECEIVE_SIZE = 1 << 16
_ZEROS = memoryview(bytes(ALIGN))
_U64 = struct.Struct("<Q")


def random_client_id() -> int:
    """A client id in ``[32, 999999]``, from the OS's random source.

    Seeding :mod:`random` in an application does not make two publishers of
    it pick the same id.
    """
    return random.SystemRandom().randint(32, 999_999)


# -- the publisher ----------------------------------------------------------------


@attrs.frozen
class _Failure:
    code: int
    message: str
    cause: BaseException | None


class _InFlight(NamedTuple):
    end_count: int  # ``published`` after the batch's last message
    nbytes: int  # record bytes the batch holds in the window


class _Sealed(NamedTuple):
    buffer: bytearray
    size: int  # header + payload bytes to send
    end_count: int


class Publisher:
    """Publishes messages to one topic over one connection.

    Get one from :func:`open_publisher` or :func:`open_publisher_on_stream`;
    the constructor is internal.

    Attributes:
        topic: The topic it publishes to.
        client_id: Its client id (message headers and ack streams name it).
        ack: The ack level asked for: 0 none, 1 stored in the log, 2 durable.
        published: Messages accepted by :meth:`publish` so far.
        sent: Messages whose batch has been handed to the kernel.
        acked: Messages the broker acknowledged at the ack level (always 0
            with ``ack=0``). Acks are cumulative and in publish order: the
            first ``acked`` messages are stored.
        broker_id: The broker id from the ack stream, once received.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        topic: str,
        *,
        client_id: int,
        ack: int,
        batch_bytes: int,
        linger: float | None,
        max_inflight_bytes: int,
        close_timeout: float,
        dial_back: bool,
    ) -> None:
        self.topic = topic
        self.client_id = client_id
        self.ack = ack
        self.published = 0
        self.sent = 0
        self.acked = 0
        self.broker_id: int | None = None
        self._stream = stream
        self._linger = linger
        self._max_inflight = max_inflight_bytes
        self._close_timeout = close_timeout
        self._dial_back = dial_back
        self._same_connection_acks = ack >= 1 and not dial_back
        # The open batch: header space, then records packed back to back.
        self._capacity = BATCH_HEADER_SIZE + batch_bytes
        self._free: list[bytearray] = []
        self._buffer = bytearray(self._capacity)
        self._fill = BATCH_HEADER_SIZE
        self._count = 0
        self._batch_seq = 0
        self._batch_started = 0.0
        # Sealed batches not yet written, and batches holding window space.
        self._unsent: deque[_Sealed] = deque()
        self._inflight: deque[_InFlight] = deque()
        self._inflight_bytes = 0
        self._progress = trio.lowlevel.ParkingLot()  # acks, sends, failure
        self._sealed_lot = trio.lowlevel.ParkingLot()  # wakes the sender
        self._batch_opened = trio.lowlevel.ParkingLot()  # wakes the linger task
        self._failure: _Failure | None = None
        self._closing = False
        self._closed = False
        self._eof_sent = False
        self._reader_done = trio.Event()
        self._ack_connections = 0
        self._ack_connections_lot = trio.lowlevel.ParkingLot()
        self._dial_back_acks = 0
        self._peer_host: str | None = None
        if isinstance(stream, trio.SocketStream):
            try:
                self._peer_host = stream.socket.getpeername()[0]
            except OSError:  # already disconnected: the reader will tell
                pass

    # -- the public API ---------------------------------------------------------

    @property
    def failed(self) -> bool:
        """Whether the broker reported an error or the connection failed."""
        return self._failure is not None

    async def publish(self, payload: bytes | bytearray | memoryview) -> None:
        """Add one message (any bytes-like object of bytes) to the current batch.

        The payload is copied, so the caller may reuse its buffer at once. The
        batch is sent when it is full, when :meth:`flush` is called, or after
        the linger time. Waits while the in-flight window is full.

        Raises:
            BrokerError: The broker reported an error, or failed; ``acked``
                says how many messages are stored.
            trio.ClosedResourceError: The publisher's context has exited.

        Cancellation:
            If cancelled, the message was not published.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        size = len(payload)
        padded = padded_size(size)
        while not self._make_room(padded):
            await self._progress.park()
        self._append(payload, size, padded)
        if not self._linger:
            self._seal()
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def publish_many(self, payloads: Iterable[bytes | bytearray | memoryview]) -> None:
        """Publish several messages, in order, with one checkpoint per batch.

        Faster than calling :meth:`publish` in a loop: it only yields to the
        scheduler when a batch is sealed or the window is full.

        Raises:
            BrokerError: As for :meth:`publish`.
            trio.ClosedResourceError: The publisher's context has exited.

        Cancellation:
            If cancelled, a prefix of ``payloads`` has been published;
            :attr:`published` says how many messages in total.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        self._check_usable()
        pack = MESSAGE_HEADER.pack_into
        client_id = self.client_id
        for payload in payloads:
            size = len(payload)
            padded = MESSAGE_HEADER_SIZE + (size + ALIGN - 1) // ALIGN * ALIGN
            pos = self._fill
            end = pos + padded
            buf = self._buffer
            if (
                self._count
                and end < len(buf)
                and self._inflight_bytes + padded <= self._max_inflight
                and self._failure is None
            ):
                # The fast path, inlined: the record goes into the open batch,
                # which stays open.
                pack(buf, pos, padded, 0, UNASSIGNED_OFFSET, 0, 0, self.published, client_id, size)
                data = pos + MESSAGE_HEADER_SIZE
                buf[data : data + size] = payload
                if end != data + size:
                    buf[data + size : end] = _ZEROS[: end - data - size]
                self._fill = end
                self._count += 1
                self.published += 1
                self._inflight_bytes += padded
                continue
            seq = self._batch_seq
            while not self._make_room(padded):
                await self._progress.park()
            self._append(payload, size, padded)
            if self._batch_seq != seq:
                # A batch was sealed: let the sender start writing it.
                await trio.lowlevel.cancel_shielded_checkpoint()
        if not self._linger:
            self._seal()
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def flush(self) -> None:
        """Send the current batch and wait until every message published so
        far reached the ack level (with ``ack=0``: was handed to the kernel).

        Raises:
            BrokerError: The broker reported an error or failed before that.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        self._check_usable()
        self._seal()
        target = self.published
        while (self.acked if self.ack else self.sent) < target:
            self._raise_if_failed()
            await self._progress.park()
        await trio.lowlevel.cancel_shielded_checkpoint()

    # -- building batches ---------------------------------------------------------

    def _check_usable(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the publisher's context has exited")
        self._raise_if_failed()

    def _make_room(self, padded: int) -> bool:
        """Seal the open batch if the record does not fit; False if the
        window has no room for it yet."""
        self._check_usable()
        if self._count and self._fill + padded > self._capacity:
            self._seal()
        if self._inflight_bytes and self._inflight_bytes + padded > self._max_inflight:
            return False
        if not self._count and BATCH_HEADER_SIZE + padded > len(self._buffer):
            # A message larger than a batch travels alone in its own buffer.
            self._buffer = bytearray(BATCH_HEADER_SIZE + padded)
        return True

    def _append(self, payload: bytes | bytearray | memoryview, size: int, padded: int) -> None:
        buf = self._buffer
        pos = self._fill
        MESSAGE_HEADER.pack_into(
            buf, pos, padded, 0, UNASSIGNED_OFFSET, 0, 0, self.published, self.client_id, size
        )
        data = pos + MESSAGE_HEADER_SIZE
        buf[data : data + size] = payload
        end = pos + padded
        if end != data + size:  # padding: content undefined, zeroed anyway
            buf[data + size : end] = _ZEROS[: end - data - size]
        self._fill = end
        self._count += 1
        self.published += 1
        self._inflight_bytes += padded
        if self._count == 1:
            self._batch_started = trio.current_time()
            self._batch_opened.unpark_all()
        if end >= len(buf):
            self._seal()

    def _seal(self) -> None:
        if not self._count:
            return
        buf = self._buffer
        total = self._fill - BATCH_HEADER_SIZE
        BATCH_HEADER.pack_into(
            buf, 0, self._batch_seq, self.client_id, self._count, 0, 0, 0, 0, total, 0, 0, 0, 0
        )
        self._unsent.append(_Sealed(buf, self._fill, self.published))
        self._inflight.append(_InFlight(self.published, total))
        self._batch_seq += 1
        self._buffer = self._free.pop() if self._free else bytearray(self._capacity)
        self._fill = BATCH_HEADER_SIZE
        self._count = 0
        self._sealed_lot.unpark_all()

    def _release(self, count: int) -> None:
        """Give back the window space of every batch up to message ``count``."""
        inflight = self._inflight
        while inflight and inflight[0].end_count <= count:
            self._inflight_bytes -= inflight.popleft().nbytes
        self._progress.unpark_all()

    # -- failures -------------------------------------------------------------------

    def _fail(self, code: int, message: str, cause: BaseException | None = None) -> None:
        if self._failure is None:
            self._failure = _Failure(code, message, cause)
            logger.debug("publisher %d: %s", self.client_id, message)
        self._progress.unpark_all()
        self._sealed_lot.unpark_all()

    def _raise_if_failed(self) -> None:
        failure = self._failure
        if failure is not None:
            raise BrokerError(failure.code, failure.message, self.acked) from failure.cause

    # -- background tasks -----------------------------------------------------------

    async def _send_batches(self) -> None:
        """Write sealed batches in order until closing or failed."""
        unsent = self._unsent
        while True:
            while not unsent:
                if self._closing or self._failure is not None:
                    return
                await self._sealed_lot.park()
            if self._failure is not None:
                return
            batch = unsent[0]
            try:
                await self._stream.send_all(memoryview(batch.buffer)[: batch.size])
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                # The reader sees the same end of the connection, with the
                # broker's error frame if there is one; it reports the failure.
                logger.debug("publisher %d: send failed: %r", self.client_id, exc)
                return
            unsent.popleft()
            self.sent = batch.end_count
            if len(batch.buffer) == self._capacity:
                self._free.append(batch.buffer)
            if not self.ack:
                self._release(self.sent)
            self._progress.unpark_all()

    async def _linger_loop(self) -> None:
        """Seal a batch that has waited ``linger`` seconds for more messages."""
        assert self._linger
        while True:
            while not self._count:
                await self._batch_opened.park()
            seq = self._batch_seq
            await trio.sleep_until(self._batch_started + self._linger)
            if self._batch_seq == seq:
                self._seal()

    async def _read_publish_connection(self) -> None:
        """Read acks (same-connection mode) and error frames; never raises."""
        # Error frames can come where the broker id would (a refused
        # handshake); the decoder tells them apart.
        decoder = AckDecoder(expect_broker_id=self._same_connection_acks)
        try:
            while True:
                try:
                    data = await self._stream.receive_some(_RECEIVE_SIZE)
                except trio.BrokenResourceError as exc:
                    await self._broker_failed(f"connection to the broker broke: {exc!r}", exc)
                    return
                except trio.ClosedResourceError:
                    return  # we closed it
                if not data:
                    if not self._eof_sent:
                        await self._broker_failed(
                            "the broker closed the connection without an error frame"
                        )
                    return
                for event in decoder.feed(data):
                    if isinstance(event, ErrorFrame):
                        await self._wait_ack_connections()
                        self._fail(event.code, event.text)
                        return
                    if not self._same_connection_acks:
                        self._fail(
                            BROKER_FAILED,
                            "the broker sent an ack count on a connection without acks",
                        )
                        return
                    self._on_ack(event.count)
                if self.broker_id is None and decoder.broker_id is not None:
                    self.broker_id = decoder.broker_id
        finally:
            self._reader_done.set()

    async def _broker_failed(self, message: str, cause: BaseException | None = None) -> None:
        await self._wait_ack_connections()
        self._fail(BROKER_FAILED, message, cause)

    async def _wait_ack_connections(self) -> None:
        # Dial-back counts travel on their own connection and may still be on
        # the way when the publish connection reports the end; the broker
        # closes the ack connection after its final count.
        with trio.move_on_after(self._close_timeout):
            while self._ack_connections:
                await self._ack_connections_lot.park()

    def _on_ack(self, count: int) -> None:
        if count > self.acked:
            self.acked = min(count, self.published)
            self._release(self.acked)

    async def _read_ack_connection(self, stream: trio.abc.Stream) -> None:
        """Handle one dial-back ack connection: broker id, then counts."""
        if isinstance(stream, trio.SocketStream) and self._peer_host is not None:
            peer = stream.socket.getpeername()[0]
            if peer != self._peer_host:
                logger.warning(
                    "publisher %d: ignoring an ack connection from %s", self.client_id, peer
                )
                await trio.aclose_forcefully(stream)
                return
        self._ack_connections += 1
        decoder = AckDecoder(expect_broker_id=True)
        last = 0
        try:
            async with stream:
                while data := await stream.receive_some(_RECEIVE_SIZE):
                    for event in decoder.feed(data):
                        if isinstance(event, AckCount):
                            # Like the C++ client: sum the increases of every
                            # ack connection.
                            self._dial_back_acks += event.count - last
                            last = event.count
                            self._on_ack(self._dial_back_acks)
                        else:  # never sent on an ack connection (spec section 4)
                            logger.warning(
                                "publisher %d: error frame on the ack connection: %s",
                                self.client_id,
                                event.text,
                            )
                    if self.broker_id is None and decoder.broker_id is not None:
                        self.broker_id = decoder.broker_id
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            logger.debug("publisher %d: ack connection ended: %r", self.client_id, exc)
        finally:
            self._ack_connections -= 1
            self._ack_connections_lot.unpark_all()

    # -- closing --------------------------------------------------------------------

    async def _finish(self) -> None:
        """Flush, then end the stream in order (the clean exit)."""
        await self.flush()
        self._closing = True
        self._sealed_lot.unpark_all()
        if self.ack or not isinstance(self._stream, trio.abc.HalfCloseableStream):
            return
        # Ack level 0 has no confirmations, but the broker closes the
        # connection only after it dealt with every batch: wait for that, so
        # an error on the last batches is still reported.
        with trio.move_on_after(self._close_timeout) as scope:
            self._eof_sent = True
            try:
                await self._stream.send_eof()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            await self._reader_done.wait()
        if scope.cancelled_caught:
            logger.debug("publisher %d: no end of stream from the broker", self.client_id)
        self._raise_if_failed()


def _check_client_id(client_id: int | None) -> None:
    if client_id is not None and not 0 <= client_id < 2**32:
        raise ValueError(f"client_id must fit in 32 bits, not {client_id}")


def _check_publisher_options(
    topic: str, ack: int, batch_bytes: int, linger: float | None, max_inflight: int | None
) -> int:
    encode_topic(topic)
    if not 0 <= ack <= MAX_ACK_LEVEL:
        raise ValueError(f"ack must be 0..{MAX_ACK_LEVEL}, not {ack}")
    if batch_bytes < ALIGN + MESSAGE_HEADER_SIZE:
        raise ValueError(f"batch_bytes must be at least {ALIGN + MESSAGE_HEADER_SIZE}")
    if linger is not None and not (linger >= 0 and math.isfinite(linger)):
        raise ValueError(f"linger must be a finite number of seconds >= 0, not {linger}")
    window = 4 * batch_bytes if max_inflight is None else max_inflight
    if window < batch_bytes:
        raise ValueError(f"max_inflight_bytes ({window}) must be >= batch_bytes ({batch_bytes})")
    return window


@asynccontextmanager
async def open_publisher(
    host: str,
    port: int,
    topic: str,
    *,
    ack: int = 1,
    batch_bytes: int = DEFAULT_BATCH_BYTES,
    linger: float | None = DEFAULT_LINGER,
    client_id: int | None = None,
    max_inflight_bytes: int | None = None,
    dial_back: bool = False,
    close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
) -> AsyncIterator[Publisher]:
    """Connect to a broker over TCP and publish to ``topic``.

    Leaving the block normally flushes (waits until every message reached the
    ack level) and closes the connection; leaving it with an exception closes
    at once, and unacknowledged messages may be lost.

    Args:
        host: The broker's address.
        port: The broker's data port (``broker.port + broker.id``).
        topic: Topic name, 1-31 characters of ``[A-Za-z0-9._-]``.
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
            waits beyond that. Default ``4 * batch_bytes``.
        dial_back: Receive acks on a connection the broker opens to this
            client (the C++ client's mode) instead of on this connection. The
            client listens on an ephemeral port of its local address; error
            frames still arrive on the publish connection. Needs ``ack >= 1``.
        close_timeout: Seconds to wait, when closing with ``ack=0``, for the
            broker to end the stream, and after an error for the last
            dial-back acks.

    Yields:
        The :class:`Publisher`.

    Raises:
        ConnectionLost: The broker cannot be reached.
        BrokerError: The broker reported an error or failed (from the block's
            calls, or at exit while flushing).
        ValueError: Invalid options.
    """
    _check_publisher_options(topic, ack, batch_bytes, linger, max_inflight_bytes)
    stream = await _connect(host, port)
    async with stream:
        async with open_publisher_on_stream(
            stream,
            topic,
            ack=ack,
            batch_bytes=batch_bytes,
            linger=linger,
            client_id=client_id,
            max_inflight_bytes=max_inflight_bytes,
            dial_back=dial_back,
            close_timeout=close_timeout,
        ) as publisher:
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
) -> AsyncIterator[Publisher]:
    """Publish to ``topic`` over an already open stream to a broker.

    Use it for in-memory streams (a broker started with
    ``open_broker(config, listeners=[...])``), Unix sockets or TLS. The stream
    is closed when the block exits. Arguments and behaviour as for
    :func:`open_publisher`; ``dial_back`` needs a :class:`trio.SocketStream`.
    """
    window = _check_publisher_options(topic, ack, batch_bytes, linger, max_inflight_bytes)
    _check_client_id(client_id)
    if dial_back and ack < 1:
        raise ValueError("dial_back needs ack >= 1")
    if dial_back and not isinstance(stream, trio.SocketStream):
        raise ValueError("dial_back needs a TCP connection (a trio.SocketStream)")
    publisher = Publisher(
        stream,
        topic,
        client_id=random_client_id() if client_id is None else client_id,
        ack=ack,
        batch_bytes=batch_bytes,
        linger=linger,
        max_inflight_bytes=window,
        close_timeout=close_timeout,
        dial_back=dial_back,
    )
    # Exceptions of the block, and from the final flush, are re-raised after
    # the nursery has exited, so the caller gets them as they are rather than
    # wrapped in an exception group; the background tasks never raise.
    error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            try:
                await _start_publisher(publisher, stream, nursery)
            except BaseException as exc:
                error = exc
            if error is None:
                try:
                    yield publisher
                    await publisher._finish()
                except BaseException as exc:
                    error = exc
            nursery.cancel_scope.cancel()
    finally:
        publisher._closed = True
        await trio.aclose_forcefully(stream)
    if error is not None:
        raise error


async def _start_publisher(
    publisher: Publisher, stream: trio.abc.Stream, nursery: trio.Nursery
) -> None:
    ack_port = 0
    if publisher._dial_back:
        assert isinstance(stream, trio.SocketStream)
        local = stream.socket.getsockname()[0]
        try:
            listeners = await trio.open_tcp_listeners(0, host=local)
        except OSError as exc:
            raise ConnectionLost(f"cannot listen for dial-back acks on {local}: {exc}") from exc
        ack_port = listeners[0].socket.getsockname()[1]
        try:
            await nursery.start(
                partial(trio.serve_listeners, publisher._read_ack_connection, listeners)
            )
        except BaseException:
            for listener in listeners:
                await trio.aclose_forcefully(listener)
            raise
    await _send_handshake(
        stream,
        Handshake(
            client_id=publisher.client_id,
            ack=publisher.ack,
            num_msg=0,
            last_addr=0,
            port=ack_port,
            request=ClientRequest.PUBLISH,
            topic=publisher.topic,
        ),
    )
    nursery.start_soon(publisher._read_publish_connection)
    nursery.start_soon(publisher._send_batches)
    if publisher._linger:
        nursery.start_soon(publisher._linger_loop)


# -- the subscriber ---------------------------------------------------------------


class Subscriber:
    """Receives a topic's messages in logical-offset order.

    Get one from :func:`open_subscriber` or :func:`open_subscriber_on_stream`
    and iterate it (``async for message in subscriber``), or call
    :meth:`receive_messages` for whatever has arrived, in bulk.

    .. warning::
        Zero copy: a :class:`Message`'s ``payload`` is a memoryview of the
        subscriber's receive buffer. It is valid until the iteration moves on
        to the next message (for :meth:`receive_messages`: until the next
        call); after that the buffer is reused and the view shows other
        bytes. Copy what you keep: ``bytes(message.payload)``.

    Attributes:
        topic: The topic.
        position: The logical offset of the next message to be handed out.
        received: Messages handed out so far.
    """

    def __init__(self, stream: trio.abc.Stream, topic: str, start: int, buffer_bytes: int) -> None:
        self.topic = topic
        self.position = start
        self.received = 0
        self._stream = stream
        self._receiver: Receiver = receiver_for(stream)
        self._buffer = bytearray(max(buffer_bytes, 2 * _RECEIVE_SIZE))
        self._view = memoryview(self._buffer)
        self._start = 0  # first unparsed byte
        self._end = 0  # end of received bytes
        self._ready: list[Message] = []
        self._next = 0
        self._error: BaseException | None = None

    def __aiter__(self) -> Subscriber:
        return self

    async def __anext__(self) -> Message:
        """The next message; waits for one to arrive.

        Raises:
            BrokerError: The broker sent an error frame (code 5 when it shuts
                down) or closed the connection (code :data:`BROKER_FAILED`).
            ProtocolError: The stream is not a valid record stream.
        """
        if self._next < len(self._ready):
            await trio.lowlevel.checkpoint()
        else:
            self._ready = await self.receive_messages()
            self._next = 0
        message = self._ready[self._next]
        self._next += 1
        return message

    async def receive_messages(self) -> list[Message]:
        """Every whole message that has arrived, at least one; waits for one.

        The payload views are valid until the next call (or iteration step).

        Raises:
            BrokerError: As for iteration.
            ProtocolError: As for iteration.
        """
        if self._next < len(self._ready):
            # Messages an iteration has not handed out yet come first.
            rest = self._ready[self._next :]
            self._ready, self._next = [], 0
            await trio.lowlevel.checkpoint()
            return rest
        self._ready, self._next = [], 0
        while True:
            if self._error is not None:
                await trio.lowlevel.checkpoint()
                raise self._error
            self._make_room()
            try:
                n = await self._receiver.receive_into(self._view[self._end :])
            except ConnectionLost as exc:
                raise BrokerError(
                    BROKER_FAILED, f"subscription to {self.topic!r} broke: {exc}"
                ) from exc
            if n == 0:
                self._error = BrokerError(
                    BROKER_FAILED,
                    f"the broker closed the subscription to {self.topic!r} without an error frame",
                )
                if self._end > self._start:
                    self._error = ProtocolError(
                        ErrorCode.BAD_MESSAGE_RECORDS,
                        f"subscription to {self.topic!r} ended inside a record "
                        f"({self._end - self._start} bytes of it received)",
                    )
                continue
            self._end += n
            messages = self._parse()
            if messages:
                return messages

    def _make_room(self) -> None:
        """Move the partial record at the end of the buffer to its start,
        growing the buffer when the record is larger than it."""
        start, end = self._start, self._end
        pending = end - start
        if not pending:
            self._start = self._end = 0
            return
        need = _RECEIVE_SIZE
        if pending >= 8:
            (padded,) = _U64.unpack_from(self._buffer, start)
            if padded != ERROR_MARKER:
                need = max(need, padded - pending)
        if len(self._buffer) - end >= need:
            return
        if pending + need > len(self._buffer):
            # A new buffer: views handed out earlier keep the old one alive.
            self._buffer = bytearray(max(2 * len(self._buffer), pending + need))
            self._buffer[:pending] = self._view[start:end]
            self._view = memoryview(self._buffer)
        else:
            self._buffer[:pending] = self._buffer[start:end]
        self._start, self._end = 0, pending

    def _parse(self) -> list[Message]:
        buf, view = self._buffer, self._view
        pos, end = self._start, self._end
        out: list[Message] = []
        expected = self.position
        unpack = MESSAGE_HEADER.unpack_from
        while end - pos >= 8:
            (padded,) = _U64.unpack_from(buf, pos)
            if padded == ERROR_MARKER:
                if end - pos >= ERROR_FRAME_HEAD.size:
                    _, code, length = ERROR_FRAME_HEAD.unpack_from(buf, pos)
                    if end - pos >= ERROR_FRAME_HEAD.size + length:
                        text = bytes(buf[pos + 16 : pos + 16 + length]).decode("utf-8", "replace")
                        # Hand out the messages before it first.
                        self._error = BrokerError(code, text)
                        pos = end
                break
            if padded < MESSAGE_HEADER_SIZE or padded % ALIGN or padded > MAX_RECORD_BYTES:
                self._error = ProtocolError(
                    ErrorCode.BAD_MESSAGE_RECORDS,
                    f"record at offset {expected} has paddedSize {padded}",
                )
                break
            if end - pos < padded:
                break
            _, _, offset, _, _, client_order, client_id, size = unpack(buf, pos)
            if offset != expected or size > padded - MESSAGE_HEADER_SIZE:
                self._error = ProtocolError(
                    ErrorCode.BAD_MESSAGE_RECORDS,
                    f"record with logical offset {offset} and size {size} (paddedSize {padded})"
                    f" where offset {expected} was due",
                )
                break
            data = pos + MESSAGE_HEADER_SIZE
            out.append(Message(view[data : data + size], offset, client_id, client_order))
            expected += 1
            pos += padded
        self._start = pos
        self.position = expected
        self.received += len(out)
        return out


async def _connect(host: str, port: int) -> trio.SocketStream:
    try:
        return await trio.open_tcp_stream(host, port)
    except OSError as exc:
        raise ConnectionLost(f"cannot connect to a broker at {host}:{port}: {exc}") from exc


async def _send_handshake(stream: trio.abc.Stream, handshake: Handshake) -> None:
    try:
        await stream.send_all(handshake.encode())
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise ConnectionLost(f"cannot send the handshake: {exc!r}") from exc


@asynccontextmanager
async def open_subscriber(
    host: str,
    port: int,
    topic: str,
    *,
    start: int = 0,
    client_id: int | None = None,
    buffer_bytes: int = DEFAULT_RECEIVE_BUFFER,
) -> AsyncIterator[Subscriber]:
    """Connect to a broker over TCP and subscribe to ``topic``.

    The subscriber receives the committed messages of the topic at that
    broker from logical offset ``start`` on, and then each new one as its
    batch commits. A topic that does not exist yet, or an offset beyond its
    end, is waited for.

    Args:
        host: The broker's address.
        port: The broker's data port.
        topic: Topic name.
        start: Logical offset of the first message wanted.
        client_id: Sent in the handshake; default random.
        buffer_bytes: Initial receive buffer size (it grows for records
            larger than it).

    Yields:
        The :class:`Subscriber` (an async iterator of :class:`Message`).

    Raises:
        ConnectionLost: The broker cannot be reached.
        ValueError: Invalid topic name or offset.
    """
    _check_subscriber_options(topic, start)
    stream = await _connect(host, port)
    async with stream:
        async with open_subscriber_on_stream(
            stream, topic, start=start, client_id=client_id, buffer_bytes=buffer_bytes
        ) as subscriber:
            yield subscriber


def _check_subscriber_options(topic: str, start: int) -> None:
    encode_topic(topic)
    if not 0 <= start < UNASSIGNED_OFFSET:
        raise ValueError(f"start must be a logical offset >= 0, not {start}")


@asynccontextmanager
async def open_subscriber_on_stream(
    stream: trio.abc.Stream,
    topic: str,
    *,
    start: int = 0,
    client_id: int | None = None,
    buffer_bytes: int = DEFAULT_RECEIVE_BUFFER,
) -> AsyncIterator[Subscriber]:
    """Subscribe to ``topic`` over an already open stream to a broker.

    The stream is closed when the block exits. Arguments as for
    :func:`open_subscriber`.
    """
    _check_subscriber_options(topic, start)
    _check_client_id(client_id)
    try:
        await _send_handshake(
            stream,
            Handshake(
                client_id=random_client_id() if client_id is None else client_id,
                ack=0,
                num_msg=0,
                last_addr=start,
                port=0,
                request=ClientRequest.SUBSCRIBE,
                topic=topic,
            ),
        )
        yield Subscriber(stream, topic, start, buffer_bytes)
    finally:
        await trio.aclose_forcefully(stream)


__all__ = [
    "BROKER_FAILED",
    "DEFAULT_BATCH_BYTES",
    "DEFAULT_LINGER",
    "Message",
    "Publisher",
    "Subscriber",
    "open_publisher",
    "open_publisher_on_stream",
    "open_subscriber",
    "open_subscriber_on_stream",
    "random_client_id",
]
