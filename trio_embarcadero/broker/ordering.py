"""Order-5 topics on the broker: who runs the sequencer, and acks held for the order.

A batch of an order-5 topic is acked (level >= 1) only once it has its place
in the topic's total order. :class:`OrderWaits` holds such batches between
their commit and their order: the commit feed hands them over instead of
telling their publish session, and once the region says they are ordered
(the header's ``ordered`` word, which the sequencer writes after its commit
point) this broker writes their records' total orders
(:mod:`~trio_embarcadero.log.stamps`: the sequencer writes headers only, so
the per-record work is spread over the brokers that stored the batches),
then they go on to the session. Ordering within a stream follows
its commit order, so the oldest held batch of each stream is looked at
first, and past it only when it is a publish session's batch, which the
sequencer may order after later batches of its stream.

One broker of the region runs the sequencer (:mod:`~trio_embarcadero.log.sequencer`):
the one that holds the sequencer lease (:mod:`~trio_embarcadero.log.lease`).
:class:`SequencerRole` takes the lease when nobody holds it (the head, broker
0, takes a region's first lease at once; another broker leaves it one lease
period to come up first), renews it with every step and lets it go when the
broker stops. Every broker runs :func:`run_ordering`: while it holds the
lease it steps the sequencer whenever this process commits a batch of an
order-5 topic, and every ``cxl.sequencer_interval_ms`` for what other broker
processes commit; otherwise it looks at the lease ten times a lease period
(and takes the sequencer over when its holder is gone or stopped renewing).
Either way it releases the acks it can: a broker that does not order looks
for the order of its held batches on the same timer.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import NoReturn

import trio

from ..errors import SequencerDeposed
from ..log import CxlLog, Reservation, Stream
from ..log.layout import (
    BH_ORDERED,
    BH_SESSION,
    NEVER_ORDERED,
    TOPIC_LIVE,
    U32,
    read_topic_order,
    read_topic_state,
)
from ..log.lease import Grant, LeaseStatistics, SequencerLease
from ..log.reader import region_brokers
from ..log.sequencer import DEFAULT_STEP_BUDGET, OrderedBatch, Sequencer, SequencerStatistics
from ..log.stamps import is_stamped, stamp_batches

logger = logging.getLogger(__name__)

#: Called with a batch once it is ordered (its session's ``batch_committed``).
Deliver = Callable[[Reservation], None]


class _Held:
    """A committed batch of an order-5 topic waiting for its order: where it
    is, and who hears of it (nobody for one stored before this process)."""

    __slots__ = ("deliver", "header_offset", "never", "reservation")

    def __init__(
        self,
        header_offset: int,
        reservation: Reservation | None = None,
        deliver: Deliver | None = None,
        never: Deliver | None = None,
    ) -> None:
        self.header_offset = header_offset
        self.reservation = reservation
        self.deliver = deliver
        self.never = never


class OrderWaits:
    """Committed batches of order-5 topics waiting for their order.

    Once the sequencer has ordered such a batch, this broker (the one that
    stored it) writes its records' total orders
    (:func:`~trio_embarcadero.log.stamps.stamp_batches`), and only then
    hands it on to its owner (the ack). Every batch of this
    broker's order-5 streams passes here, also those its previous process
    stored and left unstamped (:meth:`adopt`).

    Args:
        log: The broker's log (the region the headers are read from).
    """

    def __init__(self, log: CxlLog, interval: float = 0.005) -> None:
        self._log = log
        # Per stream, its batches in commit order.
        self._held: dict[Stream, deque[_Held]] = {}
        self._count = 0
        self._ownerless = 0
        #: Batches held here that turned out never to be ordered.
        self.never_ordered = 0
        #: Batches whose records this broker stamped with their total orders.
        self.stamped = 0
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

    @property
    def unstamped(self) -> int:
        """Batches held here, acked or not, whose records wait for their total orders."""
        return self._count + self._ownerless

    def ordered_topic(self, reservation: Reservation) -> bool:
        """Whether ``reservation``'s topic has order 5 (fixed in the region)."""
        return reservation.stream.order == 5

    def hold(
        self, reservation: Reservation, deliver: Deliver | None, never: Deliver | None
    ) -> None:
        """Stamp the committed ``reservation``'s records once it is ordered,
        then call ``deliver(reservation)``; or call ``never(reservation)``
        once it is clear it never will be ordered (its header's ``ordered``
        word is 2: a publish session's batch whose batch_seq the sequencer
        skipped, or one it went past while in flight). Without ``deliver``
        (a batch nobody waits for) only its records are stamped."""
        item = _Held(reservation.header_offset, reservation, deliver, never)
        self._held.setdefault(reservation.stream, deque()).append(item)
        if deliver is None:
            self._ownerless += 1
        else:
            self._count += 1
        self.wakeup.unpark_all()

    def adopt(self) -> int:
        """Hold the batches of this broker's order-5 streams already in the
        region whose records are not stamped yet (its previous process
        stored them, maybe ordered, and died before it stamped them, or the
        disk log replayed them), so they are stamped once ordered; returns
        how many. Called once, before the broker serves."""
        log = self._log
        region, words = log.region, log.words
        adopted = 0
        for stream in log.streams():
            if read_topic_order(region, log.geometry, stream.topic_index) != 5:
                continue
            waiting = self._held.setdefault(stream, deque())
            for header in stream.index_header:
                ordered = int(words[(header + BH_ORDERED) // 8]) & 0xFFFFFFFF
                if ordered != NEVER_ORDERED and not is_stamped(region, header):
                    waiting.append(_Held(header))
                    adopted += 1
            if not waiting:
                del self._held[stream]
        self._ownerless += adopted
        return adopted

    def release(self) -> int:
        """Stamp every held batch that is ordered now and deliver it (or hand
        it to its ``never`` if it never will be); returns how many."""
        log = self._log
        region, words = log.region, log.words
        done: list[tuple[_Held, bool]] = []
        stamp: list[int] = []
        for stream in list(self._held):
            waiting = self._held[stream]
            state, incarnation = read_topic_state(region, log.geometry, stream.topic_index)
            if (state, incarnation) != (TOPIC_LIVE, stream.incarnation):
                # Deleted (its segments maybe reused): nothing left to stamp.
                self._forget(stream)
                continue
            while waiting:
                item = waiting[0]
                # Headers are 64-byte aligned: the "ordered" word is the low half of a u64.
                ordered = int(words[(item.header_offset + BH_ORDERED) // 8]) & 0xFFFFFFFF
                if not ordered:
                    if U32.unpack_from(region.data, item.header_offset + BH_SESSION)[0]:
                        # A session batch waiting for its predecessor: the
                        # sequencer orders the stream's later batches meanwhile.
                        self._release_past(waiting, done, stamp)
                    break
                waiting.popleft()
                self._settle(item, ordered, done, stamp)
            if not waiting:
                del self._held[stream]
        # Every record first, then the stamped words, then the acks: an ack
        # promises a batch whose records carry their total orders.
        stamp_batches(region, words, stamp)
        self.stamped += len(stamp)
        for item, never in done:
            if item.deliver is None:
                self._ownerless -= 1
                continue
            self._count -= 1
            callback = item.deliver
            if never:
                self.never_ordered += 1
                callback = item.never if item.never is not None else callback
            try:
                assert item.reservation is not None
                callback(item.reservation)
            except Exception:
                logger.exception("internal error acking an ordered batch")
        return len(done)

    def _settle(
        self, item: _Held, ordered: int, done: list[tuple[_Held, bool]], stamp: list[int]
    ) -> None:
        never = ordered == NEVER_ORDERED
        if not never and not is_stamped(self._log.region, item.header_offset):
            stamp.append(item.header_offset)
        done.append((item, never))

    def _release_past(
        self, waiting: deque[_Held], done: list[tuple[_Held, bool]], stamp: list[int]
    ) -> None:
        """Settle the ordered batches of a stream whose oldest held batch is
        a session batch the sequencer went past (see
        :mod:`~trio_embarcadero.log.sequencer`), keeping the others in their
        order. A batch behind one of its own connection that still waits is
        stamped but not handed on yet: a connection's acks keep its order."""
        words, region = self._log.words, self._log.region
        kept: list[_Held] = []
        owners: set[int] = set()  # connections with a batch kept
        for k, item in enumerate(waiting):
            ordered = int(words[(item.header_offset + BH_ORDERED) // 8]) & 0xFFFFFFFF
            owner = item.reservation.owner if item.reservation is not None else None
            if ordered and (owner is None or id(owner) not in owners):
                self._settle(item, ordered, done, stamp)
                continue
            if ordered == 1 and not is_stamped(region, item.header_offset):
                stamp.append(item.header_offset)
            kept.append(item)
            if owner is not None:
                owners.add(id(owner))
            if not ordered and not U32.unpack_from(region.data, item.header_offset + BH_SESSION)[0]:
                # The sequencer's walk stops at a plain batch not ordered:
                # nothing after it is ordered yet.
                kept += itertools.islice(waiting, k + 1, None)
                break
        waiting.clear()
        waiting.extend(kept)

    def _forget(self, stream: Stream) -> None:
        for item in self._held.pop(stream):
            if item.deliver is None:
                self._ownerless -= 1
            else:
                self._count -= 1


#: The longest the broker that orders waits between looks at a region with
#: no order-5 topic (another broker's new one is then ordered within this),
#: seconds; less when a quarter lease is less.
IDLE_PAUSE = 0.5
#: How often a broker that does not hold the lease looks at it, per lease period.
LEASE_CHECKS = 10
#: The host's monotonic clock in ns, which the lease's expiry is read on;
#: every process of a host shares it. (Tests on Trio's mock clock replace it.)
host_clock_ns: Callable[[], int] = time.monotonic_ns


class SequencerRole:
    """Whether this broker runs the region's sequencer, through the lease.

    Args:
        log: The broker's log.
        hole_timeout_s: ``cxl.sequencer_hole_timeout_s``.
        lease_s: ``cxl.sequencer_lease_s``.
        eligible: Whether the broker may take the sequencer over now (it
            listens and is not draining).
        clock: The host's monotonic clock, ns (default :data:`host_clock_ns`).
    """

    def __init__(
        self,
        log: CxlLog,
        *,
        hole_timeout_s: float,
        lease_s: float,
        eligible: Callable[[], bool],
        clock: Callable[[], int] | None = None,
    ) -> None:
        self._log = log
        self._hole_ns = int(hole_timeout_s * 1e9)
        self.lease_s = lease_s
        self.lease: SequencerLease = log.sequencer_lease(
            int(lease_s * 1e9),
            # Read at every call (no view of the region kept: it is unmapped at close).
            members=lambda: region_brokers(log.region, log.path, log.geometry.max_brokers),
            clock=clock if clock is not None else host_clock_ns,
        )
        self._eligible = eligible
        self._eligible_since: float | None = None
        self._next_check = -math.inf
        #: The sequencer while this broker holds the lease, else None.
        self.sequencer: Sequencer | None = None

    @property
    def check_interval(self) -> float:
        """Seconds between looks at the lease while another broker holds it."""
        return self.lease_s / LEASE_CHECKS

    @property
    def renew_interval(self) -> float:
        """The longest the holder goes without a step (each step renews the lease)."""
        return self.lease_s / 4

    def seconds_to_check(self, now: float) -> float:
        """Seconds from ``now`` (Trio's clock) to this broker's next look at the lease."""
        if not self._eligible():
            return self.check_interval
        return max(0.0, self._next_check - now)

    def take(self, now: float) -> Sequencer | None:
        """The sequencer, if this broker holds the lease, or takes it now.

        A broker that does not hold it looks at the lease at most every
        :attr:`check_interval` (``now`` is Trio's clock), and only while
        it is eligible.
        """
        if self.sequencer is not None:
            return self.sequencer
        if not self._eligible():
            self._eligible_since = None
            return None
        if self._eligible_since is None:
            self._eligible_since = now
        if now < self._next_check:
            return None
        self._next_check = now + self.check_interval
        # The head takes a region's first lease at once; the others leave it
        # a lease period to come up first, so the head orders as a rule.
        fresh = self._log.broker_id == 0 or now - self._eligible_since >= self.lease_s
        grant = self.lease.try_acquire(fresh=fresh)
        if grant is None:
            return None
        self._granted(grant)
        try:
            self.sequencer = self._log.sequencer(self._hole_ns, lease=self.lease)
        except SequencerDeposed as exc:  # taken over again before it began
            self._deposed(exc)
        return self.sequencer

    def _granted(self, grant: Grant) -> None:
        broker_id, epoch, previous = self._log.broker_id, grant.lease.epoch, grant.previous
        if previous.epoch == 0:
            logger.info("broker %d runs the sequencer (lease epoch %d)", broker_id, epoch)
            return
        # A handover after a graceful stop is routine; a dead or stopped
        # holder is worth an operator's look.
        logger.log(
            logging.INFO if previous.expiry_ns == 0 else logging.WARNING,
            "broker %d took the sequencer over at epoch %d: %s",
            broker_id,
            epoch,
            grant.reason,
        )

    def step(self, now_ns: int) -> Sequence[OrderedBatch]:
        """One sequencer step (the holder only); nothing once deposed.

        Args:
            now_ns: Trio's clock, ns (holes and lag are timed on it).
        """
        if self.sequencer is None:
            return []
        try:
            return self.sequencer.step(now_ns)
        except SequencerDeposed as exc:
            self._deposed(exc)
            return []

    def _deposed(self, exc: SequencerDeposed) -> None:
        logger.warning("%s; this broker stops ordering", exc)
        self._stop()

    def _stop(self) -> None:
        if self.sequencer is not None:
            self.sequencer.close()
            self.sequencer = None

    def close(self) -> None:
        """Stop ordering and release the lease, so another broker takes the
        sequencer over at once (idempotent)."""
        self._stop()
        epoch = self.lease.epoch
        if self.lease.release():
            logger.info(
                "broker %d released the sequencer lease (epoch %s)", self._log.broker_id, epoch
            )

    def statistics(self) -> tuple[LeaseStatistics, SequencerStatistics | None]:
        """Who holds the lease, and this broker's sequencer's counters if it orders."""
        sequencer = self.sequencer
        return self.lease.statistics(), sequencer.statistics() if sequencer is not None else None


async def run_ordering(
    waits: OrderWaits,
    role: SequencerRole,
    interval: float,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Order (while this broker holds the lease) and release held acks, until
    cancelled; then let go of the lease.

    Args:
        waits: The batches whose acks wait for their order.
        role: This broker's side of the sequencer lease.
        interval: How often to look at what other processes committed or
            ordered (``cxl.sequencer_interval_ms``), in seconds.
    """
    adopted = waits.adopt()
    if adopted:
        logger.info(
            "%d batch(es) of order-5 topics stored before this process get their records' "
            "total orders once ordered",
            adopted,
        )
    task_status.started()
    pause = interval
    try:
        while True:
            busy = False
            now = trio.current_time()
            sequencer = role.take(now)
            if sequencer is not None:
                ordered = role.step(int(now * 1e9))
                busy = len(ordered) >= DEFAULT_STEP_BUDGET
                if ordered:
                    waits.progress.unpark_all()
                # A region without order-5 topics gets looked at less and less
                # often (up to IDLE_PAUSE), not 200 times a second for nothing;
                # a commit of this process wakes the holder at once anyway.
                idle = not sequencer.statistics().topics
                pause = min(pause * 2, max(interval, IDLE_PAUSE)) if idle else interval
            waits.release()
            if busy:
                await trio.lowlevel.checkpoint()  # more waits: go on after others had a turn
                continue
            if role.sequencer is not None:
                # Each step renews the lease: a few steps a lease at least.
                with trio.move_on_after(min(pause, role.renew_interval)):
                    await waits.wakeup.park()
                continue
            wait = role.seconds_to_check(trio.current_time())
            with trio.move_on_after(min(wait, interval) if waits.held else wait):
                if waits.held:
                    await trio.sleep_forever()  # the holder's order, on the timer
                else:
                    await waits.wakeup.park()  # or a batch to hold
    finally:
        role.close()
