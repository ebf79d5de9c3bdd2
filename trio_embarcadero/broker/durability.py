"""The disk writer task behind ack level 2.

The disk format and its bookkeeping are the log core's
(:class:`~trio_embarcadero.log.DiskLog`); this is the Trio side: one task
appends and ``fdatasync``s on a worker thread, so the event loop never
blocks on the disk, and one sync covers every batch committed since the last
(group commit): a sync happens ``storage.sync_interval_ms`` after the first
unsynced commit, or sooner once ``storage.sync_bytes`` are waiting.
Publishers with ack level 2 are told only after the sync.

A write or sync that fails stops the writer for good: after a failed
``fdatasync`` the file's state is unknown, so nothing more is promised. Every
batch still waiting, and every one committed later, is told the
:class:`~trio_embarcadero.errors.StorageError`, and the broker is told to
stop (``on_failure``).
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable

import attrs
import trio

from ..errors import StorageError
from ..log import DiskLog, DiskStatistics, Reservation
from ..log.disk import write_and_sync
from .statistics import LATENCY_BUCKETS, Histogram

logger = logging.getLogger(__name__)


#: Told once whether a batch is durable: None when it is, else why it never will be.
DurableCallback = Callable[[StorageError | None], None]


class Durability:
    """Runs a :class:`~trio_embarcadero.log.DiskLog`'s writer and its waiters.

    Args:
        disk: The opened (and reconciled) disk log.
        on_failure: Called once if the disk log fails, after every waiter
            was told.
        on_sync: Called after every sync that made batches durable (a full
            region may drop them now: see :func:`~.retention.make_room`).

    Attributes:
        failure: Why the disk log failed, or None while it works.
        sync_seconds: How long each write-and-sync round took.
    """

    def __init__(
        self,
        disk: DiskLog,
        on_failure: Callable[[StorageError], None] | None = None,
        *,
        on_sync: Callable[[], None] | None = None,
    ) -> None:
        self.disk = disk
        self._on_sync = on_sync
        self.failure: StorageError | None = None
        self.sync_seconds = Histogram(LATENCY_BUCKETS)
        self._on_failure = on_failure
        self._waiters: dict[str, deque[tuple[int, DurableCallback]]] = {}
        self._finishing = False
        self._wakeup = trio.lowlevel.ParkingLot()

    def committed(self, reservation: Reservation) -> None:
        """A batch was committed: it waits for the next sync."""
        self.disk.committed(reservation)
        self._wakeup.unpark_all()

    def when_durable(self, reservation: Reservation, callback: DurableCallback) -> None:
        """Call ``callback(None)`` once the committed ``reservation`` is synced
        to disk, or ``callback(error)`` once it is clear it never will be."""
        if reservation.batch_index < self.disk.durable_batches(reservation.stream):
            callback(None)
        elif self.failure is not None:
            callback(self.failure)
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
            if not jobs:
                # Only batches of order-5 topics wait, for their order: look
                # again after the interval (the order may come from another
                # process), or leave them to the region when draining.
                if self._finishing:
                    return
                continue
            started = trio.current_time()
            result = await trio.to_thread.run_sync(write_and_sync, jobs)
            took = trio.current_time() - started
            disk.jobs_done(result.done, result.written, took)
            self.sync_seconds.observe(took)
            for job in result.done:
                self._release(job.topic, job.upto, None)
            if result.done and self._on_sync is not None:
                self._on_sync()
            if result.failure is not None:
                self._fail(result.failure)
                return

    def _release(self, topic: str, upto: float, failure: StorageError | None) -> None:
        """Tell the waiters of ``topic``'s batches before ``upto``."""
        waiters = self._waiters.get(topic)
        while waiters and waiters[0][0] < upto:
            callback = waiters.popleft()[1]
            try:
                callback(failure)
            except Exception:  # one waiter's bug must not stop the disk writer
                logger.exception("internal error in an ack-2 waiter of %r", topic)

    def _fail(self, failure: StorageError) -> None:
        # The one line that says what broke; the broker's own lines follow.
        logger.error("%s; the broker stops", failure)
        self.failure = failure
        for topic in list(self._waiters):
            self._release(topic, math.inf, failure)
        if self._on_failure is not None:
            self._on_failure(failure)

    def statistics(self) -> DiskStatistics:
        """The disk log's counters; ``waiting_batches`` counts ack-2 batches
        waiting for a sync."""
        waiting = sum(len(w) for w in self._waiters.values())
        return attrs.evolve(self.disk.statistics(), waiting_batches=waiting)
