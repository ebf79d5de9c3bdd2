"""One broker's stream of an order-5 topic (``client_req = 1``) in total order.

The sequencer orders a publish session's batch that waits for its
predecessor after later batches of its stream (deferred), so the stream's
commit order and the total order differ; the broker sends its own batches
in total order, from its topic's ordered index. In-memory brokers on the
mock clock, raw wire clients, and the Python subscriber across a reconnect.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import rawclient
import trio
from conftest import MakeConfig, wait_until
from memory import MemoryClient, MemoryListener, memory_broker, open_client, settle
from trio.testing import MockClock

from trio_embarcadero import Message, open_subscriber
from trio_embarcadero.broker import Broker
from trio_embarcadero.config import Config
from trio_embarcadero.log.layout import BATCH_COMMITTED, NEVER_ORDERED

pytestmark = pytest.mark.trio

TOPIC = "s"
SESSION = 7
OTHER_SESSION = 8
PLAIN = 3


def virtual_ns() -> int:
    return int(trio.current_time() * 1e9)


@asynccontextmanager
async def order5_broker(
    make_config: MakeConfig, **more: object
) -> AsyncIterator[tuple[Broker, MemoryListener, trio.Nursery]]:
    """A memory broker with an order-5 topic default, its session table on the
    mock clock (it holds the sequencer lease: it orders its own batches)."""
    config: Config = make_config(**{"topics.order": 5, **more})
    async with trio.open_nursery() as nursery, memory_broker(config) as (broker, listener):
        broker.log.sessions.clock = virtual_ns
        yield broker, listener, nursery


def batch(seq: int, client_id: int, count: int = 3) -> bytes:
    """Batch ``seq`` of ``client_id``: ``count`` messages of client orders 10 * seq ..."""
    return rawclient.batch(seq, client_id, 10 * seq, count, 100)[0]


async def session(listener: MemoryListener, nursery: trio.Nursery, client_id: int) -> MemoryClient:
    client = await open_client(listener, nursery)
    await client.send(
        rawclient.handshake(TOPIC, client_id=client_id, ack=1, req=2, last_addr=client_id << 8)
    )
    return client


async def plain(listener: MemoryListener, nursery: trio.Nursery, seq: int) -> None:
    """One batch of a client_req 0 publisher (client 3), on a connection of its own."""
    client = await open_client(listener, nursery)
    await client.send(rawclient.handshake(TOPIC, client_id=PLAIN, ack=1) + batch(seq, PLAIN))
    await client.close()


async def reader(listener: MemoryListener, nursery: trio.Nursery, last_addr: int) -> MemoryClient:
    client = await open_client(listener, nursery)
    await client.send(rawclient.handshake(TOPIC, req=1, last_addr=last_addr))
    return client


Frame = tuple[int, list[tuple[int, int, int, int]]]


def frames_of(data: bytes) -> list[Frame]:
    """A framed subscribe stream: (BatchMetadata's total order, [(logical
    offset, total order, client id, client order) of each record]) per batch."""
    frames, used = rawclient.parse_framed(data)
    assert used == len(data)
    return [(first, records) for first, _, records in frames]


def frame(first_offset: int, total: int, client_id: int, seq: int, count: int = 3) -> Frame:
    """The frame of a batch of ``count`` records from logical offset
    ``first_offset`` and total order ``total``, of ``client_id``'s batch ``seq``."""
    return (
        total,
        [(first_offset + i, total + i, client_id, 10 * seq + i) for i in range(count)],
    )


def cut(whole: Frame, skip: int) -> Frame:
    return (whole[0] + skip, whole[1][skip:])


def ordered_words(broker: Broker) -> list[tuple[int, int, int]]:
    """(first logical offset, ordered word, total order) of every committed
    batch of broker 0's stream, in stream order."""
    log = broker.log
    return [
        (h.start_logical_offset, h.ordered, h.total_order)
        for _, h in log.walk(log.topics()[TOPIC], 0)
        if h.batch_complete == BATCH_COMMITTED
    ]


