"""The sequencer lease: which broker process orders a region's order-5 topics.

One process at a time runs a region's sequencer (:mod:`.sequencer`). It holds
the role through a lease in the superblock's page (see :mod:`.layout`): an
epoch (one more at every grant), the holder's broker id and pid, an expiry
and when the epoch began, on the host's monotonic clock (``CLOCK_MONOTONIC``,
which every process of one host shares). The holder renews the expiry with
every step; it steps at least a few times a lease.

Fencing. The region's file lock serializes everything here: a grant, a
renewal, a release and every sequencer step are made under it. A process
holds the lease while the lease in the region is the one it wrote (epoch,
broker id, pid): it checks that under the lock before each step, and renews
the expiry in the same hold (:meth:`SequencerLease.fenced`, the lock the
sequencer is given). So a holder that was stopped (``SIGSTOP``) outside the
lock and deposed meanwhile finds a newer epoch when it resumes and writes
nothing; one stopped inside the lock keeps everybody else out until it
resumes, finishes its step and finds, at the next, that its epoch is stale.
The expiry only tells the others when they may take over; the holder writes
only under the lock, after the check, so two sequencers never write at once.

Taking over. A broker that does not hold the lease takes it (a new epoch)
when it was never held, when its holder released it (a graceful stop), when
it expired, or at once when the broker table says the holder's process is
gone (its broker id's lock is free, or held by another process: it was killed,
maybe restarted). It never waits for the region's lock to do so: a holder
stopped inside the lock would stop its event loop too.

Crash safety. A grant writes the holder, its pid, the time and the expiry,
then the epoch (one aligned 8-byte store: the commit point, so a reader sees
a new epoch with its holder); a renewal and a release write the expiry alone.
The grantor believes it holds the lease only once every store is made, and
its first stores (the holder's broker id and pid) already depose the
previous holder: whichever store a ``kill -9`` interrupts, nobody holds the
lease but, if the kill came before those, the previous holder, and the next
candidate finds the dead grantor gone. The sequencer itself resumes from the region alone,
wherever its predecessor stopped.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import attrs

from ..errors import SequencerDeposed
from .layout import LEASE_OFFSET, LEASE_RECORD, U32, U64
from .members import BrokerMember, MemberStatus

_EPOCH = LEASE_OFFSET
_HOLDER = LEASE_OFFSET + 8
_PID = LEASE_OFFSET + 12
_EXPIRY = LEASE_OFFSET + 16
_GRANTED = LEASE_OFFSET + 24
#: A reader retries a read that a renewal changed under it this many times.
_READ_TRIES = 100


@attrs.frozen
class LeaseRecord:
    """The lease as the region holds it.

    Attributes:
        epoch: 1 at the first grant, one more at each grant since; 0: never held.
        holder: The broker id of the holder (of the last one, once released).
        pid: Its process.
        expiry_ns: When it expires (host monotonic clock, ns); 0: released.
        granted_ns: When this epoch began (same clock).
    """

    epoch: int
    holder: int
    pid: int
    expiry_ns: int
    granted_ns: int

    def held(self, now_ns: int) -> bool:
        """Whether a holder's lease runs at ``now_ns`` (granted, not released
        nor expired)."""
        return self.epoch > 0 and self.expiry_ns > now_ns


def read_lease(buf: Any) -> LeaseRecord:
    """The lease as it stands, from any mapping of the region.

    Without the region's lock a grant may be half-written; its epoch, the
    commit point, is written last, so a new epoch comes with its holder.
    """
    fields = LEASE_RECORD.unpack_from(buf, LEASE_OFFSET)
    for _ in range(_READ_TRIES):
        again = LEASE_RECORD.unpack_from(buf, LEASE_OFFSET)
        if again == fields:
            break
        fields = again
    return LeaseRecord(*fields)


def holder_gone(record: LeaseRecord, members: Sequence[BrokerMember]) -> bool:
    """Whether the process that holds ``record`` is gone, by the broker table.

    Args:
        record: The lease.
        members: The region's brokers (:func:`~.reader.region_brokers`).

    Returns:
        True when its broker id is dead (its lock free, or without the lock
        file its heartbeat stale), served by another process (the holder was
        restarted), or unknown to the table; False while it may run (also
        when stopped: then the expiry decides).
    """
    for member in members:
        if member.broker_id == record.holder:
            if member.status is MemberStatus.DEAD:
                return True
            return member.pid is not None and member.pid != record.pid
    return True


@attrs.frozen
class Grant:
    """The lease, just granted to this process.

    Attributes:
        lease: The lease now.
        previous: The lease before.
        reason: Why it could be taken, in words.
    """

    lease: LeaseRecord
    previous: LeaseRecord
    reason: str


@attrs.frozen
class LeaseStatistics:
    """Who holds the sequencer lease, as a broker sees it.

    Attributes:
        epoch: The lease's epoch (0: never held).
        holder: The broker id holding it (past its expiry too, until another
            takes it over); None when it was never held or was released.
        holder_pid: That broker's process (None likewise).
        held: Whether this broker holds it.
        takeovers: Times this broker took the lease (a new epoch each).
        deposed: Times this broker found its epoch stale (someone had taken
            the lease over) and stopped ordering.
    """

    epoch: int
    holder: int | None
    holder_pid: int | None
    held: bool
    takeovers: int
    deposed: int


class SequencerLease:
    """One broker process's side of the sequencer lease.

    Args:
        buf: The region, mapped read-write.
        broker_id: This broker.
        lock: The region's file lock (a context manager; waits for it).
        try_lock: The same lock, raising :class:`BlockingIOError` rather
            than waiting while another process holds it.
        duration_ns: How long a grant or renewal lasts (``cxl.sequencer_lease_s``).
        members: The region's brokers now (who is alive).
        clock: The host's monotonic clock, ns (shared by its processes).
        pid: This process (default: its pid).
    """

    def __init__(
        self,
        buf: Any,
        broker_id: int,
        lock: Callable[[], contextlib.AbstractContextManager[object]],
        try_lock: Callable[[], contextlib.AbstractContextManager[object]],
        *,
        duration_ns: int,
        members: Callable[[], Sequence[BrokerMember]],
        clock: Callable[[], int] = time.monotonic_ns,
        pid: int | None = None,
    ) -> None:
        self._buf = buf
        self.broker_id = broker_id
        self._lock = lock
        self._try_lock = try_lock
        self.duration_ns = duration_ns
        self._members = members
        self.clock = clock
        self.pid = os.getpid() if pid is None else pid
        self._held: LeaseRecord | None = None
        self.grants = 0
        self.losses = 0

    @property
    def epoch(self) -> int | None:
        """The epoch this process believes it holds (None: none). Only a
        check under the lock (:meth:`fenced`) makes sure it is still so."""
        return self._held.epoch if self._held is not None else None

    def read(self) -> LeaseRecord:
        """The lease in the region now."""
        return read_lease(self._buf)

    def _mine(self, record: LeaseRecord) -> bool:
        held = self._held
        return held is not None and (record.epoch, record.holder, record.pid) == (
            held.epoch,
            held.holder,
            held.pid,
        )

    def _takeable(self, record: LeaseRecord, now_ns: int, fresh: bool) -> str | None:
        """Why ``record`` may be taken over at ``now_ns``; None: it may not."""
        if record.epoch == 0:
            return "the region had no sequencer yet" if fresh else None
        holder = f"broker {record.holder} (pid {record.pid})"
        if record.expiry_ns == 0:
            return f"{holder} released it"
        if record.expiry_ns <= now_ns:
            return f"{holder} stopped renewing it {(now_ns - record.expiry_ns) / 1e9:.3f} s ago"
        if holder_gone(record, self._members()):
            return f"{holder} is gone"
        return None

    def try_acquire(self, *, fresh: bool = True) -> Grant | None:
        """Take the lease, with a new epoch, if nobody holds it.

        Nobody holds it when it was never held (taken only with ``fresh``),
        was released, expired, or its holder's process is gone. Never waits
        for the region's lock: while another process holds it, this returns
        None and a later call tries again.

        Args:
            fresh: Whether a lease never held may be taken (a region's first
                sequencer).

        Returns:
            The grant, or None when the lease stays where it is (also when
            this process holds it already).
        """
        peek = read_lease(self._buf)
        if self._mine(peek):
            return None
        reason = self._takeable(peek, self.clock(), fresh)
        if reason is None:
            return None
        try:
            with self._try_lock():
                record = read_lease(self._buf)
                now = self.clock()
                if record != peek:  # changed meanwhile: judge it anew
                    reason = self._takeable(record, now, fresh)
                    if reason is None:
                        return None
                epoch = record.epoch + 1
                U32.pack_into(self._buf, _HOLDER, self.broker_id)
                U32.pack_into(self._buf, _PID, self.pid)
                U64.pack_into(self._buf, _GRANTED, now)
                U64.pack_into(self._buf, _EXPIRY, now + self.duration_ns)
                U64.pack_into(self._buf, _EPOCH, epoch)  # the commit point
        except BlockingIOError:
            return None
        self._held = LeaseRecord(epoch, self.broker_id, self.pid, now + self.duration_ns, now)
        self.grants += 1
        return Grant(self._held, record, reason)

    @contextlib.contextmanager
    def fenced(self) -> Iterator[None]:
        """The region's lock, entered only while this process holds the lease:
        the lock of every sequencer step. Renews the lease on entry.

        Raises:
            SequencerDeposed: The lease is not this process's (any more);
                nothing was written, and the lock is released.
        """
        with self._lock():
            record = read_lease(self._buf)
            if not self._mine(record):
                lost = self._held
                self._held = None
                if lost is None:
                    raise SequencerDeposed(f"broker {self.broker_id} does not hold the lease")
                self.losses += 1
                raise SequencerDeposed(
                    f"broker {self.broker_id}'s sequencer lease (epoch {lost.epoch}) is stale: "
                    f"broker {record.holder} (pid {record.pid}) took it over at epoch "
                    f"{record.epoch}"
                )
            U64.pack_into(self._buf, _EXPIRY, self.clock() + self.duration_ns)
            yield

    def renew(self) -> bool:
        """Renew the lease; False when this process no longer holds it."""
        try:
            with self.fenced():
                return True
        except SequencerDeposed:
            return False

    def release(self) -> bool:
        """Let go of the lease, so another broker takes it at once.

        Never waits for the region's lock: while another process holds it,
        the lease is left to expire.

        Returns:
            Whether this process held it and released it.
        """
        if self._held is None:
            return False
        try:
            with self._try_lock():
                mine = self._mine(read_lease(self._buf))
                if mine:
                    U64.pack_into(self._buf, _EXPIRY, 0)
        except BlockingIOError:
            mine = False
        self._held = None
        return mine

    def statistics(self) -> LeaseStatistics:
        """Who holds the lease now, and this broker's takeovers and losses."""
        record = read_lease(self._buf)
        # A lease past its expiry still names its holder until another
        # broker takes it over (it may renew it meanwhile).
        granted = record.epoch > 0 and record.expiry_ns > 0
        return LeaseStatistics(
            epoch=record.epoch,
            holder=record.holder if granted else None,
            holder_pid=record.pid if granted else None,
            held=granted and self._mine(record),
            takeovers=self.grants,
            deposed=self.losses,
        )


__all__ = [
    "Grant",
    "LeaseRecord",
    "LeaseStatistics",
    "SequencerLease",
    "holder_gone",
    "read_lease",
]
