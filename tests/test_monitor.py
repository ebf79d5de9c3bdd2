"""Pool monitor hysteresis, the pause gate, and backpressure through a broker on memory streams."""

from __future__ import annotations

import math
from functools import partial

import pytest
import rawclient
import trio
import trio.testing
from conftest import MakeConfig
from memory import header, memory_broker, next_deadline, open_client, settle

from trio_embarcadero.broker.monitor import PauseGate, run_pool_monitor, watermark_counts
from trio_embarcadero.broker.staging import StagingBuffer, StagingPool
from trio_embarcadero.wire import BATCH_HEADER_SIZE


def take(pool: StagingPool) -> StagingBuffer:
    """A buffer holding a whole batch handed on to the log: what the monitor counts."""
    buffer = pool.allocate()
    assert buffer is not None
    buffer.hand_off()
    return buffer


# -- watermark counts ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num", "high", "low", "expected"),
    [
        (4, 0.75, 0.25, (3, 1)),
        (8, 0.875, 0.5, (7, 4)),
        (32, 0.875, 0.5, (28, 16)),
        (10, 0.5, 0.2, (5, 2)),
        (10, 0.55, 0.2, (6, 2)),  # a fractional high mark rounds up...
        (10, 0.5, 0.25, (5, 2)),  # ...a fractional low mark rounds down
        (4, 1.0, 0.0, (4, 0)),
        (1, 1.0, 0.5, (1, 0)),  # one buffer: pause when it is taken, resume when free
        (1, 0.1, 0.0, (1, 0)),  # the high mark is at least one buffer
        (2, 0.5, 0.5, (1, 0)),  # the low mark stays below the high mark
        (3, 0.34, 0.33, (2, 0)),
        (100, 0.01, 0.0, (1, 0)),
    ],
)
def test_watermark_counts(num: int, high: float, low: float, expected: tuple[int, int]) -> None:
    assert watermark_counts(num, high, low) == expected


@pytest.mark.parametrize(
    ("num", "high", "low", "expected"),
    [
        (100, 0.07, 0.0, (7, 0)),  # 0.07 * 100 == 7.000000000000001: ceil gives 8
        (50, 0.56, 0.0, (28, 0)),  # 0.56 * 50 == 28.000000000000004: ceil gives 29
        (100, 0.9, 0.29, (90, 29)),  # 0.29 * 100 == 28.999999999999996: floor gives 28
    ],
)
def test_watermark_counts_of_exact_fractions(
    num: int, high: float, low: float, expected: tuple[int, int]
) -> None:
    assert watermark_counts(num, high, low) == expected


# -- the gate ----------------------------------------------------------------------------------


async def test_pause_gate() -> None:
    gate = PauseGate()
    assert not gate.paused
    with trio.testing.assert_checkpoints():
        await gate.wait_open()  # open: returns at once
    gate.resume()  # idempotent
    assert (gate.pauses, gate.resumes) == (0, 0)
    gate.pause()
    gate.pause()
    assert gate.paused
    assert (gate.pauses, gate.resumes) == (1, 0)
    passed: list[int] = []

    async def waiter(k: int) -> None:
        await gate.wait_open()
        passed.append(k)

    async with trio.open_nursery() as nursery:
        for k in range(3):
            nursery.start_soon(waiter, k)
        await settle()
        assert passed == []
        gate.resume()
        gate.resume()
        await settle()
        assert sorted(passed) == [0, 1, 2]
    assert (gate.pauses, gate.resumes) == (1, 1)


async def test_pause_gate_waiter_survives_a_quick_repause() -> None:
    gate = PauseGate()
    gate.pause()
    passed = trio.Event()

    async def waiter() -> None:
        await gate.wait_open()
        passed.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await settle()
        gate.resume()
        gate.pause()  # closed again before the waiter ran
        await settle()
        # It was let through by the resume (a gate never swallows a wake-up).
        assert passed.is_set()
    assert (gate.pauses, gate.resumes) == (2, 1)
    assert gate.paused


# -- the monitor -------------------------------------------------------------------------------


