"""The broker: the nursery tree that ties every part together.

::

    serve()
    └── service scope (shielded: outer cancellation starts a graceful drain)
        ├── pool monitor, statistics reporter
        └── allocator nursery: num_cxl_allocation_workers allocator tasks
            └── ack nursery: dial-back ack connections
                └── connection nursery: one task per connection
                    └── listener (trio.serve_listeners)

Shutdown is cancellation: when the scope around :func:`serve` is cancelled
(or :func:`open_broker`'s block exits), the broker stops accepting, lets
every connection finish the batch it is receiving, commits everything staged,
sends every ack owed and error 5 to each publisher, then returns. The whole
drain is bounded by ``network.shutdown_grace_s``; what is left after that is
cancelled.
"""

from __future__ import annotations

import collections
import ipaddress
import itertools
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from functools import partial
from typing import NoReturn

import attrs
import trio

from .acks import DialBackRegistry, DialBackStatistics
from .allocator import AllocationCounters, Backoff, StagedBatch, run_allocator
from .config import Config, parse_networks
from .connection import Connection, ConnectionPhase
from .cxl import CxlLog, CxlStatistics
from .errors import ErrorCode, ProtocolError
from .monitor import PauseGate, run_pool_monitor
from .staging import StagingPool, StagingPoolStatistics
from .storage import DiskLog, DiskStatistics
from .subscription import serve_subscriber
from .wire import BatchHeader, Handshake, encode_error_frame

logger = logging.getLogger(__name__)


@attrs.define
class IngestCounters:
    """Counters the connection tasks keep."""

    connections_accepted: int = 0
    connections_refused: int = 0
    batches_received: int = 0
    messages_received: int = 0
    bytes_received: int = 0
    batches_discarded: int = 0
    internal_errors: int = 0


@attrs.frozen
class BrokerStatistics:
    """A snapshot of everything the broker counts.

    Attributes:
        connections: Open connections by :class:`ConnectionPhase` value.
        pool: Staging pool occupancy.
        log: CXL log counters (commits, full events, segments).
        errors: Error frames sent, by lower-case error code name.
        paused: Whether the pool monitor is holding receivers.
        pauses: Times the pool monitor paused receivers.
        resumes: Times it resumed them.
        allocation_retries: Reservation attempts retried after a full log.
        backoff_seconds: Total time spent in those retries' sleeps.
        allocation_failures: Batches refused after every retry (error 4).
        queued_batches: Staged batches waiting for an allocator.
        dial_backs: Dial-back ack connection counters.
        disk: Disk log counters (None without ``storage.dir``).
    """

    connections: dict[str, int]
    connections_accepted: int
    connections_refused: int
    batches_received: int
    messages_received: int
    bytes_received: int
    batches_committed: int
    messages_committed: int
    bytes_committed: int
    batches_discarded: int
    pool: StagingPoolStatistics
    paused: bool
    pauses: int
    resumes: int
    allocation_retries: int
    backoff_seconds: float
    allocation_failures: int
    queued_batches: int
    errors: dict[str, int]
    internal_errors: int
    log: CxlStatistics
    dial_backs: DialBackStatistics
    disk: DiskStatistics | None

    def summary(self) -> str:
        """One log line: what moved and where the pressure is."""
        busy = ",".join(f"{k}={v}" for k, v in sorted(self.connections.items()) if v)
        return (
            f"conns[{busy or 'none'}] recv {self.batches_received}b/{self.messages_received}m/"
            f"{self.bytes_received / 2**20:.1f}MiB committed {self.batches_committed}b/"
            f"{self.messages_committed}m pool {self.pool.used}/{self.pool.num_buffers} "
            f"(peak {self.pool.peak_used}) pauses {self.pauses} retries {self.allocation_retries} "
            f"ring_full {self.log.ring_full} log_full {self.log.log_full} "
            f"errors {sum(self.errors.values())}"
        )


