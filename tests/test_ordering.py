"""Order-5 topics on the broker: acks wait for the order, the lease holder orders.

In-memory brokers on the mock clock (the sequencer lease's host clock made to
follow it where a test times the lease). A handle of another broker id on the
region, whose lease and sequencer the test steps, stands for a broker in
another process.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import rawclient
import trio
import trio.testing
from conftest import MakeConfig, wait_until
from memory import (
    MemoryClient,
    MemoryListener,
    close_log,
    memory_broker,
    open_client,
    open_small_log,
    settle,
)

from trio_embarcadero import open_subscriber_on_stream
from trio_embarcadero.broker import Broker, ordering
from trio_embarcadero.broker.metrics import BrokerCollector
from trio_embarcadero.config import Config
from trio_embarcadero.errors import ErrorCode, SequencerDeposed
from trio_embarcadero.log import CxlLog, open_log
from trio_embarcadero.log.layout import BATCH_COMMITTED, BATCH_RESERVED, BH_ORDERED, NEVER_ORDERED
from trio_embarcadero.log.lease import SequencerLease
from trio_embarcadero.log.reader import region_brokers
from trio_embarcadero.log.stamps import is_stamped
from trio_embarcadero.wire import BatchHeader, scan_records

pytestmark = pytest.mark.trio


def ordered_headers(log: CxlLog, topic: str, broker: int) -> list[tuple[int, int]]:
    """(ordered, total_order) of every committed batch header of a stream."""
    return [
        (h.ordered, h.total_order)
        for _, h in log.walk(log.topics()[topic], broker)
        if h.batch_complete == BATCH_COMMITTED
    ]


def record_orders(log: CxlLog, topic: str, broker: int) -> list[tuple[bool, list[int]]]:
    """(stamped word, each record's total_order field) of every committed
    batch of a stream, as the region holds them."""
    out = []
    for offset, h in log.walk(log.topics()[topic], broker):
        if h.batch_complete != BATCH_COMMITTED:
            continue
        payload = log.region[offset + 128 : offset + 128 + h.total_size]
        starts = scan_records(payload, h.num_msg)
        totals = [int(log.words[(offset + 128 + int(at)) // 8 + 4]) for at in starts]
        out.append((is_stamped(log.region, offset), totals))
    return out


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


@contextmanager
def other_head(
    config: Config, duration_s: float = 1000.0
) -> Iterator[tuple[CxlLog, SequencerLease]]:
    """Broker 0, as if in another process: a handle of its own on the region
    (holding broker 0's lock) and its side of the sequencer lease, taken."""
    log = open_handle(config, 0)
    lease = log.sequencer_lease(
        int(duration_s * 1e9),
        members=lambda: region_brokers(log.region, log.path, config.cxl.max_brokers),
        clock=ordering.host_clock_ns,
    )
    assert lease.try_acquire() is not None
    try:
        yield log, lease
    finally:
        close_log(log)


@pytest.fixture
def lease_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """The lease's host clock follows Trio's (mock) clock."""
    monkeypatch.setattr(ordering, "host_clock_ns", lambda: int(trio.current_time() * 1e9))


async def test_acks_of_an_order_5_topic_wait_for_the_sequencer(
    make_config: MakeConfig, autojump_clock: trio.testing.MockClock
) -> None:
    config = make_config(**{"broker.id": 1, "topics.order": 5})
    async with trio.open_nursery() as nursery, memory_broker(config) as (broker, listener):
        with other_head(config) as (head_log, lease):
            client = await publish(listener, nursery, "ord", 3, 2)
            await settle()
            await trio.sleep(1.0)
            assert broker.statistics().batches_committed == 3
            assert client.acks()[1] == []  # committed, not ordered: no ack
            stats = broker.statistics()
            assert stats.order_waits == 3
            assert stats.sequencer is None  # the lease is broker 0's
            assert stats.sequencer_lease is not None
            assert (stats.sequencer_lease.holder, stats.sequencer_lease.held) == (0, False)
            assert "(sequencer: broker 0, epoch 1)" in stats.summary()
            head = head_log.sequencer(10**9, lease=lease)
            assert [b.total_order for b in head.step(0, budget=2)] == [0, 2]
            # The sequencer wrote the headers only; broker 1, which stored
            # the batches, writes their records' total orders, then acks.
            assert record_orders(broker.log, "ord", 1) == [(False, [0, 0])] * 3
            await trio.sleep(0.1)
            assert client.acks()[1][-1] == 4
            assert record_orders(broker.log, "ord", 1) == [
                (True, [0, 1]), (True, [2, 3]), (False, [0, 0])
            ]  # fmt: skip
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
        assert "sequencer (lease epoch 1): 4 batches ordered, 0 waiting" in stats.summary()
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


async def test_a_broker_takes_the_sequencer_over_once_the_lease_expires(
    make_config: MakeConfig,
    autojump_clock: trio.testing.MockClock,
    lease_clock: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A small region: the test compares it whole.
    config = make_config(
        **{"broker.id": 1, "topics.order": 5, "cxl.size_mb": 8, "cxl.segment_mb": 2}
    )
    async with trio.open_nursery() as nursery, memory_broker(config) as (broker, listener):
        # Broker 0 orders a first batch, then stops renewing (as if stopped
        # with SIGSTOP): its lease, taken at 0, expires at 1 s.
        with other_head(config, duration_s=1.0) as (head_log, lease):
            client = await publish(listener, nursery, "ord", 1, 2)
            await settle()
            head = head_log.sequencer(10**9, lease=lease)
            assert len(head.step(0)) == 1
            for seq in range(1, 4):
                await client.send(rawclient.batch(seq, 3, 2 * seq, 2, 100)[0])
            await trio.sleep(0.1)
            assert client.acks()[1][-1] == 2  # the rest wait for the order
            await wait_for_ack(client, 8)
            taken_at = client.chunks[-1][0]  # when that ack arrived
            # Taken over once expired, at the next of its looks (ten a lease).
            assert 1.0 <= taken_at <= 1.0 + 0.1 + config.cxl.sequencer_interval_ms / 1000
            assert ordered_headers(broker.log, "ord", 1) == [(1, 0), (1, 2), (1, 4), (1, 6)]
            lease_stats = broker.statistics().sequencer_lease
            assert lease_stats is not None
            assert (lease_stats.epoch, lease_stats.holder, lease_stats.held) == (2, 1, True)
            assert (lease_stats.takeovers, lease_stats.deposed) == (1, 0)
            assert (
                f"broker 1 took the sequencer over at epoch 2: broker 0 (pid {os.getpid()}) "
                "stopped renewing it" in caplog.text
            )
            # Broker 0 resumes: its epoch is stale, it writes nothing.
            await client.send(rawclient.batch(4, 3, 8, 2, 100)[0])
            region = broker.log.region.copy()
            with pytest.raises(SequencerDeposed):
                head.step(0)
            assert np.array_equal(broker.log.region, region)
            head.close()
            await wait_for_ack(client, 10)
            await client.close()


async def wait_for_ack(client: MemoryClient, count: int) -> None:
    """Until ``client``'s acks reach ``count``."""

    def acked() -> int:
        counts = client.acks()[1] if len(client.data) >= 4 else []
        return counts[-1] if counts else 0

    with trio.fail_after(10):
        await wait_until(lambda: acked() >= count)


async def test_a_deposed_broker_stops_ordering_and_takes_the_sequencer_back_once_free(
    make_config: MakeConfig,
    autojump_clock: trio.testing.MockClock,
    lease_clock: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "trio_embarcadero.broker.ordering")
    config = make_config(**{"topics.order": 5})
    async with trio.open_nursery() as nursery, memory_broker(config) as (broker, listener):
        client = await publish(listener, nursery, "ord", 2, 1)
        await settle()
        assert client.acks()[1][-1] == 2  # broker 0 orders
        assert broker.statistics().sequencer is not None
        metrics = scrape(broker)
        assert metrics["trio_embarcadero_sequencer_ordered_batches_total"] == 2
        assert metrics["trio_embarcadero_sequencer_ordered_messages_total"] == 2
        assert metrics["trio_embarcadero_sequencer_topics"] == 1
        assert metrics["trio_embarcadero_sequencer_lag_batches"] == 0
        # Another process takes the lease over while broker 0 goes on (it
        # holds a stale view of who is alive: as if broker 0 had been stopped).
        other = open_handle(config, broker_id=1)
        thief = other.sequencer_lease(10**12, members=list, clock=ordering.host_clock_ns)
        assert thief.try_acquire() is not None
        await client.send(rawclient.batch(2, 3, 2, 1, 100)[0])
        await trio.sleep(0.5)
        assert client.acks()[1][-1] == 2  # broker 0 ordered nothing more
        assert ordered_headers(broker.log, "ord", 0)[-1] == (0, 0)
        stats = broker.statistics()
        assert stats.sequencer is None
        assert stats.sequencer_lease is not None
        assert (stats.sequencer_lease.deposed, stats.sequencer_lease.held) == (1, False)
        assert "(epoch 1) is stale: broker 1" in caplog.text
        assert stats.order_waits == 1
        metrics = scrape(broker)
        assert metrics["trio_embarcadero_sequencer_lease_epoch"] == 2
        assert metrics["trio_embarcadero_sequencer_lease_holder"] == 1
        assert metrics["trio_embarcadero_sequencer_lease_held"] == 0
        assert metrics["trio_embarcadero_sequencer_deposed_total"] == 1
        assert metrics["trio_embarcadero_order_waits"] == 1
        assert "trio_embarcadero_sequencer_lag_batches" not in metrics  # not its sequencer
        # The new holder orders broker 0's batch; broker 0 acks it.
        new = other.sequencer(10**9, lease=thief)
        assert len(new.step(0)) == 1
        await wait_for_ack(client, 3)
        new.close()
        # It lets go: broker 0 takes the sequencer back, at a new epoch.
        assert thief.release()
        await trio.sleep(0.2)
        stats = broker.statistics()
        assert stats.sequencer_lease is not None
        assert (stats.sequencer_lease.epoch, stats.sequencer_lease.held) == (3, True)
        took = [r for r in caplog.records if "took the sequencer over at epoch 3" in r.message]
        assert [(r.levelno, r.message) for r in took] == [
            (
                logging.INFO,
                "broker 0 took the sequencer over at epoch 3: "
                f"broker 1 (pid {os.getpid()}) released it",
            )
        ]
        await client.send(rawclient.batch(3, 3, 3, 1, 100)[0])
        await wait_for_ack(client, 4)
        assert scrape(broker)["trio_embarcadero_sequencer_takeovers_total"] == 2
        await client.close()
        close_log(other)


async def test_a_broker_that_stops_hands_the_sequencer_over_at_once(
    make_config: MakeConfig,
    autojump_clock: trio.testing.MockClock,
    lease_clock: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "trio_embarcadero.broker.ordering")
    head_config = make_config(**{"topics.order": 5})
    other_config = make_config(**{"broker.id": 1, "topics.order": 5})
    async with trio.open_nursery() as nursery, memory_broker(other_config) as (other, listener):
        async with memory_broker(head_config) as (head, _):
            client = await publish(listener, nursery, "ord", 2, 1)
            await wait_for_ack(client, 2)  # ordered by the head
            assert head.statistics().sequencer is not None
            assert other.statistics().sequencer is None
        stopped_at = trio.current_time()
        assert "broker 0 released the sequencer lease (epoch 1)" in caplog.text
        await client.send(rawclient.batch(2, 3, 2, 1, 100)[0])
        await wait_for_ack(client, 3)
        # Released: taken at the next look, long before a lease would expire.
        assert client.chunks[-1][0] - stopped_at <= 0.1 + 0.01
        assert (
            f"took the sequencer over at epoch 2: broker 0 (pid {os.getpid()}) released it"
            in caplog.text
        )
        await client.close()


def open_handle(config: Config, broker_id: int) -> CxlLog:
    """A handle of broker ``broker_id`` on the config's region (its lock taken)."""
    cxl = config.cxl
    keys = ("size", "segment_size", "unit_size", "max_topics", "max_brokers")
    sizes = (cxl.size_bytes, cxl.segment_bytes, cxl.unit_bytes, cxl.max_topics, cxl.max_brokers)
    return open_small_log(cxl.path, broker_id=broker_id, **dict(zip(keys, sizes, strict=True)))


def scrape(broker: Broker) -> dict[str, float]:
    """The broker's metrics without labels, as a scrape reads them."""
    return {
        sample.name: sample.value
        for family in BrokerCollector(broker).collect()
        for sample in family.samples
        if not sample.labels
    }


def parse_ordered(data: bytes) -> list[tuple[int, int, list[tuple[int, int, int]]]]:
    """An ordered subscribe stream: (first total order, count, [(total order,
    client id, client order) of each record]) of each BatchMetadata frame."""
    frames, used = rawclient.parse_framed(data)
    assert used == len(data)
    return [(first, count, [r[1:] for r in records]) for first, count, records in frames]


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


async def test_a_batch_held_mid_payload_past_the_hole_timeout_is_ordered_and_acked(
    make_config: MakeConfig, autojump_clock: trio.testing.MockClock
) -> None:
    """The direct path reserves a batch before its payload arrives; a slow
    client takes 5 s over it (the hole timeout is 1 s). Right behind it a
    connection gives its batch up (EOF mid-payload: abandoned), and another
    connection's batches wait behind both (the writer commits in log order).
    The slow batch is no hole: once it completes, every batch is ordered and
    acked, the slow one first; nothing waits for an order that never comes."""
    config = make_config(
        **{
            "topics.order": 5,
            "network.use_nonblocking": False,
            "cxl.sequencer_hole_timeout_s": 1.0,
        }
    )
    async with trio.open_nursery() as nursery, memory_broker(config) as (broker, listener):
        slow = await open_client(listener, nursery)
        await slow.send(rawclient.handshake("t", client_id=3, ack=1))
        held = rawclient.batch(1, 3, 1, 1, 100)[0]
        await slow.send(rawclient.batch(0, 3, 0, 1, 100)[0] + held[:-50])
        await settle()
        gone = await open_client(listener, nursery)
        await gone.send(rawclient.handshake("t", client_id=5, ack=1))
        await gone.send(rawclient.batch(0, 5, 0, 1, 100)[0][:-50])
        await settle()
        await gone.close()
        fast = await open_client(listener, nursery)
        await fast.send(rawclient.handshake("t", client_id=4, ack=1))
        for seq in range(3):
            await fast.send(rawclient.batch(seq, 4, seq, 1, 100)[0])
        for i in range(50):  # a byte every 0.1 s: within the payload stall timeout
            await trio.sleep(0.1)
            await slow.send(held[len(held) - 50 + i : len(held) - 49 + i])
        await trio.sleep(0.5)
        stats = broker.statistics()
        assert stats.log.batches_abandoned == 1
        assert (slow.acks()[1], fast.acks()[1]) == ([1, 2], [3])
        assert ordered_headers(broker.log, "t", 0) == [(1, t) for t in range(5)]
        assert stats.order_waits == 0
        assert stats.sequencer is not None
        assert (stats.sequencer.holes_skipped, stats.sequencer.lag_batches) == (0, 0)
        await slow.close()
        await fast.close()


@pytest.mark.parametrize("ack", [1, 2])
async def test_a_batch_the_sequencer_went_past_gets_an_error_and_holds_up_nothing(
    make_config: MakeConfig, autojump_clock: trio.testing.MockClock, tmp_path: Path, ack: int
) -> None:
    """The direct path reserves a batch before its payload arrives; its client
    takes 3 s over it (the hole timeout is 1 s), while another connection's
    batches wait behind it. The sequencer (broker 0's, in another process)
    went past it while it was reserved: its ``ordered`` word is 2, written
    here as the sequencer writes it (this broker's writer never leaves a
    committed batch behind a reserved one; one that does is what makes the
    sequencer go past: tests/test_sequencer.py). Once it completes: its
    connection gets error 10 after the count of the batch before it, and no
    count for the one it sent after it; the other connection's batches are
    ordered and acked; subscribers of the stream (client_req 1) and of the
    total order (client_req 3) never see it; the statistics count it. At ack
    level 2 the same, each in turn with the disk's syncs."""
    disk = {"storage.dir": str(tmp_path / "disk")} if ack == 2 else {}
    config = make_config(
        **{
            "broker.id": 1,
            "topics.order": 5,
            "network.use_nonblocking": False,
            "cxl.sequencer_hole_timeout_s": 1.0,
            **disk,
        }
    )
    async with trio.open_nursery() as nursery, memory_broker(config) as (broker, listener):
        with other_head(config) as (head_log, lease):
            head = head_log.sequencer(10**9, lease=lease)
            slow = await open_client(listener, nursery)
            await slow.send(rawclient.handshake("t", client_id=3, ack=ack))
            held = rawclient.batch(1, 3, 1, 1, 100)[0]
            await slow.send(rawclient.batch(0, 3, 0, 1, 100)[0] + held[:-50])
            await settle()
            log = broker.log
            (at,) = [
                offset
                for offset, h in log.walk(log.topics()["t"], 1)
                if h.batch_complete == BATCH_RESERVED
            ]
            struct.pack_into("<I", log.region, at + BH_ORDERED, NEVER_ORDERED)
            fast = await open_client(listener, nursery)
            await fast.send(rawclient.handshake("t", client_id=4, ack=ack))
            for seq in range(2):
                await fast.send(rawclient.batch(seq, 4, seq, 1, 100)[0])
            for i in range(30):  # a byte every 0.1 s: within the payload stall timeout
                await trio.sleep(0.1)
                await slow.send(held[len(held) - 50 + i : len(held) - 49 + i])
            # The rest, and a batch after it (taken in before the error is known).
            await slow.send(held[len(held) - 20 :] + rawclient.batch(2, 3, 2, 1, 100)[0])
            await trio.sleep(0.1)
            assert broker.statistics().batches_committed == 5
            # Every batch of the stream is ordered but the one it went past.
            assert [b.total_order for b in head.step(int(4e9))] == [0, 1, 2, 3]
            # (At ack level 2 the disk writer syncs on a worker thread.)
            await wait_until(lambda: slow.eof_at is not None and fast.acks()[1] == [2])
            _, counts, error = slow.acks()
            assert counts == [1]
            assert error is not None
            assert error[0] == ErrorCode.NOT_ORDERED
            assert error[1].startswith("batch 1 of topic 't' is never ordered")
            assert slow.eof_at is not None
            assert fast.acks()[1] == [2]
            stats = broker.statistics()
            assert (stats.order_waits, stats.never_ordered) == (0, 1)
            assert stats.errors == {"not_ordered": 1}
            assert scrape(broker)["trio_embarcadero_never_ordered_batches_total"] == 1
            assert "1 batch(es) of order-5 topics never ordered" in stats.summary()
            readers = []
            for req in (1, 3):
                reader = await open_client(listener, nursery)
                await reader.send(rawclient.handshake("t", req=req))
                readers.append(reader)
            await trio.sleep(0.1)
            expected = [(0, 3, 0), (1, 4, 0), (2, 4, 1), (3, 3, 2)]
            for reader in readers:
                assert [r for _, _, rs in parse_ordered(reader.data) for r in rs] == expected
            head.close()
            for client in (fast, *readers):
                await client.close()


async def test_a_batch_whose_broker_died_before_it_stamped_it_is_read_stamped_and_stamped_later(
    make_config: MakeConfig, autojump_clock: trio.testing.MockClock
) -> None:
    """Broker 1 commits two batches and dies before they are ordered; the
    head orders them. Its readers' copies carry every record's total order
    from the header, though the region's records do not yet; broker 1,
    started again, writes them (and marks the batches stamped)."""
    head_config = make_config(**{"topics.order": 5})
    other_config = make_config(**{"broker.id": 1, "topics.order": 5})
    async with (
        trio.open_nursery() as nursery,
        memory_broker(head_config) as (head, head_listener),
    ):
        dead = open_handle(other_config, 1)
        dead.topic_order = lambda _topic: 5
        for seq, sizes in enumerate(([100, 100, 100], [10, 300])):
            data = b"".join(
                rawclient.record(rawclient.payload_for(7, 3 * seq + i, size), 3 * seq + i, 7)
                for i, size in enumerate(sizes)
            )
            r = dead.get_cxl_buffer("ord", BatchHeader(seq, 7, len(sizes), len(data)))
            r.payload[:] = list(data)
            dead.complete(r, scan_records(r.payload, len(sizes)))
        del r
        close_log(dead)  # it died: nobody stamps its batches
        await trio.sleep(0.1)
        assert head.statistics().sequencer.batches_ordered == 2
        assert record_orders(head.log, "ord", 1) == [(False, [0, 0, 0]), (False, [0, 0])]
        reader = await open_client(head_listener, nursery)
        await reader.send(rawclient.handshake("ord", req=3, last_addr=1))
        await trio.sleep(0.1)
        assert parse_ordered(reader.data) == [
            (1, 2, [(1, 7, 1), (2, 7, 2)]),
            (3, 2, [(3, 7, 3), (4, 7, 4)]),
        ]
        async with memory_broker(other_config) as (other, other_listener):
            await trio.sleep(0.1)
            assert record_orders(head.log, "ord", 1) == [(True, [0, 1, 2]), (True, [3, 4])]
            assert other.order_waits.unstamped == 0
            # And a subscriber of broker 1's own stream (client_req 1).
            own = await open_client(other_listener, nursery)
            await own.send(rawclient.handshake("ord", req=1, last_addr=0))
            await trio.sleep(0.1)
            assert [r for _, _, rs in parse_ordered(own.data) for r in rs] == [
                (i, 7, i) for i in range(5)
            ]
            await own.close()
        await reader.close()


async def test_subscribers_get_total_orders_in_records_their_broker_has_not_stamped(
    make_config: MakeConfig, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both ordered subscribe streams send every record's total order, also
    of a batch ordered but not stamped in the region (its broker has not
    got to it: here it never does)."""
    monkeypatch.setattr(ordering, "stamp_batches", lambda *_: None)
    config = make_config(**{"topics.order": 5})
    async with trio.open_nursery() as nursery, memory_broker(config) as (broker, listener):
        client = await publish(listener, nursery, "ord", 2, 3)
        await settle()
        assert client.acks()[1][-1] == 6
        assert record_orders(broker.log, "ord", 0) == [(False, [0, 0, 0])] * 2
        for req, start in ((1, 1), (3, 1)):
            reader = await open_client(listener, nursery)
            await reader.send(rawclient.handshake("ord", req=req, last_addr=start))
            await trio.sleep(0.1)
            assert parse_ordered(reader.data) == [
                (1, 2, [(1, 3, 1), (2, 3, 2)]),
                (3, 3, [(3, 3, 3), (4, 3, 4), (5, 3, 5)]),
            ]
            await reader.close()
        await client.close()


async def test_batches_behind_a_session_batch_waiting_for_its_predecessor_are_acked_first(
    make_config: MakeConfig, autojump_clock: trio.testing.MockClock
) -> None:
    """A session's batch_seq 1 reaches the broker before its 0 (on another
    connection, as after a failover); a plain publisher's batches behind it
    in the stream are ordered and acked meanwhile, and 1 is acked once 0
    is ordered, after it, without waiting for the hole timeout."""
    config = make_config(**{"topics.order": 5, "cxl.sequencer_hole_timeout_s": 60.0})
    async with trio.open_nursery() as nursery, memory_broker(config) as (broker, listener):
        late = await open_client(listener, nursery)
        await late.send(rawclient.handshake("ord", client_id=5, ack=1, req=2, last_addr=0xAB))
        await late.send(rawclient.batch(1, 5, 2, 2, 100)[0])
        await settle()
        plain = await publish(listener, nursery, "ord", 3, 2)
        await trio.sleep(0.1)
        assert plain.acks()[1][-1] == 6  # ordered past the waiting one
        assert late.acks()[1] == []
        assert broker.statistics().order_waits == 1
        await late.close()
        await settle()
        first = await open_client(listener, nursery)
        await first.send(rawclient.handshake("ord", client_id=5, ack=1, req=2, last_addr=0xAB))
        await first.send(rawclient.batch(0, 5, 0, 2, 100)[0])
        await trio.sleep(0.1)
        assert first.acks()[1] == [2]
        assert broker.statistics().order_waits == 0
        assert broker.statistics().sequencer.session_skips == 0
        with open_log(broker.log.path) as reader:
            got = [(m.client_id, m.client_order) for m in reader.ordered_messages("ord")]
        assert got == [(3, i) for i in range(6)] + [(5, 0), (5, 1), (5, 2), (5, 3)]
        await first.close()
        await plain.close()
