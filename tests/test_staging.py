"""The staging pool: fixed buffers, idempotent release, waiting for a buffer."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from memory import settle

from trio_embarcadero.broker.staging import StagingBuffer, StagingPool


def test_allocate_until_empty() -> None:
    pool = StagingPool(3, 256)
    buffers = [pool.allocate() for _ in range(3)]
    assert all(b is not None for b in buffers)
    held = [b for b in buffers if b is not None]
    assert sorted(b.index for b in held) == [0, 1, 2]
    assert pool.allocate() is None
    assert pool.allocate() is None
    assert (pool.free, pool.used) == (0, 3)
    for b in held:
        assert len(b.array) == 256
        assert len(b.view) == 256
        assert not b.released
    stats = pool.statistics()
    assert (stats.num_buffers, stats.buffer_size, stats.free, stats.used) == (3, 256, 0, 3)
    assert (stats.allocations, stats.exhausted, stats.peak_used) == (3, 2, 3)
    assert stats.utilization == 1.0


def test_buffers_do_not_overlap() -> None:
    pool = StagingPool(3, 64)
    held = [pool.allocate() for _ in range(3)]
    for k, b in enumerate(held):
        assert b is not None
        b.view[:] = bytes([k + 1]) * 64
    for k, b in enumerate(held):
        assert b is not None
        assert bytes(b.array) == bytes([k + 1]) * 64


def test_release_returns_the_buffer_and_is_idempotent() -> None:
    pool = StagingPool(2, 64)
    a = pool.allocate()
    b = pool.allocate()
    assert a is not None
    assert b is not None
    a.release()
    assert a.released
    assert (pool.free, pool.used) == (1, 1)
    a.release()
    a.release()
    assert (pool.free, pool.used) == (1, 1)
    again = pool.allocate()
    assert again is not None
    assert again.index == a.index
    assert pool.allocate() is None
    # The old handle's release must not free the buffer its new owner holds.
    a.release()
    assert (pool.free, pool.used) == (0, 2)
    again.release()
    b.release()
    assert (pool.free, pool.used) == (2, 0)


def test_peak_and_statistics() -> None:
    pool = StagingPool(4, 64)
    held = [pool.allocate() for _ in range(3)]
    for b in held:
        assert b is not None
        b.release()
    b = pool.allocate()
    assert b is not None
    stats = pool.statistics()
    assert (stats.used, stats.free, stats.peak_used, stats.allocations) == (1, 3, 3, 4)
    assert stats.exhausted == 0
    assert stats.utilization == 0.25


@pytest.mark.parametrize(("num", "size"), [(0, 64), (1, 0), (-1, 64)])
def test_empty_pool_is_refused(num: int, size: int) -> None:
    with pytest.raises(ValueError, match="at least one buffer"):
        StagingPool(num, size)


async def test_acquire_parks_until_a_release(autojump_clock: trio.testing.MockClock) -> None:
    pool = StagingPool(1, 64)
    held = pool.allocate()
    assert held is not None
    got: list[StagingBuffer] = []

    async def waiter() -> None:
        got.append(await pool.acquire())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await settle()
        assert got == []
        await trio.sleep(5)  # no release: it would wait forever
        assert got == []
        held.release()
        await settle()
        assert trio.current_time() == 5
        assert [b.index for b in got] == [held.index]
        assert pool.used == 1
    got[0].release()
    assert pool.used == 0


async def test_acquire_returns_at_once_when_a_buffer_is_free() -> None:
    pool = StagingPool(2, 64)
    with trio.testing.assert_checkpoints():
        buffer = await pool.acquire()
    assert pool.used == 1
    buffer.release()


async def test_waiters_are_served_in_arrival_order() -> None:
    pool = StagingPool(1, 64)
    held = pool.allocate()
    assert held is not None
    got: list[str] = []
    buffers: list[StagingBuffer] = []

    async def waiter(name: str) -> None:
        buffers.append(await pool.acquire())
        got.append(name)

    async with trio.open_nursery() as nursery:
        for name in "abc":
            nursery.start_soon(waiter, name)
            await settle()  # park them in a known order
        held.release()
        await settle()
        assert got == ["a"]
        buffers[-1].release()
        await settle()
        assert got == ["a", "b"]
        buffers[-1].release()
        await settle()
        assert got == ["a", "b", "c"]
    buffers[-1].release()
    assert pool.used == 0


async def test_a_woken_waiter_keeps_its_place() -> None:
    pool = StagingPool(1, 64)
    held = pool.allocate()
    assert held is not None
    got: list[str] = []

    async def waiter(name: str) -> None:
        buffer = await pool.acquire()
        got.append(name)
        buffer.release()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter, "first")
        await settle()
        nursery.start_soon(waiter, "second")
        await settle()
        held.release()  # wakes "first"...
        barger = pool.allocate()  # ...and this tries to take the buffer before it runs
        await settle()
        if barger is not None:
            barger.release()
            await settle()
    assert got == ["first", "second"]


async def test_cancelled_waiter_takes_nothing() -> None:
    pool = StagingPool(1, 64)
    held = pool.allocate()
    assert held is not None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pool.acquire)
        await settle()
        nursery.cancel_scope.cancel()
    held.release()
    assert (pool.used, pool.free) == (0, 1)


async def test_acquire_cancelled_at_its_checkpoint_leaks_nothing() -> None:
    pool = StagingPool(2, 64)
    with trio.CancelScope() as scope:
        scope.cancel()
        await pool.acquire()
    assert scope.cancelled_caught
    assert pool.used == 0


async def test_wait_queued_outside_wakes_only_outside_the_band(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pool = StagingPool(4, 64)
    wakeups: list[int] = []

    async def watcher(low: int, high: int) -> None:
        await pool.wait_queued_outside(low, high)
        wakeups.append(pool.queued)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watcher, -1, 3)
        await settle()
        await trio.sleep(1)
        assert wakeups == []  # nothing changed, nothing woke
        held = [pool.allocate() for _ in range(4)]
        await settle()
        assert wakeups == []  # buffers being filled do not count
        for b in held[:2]:
            assert b is not None
            b.hand_off()
        await settle()
        assert wakeups == []  # 1 and 2 queued are inside the band (-1, 3)
        assert held[2] is not None
        held[2].hand_off()
        await settle()
        assert wakeups == [3]
        nursery.start_soon(watcher, 1, 5)
        await settle()
        for b in held[:2]:
            assert b is not None
            b.release()
        await settle()
        assert wakeups == [3, 1]
    with trio.testing.assert_checkpoints():
        await pool.wait_queued_outside(1, 5)  # already outside: returns at once
