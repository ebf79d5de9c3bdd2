"""Publish sessions (client_req 2) on in-memory brokers, on Trio's mock clock.

Raw wire clients (``rawclient``): a session's handshake carries its token in
``last_addr``; a batch sent again, on another connection, is read, acked in
its place on that connection, and not stored again. The window, the
collision of two clients that drew one client id, the wait for another
connection's copy (and its limit), the session forgotten after
``cxl.session_timeout_s``, and on an order-5 topic the order by batch_seq
with a skipped batch_seq refused.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import rawclient
import trio
from conftest import MakeConfig, wait_until
from memory import MemoryClient, memory_broker, open_client, settle
from tcpclient import exchange
from trio.testing import MockClock

from trio_embarcadero import open_broker
from trio_embarcadero.broker import Broker
from trio_embarcadero.config import Config
from trio_embarcadero.log import CxlLog, open_log
from trio_embarcadero.log.sessions import SessionKey, Verdict

TOPIC = "s"
CLIENT = 7
TOKEN = 0xC0FFEE


def virtual_ns() -> int:
    return int(trio.current_time() * 1e9)


@asynccontextmanager
async def broker_and_clients(
    config: Config,
) -> AsyncIterator[tuple[Broker, trio.Nursery, list[MemoryClient], object]]:
    """A memory broker whose session table runs on the mock clock; ``connect()``
    opens a client (read in the background)."""
    async with trio.open_nursery() as nursery:
        async with memory_broker(config) as (broker, listener):
            broker.log.sessions.clock = virtual_ns
            clients: list[MemoryClient] = []

            async def connect() -> MemoryClient:
                client = await open_client(listener, nursery)
                clients.append(client)
                return client

            yield broker, nursery, clients, connect


def hello(token: int = TOKEN, *, client_id: int = CLIENT, ack: int = 1, req: int = 2) -> bytes:
    return rawclient.handshake(TOPIC, client_id=client_id, ack=ack, req=req, last_addr=token)


def batch(seq: int, count: int = 3, client_id: int = CLIENT) -> bytes:
    """Batch ``seq`` of the session: ``count`` messages of client orders 10 * seq ..."""
    return rawclient.batch(seq, client_id, 10 * seq, count, 100)[0]


async def finish(client: MemoryClient) -> tuple[list[int], tuple[int, str] | None]:
    """Half-close and read the ack stream to the end: (counts, error)."""
    await client.close()
    await wait_until(lambda: client.eof_at is not None)
    # A connection refused at its handshake gets the error frame first.
    refused = client.data[:8] == b"\xff" * 8
    _, counts, error = client.acks(with_broker_id=not refused)
    return counts, error


def stored(path: str, client_id: int = CLIENT) -> list[int]:
    """The client orders of ``client_id``'s messages in the region, in log order."""
    with open_log(path) as log:
        return [m.client_order for m in log.messages(TOPIC) if m.client_id == client_id]


async def test_a_batch_sent_again_on_another_connection_is_acked_not_stored(
    make_config: MakeConfig, cxl_path: str, autojump_clock: MockClock
) -> None:
    async with broker_and_clients(make_config()) as (broker, _, _, connect):
        first = await connect()
        await first.send(hello() + batch(0) + batch(1) + batch(2))
        assert await finish(first) == ([3, 6, 9], None)
        # A reconnect resends 1 and 2 (their acks "lost"), then goes on with 3
        # and 4; a duplicate (2, again) in between counts in its place.
        again = await connect()
        await again.send(hello() + batch(1) + batch(2) + batch(3, 2) + batch(2) + batch(4))
        counts, error = await finish(again)
        assert error is None
        assert counts[-1] == 3 + 3 + 2 + 3 + 3
        stats = broker.statistics().sessions
        assert stats is not None
        assert (stats.duplicates, stats.duplicate_messages, stats.sessions) == (3, 9, 1)
    assert stored(cxl_path) == [*range(3), *range(10, 13), *range(20, 23), 30, 31, *range(40, 43)]


async def test_a_client_req_0_publisher_is_never_deduplicated(
    make_config: MakeConfig, cxl_path: str, autojump_clock: MockClock
) -> None:
    """Even with the client id and batch_seqs of a session on the topic."""
    async with broker_and_clients(make_config()) as (_, _, _, connect):
        session = await connect()
        await session.send(hello() + batch(0))
        assert await finish(session) == ([3], None)
        for _ in range(2):
            plain = await connect()
            await plain.send(hello(0, req=0) + batch(0))
            assert await finish(plain) == ([3], None)
    assert stored(cxl_path) == [0, 1, 2] * 3


