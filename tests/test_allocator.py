"""Allocators: exact backoff on the mock clock, per-connection commit order, give-up path."""

from __future__ import annotations

from collections.abc import Iterator

import attrs
import numpy as np
import pytest
import rawclient
import trio
import trio.testing
from conftest import MakeConfig
from memory import (
    close_log,
    header,
    memory_broker,
    next_deadline,
    open_client,
    open_small_log,
    settle,
)

from trio_embarcadero.broker.allocator import (
    AllocationCounters,
    Backoff,
    StagedBatch,
    backoff_delays,
    place_batch,
    reserve,
    run_allocator,
)
from trio_embarcadero.broker.commits import CommitFeed
from trio_embarcadero.broker.staging import StagingPool
from trio_embarcadero.errors import LogFullError
from trio_embarcadero.log import CxlLog, Reservation
from trio_embarcadero.wire import scan_records

US = 1e-6
DELAYS = [100 * US, 200 * US, 400 * US, 800 * US, 1600 * US, 1600 * US]
#: Virtual times of the attempts: 0, then after each delay.
ATTEMPTS = [sum(DELAYS[:k]) for k in range(len(DELAYS) + 1)]
#: Offset of the test's own wake-ups from the allocator's, so no two deadlines coincide.
EPS = 10 * US
BACKOFF = Backoff(100 * US, 1600 * US, 6)


def approx(x: float) -> object:
    return pytest.approx(x, abs=1e-9)


@pytest.fixture
def log(cxl_path: str) -> Iterator[CxlLog]:
    log = open_small_log(cxl_path, max_inflight_batches=1)
    yield log
    close_log(log)


# -- the delays ----------------------------------------------------------------------------


def test_backoff_delays() -> None:
    assert list(backoff_delays(100e-6, 1600e-6, 6)) == pytest.approx(DELAYS, rel=1e-12)
    assert list(BACKOFF.delays()) == pytest.approx(DELAYS, rel=1e-12)


@pytest.mark.parametrize(
    ("initial", "maximum", "retries", "expected"),
    [
        (1.0, 1.0, 3, [1.0, 1.0, 1.0]),
        (1.0, 3.0, 4, [1.0, 2.0, 3.0, 3.0]),
        (0.5, 100.0, 5, [0.5, 1.0, 2.0, 4.0, 8.0]),
        (1.0, 8.0, 0, []),
    ],
)
def test_backoff_delays_cap_and_count(
    initial: float, maximum: float, retries: int, expected: list[float]
) -> None:
    assert list(backoff_delays(initial, maximum, retries)) == expected


# -- reserve() on the mock clock -----------------------------------------------------------


@attrs.define
class Outcome:
    reservation: Reservation | None = None
    error: LogFullError | None = None
    at: float | None = None


async def reserve_into(
    outcome: Outcome, log: CxlLog, backoff: Backoff, counters: AllocationCounters
) -> None:
    try:
        outcome.reservation = await reserve(log, "t", header(64), backoff, counters)
    except LogFullError as exc:
        outcome.error = exc
    outcome.at = trio.current_time()


async def test_reserve_sleeps_exactly_the_backoff_then_gives_up(
    log: CxlLog, autojump_clock: trio.testing.MockClock
) -> None:
    held = log.get_cxl_buffer("t", header(64))  # the stream's in-flight window is full
    counters = AllocationCounters()
    outcome = Outcome()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reserve_into, outcome, log, BACKOFF, counters)
        for k, delay in enumerate(DELAYS):
            await trio.sleep_until(ATTEMPTS[k] + EPS)
            await settle()
            assert counters.retries == k + 1
            assert log.statistics().ring_full == k + 1
            assert next_deadline() == approx(delay - EPS)  # asleep until its next attempt
            assert outcome.at is None
    assert outcome.at == approx(ATTEMPTS[-1])  # 4.7 ms: the seventh attempt fails for good
    assert outcome.error is not None
    assert outcome.error.transient
    assert (counters.retries, counters.exhausted) == (6, 1)
    assert counters.backoff_seconds == approx(sum(DELAYS))
    assert log.statistics().ring_full == 7
    assert log.statistics().reservations == 1
    log.abandon(held)


