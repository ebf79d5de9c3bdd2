"""Order-5 topics on the broker: acks wait for the order, the head orders.

In-memory brokers on the mock clock. A broker other than 0 has no sequencer:
a sequencer stepped by the test stands for the head in another process.
"""

from __future__ import annotations

import pytest
import rawclient
import trio
import trio.testing
from conftest import MakeConfig
from memory import memory_broker, open_client, settle

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


async def test_acks_of_an_order_5_topic_wait_for_the_sequencer(
    make_config: MakeConfig, autojump_clock: trio.testing.MockClock
) -> None:
    config = make_config(**{"broker.id": 1, "topics.order": 5})
    async with trio.open_nursery() as nursery, memory_broker(config) as (broker, listener):
        client = await open_client(listener, nursery)
        await client.send(rawclient.handshake("ord", client_id=3, ack=1))
        for seq in range(3):
            await client.send(rawclient.batch(seq, 3, 2 * seq, 2, 100)[0])
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
        client = await open_client(listener, nursery)
        await client.send(rawclient.handshake("ord", client_id=3, ack=1))
        for seq in range(4):
            await client.send(rawclient.batch(seq, 3, 3 * seq, 3, 100)[0])
        await settle()
        assert client.acks()[1][-1] == 12
        assert ordered_headers(broker.log, "ord", 0) == [(1, 0), (1, 3), (1, 6), (1, 9)]
        stats = broker.statistics()
        assert stats.sequencer is not None
        assert (stats.sequencer.batches_ordered, stats.sequencer.lag_batches) == (4, 0)
        assert "sequencer 4b lag 0b" in stats.summary()
        await client.close()


async def test_order_0_topics_are_acked_at_commit_on_any_broker(
    make_config: MakeConfig, autojump_clock: trio.testing.MockClock
) -> None:
    config = make_config(**{"broker.id": 1})
    async with trio.open_nursery() as nursery, memory_broker(config) as (broker, listener):
        client = await open_client(listener, nursery)
        await client.send(rawclient.handshake("plain", client_id=3, ack=1))
        await client.send(rawclient.batch(0, 3, 0, 2, 100)[0])
        await settle()
        assert client.acks()[1] == [2]
        assert broker.statistics().order_waits == 0
        await client.close()
