"""The publish path over real TCP: every ack mode, log contents byte for byte, pressure, full log.

Clients are the raw spec client (``rawclient``, over loopback TCP through
``tcpclient``); the log is read back both from the mapped region and over a
subscribe connection.
"""

from __future__ import annotations

import struct
import subprocess
import sys
from collections.abc import Sequence
from contextlib import AsyncExitStack
from functools import partial
from pathlib import Path

import pytest
import trio
from conftest import MakeConfig, wait_until
from rawclient import (
    BATCH_HEADER,
    HANDSHAKE,
    MESSAGE_HEADER,
    handshake,
    parse_ack_stream,
    parse_records,
    payload_for,
    read_all,
    record,
)
from rawclient import batch as raw_batch
from tcpclient import (
    ack_listener,
    closed_port,
    connect,
    connections,
    publish,
    recv_ack_item,
    recv_broker_id,
    recv_exactly,
    subscribe_bytes,
)

from trio_embarcadero import ConnectionPhase, ErrorCode, open_broker
from trio_embarcadero.broker import Broker

PATHS = pytest.mark.parametrize("use_nonblocking", [True, False], ids=["staged", "direct"])

# Six batches of 50 messages: 1000 B, empty, 1 B, mixed in one batch, 1000 B, 2000 B.
MIXED = [0, 1, 63, 64, 65, 1000, 127, 128, 129, 4096]
PLAN: list[list[int]] = [
    [1000] * 50,
    [0] * 50,
    [1] * 50,
    MIXED * 5,
    [1000] * 50,
    [2000] * 50,
]
PLAN_MESSAGES = sum(len(sizes) for sizes in PLAN)
BATCH_COMPLETE_COMMITTED = 1


# -- client side helpers --------------------------------------------------------------------------


def make_batch(
    seq: int, client_id: int, first_order: int, sizes: Sequence[int]
) -> tuple[bytes, list[bytes]]:
    """A batch (header + records) whose messages have the given payload sizes."""
    payloads = [payload_for(client_id, first_order + i, size) for i, size in enumerate(sizes)]
    body = b"".join(record(p, first_order + i, client_id) for i, p in enumerate(payloads))
    head = BATCH_HEADER.pack(seq, client_id, len(sizes), 0, 0, 0, 0, len(body), 0, 0, 0, 0)
    return head + body, payloads


def plan_batches(
    client_id: int,
    plan: Sequence[Sequence[int]] = PLAN,
    *,
    first_seq: int = 0,
    first_order: int = 0,
) -> tuple[list[bytes], list[tuple[int, int, bytes]]]:
    """Wire batches for ``plan`` and the (client_id, client_order, payload) they carry."""
    frames: list[bytes] = []
    expected: list[tuple[int, int, bytes]] = []
    order = first_order
    for k, sizes in enumerate(plan):
        frame, payloads = make_batch(first_seq + k, client_id, order, sizes)
        frames.append(frame)
        expected.extend((client_id, order + i, p) for i, p in enumerate(payloads))
        order += len(sizes)
    return frames, expected


def prefix_sums(plan: Sequence[Sequence[int]]) -> set[int]:
    out, total = set(), 0
    for sizes in plan:
        total += len(sizes)
        out.add(total)
    return out


def assert_growing_counts(counts: list[int], plan: Sequence[Sequence[int]]) -> None:
    """Counts are cumulative batch boundaries, strictly growing, ending at the total."""
    assert counts, "no ack count at all"
    assert counts == sorted(set(counts)), f"counts not strictly growing: {counts}"
    assert set(counts) <= prefix_sums(plan), f"a count is not a batch boundary: {counts}"
    assert counts[-1] == sum(len(s) for s in plan)


# -- log side helpers -----------------------------------------------------------------------------


