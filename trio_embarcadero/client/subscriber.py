"""The subscriber: receives a topic's records and hands them out as messages.

The I/O is one receive loop; what the bytes mean is up to
:class:`~trio_embarcadero.client.records.RecordDecoder`, which owns the buffer
they land in.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

import trio

from ..errors import BROKER_FAILED, BrokerError, ConnectionLost, ErrorCode, ProtocolError
from ..transport import Receiver, receiver_for
from ..wire import (
    UNASSIGNED_OFFSET,
    ClientRequest,
    Handshake,
    Message,
    MessageView,
    encode_topic,
)
from .connect import choose_client_id, connect, send_handshake
from .records import RecordDecoder

#: Default size of a subscriber's receive buffer (it grows for larger records).
DEFAULT_RECEIVE_BUFFER = 1 << 20

_M = TypeVar("_M", Message, MessageView)


class Subscriber:
    """Receives a topic's messages in logical-offset order.

    Get one from :func:`open_subscriber` or :func:`open_subscriber_on_stream`
    and iterate it (``async for message in subscriber``), or call
    :meth:`receive_messages` for whatever has arrived, in bulk. Either way
    each :class:`Message` has its own copy of the payload (``bytes``), which
    you may keep.

    Zero copy is the opt-in :meth:`receive_views`: its
    :class:`MessageView` payloads are views of the subscriber's receive
    buffer, valid only until the next receive, for a reader that uses each
    payload at once (writes it out, parses it) and keeps nothing.

    Attributes:
        topic: The topic.
        received: Messages handed out so far.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        topic: str,
        start: int,
        buffer_bytes: int,
        *,
        ordered: bool = False,
    ) -> None:
        self.topic = topic
        self.received = 0
        self._receiver: Receiver = receiver_for(stream)
        self._decoder = RecordDecoder(start, buffer_bytes, ordered=ordered)
        self._ready: list[Message] = []
        self._next = 0
        self._error: BrokerError | ProtocolError | None = None

    @property
    def position(self) -> int:
        """The logical offset (ordered: the total order) of the next message
        to be handed out."""
        return self._decoder.position

    @property
    def skipped(self) -> int:
        """Messages the subscription jumped over because the broker's
        retention had reclaimed them (the offsets of the messages handed out
        show where)."""
        return self._decoder.skipped

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

        The payloads are copies, yours to keep.

        Raises:
            BrokerError: As for iteration.
            ProtocolError: As for iteration.
        """
        if rest := self._take_ready():
            await trio.lowlevel.checkpoint()
            return rest
        return await self._receive(self._decoder.feed)

    async def receive_views(self) -> list[MessageView]:
        """As :meth:`receive_messages`, without copying the payloads.

        Each payload is a view of the receive buffer, **valid only until the
        next receive** (a call of this, :meth:`receive_messages` or the next
        iteration step); after that the buffer is reused and a kept view
        shows other messages' bytes. Use them at once, or keep
        :meth:`MessageView.to_message`.

        Raises:
            BrokerError: As for iteration.
            ProtocolError: As for iteration.
        """
        if rest := self._take_ready():
            # Messages an iteration has not handed out yet: copies already.
            await trio.lowlevel.checkpoint()
            return [MessageView(memoryview(m.payload), *m[1:]) for m in rest]
        return await self._receive(self._decoder.feed_views)

    def _take_ready(self) -> list[Message]:
        """The messages an iteration received but has not handed out yet."""
        rest = self._ready[self._next :]
        self._ready, self._next = [], 0
        return rest

    async def _receive(self, feed: Callable[[int], list[_M]]) -> list[_M]:
        """Receive until ``feed`` (of the decoder) turns the bytes into messages."""
        decoder = self._decoder
        while True:
            if self._error is not None:
                await trio.lowlevel.checkpoint()
                raise self._error
            try:
                n = await self._receiver.receive_into(decoder.receive_buffer())
            except ConnectionLost as exc:
                raise BrokerError(
                    BROKER_FAILED, f"subscription to {self.topic!r} broke: {exc}"
                ) from exc
            if n == 0:
                self._error = self._end_of_stream()
                continue
            messages = feed(n)
            # An error after the messages is raised by the next call.
            self._error = decoder.error
            if messages:
                self.received += len(messages)
                return messages

    def _end_of_stream(self) -> BrokerError | ProtocolError:
        pending = self._decoder.pending
        if pending:
            return ProtocolError(
                ErrorCode.BAD_MESSAGE_RECORDS,
                f"subscription to {self.topic!r} ended inside a record "
                f"({pending} bytes of it received)",
            )
        return BrokerError(
            BROKER_FAILED,
            f"the broker closed the subscription to {self.topic!r} without an error frame",
        )


def _check_options(topic: str, start: int, client_id: int | None) -> int:
    """Check the options of both ``open_subscriber*`` functions; the client id to use."""
    encode_topic(topic)
    if not 0 <= start < UNASSIGNED_OFFSET:
        raise ValueError(f"start must be a logical offset >= 0, not {start}")
    return choose_client_id(client_id)


@asynccontextmanager
async def _subscribing(
    stream: trio.abc.Stream,
    topic: str,
    start: int,
    client_id: int,
    buffer_bytes: int,
    ordered: bool = False,
) -> AsyncIterator[Subscriber]:
    """Subscribe over ``stream``: the body of both ``open_subscriber*``."""
    try:
        await send_handshake(
            stream,
            Handshake(
                client_id=client_id,
                ack=0,
                num_msg=0,
                last_addr=start,
                port=0,
                request=ClientRequest.SUBSCRIBE_ORDERED if ordered else ClientRequest.SUBSCRIBE,
                topic=topic,
            ),
        )
        yield Subscriber(stream, topic, start, buffer_bytes, ordered=ordered)
    finally:
        await trio.aclose_forcefully(stream)


@asynccontextmanager
async def open_subscriber(
    host: str,
    port: int,
    topic: str,
    *,
    start: int = 0,
    client_id: int | None = None,
    buffer_bytes: int = DEFAULT_RECEIVE_BUFFER,
    ordered: bool = False,
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
        ordered: Read the total order of an order-5 topic (``client_req =
            3``): every broker's messages, from any broker, in one order;
            ``start`` and each message's ``offset`` are then total orders.
            The broker refuses it for an order-0 topic (error 1).

    Yields:
        The :class:`Subscriber` (an async iterator of :class:`Message`).

    Raises:
        ConnectionLost: The broker cannot be reached.
        ValueError: Invalid topic name, offset or client id (raised before
            connecting).
    """
    chosen_id = _check_options(topic, start, client_id)
    stream = await connect(host, port)
    async with _subscribing(stream, topic, start, chosen_id, buffer_bytes, ordered) as subscriber:
        yield subscriber


@asynccontextmanager
async def open_subscriber_on_stream(
    stream: trio.abc.Stream,
    topic: str,
    *,
    start: int = 0,
    client_id: int | None = None,
    buffer_bytes: int = DEFAULT_RECEIVE_BUFFER,
    ordered: bool = False,
) -> AsyncIterator[Subscriber]:
    """Subscribe to ``topic`` over an already open stream to a broker.

    The stream is closed when the block exits. Arguments as for
    :func:`open_subscriber`; invalid ones raise ``ValueError`` and leave the
    stream open.
    """
    chosen_id = _check_options(topic, start, client_id)
    async with _subscribing(stream, topic, start, chosen_id, buffer_bytes, ordered) as subscriber:
        yield subscriber