class Broker:
    """A running broker; handed out by :func:`serve` and :func:`open_broker`.

    Attributes:
        config: The configuration it runs with.
        host: The address it listens on.
        port: The data port it is bound to (the real one when configured as 0).
        log: The CXL log it writes.
    """

    def __init__(
        self,
        config: Config,
        log: CxlLog,
        listeners: Sequence[trio.abc.Listener[trio.abc.Stream]],
        disk: DiskLog | None = None,
    ) -> None:
        net = config.network
        self._listeners = list(listeners)
        self.config = config
        self.broker_id = config.broker.id
        self.host = config.broker.host
        # The bound port of the first TCP listener (the real one for port 0).
        self.port = next(
            (
                lst.socket.getsockname()[1]
                for lst in self._listeners
                if isinstance(lst, trio.SocketListener)
            ),
            0,
        )
        self.log = log
        self.disk = disk
        self.pool = StagingPool(
            net.staging_pool_num_buffers if net.use_nonblocking else 1,
            net.staging_buffer_bytes if net.use_nonblocking else 1,
        )
        self.gate = PauseGate()
        self.receive_limiter = trio.CapacityLimiter(net.num_publish_receive_threads)
        self.backoff = Backoff(
            net.backoff_initial_us / 1e6, net.backoff_max_us / 1e6, net.backoff_max_retries
        )
        self.allocation = AllocationCounters()
        self.counters = IngestCounters()
        self.errors: collections.Counter[str] = collections.Counter()
        self.connections: set[Connection] = set()
        self.shutting_down = False
        self._ids = itertools.count(1)
        self._batch_send: trio.MemorySendChannel[StagedBatch] | None = None
        self._dial_backs: DialBackRegistry | None = None
        self._service_scope: trio.CancelScope | None = None
        self._accept_scope = trio.CancelScope()
        self._allowed = parse_networks(net.allowed_networks)

    # -- what connections use ----------------------------------------------------

    @property
    def batch_send(self) -> trio.MemorySendChannel[StagedBatch]:
        assert self._batch_send is not None
        return self._batch_send

    @property
    def dial_backs(self) -> DialBackRegistry:
        assert self._dial_backs is not None
        return self._dial_backs

    def count_received(self, header: BatchHeader) -> None:
        c = self.counters
        c.batches_received += 1
        c.messages_received += header.num_msg
        c.bytes_received += header.total_size

    def count_error(self, code: ErrorCode) -> None:
        self.errors[code.name.lower()] += 1

    async def serve_subscriber(self, connection: Connection, handshake: Handshake) -> None:
        await serve_subscriber(self, connection, handshake)

    # -- observing -----------------------------------------------------------------

    def statistics(self) -> BrokerStatistics:
        """Return a frozen snapshot of the broker's counters."""
        phases = collections.Counter(c.phase.value for c in self.connections)
        log = self.log.statistics()
        c = self.counters
        channel = self._batch_send.statistics().current_buffer_used if self._batch_send else 0
        dial = self._dial_backs.statistics() if self._dial_backs else DialBackStatistics(0, 0, 0)
        return BrokerStatistics(
            connections={p.value: phases.get(p.value, 0) for p in ConnectionPhase},
            connections_accepted=c.connections_accepted,
            connections_refused=c.connections_refused,
            batches_received=c.batches_received,
            messages_received=c.messages_received,
            bytes_received=c.bytes_received,
            batches_committed=log.batches_committed,
            messages_committed=log.messages_committed,
            bytes_committed=log.bytes_committed,
            batches_discarded=c.batches_discarded,
            pool=self.pool.statistics(),
            paused=self.gate.paused,
            pauses=self.gate.pauses,
            resumes=self.gate.resumes,
            allocation_retries=self.allocation.retries,
            backoff_seconds=self.allocation.backoff_seconds,
            allocation_failures=self.allocation.exhausted,
            queued_batches=channel,
            errors=dict(self.errors),
            internal_errors=c.internal_errors,
            log=log,
            dial_backs=dial,
            disk=self.disk.statistics() if self.disk is not None else None,
        )

    # -- running ---------------------------------------------------------------------

    def begin_shutdown(self) -> None:
        """Start the graceful drain (idempotent); :func:`serve` calls it when cancelled."""
        if self.shutting_down:
            return
        self.shutting_down = True
        logger.info(
            "shutting down: draining %d connection(s) within %.1f s",
            len(self.connections),
            self.config.network.shutdown_grace_s,
        )
        self._accept_scope.cancel()
        for connection in list(self.connections):
            connection.request_stop()
        if self._service_scope is not None:
            self._service_scope.deadline = (
                trio.current_time() + self.config.network.shutdown_grace_s
            )

    def abort(self) -> None:
        """Cancel everything now, without waiting for the drain to finish."""
        self.begin_shutdown()
        if self._service_scope is not None:
            self._service_scope.cancel()

    async def _run(self, task_status: trio.TaskStatus[None]) -> None:
        net = self.config.network
        with trio.CancelScope(shield=True) as self._service_scope:
            async with trio.open_nursery() as services:
                if net.use_nonblocking:
                    await services.start(
                        partial(
                            run_pool_monitor,
                            self.pool,
                            self.gate,
                            high_watermark=net.pause_high_watermark,
                            low_watermark=net.resume_low_watermark,
                        )
                    )
                await services.start(self._report)
                async with trio.open_nursery() as durable:
                    if self.disk is not None:
                        await durable.start(self.disk.run)
                    await self._run_ingest(task_status)
                    if self.disk is not None:
                        self.disk.finish()  # sync what the drain committed, then stop
                services.cancel_scope.cancel()
        if self._service_scope.cancelled_caught:
            logger.warning("shutdown grace period over: remaining work cancelled")
        logger.info("stats: %s", self.statistics().summary())

    async def _run_ingest(self, task_status: trio.TaskStatus[None]) -> None:
        """Allocators, ack connections and connections; returns once drained."""
        net = self.config.network
        async with trio.open_nursery() as allocators:
            send, receive = trio.open_memory_channel[StagedBatch](net.allocation_queue_size)
            async with send, receive:
                self._batch_send = send
                workers = net.num_cxl_allocation_workers if net.use_nonblocking else 0
                for _ in range(workers):
                    await allocators.start(
                        partial(
                            run_allocator, receive.clone(), self.log, self.backoff, self.allocation
                        )
                    )
                async with trio.open_nursery() as acks:
                    self._dial_backs = DialBackRegistry(
                        acks, self.broker_id, net.ack_connect_timeout_s
                    )
                    async with trio.open_nursery() as connections:
                        await connections.start(self._accept, connections)
                        task_status.started()
            # Leaving the block closed the send side: allocators drain what is
            # queued, then return.

    async def _accept(
        self, connections: trio.Nursery, *, task_status: trio.TaskStatus[None]
    ) -> None:
        # Its own scope, so a shutdown stops accepting while connections go on.
        with self._accept_scope:
            async with trio.open_nursery() as accepting:
                await accepting.start(
                    partial(
                        trio.serve_listeners,
                        self._handle,
                        self._listeners,
                        handler_nursery=connections,
                    )
                )
                for listener in self._listeners:
                    if isinstance(listener, trio.SocketListener):
                        host, port, *_ = listener.socket.getsockname()
                        logger.info("listening on %s:%d", host, port)
                task_status.started()

    async def _handle(self, stream: trio.abc.Stream) -> None:
        """Serve one connection; nothing a peer does can raise out of here."""
        peer: tuple[str, int] | None = None
        if isinstance(stream, trio.SocketStream):
            try:
                host, port, *_ = stream.socket.getpeername()
            except OSError as exc:  # reset before we got to it: nothing to serve
                self.counters.connections_accepted += 1
                logger.info("a connection was gone before it was served: %s", exc)
                await trio.aclose_forcefully(stream)
                return
            peer = (host, port)
        refusal = self._refusal(peer)
        if refusal is not None:
            await self._refuse(stream, refusal)
            return
        self.counters.connections_accepted += 1
        connection = Connection(self, stream, next(self._ids), peer)
        self.connections.add(connection)
        try:
            await connection.run()
        except Exception:
            # A bug, not a peer fault: keep serving everyone else, loudly.
            self.counters.internal_errors += 1
            logger.exception("conn %d %s: internal error", connection.id, connection.peer)
        finally:
            self.connections.discard(connection)

    def _refusal(self, peer: tuple[str, int] | None) -> ProtocolError | None:
        net = self.config.network
        if self.shutting_down:
            return ProtocolError(ErrorCode.SHUTTING_DOWN, "broker is shutting down")
        if len(self.connections) >= net.max_connections:
            return ProtocolError(
                ErrorCode.NOT_ALLOWED, f"connection limit reached ({net.max_connections})"
            )
        if self._allowed and peer is not None:
            host = peer[0]
            address = ipaddress.ip_address(host)
            if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
                address = address.ipv4_mapped
            if not any(address in network for network in self._allowed):
                return ProtocolError(ErrorCode.NOT_ALLOWED, f"{host} is not an allowed network")
        return None

    async def _refuse(self, stream: trio.abc.Stream, error: ProtocolError) -> None:
        self.counters.connections_refused += 1
        self.count_error(error.code)
        logger.warning("refused a connection: %s", error.message)
        with trio.move_on_after(1):
            try:
                await stream.send_all(encode_error_frame(error.code, error.message))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        await trio.aclose_forcefully(stream)

    async def _report(self, *, task_status: trio.TaskStatus[None]) -> NoReturn:
        task_status.started()
        last = None
        while True:
            await trio.sleep(self.config.network.stats_interval_s)
            stats = self.statistics()
            moved = (stats.bytes_received, stats.batches_committed, stats.errors, stats.pauses)
            if moved != last:
                logger.info("stats: %s", stats.summary())
            last = moved


