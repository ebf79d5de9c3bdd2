"""Misbehaving clients: each gets the right error frame and is closed, and nobody else notices.

Every case checks, besides the offending connection's bytes: the broker's
``errors`` counters, that no staging buffer leaked, that nothing of the bad
batch reached the log, and that a well-behaved publisher (open across the bad
case on the same topic, and a fresh one afterwards) is served fully.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
from conftest import MakeConfig, wait_until
from rawclient import (
    BATCH_HEADER,
    HANDSHAKE,
    batch,
    handshake,
    parse_ack_stream,
    parse_records,
    read_all,
)
from tcpclient import (
    ack_listener,
    closed_port,
    connect,
    connections,
    error_frame,
    exchange,
    publish,
    recv_exactly,
    send_and_read,
)

from trio_embarcadero import ErrorCode, open_broker
from trio_embarcadero.broker import Broker

PATHS = pytest.mark.parametrize("use_nonblocking", [True, False], ids=["staged", "direct"])

TOPIC = "shared"
GOOD_ID, LATE_ID, BAD_ID = 1, 2, 3


# -- the well-behaved publishers ------------------------------------------------------------------


class GoodPublisher:
    """A same-connection ack-1 publisher that stays open across the bad case."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream

    async def finish(self) -> None:
        await self.stream.send_all(batch(1, GOOD_ID, 20, 20, 300)[0])
        await self.stream.send_eof()
        data = await read_all(self.stream)
        assert parse_ack_stream(data, with_broker_id=False) == (None, [40], None)


@asynccontextmanager
async def good_publisher(port: int) -> AsyncIterator[GoodPublisher]:
    """Open the good publisher and get its first batch acked; closed on the way out."""
    async with await connect(port) as stream:
        await stream.send_all(
            handshake(TOPIC, client_id=GOOD_ID) + batch(0, GOOD_ID, 0, 20, 100)[0]
        )
        assert await recv_exactly(stream, 12) == struct.pack("<iQ", 0, 20)
        yield GoodPublisher(stream)


async def publish_late(port: int) -> None:
    """A fresh publisher after the bad case: served fully."""
    frames = [batch(k, LATE_ID, 10 * k, 10, 50 + k)[0] for k in range(3)]
    received = await publish(port, TOPIC, frames, client_id=LATE_ID)
    broker_id, counts, error = parse_ack_stream(received)
    assert (broker_id, error) == (0, None)
    assert counts == sorted(set(counts))
    assert set(counts) <= {10, 20, 30}
    assert counts[-1] == 30


GOOD_MESSAGES = 40 + 30


# -- the misbehaving publisher --------------------------------------------------------------------

#: How the bad publisher starts: a handshake and one good batch of 10 messages.
BAD_START = handshake(TOPIC, client_id=BAD_ID) + batch(0, BAD_ID, 0, 10, 8)[0]


@asynccontextmanager
async def bad_publisher(port: int) -> AsyncIterator[trio.SocketStream]:
    """Open the bad publisher and get its good batch acked; closed on the way out."""
    async with await connect(port) as stream:
        await stream.send_all(BAD_START)
        assert await recv_exactly(stream, 12) == struct.pack("<iQ", 0, 10)
        yield stream


# -- helpers --------------------------------------------------------------------------------------


def log_clients(broker: Broker) -> list[tuple[int, int]]:
    """(client_id, client_order) of every committed record of TOPIC, checking offsets."""
    stream = broker.log.existing_stream(TOPIC)
    assert stream is not None
    out: list[tuple[int, int]] = []
    for i in range(len(stream.index_header)):
        b = stream.committed_batch(i)
        records = parse_records(
            bytes(broker.log.region[b.payload_offset : b.payload_offset + b.total_size])
        )
        assert [r[0] for r in records] == list(range(len(out), len(out) + b.num_msg))
        out.extend((r[1], r[2]) for r in records)
    assert stream.next_offset == len(out)
    return out