async def test_the_window(make_config: MakeConfig, autojump_clock: MockClock) -> None:
    async with broker_and_clients(make_config()) as (broker, _, _, connect):
        ahead = await connect()
        # 0 stored: 1 is the first not yet stored, and 256 is inside the window.
        await ahead.send(hello() + batch(0) + batch(256) + batch(257))
        counts, error = await finish(ahead)
        assert counts == [3, 6]
        assert error == (
            2,
            f"batch_seq 257 of session (client {CLIENT}, topic {TOPIC!r}) is 256 ahead of its "
            "first batch_seq not yet stored (1); a session keeps at most 256 batches unacked, "
            "and one unused for cxl.session_timeout_s begins again at 0",
        )
        assert broker.statistics().errors == {"bad_batch_header": 1}


async def test_a_second_client_with_the_same_id_is_refused_at_the_handshake_and_at_a_batch(
    make_config: MakeConfig, cxl_path: str, autojump_clock: MockClock
) -> None:
    async with broker_and_clients(make_config()) as (broker, _, _, connect):
        early = await connect()  # its handshake comes before the session begins
        await early.send(hello(TOKEN + 1))
        owner = await connect()
        await owner.send(hello() + batch(0))
        await settle()
        late = await connect()
        await late.send(hello(TOKEN + 1) + batch(0))
        collision = (
            6,
            f"client id {CLIENT} on topic {TOPIC!r} is in use by another publish session "
            "(another token): two clients share the id; reconnect with another client_id",
        )
        assert await finish(late) == ([], collision)
        await early.send(batch(0, count=5))
        assert await finish(early) == ([], collision)
        assert await finish(owner) == ([3], None)
        assert broker.statistics().errors == {"not_allowed": 2}
    assert stored(cxl_path) == [0, 1, 2]


async def test_a_session_is_forgotten_after_its_timeout_and_kept_while_a_connection_is_open(
    make_config: MakeConfig, cxl_path: str, autojump_clock: MockClock
) -> None:
    config = make_config(**{"cxl.session_timeout_s": 10.0})
    async with broker_and_clients(config) as (_, _, _, connect):
        owner = await connect()
        await owner.send(hello() + batch(0))
        assert await finish(owner) == ([3], None)
        idle = await connect()
        await idle.send(hello())  # a connection of the session, no batch
        await trio.sleep(35)  # connected, silent: kept active
        stranger = await connect()
        await stranger.send(hello(TOKEN + 1) + batch(0))
        assert (await finish(stranger))[1] is not None
        assert await finish(idle) == ([], None)
        await trio.sleep(9)
        stranger = await connect()
        await stranger.send(hello(TOKEN + 1) + batch(0))
        assert (await finish(stranger))[1] is not None
        await trio.sleep(1.5)  # 10 s since the owner's connection closed: forgotten
        stranger = await connect()
        await stranger.send(hello(TOKEN + 1) + batch(0, count=4))
        assert await finish(stranger) == ([4], None)  # a new session, from 0
    assert stored(cxl_path) == [0, 1, 2, 0, 1, 2, 3]


@pytest.mark.parametrize("nonblocking", [True, False], ids=["staged", "direct"])
async def test_a_copy_being_written_is_waited_for_then_acked_as_a_duplicate(
    make_config: MakeConfig, cxl_path: str, autojump_clock: MockClock, nonblocking: bool
) -> None:
    config = make_config(**{"network.use_nonblocking": nonblocking})
    async with broker_and_clients(config) as (broker, _, _, connect):
        slow = await connect()
        whole = batch(1)
        await slow.send(hello() + batch(0) + whole[:-100])  # its payload stops short
        await trio.sleep(0.1)
        fast = await connect()
        await fast.send(hello() + whole + batch(2))
        await trio.sleep(0.5)
        assert broker.statistics().sessions.waits == 1  # type: ignore[union-attr]
        assert fast.data == b"\0\0\0\0"  # the broker id, no count yet
        await slow.send(whole[-100:])
        assert await finish(fast) == ([3, 6], None)
        assert await finish(slow) == ([3, 6], None)
    assert stored(cxl_path) == [0, 1, 2, 10, 11, 12, 20, 21, 22]