def _open_logs(config: Config, reset: bool) -> tuple[CxlLog, DiskLog | None]:
    cxl = config.cxl
    log = CxlLog.open(
        cxl.path,
        size=cxl.size_bytes,
        segment_size=cxl.segment_bytes,
        max_topics=cxl.max_topics,
        max_brokers=cxl.max_brokers,
        broker_id=config.broker.id,
        max_inflight_batches=cxl.max_inflight_batches,
        reset=reset,
        prefault=cxl.prefault,
    )
    if not config.storage.dir:
        return log, None
    try:
        disk = DiskLog.open(
            config.storage.dir,
            log,
            sync_interval=config.storage.sync_interval_ms / 1000,
            sync_bytes=config.storage.sync_bytes,
            reset=reset,
        )
    except BaseException:
        log.close()
        raise
    return log, disk


async def _open_log(config: Config, reset: bool) -> tuple[CxlLog, DiskLog | None]:
    if not config.cxl.prefault and not config.storage.dir:
        # Mapping without faulting pages in is instant; no thread, so tests
        # on Trio's mock clock see no spurious idle time here.
        await trio.lowlevel.checkpoint()
        return _open_logs(config, reset)
    # Faulting in a large region (~1 GB/s) and reading disk logs take a
    # while; keep the event loop free.
    return await trio.to_thread.run_sync(_open_logs, config, reset)


