"""Ack counts held back while a connection reads batches that already arrived.

The counter itself is checked without I/O; the broker over a socket pair, whose
client end is written to before the broker takes the connection, so that every
batch is waiting when the broker starts reading (over TCP the broker may catch
up with the sender at any point, and hold nothing).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
from conftest import MakeConfig
from rawclient import batch, handshake, parse_ack_stream, read_all
from tcpclient import recv_ack_item, recv_broker_id

from trio_embarcadero import open_broker
from trio_embarcadero.broker import Broker
from trio_embarcadero.broker.acks import AckCounter

PATHS = pytest.mark.parametrize("use_nonblocking", [True, False], ids=["staged", "direct"])
# A plain publish connection, and one of a publish session, whose acks go
# through its batches' tickets.
REQUESTS = pytest.mark.parametrize("session", [False, True], ids=["plain", "session"])

MESSAGES = 4  # a batch
SIZE = 1000  # a message's payload
BATCHES = 16


def batches(count: int = BATCHES) -> list[bytes]:
    return [batch(seq, 3, seq * MESSAGES, MESSAGES, SIZE)[0] for seq in range(count)]


def hello(topic: str, session: bool) -> bytes:
    if session:
        return handshake(topic, client_id=3, req=2, last_addr=0x5E55)
    return handshake(topic, client_id=3)


# -- the counter ---------------------------------------------------------------------------------


class Written:
    """A stand-in for the socket: the counts written at once."""

    def __init__(self) -> None:
        self.counts: list[int] = []

    def __call__(self, count: int) -> bool:
        self.counts.append(count)
        return True


def test_a_held_counter_adds_up_and_writes_the_latest_count_on_release() -> None:
    counter, written = AckCounter(hold_bytes=1000), Written()
    counter.write_at_once(written)
    counter.advance(2, 100)
    assert written.counts == [2]  # not held: at once
    counter.hold()
    assert counter.held
    counter.advance(3, 100)
    counter.advance(4, 100)
    assert written.counts == [2]
    assert (counter.count, counter.sent) == (9, 2)
    counter.release()
    assert not counter.held
    assert written.counts == [2, 9]
    counter.release()  # nothing new: nothing written
    assert written.counts == [2, 9]


def test_a_held_count_goes_out_once_it_covers_hold_bytes() -> None:
    counter, written = AckCounter(hold_bytes=250), Written()
    counter.write_at_once(written)
    counter.hold()
    for _ in range(7):
        counter.advance(1, 100)
    # Written at 300 bytes (after the third batch) and again at the sixth;
    # still held, the seventh waits for the release.
    assert written.counts == [3, 6]
    assert counter.held
    counter.release()
    assert written.counts == [3, 6, 7]


def test_a_closed_counter_is_never_held() -> None:
    counter = AckCounter(hold_bytes=1000)
    counter.hold()
    counter.close()
    assert not counter.held
    counter.hold()
    assert not counter.held


def test_hold_bytes_zero_never_holds() -> None:
    counter, written = AckCounter(), Written()
    counter.write_at_once(written)
    counter.hold()
    assert not counter.held
    counter.advance(1, 10**9)
    counter.advance(1, 10**9)
    assert written.counts == [1, 2]


# -- the broker ----------------------------------------------------------------------------------


class SocketPairListener(trio.abc.Listener[trio.abc.Stream]):
    """Hands the broker the server ends of socket pairs, once the test lets it."""

    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[trio.SocketStream](math.inf)

    def connect(self) -> tuple[trio.SocketStream, trio.SocketStream]:
        """A new pair: (client end, server end); :meth:`hand_over` the latter."""
        a, b = trio.socket.socketpair()
        return trio.SocketStream(a), trio.SocketStream(b)

    def hand_over(self, server: trio.SocketStream) -> None:
        self._send.send_nowait(server)

    async def accept(self) -> trio.abc.Stream:
        return await self._receive.receive()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


@asynccontextmanager
async def socket_pair_broker(
    make_config: MakeConfig, **overrides: object
) -> AsyncIterator[tuple[Broker, SocketPairListener]]:
    listener = SocketPairListener()
    async with open_broker(make_config(**overrides), listeners=[listener]) as broker:
        yield broker, listener
    assert broker.counters.internal_errors == 0


async def counts_until(stream: trio.SocketStream, total: int) -> list[int]:
    """The ack stream's counts up to ``total`` (no error frame allowed)."""
    await recv_broker_id(stream)
    counts: list[int] = []
    while not counts or counts[-1] < total:
        item = await recv_ack_item(stream)
        assert isinstance(item, int), f"error frame {item}"
        counts.append(item)
    return counts


