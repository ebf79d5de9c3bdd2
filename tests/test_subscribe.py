"""The broker's subscribe path (wire protocol section 7): end to end on loopback, and a
subscriber that never reads on the mock clock."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
from conftest import MakeConfig, wait_until
from memory import MemoryListener, memory_broker, open_client, settle
from rawclient import MESSAGE_HEADER, batch, handshake, parse_ack_stream, parse_records, payload_for
from tcpclient import connect, publish

from trio_embarcadero import BrokerError, ConnectionPhase, ErrorCode, open_broker
from trio_embarcadero.broker import Broker
from trio_embarcadero.client import Message, Subscriber, open_publisher, open_subscriber
from trio_embarcadero.client.records import RecordDecoder
from trio_embarcadero.config import Config

HOST = "127.0.0.1"
MIB = 2**20


async def raw_publish(port: int, topic: str, client_id: int, batches: list[bytes]) -> list[int]:
    _, counts, error = parse_ack_stream(await publish(port, topic, batches, client_id=client_id))
    assert error is None
    return counts


async def take(sub: Subscriber, count: int) -> list[Message]:
    out: list[Message] = []
    while len(out) < count:
        out.extend(await sub.receive_messages())
    return out


def subscribers(broker: Broker) -> int:
    return sum(c.phase == ConnectionPhase.SUBSCRIBED for c in broker.connections)


async def test_a_topic_that_does_not_exist_yet_is_waited_for(make_config: MakeConfig) -> None:
    data, payloads = batch(0, 3, 0, 10, 50)
    with trio.fail_after(10):
        async with open_broker(make_config()) as broker:
            async with open_subscriber(HOST, broker.port, "later") as sub:
                await wait_until(lambda: subscribers(broker) == 1)
                assert broker.log.existing_stream("later") is None
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(raw_publish, broker.port, "later", 3, [data])
                    got = await take(sub, 10)
    assert [bytes(m.payload) for m in got] == payloads
    assert [m.offset for m in got] == list(range(10))


async def test_many_subscribers_at_any_offset_while_publishing(make_config: MakeConfig) -> None:
    batches = [batch(k, 8, 20 * k, 20, 64 * k + 3) for k in range(10)]
    payloads = [p for _, ps in batches for p in ps]
    starts = [0, 0, 5, 20, 21, 199]
    results: dict[int, list[list[Message]]] = {s: [] for s in starts}
    with trio.fail_after(10):
        async with open_broker(make_config()) as broker:

            async def follow(start: int) -> None:
                async with open_subscriber(HOST, broker.port, "fan", start=start) as sub:
                    results[start].append(await take(sub, 200 - start))

            async with trio.open_nursery() as nursery:
                for start in starts:
                    nursery.start_soon(follow, start)
                await wait_until(lambda: subscribers(broker) == len(starts))
                counts = await raw_publish(broker.port, "fan", 8, [d for d, _ in batches])
    assert counts[-1] == 200
    for start in starts:
        for got in results[start]:
            assert [m.offset for m in got] == list(range(start, 200))
            assert [bytes(m.payload) for m in got] == payloads[start:]
            assert {m.client_id for m in got} == {8}


async def test_a_stalled_subscriber_does_not_slow_publishers(make_config: MakeConfig) -> None:
    """One subscriber never reads; the publisher sends several times what
    the socket buffers hold, and finishes with everything acked."""
    payload = bytes(range(256)) * 16  # 4 KiB
    count = 32 * MIB // len(payload)
    with trio.fail_after(20):
        async with open_broker(make_config()) as broker:
            async with open_subscriber(HOST, broker.port, "stall") as stalled:
                await wait_until(lambda: subscribers(broker) == 1)
                async with trio.open_nursery() as nursery:
                    active: list[int] = []

                    async def read_along() -> None:
                        async with open_subscriber(HOST, broker.port, "stall") as sub:
                            n = 0
                            while n < count:
                                got = await sub.receive_messages()
                                assert all(m.payload == payload for m in got)
                                n += len(got)
                            active.append(n)

                    nursery.start_soon(read_along)
                    async with open_publisher(
                        HOST, broker.port, "stall", batch_bytes=512 * 1024
                    ) as pub:
                        await pub.publish_many(payload for _ in range(count))
                    assert pub.acked == count
                assert active == [count]
                # The stalled subscriber still gets everything, once it reads.
                got = await take(stalled, count)
                assert got[-1].offset == count - 1
                assert all(m.payload == payload for m in got[:: count // 64])


async def test_shutdown_ends_subscriptions_with_error_5(make_config: MakeConfig) -> None:
    data, payloads = batch(0, 4, 0, 30, 100)
    errors: list[BrokerError] = []
    received: list[Message] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            async with open_broker(make_config()) as broker:

                async def subscribe(*, task_status: trio.TaskStatus[None]) -> None:
                    # Without the client's reconnect: the error is what is tested.
                    async with open_subscriber(
                        HOST, broker.port, "bye", reconnect_timeout_s=0
                    ) as sub:
                        task_status.started()
                        try:
                            while True:
                                received.extend(await take(sub, 1))
                        except BrokerError as exc:
                            errors.append(exc)

                await nursery.start(subscribe)
                await raw_publish(broker.port, "bye", 4, [data])
                await wait_until(lambda: len(received) == 30)
            # Leaving the broker's block drained it: the subscriber was told.
    assert [e.code for e in errors] == [ErrorCode.SHUTTING_DOWN]
    # A subscriber has no acks: its error says nothing about them.
    assert errors[0].acked is None
    assert str(errors[0]) == "broker error shutting_down: broker is shutting down"
    assert [bytes(m.payload) for m in received] == payloads


async def test_shutdown_while_a_subscriber_catches_up(make_config: MakeConfig) -> None:
    """A subscriber far behind gets error 5 right after a whole record,
    not the rest of the log first."""
    payload = bytes(4096)
    config = make_config(**{"network.shutdown_grace_s": 5.0})
    with trio.fail_after(10):
        async with open_broker(config) as broker:
            async with open_publisher(HOST, broker.port, "catch", batch_bytes=256 * 1024) as pub:
                await pub.publish_many(payload for _ in range(8000))  # 33 MiB
            async with open_subscriber(HOST, broker.port, "catch", reconnect_timeout_s=0) as sub:
                first = await sub.receive_messages()
                assert first[0].offset == 0
                broker.begin_shutdown()

                async def read_to_the_end() -> None:
                    while True:
                        await sub.receive_messages()

                with pytest.raises(BrokerError) as info:
                    await read_to_the_end()
            assert info.value.code == ErrorCode.SHUTTING_DOWN
            assert 0 < sub.position < 8000


async def test_the_subscriber_leaving_ends_its_connection(make_config: MakeConfig) -> None:
    with trio.fail_after(10):
        async with open_broker(make_config()) as broker:
            async with open_subscriber(HOST, broker.port, "idle"):
                await wait_until(lambda: subscribers(broker) == 1)
            await wait_until(lambda: not broker.connections)


async def test_raw_subscriber_reads_spec_records(make_config: MakeConfig) -> None:
    """Wire level: the stream is exactly the committed records, broker fields filled."""
    data, payloads = batch(0, 12, 0, 40, 77)
    with trio.fail_after(10):
        async with open_broker(make_config()) as broker:
            await raw_publish(broker.port, "wire", 12, [data])
            async with await connect(broker.port) as stream:
                await stream.send_all(handshake("wire", req=1, last_addr=10))
                want = 30 * (64 + 128)
                got = b""
                while len(got) < want:
                    got += await stream.receive_some()
    assert len(got) == want
    records = parse_records(got)  # checks next_msg_diff == paddedSize
    assert records == [(10 + i, 12, 10 + i, payloads[10 + i]) for i in range(30)]


async def test_no_record_of_an_incomplete_batch_is_sent(make_config: MakeConfig) -> None:
    """Direct path: a reserved batch holds back itself and everything after it."""
    config = make_config(**{"network.use_nonblocking": False})
    first, first_payloads = batch(0, 1, 0, 5, 100)
    held, held_payloads = batch(0, 2, 0, 5, 100)
    after, after_payloads = batch(1, 1, 5, 5, 100)
    with trio.fail_after(10):
        async with open_broker(config) as broker:
            await raw_publish(broker.port, "hold", 1, [first])
            async with open_subscriber(HOST, broker.port, "hold") as sub:
                assert [bytes(m.payload) for m in await take(sub, 5)] == first_payloads
                async with await connect(broker.port) as slow:
                    await slow.send_all(handshake("hold", client_id=2))
                    await slow.send_all(held[:-100])  # header and most of the payload
                    stream = broker.log.existing_stream("hold")
                    assert stream is not None
                    await wait_until(lambda: len(stream.pending) == 1)
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(raw_publish, broker.port, "hold", 1, [after])
                        await wait_until(lambda: len(stream.pending) == 2)
                        with trio.move_on_after(0.2):
                            early = await sub.receive_messages()
                            pytest.fail(f"got {len(early)} records of an incomplete batch")
                        await slow.send_all(held[-100:])
                        rest = await take(sub, 10)
    assert [bytes(m.payload) for m in rest] == held_payloads + after_payloads
    assert [m.offset for m in rest] == list(range(5, 15))


# -- payloads: copies by default, views on request -------------------------------------


async def publish_payloads(port: int, topic: str, payloads: list[bytes]) -> None:
    async with open_publisher(HOST, port, topic, batch_bytes=MIB // 4) as pub:
        await pub.publish_many(payloads)


@asynccontextmanager
async def subscribed(
    make_config: MakeConfig, topic: str, payloads: list[bytes]
) -> AsyncIterator[Subscriber]:
    """A subscriber from offset 0 of ``topic``, once ``payloads`` are published there."""
    with trio.fail_after(20):
        async with open_broker(make_config()) as broker:
            await publish_payloads(broker.port, topic, payloads)
            async with open_subscriber(HOST, broker.port, topic) as sub:
                yield sub


async def test_kept_messages_keep_their_payloads(make_config: MakeConfig) -> None:
    """Messages a subscriber handed out stay as they were while it receives
    more (its receive buffer is reused for every receive)."""
    payloads = [payload_for(7, i, 37 + i % 300) for i in range(20_000)]
    kept: list[Message] = []
    async with subscribed(make_config, "keep", payloads) as sub:
        while len(kept) < 10_000:
            kept.extend(await sub.receive_messages())
        async for message in sub:
            kept.append(message)
            if len(kept) == len(payloads):
                break
        assert sub.received > 2  # many receives into the same buffer
    assert [m.offset for m in kept] == list(range(len(payloads)))
    assert [m.payload for m in kept] == payloads
    assert {type(m.payload) for m in kept} == {bytes}


async def test_receive_views_is_the_zero_copy_opt_in(make_config: MakeConfig) -> None:
    payloads = [payload_for(3, i, 1 + i % 2000) for i in range(3000)]
    seen: list[bytes] = []
    kept: list[Message] = []
    async with subscribed(make_config, "views", payloads) as sub:
        # Mixed with iteration: a message it received but did not hand out
        # yet comes first, as a view.
        first = await anext(sub)
        while len(seen) < len(payloads) - 1:
            views = await sub.receive_views()
            assert {type(v.payload) for v in views} == {memoryview}
            seen.extend(bytes(v.payload) for v in views)  # used at once
            kept.append(views[-1].to_message())
    assert [first.payload, *seen] == payloads
    assert all(type(m.payload) is bytes for m in kept)
    assert [m.payload for m in kept] == [payloads[m.offset] for m in kept]


async def test_batches_hand_out_every_message_without_a_copy(make_config: MakeConfig) -> None:
    payloads = [payload_for(5, i, 1 + i * 37 % 1500) for i in range(5000)]
    got: list[bytes] = []
    offsets: list[int] = []
    async with subscribed(make_config, "batches", payloads) as sub:
        async for batch in sub.batches():
            data = bytes(batch.data)  # used before the next receive
            ends = (batch.starts + batch.sizes).tolist()
            got.extend(data[a:b] for a, b in zip(batch.starts.tolist(), ends, strict=True))
            offsets.extend(batch.offsets.tolist())
            # One publisher: its order of the messages is the log's.
            assert batch.client_orders.tolist() == batch.offsets.tolist()
            assert len(set(batch.client_ids.tolist())) == 1
            if batch.last_offset == len(payloads) - 1:
                break
        assert sub.received == len(payloads)
    assert got == payloads
    assert offsets == list(range(len(payloads)))


def encoded_records(payloads: list[bytes], first: int = 0) -> bytes:
    """A subscription stream: committed records, logical offsets from ``first``."""
    out = bytearray()
    for i, payload in enumerate(payloads):
        padded = MESSAGE_HEADER.size + -(-len(payload) // 64) * 64
        out += MESSAGE_HEADER.pack(padded, 0, first + i, 0, 0, i, 9, len(payload))
        out += payload.ljust(padded - MESSAGE_HEADER.size, b"\0")
    return bytes(out)


@pytest.mark.parametrize("piece", [1, 63, 1000, 65536, 1 << 20])
def test_the_decoder_copies_and_views_the_same_messages(piece: int) -> None:
    """Sans-IO, bytes arriving in pieces of every size; a record larger than
    a receive included (one byte at a time, a smaller one and fewer rounds:
    each byte is a call)."""
    big, rounds = (300_000, 3) if piece > 1 else (70_000, 1)
    payloads = [payload_for(9, i, size) for i, size in enumerate([0, 1, 64, big, 5, 1000])]
    stream = encoded_records(payloads * rounds, first=10)
    results = {}
    for copy in (True, False):
        decoder = RecordDecoder(10, 4096)
        got: list[tuple[bytes, int, int, int]] = []
        for at in range(0, len(stream), piece):
            chunk = stream[at : at + piece]
            while chunk:
                room = decoder.receive_buffer()
                n = min(len(room), len(chunk))
                room[:n] = chunk[:n]
                chunk = chunk[n:]
                messages = decoder.feed(n) if copy else decoder.feed_views(n)
                # Views are read before the next receive_buffer(); copies later.
                got.extend((bytes(m.payload), *m[1:]) for m in messages)
                if copy:
                    assert all(type(m.payload) is bytes for m in messages)
        assert decoder.error is None
        assert decoder.pending == 0
        results[copy] = got
    assert results[True] == results[False]
    assert [g[0] for g in results[True]] == payloads * rounds
    assert [g[1] for g in results[True]] == list(range(10, 10 + rounds * len(payloads)))


# -- a subscriber that never reads (mock clock, in-memory connections) ---------------------------


@asynccontextmanager
async def stuck_subscriber(
    config: Config, nursery: trio.Nursery
) -> AsyncIterator[tuple[Broker, MemoryListener]]:
    """A broker whose one subscriber of "t" never reads, blocked in a send from t=0."""
    async with memory_broker(config) as (broker, listener):
        publisher = await open_client(listener, nursery)
        await publisher.send(handshake("t", client_id=5) + batch(0, 5, 0, 10, 300)[0])
        stuck = await listener.connect_lockstep()
        nursery.start_soon(stuck.send_all, handshake("t", client_id=6, req=1))
        await settle()
        assert subscribers(broker) == 1
        yield broker, listener


STUCK_CONFIG = {"network.stats_interval_s": 1000.0, "network.shutdown_grace_s": 30.0}


async def test_a_subscriber_that_never_reads_is_closed(
    make_config: MakeConfig,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = make_config(**STUCK_CONFIG)
    timeout = config.network.subscriber_send_timeout_s
    assert timeout == 10.0
    async with trio.open_nursery() as nursery:
        async with stuck_subscriber(config, nursery) as (broker, listener):
            await trio.sleep(timeout - 0.001)
            assert subscribers(broker) == 1
            await trio.sleep(0.002)
            assert subscribers(broker) == 0
            assert "subscriber did not take a batch's records within 10.0 s; closed" in caplog.text
            # Others are served as ever.
            reader = await open_client(listener, nursery)
            await reader.send(handshake("t", client_id=7, req=1))
            await settle()
            assert [r[1] for r in parse_records(reader.data)] == [5] * 10
            await trio.sleep(5.0)
            stop_at = trio.current_time()
        # Nothing is left for the drain to wait for.
        assert trio.current_time() == stop_at


async def test_shutdown_waits_for_a_stuck_subscriber_no_longer_than_its_send_timeout(
    make_config: MakeConfig, autojump_clock: trio.testing.MockClock
) -> None:
    config = make_config(**STUCK_CONFIG)
    async with trio.open_nursery() as nursery:
        async with stuck_subscriber(config, nursery):
            await trio.sleep(1.0)
            # Leaving the block starts the drain at 1 s; the grace period is 30 s.
        assert trio.current_time() == config.network.subscriber_send_timeout_s