async def check_served_and_clean(
    broker: Broker,
    good: GoodPublisher,
    *,
    errors: dict[str, int],
    bad_committed: int = 0,
    abandoned: int = 0,
    elsewhere: int = 0,
) -> None:
    """Finish the good publisher, run a late one, then check the broker's books.

    ``elsewhere``: messages the case committed to other topics than TOPIC.
    """
    await good.finish()
    await publish_late(broker.port)
    await wait_until(lambda: not any(broker.statistics().connections.values()))
    stats = broker.statistics()
    assert stats.pool.used == 0, "a staging buffer leaked"
    assert stats.queued_batches == 0
    assert not stats.paused
    assert stats.messages_committed == GOOD_MESSAGES + bad_committed + elsewhere
    assert stats.log.batches_abandoned == abandoned
    expected = (
        [(GOOD_ID, i) for i in range(20)]
        + [(BAD_ID, i) for i in range(bad_committed)]
        + [(GOOD_ID, i) for i in range(20, 40)]
        + [(LATE_ID, i) for i in range(30)]
    )
    assert log_clients(broker) == expected
    assert stats.internal_errors == 0
    assert stats.errors == errors


# -- handshake errors: the error frame is the first thing the broker writes -----------------------


def raw_handshake(
    *, client_id: int = BAD_ID, ack: int = 1, port: int = 0, req: int = 0, topic: bytes = b"t"
) -> bytes:
    return HANDSHAKE.pack(client_id, ack, 0, 0, port, req, topic.ljust(32, b"\0"))


HANDSHAKE_CASES = {
    "short-then-eof": (raw_handshake()[:10], True, ErrorCode.BAD_HANDSHAKE),
    "unknown-client-req": (raw_handshake(req=5), False, ErrorCode.BAD_HANDSHAKE),
    "ack-level-3": (raw_handshake(ack=3), False, ErrorCode.BAD_HANDSHAKE),
    "empty-topic": (raw_handshake(topic=b""), False, ErrorCode.BAD_HANDSHAKE),
    "topic-with-slash": (raw_handshake(topic=b"a/b"), False, ErrorCode.BAD_HANDSHAKE),
    "topic-with-space": (raw_handshake(topic=b"a b"), False, ErrorCode.BAD_HANDSHAKE),
    "topic-not-ascii": (raw_handshake(topic="tö".encode()), False, ErrorCode.BAD_HANDSHAKE),
    "bytes-after-nul": (raw_handshake(topic=b"abc\0xyz"), False, ErrorCode.BAD_HANDSHAKE),
    "topic-32-bytes": (raw_handshake(topic=b"x" * 32), False, ErrorCode.BAD_HANDSHAKE),
    "subscribe-bad-topic": (raw_handshake(req=1, topic=b"a/b"), False, ErrorCode.BAD_HANDSHAKE),
    "ack-port-not-tcp": (raw_handshake(port=70000), False, ErrorCode.BAD_HANDSHAKE),
    "ack-2-without-storage": (raw_handshake(ack=2, topic=b"t2"), False, ErrorCode.NOT_ALLOWED),
}


@pytest.mark.parametrize("case", list(HANDSHAKE_CASES))
async def test_bad_handshake(make_config: MakeConfig, case: str) -> None:
    data, eof, code = HANDSHAKE_CASES[case]
    with trio.fail_after(10):
        async with open_broker(make_config()) as broker:
            async with good_publisher(broker.port) as good:
                received = await exchange(broker.port, data, eof=eof)
                assert received[:8] == b"\xff" * 8
                got_code, text = error_frame(received)
                assert got_code == code
                assert text
                await check_served_and_clean(broker, good, errors={code.name.lower(): 1})
                # No topic was created for the refused handshake.
                assert set(broker.log.topics()) == {TOPIC}