async def test_monitor_hysteresis(autojump_clock: trio.testing.MockClock) -> None:
    pool = StagingPool(4, 64)
    gate = PauseGate()
    held: list[StagingBuffer] = []

    def take() -> None:
        b = pool.allocate()
        assert b is not None
        b.hand_off()
        held.append(b)

    async def queued_is(n: int) -> None:
        while pool.used < n:
            take()
        while pool.used > n:
            held.pop().release()
        await settle()

    async with trio.open_nursery() as nursery:
        await nursery.start(
            partial(run_pool_monitor, pool, gate, high_watermark=0.75, low_watermark=0.25)
        )
        # watermark_counts(4, 0.75, 0.25) == (3, 1)
        await queued_is(2)
        assert not gate.paused
        await queued_is(3)
        assert gate.paused
        assert (gate.pauses, gate.resumes) == (1, 0)
        await queued_is(4)
        assert pool.allocate() is None
        await settle()
        assert gate.paused
        await queued_is(2)
        assert gate.paused  # between the marks: still paused
        await queued_is(3)
        await queued_is(2)
        assert (gate.pauses, gate.resumes) == (1, 0)
        await queued_is(1)
        assert not gate.paused  # at the low mark
        assert (gate.pauses, gate.resumes) == (1, 1)
        await queued_is(2)
        assert not gate.paused  # between the marks: still running
        await queued_is(0)
        await queued_is(3)
        assert gate.paused
        assert (gate.pauses, gate.resumes) == (2, 1)
        # It waits on the pool, not on a timer.
        assert next_deadline() == math.inf
        assert trio.current_time() == 0
        nursery.cancel_scope.cancel()
    for b in held:
        b.release()


async def test_monitor_pauses_at_once_if_started_under_pressure() -> None:
    pool = StagingPool(2, 64)
    gate = PauseGate()
    held = [take(pool), take(pool)]
    async with trio.open_nursery() as nursery:
        await nursery.start(
            partial(run_pool_monitor, pool, gate, high_watermark=1.0, low_watermark=0.0)
        )
        await settle()
        assert gate.paused
        for b in held:
            assert b is not None
            b.release()
        await settle()
        assert not gate.paused
        nursery.cancel_scope.cancel()


# -- through a broker --------------------------------------------------------------------------

POOL_CONFIG = {
    "network.staging_pool_num_buffers": 4,
    "network.pause_high_watermark": 0.75,
    "network.resume_low_watermark": 0.25,
    "network.num_cxl_allocation_workers": 1,
    "network.stats_interval_s": 1000.0,
}


async def test_pool_pressure_pauses_connections_until_the_low_watermark(
    make_config: MakeConfig, autojump_clock: trio.testing.MockClock
) -> None:
    async with (
        trio.open_nursery() as nursery,
        memory_broker(make_config(**POOL_CONFIG)) as (
            broker,
            listener,
        ),
    ):
        held = [take(broker.pool) for _ in range(3)]  # high watermark: 3 of 4
        await settle()
        assert broker.gate.paused
        client = await open_client(listener, nursery)
        await client.send(rawclient.handshake("t", client_id=2, ack=1))
        data, _ = rawclient.batch(0, 2, 0, 10, 100)
        await client.send(data)
        await settle()
        stats = broker.statistics()
        assert stats.paused
        assert stats.pauses == 1
        assert stats.connections["paused"] == 1
        # Held at the gate: the handshake was read, the batch was not.
        assert client.server.bytes_received == 64
        assert not client.server.receiving
        assert client.acks() == (0, [], None)

        held.pop().release()  # 2 in use: above the low mark, still paused
        await settle()
        assert broker.gate.paused
        assert broker.statistics().connections["paused"] == 1
        assert client.server.bytes_received == 64

        held.pop().release()  # 1 in use: the low mark
        await settle()
        stats = broker.statistics()
        assert not stats.paused
        assert (stats.pauses, stats.resumes) == (1, 1)
        assert stats.connections["paused"] == 0
        assert client.server.bytes_received == 64 + len(data)
        assert client.acks() == (0, [10], None)
        assert stats.batches_committed == 1
        assert trio.current_time() == 0  # no timer was involved
        held.pop().release()
        await client.close()


async def test_an_idle_connection_reads_no_more_than_a_header_while_paused(
    make_config: MakeConfig, autojump_clock: trio.testing.MockClock
) -> None:
    """Without an idle clock the wait for a header is not cut short by a
    pause: the batch that arrives meanwhile is read as far as its header,
    which holds no buffer, and waits at the gate for its payload."""
    async with (
        trio.open_nursery() as nursery,
        memory_broker(make_config(**POOL_CONFIG)) as (
            broker,
            listener,
        ),
    ):
        client = await open_client(listener, nursery)
        await client.send(rawclient.handshake("t", client_id=2, ack=1))
        await settle()
        assert broker.statistics().connections["wait_header"] == 1
        held = [take(broker.pool) for _ in range(3)]
        await settle()
        assert broker.gate.paused
        assert broker.statistics().connections["wait_header"] == 1
        data, _ = rawclient.batch(0, 2, 0, 10, 100)
        await client.send(data)
        await trio.sleep(10.0)
        assert client.server.bytes_received == 64 + BATCH_HEADER_SIZE
        assert broker.statistics().connections["paused"] == 1
        assert client.acks() == (0, [], None)
        for b in held:
            b.release()
        await settle()
        assert client.server.bytes_received == 64 + len(data)
        assert client.acks() == (0, [10], None)
        await client.close()


