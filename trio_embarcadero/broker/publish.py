"""The publish session: batches in, acks out.

After the handshake a publisher streams ``[batch header][payload]`` pairs.
``WAIT_HEADER`` covers the wait for the first header byte, which holds no
resource, and the rest of the header, which must come within
``header_timeout_s`` and holds no resource either. Only the payload is
received holding one slot of the receive limiter
(``num_publish_receive_threads``), and a payload that makes no progress for
``payload_stall_timeout_s`` is given up, so a stalled publisher cannot keep
a slot for long. The broker's own waits (the in-flight window, a staging
buffer, log space, a free slot) hold no slot and do not count against the
client's ``batch_timeout_s``.

On the staged path (``use_nonblocking``) the payload goes into a staging
buffer and ``WAIT_CXL`` is the hand-off to the allocator tasks; on the
direct path ``WAIT_CXL`` is the reservation of log space, and the payload is
received straight into the log.

The session is handed an :class:`IngestPath` (the shared parts of the
ingest path it may use) and never sees the broker itself. It owns the
reservations of its batches: the commit feed calls
:meth:`PublishSession.batch_committed`, the allocators
:meth:`PublishSession.batch_discarded`.

A connection of a publish session (``client_req = 2``, see :mod:`.sessions`)
admits each batch before its payload: a new batch_seq goes on as above with
its claim; a duplicate is read aside, not stored, and acked once its stored
copy reached the connection's ack level. Its acks go out in the order its
batches arrived (a ticket each), whichever settles first.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from functools import partial

import attrs
import numpy as np
import numpy.typing as npt
import trio

from ..config import NetworkConfig
from ..errors import (
    ConnectionLost,
    ErrorCode,
    LayoutError,
    LogFullError,
    ProtocolError,
    StorageError,
)
from ..log import CxlLog, Reservation, Stream
from ..log.layout import read_topic_order
from ..log.sessions import Admission, Claim, SessionKey, Verdict
from ..transport import Receiver, receive_exactly
from ..wire import (
    BATCH_HEADER_SIZE,
    BatchHeader,
    ClientRequest,
    Handshake,
    parse_batch_header,
    scan_records,
)
from .acks import AckCounter, DialBackLease, DialBackRegistry, run_ack_sender
from .allocator import AllocationCounters, Backoff, LogSpace, StagedBatch, reserve, take_slot
from .commits import CommitFeed
from .connection import Connection, ConnectionPhase
from .durability import Durability
from .monitor import PauseGate
from .scopes import TrackedScope
from .sessions import SessionLink, Sessions
from .staging import StagingPool
from .statistics import IngestCounters

logger = logging.getLogger(__name__)

#: The most one read of a payload takes. The check of a batch's records
#: right after its last byte then finds them in the CPU cache: read in one
#: 2 MiB piece (what four busy connections get), a batch's record headers
#: were read back from memory, the check took 94-152 us instead of 33-57,
#: and the broker spent 10-20 % more CPU per GB.
_RECEIVE_PIECE = 256 * 1024


@attrs.frozen(eq=False)
class IngestPath:
    """The shared state a publish session works with, and nothing else.

    Attributes:
        network: The ``[network]`` configuration.
        broker_id: Written first on every ack stream.
        log: The log (reservations on the direct path).
        commits: Where finished and abandoned reservations go.
        pool: Staging buffers (staged path).
        gate: The pool monitor's pause gate.
        receive_limiter: ``num_publish_receive_threads`` receive slots.
        backoff: How reservations retry while the log is full.
        allocation: Retry counters shared with the allocators.
        batches: The allocators' channel (staged path).
        dial_backs: Dial-back ack connections.
        durability: The disk writer (None without ``storage.dir``).
        counters: The broker's counters.
        make_room: Reclaims what retention lets go when the region is full.
        space: Where batches wait for a full region to get room back.
        sessions: The region's publish sessions (``client_req = 2``).
    """

    network: NetworkConfig
    broker_id: int
    log: CxlLog
    commits: CommitFeed
    pool: StagingPool
    gate: PauseGate
    receive_limiter: trio.CapacityLimiter
    backoff: Backoff
    allocation: AllocationCounters
    batches: trio.MemorySendChannel[StagedBatch]
    dial_backs: DialBackRegistry
    durability: Durability | None
    counters: IngestCounters
    make_room: Callable[[], int]
    space: LogSpace
    sessions: Sessions


class _Ticket:
    """One batch of a session connection, in the order it arrived: its ack
    counts once it and every batch before it settled."""

    __slots__ = ("entry", "messages", "nbytes", "seq", "slot", "state")

    PENDING, ACKED, FAILED = range(3)

    def __init__(self, header: BatchHeader, entry: int = -1, seq: int = -1) -> None:
        self.messages = header.num_msg
        self.nbytes = header.total_size
        self.entry = entry  # a duplicate's session entry and batch_seq
        self.seq = seq
        self.state = _Ticket.PENDING
        #: It counts against ``max_buffers_per_connection`` (see _free_slot).
        self.slot = True


class PublishSession:
    """One publisher's batches, from its socket to its acks.

    Args:
        connection: The connection it runs on.
        handshake: The publisher's handshake.
        ingest: The shared ingest path.
    """

    def __init__(self, connection: Connection, handshake: Handshake, ingest: IngestPath) -> None:
        self.connection = connection
        self.handshake = handshake
        self.ingest = ingest
        self.topic = handshake.topic
        self.batches = 0
        self.committed = 0
        self._error: ProtocolError | None = None
        self._placement_failed = False
        self._acks: AckCounter | None = None
        # Batches received whole and not settled yet; of those, the ones that
        # count against network.max_buffers_per_connection (see _free_slot).
        self._inflight = 0
        self._slots = 0
        # When each batch in flight was received whole, oldest first (they
        # settle in order): the ack latency histogram's start times. The
        # process clock (perf_counter, what Trio's own clock reads) is the
        # cheapest there is: this runs for every batch.
        self._received_at: deque[float] = deque()
        self._settled = trio.lowlevel.ParkingLot()
        self._receive_scope = trio.CancelScope()
        self._stream: Stream | None = None  # attached to (see _attach)
        # A publish session's connection (client_req 2): its way to the
        # session table, and its batches' tickets (the stored ones', and the
        # duplicates' waiting for their stored copy) in arrival order.
        self._link: SessionLink | None = None
        self._tickets: deque[_Ticket] | None = None
        self._stored: dict[Claim, _Ticket] = {}
        self._duplicates: deque[_Ticket] = deque()
        self._duplicate_lot = trio.lowlevel.ParkingLot()
        # No count after a batch stored but not acked (never ordered).
        self._acks_stopped = False
        # Computed once: the config's property works it out on every call.
        self._max_batch_bytes = ingest.network.effective_max_batch_bytes

    # -- what the commit feed and the allocators call ----------------------------

    @property
    def failed(self) -> bool:
        """Whether a batch of this session could not be placed in the log;
        its later batches must not be either (they would overtake it)."""
        return self._placement_failed

    def batch_committed(self, reservation: Reservation) -> None:
        """One of this session's batches is in the log."""
        self.committed += 1
        durability = self.ingest.durability
        header = reservation.header
        ticket = self._ticket_of(reservation.session)
        if self.handshake.ack == 2 and durability is not None:
            durability.when_durable(reservation, partial(self._made_durable, header, ticket))
        else:
            self._acked(header, ticket)

    def batch_stored(self, reservation: Reservation) -> None:
        """One of this session's batches of an order-5 topic is in the log;
        its ack waits for its place in the total order."""
        if reservation.session is not None and self._tickets is not None:
            ticket = self._stored.get(reservation.session)
            if ticket is not None:
                self._free_slot(ticket)

    def _free_slot(self, ticket: _Ticket) -> None:
        """A session connection's batch stops counting against
        ``max_buffers_per_connection`` before it settles: one stored whose
        ack waits only for the total order, or a duplicate waiting for its
        stored copy. Neither holds a buffer, the session's window bounds
        them, and the sequencer may wait for a batch_seq that comes behind
        them on this connection (a resend after another connection failed):
        were they to hold it, it would never be read."""
        if ticket.slot:
            ticket.slot = False
            self._slots -= 1
            self._settled.unpark_all()

    def batch_never_ordered(self, reservation: Reservation) -> None:
        """One of this session's batches of an order-5 topic is stored but
        never ordered: its publish session's batch_seq was skipped, or the
        sequencer went past it while it was in flight. It is not acked, nor
        is any batch after it (counts are cumulative); the client gets an
        error after the counts of the batches before it."""
        ticket = self._ticket_of(reservation.session)
        if reservation.session is not None:
            # Its ticket keeps the session's acks in order.
            self.fail(
                ProtocolError(
                    ErrorCode.BAD_BATCH_HEADER,
                    f"batch_seq {reservation.header.batch_seq} of this session was skipped by "
                    "the sequencer (missing for cxl.sequencer_hole_timeout_s while a later "
                    "batch_seq waited for it): it is never ordered",
                )
            )
            self._settled_unacked(ticket)
            return
        error = ProtocolError(
            ErrorCode.NOT_ORDERED,
            f"batch {reservation.header.batch_seq} of topic {self.topic!r} is never ordered: "
            "it was still arriving when a later batch of this broker's stream was committed, "
            "and the sequencer went past it after cxl.sequencer_hole_timeout_s; it is in no "
            "total order and not acked, nor is any batch sent after it",
        )
        durability = self.ingest.durability
        if self.handshake.ack == 2 and durability is not None:
            # In turn with the acks of the batches before it, which wait for the disk.
            durability.when_durable(reservation, lambda _failure: self._never_acked(error))
        else:
            self._never_acked(error)

    def _never_acked(self, error: ProtocolError) -> None:
        self._acks_stopped = True
        self.fail(error)
        self._settle()

    def _ticket_of(self, claim: Claim | None) -> _Ticket | None:
        """The ticket of a stored batch of a session connection (by its claim)."""
        return self._stored.pop(claim) if claim is not None and self._tickets is not None else None

    def _acked(self, header: BatchHeader, ticket: _Ticket | None = None) -> None:
        if ticket is not None:
            self._ticket_done(ticket, _Ticket.ACKED)
            return
        if self._acks_stopped:  # a batch before it was never ordered
            self._settle()
            return
        if self._acks is not None:
            self._acks.advance(header.num_msg, header.total_size)
        self._settle(acked=True)

    def _settled_unacked(self, ticket: _Ticket | None) -> None:
        if ticket is not None:
            self._ticket_done(ticket, _Ticket.FAILED)
        else:
            self._settle()

    def _ticket_done(self, ticket: _Ticket, state: int) -> None:
        """Settle the tickets in arrival order: a count covers a batch only
        once every batch before it is acked, and none after one that failed."""
        ticket.state = state
        tickets = self._tickets
        assert tickets is not None
        while tickets and tickets[0].state != _Ticket.PENDING:
            done = tickets.popleft()
            acked = done.state == _Ticket.ACKED and not self._acks_stopped
            self._acks_stopped = not acked
            if acked and self._acks is not None:
                self._acks.advance(done.messages, done.nbytes)
            self._settle(acked=acked, slot=done.slot)

    def _made_durable(
        self, header: BatchHeader, ticket: _Ticket | None, failure: StorageError | None
    ) -> None:
        if failure is None:
            self._acked(header, ticket)
            return
        # Settled without a count: the final count stays what is durable.
        self.fail(
            ProtocolError(
                ErrorCode.STORAGE_FAILURE,
                f"storage failure: the disk log failed ({failure.operation}: {failure.reason}); "
                "the broker is stopping",
            )
        )
        self._settled_unacked(ticket)

    def batch_discarded(self, error: LogFullError | None, claim: Claim | None = None) -> None:
        """One of this session's batches will never be in the log (``claim``:
        a publish session's, already given up)."""
        if error is not None:
            self._placement_failed = True
            self.fail(ProtocolError(ErrorCode.LOG_FULL, f"no log space after retries: {error}"))
        self.ingest.counters.batches_discarded += 1
        self._settled_unacked(self._ticket_of(claim))

    def _settle(self, *, acked: bool = False, slot: bool = True) -> None:
        self._inflight -= 1
        self._slots -= slot
        received = self._received_at.popleft() if self._received_at else None
        if acked and received is not None and self.handshake.ack:
            self.ingest.counters.count_acked(self.handshake.ack, time.perf_counter() - received)
        self._settled.unpark_all()

    def _in_flight(
        self, header: BatchHeader, claim: Claim | None = None, ticket: _Ticket | None = None
    ) -> None:
        """One more batch received whole and handed on, not yet settled. A
        session connection's gets a ticket: a stored batch's is found again
        by its claim, a duplicate's is given."""
        self._inflight += 1
        self._slots += 1
        self._received_at.append(time.perf_counter())
        if self._tickets is not None:
            if ticket is None:
                assert claim is not None  # every batch stored in a session has one
                ticket = self._stored[claim] = _Ticket(header)
            self._tickets.append(ticket)

    def _not_in_flight(self, claim: Claim | None) -> None:
        """Undo the last :meth:`_in_flight` (a hand-off that failed)."""
        self._inflight -= 1
        self._slots -= 1
        self._received_at.pop()
        if self._tickets is not None:
            self._tickets.pop()
            self._ticket_of(claim)

    def fail(self, error: ProtocolError) -> None:
        """Stop receiving; the client gets ``error`` once acks are flushed."""
        if self._error is None:
            self._error = error
        self._receive_scope.cancel()

    def _hold_acks(self) -> None:
        """The next batch has arrived already: let the counts of the batches
        acked meanwhile add up (see :class:`AckCounter`)."""
        if self._acks is not None:
            self._acks.hold()

    def _release_acks(self) -> None:
        """About to wait: the publisher first gets every count held back, so
        it never waits for an ack while the broker waits too."""
        if self._acks is not None:
            self._acks.release()

    # -- the session -----------------------------------------------------------------

    async def run(self) -> None:
        """Receive batches until EOF, an error or a stop, then flush the acks.

        Raises:
            ProtocolError: What the client is to be told (after its acks).
            ConnectionLost: The client vanished.
            LayoutError: The log refused a commit (another process changed
                one of this broker's batches); fatal to the broker.
        """
        ingest, handshake, conn = self.ingest, self.handshake, self.connection
        if handshake.ack == 2 and ingest.durability is None:
            raise ProtocolError(
                ErrorCode.NOT_ALLOWED, "ack level 2 needs a disk log (storage.dir is not set)"
            )
        # A topic that could not be created (table full) is refused up front;
        # one that can is created by its first reservation, not here, so
        # handshakes alone cannot fill the table.
        try:
            ingest.log.check_topic_room(handshake.topic)
        except LogFullError as exc:
            raise ProtocolError(ErrorCode.LOG_FULL, str(exc)) from None
        if handshake.request == ClientRequest.PUBLISH_SESSION:
            self._open_session()
        dial_back = handshake.ack >= 1 and handshake.port != 0
        lease = await self._attach_dial_back() if dial_back else None
        lost: ConnectionLost | None = None
        refused: LayoutError | None = None
        try:
            logger.debug(
                "conn %d %s publishes to %r with %s",
                conn.id,
                conn.peer,
                handshake.topic,
                f"ack {handshake.ack}" + (f" via port {handshake.port}" if dial_back else ""),
            )
            # Only the ack sender runs in this nursery; the outcome is raised
            # after it, so callers see a plain exception, never a group.
            async with trio.open_nursery() as nursery:
                ack_sender_done = trio.Event()
                if handshake.ack >= 1 and not dial_back:
                    self._acks = counter = AckCounter(ingest.network.ack_coalesce_kb * 1024)
                    nursery.start_soon(self._send_acks, counter, ack_sender_done)
                else:
                    ack_sender_done.set()
                if self._link is not None:
                    nursery.start_soon(self._ack_duplicates)
                try:
                    with self._receive_scope:
                        await self._receive_batches()
                except ConnectionLost as exc:
                    lost = exc
                except ProtocolError as exc:
                    self.fail(exc)
                except LayoutError as exc:
                    # The log refused a commit: another process wrote this
                    # broker's streams. Nothing more settles; the broker stops.
                    refused = exc
                    nursery.cancel_scope.cancel()
                if refused is None:
                    conn.phase = ConnectionPhase.DRAINING
                    await self._wait_settled()
                    # Before the last acks: a client that saw them sees a
                    # topic it may delete.
                    self._detach()
                    if self._acks is not None and not dial_back:
                        self._acks.close()
                    await ack_sender_done.wait()
                    nursery.cancel_scope.cancel()  # the duplicates' waiter: nothing left
        finally:
            if lease is not None:
                lease.release()
            self._detach()
            if self._link is not None:
                self._link.close()
        if refused is not None:
            raise refused
        if self._error is None and conn.stopping:
            self._error = ProtocolError(ErrorCode.SHUTTING_DOWN, "broker is shutting down")
        if self._error is not None:
            raise self._error
        if lost is not None:
            if lost.received:
                logger.warning("conn %d %s: batch cut short: %s", conn.id, conn.peer, lost)
            raise lost

    # -- publish sessions (client_req 2) -------------------------------------------------

    def _open_session(self) -> None:
        """Become a session connection; refused (error 6) if a client with
        another token holds the session."""
        handshake = self.handshake
        self._tickets = deque()
        key = self._session_key()
        order5 = key is not None and self._order5(key)
        self._link = link = SessionLink(self.ingest.sessions, key, order5, handshake.ack)
        if key is None:
            return  # no topic, no session yet: its first batch makes both
        table = self.ingest.sessions.table
        holder = table.holder(key)
        if holder is not None and holder != key.token:
            raise ProtocolError(
                ErrorCode.NOT_ALLOWED,
                f"client id {handshake.client_id} on topic {self.topic!r} is in use by another "
                "publish session (another token): two clients share the id; reconnect with "
                "another client_id",
            )
        if holder is not None:
            link.opened(table.entry_of(key))  # kept active while this connection is open

    def _session_key(self) -> SessionKey | None:
        """The session's key in the region now (None while the topic does not exist)."""
        stream = self.ingest.log.existing_stream(self.topic)
        if stream is None:
            return None
        link = self._link
        key = link.key if link is not None else None
        if key is None or (key.topic_index, key.incarnation) != (
            stream.topic_index,
            stream.incarnation,
        ):
            handshake = self.handshake
            key = SessionKey(
                handshake.client_id,
                self.topic,
                stream.topic_index,
                stream.incarnation,
                handshake.last_addr,
            )
        return key

    def _order5(self, key: SessionKey) -> bool:
        log = self.ingest.log
        return read_topic_order(log.region, log.geometry, key.topic_index) == 5

    async def _session_batch(self, header: BatchHeader, clock: BatchClock) -> Claim | None:
        """Admit a session connection's batch; returns its claim to go on as
        any batch, or None when it was dealt with here: a duplicate (read,
        checked, acked once its stored copy is), or the first batch of a
        topic that does not exist yet (received aside and checked before
        the topic is made, as the direct path does, then stored)."""
        key = self._session_key()
        if key is None:
            payload, starts = await self._receive_aside(header, clock)
            # Stored from here, not by an allocator: after the batches before
            # it (there are some only if the topic was deleted meanwhile).
            await self._wait_settled()
            self._attach()  # makes the topic
            key = self._session_key()
            assert key is not None  # just made
            admission = await self._admit(header, key)
            if admission.verdict is Verdict.NEW:
                await self._place_aside(header, payload, starts, admission.claim)
            else:
                await self._duplicate(header, admission)
            return None
        admission = await self._admit(header, key)
        if admission.verdict is Verdict.NEW:
            return admission.claim
        await self._receive_aside(header, clock)  # read and checked, never stored
        await self._duplicate(header, admission)
        return None

    async def _admit(self, header: BatchHeader, key: SessionKey) -> Admission:
        link = self._link
        assert link is not None
        if key is not link.key:  # the first, or the topic was made anew
            link.key, link.order5 = key, self._order5(key)
        self.connection.phase = ConnectionPhase.WAIT_CXL
        return await link.admit(header, self.connection, self._release_acks)

    async def _duplicate(self, header: BatchHeader, admission: Admission) -> None:
        """Count a duplicate in flight; its ack comes once its stored copy's does."""
        await self._wait_below_inflight_cap()
        sessions = self.ingest.sessions
        sessions.duplicates += 1
        sessions.duplicate_messages += header.num_msg
        self.ingest.counters.count_received(header)
        self.batches += 1
        ticket = _Ticket(header, admission.entry, header.batch_seq)
        self._in_flight(header, ticket=ticket)
        self._free_slot(ticket)
        self._duplicates.append(ticket)
        self._duplicate_lot.unpark_all()

    async def _ack_duplicates(self) -> None:
        """Settle each duplicate, in order, once its stored copy reached this
        connection's ack level (or tell the client why it never will)."""
        link = self._link
        assert link is not None
        while True:
            while not self._duplicates:
                await self._duplicate_lot.park()
            ticket = self._duplicates[0]
            state = _Ticket.ACKED
            if self._error is not None:
                state = _Ticket.FAILED  # nothing after an error counts anyway
            else:
                try:
                    await link.wait_acked(ticket.entry, ticket.seq, self.connection)
                except ProtocolError as exc:
                    self.fail(exc)
                    state = _Ticket.FAILED
            self._duplicates.popleft()
            self._ticket_done(ticket, state)

    async def _attach_dial_back(self) -> DialBackLease:
        handshake, conn = self.handshake, self.connection
        if conn.peer_host is None:
            raise ProtocolError(ErrorCode.BAD_HANDSHAKE, "dial-back acks need a TCP peer")
        try:
            lease = await self.ingest.dial_backs.attach(
                handshake.client_id, handshake.topic, conn.peer_host, handshake.port
            )
        except ConnectionLost as exc:
            raise ProtocolError(ErrorCode.BAD_HANDSHAKE, str(exc)) from None
        self._acks = lease.counter
        return lease

    async def _send_acks(self, counter: AckCounter, done: trio.Event) -> None:
        conn = self.connection
        try:
            await run_ack_sender(
                counter,
                conn.send_frame,
                self.ingest.broker_id,
                send_nowait=conn.send_frame_nowait,
            )
        except ConnectionLost as exc:
            logger.info("conn %d %s: ack stream: %s", conn.id, conn.peer, exc)
            self._receive_scope.cancel()
        finally:
            done.set()

    async def _wait_below_inflight_cap(self) -> None:
        # Batches received but not yet acked at this session's level: with the
        # staged path they hold buffers; at ack level 2 they wait for the
        # disk. Either way the publisher must not run further ahead.
        while self._slots >= self.ingest.network.max_buffers_per_connection:
            self.connection.phase = ConnectionPhase.WAIT_CXL
            self._release_acks()
            await self._settled.park()

    async def _wait_settled(self) -> None:
        self._release_acks()
        while self._inflight:
            await self._settled.park()

    async def _receive_batches(self) -> None:
        ingest, conn = self.ingest, self.connection
        net = ingest.network
        gate = ingest.gate
        receiver = conn.receiver
        header_buf = bytearray(BATCH_HEADER_SIZE)
        header_view = memoryview(header_buf)
        previous: trio.Event | None = None
        while not conn.stopping:
            # The batch boundary: idle and paused waits hold no resources and
            # are cut short by a graceful shutdown (see _wait_unclocked for
            # how, without a scope of its own). A header that has arrived
            # is taken at once, with this loop's one checkpoint a batch.
            got = None if gate.paused else receiver.receive_into_nowait(header_view)
            if got is None:
                self._release_acks()
                got = await self._wait_for_header(header_view)
            else:
                self._hold_acks()
                await trio.lowlevel.checkpoint()
            if got == 0:  # EOF, or stopped while no batch had started
                return
            # The batch has begun: from here the client's clock runs while
            # its bytes are awaited, and only then.
            clock = BatchClock(net.batch_timeout_s)
            if got == BATCH_HEADER_SIZE:
                # As a rule the header comes whole: nothing left to wait for.
                header = self._parse_header(header_buf)
            else:
                header = await self._receive_header(header_buf, got, clock)
            claim = None
            if self._link is not None:
                claim = await self._session_batch(header, clock)
                if claim is None:  # a duplicate, or stored on its own
                    conn.phase = ConnectionPhase.COMPLETE
                    continue
            if net.use_nonblocking:
                previous = await self._receive_staged(header, previous, clock, claim)
            else:
                await self._receive_direct(header, clock, claim)
            conn.phase = ConnectionPhase.COMPLETE

    async def _wait_for_header(self, header_view: memoryview) -> int:
        """Wait at the batch boundary for the next header's first bytes (into
        ``header_view``); how many came (0: EOF, or stopped meanwhile).

        Raises:
            ProtocolError: ``TIMEOUT`` after ``idle_timeout_s`` without one.
        """
        conn, net, gate = self.connection, self.ingest.network, self.ingest.gate
        while True:
            if gate.paused and not await self._wait_at_gate():
                return 0  # stopped while no batch had started
            conn.phase = ConnectionPhase.WAIT_HEADER
            if not net.idle_timeout_s:
                return await self._wait_unclocked(header_view)
            # The idle clock restarts after a pause: waiting at the gate is
            # the broker's doing, not the client's.
            idle_deadline = trio.current_time() + net.idle_timeout_s
            # One scope that a stop, the gate's next pause and the idle
            # deadline all cancel: the gate must stop the idle clock.
            with TrackedScope(conn, gate, deadline=idle_deadline) as wait:
                # Called when nothing was waiting, or after a pause: a
                # read before the wait would fail, or find what the wait
                # finds at once.
                got = await conn.receiver.receive_into(header_view, wait_first=True)
            if not wait.cancelled_caught:
                return got
            if conn.stopping:
                return 0  # stopped while no batch had started
            # A pause may come and go before this task runs again, so the
            # clock, not the gate, tells a timeout from a pause.
            if trio.current_time() >= idle_deadline:
                raise ProtocolError(
                    ErrorCode.TIMEOUT, f"idle for {net.idle_timeout_s} s between batches"
                )

    async def _wait_unclocked(self, header_view: memoryview) -> int:
        """The boundary wait without an idle clock (the default), in no
        cancel scope of its own: a paced publisher waits once a batch, and
        entering and leaving a scope cost it 6-9 % of the broker's CPU a
        batch. A stop cancels the receive loop's scope instead, which is at
        a boundary here. A pause does not cut the wait short: what arrives
        meanwhile is read as far as its header, which holds no buffer, and
        the batch waits at the gate before its payload and its clock."""
        conn = self.connection
        conn.scope_entered(self._receive_scope)
        try:
            got = await conn.receiver.receive_into(header_view, wait_first=True)
        finally:
            conn.scope_exited(self._receive_scope)
        if conn.stopping:
            return 0  # stopped before the batch began: its header bytes go with the connection
        if got and self.ingest.gate.paused and not await self._wait_at_gate():
            return 0
        return got

    async def _wait_at_gate(self) -> bool:
        """Wait while the pool monitor holds receivers; False if stopped meanwhile."""
        self.connection.phase = ConnectionPhase.PAUSED
        with self.connection.at_boundary() as paused:
            await self.ingest.gate.wait_open()
        return not paused.cancelled_caught

    async def _receive_header(self, buf: bytearray, got: int, clock: BatchClock) -> BatchHeader:
        # No receive slot: a header costs the broker nothing but this
        # connection, so a publisher that stops in one holds up nobody.
        net = self.ingest.network
        self._release_acks()
        with clock.running() as batch_deadline:
            deadline = min(batch_deadline, trio.current_time() + net.header_timeout_s)
            with trio.move_on_at(deadline):
                await receive_exactly(self.connection.receiver, memoryview(buf)[got:])
                return self._parse_header(buf)
        if deadline == batch_deadline:
            raise clock.expired()
        raise ProtocolError(
            ErrorCode.TIMEOUT, f"batch header not received within {net.header_timeout_s} s"
        )

    def _parse_header(self, buf: bytearray) -> BatchHeader:
        # The header and every record must name the handshake's client:
        # nobody publishes under another client's id.
        return parse_batch_header(buf, self._max_batch_bytes, client_id=self.handshake.client_id)

    async def _receive_staged(
        self,
        header: BatchHeader,
        previous: trio.Event | None,
        clock: BatchClock,
        claim: Claim | None = None,
    ) -> trio.Event:
        ingest, conn = self.ingest, self.connection
        total = header.total_size
        handed_off = False
        try:
            await self._wait_below_inflight_cap()
            buffer = ingest.pool.allocate()
            if buffer is None:
                conn.phase = ConnectionPhase.PAUSED
                self._release_acks()
                buffer = await ingest.pool.acquire()
        except BaseException:
            self._give_up(claim)
            raise
        try:
            conn.phase = ConnectionPhase.WAIT_PAYLOAD
            await take_slot(ingest.receive_limiter, self._release_acks)
            try:
                await self._receive_payload(buffer.view[:total], clock)
            finally:
                ingest.receive_limiter.release()
            starts = scan_records(
                buffer.array[:total], header.num_msg, client_id=self.handshake.client_id
            )
            self._attach()
            ingest.counters.count_received(header)
            self.batches += 1
            batch = StagedBatch(self, header, buffer, starts, previous, claim)
            buffer.hand_off()
            conn.phase = ConnectionPhase.WAIT_CXL
            self._in_flight(header, claim)
            try:
                try:
                    # Room in the channel: no pass through the scheduler
                    # here (the receive loop has its checkpoint a batch).
                    ingest.batches.send_nowait(batch)
                except trio.WouldBlock:
                    self._release_acks()
                    await ingest.batches.send(batch)
            except BaseException:
                self._not_in_flight(claim)
                raise
            handed_off = True
        except BaseException:
            buffer.release()
            if not handed_off:
                self._give_up(claim)
            raise
        return batch.done

    async def _receive_direct(
        self, header: BatchHeader, clock: BatchClock, claim: Claim | None = None
    ) -> None:
        ingest, conn = self.ingest, self.connection
        limiter = ingest.receive_limiter
        try:
            await self._wait_below_inflight_cap()
        except BaseException:
            self._give_up(claim)
            raise
        # Attached (after its first batch), the topic cannot be deleted: no
        # need to look it up again for every batch.
        if (
            claim is None
            and self._stream is None
            and ingest.log.existing_stream(self.topic) is None
        ):
            await self._receive_first_batch(header, clock)
            return
        # Returns holding a receive slot, which it never held while backing off.
        reservation = await self._reserve(header, slot=limiter, session=claim)
        try:
            try:
                conn.phase = ConnectionPhase.WAIT_PAYLOAD
                await self._receive_payload(reservation.payload.data, clock)
            finally:
                limiter.release()
            starts = scan_records(
                reservation.payload, header.num_msg, client_id=self.handshake.client_id
            )
        except BaseException:
            # Batches reserved after this one commit once it is given up:
            # a stalled payload holds its topic back payload_stall_timeout_s
            # at most.
            ingest.commits.abandon(reservation)
            raise
        self._complete_direct(reservation, starts)

    async def _receive_first_batch(self, header: BatchHeader, clock: BatchClock) -> None:
        """The direct path's first batch of a topic that does not exist yet.

        A topic takes its table slot with its first reservation, and the
        direct path reserves before the payload can be checked. So this one
        batch is received aside and reserved only once it is valid: a batch
        that fails validation, stalls or is cut short creates no topic.
        """
        payload, starts = await self._receive_aside(header, clock)
        await self._place_aside(header, payload, starts)

    async def _receive_aside(
        self, header: BatchHeader, clock: BatchClock
    ) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
        """A batch's payload, received into memory of its own and checked."""
        self._release_acks()  # the slot may be taken
        async with self.ingest.receive_limiter:
            # Allocated under the slot: at most num_publish_receive_threads
            # of these are being filled at once.
            payload = np.empty(header.total_size, dtype=np.uint8)
            self.connection.phase = ConnectionPhase.WAIT_PAYLOAD
            await self._receive_payload(payload.data, clock)
        return payload, scan_records(payload, header.num_msg, client_id=self.handshake.client_id)

    async def _place_aside(
        self,
        header: BatchHeader,
        payload: npt.NDArray[np.uint8],
        starts: npt.NDArray[np.int64],
        claim: Claim | None = None,
    ) -> None:
        """Reserve for a batch received aside, copy it in and commit it."""
        reservation = await self._reserve(header, session=claim)
        self._complete_direct(reservation, starts, payload)

    async def _reserve(
        self,
        header: BatchHeader,
        *,
        slot: trio.CapacityLimiter | None = None,
        session: Claim | None = None,
    ) -> Reservation:
        ingest = self.ingest
        try:
            self._attach()
            self.connection.phase = ConnectionPhase.WAIT_CXL
            return await reserve(
                ingest.log,
                self.topic,
                header,
                ingest.backoff,
                ingest.allocation,
                self,
                slot=slot,
                make_room=ingest.make_room,
                space=ingest.space,
                session=session,
                on_wait=self._release_acks,
            )
        except LogFullError as exc:
            self._give_up(session)
            raise ProtocolError(ErrorCode.LOG_FULL, f"no log space after retries: {exc}") from None
        except BaseException:
            self._give_up(session)
            raise

    def _give_up(self, claim: Claim | None) -> None:
        """A claimed batch_seq will not be reserved here: let it go."""
        if claim is not None:
            self.ingest.log.sessions.release(claim)

    def _attach(self) -> None:
        """Count this session in the region as a publisher of its topic
        (creating it), before its first batch goes to the log: a topic is
        not deleted while publishers are attached. Undone when the session
        ends, once its batches are settled."""
        if self._stream is not None:
            return
        try:
            self._stream = self.ingest.log.attach_publisher(self.topic)
        except LogFullError as exc:
            # Worded as when the reservation itself finds the table full.
            raise ProtocolError(ErrorCode.LOG_FULL, f"no log space after retries: {exc}") from None

    def _detach(self) -> None:
        if self._stream is not None:
            self.ingest.log.detach_publisher(self._stream)
            self._stream = None

    def _complete_direct(
        self,
        reservation: Reservation,
        starts: npt.NDArray[np.int64],
        aside: npt.NDArray[np.uint8] | None = None,
    ) -> None:
        """Commit a batch received into its reservation, or into ``aside``."""
        self.ingest.counters.count_received(reservation.header)
        self.batches += 1
        self._in_flight(reservation.header, reservation.session)
        if aside is None:
            self.ingest.commits.complete(reservation, starts)
        else:
            self.ingest.commits.complete_copy(reservation, aside, starts)

    async def _receive_payload(self, view: memoryview, clock: BatchClock) -> None:
        """Fill ``view`` (the caller holds a receive slot) while the client's clock runs.

        Raises:
            ProtocolError: ``TIMEOUT`` when the payload made no progress for
                ``payload_stall_timeout_s`` or the batch clock ran out.
            ConnectionLost: EOF or a broken stream first.
        """
        stall = self.ingest.network.payload_stall_timeout_s
        receiver: Receiver = self.connection.receiver
        got, want = 0, len(view)
        with clock.running() as deadline:
            while got < want:
                # What has arrived is taken without a wait (or a checkpoint:
                # the receive loop has one a batch); only then the timeouts.
                piece = view[got : got + _RECEIVE_PIECE]
                n = receiver.receive_into_nowait(piece)
                if n is None:
                    n = 0
                    self._release_acks()
                    with trio.move_on_at(min(deadline, trio.current_time() + stall)) as wait:
                        n = await receiver.receive_into(piece)
                    if wait.cancelled_caught:
                        if trio.current_time() >= deadline:
                            raise clock.expired()
                        raise ProtocolError(
                            ErrorCode.TIMEOUT, f"batch payload made no progress for {stall} s"
                        )
                if n == 0:
                    raise ConnectionLost(f"peer closed after {got} of {want} bytes", received=got)
                got += n


class BatchClock:
    """The time a client has for one batch (``batch_timeout_s``).

    It runs only inside :meth:`running`, around the waits for the client's
    bytes; the broker's own waits between them cost the client nothing.
    """

    __slots__ = ("_start", "budget", "left")

    def __init__(self, budget: float) -> None:
        self.budget = budget
        self.left = budget
        self._start = 0.0

    def running(self) -> BatchClock:
        """Run the clock for a ``with`` block, which gets the deadline it runs
        out at. (A plain context manager, not a generator: this runs for every
        batch, and a generator-based one costs several times as much.)"""
        return self

    def __enter__(self) -> float:
        self._start = trio.current_time()
        return self._start + self.left

    def __exit__(self, *exc_info: object) -> None:
        self.left -= trio.current_time() - self._start

    def expired(self) -> ProtocolError:
        """The error for a client whose clock ran out."""
        return ProtocolError(ErrorCode.TIMEOUT, f"batch not received within {self.budget} s")
