"""The staging pool: a fixed set of equal receive buffers carved from one numpy slab.

Connection tasks receive whole batches into staging buffers; allocator tasks
copy them into the CXL log and give the buffers back. The pool never grows:
when it is empty, callers either get ``None`` from :meth:`StagingPool.allocate`
or park in :meth:`StagingPool.acquire`, and the pool monitor pauses readers
before that happens (see :mod:`trio_embarcadero.monitor`).
"""

from __future__ import annotations

from collections import deque

import attrs
import numpy as np
import numpy.typing as npt
import trio


@attrs.frozen
class StagingPoolStatistics:
    """A snapshot of the pool's occupancy."""

    num_buffers: int
    buffer_size: int
    free: int
    used: int
    queued: int
    peak_used: int
    allocations: int
    exhausted: int

    @property
    def utilization(self) -> float:
        """Fraction of buffers in use, 0.0 to 1.0."""
        return self.used / self.num_buffers


class StagingBuffer:
    """One buffer of a :class:`StagingPool`, owned by one holder at a time.

    Attributes:
        index: Position of the buffer in the pool's slab.
        array: The whole buffer as a 1-D uint8 numpy array.
        view: The same memory as a flat writable memoryview (a receive target).
    """

    __slots__ = ("_pool", "_queued", "array", "index", "view")

    def __init__(self, pool: StagingPool, index: int, array: npt.NDArray[np.uint8]) -> None:
        self._pool: StagingPool | None = pool
        self._queued = False
        self.index = index
        self.array = array
        self.view = array.data

    def hand_off(self) -> None:
        """Mark the buffer as holding a whole batch handed on for placement.

        The pool monitor's watermarks count these, not buffers still being
        filled: a receiver whose client stalls mid-payload is the client's
        problem (its batch timeout), not pressure from the log.
        """
        pool = self._pool
        if pool is not None and not self._queued:
            self._queued = True
            pool._queued += 1
            pool._changed_use()

    @property
    def released(self) -> bool:
        """Whether the buffer went back to its pool."""
        return self._pool is None

    def release(self) -> None:
        """Give the buffer back to its pool. Idempotent, so every owner's
        ``finally`` may call it without tracking who released first."""
        pool, self._pool = self._pool, None
        if pool is not None:
            if self._queued:
                pool._queued -= 1
            pool._give_back(self.index)


class _Waiter:
    __slots__ = ("handed", "index")

    def __init__(self) -> None:
        self.handed = trio.Event()
        self.index: int | None = None


class StagingPool:
    """``num_buffers`` preallocated buffers of ``buffer_size`` bytes each.

    The slab is written once at construction so its pages are faulted in
    before the first batch (first touch runs at ~1 GB/s, a warm copy at
    several GB/s).

    Args:
        num_buffers: How many buffers the pool holds.
        buffer_size: Bytes per buffer.
    """

    def __init__(self, num_buffers: int, buffer_size: int) -> None:
        if num_buffers <= 0 or buffer_size <= 0:
            raise ValueError("a staging pool needs at least one buffer of at least one byte")
        self.num_buffers = num_buffers
        self.buffer_size = buffer_size
        self._slab = np.zeros((num_buffers, buffer_size), dtype=np.uint8)
        self._slab.fill(0)  # np.zeros may map lazily; touch every page now
        self._free: deque[int] = deque(range(num_buffers))
        self._in_use = [False] * num_buffers
        self._peak = 0
        self._allocations = 0
        self._exhausted = 0
        self._waiters: deque[_Waiter] = deque()
        self._queued = 0
        self._band: tuple[int, int] | None = None
        self._changed = trio.lowlevel.ParkingLot()

    @property
    def free(self) -> int:
        """Buffers available right now."""
        return len(self._free)

    @property
    def used(self) -> int:
        """Buffers held by connections or allocators."""
        return self.num_buffers - len(self._free)

    def allocate(self) -> StagingBuffer | None:
        """Take a buffer without waiting; ``None`` when the pool is empty."""
        if not self._free:
            self._exhausted += 1
            return None
        # Last in, first out: the buffers used most recently are the likeliest
        # to still be in the CPU cache when the next batch lands in them.
        return self._take(self._free.pop())

    async def acquire(self) -> StagingBuffer:
        """Take a buffer, waiting until one is released; waiters are served
        first come, first served."""
        await trio.lowlevel.checkpoint_if_cancelled()
        buffer = self.allocate()
        if buffer is not None:
            # Never cancellable once the buffer is ours: nobody else could free it.
            await trio.lowlevel.cancel_shielded_checkpoint()
            return buffer
        waiter = _Waiter()
        self._waiters.append(waiter)
        try:
            await waiter.handed.wait()
        except BaseException:
            if waiter.index is None:
                self._waiters.remove(waiter)
            else:  # handed a buffer just as we were cancelled: pass it on
                self._give_back(waiter.index)
            raise
        assert waiter.index is not None
        return self._take(waiter.index)

    @property
    def queued(self) -> int:
        """Buffers holding whole batches handed on for placement (see
        :meth:`StagingBuffer.hand_off`)."""
        return self._queued

    async def wait_queued_outside(self, low: int, high: int) -> None:
        """Return once ``queued <= low`` or ``queued >= high`` (at once if it is).

        Only a change that lands outside the band wakes the waiter, so a
        watcher costs nothing per batch while the pool stays between its marks.
        """
        if low < self._queued < high:
            self._band = (low, high)
            try:
                await self._changed.park()
            finally:
                self._band = None
        else:
            await trio.lowlevel.checkpoint()

    def _changed_use(self) -> None:
        band = self._band
        if band is not None and not band[0] < self._queued < band[1]:
            self._changed.unpark_all()

    def _take(self, index: int) -> StagingBuffer:
        self._in_use[index] = True
        self._allocations += 1
        self._peak = max(self._peak, self.used)
        self._changed_use()
        return StagingBuffer(self, index, self._slab[index])

    def _give_back(self, index: int) -> None:
        if self._waiters:
            # Hand the buffer straight to the longest waiter, so a synchronous
            # allocate() cannot take it before that waiter runs.
            waiter = self._waiters.popleft()
            waiter.index = index
            waiter.handed.set()
            return
        self._in_use[index] = False
        self._free.append(index)
        self._changed_use()

    def statistics(self) -> StagingPoolStatistics:
        """Return a snapshot of the pool's occupancy."""
        return StagingPoolStatistics(
            num_buffers=self.num_buffers,
            buffer_size=self.buffer_size,
            free=self.free,
            used=self.used,
            queued=self._queued,
            peak_used=self._peak,
            allocations=self._allocations,
            exhausted=self._exhausted,
        )
