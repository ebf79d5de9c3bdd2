"""The publish session: batches in, acks out.

After the handshake a publisher streams ``[batch header][payload]`` pairs.
``WAIT_HEADER`` covers the wait for the first header byte, which holds no
resource; from that byte to the last payload byte the session holds one slot
of the receive limiter (``num_publish_receive_threads``), so idle publishers
cannot starve busy ones. On the staged path (``use_nonblocking``) the payload
goes into a staging buffer and ``WAIT_CXL`` is the hand-off to the allocator
tasks; on the direct path ``WAIT_CXL`` is the reservation of log space, and
the payload is received straight into the log.

The session is handed an :class:`IngestPath` (the shared parts of the
ingest path it may use) and never sees the broker itself. It owns the
reservations of its batches: the commit feed calls
:meth:`PublishSession.batch_committed`, the allocators
:meth:`PublishSession.batch_discarded`.
"""

from __future__ import annotations

import logging
import math

import attrs
import trio

from ..config import NetworkConfig
from ..errors import ConnectionLost, ErrorCode, LayoutError, LogFullError, ProtocolError
from ..log import CxlLog, Reservation
from ..transport import receive_exactly
from ..wire import BATCH_HEADER_SIZE, BatchHeader, Handshake, parse_batch_header, scan_records
from .acks import AckCounter, DialBackRegistry, run_ack_sender
from .allocator import AllocationCounters, Backoff, StagedBatch, reserve
from .commits import CommitFeed
from .connection import Connection, ConnectionPhase
from .durability import Durability
from .monitor import PauseGate
from .staging import StagingPool
from .statistics import IngestCounters

