"""Order-5 topics on the broker: the head's sequencer task and acks held for the order.

A batch of an order-5 topic is acked (level >= 1) only once it has its place
in the topic's total order. :class:`OrderWaits` holds such batches between
their commit and their order: the commit feed hands them over instead of
telling their publish session, and they go on to the session once the
region says they are ordered (the header's ``ordered`` word, which the
sequencer writes after its commit point). Ordering within a stream follows
its commit order, so only the oldest held batch of each stream is looked at.

Broker 0 (the head) runs the sequencer (:mod:`~trio_embarcadero.log.sequencer`):
:func:`run_ordering` steps it whenever this process commits a batch of an
order-5 topic, and every ``cxl.sequencer_interval_ms`` for what other broker
processes commit, then releases the acks it can. The other brokers run the
same task without a sequencer: it looks for the order of their held batches
on the same timer, and sleeps while none is held.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import NoReturn

import trio

from ..log import CxlLog, Reservation
from ..log.layout import BH_ORDERED, NEVER_ORDERED, read_topic_order
from ..log.sequencer import DEFAULT_STEP_BUDGET, Sequencer

logger = logging.getLogger(__name__)

#: Called with a batch once it is ordered (its session's ``batch_committed``).
Deliver = Callable[[Reservation], None]


class OrderWaits:
    """Committed batches of order-5 topics whose acks wait for their order.

    Args:
        log: The broker's log (the region the headers are read from).
    """

    def __init__(self, log: CxlLog, interval: float = 0.005) -> None:
        self._log = log
        self._held: dict[int, deque[tuple[Reservation, Deliver, Deliver | None]]] = {}
        self._count = 0
        #: How often the order is looked for (``cxl.sequencer_interval_ms``).
        self.interval = interval
        #: Unparked when a batch is held (the head's sequencer runs at once).
        self.wakeup = trio.lowlevel.ParkingLot()
        #: Unparked when this process ordered batches (the head's ordered readers).
        self.progress = trio.lowlevel.ParkingLot()

    async def wait_ordered(self) -> None:
        """Return once this process ordered batches, or after :attr:`interval`
        (another process may have: the head, when this is not it)."""
        with trio.move_on_after(self.interval):
            await self.progress.park()

    @property
    def held(self) -> int:
        """Batches whose acks wait for their order."""
        return self._count

    def ordered_topic(self, reservation: Reservation) -> bool:
        """Whether ``reservation``'s topic has order 5 (fixed in the region)."""
        stream = reservation.stream
        return read_topic_order(self._log.region, self._log.geometry, stream.topic_index) == 5

    def hold(
        self, reservation: Reservation, deliver: Deliver, skipped: Deliver | None = None
    ) -> None:
        """Call ``deliver(reservation)`` once the committed ``reservation`` is
        ordered, or ``skipped(reservation)`` once it is clear it never will be
        (a publish session's batch whose batch_seq the sequencer skipped)."""
        key = id(reservation.stream)
        self._held.setdefault(key, deque()).append((reservation, deliver, skipped))
        self._count += 1
        self.wakeup.unpark_all()

    def release(self) -> int:
        """Deliver every held batch that is ordered now; returns how many."""
        done = 0
        # Headers are 64-byte aligned: the "ordered" word is the low half of a u64.
        words = self._log.words
        for key in list(self._held):
            waiting = self._held[key]
            while waiting:
                reservation, deliver, skipped = waiting[0]
                ordered = int(words[(reservation.header_offset + BH_ORDERED) // 8]) & 0xFFFFFFFF
                if not ordered:
                    break
                waiting.popleft()
                self._count -= 1
                done += 1
                if ordered == NEVER_ORDERED and skipped is not None:
                    deliver = skipped
                try:
                    deliver(reservation)
                except Exception:
                    logger.exception("internal error acking an ordered batch")
            if not waiting:
                del self._held[key]
        return done


#: The longest the head waits between looks at a region with no order-5
#: topic (another broker's new one is then ordered within this), seconds.
IDLE_PAUSE = 0.5


async def run_ordering(
    waits: OrderWaits,
    sequencer: Sequencer | None,
    interval: float,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Order (with a sequencer: the head) and release held acks, until cancelled.

    Args:
        waits: The batches whose acks wait for their order.
        sequencer: The region's sequencer on the head broker; None elsewhere.
        interval: How often to look at what other processes committed or
            ordered (``cxl.sequencer_interval_ms``), in seconds.
    """
    task_status.started()
    pause = interval
    while True:
        busy = False
        if sequencer is not None:
            ordered = sequencer.step(int(trio.current_time() * 1e9))
            busy = len(ordered) >= DEFAULT_STEP_BUDGET
            if ordered:
                waits.progress.unpark_all()
            # A region without order-5 topics gets looked at less and less
            # often (up to IDLE_PAUSE), not 200 times a second for nothing;
            # a commit of this process wakes the head at once anyway.
            idle = not sequencer.statistics().topics
            pause = min(pause * 2, max(interval, IDLE_PAUSE)) if idle else interval
        waits.release()
        if busy:
            await trio.lowlevel.checkpoint()  # more waits: go on after others had a turn
            continue
        if sequencer is None and not waits.held:
            await waits.wakeup.park()  # nothing to look for until a batch is held
        with trio.move_on_after(pause):
            if sequencer is not None:
                await waits.wakeup.park()
            else:
                await trio.sleep_forever()
