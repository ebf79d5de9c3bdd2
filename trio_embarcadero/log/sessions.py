"""Publish sessions in the region: the session table behind ``client_req = 2``.

A publish session is a (client id, topic) pair that numbers its batches
``batch_seq`` 0, 1, 2, ... across every connection and broker of a region
(the wire protocol, section 4.5). Its entry in the region's session table
says which of its batch_seqs are stored, so that a batch sent again, to any
broker, is stored once. Nothing here knows Trio or sockets; the broker
(:mod:`trio_embarcadero.broker.sessions`) calls it around its publish path,
and the sequencer (:mod:`.sequencer`) asks it which session batch is next.

**Where it lives.** The table is a chain of segments taken from the region's
segment map for ``SESSION_OWNER``, each of at least 64 KiB; the superblock
names the first (:data:`~.layout.SESSION_TABLE_OFFSET`), each segment header
the next. From +64 a segment holds entries of 2 KiB; entry ``k`` of the
table is entry ``k % per_segment`` of the segment at chain position
``k // per_segment``. An entry::

     0 state (u32: 0 free, 1 live)        4 client id (u32)
     8 topic slot (u32)                  12 (zero)
    16 topic incarnation (u64)           24 token (u64)
    32 base (u64): every batch_seq below it is stored or skipped
    40 ordered next (u64): on an order-5 topic, every batch_seq below it is
       ordered or skipped (written by the sequencer alone)
    48 last active (u64, ns of the host's monotonic clock)
    56 ring start (u64): the batch_seq of the ring's first place
    64 the ring, 512 B: the state of batch_seq s at 64 + s % 512, for
       ring start <= s < ring start + 512 (= base - 256 .. base + 256 once
       the ring has moved with the base): bits 0-4 the broker that stored
       it, 0x20 stored, 0x40 skipped (never ordered), 0x80 durable (synced
       to the disk log of the broker that stored it)
   576 92 claims of 16 B: batch_seq (u64), then a word (u64): bits 0-47
       where the claimant reserved the batch (its header's offset; 0 not
       yet), bits 48-55 the claimant's broker id + 1 (0: a free claim)

**Claims.** A broker that receives a batch_seq nobody stored or claimed
takes a claim on it, records where it reserved the batch in the log before
it commits it, and, once committed, marks it stored and frees the claim. A
second copy that meets a claim waits while the claimant is alive; the claim
of a broker whose id no live process holds (its lock in ``<cxl.path>.lock``,
see :mod:`.ownership`) is void: the batch is stored if the header at the
recorded place is the claimant's committed batch (its commit came before it
died), otherwise never. A broker that starts again settles its old claims
itself before it serves.

**Locks.** Every change of an entry is made under the session lock, an OFD
lock on the byte ``SESSION_LOCK_OFFSET`` of the region's lock file. A change
of an entry's key (made, taken over or let go) and the growth of the table
are made under the region's file lock too, taken first: the sequencer, which
holds the region's lock for its whole step, reads keys without the session
lock, and takes it (second) only to mark batch_seqs skipped. Nothing takes
the region's lock while it holds the session lock, so the two never deadlock.

**Crash safety** (every store is one aligned word or byte; a ``kill -9``
between any two leaves a table the next reader repairs or reads as it is):

* an entry is made by writing its fields with state 0, then state 1 (the
  commit point); one let go by state 0 first;
* a claim: its batch_seq, then its word (the commit point); where it was
  reserved: one store of the word, before the batch commits in the log;
* a batch stored: its ring byte (the commit point), then the claim freed (a
  claim whose batch_seq is stored is stale and freed by the next reader);
* the base moves: the new base, then the ring's places of the batch_seqs
  that left it cleared, then the ring start: a reader that finds the ring
  start behind the base clears those places again before it reads any.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import struct
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import attrs
import numpy as np
import numpy.typing as npt

from ..wire import BATCH_HEADER, BH_BATCH_COMPLETE
from .layout import (
    BATCH_COMMITTED,
    BH_SESSION,
    BH_SESSION_TOKEN,
    NEXT_GENERATION_OFFSET,
    NO_SEGMENT,
    NO_TOPIC,
    SEGMENT_HEADER,
    SEGMENT_HEADER_SIZE,
    SEGMENT_MAGIC,
    SEGMENT_NEXT_OFFSET,
    SESSION_OWNER,
    SESSION_TABLE_OFFSET,
    TOPIC_INCARNATION_OFFSET,
    TOPIC_LIVE,
    TOPIC_STATE_OFFSET,
    Geometry,
    read_segment_header,
)
from .ownership import SESSION_LOCK_OFFSET, RangeLock, slot_held
from .segments import SegmentMap, order_for

logger = logging.getLogger(__name__)

#: Batches a session may have unacked; a broker accepts batch_seqs from
#: ``base - WINDOW`` to ``base + WINDOW - 1`` (wire protocol, section 4.5).
WINDOW = 256
RING = 2 * WINDOW
CLAIMS = 92
ENTRY_SIZE = 2048
#: A table segment is at least this big (one allocation unit if larger).
SEGMENT_BYTES = 64 * 1024

FREE = 0
LIVE = 1
#: A ring byte: the broker that stored the batch, and what is known of it.
WRITER = 0x1F
STORED = 0x20
SKIPPED = 0x40
DURABLE = 0x80
SETTLED = STORED | SKIPPED
_OFFSET_BITS = 48
_OFFSET_MASK = (1 << _OFFSET_BITS) - 1

# Every store goes through these (a test stands a crash in for any of them).
U8 = struct.Struct("<B")
U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")
#: state, client id, topic slot, (zero), incarnation, token, base, ordered
#: next, last active, ring start.
HEAD = struct.Struct("<IIIIQQQQQQ")
_RING_AT = HEAD.size
_CLAIMS_AT = _RING_AT + RING
#: Where the fields are in an entry.
E_STATE, E_TOKEN, E_BASE, E_ORDERED, E_ACTIVE, E_RING_START = 0, 24, 32, 40, 48, 56
assert _CLAIMS_AT + 16 * CLAIMS == ENTRY_SIZE

_ENTRY = np.dtype(
    [
        ("state", "<u4"), ("client", "<u4"), ("topic", "<u4"), ("zero", "<u4"),
        ("incarnation", "<u8"), ("token", "<u8"), ("base", "<u8"), ("ordered", "<u8"),
        ("active", "<u8"), ("ring_start", "<u8"), ("ring", "u1", (RING,)),
        ("claims", "<u8", (CLAIMS, 2)),
    ]
)  # fmt: skip
assert _ENTRY.itemsize == ENTRY_SIZE

#: A batch header's batch_seq and client id (at 0).
_SEQ_CLIENT = struct.Struct("<QI")
#: An entry's claims, read at once.
_CLAIM_TABLE = struct.Struct(f"<{2 * CLAIMS}Q")


class Verdict(enum.Enum):
    """What a session makes of a batch_seq that arrives (see :meth:`SessionTable.admit`)."""

    #: Nobody stored or claims it: the caller holds the claim now.
    NEW = "new"
    #: Stored already (by :attr:`Admission.writer`): acked, not stored again.
    DUPLICATE = "duplicate"
    #: A live broker (:attr:`Admission.writer`) is writing it: ask again later.
    BUSY = "busy"
    #: The session belongs to a client with another token.
    COLLISION = "collision"
    #: Outside the session's window.
    OUTSIDE = "outside"
    #: The sequencer skipped it: it is never ordered.
    SKIPPED = "skipped"
    #: No room in the region for a new session.
    FULL = "full"


@attrs.frozen
class SessionKey:
    """Which session a publish connection is in.

    Attributes:
        client_id: The client id of its handshake.
        topic: The topic's name (for messages).
        topic_index: The topic's slot in the topic table.
        incarnation: The topic's incarnation in that slot.
        token: The session token of its handshake.
    """

    client_id: int
    topic: str
    topic_index: int
    incarnation: int
    token: int


@attrs.frozen
class Claim:
    """A claim on one batch_seq, held from its arrival until it is stored or given up.

    Attributes:
        entry: The session's entry in the table.
        record: The claim's place in the entry.
        seq: The batch_seq.
        token: The session's token.
    """

    entry: int
    record: int
    seq: int
    token: int

    @property
    def word(self) -> int:
        """What a session batch's header holds at ``BH_SESSION``: 1 + its entry."""
        return self.entry + 1