async def _start(
    config: Config,
    reset: bool,
    listeners: Sequence[trio.abc.Listener[trio.abc.Stream]] | None,
) -> Broker:
    """Open the logs and bind the listeners: everything that can fail at start."""
    log, disk = await _open_log(config, reset)
    try:
        if listeners is None:
            listeners = await trio.open_tcp_listeners(
                config.broker.data_port, host=config.broker.host
            )
    except BaseException:
        _close_logs(log, disk)
        raise
    return Broker(config, log, listeners, disk)


def _close_logs(log: CxlLog, disk: DiskLog | None) -> None:
    if disk is not None:
        disk.close()
    try:
        log.close()
    except BufferError:  # pragma: no cover - a view escaped; the GC unmaps it
        logger.debug("CXL mapping still referenced at close; leaving it to the GC")


async def _serve(broker: Broker, *, task_status: trio.TaskStatus[Broker]) -> NoReturn:
    try:
        async with trio.open_nursery() as nursery:
            try:
                # Trio does not hand a started task over to its nursery when the
                # caller of start() was cancelled meanwhile: start() would then
                # wait for the (shielded, endless) services. Start-up is short
                # (spawning tasks), so it runs uncancellable, and a cancellation
                # that came during it begins the drain right after.
                with trio.CancelScope(shield=True):
                    await nursery.start(broker._run)
                task_status.started(broker)
                await trio.sleep_forever()
            finally:
                broker.begin_shutdown()
    finally:
        _close_logs(broker.log, broker.disk)
    raise AssertionError("unreachable")  # pragma: no cover


async def serve(
    config: Config,
    *,
    reset: bool = False,
    listeners: Sequence[trio.abc.Listener[trio.abc.Stream]] | None = None,
    task_status: trio.TaskStatus[Broker] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Run a broker until cancelled, then drain gracefully and return.

    Use with ``await nursery.start(serve, config)``, which returns the
    :class:`Broker` once it is listening (its ``port`` is the bound port, so
    ``broker.port = 0`` in the config works for tests).

    Args:
        config: The broker's configuration.
        reset: Discard the contents of an existing CXL file (and disk log)
            instead of re-attaching to it.
        listeners: Accept on these instead of binding ``broker.host`` and
            the data port (socket activation, in-memory tests).
        task_status: Receives the :class:`Broker` once it accepts connections.

    Raises:
        LayoutError: The CXL file or disk log exists with another layout.
        OSError: The CXL file cannot be mapped or the port cannot be bound.

    Error handling:
        Nothing a client sends or fails to send raises out of here; it costs
        that client its connection, with an error frame saying why.
    """
    await _serve(await _start(config, reset, listeners), task_status=task_status)


@asynccontextmanager
async def open_broker(
    config: Config,
    *,
    reset: bool = False,
    listeners: Sequence[trio.abc.Listener[trio.abc.Stream]] | None = None,
) -> AsyncIterator[Broker]:
    """Run a broker for the duration of an ``async with`` block.

    Leaving the block drains the broker gracefully (see :func:`serve`).

    Args:
        config: The broker's configuration.
        reset: As for :func:`serve`.
        listeners: As for :func:`serve`.

    Yields:
        The running :class:`Broker`.

    Raises:
        LayoutError: As for :func:`serve`, raised as is (not in a group).
        OSError: As for :func:`serve`, raised as is.
    """
    # Start-up failures happen here, before the nursery, so they reach the
    # caller unwrapped.
    broker = await _start(config, reset, listeners)
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(_serve, broker))
        try:
            yield broker
        finally:
            nursery.cancel_scope.cancel()


__all__ = ["Broker", "BrokerStatistics", "open_broker", "serve"]