async def test_a_pause_restarts_an_idle_connection_s_clock_and_a_stop_ends_its_wait(
    make_config: MakeConfig, autojump_clock: trio.testing.MockClock
) -> None:
    """An idle connection's one wait is cut short by a pause (it is then
    PAUSED, and reads after the resume), by its idle deadline (counted again
    from the resume: waiting at the gate is the broker's doing) and by a
    graceful stop (which ends it without an error)."""
    config = make_config(**POOL_CONFIG, **{"network.idle_timeout_s": 2.0})
    async with trio.open_nursery() as nursery:
        async with memory_broker(config) as (broker, listener):
            client = await open_client(listener, nursery)
            await client.send(rawclient.handshake("t", client_id=2, ack=1))
            await trio.sleep(1.5)
            held = [take(broker.pool) for _ in range(3)]
            await settle()
            assert broker.statistics().connections["paused"] == 1
            await trio.sleep(10.0)  # paused well past its idle timeout: no error
            assert client.eof_at is None
            for b in held:
                b.release()
            await settle()
            resumed = trio.current_time()
            assert broker.statistics().connections["wait_header"] == 1
            await trio.sleep(2.0 - 1e-3)
            data, _ = rawclient.batch(0, 2, 0, 10, 100)
            await client.send(data)
            sent = trio.current_time()
            await settle()
            assert client.acks() == (0, [10], None)  # read after the resume
            await trio.sleep(2.0 - 1e-3)
            await settle()
            assert client.eof_at is None
            await trio.sleep(1e-3)
            await settle()
            assert client.eof_at == sent + 2.0  # idle again, counted from that batch
            assert sent == resumed + 2.0 - 1e-3
            assert client.acks() == (0, [10], (7, "idle for 2.0 s between batches"))

            second = await open_client(listener, nursery)
            await second.send(rawclient.handshake("t", client_id=3, ack=1))
            await trio.sleep(1.0)
            assert broker.statistics().connections["wait_header"] == 1
            stopped = trio.current_time()
            # Leave while it waits: a graceful stop ends the wait, not an error.
    assert second.eof_at == stopped
    assert second.acks() == (0, [], (5, "broker is shutting down"))


async def test_allocator_backoff_fills_the_pool_and_pauses_the_publisher(
    make_config: MakeConfig, autojump_clock: trio.testing.MockClock
) -> None:
    config = make_config(
        **POOL_CONFIG,
        **{"cxl.max_inflight_batches": 1, "network.backoff_max_retries": 1000},
    )
    async with trio.open_nursery() as nursery, memory_broker(config) as (broker, listener):
        client = await open_client(listener, nursery)
        await client.send(rawclient.handshake("t", client_id=3, ack=1))
        held = broker.log.get_cxl_buffer("t", header(64))  # the allocator will back off
        batches = [rawclient.batch(k, 3, 10 * k, 10, 200)[0] for k in range(4)]
        for b in batches:
            await client.send(b)
        await settle()
        # Batch 0 waits in the allocator's backoff, 1 and 2 in the channel: 3 of 4 buffers.
        stats = broker.statistics()
        assert stats.pool.used == 3
        assert stats.queued_batches == 2
        assert stats.paused
        assert stats.connections["paused"] == 1
        assert stats.allocation_retries == 1
        assert next_deadline() == pytest.approx(100e-6, abs=1e-12)
        # The fourth batch is read as far as its header, which waits at the gate.
        read = 64 + 3 * len(batches[0]) + BATCH_HEADER_SIZE
        assert client.server.bytes_received == read
        assert not client.server.receiving
        assert client.acks() == (0, [], None)

        await trio.sleep(0.010)  # the allocator keeps backing off; nothing moves
        stats = broker.statistics()
        assert (stats.pool.used, stats.paused, stats.batches_committed) == (3, True, 0)
        assert client.server.bytes_received == read

        broker.commits.abandon(held)
        del held
        await trio.sleep(0.0016)  # past the allocator's next attempt
        await settle()
        stats = broker.statistics()
        assert not stats.paused
        assert (stats.pauses, stats.resumes) == (1, 1)
        assert stats.batches_committed == 4
        assert stats.pool.used == 0
        assert client.server.bytes_received == 64 + 4 * len(batches[0])
        assert client.acks()[1][-1] == 40
        await client.close()