async def test_a_copy_given_up_lets_the_waiting_one_be_stored(
    make_config: MakeConfig, cxl_path: str, autojump_clock: MockClock
) -> None:
    async with broker_and_clients(make_config()) as (_, _, _, connect):
        stalled = await connect()
        whole = batch(1)
        await stalled.send(hello() + batch(0) + whole[:-100])
        await trio.sleep(0.1)
        waiting = await connect()
        await waiting.send(hello() + whole)
        # The stalled payload is given up after payload_stall_timeout_s (error 7).
        await wait_until(lambda: len(waiting.data) > 4)  # the broker id, then a count
        assert trio.current_time() == pytest.approx(1.0, abs=0.02)
        assert await finish(stalled) == ([3], (7, "batch payload made no progress for 1.0 s"))
        assert await finish(waiting) == ([3], None)
    assert stored(cxl_path) == [0, 1, 2, 10, 11, 12]


async def test_a_wait_for_another_brokers_copy_ends_with_error_9(
    make_config: MakeConfig, cxl_path: str, autojump_clock: MockClock
) -> None:
    """Broker 1 (another handle on the region) claimed batch 0 and stalls:
    broker 0 waits ``batch_timeout_s`` for it, then refuses with error 9;
    once broker 1 is gone, the batch is stored."""
    config = make_config(**{"network.batch_timeout_s": 4.0})
    async with broker_and_clients(config) as (broker, _, _, connect):
        owner = await connect()
        await owner.send(hello() + batch(0))
        assert await finish(owner) == ([3], None)
        other = CxlLog.open(
            cxl_path,
            size=config.cxl.size_bytes,
            segment_size=config.cxl.segment_bytes,
            unit_size=config.cxl.unit_bytes,
            max_topics=config.cxl.max_topics,
            max_brokers=config.cxl.max_brokers,
            broker_id=1,
            prefault=False,
        )
        try:
            stream = other.stream(TOPIC)
            key = SessionKey(CLIENT, TOPIC, stream.topic_index, stream.incarnation, TOKEN)
            other.sessions.clock = virtual_ns
            assert other.sessions.admit(key, 1).verdict is Verdict.NEW
            waiting = await connect()
            await waiting.send(hello() + batch(1))
            counts, error = await finish(waiting)
            assert trio.current_time() == pytest.approx(4.0, abs=0.05)
            assert (counts, error) == (
                [],
                (
                    9,
                    "batch_seq 1 of this session was not stored here: broker 1 is writing it "
                    "and did not finish within 4.0 s; send it again",
                ),
            )
        finally:
            other.close()  # gone: its claim is void
        again = await connect()
        await again.send(hello() + batch(1))
        assert await finish(again) == ([3], None)
        assert broker.statistics().errors == {"session_busy": 1}
    assert stored(cxl_path) == [0, 1, 2, 10, 11, 12]


async def test_on_an_order_5_topic_a_missing_batch_seq_is_skipped_and_refused_later(
    make_config: MakeConfig, cxl_path: str, autojump_clock: MockClock
) -> None:
    config = make_config(**{"topics.order": 5, "cxl.sequencer_hole_timeout_s": 2.0})
    async with broker_and_clients(config) as (broker, _, _, connect):
        first = await connect()
        # 1 never comes: 2 waits for it, then 1 is skipped and 2 ordered.
        await first.send(hello() + batch(0) + batch(2))
        await trio.sleep(1.9)
        assert first.acks()[1] == [3]
        assert await finish(first) == ([3, 6], None)
        assert trio.current_time() >= 2.0
        late = await connect()
        await late.send(hello() + batch(1) + batch(3))
        counts, error = await finish(late)
        assert counts == []
        assert error is not None
        assert error[0] == 2
        assert error[1].startswith(
            f"batch_seq 1 of session (client {CLIENT}, topic {TOPIC!r}) was skipped by the "
            "sequencer"
        )
        seq = broker.ordering.sequencer  # this broker holds the sequencer lease
        assert seq is not None
        assert seq.statistics().session_skips == 1
        # A duplicate on an order-5 topic is acked once its copy is ordered.
        dup = await connect()
        await dup.send(hello() + batch(2) + batch(3))
        assert await finish(dup) == ([3, 6], None)
    with open_log(cxl_path) as log:
        ordered = [m.client_order for m in log.ordered_messages(TOPIC)]
    assert ordered == [0, 1, 2, 20, 21, 22, 30, 31, 32]


