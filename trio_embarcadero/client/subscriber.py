"""The subscriber: receives a topic's records and hands them out as messages.

The I/O is one receive loop; what the bytes mean is up to
:class:`~trio_embarcadero.client.records.RecordDecoder`, which owns the buffer
they land in. When the broker goes away (EOF, reset, error 5) the loop
connects again, to the same broker for one broker's stream or to any of the
brokers for the total order, and asks for the first message it has not
received: the application sees each message once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager

import attrs
import trio

from ..errors import (
    BROKER_FAILED,
    BrokerError,
    ConnectionLost,
    ErrorCode,
    NoBrokerError,
    ProtocolError,
)
from ..transport import Receiver, receiver_for
from ..wire import (
    UNASSIGNED_OFFSET,
    ClientRequest,
    Handshake,
    Message,
    MessageView,
    encode_topic,
)
from . import failover
from .connect import choose_client_id, send_handshake
from .failover import BrokerAddress, Endpoint
from .records import MessageBatch, RecordDecoder

#: Default size of a subscriber's receive buffer (it grows for larger records).
DEFAULT_RECEIVE_BUFFER = 1 << 20
#: Default seconds a subscriber goes on trying to reconnect before it fails.
DEFAULT_RECONNECT_TIMEOUT = failover.DEFAULT_FAILOVER_TIMEOUT


@attrs.define(eq=False)
class _Reconnect:
    """How a subscriber reconnects: the brokers, and the state of an outage.

    Attributes:
        links: The brokers it may read from (one for a broker's own stream).
        current: The one it reads from now.
        client_id: Its handshakes' client id.
        timeout: Seconds without a broker before it gives up.
        backoff: Pauses between tries.
        connected: A connection was made since the outage began.
        connected_at: When the current connection was opened.
        outage_since: When the failures of the current outage began.
        next_try: When to try the brokers next.
    """

    links: Sequence[Endpoint]
    current: int
    client_id: int
    timeout: float
    backoff: failover.Backoff = attrs.Factory(failover.Backoff)
    connected: bool = True
    connected_at: float = 0.0
    outage_since: float | None = None
    next_try: float = 0.0


class Subscriber:
    """Receives a topic's messages in logical-offset order (on an order-5
    topic: one broker's in total order, or every broker's with ``ordered``).

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

    Failover:
        When the broker goes away (the stream ends without an error frame or
        is reset, or the broker sends error 5 as it shuts down), the next
        receive connects again and asks for the first message not received
        yet (:attr:`position`), so no message is handed out twice or skipped.
        One broker's stream of an order-5 topic comes in total order, its
        logical offsets not always rising: it asks for the lowest offset not
        received yet, and drops the messages above it that come again.
        One broker's stream (``ordered=False``) exists on that broker only:
        the subscriber waits for it to come back. The total order
        (``ordered=True``) is the same on every broker: it goes on at the next
        broker of its list at once. Between tries it pauses from 50 ms up to
        1 s (with jitter); after ``reconnect_timeout_s`` without a broker the
        receive raises :class:`~trio_embarcadero.errors.NoBrokerError`.

    Attributes:
        topic: The topic.
        received: Messages received so far (handed out or about to be).
        reconnects: Connections opened after the broker went away.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        topic: str,
        start: int,
        buffer_bytes: int,
        *,
        ordered: bool = False,
        plan: _Reconnect | None = None,
    ) -> None:
        self.topic = topic
        self.received = 0
        self.reconnects = 0
        self._ordered = ordered
        self._stream = stream
        self._plan = plan
        if plan is not None:
            plan.connected_at = trio.current_time()
        self._receiver: Receiver = receiver_for(stream)
        self._decoder = RecordDecoder(start, buffer_bytes, ordered=ordered)
        # The last batch received, and its messages iteration has not handed
        # out yet (each Message is built as it is handed out).
        self._batch: MessageBatch | None = None
        self._rest: Iterator[Message] = iter(())
        self._error: BrokerError | ProtocolError | None = None

    @property
    def position(self) -> int:
        """The logical offset (ordered: the total order) after the last
        message received (the next one due, unless iteration still holds
        messages received before it). On one broker's stream of an order-5
        topic, the lowest logical offset not received yet: every one below it
        was, and some above it may have been (a batch never ordered, or let
        go by retention before it was sent, keeps it at its first offset)."""
        return self._decoder.position

    @property
    def broker(self) -> str | None:
        """The broker it reads from now (``host:port``); None over a stream
        given to :func:`open_subscriber_on_stream`."""
        plan = self._plan
        return None if plan is None else plan.links[plan.current].name

    @property
    def skipped(self) -> int:
        """Messages the subscription jumped over because the broker's
        retention had reclaimed them (the offsets of the messages handed out
        show where). Not counted on one broker's stream of an order-5 topic,
        whose offsets do not only rise."""
        return self._decoder.skipped

    def __aiter__(self) -> Subscriber:
        return self

    async def __anext__(self) -> Message:
        """The next message; waits for one to arrive.

        Does not checkpoint when the message has already arrived (see
        *Checkpoints* above).

        Raises:
            BrokerError: The broker sent an error frame that reconnecting
                does not help with (6 when the topic was deleted), or a
                :class:`~trio_embarcadero.errors.NoBrokerError` after
                ``reconnect_timeout_s`` without a broker. With reconnecting
                off, also error 5 (the broker shuts down) and the end of the
                connection (code :data:`BROKER_FAILED`).
            ProtocolError: The stream is not a valid record stream.
        """
        for message in self._rest:
            return message
        self._rest = rest = (await self._receive()).iter_messages()
        return next(rest)

    async def receive_messages(self) -> list[Message]:
        """Every whole message that has arrived, at least one; waits for one.

        The payloads are copies, yours to keep.

        Raises:
            BrokerError: As for iteration.
            ProtocolError: As for iteration.
        """
        if rest := list(self._rest):
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
        if self._batch is not None and (message := next(self._rest, None)) is not None:
            # Messages an iteration received but has not handed out yet.
            self._rest = iter(())
            await trio.lowlevel.checkpoint()
            return self._batch.since(message.offset)
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
            error = self._error
            if error is not None:
                if (
                    self._plan is not None
                    and failover.fails_over(error.code)
                    and not isinstance(error, NoBrokerError)
                ):
                    await self._reconnect(error)
                    continue
                await trio.lowlevel.checkpoint()
                raise error
            try:
                n = await self._receiver.receive_into(decoder.receive_buffer())
            except ConnectionLost as exc:
                self._error = BrokerError(
                    BROKER_FAILED, f"subscription to {self.topic!r} broke: {exc}"
                )
                self._error.__cause__ = exc
                continue
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
        if pending and self._plan is not None:
            # A broker that dies in the middle of a write: the record comes
            # again from the next connection.
            return BrokerError(
                BROKER_FAILED,
                f"the broker closed the subscription to {self.topic!r} inside a record "
                f"({pending} bytes of it received)",
            )
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

    async def _reconnect(self, failure: BrokerError | ProtocolError) -> None:
        """Connect again after ``failure`` and subscribe from :attr:`position`.

        Raises:
            NoBrokerError: No broker for ``reconnect_timeout_s``.
        """
        plan = self._plan
        assert plan is not None
        await trio.aclose_forcefully(self._stream)
        now = trio.current_time()
        # A connection that lasted ends the last outage (and its backoff); one
        # that failed at once (a broker refusing with error 5 while it drains)
        # does not, so such a broker is not knocked at in a loop; nor does a
        # reconnect a cancellation cut short (a receive under a timeout).
        lasted = plan.connected and now - plan.connected_at > failover.BACKOFF_MAX
        if plan.outage_since is None or lasted:
            plan.outage_since = plan.next_try = now
            plan.backoff.reset()
        elif plan.connected:
            plan.next_try = now + plan.backoff.next_delay()
        # Else a reconnect was cut short (a receive under a timeout): it goes on
        # at the time it was to try next, so that short receives get there too.
        plan.connected = False
        deadline = plan.outage_since + plan.timeout
        links = plan.links
        # One broker's stream is on that broker only; the total order is on
        # every broker, so the next one is tried first.
        count = len(links) if self._ordered else 1
        tries = [
            (plan.current + (1 if self._ordered else 0) + i) % len(links) for i in range(count)
        ]
        last = f"{links[plan.current].name}: {failure}"
        while True:
            await trio.sleep_until(min(plan.next_try, deadline))
            for index in tries:
                try:
                    stream = await links[index].open()
                except ConnectionLost as exc:
                    last = str(exc)
                    continue
                try:
                    await send_handshake(
                        stream,
                        _handshake(plan.client_id, self.topic, self.position, self._ordered),
                    )
                except ConnectionLost as exc:
                    await trio.aclose_forcefully(stream)
                    last = f"{links[index].name}: {exc}"
                    continue
                except BaseException:
                    # Cancelled (a receive under a timeout, or the caller's
                    # scope) before the stream is the subscriber's: nothing
                    # else would close it.
                    await trio.aclose_forcefully(stream)
                    raise
                plan.current = index
                plan.connected = True
                plan.connected_at = trio.current_time()
                self._stream = stream
                self._receiver = receiver_for(stream)
                self._decoder.restart()
                self._error = None
                self.reconnects += 1
                return
            now = trio.current_time()
            if now >= deadline:
                names = ", ".join(links[i].name for i in tries)
                gave_up = NoBrokerError(
                    failure.code,
                    f"no broker for {plan.timeout:g} s (tried {names}); last failure: {last}",
                    brokers=tuple(links[i].name for i in tries),
                    timeout=plan.timeout,
                )
                gave_up.__cause__ = failure
                self._error = gave_up  # every later receive raises it
                raise gave_up
            plan.next_try = now + plan.backoff.next_delay()