async def test_handshake_timeout(make_config: MakeConfig) -> None:
    config = make_config(**{"network.handshake_timeout_s": 0.2})
    with trio.fail_after(10):
        async with open_broker(config) as broker:
            async with good_publisher(broker.port) as good:
                start = trio.current_time()
                silent = await exchange(broker.port, b"")
                partial = await exchange(broker.port, raw_handshake()[:40])
                assert trio.current_time() - start >= 0.4
                for received in (silent, partial):
                    code, _ = error_frame(received)
                    assert code == ErrorCode.TIMEOUT
                await check_served_and_clean(broker, good, errors={"timeout": 2})


async def test_eof_before_any_handshake_byte_is_no_error(make_config: MakeConfig) -> None:
    with trio.fail_after(10):
        async with open_broker(make_config()) as broker:
            async with good_publisher(broker.port) as good:
                assert await exchange(broker.port, b"", eof=True) == b""
                await check_served_and_clean(broker, good, errors={})


async def test_connection_limit(make_config: MakeConfig) -> None:
    config = make_config(**{"network.max_connections": 1})
    with trio.fail_after(10):
        async with open_broker(config) as broker:
            async with good_publisher(broker.port) as good:
                received = await exchange(broker.port, raw_handshake())
                code, text = error_frame(received)
                assert code == ErrorCode.NOT_ALLOWED
                assert "connection limit" in text
                await good.finish()
                # The slot is free again once the first connection is gone.
                await wait_until(lambda: not any(broker.statistics().connections.values()))
                await publish_late(broker.port)
                stats = broker.statistics()
                assert stats.connections_refused == 1
                assert stats.connections_accepted == 2
                assert stats.errors == {"not_allowed": 1}
                assert stats.messages_committed == GOOD_MESSAGES
                assert stats.pool.used == 0


async def connect_from(source: str, port: int) -> trio.SocketStream:
    """A connection to the broker from another loopback address (another host to it)."""
    sock = trio.socket.socket()
    await sock.bind((source, 0))
    await sock.connect(("127.0.0.1", port))
    return trio.SocketStream(sock)


async def test_connection_limit_per_host(make_config: MakeConfig) -> None:
    config = make_config(**{"network.max_connections_per_host": 2})
    with trio.fail_after(10):
        async with open_broker(config) as broker:
            async with good_publisher(broker.port) as good, await connect(broker.port) as idle:
                await wait_until(lambda: sum(broker.statistics().connections.values()) == 2)
                received = await exchange(broker.port, raw_handshake())
                assert error_frame(received) == (
                    ErrorCode.NOT_ALLOWED,
                    "connection limit per host reached (2 from 127.0.0.1)",
                )
                # Another address is another host: served.
                async with await connect_from("127.0.0.2", broker.port) as other:
                    received = await send_and_read(other, BAD_START, eof=True)
                assert parse_ack_stream(received) == (0, [10], None)
                await idle.aclose()
                # The host's slot is free again once one of its connections is gone.
                await wait_until(lambda: sum(broker.statistics().connections.values()) == 1)
                await check_served_and_clean(
                    broker, good, errors={"not_allowed": 1}, bad_committed=10
                )
            stats = broker.statistics()
            assert (stats.connections_refused, stats.connections_accepted) == (1, 4)


async def test_dial_back_to_a_closed_port(make_config: MakeConfig) -> None:
    with trio.fail_after(10):
        async with open_broker(make_config()) as broker:
            # Taken once the broker listens: its own ephemeral ports (data,
            # HTTP) can no longer be the closed one it is told to dial.
            unused_port = await closed_port()
            async with good_publisher(broker.port) as good:
                received = await exchange(
                    broker.port, raw_handshake(port=unused_port, topic=b"dial")
                )
                code, text = error_frame(received)
                assert code == ErrorCode.BAD_HANDSHAKE
                assert str(unused_port) in text
                await check_served_and_clean(broker, good, errors={"bad_handshake": 1})
                assert broker.statistics().dial_backs.failed == 1
                assert broker.statistics().dial_backs.active == 0


