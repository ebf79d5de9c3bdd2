"""The subscriber: receives a topic's records and hands them out as messages.

The I/O is one receive loop; what the bytes mean is up to
:class:`~trio_embarcadero.client.records.RecordDecoder`, which owns the buffer
they land in.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

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
from .records import MessageBatch, RecordDecoder, make_message

#: Default size of a subscriber's receive buffer (it grows for larger records).
DEFAULT_RECEIVE_BUFFER = 1 << 20


class Subscriber:
    """Receives a topic's messages in logical-offset order.

    Get one from :func:`open_subscriber` or :func:`open_subscriber_on_stream`.
    Three ways to read, which may be mixed (each goes on where the other
    stopped):

    * iterate it, ``async for message in subscriber``: one :class:`Message`
      at a time, each with its own copy of the payload (``bytes``), which you
      may keep; :meth:`receive_messages` returns the same, in bulk;
    * :meth:`receive_views`: :class:`MessageView` objects whose payloads are
      views of the receive buffer, valid only until the next receive, for a
      reader that uses each payload at once and keeps nothing;
    * ``async for batch in subscriber.batches()`` (or :meth:`receive_batch`):
      a :class:`MessageBatch` per receive, the records' bytes as one view and
      their fields as numpy arrays, without a Python object per message.

    Checkpoints:
        Every receive from the network is a Trio checkpoint, and each of the
        ``receive_*`` methods checkpoints. Iteration does not checkpoint
        when the next message has already arrived: it is handed out at once,
        with no schedule point and no cancellation check, as if the loop went
        through the list of one :meth:`receive_messages` call. So a loop
        ``async for message in subscriber`` reaches a checkpoint at least once
        per receive (at most ``buffer_bytes`` of records, and at once when it
        has caught up with the broker), and a cancellation takes effect there;
        the messages received before it are not lost but handed out by the
        next call. Await something in the loop's body if it must checkpoint
        more often.

    Attributes:
        topic: The topic.
        received: Messages received so far (handed out or about to be).
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
        # The last batch received, and the fields of its messages iteration
        # has not handed out yet (each Message is built as it is handed out).
        self._batch: MessageBatch | None = None
        self._rest: Iterator[tuple[bytes, int, int, int]] = iter(())
        self._error: BrokerError | ProtocolError | None = None

    @property
    def position(self) -> int:
        """The logical offset (ordered: the total order) after the last
        message received (the next one due, unless iteration still holds
        messages received before it)."""
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

        Does not checkpoint when the message has already arrived (see
        *Checkpoints* above).

        Raises:
            BrokerError: The broker sent an error frame (code 5 when it shuts
                down) or closed the connection (code :data:`BROKER_FAILED`).
            ProtocolError: The stream is not a valid record stream.
        """
        for fields in self._rest:
            return make_message(fields)
        self._rest = rest = (await self._receive()).message_fields()
        return make_message(next(rest))

    async def receive_messages(self) -> list[Message]:
        """Every whole message that has arrived, at least one; waits for one.

        The payloads are copies, yours to keep.

        Raises:
            BrokerError: As for iteration.
            ProtocolError: As for iteration.
        """
        if rest := list(map(make_message, self._rest)):
            await trio.lowlevel.checkpoint()
            return rest
        return (await self._receive()).messages()

    async def receive_views(self) -> list[MessageView]:
        """As :meth:`receive_messages`, without copying the payloads.

        Each payload is a view of the receive buffer, **valid only until the
        next receive** (the next call of any ``receive_*`` method, or the next
        step of an iteration that needs one); after that the buffer is reused
        and a kept view shows other messages' bytes. Use them at once, or keep
        :meth:`MessageView.to_message`.

        Raises:
            BrokerError: As for iteration.
            ProtocolError: As for iteration.
        """
        return (await self.receive_batch()).views()

    async def receive_batch(self) -> MessageBatch:
        """The whole messages that have arrived, at least one, as one
        :class:`MessageBatch`; waits for one.

        Nothing is copied: the batch's ``data`` and payload views are valid
        only until the next receive (as for :meth:`receive_views`).

        Raises:
            BrokerError: As for iteration.
            ProtocolError: As for iteration.
        """
        if self._batch is not None and (fields := next(self._rest, None)) is not None:
            # Messages an iteration received but has not handed out yet.
            self._rest = iter(())
            await trio.lowlevel.checkpoint()
            return self._batch.since(fields[1])
        return await self._receive()

    def batches(self) -> AsyncIterator[MessageBatch]:
        """Iterate over the subscription a receive at a time:
        ``async for batch in subscriber.batches()``.

        Each step is :meth:`receive_batch`, so each checkpoints; a batch is
        valid until the next step. The loop ends only with an exception, as
        iteration over the subscriber does.
        """
        return _Batches(self)

    async def _receive(self) -> MessageBatch:
        """Receive until the decoder completes at least one message."""
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
            batch = decoder.feed_batch(n)
            # An error after the messages is raised by the next call.
            self._error = decoder.error
            if batch is not None:
                self._batch = batch
                self.received += len(batch)
                return batch

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


class _Batches:
    """The async iterator :meth:`Subscriber.batches` returns."""

    def __init__(self, subscriber: Subscriber) -> None:
        self._subscriber = subscriber

    def __aiter__(self) -> _Batches:
        return self

    async def __anext__(self) -> MessageBatch:
        return await self._subscriber.receive_batch()


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
