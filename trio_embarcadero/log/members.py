"""Who serves a region: the broker table, heartbeats, and who is alive.

Several broker processes, each with its own broker id, can serve one
region. The region says who they are: its broker table (see
:mod:`.layout`) has an entry per broker id with the broker's state, pid,
the host and port it listens on, when it started, and a heartbeat it
renews every ``broker.heartbeat_interval_s``. A broker marks itself live
once it listens, draining when its graceful stop begins, and clears its
entry when it is done; there is no other membership service.

Only the process that holds a broker id's lock (:mod:`.ownership`) writes
that id's entry, so entries need no shared lock. Each write is bracketed
by a sequence word made odd before and even after (a seqlock): a reader in
another process retries while the word is odd or moved under it, so it
never takes half of one write and half of another.

Telling who is alive combines two sources:

* the lock (authoritative on this host): the kernel drops a broker id's
  lock when its process dies, whatever killed it, and a process holding it
  is running;
* the heartbeat, which also gives readers without access to the lock file
  (another user, another host of a shared region) liveness, and gives
  everyone the endpoint. An entry whose heartbeat is older than the timeout
  its broker wrote beside it is stale.

So a crashed broker's entry still says "live" but is read as dead: its lock
is free (or, without the lock file, its heartbeat stale). The heartbeat is
the host's monotonic clock, which every process of one host shares; a reader
on another host (real CXL) would have to compare heartbeat counts over time
instead.

The superblock page holds the sequencer's lease before the table
(:mod:`.lease`); the table is how a broker tells that the lease's holder
is gone.
"""

from __future__ import annotations

import enum
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from .layout import BROKER_TABLE_ENTRIES, MEMBER_ENTRY, MEMBER_HOST_BYTES, U32, member_offset

#: The states a broker writes into its entry.
ABSENT = 0
LIVE = 1
DRAINING = 2

#: A reader gives up waiting for a writer to finish after this many tries
#: (a writer killed half-way leaves the sequence odd until its successor).
_READ_TRIES = 1000


class MemberStatus(enum.Enum):
    """What a reader makes of a broker id, from its entry and its lock.

    Attributes:
        LIVE: It listens and beats.
        DRAINING: Its graceful stop has begun; it still beats.
        ATTACHED: A process holds the broker id but does not listen: it is
            starting (recovering its streams), or closing after its drain.
        UNRESPONSIVE: Its process holds the lock but has not beaten within
            its timeout (stopped, or its event loop blocked).
        DEAD: Its entry says it serves, but its process is gone (the lock
            is free) or, where the lock cannot be read, its heartbeat is stale.
    """

    LIVE = "live"
    DRAINING = "draining"
    ATTACHED = "attached"
    UNRESPONSIVE = "unresponsive"
    DEAD = "dead"


@attrs.frozen
class MemberRecord:
    """A broker table entry as written (see :mod:`.layout`).

    Attributes:
        state: ``ABSENT``, ``LIVE`` or ``DRAINING``.
        pid: The process that wrote it.
        port: The port it listens on.
        started_ns: When it started (ns since the epoch).
        heartbeat_ns: Its last heartbeat (ns of the host's monotonic clock).
        beats: Heartbeats so far.
        timeout_ms: After how long without a heartbeat it counts as stale.
        interval_ms: How often it beats.
        host: The address it listens on.
    """

    state: int
    pid: int
    port: int
    started_ns: int
    heartbeat_ns: int
    beats: int
    timeout_ms: int
    interval_ms: int
    host: str


def read_record(buf: Any, broker_id: int) -> MemberRecord:
    """Broker ``broker_id``'s entry, read whole (retried while it is written)."""
    offset = member_offset(broker_id)
    fields: tuple[Any, ...] = ()
    for _ in range(_READ_TRIES):
        (before,) = U32.unpack_from(buf, offset)
        fields = MEMBER_ENTRY.unpack_from(buf, offset)
        (after,) = U32.unpack_from(buf, offset)
        if before == after and not before & 1:
            break
    _, state, pid, port, started, beat, beats, timeout, interval, host = fields
    return MemberRecord(
        state,
        pid,
        port,
        started,
        beat,
        beats,
        timeout,
        interval,
        host.rstrip(b"\0").decode("utf-8", "replace"),
    )