async def test_reserve_succeeds_at_the_first_attempt_after_space_returns(
    log: CxlLog, autojump_clock: trio.testing.MockClock
) -> None:
    held = log.get_cxl_buffer("t", header(64))
    counters = AllocationCounters()
    outcome = Outcome()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reserve_into, outcome, log, BACKOFF, counters)
        await trio.sleep_until(ATTEMPTS[4] + EPS)  # 1.51 ms: in the 1.6 ms sleep
        log.abandon(held)  # space is back, but a backoff sleep is not woken by it
        await settle()
        assert outcome.at is None
        assert next_deadline() == approx(DELAYS[4] - EPS)
        assert len(log.stream("t").pending) == 0
    assert outcome.at == approx(ATTEMPTS[5])  # 3.1 ms
    assert outcome.error is None
    assert outcome.reservation is not None
    assert list(log.stream("t").pending) == [outcome.reservation]
    assert (counters.retries, counters.exhausted) == (5, 0)
    assert counters.backoff_seconds == approx(sum(DELAYS[:5]))
    log.abandon(outcome.reservation)
    outcome.reservation = None


async def test_reserve_without_retries_fails_at_once(
    log: CxlLog, autojump_clock: trio.testing.MockClock
) -> None:
    held = log.get_cxl_buffer("t", header(64))
    counters = AllocationCounters()
    with pytest.raises(LogFullError):
        await reserve(log, "t", header(64), Backoff(100 * US, 1600 * US, 0), counters)
    assert trio.current_time() == 0
    assert (counters.retries, counters.exhausted, counters.backoff_seconds) == (0, 1, 0.0)
    log.abandon(held)


async def test_cancelled_reserve_reserves_nothing(log: CxlLog) -> None:
    # Its only checkpoint comes before the reservation, never between it and its use.
    counters = AllocationCounters()
    with trio.CancelScope() as scope:
        scope.cancel()
        await reserve(log, "t", header(64), BACKOFF, counters)
    assert scope.cancelled_caught
    assert log.statistics().reservations == 0
    assert log.existing_stream("t") is None


# -- place_batch ---------------------------------------------------------------------------


@attrs.define(eq=False)
class Owner:
    """A stand-in for a connection, recording what the allocator tells it."""

    topic: str = "t"
    failed: bool = False
    committed: list[tuple[int, int]] = attrs.Factory(list)
    discarded: list[LogFullError | None] = attrs.Factory(list)

    def batch_committed(self, reservation: Reservation) -> None:
        self.committed.append((reservation.header.batch_seq, reservation.first_offset))

    def batch_discarded(self, error: LogFullError | None, claim: object = None) -> None:
        if error is not None:
            self.failed = True
        self.discarded.append(error)


def staged(
    pool: StagingPool, owner: Owner, seq: int, count: int, after: trio.Event | None
) -> StagedBatch:
    data, _ = rawclient.batch(seq, 1, 10 * seq, count, 50 + seq)
    payload = data[128:]
    buffer = pool.allocate()
    assert buffer is not None
    buffer.view[: len(payload)] = payload
    starts = scan_records(buffer.array[: len(payload)], count)
    return StagedBatch(owner, header(len(payload), count, batch_seq=seq), buffer, starts, after)


def committed_records(log: CxlLog) -> list[tuple[int, int, int, bytes]]:
    stream = log.stream("t")
    out = []
    for i in range(stream.batches):
        b = stream.committed_batch(i)
        out += rawclient.parse_records(
            bytes(log.region[b.payload_offset : b.payload_offset + b.total_size])
        )
    return out