class _Batches:
    """The async iterator :meth:`Subscriber.batches` returns."""

    def __init__(self, subscriber: Subscriber) -> None:
        self._subscriber = subscriber

    def __aiter__(self) -> _Batches:
        return self

    async def __anext__(self) -> MessageBatch:
        return await self._subscriber.receive_batch()


def _check_options(topic: str, start: int, client_id: int | None, reconnect_timeout: float) -> int:
    """Check the options of both ``open_subscriber*`` functions; the client id to use."""
    encode_topic(topic)
    if not 0 <= start < UNASSIGNED_OFFSET:
        raise ValueError(f"start must be a logical offset >= 0, not {start}")
    failover.check_timeout("reconnect_timeout_s", reconnect_timeout)
    return choose_client_id(client_id)


def _handshake(client_id: int, topic: str, start: int, ordered: bool) -> Handshake:
    return Handshake(
        client_id=client_id,
        ack=0,
        num_msg=0,
        last_addr=start,
        port=0,
        request=ClientRequest.SUBSCRIBE_ORDERED if ordered else ClientRequest.SUBSCRIBE,
        topic=topic,
    )


@asynccontextmanager
async def _subscribing(
    stream: trio.abc.Stream,
    topic: str,
    start: int,
    client_id: int,
    buffer_bytes: int,
    ordered: bool = False,
    plan: _Reconnect | None = None,
) -> AsyncIterator[Subscriber]:
    """Subscribe over ``stream``: the body of both ``open_subscriber*``."""
    subscriber: Subscriber | None = None
    try:
        await send_handshake(stream, _handshake(client_id, topic, start, ordered))
        subscriber = Subscriber(stream, topic, start, buffer_bytes, ordered=ordered, plan=plan)
        yield subscriber
    finally:
        await trio.aclose_forcefully(stream)
        if subscriber is not None:
            await trio.aclose_forcefully(subscriber._stream)  # after a reconnect