@attrs.frozen
class Admission:
    """What :meth:`SessionTable.admit` made of a batch_seq.

    Attributes:
        verdict: What to do with the batch.
        entry: The session's entry (-1 without one).
        claim: The claim taken (``NEW``).
        writer: The broker that stored it (``DUPLICATE``) or claims it (``BUSY``);
            -1 for none.
        reason: For the refusals, what the client is told.
    """

    verdict: Verdict
    entry: int = -1
    claim: Claim | None = None
    writer: int = -1
    reason: str = ""


@attrs.frozen
class SeqState:
    """What the table knows of one batch_seq of a session (for a duplicate's ack).

    Attributes:
        known: The session and the batch_seq are still in the table.
        stored: A broker stored it.
        skipped: The sequencer skipped it: it is never ordered.
        durable: The broker that stored it synced it to its disk log.
        ordered: It has its total order (order-5 topics).
        writer: The broker that stored it (-1: none).
    """

    known: bool
    stored: bool = False
    skipped: bool = False
    durable: bool = False
    ordered: bool = False
    writer: int = -1


class Placement(enum.Enum):
    """What the sequencer does with a session batch it comes to."""

    #: Order it now (its predecessors are ordered or skipped, or it is no
    #: session batch of a session still in the table).
    ORDER = "order"
    #: Wait: a batch_seq before it is not ordered yet.
    HOLD = "hold"
    #: Never order it: its batch_seq was skipped or is ordered already.
    NEVER = "never"


