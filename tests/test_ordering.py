"""Order-5 topics on the broker: acks wait for the order, the head orders.

In-memory brokers on the mock clock. A broker other than 0 has no sequencer:
a sequencer stepped by the test stands for the head in another process.
"""

from __future__ import annotations

import struct

import pytest
import rawclient
import trio
import trio.testing
from conftest import MakeConfig
from memory import MemoryClient, MemoryListener, memory_broker, open_client, settle

from trio_embarcadero import open_subscriber_on_stream
from trio_embarcadero.log import CxlLog
from trio_embarcadero.log.layout import BATCH_COMMITTED

pytestmark = pytest.mark.trio


def ordered_headers(log: CxlLog, topic: str, broker: int) -> list[tuple[int, int]]:
    """(ordered, total_order) of every committed batch header of a stream."""
    return [
        (h.ordered, h.total_order)
        for _, h in log.walk(log.topics()[topic], broker)
        if h.batch_complete == BATCH_COMMITTED
    ]


async def publish(
    listener: MemoryListener, nursery: trio.Nursery, topic: str, batches: int, size: int
) -> MemoryClient:
    """A publisher (client id 3, ack 1) that sent ``batches`` batches of
    ``size`` messages of 100 bytes, and whose acks are being read."""
    client = await open_client(listener, nursery)
    await client.send(rawclient.handshake(topic, client_id=3, ack=1))
    for seq in range(batches):
        await client.send(rawclient.batch(seq, 3, size * seq, size, 100)[0])
    return client


async def test_acks_of_an_order_5_topic_wait_for_the_sequencer(
    make_config: MakeConfig, autojump_clock: trio.testing.MockClock
) -> None:
    config = make_config(**{"broker.id": 1, "topics.order": 5})
    async with trio.open_nursery() as nursery, memory_broker(config) as (broker, listener):
        client = await publish(listener, nursery, "ord", 3, 2)
        await settle()
        await trio.sleep(1.0)
        assert broker.statistics().batches_committed == 3
        assert client.acks()[1] == []  # committed, not ordered: no ack
        assert broker.statistics().order_waits == 3
        assert broker.statistics().sequencer is None
        head = broker.log.sequencer(10**9)  # the head, as if in another process
        assert [b.total_order for b in head.step(0, budget=2)] == [0, 2]
        await trio.sleep(0.1)
        assert client.acks()[1][-1] == 4
        head.step(0)
        await trio.sleep(0.1)
        assert client.acks()[1][-1] == 6
        assert broker.statistics().order_waits == 0
        head.close()
        await client.close()


async def test_the_head_orders_its_own_commits_before_it_acks(
    make_config: MakeConfig, autojump_clock: trio.testing.MockClock
) -> None:
    config = make_config(**{"topics.order": 5})
    async with trio.open_nursery() as nursery, memory_broker(config) as (broker, listener):
        client = await publish(listener, nursery, "ord", 4, 3)
        await settle()
        assert client.acks()[1][-1] == 12
        assert ordered_headers(broker.log, "ord", 0) == [(1, 0), (1, 3), (1, 6), (1, 9)]
        stats = broker.statistics()
        assert stats.sequencer is not None
        assert (stats.sequencer.batches_ordered, stats.sequencer.lag_batches) == (4, 0)
        assert "sequencer: 4 batches ordered, 0 waiting" in stats.summary()
        await client.close()


async def test_order_0_topics_are_acked_at_commit_on_any_broker(
    make_config: MakeConfig, autojump_clock: trio.testing.MockClock
) -> None:
    config = make_config(**{"broker.id": 1})
    async with trio.open_nursery() as nursery, memory_broker(config) as (broker, listener):
        client = await publish(listener, nursery, "plain", 1, 2)
        await settle()
        assert client.acks()[1] == [2]
        assert broker.statistics().order_waits == 0
        await client.close()


def parse_ordered(data: bytes) -> list[tuple[int, int, list[tuple[int, int, int]]]]:
    """An ordered subscribe stream: (first total order, count, [(total order,
    client id, client order) of each record]) of each BatchMetadata frame."""
    frames = []
    pos = 0
    while pos < len(data):
        first, count, version, flags = struct.unpack_from("<QIHH", data, pos)
        assert (version, flags) == (1, 0)
        pos += 16
        records = []
        for _ in range(count):
            padded, _, _, _, total, corder, cid, _ = struct.unpack_from("<8Q", data, pos)
            records.append((total, cid, corder))
            pos += padded
        frames.append((first, count, records))
    return frames


async def test_every_broker_serves_the_same_total_order(
    make_config: MakeConfig, autojump_clock: trio.testing.MockClock
) -> None:
    head_config = make_config(**{"topics.order": 5})
    other_config = make_config(**{"broker.id": 1, "topics.order": 5})
    async with (
        trio.open_nursery() as nursery,
        memory_broker(head_config) as (_, head),
        memory_broker(other_config) as (other, other_listener),
    ):
        publishers = [await open_client(lst, nursery) for lst in (head, other_listener)]
        for cid, client in enumerate(publishers, 1):
            await client.send(rawclient.handshake("ord", client_id=cid, ack=1))
        for seq in range(3):
            for cid, client in enumerate(publishers, 1):
                await client.send(rawclient.batch(seq, cid, 2 * seq, 2, 100)[0])
                await trio.sleep(0.001)
        await trio.sleep(0.1)
        assert [c.acks()[1][-1] for c in publishers] == [6, 6]
        readers = []
        for listener, req, start in (
            (head, 3, 0),
            (other_listener, 3, 0),
            (other_listener, 3, 3),
            (other_listener, 1, 0),
        ):
            reader = await open_client(listener, nursery)
            await reader.send(rawclient.handshake("ord", req=req, last_addr=start))
            readers.append(reader)
        await trio.sleep(0.1)
        merged = [parse_ordered(r.data) for r in readers]
        records = [t for _, _, rs in merged[0] for t in rs]
        assert [t for t, _, _ in records] == list(range(12))
        for cid in (1, 2):
            assert [o for _, c, o in records if c == cid] == list(range(6))
        assert merged[1] == merged[0]
        # From total order 3, inside a batch: that batch is cut there.
        assert merged[2][0][:2] == (3, 1)
        assert [r for _, _, rs in merged[2] for r in rs] == records[3:]
        # client_req 1: this broker's own batches, each behind its BatchMetadata.
        own = [frame for frame in merged[0] if frame[2][0][1] == 2]
        assert merged[3] == own
        # And the Python client, from the other broker.
        stream = await other_listener.connect()
        async with open_subscriber_on_stream(stream, "ord", ordered=True, start=1) as sub:
            got = [(m.offset, m.client_id, m.client_order) for m in await sub.receive_messages()]
            while len(got) < 11:
                got += [
                    (m.offset, m.client_id, m.client_order) for m in await sub.receive_messages()
                ]
        assert got == records[1:]
        assert other.statistics().order_waits == 0
        for client in publishers + readers:
            await client.close()


async def test_an_ordered_subscription_to_an_order_0_topic_is_refused(
    make_config: MakeConfig, autojump_clock: trio.testing.MockClock
) -> None:
    async with trio.open_nursery() as nursery, memory_broker(make_config()) as (_, listener):
        publisher = await publish(listener, nursery, "plain", 1, 1)
        reader = await open_client(listener, nursery)
        await reader.send(rawclient.handshake("plain", req=3))
        await trio.sleep(0.1)
        assert reader.acks(with_broker_id=False)[2] is not None
        code, text = reader.acks(with_broker_id=False)[2]  # type: ignore[misc]
        assert code == 1
        assert "order 0" in text
        await publisher.close()