class MemberEntry:
    """A broker's own entry of the broker table; it is the entry's only writer.

    Args:
        buf: The region, mapped read-write.
        broker_id: The broker (it holds the broker id's lock).
        clock: The heartbeat clock, in ns (the host's monotonic clock).
    """

    def __init__(
        self, buf: Any, broker_id: int, clock: Callable[[], int] = time.monotonic_ns
    ) -> None:
        self._buf: Any = buf
        self._offset = member_offset(broker_id)
        self.broker_id = broker_id
        self.clock = clock
        self._record: MemberRecord | None = None

    @property
    def record(self) -> MemberRecord | None:
        """What this writer last wrote (None: nothing, or cleared)."""
        return self._record

    def join(
        self,
        host: str,
        port: int,
        *,
        interval_s: float,
        timeout_s: float,
        pid: int | None = None,
        started_ns: int | None = None,
    ) -> None:
        """Mark the broker live at ``host:port`` (once it listens).

        Raises:
            ValueError: ``host`` takes more than 47 bytes of UTF-8.
        """
        raw = host.encode("utf-8")
        if len(raw) >= MEMBER_HOST_BYTES:
            raise ValueError(f"host {host!r} is longer than {MEMBER_HOST_BYTES - 1} bytes")
        self._write(
            MemberRecord(
                LIVE,
                os.getpid() if pid is None else pid,
                port,
                time.time_ns() if started_ns is None else started_ns,
                self.clock(),
                0,
                max(1, round(timeout_s * 1000)),
                max(1, round(interval_s * 1000)),
                host,
            )
        )

    def beat(self) -> None:
        """Renew the heartbeat (nothing before :meth:`join` or after :meth:`leave`)."""
        if self._record is not None:
            self._write(
                attrs.evolve(self._record, heartbeat_ns=self.clock(), beats=self._record.beats + 1)
            )

    def drain(self) -> None:
        """Say the broker's graceful stop has begun (it still beats)."""
        if self._record is not None:
            self._write(attrs.evolve(self._record, state=DRAINING, heartbeat_ns=self.clock()))

    def leave(self) -> None:
        """Clear the entry: the broker is gone (a graceful stop is over).

        The writer lets go of the region too (the region cannot be unmapped
        while a view of it is held), so it writes nothing more.
        """
        if self._buf is None:
            return
        self._write(MemberRecord(ABSENT, 0, 0, 0, 0, 0, 0, 0, ""))
        self._record = None
        self._buf = None

    def _write(self, record: MemberRecord) -> None:
        if self._buf is None:
            raise ValueError(f"broker {self.broker_id} has left the table: its entry is closed")
        (sequence,) = U32.unpack_from(self._buf, self._offset)
        sequence |= 1  # odd: being written (also after a writer killed half-way)
        U32.pack_into(self._buf, self._offset, sequence)
        MEMBER_ENTRY.pack_into(
            self._buf,
            self._offset,
            sequence,
            record.state,
            record.pid,
            record.port,
            record.started_ns,
            record.heartbeat_ns,
            record.beats,
            record.timeout_ms,
            record.interval_ms,
            record.host.encode("utf-8"),
        )
        U32.pack_into(self._buf, self._offset, (sequence + 1) & 0xFFFFFFFF)
        self._record = record if record.state != ABSENT else None


@attrs.frozen
class BrokerMember:
    """A broker that serves (or served) a region, as a reader sees it.

    Attributes:
        broker_id: Its id.
        status: What it is doing (see :class:`MemberStatus`).
        pid: Its process (the lock holder's when the entry is not its yet);
            None when unknown.
        host: The address it listens on ("" before it listens).
        port: Its port (0 before it listens).
        started_ns: When it started, in ns since the epoch (0: unknown).
        heartbeat_age_s: Seconds since its last heartbeat (None: no entry).
        beats: Heartbeats so far.
        timeout_s: Its heartbeat timeout.
    """

    broker_id: int
    status: MemberStatus
    pid: int | None
    host: str
    port: int
    started_ns: int
    heartbeat_age_s: float | None
    beats: int
    timeout_s: float

    @property
    def alive(self) -> bool:
        """Whether it serves clients now (live or draining)."""
        return self.status in (MemberStatus.LIVE, MemberStatus.DRAINING)

    @property
    def address(self) -> str:
        """``host:port`` (an IPv6 host in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def member_status(
    record: MemberRecord, holder: int | None, held: bool | None, now_ns: int
) -> MemberStatus | None:
    """What ``record`` means, given its broker id's lock.

    Args:
        record: The entry.
        holder: The pid holding the broker id's lock (None: unknown).
        held: Whether a process holds it; None when the lock file cannot be
            read (then the heartbeat alone decides).
        now_ns: The host's monotonic clock now.

    Returns:
        The status, or None for a broker id nobody serves or served.
    """
    listed = record.state != ABSENT
    fresh = listed and now_ns - record.heartbeat_ns <= record.timeout_ms * 1_000_000
    if held is None:  # no lock to ask: the heartbeat decides
        if not listed:
            return None
        return _listed(record) if fresh else MemberStatus.DEAD
    if not held:
        # The kernel dropped the lock: whatever the entry says, nobody is there.
        return MemberStatus.DEAD if listed else None
    if not listed or (holder is not None and record.pid != holder):
        return MemberStatus.ATTACHED  # the entry is a predecessor's, or none yet
    return _listed(record) if fresh else MemberStatus.UNRESPONSIVE


def _listed(record: MemberRecord) -> MemberStatus:
    return MemberStatus.DRAINING if record.state == DRAINING else MemberStatus.LIVE


def read_members(
    buf: Any,
    max_brokers: int,
    holders: Mapping[int, int | None] | None,
    now_ns: int | None = None,
) -> list[BrokerMember]:
    """Every broker id of the region that is served, or was left listed.

    Args:
        buf: The region (any mapping of it).
        max_brokers: The region's broker ids are ``0 .. max_brokers - 1``.
        holders: Broker id to the pid holding its lock (None: pid unknown),
            for every id whose lock is held; None when the lock file cannot
            be read.
        now_ns: The host's monotonic clock (default: now).

    Returns:
        The members by broker id; ids nobody serves and nobody left listed
        are left out.
    """
    now = time.monotonic_ns() if now_ns is None else now_ns
    found = []
    for broker_id in range(min(max_brokers, BROKER_TABLE_ENTRIES)):
        record = read_record(buf, broker_id)
        held = None if holders is None else broker_id in holders
        holder = None if holders is None else holders.get(broker_id)
        status = member_status(record, holder, held, now)
        if status is None:
            continue
        own = status is not MemberStatus.ATTACHED
        found.append(
            BrokerMember(
                broker_id,
                status,
                (record.pid if own else holder) or None,
                record.host if own else "",
                record.port if own else 0,
                record.started_ns if own else 0,
                (now - record.heartbeat_ns) / 1e9 if own and record.state != ABSENT else None,
                record.beats if own else 0,
                record.timeout_ms / 1000,
            )
        )
    return found


__all__ = [
    "ABSENT",
    "DRAINING",
    "LIVE",
    "BrokerMember",
    "MemberEntry",
    "MemberRecord",
    "MemberStatus",
    "member_status",
    "read_members",
    "read_record",
]