async def test_handshakes_alone_do_not_fill_the_topic_table(make_config: MakeConfig) -> None:
    config = make_config(**{"cxl.max_topics": 4})
    with trio.fail_after(10):
        async with open_broker(config) as broker, good_publisher(broker.port) as good:
            async with connections(broker.port, 4) as idle:
                for k, stream in enumerate(idle):
                    await stream.send_all(raw_handshake(topic=f"idle{k}".encode()))
                    assert await recv_exactly(stream, 4) == struct.pack("<i", 0)
                # Four publishers that never sent a batch hold no table slot.
                assert sorted(broker.log.topics()) == [TOPIC]
                for k in range(3):
                    received = await publish(
                        broker.port, f"new{k}", [batch(0, 9, 0, 10, 100)[0]], client_id=9
                    )
                    assert parse_ack_stream(received) == (0, [10], None)
                # Full now: a handshake for another new topic is refused...
                received = await exchange(broker.port, raw_handshake(topic=b"fifth"))
                assert error_frame(received) == (
                    ErrorCode.LOG_FULL,
                    "topic table full (4 topics); cannot create 'fifth'",
                )
                # ...and so is a batch of an idle publisher, whose handshake came
                # while there was room.
                received = await send_and_read(idle[0], batch(0, BAD_ID, 0, 10, 100)[0])
                assert parse_ack_stream(received, with_broker_id=False)[2] == (
                    ErrorCode.LOG_FULL,
                    "no log space after retries: topic table full (4 topics); "
                    "cannot create 'idle0'",
                )
            await check_served_and_clean(broker, good, errors={"log_full": 2}, elsewhere=30)
            assert sorted(broker.log.topics()) == ["new0", "new1", "new2", TOPIC]


# -- batch errors: after the broker id and the counts so far --------------------------------------


def header(*, num_msg: int, total_size: int, seq: int = 1, client_id: int = BAD_ID) -> bytes:
    return BATCH_HEADER.pack(seq, client_id, num_msg, 0, 0, 0, 0, total_size, 0, 0, 0, 0)


def records(count: int, size: int, first: int = 10, client_id: int = BAD_ID) -> bytes:
    return batch(1, client_id, first, count, size)[0][128:]


def with_word(body: bytes, record_start: int, word: int, value: int) -> bytes:
    """``body`` with one u64 of one message header replaced."""
    out = bytearray(body)
    struct.pack_into("<Q", out, record_start + 8 * word, value)
    return bytes(out)


