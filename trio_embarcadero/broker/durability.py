"""The disk writer task behind ack level 2.

The disk format and its bookkeeping are the log core's
(:class:`~trio_embarcadero.log.DiskLog`); this is the Trio side: one task
appends and ``fdatasync``s on a worker thread, so the event loop never
blocks on the disk, and one sync covers every batch committed since the last
(group commit): a sync happens ``storage.sync_interval_ms`` after the first
unsynced commit, or sooner once ``storage.sync_bytes`` are waiting.
Publishers with ack level 2 are told only after the sync.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

import attrs
import trio

from ..log import DiskLog, DiskStatistics, Reservation
from ..log.disk import write_and_sync

logger = logging.getLogger(__name__)


class Durability:
    """Runs a :class:`~trio_embarcadero.log.DiskLog`'s writer and its waiters.

    Args:
        disk: The opened (and reconciled) disk log.
    """

    def __init__(self, disk: DiskLog) -> None:
        self.disk = disk
        self._waiters: dict[str, deque[tuple[int, Callable[[], None]]]] = {}
        self._finishing = False
        self._wakeup = trio.lowlevel.ParkingLot()

    def committed(self, reservation: Reservation) -> None:
        """A batch was committed: it waits for the next sync."""
        self.disk.committed(reservation)
        self._wakeup.unpark_all()

    def when_durable(self, reservation: Reservation, callback: Callable[[], None]) -> None:
        """Call ``callback`` once the committed ``reservation`` is synced to disk."""
        if reservation.batch_index < self.disk.durable_batches(reservation.stream):
            callback()
        else:
            waiters = self._waiters.setdefault(reservation.stream.topic, deque())
            waiters.append((reservation.batch_index, callback))

    def finish(self) -> None:
        """Let :meth:`run` return once everything committed is synced."""
        self._finishing = True
        self._wakeup.unpark_all()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Append and sync committed batches until :meth:`finish` and drained."""
        disk = self.disk
        task_status.started()
        while True:
            while disk.waiting_batches == 0:
                if self._finishing:
                    return
                await self._wakeup.park()
            # Group commit: gather for up to the sync interval, or until enough
            # bytes wait, so one fdatasync covers many batches.
            with trio.move_on_after(disk.sync_interval):
                while disk.waiting_bytes < disk.sync_bytes and not self._finishing:
                    await self._wakeup.park()
            jobs = disk.take_jobs()
            started = trio.current_time()
            written = await trio.to_thread.run_sync(write_and_sync, jobs)
            disk.jobs_done(jobs, written, trio.current_time() - started)
            for job in jobs:
                waiters = self._waiters.get(job.topic)
                while waiters and waiters[0][0] < job.upto:
                    callback = waiters.popleft()[1]
                    try:
                        callback()
                    except Exception:  # one waiter's bug must not stop the disk writer
                        logger.exception("internal error in an ack-2 waiter of %r", job.topic)

    def statistics(self) -> DiskStatistics:
        """The disk log's counters; ``waiting_batches`` counts ack-2 batches
        waiting for a sync."""
        waiting = sum(len(w) for w in self._waiters.values())
        return attrs.evolve(self.disk.statistics(), waiting_batches=waiting)
