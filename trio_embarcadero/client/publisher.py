"""The publisher's I/O: a sender, a linger timer and ack readers over PublishBatches.

:meth:`Publisher.publish` packs into the open batch of a
:class:`~trio_embarcadero.client.batches.PublishBatches` and returns; background
tasks do the rest. The sender writes sealed batches in order, the linger task
seals a batch that has waited long enough for more messages, and a reader on
the publish connection (plus one per dial-back connection the broker opens)
turns ack counts into released window space and error frames into a failure
that the next call raises.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from functools import partial

import attrs
import trio

from ..errors import BROKER_FAILED, BrokerError, ConnectionLost
from ..wire import (
    ALIGN,
    MAX_ACK_LEVEL,
    MESSAGE_HEADER_SIZE,
    AckCount,
    AckDecoder,
    ClientRequest,
    ErrorFrame,
    Handshake,
    encode_topic,
)
from .batches import OPENED, PACKED, SEALED, Payload, PublishBatches
from .connect import choose_client_id, connect, send_handshake

logger = logging.getLogger(__name__)

#: Default batch payload size; must not exceed the broker's ``max_batch_bytes``.
DEFAULT_BATCH_BYTES = 2 * 2**20
#: Default time a partly filled batch waits for more messages before it is sent.
DEFAULT_LINGER = 0.005
#: Seconds a closing publisher waits for the broker to confirm the end of the
#: stream (ack level 0) or for the last dial-back acks after an error.
DEFAULT_CLOSE_TIMEOUT = 5.0
_RECEIVE_SIZE = 1 << 16
# publish_many takes messages from its iterable this many at a time.
_PUBLISH_MANY_CHUNK = 4096


@attrs.frozen
class _Failure:
    code: int
    message: str
    cause: BaseException | None


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


class Publisher:
    """Publishes messages to one topic over one connection.

    Get one from :func:`open_publisher` or :func:`open_publisher_on_stream`;
    the constructor is internal.

    Attributes:
        topic: The topic it publishes to.
        client_id: Its client id (message headers and ack streams name it).
        ack: The ack level asked for: 0 none, 1 stored in the log, 2 durable.
        broker_id: The broker id from the ack stream, once received.
    """

    def __init__(self, stream: trio.abc.Stream, options: _Options) -> None:
        self.topic = options.topic
        self.client_id = options.client_id
        self.ack = options.ack
        self.broker_id: int | None = None
        self._stream = stream
        self._linger = options.linger
        self._close_timeout = options.close_timeout
        self._dial_back = options.dial_back
        self._same_connection_acks = options.ack >= 1 and not options.dial_back
        self._batches = PublishBatches(
            options.client_id,
            batch_bytes=options.batch_bytes,
            max_inflight_bytes=options.max_inflight_bytes,
            release_on_send=not options.ack,
        )
        self._batch_started = 0.0
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
    def published(self) -> int:
        """Messages accepted by :meth:`publish` so far."""
        return self._batches.published

    @property
    def sent(self) -> int:
        """Messages whose batch has been handed to the kernel."""
        return self._batches.sent

    @property
    def acked(self) -> int:
        """Messages the broker acknowledged at the ack level (always 0 with
        ``ack=0``). Acks are cumulative and in publish order: the first
        ``acked`` messages are stored."""
        return self._batches.acked

    @property
    def failed(self) -> bool:
        """Whether the broker reported an error or the connection failed."""
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
            BrokerError: The broker reported an error, or failed; ``acked``
                says how many messages are stored.
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
            BrokerError: The broker reported an error or failed before that.
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

    def _on_ack(self, count: int) -> None:
        if self._batches.ack(count):
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
        batches = self._batches
        while True:
            data = batches.next_unsent()
            while data is None:
                if self._closing or self._failure is not None:
                    return
                await self._sealed_lot.park()
                data = batches.next_unsent()
            if self._failure is not None:
                return
            try:
                await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                # The reader sees the same end of the connection, with the
                # broker's error frame if there is one; it reports the failure.
                logger.debug("publisher %d: send failed: %r", self.client_id, exc)
                return
            batches.mark_sent()
            self._progress.unpark_all()

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

    # -- starting and closing -------------------------------------------------------

    async def _start(self, nursery: trio.Nursery) -> None:
        """Listen for dial-back acks if asked, send the handshake, start the tasks."""
        ack_port = 0
        if self._dial_back:
            ack_port = await self._listen_for_acks(nursery)
        await send_handshake(
            self._stream,
            Handshake(
                client_id=self.client_id,
                ack=self.ack,
                num_msg=0,
                last_addr=0,
                port=ack_port,
                request=ClientRequest.PUBLISH,
                topic=self.topic,
            ),
        )
        nursery.start_soon(self._read_publish_connection)
        nursery.start_soon(self._send_batches)
        if self._linger:
            nursery.start_soon(self._linger_loop)

    async def _listen_for_acks(self, nursery: trio.Nursery) -> int:
        """Serve dial-back ack connections on an ephemeral port; return it."""
        assert isinstance(self._stream, trio.SocketStream)
        local = self._stream.socket.getsockname()[0]
        try:
            listeners = await trio.open_tcp_listeners(0, host=local)
        except OSError as exc:
            raise ConnectionLost(f"cannot listen for dial-back acks on {local}: {exc}") from exc
        port: int = listeners[0].socket.getsockname()[1]
        try:
            await nursery.start(partial(trio.serve_listeners, self._read_ack_connection, listeners))
        except BaseException:
            for listener in listeners:
                await trio.aclose_forcefully(listener)
            raise
        return port

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


@asynccontextmanager
async def _publishing(stream: trio.abc.Stream, options: _Options) -> AsyncIterator[Publisher]:
    """Run a publisher over ``stream``: the body of both ``open_publisher*``."""
    publisher = Publisher(stream, options)
    # Exceptions of the block, and from the final flush, are re-raised after
    # the nursery has exited, so the caller gets them as they are rather than
    # wrapped in an exception group; the background tasks never raise.
    error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            try:
                await publisher._start(nursery)
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
            Each such publisher listens on a port of its own, so two of them
            on one host must not share ``client_id`` and topic: the broker
            refuses the second with ``NOT_ALLOWED``.
        close_timeout: Seconds to wait, when closing with ``ack=0``, for the
            broker to end the stream, and after an error for the last
            dial-back acks.

    Yields:
        The :class:`Publisher`.

    Raises:
        ConnectionLost: The broker cannot be reached.
        BrokerError: The broker reported an error or failed (from the block's
            calls, or at exit while flushing).
        ValueError: Invalid options (raised before connecting).
    """
    options = _check_options(
        topic, ack, batch_bytes, linger, client_id, max_inflight_bytes, dial_back, close_timeout
    )
    async with _publishing(await connect(host, port), options) as publisher:
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

    Raises:
        ValueError: Invalid options; the stream is left open.
    """
    options = _check_options(
        topic, ack, batch_bytes, linger, client_id, max_inflight_bytes, dial_back, close_timeout
    )
    if dial_back and not isinstance(stream, trio.SocketStream):
        raise ValueError("dial_back needs a TCP connection (a trio.SocketStream)")
    async with _publishing(stream, options) as publisher:
        yield publisher