ONE_MIB = 1 << 20
GOOD_BODY = records(4, 100)  # 4 records of 192 bytes
MIXED_BODY = records(3, 10) + records(3, 100, 13)  # 3 of 128 bytes, 3 of 192
BAD_BATCHES: dict[str, tuple[bytes, ErrorCode]] = {
    "total-size-zero": (header(num_msg=1, total_size=0), ErrorCode.BAD_BATCH_HEADER),
    "total-size-above-max": (
        header(num_msg=1, total_size=ONE_MIB + 64),
        ErrorCode.BAD_BATCH_HEADER,
    ),
    "total-size-not-64-aligned": (
        header(num_msg=1, total_size=1000) + bytes(1000),
        ErrorCode.BAD_BATCH_HEADER,
    ),
    "num-msg-zero": (header(num_msg=0, total_size=len(GOOD_BODY)), ErrorCode.BAD_BATCH_HEADER),
    "num-msg-beyond-total": (header(num_msg=13, total_size=768), ErrorCode.BAD_BATCH_HEADER),
    "records-short-of-total": (
        header(num_msg=4, total_size=len(GOOD_BODY) + 64) + GOOD_BODY + bytes(64),
        ErrorCode.BAD_MESSAGE_RECORDS,
    ),
    "num-msg-too-small": (
        header(num_msg=3, total_size=len(GOOD_BODY)) + GOOD_BODY,
        ErrorCode.BAD_MESSAGE_RECORDS,
    ),
    "num-msg-too-large": (
        header(num_msg=5, total_size=len(GOOD_BODY)) + GOOD_BODY,
        ErrorCode.BAD_MESSAGE_RECORDS,
    ),
    "padded-size-not-matching-size": (
        header(num_msg=4, total_size=len(GOOD_BODY))
        + with_word(GOOD_BODY, 2 * 192, 7, 200),  # size 200 needs paddedSize 320
        ErrorCode.BAD_MESSAGE_RECORDS,
    ),
    "size-far-too-small-for-padded-size": (
        header(num_msg=4, total_size=len(GOOD_BODY)) + with_word(GOOD_BODY, 3 * 192, 7, 0),
        ErrorCode.BAD_MESSAGE_RECORDS,
    ),
    "size-huge": (
        header(num_msg=4, total_size=len(GOOD_BODY)) + with_word(GOOD_BODY, 0, 7, 2**64 - 64),
        ErrorCode.BAD_MESSAGE_RECORDS,
    ),
    "padded-size-zero": (
        header(num_msg=4, total_size=len(GOOD_BODY)) + with_word(GOOD_BODY, 192, 0, 0),
        ErrorCode.BAD_MESSAGE_RECORDS,
    ),
    "padded-size-past-the-end": (
        header(num_msg=4, total_size=len(GOOD_BODY))
        + with_word(GOOD_BODY, 0, 0, len(GOOD_BODY) + 64),
        ErrorCode.BAD_MESSAGE_RECORDS,
    ),
    "padded-size-not-64-aligned": (
        header(num_msg=4, total_size=len(GOOD_BODY)) + with_word(GOOD_BODY, 192, 0, 200),
        ErrorCode.BAD_MESSAGE_RECORDS,
    ),
    "mixed-sizes-one-wrong": (
        header(num_msg=6, total_size=len(MIXED_BODY))
        + with_word(MIXED_BODY, 3 * 128 + 1 * 192, 7, 150),
        ErrorCode.BAD_MESSAGE_RECORDS,
    ),
    # Publishing under another client's id: in the header, in all records, in one.
    "header-names-another-client": (
        header(num_msg=4, total_size=len(GOOD_BODY), client_id=GOOD_ID) + GOOD_BODY,
        ErrorCode.BAD_BATCH_HEADER,
    ),
    "records-name-another-client": (
        header(num_msg=4, total_size=len(GOOD_BODY)) + records(4, 100, client_id=GOOD_ID),
        ErrorCode.BAD_MESSAGE_RECORDS,
    ),
    "one-record-names-another-client": (
        header(num_msg=4, total_size=len(GOOD_BODY)) + with_word(GOOD_BODY, 3 * 192, 6, GOOD_ID),
        ErrorCode.BAD_MESSAGE_RECORDS,
    ),
    "record-client-id-beyond-32-bits": (
        header(num_msg=4, total_size=len(GOOD_BODY)) + with_word(GOOD_BODY, 0, 6, BAD_ID + 2**32),
        ErrorCode.BAD_MESSAGE_RECORDS,
    ),
    "mixed-sizes-one-record-names-another-client": (
        header(num_msg=6, total_size=len(MIXED_BODY))
        + with_word(MIXED_BODY, 3 * 128 + 2 * 192, 6, LATE_ID),
        ErrorCode.BAD_MESSAGE_RECORDS,
    ),
}


@PATHS
@pytest.mark.parametrize("case", list(BAD_BATCHES))
async def test_bad_batch(make_config: MakeConfig, use_nonblocking: bool, case: str) -> None:
    data, code = BAD_BATCHES[case]
    config = make_config(**{"network.use_nonblocking": use_nonblocking})
    records_error = code == ErrorCode.BAD_MESSAGE_RECORDS
    with trio.fail_after(10):
        async with open_broker(config) as broker:
            async with good_publisher(broker.port) as good:
                # One good batch, acked, then the bad one (the broker may close before
                # reading it all).
                async with bad_publisher(broker.port) as stream:
                    rest = await send_and_read(stream, data)
                await check_served_and_clean(
                    broker,
                    good,
                    errors={code.name.lower(): 1},
                    bad_committed=10,
                    # The direct path reserved log space before it could see bad records.
                    abandoned=1 if records_error and not use_nonblocking else 0,
                )
                assert broker.statistics().batches_received == 2 + 1 + 3
                assert error_frame(rest)[0] == code