async def test_a_deferred_session_batch_comes_in_total_order_and_a_never_ordered_one_not_at_all(
    make_config: MakeConfig, autojump_clock: MockClock
) -> None:
    """Stream order: A0, A2 (waits for A1), P0, A1, then B0, B2 (B1 missing:
    skipped at the hole timeout), B1 (stored late: never ordered), P1. The
    total order: A0, P0, A1, A2, B0, B2, P1. Before, the stream came in
    stream order: A2's total order (9) before P0's (3) and A1's (6)."""
    slow_payloads = {"network.use_nonblocking": False, "network.payload_stall_timeout_s": 5.0}
    async with order5_broker(
        make_config, **{"cxl.sequencer_hole_timeout_s": 1.0, **slow_payloads}
    ) as (
        broker,
        listener,
        nursery,
    ):
        early = await reader(listener, nursery, 0)  # there before anything is ordered
        a = await session(listener, nursery, SESSION)
        await a.send(batch(0, SESSION) + batch(2, SESSION))
        await settle()
        await plain(listener, nursery, 0)
        await settle()
        await a.send(batch(1, SESSION))
        with trio.fail_after(10):
            await wait_until(lambda: a.acks()[1][-1:] == [9])
        b = await session(listener, nursery, OTHER_SESSION)
        await b.send(batch(0, OTHER_SESSION) + batch(2, OTHER_SESSION))
        await settle()
        # B1 arrives slowly on another connection: reserved, not committed,
        # when the hole timeout skips its batch_seq; committed after that.
        late = await session(listener, nursery, OTHER_SESSION)
        b1 = batch(1, OTHER_SESSION)
        await late.send(b1[:-50])
        await trio.sleep(1.5)
        await late.send(b1[-50:])
        await trio.sleep(0.1)
        plain_seq = 1
        await plain(listener, nursery, plain_seq)
        await trio.sleep(0.1)
        assert ordered_words(broker) == [
            (0, 1, 0),  # A0
            (3, 1, 9),  # A2, deferred
            (6, 1, 3),  # P0
            (9, 1, 6),  # A1
            (12, 1, 12),  # B0
            (15, 1, 15),  # B2
            (18, NEVER_ORDERED, 0),  # B1
            (21, 1, 18),  # P1
        ]
        readers = {start: await reader(listener, nursery, start) for start in (0, 4, 7, 19)}
        await trio.sleep(0.1)
        for client in [a, b, late, early, *readers.values()]:
            await client.close()
        await trio.sleep(0.1)
    a0, a2, p0 = frame(0, 0, SESSION, 0), frame(3, 9, SESSION, 2), frame(6, 3, PLAIN, 0)
    a1, b0 = frame(9, 6, SESSION, 1), frame(12, 12, OTHER_SESSION, 0)
    b2, p1 = frame(15, 15, OTHER_SESSION, 2), frame(21, 18, PLAIN, 1)
    everything = [a0, p0, a1, a2, b0, b2, p1]
    assert frames_of(early.data) == everything
    got = {start: frames_of(client.data) for start, client in readers.items()}
    assert got[0] == everything
    for frames in got.values():  # strictly rising total orders
        totals = [t for _, records in frames for _, t, _, _ in records]
        assert totals == sorted(set(totals))
    # From inside A2 (deferred): it comes cut there, in its place in the total order.
    assert got[4] == [p0, a1, cut(a2, 1), b0, b2, p1]
    # From inside P0: A2 holds no offset wanted.
    assert got[7] == [cut(p0, 1), a1, b0, b2, p1]
    # From inside B1 (never ordered): the batches after it.
    assert got[19] == [p1]


async def test_a_reader_waiting_at_a_deferred_batch_gets_the_later_ones_first(
    make_config: MakeConfig, autojump_clock: MockClock
) -> None:
    """A reader from A2's offset, while A2 waits for A1: P0, ordered, comes
    at once, before A2 (before, the stream waited at A2)."""
    async with order5_broker(make_config) as (_, listener, nursery):
        a = await session(listener, nursery, SESSION)
        await a.send(batch(0, SESSION) + batch(2, SESSION))
        await settle()
        await plain(listener, nursery, 0)
        at_a2 = await reader(listener, nursery, 3)
        await trio.sleep(0.5)
        assert frames_of(at_a2.data) == [frame(6, 3, PLAIN, 0)]
        await a.send(batch(1, SESSION))
        await trio.sleep(0.1)
        assert frames_of(at_a2.data) == [
            frame(6, 3, PLAIN, 0),
            frame(9, 6, SESSION, 1),
            frame(3, 9, SESSION, 2),
        ]
        for client in (a, at_a2):
            await client.close()


async def test_the_python_subscriber_resumes_below_a_deferred_batch_and_drops_what_comes_again(
    make_config: MakeConfig, autojump_clock: MockClock
) -> None:
    """open_subscriber(ordered=False) on an order-5 topic: the broker's
    stream is framed (before, the subscriber failed on its first
    BatchMetadata). The connection breaks after A0 and P0 arrived while A2
    waits: the subscriber resumes from A2's offset (3), the lowest not
    received, drops P0 sent again, and gets A1 and A2 once each."""
    async with order5_broker(make_config) as (_, listener, nursery):
        a = await session(listener, nursery, SESSION)
        await a.send(batch(0, SESSION) + batch(2, SESSION))
        await settle()
        await plain(listener, nursery, 0)
        await settle()
        got: list[Message] = []
        async with open_subscriber(brokers=[listener.connect], topic=TOPIC) as sub:
            while len(got) < 6:
                got += await sub.receive_messages()
            assert sub.position == 3
            # The broker's end of the subscription breaks.
            await listener.accepted[-1].aclose()
            await a.send(batch(1, SESSION))
            while len(got) < 12:
                with trio.fail_after(10):
                    got += await sub.receive_messages()
            assert sub.reconnects == 1
            assert sub.position == 12
            with trio.move_on_after(1):  # nothing more comes: P0 was dropped
                got += await sub.receive_messages()
        await a.close()
    assert [(m.offset, m.client_id, m.client_order) for m in got] == [
        *((i, SESSION, i) for i in range(3)),  # A0
        *((6 + i, PLAIN, i) for i in range(3)),  # P0
        *((9 + i, SESSION, 10 + i) for i in range(3)),  # A1
        *((3 + i, SESSION, 20 + i) for i in range(3)),  # A2
    ]