logger = logging.getLogger(__name__)


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
        self._inflight = 0
        self._settled = trio.lowlevel.ParkingLot()
        self._receive_scope = trio.CancelScope()

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
        messages = reservation.header.num_msg
        if self.handshake.ack == 2 and durability is not None:
            durability.when_durable(reservation, lambda: self._acked(messages))
        else:
            self._acked(messages)

    def _acked(self, messages: int) -> None:
        if self._acks is not None:
            self._acks.advance(messages)
        self._settle()

    def batch_discarded(self, error: LogFullError | None) -> None:
        """One of this session's batches will never be in the log."""
        if error is not None:
            self._placement_failed = True
            self.fail(ProtocolError(ErrorCode.LOG_FULL, f"no log space after retries: {error}"))
        self.ingest.counters.batches_discarded += 1
        self._settle()

    def _settle(self) -> None:
        self._inflight -= 1
        self._settled.unpark_all()

    def fail(self, error: ProtocolError) -> None:
        """Stop receiving; the client gets ``error`` once acks are flushed."""
        if self._error is None:
            self._error = error
        self._receive_scope.cancel()

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
        # A topic name that cannot be created (table full) is refused up front.
        try:
            ingest.log.stream(handshake.topic)
        except LogFullError as exc:
            raise ProtocolError(ErrorCode.LOG_FULL, str(exc)) from None
        dial_back = handshake.ack >= 1 and handshake.port != 0
        if dial_back:
            if conn.peer_host is None:
                raise ProtocolError(ErrorCode.BAD_HANDSHAKE, "dial-back acks need a TCP peer")
            try:
                self._acks = await ingest.dial_backs.attach(
                    handshake.client_id, handshake.topic, conn.peer_host, handshake.port
                )
            except ConnectionLost as exc:
                raise ProtocolError(ErrorCode.BAD_HANDSHAKE, str(exc)) from None
        logger.debug(
            "conn %d %s publishes to %r with %s",
            conn.id,
            conn.peer,
            handshake.topic,
            f"ack {handshake.ack}" + (f" via port {handshake.port}" if dial_back else ""),
        )
        lost: ConnectionLost | None = None
        refused: LayoutError | None = None
        try:
            # Only the ack sender runs in this nursery; the outcome is raised
            # after it, so callers see a plain exception, never a group.
            async with trio.open_nursery() as nursery:
                ack_sender_done = trio.Event()
                if handshake.ack >= 1 and not dial_back:
                    self._acks = counter = AckCounter()
                    nursery.start_soon(self._send_acks, counter, ack_sender_done)
                else:
                    ack_sender_done.set()
                try:
                    with self._receive_scope:
                        await self._receive_batches()
                except ConnectionLost as exc:
                    lost = exc
                except ProtocolError as exc:
                    self.fail(exc)
                except trio.TooSlowError:
                    timeout = ingest.network.batch_timeout_s
                    self.fail(
                        ProtocolError(ErrorCode.TIMEOUT, f"batch not received within {timeout} s")
                    )
                except LayoutError as exc:
                    # The log refused a commit: another process wrote this
                    # broker's streams. Nothing more settles; the broker stops.
                    refused = exc
                    nursery.cancel_scope.cancel()
                if refused is None:
                    conn.phase = ConnectionPhase.DRAINING
                    await self._wait_settled()
                    if self._acks is not None and not dial_back:
                        self._acks.close()
                    await ack_sender_done.wait()
        finally:
            if dial_back and self._acks is not None:
                ingest.dial_backs.detach(handshake.client_id, handshake.topic)
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

    async def _send_acks(self, counter: AckCounter, done: trio.Event) -> None:
        conn = self.connection
        try:
            await run_ack_sender(counter, conn.send_frame, self.ingest.broker_id)
        except ConnectionLost as exc:
            logger.info("conn %d %s: ack stream: %s", conn.id, conn.peer, exc)
            self._receive_scope.cancel()
        finally:
            done.set()

    async def _wait_below_inflight_cap(self) -> None:
        # Batches received but not yet acked at this session's level: with the
        # staged path they hold buffers; at ack level 2 they wait for the
        # disk. Either way the publisher must not run further ahead.
        while self._inflight >= self.ingest.network.max_buffers_per_connection:
            self.connection.phase = ConnectionPhase.WAIT_CXL
            await self._settled.park()

    async def _wait_settled(self) -> None:
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
            # are cut short by a graceful shutdown.
            got = 0
            with conn.at_boundary():
                while True:
                    if gate.paused:
                        conn.phase = ConnectionPhase.PAUSED
                        await gate.wait_open()
                    conn.phase = ConnectionPhase.WAIT_HEADER
                    # The idle clock restarts after a pause: waiting at the
                    # gate is the broker's doing, not the client's.
                    idle_deadline = (
                        trio.current_time() + net.idle_timeout_s if net.idle_timeout_s else math.inf
                    )
                    with gate.interruptible() as wait:
                        wait.deadline = idle_deadline
                        got = await receiver.receive_into(header_view)
                    if not wait.cancelled_caught:
                        break
                    # A pause may come and go before this task runs again, so
                    # the clock, not the gate, tells a timeout from a pause.
                    if trio.current_time() >= idle_deadline:
                        raise ProtocolError(
                            ErrorCode.TIMEOUT, f"idle for {net.idle_timeout_s} s between batches"
                        )
            if got == 0:  # EOF, or stopped while no batch had started
                return
            async with ingest.receive_limiter:
                # batch_timeout_s runs from the first header byte to the last
                # payload byte, less the wait for a receive slot: that wait is
                # the broker's doing (other receivers, maybe stalled ones).
                deadline = trio.current_time() + net.batch_timeout_s
                with trio.fail_at(deadline):
                    await receive_exactly(receiver, header_view[got:])
                header = parse_batch_header(header_buf, net.effective_max_batch_bytes)
                if net.use_nonblocking:
                    previous = await self._receive_staged(header, previous, deadline)
                else:
                    await self._receive_direct(header, deadline)
            conn.phase = ConnectionPhase.COMPLETE

    async def _receive_staged(
        self, header: BatchHeader, previous: trio.Event | None, deadline: float
    ) -> trio.Event:
        ingest, conn = self.ingest, self.connection
        total = header.total_size
        await self._wait_below_inflight_cap()
        buffer = ingest.pool.allocate()
        if buffer is None:
            conn.phase = ConnectionPhase.PAUSED
            buffer = await ingest.pool.acquire()
        try:
            conn.phase = ConnectionPhase.WAIT_PAYLOAD
            with trio.fail_at(deadline):
                await receive_exactly(conn.receiver, buffer.view[:total])
            starts = scan_records(buffer.array[:total], header.num_msg)
            ingest.counters.count_received(header)
            self.batches += 1
            batch = StagedBatch(self, header, buffer, starts, previous)
            buffer.hand_off()
            conn.phase = ConnectionPhase.WAIT_CXL
            self._inflight += 1
            try:
                await ingest.batches.send(batch)
            except BaseException:
                self._inflight -= 1
                raise
        except BaseException:
            buffer.release()
            raise
        return batch.done

    async def _receive_direct(self, header: BatchHeader, deadline: float) -> None:
        ingest, conn = self.ingest, self.connection
        await self._wait_below_inflight_cap()
        conn.phase = ConnectionPhase.WAIT_CXL
        try:
            reservation = await reserve(
                ingest.log, self.topic, header, ingest.backoff, ingest.allocation, self
            )
        except LogFullError as exc:
            raise ProtocolError(ErrorCode.LOG_FULL, f"no log space after retries: {exc}") from None
        try:
            conn.phase = ConnectionPhase.WAIT_PAYLOAD
            with trio.fail_at(deadline):
                await receive_exactly(conn.receiver, reservation.payload.data)
            starts = scan_records(reservation.payload, header.num_msg)
        except BaseException:
            ingest.commits.abandon(reservation)
            raise
        ingest.counters.count_received(header)
        self.batches += 1
        self._inflight += 1
        ingest.commits.complete(reservation, starts)
