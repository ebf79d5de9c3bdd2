"""The pool monitor and the pause/resume gate it drives.

Connection tasks pass through the gate at every batch boundary. While the
gate is closed they do not read their sockets beyond the next batch header (a
connection that was already waiting for one takes it when it comes; a header
holds no buffer), so the kernel's receive buffer fills and TCP flow control
slows the publisher down: backpressure without dropping anything. The
monitor closes the gate when the staging buffers queued for the log (whole
batches waiting for or held by an allocator) reach the high watermark and
opens it again only at the low watermark; the gap between the two keeps
connections from flapping on every single release.

Buffers still being filled do not count: they are bounded by the receive
limiter, and counting them would let clients that stall mid-payload hold
every healthy publisher at the gate until their batch timeouts.
"""

from __future__ import annotations

import logging
import math
from fractions import Fraction
from typing import NoReturn

import trio

from .staging import StagingPool

logger = logging.getLogger(__name__)


class PauseGate:
    """A gate connection tasks wait at while the broker is under pressure.

    ``trio.Event`` cannot be cleared, so the gate swaps in a fresh event on
    every pause.

    Attributes:
        pauses: How many times the gate closed.
        resumes: How many times it opened again.
    """

    def __init__(self) -> None:
        self._open = trio.Event()
        self._open.set()
        self._interruptible: set[trio.CancelScope] = set()
        self.pauses = 0
        self.resumes = 0

    @property
    def paused(self) -> bool:
        """Whether connection tasks are being held."""
        return not self._open.is_set()

    def pause(self) -> None:
        """Close the gate (idempotent)."""
        if not self.paused:
            self._open = trio.Event()
            self.pauses += 1
            for scope in self._interruptible:
                scope.cancel()

    def resume(self) -> None:
        """Open the gate and wake every held task (idempotent)."""
        if self.paused:
            self._open.set()
            self.resumes += 1

    async def wait_open(self) -> None:
        """Return once the gate is open (at once if it is)."""
        await self._open.wait()

    def scope_entered(self, scope: trio.CancelScope) -> None:
        """As a :class:`~.scopes.ScopeTracker`: the next :meth:`pause` cancels ``scope``.

        With ``idle_timeout_s`` set, connection tasks wait for the next batch
        header in a :class:`~.scopes.TrackedScope` the gate tracks: a pause
        stops their idle clock (it restarts at the resume), and a cancelled
        receive consumes no bytes. Without an idle clock the wait is not
        cut short: the header that ends it waits at the gate.
        """
        self._interruptible.add(scope)

    def scope_exited(self, scope: trio.CancelScope) -> None:
        """As a :class:`~.scopes.ScopeTracker`: forget ``scope``."""
        self._interruptible.discard(scope)


def watermark_counts(num_buffers: int, high: float, low: float) -> tuple[int, int]:
    """Buffer counts for the two watermark fractions.

    The high mark is at least 1 buffer and the low mark strictly below it, so
    tiny pools still get hysteresis.
    """
    # Exact decimal arithmetic: 0.07 * 100 is 7.000000000000001 in binary
    # floating point, and ceil() of that would pause one buffer late.
    high_count = max(1, math.ceil(Fraction(repr(high)) * num_buffers))
    low_count = min(math.floor(Fraction(repr(low)) * num_buffers), high_count - 1)
    return high_count, low_count


async def run_pool_monitor(
    pool: StagingPool,
    gate: PauseGate,
    *,
    high_watermark: float,
    low_watermark: float,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Pause connection tasks under staging pressure and resume them after.

    Sleeps until pool use crosses the watermark that matters next (no
    polling, and no wake-up per batch in between).

    Args:
        pool: The staging pool to watch.
        gate: The gate connection tasks wait at.
        high_watermark: Fraction of buffers queued for the log at which to pause.
        low_watermark: Fraction queued at or below which to resume.
        task_status: Started once the monitor watches the pool.
    """
    high, low = watermark_counts(pool.num_buffers, high_watermark, low_watermark)
    task_status.started()
    while True:
        if gate.paused:
            await pool.wait_queued_outside(low, pool.num_buffers + 1)
            gate.resume()
            logger.info(
                "staging pool: %d/%d queued for the log: resuming receivers",
                pool.queued,
                pool.num_buffers,
            )
        else:
            await pool.wait_queued_outside(-1, high)
            gate.pause()
            logger.info(
                "staging pool: %d/%d queued for the log: pausing receivers",
                pool.queued,
                pool.num_buffers,
            )
