"""When the client's calls reach a checkpoint, and what cancellation does to them.

The fast paths (``publish_nowait``, ``publish`` with room in the window,
iteration over messages already received) skip Trio's schedule point; these
tests pin down what the docstrings promise instead: a call is either done or
raised, a cancellation loses no message, and the background tasks still run
at least once per batch or receive. Each test talks to a fake broker over
in-memory streams on the autojump clock.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

import pytest
import trio
import trio.testing
from rawclient import ERROR_MARKER, committed

from trio_embarcadero import BrokerError
from trio_embarcadero.client import (
    Message,
    Publisher,
    Subscriber,
    open_publisher_on_stream,
    open_subscriber_on_stream,
)
from trio_embarcadero.wire import (
    ACK_BROKER_ID,
    ACK_COUNT,
    BATCH_HEADER_SIZE,
    ERROR_FRAME_HEAD,
    HANDSHAKE_SIZE,
    padded_size,
    unpack_batch_header,
)

RECORD = padded_size(100)
# Four records a batch, eight in the window.
BATCH = 4 * RECORD
PAYLOAD = bytes(100)


class FakeBroker:
    """The broker end of a publish connection: reads batches, acks on request."""

    def __init__(self, stream: trio.testing.MemoryReceiveStream | trio.abc.Stream) -> None:
        self.stream = stream
        self.batches: list[int] = []  # num_msg of each batch received
        self._data = bytearray()
        self._sending = trio.Lock()  # the broker id, acks and frames come from two tasks

    async def _send(self, data: bytes) -> None:
        async with self._sending:
            await self.stream.send_all(data)

    async def _receive(self, n: int) -> bytes:
        while len(self._data) < n:
            chunk = await self.stream.receive_some(1 << 16)
            if not chunk:
                raise EOFError
            self._data += chunk
        out = bytes(self._data[:n])
        del self._data[:n]
        return out

    async def run(self) -> None:
        """Until the publisher closes the connection."""
        with suppress(EOFError):
            await self._receive(HANDSHAKE_SIZE)
            await self._send(ACK_BROKER_ID.pack(0))
            while True:
                header = unpack_batch_header(await self._receive(BATCH_HEADER_SIZE))
                await self._receive(header.total_size)
                self.batches.append(header.num_msg)

    async def ack(self, count: int) -> None:
        await self._send(ACK_COUNT.pack(count))

    async def fail(self, code: int, text: str) -> None:
        await self._send(ERROR_FRAME_HEAD.pack(ERROR_MARKER, code, len(text)) + text.encode())


@asynccontextmanager
async def publisher(**options: object) -> AsyncIterator[tuple[Publisher, FakeBroker]]:
    """A publisher (4-record batches, an 8-record window, 1 s linger) and its broker."""
    client, server = trio.testing.memory_stream_pair()
    broker = FakeBroker(server)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(broker.run)
        settings: dict[str, object] = {
            "batch_bytes": BATCH,
            "max_inflight_bytes": 2 * BATCH,
            "linger": 1.0,
        }
        settings.update(options)
        async with open_publisher_on_stream(client, "t", **settings) as pub:  # type: ignore[arg-type]
            yield pub, broker
            nursery.cancel_scope.cancel()  # leave without waiting for the last acks


async def test_publish_nowait_packs_until_the_window_is_full(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with publisher() as (pub, broker):
        for _ in range(8):
            pub.publish_nowait(PAYLOAD)
        assert pub.published == 8
        with pytest.raises(trio.WouldBlock):
            pub.publish_nowait(PAYLOAD)
        assert pub.published == 8  # nothing packed
        await trio.sleep(0.1)
        assert broker.batches == [4, 4]  # both full batches went out meanwhile
        await broker.ack(4)
        await trio.sleep(0.1)
        pub.publish_nowait(PAYLOAD)  # the first batch's room is free again
        assert pub.published == 9
        await broker.ack(9)


async def test_publish_nowait_raises_the_failure_and_after_the_context(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with publisher() as (pub, broker):
        pub.publish_nowait(PAYLOAD)
        await broker.fail(3, "bad records")
        await trio.sleep(0.1)
        with pytest.raises(BrokerError, match="bad records"):
            pub.publish_nowait(PAYLOAD)
    with pytest.raises(trio.ClosedResourceError):
        pub.publish_nowait(PAYLOAD)


async def test_publish_checks_for_cancellation_even_with_room_in_the_window(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with publisher() as (pub, broker):
        await pub.publish(PAYLOAD)
        with trio.CancelScope() as scope:
            scope.cancel()
            await pub.publish(PAYLOAD)
        assert scope.cancelled_caught
        assert pub.published == 1
        await broker.ack(1)


async def test_a_publish_cancelled_while_the_window_is_full_publishes_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with publisher() as (pub, broker):
        for i in range(8):
            await pub.publish(bytes([i]) * 100)
        with trio.move_on_after(1) as scope:
            await pub.publish(b"never")
        assert scope.cancelled_caught
        assert pub.published == 8
        await broker.ack(8)
        await pub.publish(b"next")
        assert pub.published == 9
        await trio.sleep(2)  # the linger time seals the last batch
        assert broker.batches == [4, 4, 1]  # "never" is in none of them
        await broker.ack(9)


async def test_a_loop_of_publishes_lets_the_sender_run_once_a_batch_is_sealed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with publisher(max_inflight_bytes=100 * BATCH) as (pub, broker):
        for _ in range(40):  # ten batches, room for all of them: the loop never waits
            await pub.publish(PAYLOAD)
        # Each sealed batch gave the sender a turn: it is under way already,
        # though this task awaited nothing but publish().
        assert pub.sent > 0
        await broker.ack(40)


# -- the subscriber ---------------------------------------------------------------------


@asynccontextmanager
async def subscriber(start: int = 0) -> AsyncIterator[tuple[Subscriber, trio.abc.Stream]]:
    client, server = trio.testing.memory_stream_pair()
    async with open_subscriber_on_stream(client, "t", start=start) as sub:
        yield sub, server


def records(first: int, count: int) -> bytes:
    return b"".join(committed(b"m%d" % i, i, client_order=i) for i in range(first, first + count))


async def test_iteration_hands_out_what_arrived_and_is_cancelled_at_the_next_receive(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with subscriber() as (sub, broker):
        await broker.send_all(records(0, 10))  # one receive brings all ten
        first = await anext(sub)
        got: list[Message] = []
        with trio.CancelScope() as scope:
            scope.cancel()
            # A loop, not a comprehension: the list must outlive the cancellation.
            async for message in sub:  # the nine received are handed out
                got.append(message)  # noqa: PERF401
        assert scope.cancelled_caught
        assert [m.offset for m in [first, *got]] == list(range(10))
        # Nothing was lost to the cancellation.
        await broker.send_all(records(10, 2))
        assert (await anext(sub)).offset == 10
        assert [m.payload for m in await sub.receive_messages()] == [b"m11"]


async def test_the_three_ways_of_reading_go_on_where_the_other_stopped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with subscriber(start=5) as (sub, broker):
        await broker.send_all(records(5, 10))
        assert (await anext(sub)).offset == 5
        rest = await sub.receive_batch()  # what iteration has not handed out yet
        assert rest.offsets.tolist() == list(range(6, 15))
        assert [bytes(rest.payload(i)) for i in range(len(rest))] == [
            b"m%d" % i for i in range(6, 15)
        ]
        await broker.send_all(records(15, 3))
        assert (await anext(sub)).offset == 15
        views = await sub.receive_views()
        assert [(bytes(v.payload), v.offset) for v in views] == [(b"m16", 16), (b"m17", 17)]
        await broker.send_all(records(18, 2))
        batches = sub.batches()
        batch = await anext(batches)
        assert batch.offsets.tolist() == [18, 19]
        assert sub.received == 15