# -- disconnects and timeouts mid-batch -----------------------------------------------------------

BIG = batch(1, BAD_ID, 10, 100, 4000)[0]  # 100 x 4000 B: many segments on the wire


@PATHS
@pytest.mark.parametrize("cut", [1, 64, 127, 128, 128 + 64, len(BIG) // 2, len(BIG) - 1])
async def test_half_close_mid_batch(
    make_config: MakeConfig, use_nonblocking: bool, cut: int
) -> None:
    config = make_config(**{"network.use_nonblocking": use_nonblocking})
    with trio.fail_after(10):
        async with open_broker(config) as broker:
            async with good_publisher(broker.port) as good:
                # A good batch then part of the next, EOF right behind: the good one is
                # committed and acked, the cut one disappears, and there is no error frame.
                received = await exchange(broker.port, BAD_START + BIG[:cut], eof=True)
                assert parse_ack_stream(received) == (0, [10], None)
                await check_served_and_clean(
                    broker,
                    good,
                    errors={},
                    bad_committed=10,
                    abandoned=1 if cut >= 128 and not use_nonblocking else 0,
                )
                stats = broker.statistics()
                assert stats.batches_received == 2 + 1 + 3


@PATHS
@pytest.mark.parametrize("cut", [64, len(BIG) // 2])
async def test_reset_mid_batch(make_config: MakeConfig, use_nonblocking: bool, cut: int) -> None:
    config = make_config(**{"network.use_nonblocking": use_nonblocking})
    with trio.fail_after(10):
        async with open_broker(config) as broker:
            async with good_publisher(broker.port) as good:
                async with bad_publisher(broker.port) as stream:
                    await stream.send_all(BIG[:cut])
                    if cut >= 128:  # let the broker start on the payload first
                        await wait_until(
                            lambda: broker.statistics().connections["wait_payload"] == 1
                        )
                    # SO_LINGER 0: close with a reset, not a FIN.
                    stream.socket.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                    await stream.aclose()
                await check_served_and_clean(
                    broker,
                    good,
                    errors={},
                    bad_committed=10,
                    abandoned=1 if cut >= 128 and not use_nonblocking else 0,
                )


@PATHS
@pytest.mark.parametrize("stall_at", [50, 128, 128 + 5000])
async def test_batch_timeout(make_config: MakeConfig, use_nonblocking: bool, stall_at: int) -> None:
    config = make_config(
        **{"network.use_nonblocking": use_nonblocking, "network.batch_timeout_s": 0.2}
    )
    with trio.fail_after(10):
        async with open_broker(config) as broker:
            async with good_publisher(broker.port) as good:
                async with bad_publisher(broker.port) as stream:
                    start = trio.current_time()
                    await stream.send_all(BIG[:stall_at])
                    # ...and stall: the broker gives up on the batch, not on us.
                    rest = await read_all(stream)
                    assert trio.current_time() - start >= 0.2
                await check_served_and_clean(
                    broker,
                    good,
                    errors={"timeout": 1},
                    bad_committed=10,
                    abandoned=1 if stall_at >= 128 and not use_nonblocking else 0,
                )
                assert error_frame(rest)[0] == ErrorCode.TIMEOUT


@PATHS
async def test_batch_timeout_covers_the_whole_batch(
    make_config: MakeConfig, use_nonblocking: bool
) -> None:
    config = make_config(
        **{"network.use_nonblocking": use_nonblocking, "network.batch_timeout_s": 0.3}
    )
    with trio.fail_after(10):
        async with open_broker(config) as broker:
            async with good_publisher(broker.port) as good:
                async with await connect(broker.port) as stream:
                    await stream.send_all(handshake(TOPIC, client_id=BAD_ID))
                    assert await recv_exactly(stream, 4) == struct.pack("<i", 0)
                    # Each piece comes within the timeout, the whole batch does not.
                    await stream.send_all(BIG[:64])
                    await trio.sleep(0.2)
                    await stream.send_all(BIG[64:128])
                    await trio.sleep(0.2)
                    try:
                        await stream.send_all(BIG[128:])
                        await stream.send_eof()
                    except trio.BrokenResourceError:
                        pass  # the broker gave up on the batch and closed
                    rest = await read_all(stream)
                assert error_frame(rest)[0] == ErrorCode.TIMEOUT
                await check_served_and_clean(
                    broker, good, errors={"timeout": 1}, abandoned=0 if use_nonblocking else 1
                )


@PATHS
async def test_idle_timeout(make_config: MakeConfig, use_nonblocking: bool) -> None:
    config = make_config(
        **{"network.use_nonblocking": use_nonblocking, "network.idle_timeout_s": 0.2}
    )
    with trio.fail_after(10):
        async with open_broker(config) as broker:
            start = trio.current_time()
            received = await exchange(broker.port, BAD_START)
            assert trio.current_time() - start >= 0.2
            # A publisher that keeps sending is not idle.
            await publish_late(broker.port)
            await wait_until(lambda: not any(broker.statistics().connections.values()))
            stats = broker.statistics()
            assert stats.messages_committed == 10 + 30
            assert stats.pool.used == 0
            broker_id, counts, error = parse_ack_stream(received)
            assert (broker_id, counts) == (0, [10])
            assert error is not None
            assert error[0] == ErrorCode.TIMEOUT
            assert stats.errors == {"timeout": 1}
            assert stats.internal_errors == 0


# -- errors on a dial-back client -----------------------------------------------------------------


@PATHS
async def test_bad_batch_on_a_dial_back_client(
    make_config: MakeConfig, use_nonblocking: bool
) -> None:
    config = make_config(**{"network.use_nonblocking": use_nonblocking})
    with trio.fail_after(10):
        async with open_broker(config) as broker:
            async with good_publisher(broker.port) as good:
                async with (
                    ack_listener() as (listener, ack_port),
                    await connect(broker.port) as pub,
                ):
                    await pub.send_all(
                        handshake(TOPIC, client_id=BAD_ID, port=ack_port)
                        + batch(0, BAD_ID, 0, 10, 8)[0]
                    )
                    async with await listener.accept() as ack:
                        assert await recv_exactly(ack, 12) == struct.pack("<iQ", 0, 10)
                        await pub.send_all(header(num_msg=3, total_size=len(GOOD_BODY)) + GOOD_BODY)
                        rest = await read_all(pub)
                        # Never an error frame on the ack connection: it just ends.
                        assert await read_all(ack) == b""
                await check_served_and_clean(
                    broker,
                    good,
                    errors={"bad_message_records": 1},
                    bad_committed=10,
                    abandoned=0 if use_nonblocking else 1,
                )
                # The error frame is the first thing on the publish connection.
                assert error_frame(rest)[0] == ErrorCode.BAD_MESSAGE_RECORDS


# -- a bad batch must not take the good batches before it down ------------------------------------


@PATHS
async def test_valid_batch_before_a_bad_one_is_committed(
    make_config: MakeConfig, use_nonblocking: bool
) -> None:
    config = make_config(
        **{
            "network.use_nonblocking": use_nonblocking,
            "cxl.size_mb": 8,
            "cxl.segment_mb": 2,
            "cxl.segment_unit_kb": 2048,  # fixed 2 MiB segments: a known capacity
            "network.staging_pool_buffer_size_mb": 1,
            "network.num_cxl_allocation_workers": 1,
            "network.backoff_initial_us": 50_000,
            "network.backoff_max_us": 50_000,
            "network.backoff_max_retries": 8,
        }
    )
    big = [batch(k, 40, 900 * k, 900, 1000)[0] for k in range(5)]  # 2 per 2 MiB segment
    with trio.fail_after(10):
        async with open_broker(config) as broker:
            assert broker.log.geometry.num_units == 3
            # "victim" takes segment 0 and keeps room in it; "filler" takes the other two.
            first = await exchange(
                broker.port, handshake("victim", client_id=41) + batch(0, 41, 0, 5, 10)[0], eof=True
            )
            assert parse_ack_stream(first) == (0, [5], None)
            filled = await exchange(
                broker.port, handshake("filler", client_id=40) + b"".join(big[:4]), eof=True
            )
            assert parse_ack_stream(filled)[1][-1] == 3600
            async with trio.open_nursery() as nursery:
                # A fifth filler batch finds no segment: its allocation backs off ~0.4 s.
                stuck: list[bytes] = []

                async def publish_stuck() -> None:
                    stuck.append(
                        await exchange(broker.port, handshake("filler", client_id=40) + big[4])
                    )

                nursery.start_soon(publish_stuck)
                await wait_until(lambda: broker.statistics().allocation_retries >= 1)
                # Meanwhile: a valid batch, then a bad one, in one write.
                received = await exchange(
                    broker.port,
                    handshake("victim", client_id=BAD_ID)
                    + batch(0, BAD_ID, 0, 10, 10)[0]
                    + header(num_msg=3, total_size=len(GOOD_BODY))
                    + GOOD_BODY,
                )
            assert parse_ack_stream(stuck[0])[2] is not None
            stats = broker.statistics()
            assert stats.pool.used == 0
            assert stats.log.messages_committed == 5 + 3600 + 10
            broker_id, counts, error = parse_ack_stream(received)
            assert (broker_id, counts) == (0, [10])
            assert error is not None
            assert error[0] == ErrorCode.BAD_MESSAGE_RECORDS


# -- a topic is created by its first good batch ----------------------------------------------

BAD_RECORDS = header(num_msg=3, total_size=len(GOOD_BODY)) + GOOD_BODY


@PATHS
@pytest.mark.parametrize("bad", ["header", "records", "stall"])
async def test_a_batch_that_fails_creates_no_topic(
    make_config: MakeConfig, use_nonblocking: bool, bad: str
) -> None:
    config = make_config(
        **{
            "cxl.max_topics": 2,
            "network.use_nonblocking": use_nonblocking,
            "network.payload_stall_timeout_s": 0.2,
        }
    )
    first = {
        "header": header(num_msg=0, total_size=len(GOOD_BODY)),
        "records": BAD_RECORDS,
        "stall": BAD_RECORDS[: 128 + 100],
    }[bad]
    code = {
        "header": ErrorCode.BAD_BATCH_HEADER,
        "records": ErrorCode.BAD_MESSAGE_RECORDS,
        "stall": ErrorCode.TIMEOUT,
    }[bad]
    with trio.fail_after(10):
        async with open_broker(config) as broker, good_publisher(broker.port) as good:
            received = await exchange(broker.port, raw_handshake(topic=b"failed"), first)
            error = parse_ack_stream(received)[2]
            assert error is not None
            assert error[0] == code
            assert sorted(broker.log.topics()) == [TOPIC]
            # The slot it did not take is there for a topic whose batch is good.
            received = await publish(
                broker.port, "second", [batch(0, 9, 0, 10, 100)[0]], client_id=9
            )
            assert parse_ack_stream(received) == (0, [10], None)
            await check_served_and_clean(broker, good, errors={code.name.lower(): 1}, elsewhere=10)
            assert sorted(broker.log.topics()) == ["second", TOPIC]
            assert broker.statistics().log.batches_abandoned == 0