class SessionTable:
    """One broker's handle on the region's session table.

    Args:
        buf: The region, mapped read-write.
        geometry: Its geometry.
        segment_map: Its segment map (the table's segments come from it).
        region_lock: Returns the region's file lock (a context manager).
        lock_path: The region's lock file (``<cxl.path>.lock``), which the
            broker's own lock made (see :mod:`.ownership`).
        broker_id: This broker's id.
        timeout_ns: How long a session is kept without activity
            (``cxl.session_timeout_s``).
        clock: The host's monotonic clock in ns (shared by every process).
    """

    def __init__(
        self,
        buf: Any,
        geometry: Geometry,
        segment_map: SegmentMap,
        region_lock: Callable[[], contextlib.AbstractContextManager[object]],
        lock_path: str,
        broker_id: int,
        *,
        timeout_ns: int,
        clock: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self._buf = buf
        self._g = geometry
        self._map = segment_map
        self._region_lock = region_lock
        # Made (with the region's mode) and checked when the broker took its lock.
        self._fd = os.open(lock_path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        self._lock = RangeLock(self._fd, SESSION_LOCK_OFFSET)
        self.broker_id = broker_id
        self.timeout_ns = timeout_ns
        self.clock = clock
        # Units of the table's segments in chain order, as last read (the
        # chain only grows, under the region's lock).
        self._units: list[int] = []
        self._offsets: dict[int, int] = {}
        self._where: dict[tuple[int, int, int], int] = {}
        order = order_for(-(-SEGMENT_BYTES // geometry.unit_size))
        self._order = min(order, geometry.max_order)
        self.per_segment = (geometry.segment_bytes(self._order) - SEGMENT_HEADER_SIZE) // ENTRY_SIZE

    def close(self) -> None:
        """Let go of the lock file (and of the region, for the mapping's close)."""
        os.close(self._fd)
        del self._map

    # -- where things are -------------------------------------------------------------

    def _chain(self) -> list[int]:
        """The table's segments, reading the chain on from what is known."""
        units = self._units
        if units:
            (link,) = U32.unpack_from(self._buf, self._g.segment_offset(units[-1]) + 16)
        else:
            (head,) = U32.unpack_from(self._buf, SESSION_TABLE_OFFSET)
            link = head - 1 if head else NO_SEGMENT
        while link != NO_SEGMENT and link < self._g.num_units:
            found = read_segment_header(self._buf, self._g, link)
            if found is None or (found.topic, found.broker_id) != (NO_TOPIC, SESSION_OWNER):
                break
            units.append(link)
            link = found.next_segment
        return units

    def entry_offset(self, entry: int) -> int | None:
        """Where entry ``entry`` is, or None if the table has no such entry."""
        found = self._offsets.get(entry)
        if found is not None:
            return found
        position, i = divmod(entry, self.per_segment) if self.per_segment else (0, -1)
        units = self._units if position < len(self._units) else self._chain()
        if i < 0 or position >= len(units):
            return None
        base = self._g.segment_offset(units[position]) + SEGMENT_HEADER_SIZE
        # An entry never moves (the table's segments are never let go).
        found = self._offsets[entry] = base + i * ENTRY_SIZE
        return found

    def _segments(self) -> Iterator[tuple[int, npt.NDArray[Any]]]:
        """Each table segment's first entry index and its entries (numpy views)."""
        for position, unit in enumerate(self._chain()):
            base = self._g.segment_offset(unit) + SEGMENT_HEADER_SIZE
            yield (
                position * self.per_segment,
                np.frombuffer(self._buf, dtype=_ENTRY, count=self.per_segment, offset=base),
            )

    @property
    def entries(self) -> int:
        """Entries the table has room for now (it grows as sessions begin)."""
        return len(self._chain()) * self.per_segment

    def live_sessions(self) -> int:
        """Entries of live sessions (expired ones included until taken over)."""
        return sum(int(np.count_nonzero(e["state"] == LIVE)) for _, e in self._segments())

    # -- the publish side ---------------------------------------------------------------

    def holder(self, key: SessionKey) -> int | None:
        """The token of the client that holds ``key``'s session now, or None
        when no live session has that key (a handshake's check: two clients
        that drew one client id)."""
        with self._lock:
            found = self._find(key)
            if found is None or self._expired(found[1], self.clock()):
                return None
            (token,) = U64.unpack_from(self._buf, found[1] + E_TOKEN)
            return int(token)

    def entry_of(self, key: SessionKey) -> int | None:
        """``key``'s entry, if its session is live and has ``key``'s token."""
        with self._lock:
            found = self._find(key)
            if found is None or not self._holds(found[1], key.token):
                return None
            return None if self._expired(found[1], self.clock()) else found[0]

    def admit(self, key: SessionKey, seq: int) -> Admission:
        """Look batch_seq ``seq`` of ``key``'s session up, and claim it if it is new.

        A session met for the first time is made here (its first batch).

        Returns:
            The verdict; with ``NEW`` the caller holds :attr:`Admission.claim`
            and must :meth:`locate` it before committing the batch, then
            :meth:`settle` it, or :meth:`release` it if the batch is given up.
        """
        now = self.clock()
        with self._lock:
            found = self._find(key)
            if found is not None and not self._expired(found[1], now):
                return self._admit(found[0], found[1], key, seq, now)
        # A new session (or one that was forgotten): its key is written
        # under the region's lock too, taken first (see the module docstring).
        with self._region_lock(), self._lock:
            found = self._find(key)
            if found is None or self._expired(found[1], now):
                made = self._make(key, now, found[0] if found is not None else None)
                if made is None:
                    return Admission(
                        Verdict.FULL,
                        reason=f"no room in the region for a new publish session "
                        f"(client {key.client_id}, topic {key.topic!r}); its "
                        f"{self.entries} entries are in use",
                    )
                found = made
            return self._admit(found[0], found[1], key, seq, now)

    def locate(self, claim: Claim, header_offset: int) -> bool:
        """Record where the claimed batch is reserved, before it commits;
        False if the claim is gone (the batch_seq was skipped long ago)."""
        with self._lock:
            off = self._claim_offset(claim)
            if off is None:
                return False
            U64.pack_into(self._buf, off + 8, self._claim_word(header_offset))
            return True

    def settle(self, claims: Iterable[Claim]) -> None:
        """The claimed batches are committed in the log: mark them stored by
        this broker and free their claims."""
        now = self.clock()
        with self._lock:
            moved: dict[int, int] = {}
            for claim in claims:
                off = self._claim_offset(claim)
                entry = self.entry_offset(claim.entry)
                if entry is None or off is None:
                    continue
                self._mark(entry, claim.seq, STORED | self.broker_id)
                U64.pack_into(self._buf, off + 8, 0)
                moved[claim.entry] = entry
            for entry in moved.values():
                U64.pack_into(self._buf, entry + E_ACTIVE, now)
                self._advance(entry)

    def release(self, claim: Claim) -> None:
        """Give a claim up: its batch will never be committed."""
        with self._lock:
            off = self._claim_offset(claim)
            if off is not None:
                U64.pack_into(self._buf, off + 8, 0)

    def state(self, entry: int, token: int, seq: int) -> SeqState:
        """What is known of batch_seq ``seq`` of the session in ``entry``."""
        with self._lock:
            off = self.entry_offset(entry)
            if off is None or not self._holds(off, token):
                return SeqState(known=False)
            self._normalize(off)
            byte = self._ring_byte(off, seq)
            if byte is None:
                return SeqState(known=False)
            (ordered_next,) = U64.unpack_from(self._buf, off + E_ORDERED)
            stored, skipped = bool(byte & STORED), bool(byte & SKIPPED)
            return SeqState(
                known=True,
                stored=stored,
                skipped=skipped,
                durable=bool(byte & DURABLE),
                ordered=stored and not skipped and seq < ordered_next,
                writer=byte & WRITER if stored else -1,
            )

    def mark_durable(self, batches: Iterable[tuple[int, int, int]]) -> None:
        """Batches this broker stored are synced to its disk log: ``(entry,
        token, seq)`` of each."""
        with self._lock:
            for entry, token, seq in batches:
                off = self.entry_offset(entry)
                if off is None or not self._holds(off, token):
                    continue
                byte = self._ring_byte(off, seq)
                if byte is not None and byte & STORED and byte & WRITER == self.broker_id:
                    self._mark(off, seq, DURABLE)

    def not_durable(self) -> list[tuple[int, int, int]]:
        """``(entry, token, seq)`` of every batch the ring says this broker
        stored and has not marked durable: at start-up, what its previous
        process committed (and maybe synced) before it died; the broker marks
        them once its disk log has synced its start-up backlog."""
        found = []
        with self._lock:
            for first, entries in self._segments():
                for i in np.flatnonzero(entries["state"] == LIVE).tolist():
                    entry = entries[i]
                    ring = entry["ring"]
                    mine = np.flatnonzero(
                        (ring & (STORED | WRITER | DURABLE)) == (STORED | self.broker_id)
                    )
                    start = int(entry["ring_start"])
                    token = int(entry["token"])
                    for place in mine.tolist():
                        # The batch_seq whose place this is, in the ring's span.
                        seq = start + (place - start) % RING
                        found.append((first + i, token, seq))
        return found

    def touch(self, sessions: Iterable[tuple[int, int]]) -> None:
        """The sessions ``(entry, token)`` have a connection open here: active now."""
        now = self.clock()
        with self._lock:
            for entry, token in sessions:
                off = self.entry_offset(entry)
                if off is not None and self._holds(off, token):
                    U64.pack_into(self._buf, off + E_ACTIVE, now)

    def recover(self) -> int:
        """At start-up, before this broker serves: give back table segments
        no chain reaches (a growth cut short) and settle this broker id's
        claims, left by its previous process. Returns the claims settled."""
        settled = 0
        with self._region_lock(), self._lock:
            freed = self._map.recover(SESSION_OWNER, self._chain())
            if freed:
                logger.info("sessions: freed %d table segment(s) no chain held", len(freed))
            for first, entries in self._segments():
                for i in np.flatnonzero(entries["state"] == LIVE).tolist():
                    off = self.entry_offset(first + i)
                    assert off is not None
                    for record in self._claims_of(entries[i], self.broker_id):
                        self._resolve(off, first + i, record)
                        settled += 1
        return settled

    # -- the sequencer's side (it holds the region's lock) ------------------------------

    def placement(self, header_offset: int, run: Mapping[int, int] | None = None) -> Placement:
        """Whether the sequencer orders the batch at ``header_offset`` now.

        A batch that is not a session's (or whose session is gone from the
        table) is ordered; a session's batch once every batch_seq before it
        is ordered or skipped.

        Args:
            header_offset: The batch's header.
            run: The run the sequencer is writing (ordered, its commit point
                not stored yet), as :meth:`add_to_run` fills it: those
                batches count as ordered.
        """
        found = self._session_of(header_offset)
        if found is None:
            return Placement.ORDER
        off, seq = found
        (ordered_next,) = U64.unpack_from(self._buf, off + E_ORDERED)
        byte = self._ring_byte(off, seq)
        if seq < ordered_next or (byte is not None and byte & SKIPPED):
            return Placement.NEVER
        if run:
            ordered_next = max(ordered_next, run.get(off, 0))
            if seq < ordered_next:
                return Placement.NEVER  # a second copy in the run
        if seq == ordered_next:
            return Placement.ORDER
        # Skipped already (a sequencer that died before it ordered this one)?
        for missing in range(ordered_next, seq):
            byte = self._ring_byte(off, missing)
            if byte is None or not byte & SKIPPED:
                return Placement.HOLD
        return Placement.ORDER

    def add_to_run(self, header_offset: int, run: dict[int, int]) -> None:
        """The sequencer put the batch at ``header_offset`` into the run it is
        writing: if it is a session's, the session's next batch_seq after the
        run is the one after it."""
        found = self._session_of(header_offset)
        if found is not None:
            off, seq = found
            run[off] = max(run.get(off, 0), seq + 1)

    def mark_ordered(self, run: Mapping[int, int]) -> None:
        """The sequencer's run is ordered (after its commit point): each of
        its sessions' next batch_seq to order is the one after its last batch
        in the run (see :meth:`add_to_run`). Redone at the sequencer's restart
        (:meth:`ordered`)."""
        for off, after in run.items():
            (ordered_next,) = U64.unpack_from(self._buf, off + E_ORDERED)
            if after > ordered_next:
                U64.pack_into(self._buf, off + E_ORDERED, after)

    def skip_before(self, header_offset: int) -> int:
        """Skip every batch_seq of the batch's session between the last ordered
        and it: they are never ordered. Returns how many were skipped."""
        found = self._session_of(header_offset)
        if found is None:
            return 0
        off, seq = found
        skipped = 0
        with self._lock:
            self._normalize(off)
            (ordered_next,) = U64.unpack_from(self._buf, off + E_ORDERED)
            for missing in range(ordered_next, seq):
                byte = self._ring_byte(off, missing)
                if byte is not None and not byte & SKIPPED:
                    self._mark(off, missing, SKIPPED)
                    skipped += 1
            self._advance(off)
        return skipped

    def ordered(self, header_offset: int) -> None:
        """The batch at ``header_offset`` has its total order: if it is a
        session's, the session's next batch_seq to order is the one after it
        (written after the sequencer's commit point; redone at its restart)."""
        found = self._session_of(header_offset)
        if found is None:
            return
        off, seq = found
        (ordered_next,) = U64.unpack_from(self._buf, off + E_ORDERED)
        if seq >= ordered_next:
            U64.pack_into(self._buf, off + E_ORDERED, seq + 1)

    def _session_of(self, header_offset: int) -> tuple[int, int] | None:
        """(entry offset, batch_seq) of a session batch whose session is in the table."""
        (word,) = U32.unpack_from(self._buf, header_offset + BH_SESSION)
        if not word:
            return None
        off = self.entry_offset(word - 1)
        if off is None:
            return None
        (token,) = U64.unpack_from(self._buf, header_offset + BH_SESSION_TOKEN)
        seq, client = _SEQ_CLIENT.unpack_from(self._buf, header_offset)
        state, entry_client = struct.unpack_from("<II", self._buf, off)
        (entry_token,) = U64.unpack_from(self._buf, off + E_TOKEN)
        if (state, entry_client, entry_token) != (LIVE, client, token):
            return None  # a session forgotten since (its entry maybe another's now)
        return off, seq

    # -- entries (the caller holds the session lock) -------------------------------------

    def _find(self, key: SessionKey) -> tuple[int, int] | None:
        """(entry, offset) of ``key``'s live entry, whatever its token."""
        wanted = (key.client_id, key.topic_index, key.incarnation)
        cached = self._where.get(wanted)
        if cached is not None:
            off = self.entry_offset(cached)
            if off is not None and self._keyed(off) == wanted:
                return cached, off
            del self._where[wanted]
        for first, entries in self._segments():
            hits = np.flatnonzero(
                (entries["state"] == LIVE)
                & (entries["client"] == key.client_id)
                & (entries["topic"] == key.topic_index)
                & (entries["incarnation"] == key.incarnation)
            )
            if len(hits):
                entry = first + int(hits[0])
                self._where[wanted] = entry
                off = self.entry_offset(entry)
                assert off is not None
                return entry, off
        return None

    def _keyed(self, off: int) -> tuple[int, int, int] | None:
        state, client, topic, _, incarnation, *_ = HEAD.unpack_from(self._buf, off)
        return (client, topic, incarnation) if state == LIVE else None

    def _holds(self, off: int, token: int) -> bool:
        (state,) = U32.unpack_from(self._buf, off + E_STATE)
        (held,) = U64.unpack_from(self._buf, off + E_TOKEN)
        return bool(state == LIVE and held == token)

    def _expired(self, off: int, now: int) -> bool:
        (active,) = U64.unpack_from(self._buf, off + E_ACTIVE)
        return bool(now - active > self.timeout_ns)

    def _make(self, key: SessionKey, now: int, entry: int | None) -> tuple[int, int] | None:
        """Write a new session into ``entry`` (an expired one of the same
        key) or a vacant entry; None when there is no room. The caller holds
        the region's lock and the session lock."""
        if entry is None:
            entry = self._vacant(now)
            if entry is None:
                return None
        off = self.entry_offset(entry)
        assert off is not None
        U32.pack_into(self._buf, off + E_STATE, FREE)
        self._buf[off + 4 : off + ENTRY_SIZE] = bytes(ENTRY_SIZE - 4)
        HEAD.pack_into(
            self._buf,
            off,
            FREE,
            key.client_id,
            key.topic_index,
            0,
            key.incarnation,
            key.token,
            0,
            0,
            now,
            0,
        )
        U32.pack_into(self._buf, off + E_STATE, LIVE)  # the commit point
        self._where[(key.client_id, key.topic_index, key.incarnation)] = entry
        return entry, off

    def _vacant(self, now: int) -> int | None:
        """A free entry, or one of a session that expired or whose topic is
        gone; the table grows by a segment when there is none."""
        states, incarnations = self._topic_keys()
        for first, entries in self._segments():
            topic = np.minimum(entries["topic"], len(states) - 1)
            gone = (states[topic] != TOPIC_LIVE) | (incarnations[topic] != entries["incarnation"])
            active = entries["active"].astype(np.int64)
            expired = (now - active) > self.timeout_ns
            vacant = np.flatnonzero((entries["state"] != LIVE) | gone | expired)
            if len(vacant):
                return first + int(vacant[0])
        position = self._grow()
        return None if position is None else position * self.per_segment

    def _topic_keys(self) -> tuple[npt.NDArray[np.uint32], npt.NDArray[np.uint64]]:
        """Every topic slot's state and incarnation (a slot past the table: not live)."""
        g = self._g
        stride = g.topic_entry_size
        table = np.frombuffer(self._buf, np.uint8, g.max_topics * stride, g.topic_offset(0))
        rows = table.reshape(g.max_topics, stride)
        states = rows[:, TOPIC_STATE_OFFSET : TOPIC_STATE_OFFSET + 4].copy().view("<u4").ravel()
        incarnations = (
            rows[:, TOPIC_INCARNATION_OFFSET : TOPIC_INCARNATION_OFFSET + 8]
            .copy()
            .view("<u8")
            .ravel()
        )
        return np.append(states, np.uint32(0)), np.append(incarnations, np.uint64(0))

    def _grow(self) -> int | None:
        """Add a segment to the table (the caller holds both locks); its
        chain position, or None when the region has no room."""
        if not self.per_segment:
            return None
        units = self._chain()
        unit = self._map.allocate(self._order, SESSION_OWNER)
        if unit is None:
            return None
        (generation,) = U64.unpack_from(self._buf, NEXT_GENERATION_OFFSET)
        U64.pack_into(self._buf, NEXT_GENERATION_OFFSET, generation + 1)
        base = self._g.segment_offset(unit)
        # It names no topic (a deletion frees a topic's segments by their header).
        header = (SEGMENT_MAGIC, NO_TOPIC, SESSION_OWNER, len(units), NO_SEGMENT, self._order)
        SEGMENT_HEADER.pack_into(self._buf, base, *header, generation)
        # A recycled segment holds what its last owner wrote: no entry may
        # look live before the segment is linked.
        end = base + self._g.segment_bytes(self._order)
        self._buf[base + SEGMENT_HEADER_SIZE : end] = bytes(end - base - SEGMENT_HEADER_SIZE)
        if units:
            U32.pack_into(self._buf, self._g.segment_offset(units[-1]) + SEGMENT_NEXT_OFFSET, unit)
        else:
            U32.pack_into(self._buf, SESSION_TABLE_OFFSET, unit + 1)
        units.append(unit)
        logger.info("sessions: the session table grew: room for %d sessions", self.entries)
        return len(units) - 1

    def _admit(self, entry: int, off: int, key: SessionKey, seq: int, now: int) -> Admission:
        """:meth:`admit` for a live session (the caller holds the session lock)."""
        (token,) = U64.unpack_from(self._buf, off + E_TOKEN)
        if token != key.token:
            return Admission(
                Verdict.COLLISION,
                entry,
                reason=f"client id {key.client_id} on topic {key.topic!r} is in use by "
                "another publish session (another token): two clients share the id; "
                "reconnect with another client_id",
            )
        U64.pack_into(self._buf, off + E_ACTIVE, now)
        base = self._normalize(off)
        name = f"of session (client {key.client_id}, topic {key.topic!r})"
        if seq >= base + WINDOW or seq < base - WINDOW:
            where = "ahead of" if seq >= base else "behind"
            return Admission(
                Verdict.OUTSIDE,
                entry,
                reason=f"batch_seq {seq} {name} is {abs(seq - base)} {where} its first "
                f"batch_seq not yet stored ({base}); a session keeps at most {WINDOW} "
                "batches unacked, and one unused for cxl.session_timeout_s begins again at 0",
            )
        byte = self._ring_byte(off, seq)
        assert byte is not None  # the window lies in the ring
        if byte & SKIPPED:
            return Admission(Verdict.SKIPPED, entry, reason=self._skipped_reason(seq, name))
        if byte & STORED:
            return Admission(Verdict.DUPLICATE, entry, writer=byte & WRITER)
        # Every claim in one read: batch_seqs at even places, words at odd ones.
        claims = _CLAIM_TABLE.unpack_from(self._buf, off + _CLAIMS_AT)
        seqs, words = claims[0::2], claims[1::2]
        at = seqs.index(seq) if seq in seqs else -1
        while at >= 0:
            if words[at]:
                claimant = (words[at] >> _OFFSET_BITS & 0xFF) - 1
                if self._alive(claimant):
                    return Admission(Verdict.BUSY, entry, writer=claimant)
                # A dead broker's claim: the batch is stored, or the claim void.
                writer = self._resolve(off, entry, at)
                if writer is not None:
                    return Admission(Verdict.DUPLICATE, entry, writer=writer)
            at = seqs.index(seq, at + 1) if seq in seqs[at + 1 :] else -1
        words = _CLAIM_TABLE.unpack_from(self._buf, off + _CLAIMS_AT)[1::2]
        free = words.index(0) if 0 in words else self._reap(off, entry)
        if free is None:
            return Admission(
                Verdict.BUSY,
                entry,
                reason=f"{CLAIMS} batches {name} are being written at once",
            )
        record = self._record_offset(off, free)
        U64.pack_into(self._buf, record, seq)
        U64.pack_into(self._buf, record + 8, self._claim_word(0))  # the commit point
        return Admission(Verdict.NEW, entry, Claim(entry, free, seq, token))

    @staticmethod
    def _skipped_reason(seq: int, name: str) -> str:
        return (
            f"batch_seq {seq} {name} was skipped by the sequencer (missing for "
            "cxl.sequencer_hole_timeout_s while a later batch_seq waited for it): it is "
            "never ordered"
        )

    def _reap(self, off: int, entry: int) -> int | None:
        """Free the claims of dead brokers (settling what they stored) and
        those whose batch_seq is settled already; the first free claim
        after, if any."""
        free = None
        for record in range(CLAIMS):
            at = self._record_offset(off, record)
            seq, word = struct.unpack_from("<QQ", self._buf, at)
            if word and not self._alive((word >> _OFFSET_BITS & 0xFF) - 1):
                self._resolve(off, entry, record)
                word = 0
            elif word and self._settled(off, seq):
                # Stored (its claimant died between the ring and the claim)
                # or skipped (maybe long ago): whoever holds it finds it
                # gone, harmlessly.
                U64.pack_into(self._buf, at + 8, 0)
                word = 0
            if not word and free is None:
                free = record
        return free

    def _resolve(self, off: int, entry: int, record: int) -> int | None:
        """Settle the claim of a broker that is gone: stored if the header
        where it reserved the batch is that batch, committed (the broker, or
        None when it never stored it). The claim is freed either way."""
        at = self._record_offset(off, record)
        seq, word = struct.unpack_from("<QQ", self._buf, at)
        claimant = (word >> _OFFSET_BITS & 0xFF) - 1
        where = word & _OFFSET_MASK
        stored = False
        if where and where + BATCH_HEADER.size <= self._g.region_size:
            (state,) = U32.unpack_from(self._buf, where + BH_BATCH_COMPLETE)
            header_seq, client = _SEQ_CLIENT.unpack_from(self._buf, where)
            (session,) = U32.unpack_from(self._buf, where + BH_SESSION)
            (token,) = U64.unpack_from(self._buf, where + BH_SESSION_TOKEN)
            (entry_client,) = U32.unpack_from(self._buf, off + 4)
            (entry_token,) = U64.unpack_from(self._buf, off + E_TOKEN)
            stored = (state, header_seq, client, session, token) == (
                BATCH_COMMITTED,
                seq,
                entry_client,
                entry + 1,
                entry_token,
            )
        if stored:
            self._mark(off, seq, STORED | claimant)
        U64.pack_into(self._buf, at + 8, 0)
        if stored:
            self._advance(off)
        logger.info(
            "sessions: broker %d's claim on batch_seq %d of session %d is %s",
            claimant,
            seq,
            entry,
            "settled: it had stored the batch" if stored else "void: it had not stored it",
        )
        return claimant if stored else None

    def _claims_of(self, entry: npt.NDArray[Any], broker: int) -> list[int]:
        words = entry["claims"][:, 1]
        return np.flatnonzero((words >> _OFFSET_BITS & 0xFF) == broker + 1).tolist()

    def _alive(self, broker: int) -> bool:
        return 0 <= broker < 32 and slot_held(self._fd, broker)

    def _claim_word(self, header_offset: int) -> int:
        return (self.broker_id + 1) << _OFFSET_BITS | header_offset

    @staticmethod
    def _record_offset(off: int, record: int) -> int:
        return off + _CLAIMS_AT + 16 * record

    def _claim_offset(self, claim: Claim) -> int | None:
        """Where ``claim`` is, if it still holds (this broker's, same batch_seq)."""
        off = self.entry_offset(claim.entry)
        if off is None or not self._holds(off, claim.token):
            return None
        at = self._record_offset(off, claim.record)
        seq, word = struct.unpack_from("<QQ", self._buf, at)
        if seq != claim.seq or (word >> _OFFSET_BITS & 0xFF) != self.broker_id + 1:
            return None
        return at

    # -- the ring ------------------------------------------------------------------------

    def _settled(self, off: int, seq: int) -> bool:
        """Whether ``seq`` is stored or skipped (below the ring: long ago)."""
        byte = self._ring_byte(off, seq)
        if byte is None:
            (start,) = U64.unpack_from(self._buf, off + E_RING_START)
            return seq < int(start)
        return bool(byte & SETTLED)

    def _ring_byte(self, off: int, seq: int) -> int | None:
        (start,) = U64.unpack_from(self._buf, off + E_RING_START)
        if not start <= seq < start + RING:
            return None
        return int(self._buf[off + _RING_AT + seq % RING])

    def _mark(self, off: int, seq: int, bits: int) -> None:
        """Set ``bits`` in ``seq``'s ring byte (if the ring holds it)."""
        byte = self._ring_byte(off, seq)
        if byte is not None:
            U8.pack_into(self._buf, off + _RING_AT + seq % RING, byte | bits)

    def _advance(self, off: int) -> None:
        """Move the base past every batch_seq stored or skipped, and the ring with it."""
        (base,) = U64.unpack_from(self._buf, off + E_BASE)
        (start,) = U64.unpack_from(self._buf, off + E_RING_START)
        moved = base
        while moved < start + RING and self._buf[off + _RING_AT + moved % RING] & SETTLED:
            moved += 1
        if moved != base:
            U64.pack_into(self._buf, off + E_BASE, moved)
            self._normalize(off)

    def _normalize(self, off: int) -> int:
        """Bring the ring to ``base - WINDOW .. base + WINDOW`` (finishing a
        move cut short); returns the base. (A claim that fell out of it, of a
        batch_seq skipped long ago, is freed when claims run short.)"""
        (base,) = U64.unpack_from(self._buf, off + E_BASE)
        (start,) = U64.unpack_from(self._buf, off + E_RING_START)
        want = max(0, base - WINDOW)
        if start < want:
            # The places of batch_seqs start .. want - 1 become those of the
            # batch_seqs that entered the window: they start empty.
            for seq in range(start, min(want, start + RING)):
                U8.pack_into(self._buf, off + _RING_AT + seq % RING, 0)
            U64.pack_into(self._buf, off + E_RING_START, want)
        return int(base)


__all__ = [
    "CLAIMS",
    "ENTRY_SIZE",
    "WINDOW",
    "Admission",
    "Claim",
    "Placement",
    "SeqState",
    "SessionKey",
    "SessionTable",
    "Verdict",
]