async def test_place_batch_keeps_a_connections_order(log: CxlLog) -> None:
    pool = StagingPool(4, 65536)
    owner = Owner()
    counters = AllocationCounters()
    b1 = staged(pool, owner, 1, 3, None)
    b2 = staged(pool, owner, 2, 4, b1.done)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(place_batch, b2, log, CommitFeed(log), BACKOFF, counters)
        await settle()
        # The second batch waits for the first: nothing reserved, its buffer still held.
        assert log.statistics().reservations == 0
        assert not b2.done.is_set()
        assert pool.used == 2
        nursery.start_soon(place_batch, b1, log, CommitFeed(log), BACKOFF, counters)
    assert owner.committed == [(1, 0), (2, 3)]
    assert owner.discarded == []
    assert b1.done.is_set()
    assert b2.done.is_set()
    assert b1.buffer.released
    assert b2.buffer.released
    assert pool.used == 0
    records = committed_records(log)
    assert [(r[0], r[2]) for r in records] == [
        (0, 10),
        (1, 11),
        (2, 12),
        (3, 20),
        (4, 21),
        (5, 22),
        (6, 23),
    ]
    assert records[3][3] == rawclient.payload_for(1, 20, 52)
    assert counters.retries == 0


async def test_two_allocators_keep_a_connections_order(
    log: CxlLog, autojump_clock: trio.testing.MockClock
) -> None:
    pool = StagingPool(4, 65536)
    owner = Owner()
    counters = AllocationCounters()
    held = log.get_cxl_buffer("t", header(64))
    send, receive = trio.open_memory_channel[StagedBatch](8)
    b1 = staged(pool, owner, 1, 3, None)
    b2 = staged(pool, owner, 2, 2, b1.done)
    async with trio.open_nursery() as nursery:
        async with receive:
            for _ in range(2):
                await nursery.start(
                    run_allocator, receive.clone(), log, CommitFeed(log), BACKOFF, counters
                )
        async with send:
            await send.send(b1)
            await send.send(b2)
            await trio.sleep_until(ATTEMPTS[2] + EPS)
            await settle()
            # The first batch backs off; the second, with the other allocator, waits for it.
            assert counters.retries == 3
            assert owner.committed == []
            assert pool.used == 2
            CommitFeed(log).abandon(held)
        # Closing the channel lets the allocators drain it and return.
    assert trio.current_time() == approx(ATTEMPTS[3])
    assert owner.committed == [(1, 0), (2, 3)]
    assert pool.used == 0


async def test_a_batch_that_gets_no_space_is_discarded(
    log: CxlLog, autojump_clock: trio.testing.MockClock
) -> None:
    pool = StagingPool(4, 65536)
    owner = Owner()
    counters = AllocationCounters()
    held = log.get_cxl_buffer("t", header(64))
    b1 = staged(pool, owner, 1, 3, None)
    b2 = staged(pool, owner, 2, 2, b1.done)
    backoff = Backoff(100 * US, 1600 * US, 2)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(place_batch, b2, log, CommitFeed(log), backoff, counters)
        nursery.start_soon(place_batch, b1, log, CommitFeed(log), backoff, counters)
    assert trio.current_time() == approx(300 * US)
    assert owner.committed == []
    assert len(owner.discarded) == 2
    error, later = owner.discarded
    assert isinstance(error, LogFullError)
    assert error.transient
    assert later is None  # discarded because its predecessor failed
    assert b1.done.is_set()
    assert b2.done.is_set()
    assert pool.used == 0
    assert counters.exhausted == 1
    assert log.statistics().reservations == 1  # only the held one
    CommitFeed(log).abandon(held)


async def test_a_failed_owners_later_batch_is_discarded(log: CxlLog) -> None:
    pool = StagingPool(2, 65536)
    owner = Owner(failed=True)
    counters = AllocationCounters()
    batch = staged(pool, owner, 3, 2, None)
    await place_batch(batch, log, CommitFeed(log), BACKOFF, counters)
    assert owner.discarded == [None]
    assert owner.committed == []
    assert batch.done.is_set()
    assert batch.buffer.released
    assert pool.used == 0
    assert log.statistics().reservations == 0