def log_records(broker: Broker, topic: str) -> list[tuple[int, int, int, bytes]]:
    """Every committed record of ``topic`` (logical_offset, client_id, client_order, payload),
    checking each batch header and record header the broker wrote on the way."""
    stream = broker.log.existing_stream(topic)
    assert stream is not None, f"topic {topic!r} does not exist"
    region = broker.log.region
    out: list[tuple[int, int, int, bytes]] = []
    for i in range(len(stream.index_header)):
        b = stream.committed_batch(i)
        (
            _seq,
            client_id,
            num_msg,
            complete,
            broker_id,
            _ordered,
            _pad,
            total_size,
            start,
            log_idx,
            _total_order,
            _export,
        ) = BATCH_HEADER.unpack(bytes(region[b.header_offset : b.header_offset + 128]))
        assert complete == BATCH_COMPLETE_COMMITTED
        assert broker_id == broker.broker_id
        assert (client_id, num_msg, total_size) == (b.client_id, b.num_msg, b.total_size)
        assert start == b.first_offset == len(out), "batches are not gap-free"
        assert log_idx == b.payload_offset == b.header_offset + 128
        assert stream.index_first[i] == start
        data = bytes(region[b.payload_offset : b.payload_offset + b.total_size])
        records = parse_records(data)  # also checks next_msg_diff == paddedSize
        assert len(records) == num_msg
        pos = 0
        for j, (logical, rec_client, _order, payload) in enumerate(records):
            padded, segment_header, *_ = MESSAGE_HEADER.unpack_from(data, pos)
            assert padded == 64 + -(-len(payload) // 64) * 64
            assert segment_header == 0
            assert logical == start + j
            assert rec_client == client_id
            pos += padded
        out.extend(records)
    assert [r[0] for r in out] == list(range(len(out)))
    assert stream.next_offset == len(out)
    return out


def committed_region_bytes(broker: Broker, topic: str, first_batch: int = 0) -> bytes:
    stream = broker.log.existing_stream(topic)
    assert stream is not None
    parts = []
    for i in range(first_batch, len(stream.index_header)):
        b = stream.committed_batch(i)
        parts.append(bytes(broker.log.region[b.payload_offset : b.payload_offset + b.total_size]))
    return b"".join(parts)


def without_offsets(records: list[tuple[int, int, int, bytes]]) -> list[tuple[int, int, bytes]]:
    return [(cid, order, payload) for _, cid, order, payload in records]


async def wait_no_connections(broker: Broker) -> None:
    await wait_until(lambda: not any(broker.statistics().connections.values()))


# -- the three ack modes --------------------------------------------------------------------------


@PATHS
@pytest.mark.parametrize("with_port", [False, True], ids=["port-0", "port-ignored"])
async def test_ack0_no_ack_stream_and_exact_log(
    make_config: MakeConfig, use_nonblocking: bool, with_port: bool
) -> None:
    config = make_config(**{"network.use_nonblocking": use_nonblocking})
    frames, expected = plan_batches(client_id=5)
    # With ack 0 the port field means nothing: the broker must not dial it.
    unused_port = await closed_port() if with_port else 0
    with trio.fail_after(10):
        async with open_broker(config) as broker:
            received = await publish(
                broker.port, "ack0", frames, client_id=5, ack=0, ack_port=unused_port
            )
            # Ack level 0: not one byte comes back, just EOF once everything is in.
            assert received == b""
            records = log_records(broker, "ack0")
            assert without_offsets(records) == expected
            stats = broker.statistics()
            assert stats.messages_committed == PLAN_MESSAGES
            assert stats.batches_committed == len(PLAN)
            assert stats.errors == {}
            assert (stats.dial_backs.dialed, stats.dial_backs.failed) == (0, 0)


@PATHS
async def test_ack1_same_connection_counts_and_exact_log(
    make_config: MakeConfig, use_nonblocking: bool
) -> None:
    config = make_config(**{"network.use_nonblocking": use_nonblocking})
    frames, expected = plan_batches(client_id=6)
    with trio.fail_after(10):
        async with open_broker(config) as broker:
            received = await publish(broker.port, "same", frames, client_id=6)
            broker_id, counts, error = parse_ack_stream(received)
            assert broker_id == 0
            assert error is None
            assert_growing_counts(counts, PLAN)
            records = log_records(broker, "same")
            assert without_offsets(records) == expected
            # The subscribe path reads back exactly the bytes in the region.
            region = committed_region_bytes(broker, "same")
            assert await subscribe_bytes(broker.port, "same", len(region)) == region


@PATHS
async def test_subscriber_from_the_middle_of_a_batch(
    make_config: MakeConfig, use_nonblocking: bool
) -> None:
    config = make_config(**{"network.use_nonblocking": use_nonblocking})
    frames, expected = plan_batches(client_id=6)
    start = 175  # inside the mixed-size batch (messages 150..199)
    with trio.fail_after(10):
        async with open_broker(config) as broker:
            await publish(broker.port, "mid", frames, client_id=6)
            region = committed_region_bytes(broker, "mid", first_batch=3)
            skip = sum(64 + -(-size // 64) * 64 for size in PLAN[3][: start - 150])
            data = await subscribe_bytes(broker.port, "mid", len(region) - skip, last_addr=start)
            assert data == region[skip:]
            records = parse_records(data)
            assert [r[0] for r in records] == list(range(start, PLAN_MESSAGES))
            assert without_offsets(records) == expected[start:]


@PATHS
async def test_ack1_dial_back_counts_and_exact_log(
    make_config: MakeConfig, use_nonblocking: bool
) -> None:
    config = make_config(**{"network.use_nonblocking": use_nonblocking})
    frames, expected = plan_batches(client_id=7)
    with trio.fail_after(10):
        async with open_broker(config) as broker:
            ack_data: list[bytes] = []

            async def accept_acks(listener: trio.SocketListener) -> None:
                while True:
                    ack_stream = await listener.accept()
                    async with ack_stream:
                        ack_data.append(await read_all(ack_stream))

            async with ack_listener() as (listener, ack_port), trio.open_nursery() as nursery:
                nursery.start_soon(accept_acks, listener)
                received = await publish(
                    broker.port, "dial", frames, client_id=7, ack_port=ack_port
                )
                # The publish connection carries nothing in dial-back mode.
                assert received == b""
                await wait_until(lambda: len(ack_data) == 1)
                nursery.cancel_scope.cancel()
            broker_id, counts, error = parse_ack_stream(ack_data[0])
            assert broker_id == 0
            assert error is None
            assert_growing_counts(counts, PLAN)
            assert without_offsets(log_records(broker, "dial")) == expected
            dial = broker.statistics().dial_backs
            assert (dial.dialed, dial.failed) == (1, 0)
            await wait_until(lambda: broker.statistics().dial_backs.active == 0)


@PATHS
async def test_dial_back_two_connections_share_one_ack_connection(
    make_config: MakeConfig, use_nonblocking: bool
) -> None:
    config = make_config(**{"network.use_nonblocking": use_nonblocking})
    cid, topic = 8, "shared-acks"
    (frame_a0, _), (frame_b1, _), (frame_a2, _), (frame_b3, _) = (
        make_batch(0, cid, 0, [100] * 50),
        make_batch(1, cid, 50, [200] * 30),
        make_batch(2, cid, 80, [0] * 20),
        make_batch(3, cid, 100, [1000] * 40),
    )
    with trio.fail_after(10):
        async with open_broker(config) as broker:
            async with ack_listener() as (listener, ack_port):
                async with connections(broker.port, 2) as (pub_a, pub_b):
                    await pub_a.send_all(handshake(topic, client_id=cid, port=ack_port))
                    await pub_a.send_all(frame_a0)
                    ack = await listener.accept()
                    async with ack:
                        assert await recv_broker_id(ack) == 0
                        assert await recv_ack_item(ack) == 50
                        # Second publish connection of the same client and topic.
                        await pub_b.send_all(handshake(topic, client_id=cid, port=ack_port))
                        await pub_b.send_all(frame_b1)
                        assert await recv_ack_item(ack) == 80
                        await pub_a.send_all(frame_a2)
                        assert await recv_ack_item(ack) == 100
                        await pub_b.send_all(frame_b3)
                        assert await recv_ack_item(ack) == 140
                        await pub_a.send_eof()
                        assert await read_all(pub_a) == b""
                        # The ack connection outlives the first publish connection...
                        await pub_b.send_eof()
                        assert await read_all(pub_b) == b""
                        # ...and closes after the last one, with nothing more to say.
                        assert await read_all(ack) == b""
            stats = broker.statistics()
            assert (stats.dial_backs.dialed, stats.dial_backs.failed) == (1, 0)
            assert stats.messages_committed == 140
            records = log_records(broker, topic)
            assert [(r[1], r[2]) for r in records] == [(cid, i) for i in range(140)]


@PATHS
async def test_dial_back_two_concurrent_connections_sum_on_one_ack_stream(
    make_config: MakeConfig, use_nonblocking: bool
) -> None:
    config = make_config(**{"network.use_nonblocking": use_nonblocking})
    cid, topic = 9, "sum"
    plan_a = [[64] * 25] * 4
    plan_b = [[500] * 10] * 6
    frames_a, expected_a = plan_batches(cid, plan_a, first_seq=0, first_order=0)
    frames_b, expected_b = plan_batches(cid, plan_b, first_seq=100, first_order=1000)
    with trio.fail_after(10):
        async with open_broker(config) as broker:
            async with ack_listener() as (listener, ack_port):
                # Both publish connections are attached (handshake done, idle) before
                # either sends, so they share the client's one ack connection.
                async with connections(broker.port, 2) as (pub_a, pub_b):
                    await pub_a.send_all(handshake(topic, client_id=cid, port=ack_port))
                    ack = await listener.accept()
                    await pub_b.send_all(handshake(topic, client_id=cid, port=ack_port))
                    await wait_until(lambda: broker.statistics().connections["wait_header"] == 2)
                    async with ack:
                        results: dict[str, bytes] = {}

                        async def send(name: str, stream: trio.SocketStream, fr: list[bytes]):
                            for frame in fr:
                                await stream.send_all(frame)
                            await stream.send_eof()
                            results[name] = await read_all(stream)

                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(send, "a", pub_a, frames_a)
                            nursery.start_soon(send, "b", pub_b, frames_b)
                            results["ack"] = await read_all(ack)
            assert results["a"] == results["b"] == b""
            broker_id, counts, error = parse_ack_stream(results["ack"])
            assert (broker_id, error) == (0, None)
            assert counts == sorted(set(counts))
            assert counts[-1] == 100 + 60
            assert broker.statistics().dial_backs.dialed == 1
            records = log_records(broker, topic)
            # Each connection's batches are in order; together they are everything.
            assert [r for r in without_offsets(records) if r[1] < 1000] == expected_a
            assert [r for r in without_offsets(records) if r[1] >= 1000] == expected_b


# -- several publishers ---------------------------------------------------------------------------


@PATHS
async def test_concurrent_publishers_keep_per_client_order(
    make_config: MakeConfig, use_nonblocking: bool
) -> None:
    config = make_config(**{"network.use_nonblocking": use_nonblocking})
    plans = {
        # client id: (topic, plan)
        21: ("alpha", [[100] * 40] * 5),
        22: ("alpha", [MIXED * 3] * 5),
        23: ("alpha", [[0] * 60, [1] * 60, [3000] * 20, [64] * 60]),
        24: ("alpha", [[2048] * 16] * 8),
        31: ("beta", [[10] * 100] * 3),
        41: ("gamma", [MIXED * 2, [7] * 33]),
    }
    results: dict[int, bytes] = {}
    expected: dict[int, list[tuple[int, int, bytes]]] = {}
    with trio.fail_after(10):
        async with open_broker(config) as broker:

            async def run(cid: int) -> None:
                topic, plan = plans[cid]
                frames, expected[cid] = plan_batches(cid, plan)
                results[cid] = await publish(broker.port, topic, frames, client_id=cid)

            async with trio.open_nursery() as nursery:
                for cid in plans:
                    nursery.start_soon(run, cid)

            for cid, (_topic, plan) in plans.items():
                broker_id, counts, error = parse_ack_stream(results[cid])
                assert (broker_id, error) == (0, None)
                assert_growing_counts(counts, plan)
            for topic in ("alpha", "beta", "gamma"):
                records = without_offsets(log_records(broker, topic))
                clients = [cid for cid, (t, _) in plans.items() if t == topic]
                assert len(records) == sum(len(expected[cid]) for cid in clients)
                for cid in clients:
                    assert [r for r in records if r[0] == cid] == expected[cid]
            total = sum(len(v) for v in expected.values())
            stats = broker.statistics()
            assert stats.messages_received == stats.messages_committed == total
            assert (
                stats.batches_received
                == stats.batches_committed
                == sum(len(plan) for _, plan in plans.values())
            )


@PATHS
async def test_eof_commits_and_acks_every_batch_before_closing(
    make_config: MakeConfig, use_nonblocking: bool
) -> None:
    config = make_config(**{"network.use_nonblocking": use_nonblocking})
    plan = [[40 + k] * 5 for k in range(40)]
    frames, expected = plan_batches(11, plan)
    with trio.fail_after(10):
        async with open_broker(config) as broker:
            async with await connect(broker.port) as stream:
                # Everything in one write, EOF right behind it, nothing read until then.
                await stream.send_all(handshake("eof", client_id=11) + b"".join(frames))
                await stream.send_eof()
                broker_id, counts, error = parse_ack_stream(await read_all(stream))
                # At EOF from the broker every batch is in the log.
                stats = broker.statistics()
            assert (broker_id, error) == (0, None)
            assert_growing_counts(counts, plan)
            assert stats.batches_committed == 40
            assert stats.messages_committed == 200
            assert without_offsets(log_records(broker, "eof")) == expected


@PATHS
async def test_broker_overwrites_the_fields_it_owns(
    make_config: MakeConfig, use_nonblocking: bool
) -> None:
    """Whatever a client puts in broker-set fields, the log holds the broker's values."""
    config = make_config(**{"network.use_nonblocking": use_nonblocking})
    payloads = [payload_for(23, 2 + i, size) for i, size in enumerate([0, 1, 100, 64, 1000])]
    body = bytearray()
    for i, p in enumerate(payloads):
        padded = 64 + -(-len(p) // 64) * 64
        # segment_header, logical_offset and next_msg_diff are garbage here.
        body += MESSAGE_HEADER.pack(padded, 0xDEAD, 5 + i, 7, 0, 2 + i, 23, len(p))
        body += p + b"\xee" * (padded - 64 - len(p))
    # batch_complete, broker_id, start_logical_offset and log_idx are garbage too.
    head = BATCH_HEADER.pack(0, 23, len(payloads), 7, 9, 0, 0, len(body), 123, 456, 0, 0)
    # The handshake's num_msg and (for a publish) last_addr are ignored.
    hello = HANDSHAKE.pack(23, 1, 777, 10**12, 0, 0, b"owned".ljust(32, b"\0"))
    with trio.fail_after(10):
        async with open_broker(config) as broker:
            async with await connect(broker.port) as stream:
                await stream.send_all(hello)
                # One ordinary batch first, so the garbage batch does not start at 0.
                first, first_payloads = make_batch(0, 23, 0, [3, 4])
                await stream.send_all(first + head + bytes(body))
                await stream.send_eof()
                broker_id, counts, error = parse_ack_stream(await read_all(stream))
            assert (broker_id, error) == (0, None)
            assert counts in ([2, 7], [7])
            records = log_records(broker, "owned")  # checks every broker-set field
            assert without_offsets(records) == [
                (23, 0, first_payloads[0]),
                (23, 1, first_payloads[1]),
                *((23, 2 + i, p) for i, p in enumerate(payloads)),
            ]
            assert [r[0] for r in records] == list(range(7))
            assert broker.log.existing_stream("owned").committed_batch(1).first_offset == 2


# -- broker id, statistics, phases ----------------------------------------------------------------


async def test_broker_id_heads_the_ack_streams(make_config: MakeConfig) -> None:
    config = make_config(**{"broker.id": 3, "cxl.max_brokers": 4})
    frames, _ = plan_batches(12, [[10] * 10])
    with trio.fail_after(10):
        async with open_broker(config) as broker:
            assert broker.broker_id == 3
            received = await publish(broker.port, "id3", frames[:1], client_id=12)
            assert received[:4] == struct.pack("<i", 3)
            assert parse_ack_stream(received) == (3, [10], None)
            # Dial-back streams start with it too.
            async with ack_listener() as (listener, ack_port), await connect(broker.port) as pub:
                await pub.send_all(handshake("id3", client_id=13, port=ack_port))
                async with await listener.accept() as ack:
                    await pub.send_all(make_batch(0, 13, 0, [5] * 4)[0])
                    await pub.send_eof()
                    assert await read_all(pub) == b""
                    assert await read_all(ack) == struct.pack("<iQ", 3, 4)
            # The records live in broker 3's stream and its headers carry id 3.
            stream = broker.log.existing_stream("id3")
            assert stream is not None
            assert stream.broker_id == 3
            records = log_records(broker, "id3")
            assert [(r[1], r[2]) for r in records] == [(12, i) for i in range(10)] + [
                (13, i) for i in range(4)
            ]


@PATHS
async def test_statistics_after_a_run_and_phases_while_idle(
    make_config: MakeConfig, use_nonblocking: bool
) -> None:
    config = make_config(**{"network.use_nonblocking": use_nonblocking})
    frames, _ = plan_batches(14)
    sizes = [len(f) - 128 for f in frames]
    with trio.fail_after(10):
        async with open_broker(config) as broker:
            async with await connect(broker.port) as stream:
                await stream.send_all(handshake("stats", client_id=14) + frames[0])
                assert await recv_broker_id(stream) == 0
                assert await recv_ack_item(stream) == 50
                # Idle after one batch: the connection waits for the next header.
                await wait_until(
                    lambda: broker.statistics().connections[ConnectionPhase.WAIT_HEADER.value] == 1
                )
                stats = broker.statistics()
                assert {k: v for k, v in stats.connections.items() if v} == {"wait_header": 1}
                assert set(stats.connections) == {p.value for p in ConnectionPhase}
                assert (stats.batches_received, stats.messages_received) == (1, 50)
                assert (stats.batches_committed, stats.messages_committed) == (1, 50)
                assert stats.pool.used == 0
                for frame in frames[1:]:
                    await stream.send_all(frame)
                await stream.send_eof()
                _, counts, error = parse_ack_stream(await read_all(stream), with_broker_id=False)
                assert error is None
                assert_growing_counts([50, *counts], PLAN)
            await wait_no_connections(broker)
            stats = broker.statistics()
            assert stats.connections_accepted == 1
            assert stats.connections_refused == 0
            assert (stats.batches_received, stats.messages_received) == (6, PLAN_MESSAGES)
            assert stats.bytes_received == sum(sizes)
            assert (stats.batches_committed, stats.messages_committed) == (6, PLAN_MESSAGES)
            assert stats.bytes_committed == sum(sizes)
            assert stats.batches_discarded == 0
            assert stats.errors == {}
            assert stats.internal_errors == 0
            assert stats.queued_batches == 0
            assert stats.pool.used == 0
            assert stats.pool.free == stats.pool.num_buffers
            if use_nonblocking:
                assert stats.pool.allocations == 6
                assert 1 <= stats.pool.peak_used <= 6
            else:
                assert stats.pool.allocations == 0  # the direct path never stages
            assert (stats.log.batches_committed, stats.log.messages_committed) == (
                6,
                PLAN_MESSAGES,
            )
            assert stats.log.batches_abandoned == 0
            assert stats.log.log_full == 0


async def test_subscriber_phase_is_visible(make_config: MakeConfig) -> None:
    with trio.fail_after(10):
        async with open_broker(make_config()) as broker:
            async with await connect(broker.port) as sub:
                await sub.send_all(handshake("later", client_id=1, ack=0, req=1))
                await wait_until(lambda: broker.statistics().connections["subscribed"] == 1)
                frames, expected = plan_batches(15, [[33] * 3])
                await publish(broker.port, "later", frames, client_id=15)
                data = await recv_exactly(sub, 3 * (64 + 64))
                assert without_offsets(parse_records(data)) == expected
            await wait_no_connections(broker)


@PATHS
@pytest.mark.parametrize("max_batch_bytes", [None, 4096])
async def test_a_batch_of_exactly_max_batch_bytes_is_accepted(
    make_config: MakeConfig, use_nonblocking: bool, max_batch_bytes: int | None
) -> None:
    config = make_config(
        **{"network.use_nonblocking": use_nonblocking, "network.max_batch_bytes": max_batch_bytes}
    )
    limit = config.network.effective_max_batch_bytes
    assert limit == (max_batch_bytes or 1 << 20)
    # 960-byte messages occupy 1024 bytes each: exactly the limit, then 64 bytes more.
    plan = [[960] * (limit // 1024)]
    frames, expected = plan_batches(22, plan)
    over, _ = make_batch(1, 22, len(expected), [960] * (limit // 1024 - 1) + [1024])
    assert len(frames[0]) - 128 == limit
    assert len(over) - 128 == limit + 64
    with trio.fail_after(10):
        async with open_broker(config) as broker:
            received = await publish(
                broker.port, "edge", [*frames, over], client_id=22, refused=True
            )
            broker_id, counts, error = parse_ack_stream(received)
            assert (broker_id, counts) == (0, [limit // 1024])
            assert error is not None
            assert error[0] == ErrorCode.BAD_BATCH_HEADER
            assert without_offsets(log_records(broker, "edge")) == expected


# -- pressure and a full log ----------------------------------------------------------------------


@pytest.mark.parametrize("per_connection", [8, 1])
async def test_backpressure_with_a_tiny_pool_loses_nothing(
    make_config: MakeConfig, per_connection: int
) -> None:
    config = make_config(
        **{
            "network.staging_pool_num_buffers": 2,
            "network.pause_high_watermark": 1.0,
            "network.resume_low_watermark": 0.5,
            "network.num_cxl_allocation_workers": 1,
            "network.max_buffers_per_connection": per_connection,
        }
    )
    plan = [[4000] * 100] * 8
    results: dict[int, bytes] = {}
    expected: dict[int, list[tuple[int, int, bytes]]] = {}
    with trio.fail_after(10):
        async with open_broker(config) as broker:

            async def run(cid: int) -> None:
                frames, expected[cid] = plan_batches(cid, plan)
                results[cid] = await publish(broker.port, "pressure", frames, client_id=cid)

            async with trio.open_nursery() as nursery:
                for cid in range(51, 55):
                    nursery.start_soon(run, cid)
            for cid in range(51, 55):
                broker_id, counts, error = parse_ack_stream(results[cid])
                assert (broker_id, error) == (0, None)
                assert_growing_counts(counts, plan)
            records = without_offsets(log_records(broker, "pressure"))
            assert len(records) == 4 * 800
            for cid in range(51, 55):
                assert [r for r in records if r[0] == cid] == expected[cid]
            stats = broker.statistics()
            assert stats.pool.num_buffers == 2
            assert stats.pool.peak_used == 2  # the pool really ran dry...
            assert stats.pauses >= 1  # ...and the monitor held the receivers
            assert stats.pauses == stats.resumes
            assert stats.pool.used == 0
            assert stats.batches_committed == 32
            assert stats.batches_discarded == 0
            assert stats.errors == {}


async def lockstep_publish(
    port: int, topic: str, frames: Sequence[bytes], *, client_id: int
) -> tuple[int, list[int], tuple[int, str] | None, bytes]:
    """Send one batch at a time, the next only after the previous one's ack.

    Returns the broker id, the counts, the error frame (if any) and whatever
    came after it before EOF. The sender may find the connection reset once
    the broker gives up, which is expected.
    """
    async with await connect(port) as stream:
        await stream.send_all(handshake(topic, client_id=client_id))
        go_send, go_receive = trio.open_memory_channel[None](len(frames))
        counts: list[int] = []
        error: tuple[int, str] | None = None

        async def sender() -> None:
            try:
                for frame in frames:
                    await stream.send_all(frame)
                    await go_receive.receive()
            except trio.BrokenResourceError:
                pass

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            broker_id = await recv_broker_id(stream)
            while len(counts) < len(frames):
                item = await recv_ack_item(stream)
                if isinstance(item, tuple):
                    error = item
                    break
                counts.append(item)
                go_send.send_nowait(None)
            rest = await read_all(stream)
            nursery.cancel_scope.cancel()
        return broker_id, counts, error, rest


@PATHS
async def test_log_full_reports_error_4_and_keeps_serving(
    make_config: MakeConfig, use_nonblocking: bool
) -> None:
    config = make_config(
        **{
            "cxl.size_mb": 8,
            "cxl.segment_mb": 2,
            "cxl.segment_unit_kb": 2048,  # fixed 2 MiB segments: a known capacity
            "network.staging_pool_buffer_size_mb": 1,
            "network.backoff_max_retries": 2,
            "network.use_nonblocking": use_nonblocking,
        }
    )
    per_batch = 900  # 900 x 1 KB messages: 979,200 payload bytes, two batches per segment
    frames, expected = plan_batches(16, [[1000] * per_batch] * 12)
    with trio.fail_after(10):
        async with open_broker(config) as broker:
            geometry = broker.log.geometry
            fit = geometry.num_units * ((geometry.segment_size - 64) // (128 + 979_200))
            assert fit == 6
            broker_id, counts, error, rest = await lockstep_publish(
                broker.port, "full", frames, client_id=16
            )
            assert broker_id == 0
            # Every batch that fit is acked, one count per batch, then error 4, then EOF.
            assert counts == [per_batch * (k + 1) for k in range(fit)]
            assert error is not None
            assert error[0] == ErrorCode.LOG_FULL
            assert rest == b""
            stats = broker.statistics()
            assert stats.messages_committed == counts[-1] == fit * per_batch
            assert stats.log.log_full >= 1
            assert stats.allocation_failures == 1
            assert stats.errors == {"log_full": 1}
            assert stats.pool.used == 0
            records = log_records(broker, "full")
            assert without_offsets(records) == expected[: fit * per_batch]

            # Still serving: a subscriber reads everything committed...
            region = committed_region_bytes(broker, "full")
            assert await subscribe_bytes(broker.port, "full", len(region)) == region
            # ...and a new publisher to the same topic gets error 4, not a crash.
            one, _ = make_batch(0, 17, 0, [1000] * per_batch)
            broker_id, counts, error, rest = await lockstep_publish(
                broker.port, "full", [one], client_id=17
            )
            assert (broker_id, counts, rest) == (0, [], b"")
            assert error is not None
            assert error[0] == ErrorCode.LOG_FULL
            stats = broker.statistics()
            assert stats.errors == {"log_full": 2}
            assert stats.messages_committed == fit * per_batch
            assert stats.internal_errors == 0
            assert stats.pool.used == 0
            await wait_no_connections(broker)


# -- graceful shutdown ----------------------------------------------------------------------------


@PATHS
async def test_shutdown_sends_final_acks_then_error_5(
    make_config: MakeConfig, use_nonblocking: bool
) -> None:
    config = make_config(**{"network.use_nonblocking": use_nonblocking})
    frames, expected = plan_batches(18, [[300] * 20] * 2)
    with trio.fail_after(10):
        async with AsyncExitStack() as streams:
            async with open_broker(config) as broker:
                stream = await connect_for_good(streams, broker.port)
                await stream.send_all(handshake("bye", client_id=18) + b"".join(frames))
                # Nothing is read here: the acks pile up in our receive buffer.
                await wait_until(lambda: broker.statistics().messages_committed == 40)
                await wait_until(lambda: broker.statistics().connections["wait_header"] == 1)
                assert without_offsets(log_records(broker, "bye")) == expected
            # Left open_broker: it drained and closed; its last words wait in our socket.
            broker_id, counts, error = parse_ack_stream(await read_all(stream))
    assert broker_id == 0
    assert set(counts) <= {20, 40}
    assert counts[-1] == 40
    assert error is not None
    assert error[0] == ErrorCode.SHUTTING_DOWN


async def connect_for_good(streams: AsyncExitStack, port: int) -> trio.SocketStream:
    """A client connection that outlives the broker block and is closed in any case."""
    return await streams.enter_async_context(await connect(port))


@PATHS
async def test_shutdown_with_dial_back_acks(make_config: MakeConfig, use_nonblocking: bool) -> None:
    config = make_config(**{"network.use_nonblocking": use_nonblocking})
    frames, _ = plan_batches(19, [[300] * 20] * 2)
    with trio.fail_after(10):
        async with ack_listener() as (listener, ack_port), AsyncExitStack() as streams:
            async with open_broker(config) as broker:
                pub = await connect_for_good(streams, broker.port)
                await pub.send_all(handshake("bye", client_id=19, port=ack_port))
                ack = await streams.enter_async_context(await listener.accept())
                await pub.send_all(b"".join(frames))
                await wait_until(lambda: broker.statistics().messages_committed == 40)
            publish_side = await read_all(pub)
            ack_side = await read_all(ack)
    # The error goes to the publish connection, as its first and only bytes...
    assert parse_ack_stream(publish_side, with_broker_id=False)[2] == (
        ErrorCode.SHUTTING_DOWN,
        "broker is shutting down",
    )
    assert publish_side[:8] == b"\xff" * 8
    # ...and the ack connection gets the final count and a plain close.
    broker_id, counts, error = parse_ack_stream(ack_side)
    assert (broker_id, error) == (0, None)
    assert counts[-1] == 40


@PATHS
async def test_shutdown_lets_the_batch_in_flight_finish(
    make_config: MakeConfig, use_nonblocking: bool
) -> None:
    config = make_config(**{"network.use_nonblocking": use_nonblocking})
    first, _ = make_batch(0, 20, 0, [8] * 10)
    big, _ = make_batch(1, 20, 10, [4000] * 100)
    with trio.fail_after(10):
        async with AsyncExitStack() as streams, trio.open_nursery() as nursery:
            async with open_broker(config) as broker:
                stream = await connect_for_good(streams, broker.port)
                await stream.send_all(handshake("inflight", client_id=20) + first + big[:1000])
                await wait_until(lambda: broker.statistics().connections["wait_payload"] == 1)

                async def send_the_rest_during_the_drain() -> None:
                    await wait_until(lambda: broker.shutting_down)
                    await stream.send_all(big[1000:])

                nursery.start_soon(send_the_rest_during_the_drain)
            # Left open_broker: the drain waited for the rest of the batch.
            broker_id, counts, error = parse_ack_stream(await read_all(stream))
    assert broker_id == 0
    assert counts[-1] == 110
    assert error is not None
    assert error[0] == ErrorCode.SHUTTING_DOWN


@PATHS
async def test_shutdown_grace_bounds_a_stalled_batch(
    make_config: MakeConfig, use_nonblocking: bool
) -> None:
    config = make_config(
        **{
            "network.use_nonblocking": use_nonblocking,
            "network.shutdown_grace_s": 0.3,
            # Only the grace may end the stall (a busy machine can take a second
            # between the stall and the drain, and the stall timeout would end it).
            "network.payload_stall_timeout_s": 30.0,
        }
    )
    first, _ = make_batch(0, 21, 0, [8] * 10)
    big, _ = make_batch(1, 21, 10, [4000] * 100)
    with trio.fail_after(10):
        async with AsyncExitStack() as streams:
            async with open_broker(config) as broker:
                stream = await connect_for_good(streams, broker.port)
                await stream.send_all(handshake("stall", client_id=21) + first + big[:1000])
                await wait_until(lambda: broker.statistics().connections["wait_payload"] == 1)
                start = trio.current_time()
            # The rest of the batch never comes: the drain gives up after the grace period.
            elapsed = trio.current_time() - start
            broker_id, counts, error = parse_ack_stream(await read_all(stream))
    assert 0.3 <= elapsed < 2.0
    assert (broker_id, counts) == (0, [10])
    assert error is None or error[0] == ErrorCode.SHUTTING_DOWN


_FLOOD = """
import socket, sys
hello, data = open(sys.argv[2], "rb").read(), open(sys.argv[3], "rb").read()
with socket.create_connection(("127.0.0.1", int(sys.argv[1]))) as sock:
    sock.sendall(hello)
    print("flooding", flush=True)
    while True:
        sock.sendall(data)
"""


@PATHS
async def test_a_connection_whose_bytes_are_always_there_does_not_starve_another(
    make_config: MakeConfig, tmp_path: Path, use_nonblocking: bool
) -> None:
    """Bytes that have arrived are read without a pass through the scheduler
    each; the receive loop still yields once a batch, so a publisher that
    keeps the broker's socket full (another process, sending without end)
    never holds up another connection: its batch is acked meanwhile."""
    # Retention keeps the region from filling under the flood.
    config = make_config(
        **{"network.use_nonblocking": use_nonblocking, "topics.retention_bytes": 8 << 20}
    )
    hello = tmp_path / "hello"
    hello.write_bytes(handshake("flood", client_id=1, ack=0))
    data = tmp_path / "batches"
    data.write_bytes(b"".join(raw_batch(s, 1, 16 * s, 16, 4000)[0] for s in range(64)))
    with trio.fail_after(30):
        async with open_broker(config) as broker, trio.open_nursery() as nursery:
            flood = await nursery.start(
                partial(
                    trio.run_process,
                    [sys.executable, "-c", _FLOOD, str(broker.port), str(hello), str(data)],
                    stdout=subprocess.PIPE,
                )
            )
            assert flood.stdout is not None
            assert b"flooding" in await flood.stdout.receive_some(100)
            await wait_until(lambda: broker.statistics().messages_received > 10_000)
            async with await connect(broker.port) as other:
                await other.send_all(handshake("other", client_id=2, ack=1))
                await recv_broker_id(other)
                before = broker.statistics().batches_received
                await other.send_all(raw_batch(0, 2, 0, 16, 4000)[0])
                assert await recv_ack_item(other) == 16
                # Served in turn with the flood, a batch each: not after a
                # long run of the flood's batches.
                assert broker.statistics().batches_received - before < 50
            assert flood.returncode is None  # acked while the flood went on
            nursery.cancel_scope.cancel()