@pytest.mark.parametrize("duplicate", [False, True], ids=["stored", "duplicate"])
async def test_a_batch_seq_resent_behind_later_ones_on_one_connection_is_read_and_ordered(
    make_config: MakeConfig, cxl_path: str, autojump_clock: MockClock, duplicate: bool
) -> None:
    """A client whose connection failed resends its batch_seq behind later
    ones on the connection it has left. Those wait for the order, and the
    order waits for the resent batch: with one batch in flight per
    connection, the broker must read on past them (or, before, the resent
    batch stayed unread until the hole timeout skipped it: error 2)."""
    config = make_config(
        **{
            "topics.order": 5,
            "cxl.sequencer_hole_timeout_s": 5.0,
            "network.max_buffers_per_connection": 1,
        }
    )
    async with broker_and_clients(config) as (broker, _, _, connect):
        stalled = await connect()
        await stalled.send(hello() + batch(0))
        assert await finish(stalled) == ([3], None)
        left = await connect()
        later = batch(2) + batch(3) + batch(4)
        if duplicate:
            # 2..4 stored from another connection already: here they are
            # duplicates waiting for the order of their copies.
            first_copy = await connect()
            await first_copy.send(hello() + later)
            await trio.sleep(1)
            assert first_copy.acks()[1] == []  # 2 waits for 1
        await left.send(hello() + later)
        await trio.sleep(1)
        await left.send(batch(1))  # the resend, behind the later batches
        counts, error = await finish(left)
        assert error is None
        assert counts[-1] == 12
        assert trio.current_time() < 4.0  # well before the hole timeout
        if duplicate:
            assert await finish(first_copy) == ([9], None)
        seq = broker.ordering.sequencer
        assert seq is not None
        assert seq.statistics().session_skips == 0
    with open_log(cxl_path) as log:
        ordered = [m.client_order for m in log.ordered_messages(TOPIC)]
    assert ordered == [c for s in range(5) for c in range(10 * s, 10 * s + 3)]


# -- ack level 2 (real clock: the disk writer syncs on a worker thread) --------------------------


async def ack2_duplicate(port: int) -> tuple[list[int], tuple[int, str] | None]:
    """Batch 0 sent again at ack level 2, over TCP: its counts and error."""
    data = await exchange(port, hello(ack=2) + batch(0), eof=True)
    _, counts, error = rawclient.parse_ack_stream(data)
    return counts, error


async def test_a_duplicate_at_ack_2_is_acked_once_the_broker_that_stored_it_synced_it(
    make_config: MakeConfig, tmp_path: Path
) -> None:
    config = make_config(**{"storage.dir": str(tmp_path / "disk"), "network.batch_timeout_s": 2.0})
    with trio.fail_after(10):
        async with open_broker(config) as broker:
            first = await exchange(broker.port, hello(ack=1) + batch(0), eof=True)
            assert rawclient.parse_ack_stream(first)[1] == [3]
            assert await ack2_duplicate(broker.port) == ([3], None)
            entry = broker.sessions.table.admit(session_key(broker), 0).entry
            assert broker.sessions.table.state(entry, TOKEN, 0).durable


async def test_a_restarted_broker_marks_what_it_stored_before_durable_once_it_synced_it(
    make_config: MakeConfig, tmp_path: Path
) -> None:
    """Its previous process stored batch 0 and never synced it (it had no
    disk log here; a kill -9 before the sync leaves the same): once the disk
    log's start-up backlog is synced, a duplicate at ack level 2 is acked."""
    with trio.fail_after(10):
        async with open_broker(make_config()) as broker:
            first = await exchange(broker.port, hello(ack=1) + batch(0), eof=True)
            assert rawclient.parse_ack_stream(first)[1] == [3]
        config = make_config(
            **{"storage.dir": str(tmp_path / "disk"), "network.batch_timeout_s": 2.0}
        )
        async with open_broker(config) as broker:
            assert await ack2_duplicate(broker.port) == ([3], None)


def session_key(broker: Broker) -> SessionKey:
    stream = broker.log.existing_stream(TOPIC)
    assert stream is not None
    return SessionKey(CLIENT, TOPIC, stream.topic_index, stream.incarnation, TOKEN)
