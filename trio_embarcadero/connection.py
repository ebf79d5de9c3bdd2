"""One task per accepted connection, with an explicit phase.

A publish connection moves through::

    INIT -> WAIT_HEADER -> WAIT_PAYLOAD -> WAIT_CXL -> COMPLETE -> WAIT_HEADER ...
                 ^  PAUSED (held at the gate by the pool monitor)
    ... -> DRAINING (EOF, error or shutdown: waiting for its batches to commit)
        -> CLOSED

``WAIT_HEADER`` covers the wait for the first header byte, which holds no
resource; from that byte to the last payload byte the connection holds one
slot of the receive limiter (``num_publish_receive_threads``), so idle
publishers cannot starve busy ones. On the staged path (``use_nonblocking``)
the payload goes into a staging buffer and ``WAIT_CXL`` is the hand-off to the
allocator tasks; on the direct path ``WAIT_CXL`` is the reservation of log
space, and the payload is received straight into the log.

Every way a connection can end is handled here: protocol violations get an
error frame and a close, timeouts get error 7, a vanished peer is logged.
None of them reach the broker's nursery.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import math
from collections.abc import Iterator
from functools import partial
from typing import TYPE_CHECKING

import trio

from .acks import AckCounter, run_ack_sender
from .allocator import StagedBatch, reserve
from .errors import ConnectionLost, ErrorCode, LogFullError, ProtocolError
from .transport import Receiver, Sender, receive_exactly, receiver_for
from .wire import (
    BATCH_HEADER_SIZE,
    HANDSHAKE_SIZE,
    BatchHeader,
    ClientRequest,
    Handshake,
    encode_error_frame,
    parse_batch_header,
    parse_handshake,
    scan_records,
)

if TYPE_CHECKING:
    from .broker import Broker
    from .cxl import Reservation

logger = logging.getLogger(__name__)


class ConnectionPhase(enum.Enum):
    """Where a connection task is (see the module docstring)."""

    INIT = "init"
    WAIT_HEADER = "wait_header"
    PAUSED = "paused"
    WAIT_PAYLOAD = "wait_payload"
    WAIT_CXL = "wait_cxl"
    COMPLETE = "complete"
    SUBSCRIBED = "subscribed"
    DRAINING = "draining"
    CLOSED = "closed"


class Connection:
    """The state and task of one accepted connection.

    Attributes:
        id: Broker-unique connection number (for logs).
        peer: ``"host:port"`` of the peer, or ``"memory"``.
        phase: The current :class:`ConnectionPhase`.
        handshake: The parsed handshake, once received.
        batches: Batches received whole from this connection.
        committed: Batches of this connection committed to the log.
    """

    def __init__(
        self,
        broker: Broker,
        stream: trio.abc.Stream,
        conn_id: int,
        peer: tuple[str, int] | None = None,
    ) -> None:
        self.broker = broker
        self.stream = stream
        self.id = conn_id
        self.peer_host: str | None = None
        self.peer = "memory"
        if peer is not None:
            self.peer_host = peer[0]
            self.peer = f"{peer[0]}:{peer[1]}"
        self.phase = ConnectionPhase.INIT
        self.handshake: Handshake | None = None
        self.batches = 0
        self.committed = 0
        self._receiver: Receiver = receiver_for(stream)
        self._sender = Sender(stream)
        self._error: ProtocolError | None = None
        self._placement_failed = False
        self._acks: AckCounter | None = None
        self._inflight = 0
        self._settled = trio.lowlevel.ParkingLot()
        self._receive_scope = trio.CancelScope()
        self._boundary_scope: trio.CancelScope | None = None
        self._stopping = False

    # -- what allocators and the log call back ---------------------------------

    @property
    def topic(self) -> str:
        assert self.handshake is not None
        return self.handshake.topic

    @property
    def failed(self) -> bool:
        """Whether a batch of this connection could not be placed in the log;
        its later batches must not be either (they would overtake it)."""
        return self._placement_failed

    def batch_committed(self, reservation: Reservation) -> None:
        self.committed += 1
        disk = self.broker.disk
        if self.handshake is not None and self.handshake.ack == 2 and disk is not None:
            disk.when_durable(reservation, partial(self._acked, reservation.header.num_msg))
        else:
            self._acked(reservation.header.num_msg)

    def _acked(self, messages: int) -> None:
        if self._acks is not None:
            self._acks.advance(messages)
        self._settle()

    def batch_discarded(self, error: LogFullError | None) -> None:
        if error is not None:
            self._placement_failed = True
            self.fail(ProtocolError(ErrorCode.LOG_FULL, f"no log space after retries: {error}"))
        self.broker.counters.batches_discarded += 1
        self._settle()

    def _settle(self) -> None:
        self._inflight -= 1
        self._settled.unpark_all()

    def fail(self, error: ProtocolError) -> None:
        """Stop receiving; the client gets ``error`` once acks are flushed."""
        if self._error is None:
            self._error = error
        self._receive_scope.cancel()

    @contextlib.contextmanager
    def at_boundary(self) -> Iterator[trio.CancelScope]:
        """A scope around waits that hold no work; :meth:`request_stop` cancels it."""
        with trio.CancelScope() as scope:
            if self._stopping:
                scope.cancel()
            self._boundary_scope = scope
            try:
                yield scope
            finally:
                self._boundary_scope = None

    @property
    def stopping(self) -> bool:
        """Whether a graceful shutdown asked this connection to stop."""
        return self._stopping

    async def send_frame(self, data: bytes | memoryview) -> None:
        """Write one whole frame to the peer.

        Raises:
            ConnectionLost: The peer is gone.
        """
        await self._sender.send_all(data)

    def request_stop(self) -> None:
        """Stop at the next batch boundary (graceful shutdown)."""
        self._stopping = True
        if self._boundary_scope is not None:
            self._boundary_scope.cancel()

    # -- the task --------------------------------------------------------------

    async def run(self) -> None:
        """Serve the connection until it ends; never raises for peer faults."""
        try:
            await self._run()
        except ConnectionLost as exc:
            logger.info("conn %d %s: %s", self.id, self.peer, exc)
        except ProtocolError as exc:
            await self._refuse(exc)
        finally:
            self.phase = ConnectionPhase.CLOSED
            await trio.aclose_forcefully(self.stream)

    async def _refuse(self, error: ProtocolError) -> None:
        self.broker.count_error(error.code)
        logger.warning("conn %d %s closed: %s", self.id, self.peer, error)
        with trio.move_on_after(self.broker.config.network.ack_connect_timeout_s) as scope:
            scope.shield = True
            try:
                await self._sender.send_all(encode_error_frame(error.code, error.message))
            except ConnectionLost:
                pass

    async def _run(self) -> None:
        net = self.broker.config.network
        buf = bytearray(HANDSHAKE_SIZE)
        try:
            with trio.fail_after(net.handshake_timeout_s):
                await receive_exactly(self._receiver, memoryview(buf))
        except trio.TooSlowError:
            raise ProtocolError(
                ErrorCode.TIMEOUT, f"no handshake within {net.handshake_timeout_s} s"
            ) from None
        except ConnectionLost as exc:
            if exc.received == 0:
                raise
            raise ProtocolError(
                ErrorCode.BAD_HANDSHAKE,
                f"short handshake: {exc.received} of {HANDSHAKE_SIZE} bytes",
            ) from None
        self.handshake = handshake = parse_handshake(buf)
        if handshake.request == ClientRequest.SUBSCRIBE:
            self.phase = ConnectionPhase.SUBSCRIBED
            await self.broker.serve_subscriber(self, handshake)
            return
        await self._publish(handshake)

    # -- publish ---------------------------------------------------------------

    async def _publish(self, handshake: Handshake) -> None:
        broker = self.broker
        if handshake.ack == 2 and broker.disk is None:
            raise ProtocolError(
                ErrorCode.NOT_ALLOWED, "ack level 2 needs a disk log (storage.dir is not set)"
            )
        # A topic name that cannot be created (table full) is refused up front.
        try:
            broker.log.stream(handshake.topic)
        except LogFullError as exc:
            raise ProtocolError(ErrorCode.LOG_FULL, str(exc)) from None
        dial_back = handshake.ack >= 1 and handshake.port != 0
        if dial_back:
            if self.peer_host is None:
                raise ProtocolError(ErrorCode.BAD_HANDSHAKE, "dial-back acks need a TCP peer")
            try:
                self._acks = await broker.dial_backs.attach(
                    handshake.client_id, handshake.topic, self.peer_host, handshake.port
                )
            except ConnectionLost as exc:
                raise ProtocolError(ErrorCode.BAD_HANDSHAKE, str(exc)) from None
        logger.debug(
            "conn %d %s publishes to %r with %s",
            self.id,
            self.peer,
            handshake.topic,
            f"ack {handshake.ack}" + (f" via port {handshake.port}" if dial_back else ""),
        )
        lost: ConnectionLost | None = None
        try:
            # Only the ack sender runs in this nursery; the outcome is raised
            # after it, so callers see a plain exception, never a group.
            async with trio.open_nursery() as nursery:
                ack_sender_done = trio.Event()
                if handshake.ack >= 1 and not dial_back:
                    self._acks = counter = AckCounter()

                    async def send_acks() -> None:
                        try:
                            await run_ack_sender(counter, self._sender.send_all, broker.broker_id)
                        except ConnectionLost as exc:
                            logger.info("conn %d %s: ack stream: %s", self.id, self.peer, exc)
                            self._receive_scope.cancel()
                        finally:
                            ack_sender_done.set()

                    nursery.start_soon(send_acks)
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
                    timeout = broker.config.network.batch_timeout_s
                    self.fail(
                        ProtocolError(ErrorCode.TIMEOUT, f"batch not received within {timeout} s")
                    )
                self.phase = ConnectionPhase.DRAINING
                await self._wait_settled()
                if self._acks is not None and not dial_back:
                    self._acks.close()
                await ack_sender_done.wait()
        finally:
            if dial_back and self._acks is not None:
                broker.dial_backs.detach(handshake.client_id, handshake.topic)
        if self._error is None and self._stopping:
            self._error = ProtocolError(ErrorCode.SHUTTING_DOWN, "broker is shutting down")
        if self._error is not None:
            raise self._error
        if lost is not None:
            if lost.received:
                logger.warning("conn %d %s: batch cut short: %s", self.id, self.peer, lost)
            raise lost

    async def _wait_below_inflight_cap(self) -> None:
        # Batches received but not yet acked at this connection's level: with
        # the staged path they hold buffers; at ack level 2 they wait for the
        # disk. Either way the publisher must not run further ahead.
        while self._inflight >= self.broker.config.network.max_buffers_per_connection:
            self.phase = ConnectionPhase.WAIT_CXL
            await self._settled.park()

    async def _wait_settled(self) -> None:
        while self._inflight:
            await self._settled.park()

    async def _receive_batches(self) -> None:
        broker = self.broker
        net = broker.config.network
        header_buf = bytearray(BATCH_HEADER_SIZE)
        header_view = memoryview(header_buf)
        previous: trio.Event | None = None
        while not self._stopping:
            # The batch boundary: idle and paused waits hold no resources and
            # are cut short by a graceful shutdown.
            got = 0
            with self.at_boundary():
                while True:
                    if broker.gate.paused:
                        self.phase = ConnectionPhase.PAUSED
                        await broker.gate.wait_open()
                    self.phase = ConnectionPhase.WAIT_HEADER
                    # The idle clock restarts after a pause: waiting at the
                    # gate is the broker's doing, not the client's.
                    idle_deadline = (
                        trio.current_time() + net.idle_timeout_s if net.idle_timeout_s else math.inf
                    )
                    with broker.gate.interruptible() as wait:
                        wait.deadline = idle_deadline
                        got = await self._receiver.receive_into(header_view)
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
            async with broker.receive_limiter:
                # batch_timeout_s runs from the first header byte to the last
                # payload byte, less the wait for a receive slot: that wait is
                # the broker's doing (other receivers, maybe stalled ones).
                deadline = trio.current_time() + net.batch_timeout_s
                with trio.fail_at(deadline):
                    await receive_exactly(self._receiver, header_view[got:])
                header = parse_batch_header(header_buf, net.effective_max_batch_bytes)
                if net.use_nonblocking:
                    previous = await self._receive_staged(header, previous, deadline)
                else:
                    await self._receive_direct(header, deadline)
            self.phase = ConnectionPhase.COMPLETE

    async def _receive_staged(
        self, header: BatchHeader, previous: trio.Event | None, deadline: float
    ) -> trio.Event:
        broker = self.broker
        total = header.total_size
        await self._wait_below_inflight_cap()
        buffer = broker.pool.allocate()
        if buffer is None:
            self.phase = ConnectionPhase.PAUSED
            buffer = await broker.pool.acquire()
        try:
            self.phase = ConnectionPhase.WAIT_PAYLOAD
            with trio.fail_at(deadline):
                await receive_exactly(self._receiver, buffer.view[:total])
            starts = scan_records(buffer.array[:total], header.num_msg)
            broker.count_received(header)
            self.batches += 1
            batch = StagedBatch(self, header, buffer, starts, previous)
            buffer.hand_off()
            self.phase = ConnectionPhase.WAIT_CXL
            self._inflight += 1
            try:
                await broker.batch_send.send(batch)
            except BaseException:
                self._inflight -= 1
                raise
        except BaseException:
            buffer.release()
            raise
        return batch.done

    async def _receive_direct(self, header: BatchHeader, deadline: float) -> None:
        broker = self.broker
        await self._wait_below_inflight_cap()
        self.phase = ConnectionPhase.WAIT_CXL
        try:
            reservation = await reserve(
                broker.log,
                self.topic,
                header,
                broker.backoff,
                broker.allocation,
                self.batch_committed,
            )
        except LogFullError as exc:
            raise ProtocolError(ErrorCode.LOG_FULL, f"no log space after retries: {exc}") from None
        try:
            self.phase = ConnectionPhase.WAIT_PAYLOAD
            with trio.fail_at(deadline):
                await receive_exactly(self._receiver, reservation.payload.data)
            starts = scan_records(reservation.payload, header.num_msg)
        except BaseException:
            broker.log.abandon(reservation)
            raise
        broker.count_received(header)
        self.batches += 1
        self._inflight += 1
        broker.log.complete(reservation, starts)