@asynccontextmanager
async def open_subscriber(
    host: str = "",
    port: int = 0,
    topic: str = "",
    *,
    brokers: Sequence[BrokerAddress] | None = None,
    start: int = 0,
    client_id: int | None = None,
    buffer_bytes: int = DEFAULT_RECEIVE_BUFFER,
    ordered: bool = False,
    reconnect_timeout_s: float = DEFAULT_RECONNECT_TIMEOUT,
) -> AsyncIterator[Subscriber]:
    """Connect to a broker over TCP and subscribe to ``topic``.

    The subscriber receives the committed messages of the topic at that
    broker from logical offset ``start`` on, and then each new one as its
    batch commits. A topic that does not exist yet, or an offset beyond its
    end, is waited for. When the broker goes away, it reconnects and goes on
    from the first message it has not received (see :class:`Subscriber`,
    *Failover*).

    Args:
        host: The broker's address (with ``port``; or use ``brokers``).
        port: The broker's data port.
        topic: Topic name.
        brokers: For ``ordered=True``: several brokers of the region, each a
            ``(host, port)`` pair or an async function that opens a stream to
            one; the subscriber reads from the first it reaches and moves on to
            the next when that one goes away. One broker's stream
            (``ordered=False``) takes exactly one (a function that opens a
            stream to it, say).
        start: Logical offset of the first message wanted.
        client_id: Sent in the handshake; default random.
        buffer_bytes: Initial receive buffer size (it grows for records
            larger than it).
        ordered: Read the total order of an order-5 topic (``client_req =
            3``): every broker's messages, from any broker, in one order;
            ``start`` and each message's ``offset`` are then total orders.
            The broker refuses it for an order-0 topic (error 1).
        reconnect_timeout_s: Seconds to go on trying to reconnect without
            any broker before a receive raises
            :class:`~trio_embarcadero.errors.NoBrokerError`. 0 turns
            reconnecting off: the broker's error (or the end of the stream)
            is raised as a :class:`~trio_embarcadero.errors.BrokerError`.

    Yields:
        The :class:`Subscriber` (an async iterator of :class:`Message`).

    Raises:
        ConnectionLost: No broker can be reached when the block is entered
            (each is tried once, in order).
        ValueError: Invalid topic name, offset, client id or brokers (raised
            before connecting).
    """
    chosen_id = _check_options(topic, start, client_id, reconnect_timeout_s)
    links = failover.endpoints(host, port, brokers)
    if len(links) > 1 and not ordered:
        raise ValueError(
            "a subscriber of one broker's stream (ordered=False) reads from one broker: "
            "give one, or read the total order with ordered=True"
        )
    first, stream = await failover.connect_first(links)
    plan = None
    if reconnect_timeout_s > 0:
        plan = _Reconnect(links, first, chosen_id, reconnect_timeout_s)
    async with _subscribing(
        stream, topic, start, chosen_id, buffer_bytes, ordered, plan
    ) as subscriber:
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
    stream open. A stream cannot be opened again, so the subscriber does not
    reconnect: the end of the stream raises, as ``reconnect_timeout_s=0``
    makes :func:`open_subscriber` do.
    """
    chosen_id = _check_options(topic, start, client_id, 0.0)
    async with _subscribing(stream, topic, start, chosen_id, buffer_bytes, ordered) as subscriber:
        yield subscriber