async def test_run_allocator_drains_the_channel(log: CxlLog) -> None:
    pool = StagingPool(8, 65536)
    owner = Owner()
    counters = AllocationCounters()
    send, receive = trio.open_memory_channel[StagedBatch](8)
    previous: trio.Event | None = None
    async with send:
        for seq in range(5):
            batch = staged(pool, owner, seq, 2, previous)
            previous = batch.done
            send.send_nowait(batch)
    # Started after the send side closed: it still commits everything queued, then returns.
    await run_allocator(receive, log, CommitFeed(log), BACKOFF, counters)
    assert [seq for seq, _ in owner.committed] == [0, 1, 2, 3, 4]
    assert [first for _, first in owner.committed] == [0, 2, 4, 6, 8]
    assert pool.used == 0
    assert np.array_equal([r[0] for r in committed_records(log)], np.arange(10))


async def test_an_allocator_places_the_batches_waiting_for_it_in_one_pass(log: CxlLog) -> None:
    """Each receiving task hands over a batch a pass through the scheduler;
    with more of them than allocators, an allocator that placed one batch a
    pass would fall behind and fill the staging pool. It places those
    waiting (up to its burst) before another task runs."""
    pool = StagingPool(16, 65536)
    owner = Owner()
    counters = AllocationCounters()
    send, receive = trio.open_memory_channel[StagedBatch](16)
    placed_when_looked: list[int] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(run_allocator, receive, log, CommitFeed(log), BACKOFF, counters)
        async with send:
            previous: trio.Event | None = None
            for seq in range(6):
                batch = staged(pool, owner, seq, 2, previous)
                previous = batch.done
                send.send_nowait(batch)
            # One pass of the scheduler later, all six are in the log.
            await trio.lowlevel.checkpoint()
            await trio.lowlevel.checkpoint()
            placed_when_looked.append(len(owner.committed))
    assert placed_when_looked == [6]
    assert [seq for seq, _ in owner.committed] == list(range(6))
    assert pool.used == 0


# -- through a broker on memory streams ----------------------------------------------------


BACKOFF_CONFIG = {
    "cxl.max_inflight_batches": 1,
    "network.backoff_max_retries": 6,
    "network.num_cxl_allocation_workers": 1,
    "network.stats_interval_s": 1000.0,
}


async def test_broker_allocator_backs_off_exactly_then_gives_up(
    make_config: MakeConfig, autojump_clock: trio.testing.MockClock
) -> None:
    async with (
        trio.open_nursery() as nursery,
        memory_broker(make_config(**BACKOFF_CONFIG)) as (
            broker,
            listener,
        ),
    ):
        client = await open_client(listener, nursery)
        await client.send(rawclient.handshake("t", client_id=1, ack=1))
        await client.send(rawclient.batch(0, 1, 0, 10, 100)[0])
        await settle()
        assert client.acks() == (0, [10], None)
        held = broker.log.get_cxl_buffer("t", header(64))  # fill the in-flight window
        await client.send(rawclient.batch(1, 1, 10, 5, 100)[0])
        for k, delay in enumerate(DELAYS):
            await trio.sleep_until(ATTEMPTS[k] + EPS)
            await settle()
            stats = broker.statistics()
            assert stats.allocation_retries == k + 1
            assert stats.pool.used == 1  # the staged batch waits in its buffer
            assert next_deadline() == approx(delay - EPS)
            assert stats.connections["wait_header"] == 1
            assert client.eof_at is None
        await trio.sleep_until(ATTEMPTS[-1] + EPS)
        await settle()
        # The seventh attempt, at 4.7 ms, fails for good: error 4 after the broker id
        # and the count so far, then the connection ends.
        broker_id, counts, error = client.acks()
        assert (broker_id, counts) == (0, [10])
        assert error is not None
        assert error[0] == 4
        assert "no log space after retries" in error[1]
        assert client.arrival_of(12) == approx(ATTEMPTS[-1])
        assert client.eof_at == approx(ATTEMPTS[-1])
        stats = broker.statistics()
        assert stats.allocation_retries == 6
        assert stats.backoff_seconds == approx(sum(DELAYS))
        assert stats.allocation_failures == 1
        assert stats.batches_discarded == 1
        assert (stats.batches_received, stats.batches_committed) == (2, 1)
        assert stats.pool.used == 0  # no leaked staging buffer
        assert sum(stats.connections.values()) == 0
        assert stats.errors == {"log_full": 1}
        assert stats.internal_errors == 0
        broker.commits.abandon(held)
        del held