@PATHS
@REQUESTS
async def test_batches_that_arrived_together_get_few_counts_and_the_last_without_more_input(
    make_config: MakeConfig, use_nonblocking: bool, session: bool
) -> None:
    """Every batch is there before the broker reads the first: the counts
    add up, and the last one comes although the client sends nothing more
    and keeps its side open (the broker writes it before it waits)."""
    frames = batches()
    # No wait of the broker's own in between (in-flight cap, staging pool):
    # each of those sends what it held too.
    roomy = {"network.max_buffers_per_connection": 32, "network.staging_pool_num_buffers": 32}
    with trio.fail_after(10):
        async with socket_pair_broker(
            make_config, **{"network.use_nonblocking": use_nonblocking, **roomy}
        ) as (broker, listener):
            client, server = listener.connect()
            async with client:
                await client.send_all(hello("together", session) + b"".join(frames))
                listener.hand_over(server)
                counts = await counts_until(client, BATCHES * MESSAGES)
            assert counts == sorted(set(counts))
            assert all(count % MESSAGES == 0 for count in counts)
            # 16 batches of 4 KiB under the default 512 KiB: the first batch's
            # count may go out before the second is looked at, the rest are
            # one, except on the staged path the few still on their way to
            # the log when the connection ran out of input: each of those is
            # acked as it lands.
            assert len(counts) <= (4 if use_nonblocking else 2), counts
            assert broker.config.network.ack_coalesce_kb == 512
            assert broker.statistics().messages_committed == BATCHES * MESSAGES


@PATHS
async def test_a_held_count_covers_at_most_ack_coalesce_kb(
    make_config: MakeConfig, use_nonblocking: bool
) -> None:
    frames = batches()
    per_count = math.ceil(16 * 1024 / len(frames[0]))  # batches one count may cover
    with trio.fail_after(10):
        async with socket_pair_broker(
            make_config,
            **{"network.use_nonblocking": use_nonblocking, "network.ack_coalesce_kb": 16},
        ) as (_broker, listener):
            client, server = listener.connect()
            async with client:
                await client.send_all(handshake("bounded", client_id=3) + b"".join(frames))
                listener.hand_over(server)
                counts = await counts_until(client, BATCHES * MESSAGES)
        # The first count may cover more: batches acked before the ack
        # stream's first frame (the broker id) went out wait for it.
        gaps = [b - a for a, b in itertools.pairwise(counts)]
        assert max(gaps) <= per_count * MESSAGES, counts
        assert len(counts) < BATCHES, counts


@PATHS
@REQUESTS
@pytest.mark.parametrize("cut", ["header", "payload"])
async def test_a_held_count_goes_out_while_the_next_batch_is_awaited(
    make_config: MakeConfig, use_nonblocking: bool, session: bool, cut: str
) -> None:
    """The next batch's first bytes have arrived, the rest has not: the
    broker waits for them, but not before it wrote the counts it held."""
    frames = batches(4)
    whole, last = b"".join(frames[:3]), frames[3]
    part = last[:50] if cut == "header" else last[: len(last) // 2]
    with trio.fail_after(10):
        async with socket_pair_broker(
            make_config, **{"network.use_nonblocking": use_nonblocking}
        ) as (_broker, listener):
            client, server = listener.connect()
            async with client:
                await client.send_all(hello("cut", session) + whole + part)
                listener.hand_over(server)
                counts = await counts_until(client, 3 * MESSAGES)
                assert counts[-1] == 3 * MESSAGES  # the first three, while it waits
                await client.send_all(last[len(part) :])
                assert await recv_ack_item(client) == 4 * MESSAGES
                await client.send_eof()
                rest = await read_all(client)
            assert parse_ack_stream(rest, with_broker_id=False) == (None, [], None)
