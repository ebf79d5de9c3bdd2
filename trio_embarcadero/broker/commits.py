"""The commit feed: where committed batches go after the log.

The log core's :meth:`~trio_embarcadero.log.CxlLog.complete` and
:meth:`~trio_embarcadero.log.CxlLog.abandon` return the batches they
committed. Everything in the broker that finishes or gives up a batch goes
through :class:`CommitFeed`, which hands each committed batch, in log order,
to its consumers:

1. the disk writer (counts it as waiting for the disk, with ``storage.dir``);
2. the batch's owner, the publish session that received it (its ack count,
   or at ack level 2 a wait for the disk); for an order-5 topic only once
   the batch has its place in the total order and this broker wrote its
   records' total orders (see :mod:`.ordering`);
3. subscribers of the topic, woken once per call.

A consumer that raises is logged and counted (``internal_errors``); the
others still get the batch and the allocator or session that committed it
goes on, because a bug in one consumer must not stop the log.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import Protocol, cast

import numpy as np
import numpy.typing as npt
import trio

from ..log import CxlLog, Reservation, Stream
from .ordering import OrderWaits

logger = logging.getLogger(__name__)


class CommitConsumer(Protocol):
    """What the feed tells a batch's owner."""

    def batch_committed(self, reservation: Reservation) -> None: ...


class OrderedConsumer(CommitConsumer, Protocol):
    """The owner of a batch of an order-5 topic, which may never be ordered."""

    def batch_stored(self, reservation: Reservation) -> None: ...

    def batch_never_ordered(self, reservation: Reservation) -> None: ...


class CommitFeed:
    """Commit or abandon reservations, then fan the committed batches out.

    Args:
        log: The broker's log.
        on_disk: Called with every committed batch first (the disk writer),
            or None without a disk log.
        order_waits: Where batches of order-5 topics wait for their order
            before their owner hears of them (None: owners hear at once).

    Attributes:
        committed_bytes: Payload bytes committed per stream since the broker
            started (the region keeps only what it retains); a topic made
            anew is a new stream.
        internal_errors: Consumers that raised.
    """

    def __init__(
        self,
        log: CxlLog,
        on_disk: Callable[[Reservation], None] | None = None,
        order_waits: OrderWaits | None = None,
    ) -> None:
        self._log = log
        self._on_disk = on_disk
        self._order_waits = order_waits
        self._waiters: dict[str, trio.lowlevel.ParkingLot] = {}
        self.committed_bytes: dict[Stream, int] = {}
        self.internal_errors = 0

    def complete(self, reservation: Reservation, starts: npt.NDArray[np.int64]) -> None:
        """The payload of ``reservation`` is in place: commit what can be."""
        self._fan_out(self._log.complete(reservation, starts))

    def complete_copy(
        self,
        reservation: Reservation,
        source: npt.NDArray[np.uint8],
        starts: npt.NDArray[np.int64],
    ) -> None:
        """Copy the payload of ``reservation`` in from ``source`` (which may be
        changed: see :meth:`CxlLog.complete_copy`) and commit what can be."""
        self._fan_out(self._log.complete_copy(reservation, source, starts))

    def abandon(self, reservation: Reservation) -> None:
        """Give ``reservation`` up; batches it held back may commit now."""
        self._fan_out(self._log.abandon(reservation))

    async def wait_commit(self, topic: str) -> None:
        """Return after this broker's next commit to ``topic``."""
        lot = self._waiters.get(topic)
        if lot is None:
            lot = self._waiters[topic] = trio.lowlevel.ParkingLot()
        try:
            await lot.park()
        finally:
            # Subscribers may name any topic: keep a lot only while it is used.
            if not lot and self._waiters.get(topic) is lot:
                del self._waiters[topic]

    async def wait_ordered(self) -> None:
        """Return once more may be ordered: at once after this process's
        sequencer ordered batches, else after ``cxl.sequencer_interval_ms``."""
        if self._order_waits is None:
            await trio.sleep(0.005)
        else:
            await self._order_waits.wait_ordered()

    def _fan_out(self, committed: list[Reservation]) -> None:
        if not committed:
            return
        for reservation in committed:
            stream = reservation.stream
            self.committed_bytes[stream] = (
                self.committed_bytes.get(stream, 0) + reservation.header.total_size
            )
            if self._on_disk is not None:
                self._guarded(self._on_disk, reservation)
            owner = reservation.owner
            waits = self._order_waits
            if waits is not None and waits.ordered_topic(reservation):
                # This broker stamps its records once the batch is ordered
                # (owner or not), then its owner hears; a batch the sequencer
                # skipped or went past is never ordered: its owner hears that.
                if owner is None:
                    waits.hold(reservation, None, None)
                else:
                    # The log keeps owners opaque; the broker only ever sets sessions.
                    consumer = cast(OrderedConsumer, owner)
                    self._guarded(consumer.batch_stored, reservation)
                    deliver, never = consumer.batch_committed, consumer.batch_never_ordered
                    waits.hold(
                        reservation,
                        partial(self._guarded, deliver),
                        partial(self._guarded, never),
                    )
            elif owner is not None:
                self._guarded(cast(CommitConsumer, owner).batch_committed, reservation)
        lot = self._waiters.get(committed[0].stream.topic)
        if lot is not None:
            lot.unpark_all()

    def _guarded(self, consumer: Callable[[Reservation], None], reservation: Reservation) -> None:
        try:
            consumer(reservation)
        except Exception:
            self.internal_errors += 1
            logger.exception(
                "internal error handing out batch %d of %r (consumer %r)",
                reservation.header.batch_seq,
                reservation.stream.topic,
                consumer,
            )
