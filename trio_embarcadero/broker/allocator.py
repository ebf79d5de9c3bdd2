"""CXL allocator tasks: from staged batches to committed log entries.

Connection tasks send each whole, validated batch (a staging buffer and its
header) through a bounded memory channel. An allocator task takes one, asks
the log for space with :func:`reserve`, which retries with exponential backoff
while the log cannot take the batch, copies the payload in, commits, and gives
the staging buffer back. The retry state belongs to the batch, never to the
connection, so two batches of one connection never share a retry budget.

A region with no free segment is backpressure, not failure, while retention
may still free one (:class:`LogSpace`): the batch waits, woken by every
reclaim, up to ``network.log_full_timeout_s``. Meanwhile its allocator holds
it, so the allocation channel, the in-flight cap and the staging pool fill
and the publishers stop being read, exactly as when the allocators are slow.

Batches of one connection enter the log in the order they were received even
with several allocators: each batch waits for its predecessor's ``done``
event before it reserves. Predecessors are always taken from the channel
first (one producer per connection, FIFO channel), so this cannot deadlock.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Protocol

import attrs
import numpy as np
import numpy.typing as npt
import trio

from ..errors import LogFullError
from ..log import CxlLog, Reservation
from ..log.sessions import Claim
from ..wire import BatchHeader
from .commits import CommitConsumer, CommitFeed
from .staging import StagingBuffer

logger = logging.getLogger(__name__)


def backoff_delays(initial: float, maximum: float, retries: int) -> Iterator[float]:
    """The sleeps between attempts: ``initial`` doubling up to ``maximum``.

    ``backoff_delays(100e-6, 1600e-6, 6)`` yields 100, 200, 400, 800, 1600 and
    1600 microseconds (in seconds); after ``retries`` delays the caller gives up.
    """
    delay = initial
    for _ in range(retries):
        yield min(delay, maximum)
        delay *= 2


@attrs.frozen
class Backoff:
    """How long and how often to retry a reservation."""

    initial: float
    maximum: float
    retries: int

    def delays(self) -> Iterator[float]:
        return backoff_delays(self.initial, self.maximum, self.retries)


@attrs.define
class AllocationCounters:
    """Counters shared by allocator tasks and the direct receive path."""

    retries: int = 0
    backoff_seconds: float = 0.0
    exhausted: int = 0


class LogSpace:
    """Where batches wait for a full region to get room back.

    Reclaims (the retention task, :func:`reserve`'s ``make_room``) call
    :meth:`room_made`, which wakes every waiter to try again: no polling.

    Args:
        timeout: How long one batch may wait (``network.log_full_timeout_s``).
        reclaimable: Whether retention could ever free a segment (some topic
            of the region has a retention limit); when not, nobody waits.

    Attributes:
        waits: Batches that had to wait for room.
        wait_seconds: Time they spent waiting, in all.
        timeouts: Batches that waited the whole timeout in vain (error 4).
    """

    def __init__(self, timeout: float, reclaimable: Callable[[], bool]) -> None:
        self.timeout = timeout
        self._reclaimable = reclaimable
        self._lot = trio.lowlevel.ParkingLot()
        self._closed = False
        self.waits = 0
        self.wait_seconds = 0.0
        self.timeouts = 0

    @property
    def held(self) -> int:
        """Batches waiting for room now."""
        return len(self._lot)

    def may_wait(self) -> bool:
        """Whether a batch that found the region full should wait for room."""
        return not self._closed and self.timeout > 0 and self._reclaimable()

    def room_made(self) -> None:
        """Segments were freed: every waiter tries again."""
        self._lot.unpark_all()

    def close(self) -> None:
        """Stop waiting (a shutdown): waiters and later batches give up at once."""
        self._closed = True
        self._lot.unpark_all()

    async def wait(self, deadline: float) -> bool:
        """Wait for the next :meth:`room_made` until ``deadline``.

        Returns:
            False when the deadline passed or :meth:`close` was called.
        """
        if self._closed:
            return False
        if not self._lot:
            logger.warning(
                "log full: holding publishers for up to %s s until retention frees a segment",
                self.timeout,
            )
        start = trio.current_time()
        try:
            with trio.move_on_at(deadline):
                await self._lot.park()
        finally:
            self.wait_seconds += trio.current_time() - start
        return not self._closed and trio.current_time() < deadline


async def take_slot(slot: trio.CapacityLimiter, on_wait: Callable[[], None] | None = None) -> None:
    """Take a token of ``slot`` (a receive slot), waiting only when none is
    free (calling ``on_wait`` first): the receive loop has its own checkpoint
    once a batch, and a pass through the scheduler for every free token costs
    more than the rest of a small batch's bookkeeping. The caller releases it."""
    try:
        slot.acquire_nowait()
    except trio.WouldBlock:
        if on_wait is not None:
            on_wait()
        await slot.acquire()


async def reserve(
    log: CxlLog,
    topic: str,
    header: BatchHeader,
    backoff: Backoff,
    counters: AllocationCounters,
    owner: object = None,
    *,
    slot: trio.CapacityLimiter | None = None,
    make_room: Callable[[], int] | None = None,
    space: LogSpace | None = None,
    session: Claim | None = None,
    on_wait: Callable[[], None] | None = None,
) -> Reservation:
    """Reserve log space for a batch, backing off while the log is full.

    ``owner`` goes on the reservation: the commit feed hands it the batch
    once committed; so does ``session``, a publish session's claim on the
    batch's batch_seq (see :meth:`~trio_embarcadero.log.CxlLog.get_cxl_buffer`).

    With ``slot`` (the direct path's receive slots), every attempt is made
    holding one of its tokens, and the token is given back for each backoff
    sleep: a full log is no reason to keep other connections from receiving.
    The reservation is returned with the token held; the caller releases it.

    With ``make_room``, a region with no free segment first gets the chance
    to reclaim what retention lets go (it returns the segments it freed);
    only when that frees nothing does the attempt back off.

    With ``space``, a batch that still finds no free segment after the
    backoff waits for a reclaim (see :class:`LogSpace`) and tries again, up
    to ``space.timeout`` in all, if retention could free one at all.

    ``on_wait`` is called before every wait (for a slot, a backoff, room).

    Raises:
        LogFullError: Still no space after ``backoff.retries`` retries (and,
            with ``space``, after the wait for room).
    """
    delays = backoff.delays()
    deadline: float | None = None  # of the wait for room, once it began
    # Checkpoint before, never after, a successful reservation: a cancellation
    # between reserving and using the space would strand it in the stream's
    # commit order.
    await trio.lowlevel.checkpoint_if_cancelled()
    while True:
        if slot is not None:
            await take_slot(slot, on_wait)
        try:
            return log.get_cxl_buffer(topic, header, owner, session)
        except LogFullError as exc:
            if slot is not None:
                slot.release()
            if not exc.transient and make_room is not None and make_room():
                continue  # retention freed segments: try again at once
            delay = next(delays, None)
            if delay is None:
                if not exc.transient and space is not None and space.may_wait():
                    if deadline is None:
                        deadline = trio.current_time() + space.timeout
                        space.waits += 1
                    if on_wait is not None:
                        on_wait()
                    if await space.wait(deadline):
                        continue
                    if trio.current_time() >= deadline:
                        space.timeouts += 1
                        counters.exhausted += 1
                        raise LogFullError(
                            f"{exc}; retention freed none within {space.timeout} s",
                            transient=False,
                        ) from None
                counters.exhausted += 1
                raise
        except BaseException:
            if slot is not None:
                slot.release()
            raise
        counters.retries += 1
        counters.backoff_seconds += delay
        if on_wait is not None:
            on_wait()
        await trio.sleep(delay)


class BatchOwner(CommitConsumer, Protocol):
    """What an allocator needs from the connection a batch came from."""

    @property
    def topic(self) -> str: ...

    @property
    def failed(self) -> bool: ...

    def batch_discarded(self, error: LogFullError | None, claim: Claim | None = None) -> None: ...


@attrs.define(eq=False)
class StagedBatch:
    """A whole, validated batch waiting in staging for log space.

    Attributes:
        owner: The connection that received it.
        header: Its batch header.
        buffer: The staging buffer holding the payload at its start.
        starts: Record offsets from ``scan_records``.
        after: Set when the same connection's previous batch is resolved.
        claim: A publish session's claim on its batch_seq (given up if the
            batch is discarded), or None.
        done: Set when this batch is resolved (committed or discarded).
    """

    owner: BatchOwner
    header: BatchHeader
    buffer: StagingBuffer
    starts: npt.NDArray[np.int64]
    after: trio.Event | None
    claim: Claim | None = None
    done: trio.Event = attrs.Factory(trio.Event)


async def place_batch(
    batch: StagedBatch,
    log: CxlLog,
    commits: CommitFeed,
    backoff: Backoff,
    counters: AllocationCounters,
    make_room: Callable[[], int] | None = None,
    space: LogSpace | None = None,
) -> None:
    """Move one staged batch into the log, or tell its owner why not.

    The staging buffer is released and ``done`` set whatever happens.
    """
    owner = batch.owner
    try:
        if batch.after is not None and not batch.after.is_set():
            await batch.after.wait()
        if owner.failed:
            # An earlier batch of this connection failed; committing this one
            # would reorder the connection's batches. Its owner already told
            # the client which messages were acked.
            _discard(log, batch, None)
            return
        try:
            reservation = await reserve(
                log,
                owner.topic,
                batch.header,
                backoff,
                counters,
                owner,
                make_room=make_room,
                space=space,
                session=batch.claim,
            )
        except LogFullError as exc:
            _discard(log, batch, exc)
            return
        total = batch.header.total_size
        commits.complete_copy(reservation, batch.buffer.array[:total], batch.starts)
    finally:
        batch.buffer.release()
        batch.done.set()


def _discard(log: CxlLog, batch: StagedBatch, error: LogFullError | None) -> None:
    """Tell ``batch``'s owner it will never be in the log (and give its claim up)."""
    if batch.claim is not None:
        log.sessions.release(batch.claim)
    batch.owner.batch_discarded(error, batch.claim)


#: Batches an allocator places at most in one pass through the scheduler.
_BURST = 8


async def run_allocator(
    batches: trio.MemoryReceiveChannel[StagedBatch],
    log: CxlLog,
    commits: CommitFeed,
    backoff: Backoff,
    counters: AllocationCounters,
    *,
    make_room: Callable[[], int] | None = None,
    space: LogSpace | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Place staged batches until the channel's send side is closed.

    Returns after the channel is drained, so closing the send side is the
    graceful way to stop allocators.
    """
    async with batches:
        task_status.started()
        while True:
            # One pass through the scheduler a batch: a batch waiting in the
            # channel is taken without a second (the receiving tasks, which
            # checkpoint once a batch, must not outrun the allocators). As
            # with receive(), a batch taken is never dropped by a cancel.
            try:
                batch = batches.receive_nowait()
            except trio.WouldBlock:
                try:
                    batch = await batches.receive()
                except trio.EndOfChannel:
                    return
            except trio.EndOfChannel:
                return
            else:
                await trio.lowlevel.cancel_shielded_checkpoint()
            await place_batch(batch, log, commits, backoff, counters, make_room, space)
            # More batches waiting are placed in the same pass, a few: each
            # receiving task hands over one a pass, and there are usually
            # more of them than allocators.
            for _ in range(_BURST - 1):
                try:
                    batch = batches.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                await place_batch(batch, log, commits, backoff, counters, make_room, space)
