"""The broker: the nursery tree that ties every part together.

::

    serve()
    └── service scope (shielded: outer cancellation starts a graceful drain)
        ├── pool monitor, statistics reporter, heartbeat (the broker table entry), retention,
        │   ordering (the sequencer while this broker holds its lease; acks of order-5
        │   topics wait for it)
        ├── HTTP endpoint (metrics, admin API; up until the drain is over)
        ├── gRPC cluster service for the C++ client (broker 0 with cluster.grpc_port)
        └── durable nursery: disk writer (with storage.dir)
            └── allocator nursery: num_cxl_allocation_workers allocator tasks
                └── ack nursery: dial-back ack connections
                    └── connection nursery: one task per connection
                        └── listener (trio.serve_listeners)

Each connection task gets a :class:`~.publish.IngestPath` (the parts of the
ingest path a session may use) and never this module.

The broker joins the region's broker table once it listens, marks itself
draining when the drain begins and leaves the table before its logs close
(:mod:`.membership`).

Shutdown is cancellation: when the scope around :func:`serve` is cancelled
(or :func:`open_broker`'s block exits), the broker stops accepting, lets
every connection finish the batch it is receiving, commits everything staged,
sends every ack owed and error 5 to each publisher, then returns. The whole
drain is bounded by ``network.shutdown_grace_s``; what is left after that is
cancelled.

A broker whose disk log fails stops itself the same way (its waiting ack-2
publishers get error 8 instead of their counts) and then raises the
:class:`~trio_embarcadero.errors.StorageError`, once, not in a group.
"""

from __future__ import annotations

import collections
import ipaddress
import itertools
import logging
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from functools import partial
from typing import NoReturn

import attrs
import trio

from ..config import Config, TopicSettings, parse_networks
from ..errors import ErrorCode, LayoutError, ListenError, ProtocolError, StorageError
from ..log import CxlLog, DiskLog, Reservation
from ..log.layout import read_topic_state, read_topics
from ..log.ownership import BrokerLock, claim_disk_log, claim_region, settings_path
from ..log.region import check_memory_ordering
from ..log.sessions import Claim
from ..log.settings import TopicSettingsFile, remove_settings
from ..transport import is_ip_socket, receive_buffer_cap, set_receive_buffer
from ..wire import encode_error_frame
from .acks import DialBackRegistry, DialBackStatistics
from .admin import AdminApi
from .allocator import AllocationCounters, Backoff, LogSpace, StagedBatch, run_allocator
from .commits import CommitFeed
from .connection import Connection, ConnectionPhase
from .durability import Durability
from .http import serve_http
from .membership import Membership
from .monitor import PauseGate, run_pool_monitor
from .ordering import OrderWaits, SequencerRole, run_ordering
from .publish import IngestPath
from .retention import make_room, reclaimable_units, retention_configured, run_retention
from .session import serve_connection
from .sessions import Sessions
from .staging import StagingPool
from .statistics import BrokerStatistics, IngestCounters, error_frame_log_level

logger = logging.getLogger(__name__)


_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _client_address(host: str) -> _Address:
    """The client's address; an IPv4 client reaching an IPv6 socket counts as IPv4."""
    address = ipaddress.ip_address(host)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class Broker:
    """A running broker; handed out by :func:`serve` and :func:`open_broker`.

    Attributes:
        config: The configuration it runs with.
        host: The address it listens on.
        port: The data port it is bound to (the real one when configured as 0).
        http_port: The port of its HTTP endpoint (metrics, admin API), the
            real one when ephemeral; None when ``http.enabled`` is false.
        grpc_port: The port of its gRPC cluster service for the C++ client,
            the real one when ephemeral; None when it serves none (broker 0
            serves it when ``cluster.grpc_port`` is set).
        log: The CXL log it writes.
        commits: Where reservations are completed or abandoned (the commit feed).
        failure: Why the broker stopped itself (its disk log failed), or None.
    """

    def __init__(
        self,
        config: Config,
        log: CxlLog,
        listeners: Sequence[trio.abc.Listener[trio.abc.Stream]],
        disk: DiskLog | None = None,
        http_listeners: Sequence[trio.SocketListener] = (),
        grpc_listeners: Sequence[trio.SocketListener] = (),
    ) -> None:
        net = config.network
        self._listeners = list(listeners)
        self._http_listeners = list(http_listeners)
        self.http_port = _bound_port(self._http_listeners)
        self._grpc_listeners = list(grpc_listeners)
        self.grpc_port = _bound_port(self._grpc_listeners)
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
        #: Per-topic settings made over HTTP (or with create-topic).
        self.topic_settings = TopicSettingsFile(log.path, lambda: log.region, log.geometry)
        self.failure: StorageError | None = None
        self._failed = trio.Event()
        self._receive_buffer = _receive_buffer_size(net.socket_receive_buffer_kb)
        self.durability = (
            Durability(disk, self._storage_failed, on_sync=self._synced)
            if disk is not None
            else None
        )
        # Publish sessions: this broker's old claims are settled before it
        # serves (its previous process may have died holding some).
        log.sessions.timeout_ns = int(config.cxl.session_timeout_s * 1e9)
        self.sessions = Sessions(log.sessions, net.batch_timeout_s)
        settled = log.sessions.recover()
        if settled:
            logger.info("sessions: settled %d claim(s) of this broker's previous process", settled)
        # What that process stored is durable once the disk log synced its
        # start-up backlog (each stream up to where it is now).
        self._session_backlog = log.sessions.not_durable() if disk is not None else []
        self._backlog_batches = {s: s.batches for s in log.streams()} if disk is not None else {}
        self._mark_session_backlog()
        self.order_waits = OrderWaits(log, config.cxl.sequencer_interval_ms / 1000)
        # The broker that holds the region's sequencer lease orders every
        # broker's order-5 batches; any live broker may take it over.
        self.ordering = SequencerRole(
            log,
            hole_timeout_s=config.cxl.sequencer_hole_timeout_s,
            lease_s=config.cxl.sequencer_lease_s,
            eligible=lambda: self.membership.joined and not self.shutting_down,
        )
        self.commits = CommitFeed(
            log,
            self._to_disk if self.durability is not None else None,
            self.order_waits,
        )
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
        self.space = LogSpace(
            net.log_full_timeout_s,
            partial(retention_configured, log, self.settings_for, self.durability),
        )
        self.counters = IngestCounters()
        self.connections: set[Connection] = set()
        self.shutting_down = False
        self._ids = itertools.count(1)
        self._ingest: IngestPath | None = None
        self._service_scope: trio.CancelScope | None = None
        self._accept_scope = trio.CancelScope()
        self._allowed = parse_networks(net.allowed_networks)
        self._per_host: collections.Counter[_Address] = collections.Counter()
        self.membership = Membership(log, config.broker)

    @property
    def disk(self) -> DiskLog | None:
        """The disk log behind ack level 2 (None without ``storage.dir``)."""
        return self.durability.disk if self.durability is not None else None

    def _synced(self) -> None:
        # More of the region is durable now, so a full region's cache may
        # have segments to drop: held batches try again (and make room).
        if self.space.held:
            self.space.room_made()
        self.sessions.flush_durable()
        self._mark_session_backlog()

    def _mark_session_backlog(self) -> None:
        disk = self.disk
        if self._session_backlog and disk is not None:
            if all(disk.durable_batches(s) >= n for s, n in self._backlog_batches.items()):
                self.sessions.table.mark_durable(self._session_backlog)
                self._session_backlog = []

    def _to_disk(self, reservation: Reservation) -> None:
        """A committed batch waits for the disk writer; a publish session's
        is marked durable in the session table once it is synced."""
        assert self.durability is not None
        self.durability.committed(reservation)
        if reservation.session is not None:
            self.durability.when_durable(
                reservation, partial(self._session_batch_synced, reservation.session)
            )

    def _session_batch_synced(self, claim: Claim, failure: StorageError | None) -> None:
        if failure is None:
            self.sessions.stored_durable(claim)

    def settings_for(self, topic: str) -> TopicSettings:
        """``topic``'s settings: the config file's, under the keys the admin
        API set for it (see :mod:`~trio_embarcadero.log.settings`)."""
        settings = self.config.topics.settings_for(topic)
        record = self.topic_settings.get(topic)
        if record is None or not record.retention:
            return settings
        return attrs.evolve(settings, **record.retention)

    def committed_bytes(self) -> dict[tuple[str, int], int]:
        """Payload bytes committed per live (topic, incarnation) since the
        broker started; the counts of topics deleted since are dropped."""
        counts = self.commits.committed_bytes
        region, geometry = self.log.region, self.log.geometry
        live = {
            (name, read_topic_state(region, geometry, index)[1])
            for name, index in read_topics(region, geometry).items()
        }
        out = {}
        for stream in list(counts):
            key = (stream.topic, stream.incarnation)
            if key in live:
                out[key] = counts[stream]
            else:
                del counts[stream]
        return out

    def _make_room(self) -> int:
        freed = make_room(self.log, self.settings_for, self.durability)
        if freed:
            self.space.room_made()  # other held batches may fit now too
        return freed

    # -- observing -----------------------------------------------------------------

    def statistics(self) -> BrokerStatistics:
        """Return a frozen snapshot of the broker's counters."""
        phases = collections.Counter(c.phase.value for c in self.connections)
        log = self.log.statistics()
        c = self.counters
        ingest = self._ingest
        channel = ingest.batches.statistics().current_buffer_used if ingest else 0
        dial = ingest.dial_backs.statistics() if ingest else DialBackStatistics(0, 0, 0, 0)
        lease, sequencer = self.ordering.statistics()
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
            log_full_waits=self.space.waits,
            log_full_wait_seconds=self.space.wait_seconds,
            log_full_timeouts=self.space.timeouts,
            log_full_held=self.space.held,
            segments_reclaimable=reclaimable_units(self.log, self.settings_for, self.durability),
            queued_batches=channel,
            errors=dict(c.errors),
            shutdown_notices=c.shutdown_notices,
            internal_errors=c.internal_errors + self.commits.internal_errors,
            log=log,
            dial_backs=dial,
            disk=self.durability.statistics() if self.durability is not None else None,
            batch_bytes=c.batch_bytes.snapshot(),
            ack_latency={str(k): h.snapshot() for k, h in c.ack_latency.items()},
            disk_sync_seconds=(
                self.durability.sync_seconds.snapshot() if self.durability is not None else None
            ),
            unit_bytes=self.log.geometry.unit_size,
            draining=self.shutting_down,
            order_waits=self.order_waits.held,
            never_ordered=self.order_waits.never_ordered,
            sequencer=sequencer,
            sequencer_lease=lease,
            sessions=self.sessions.statistics(),
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
        self.membership.drain()
        # Batches held by a full log give up now (error 4): the drain must
        # not wait log_full_timeout_s for retention.
        self.space.close()
        for connection in list(self.connections):
            connection.request_stop()
        if self._service_scope is not None:
            self._service_scope.deadline = (
                trio.current_time() + self.config.network.shutdown_grace_s
            )

    def _storage_failed(self, error: StorageError) -> None:
        # Committed batches keep their acks at levels 0 and 1; only the disk
        # is gone, so the broker drains as on a signal, then raises.
        self.failure = error
        self._failed.set()
        self.begin_shutdown()

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
                await services.start(self.membership.run)
                await services.start(self.sessions.run)
                if self._http_listeners:
                    await services.start(partial(serve_http, AdminApi(self), self._http_listeners))
                    logger.info("HTTP (metrics, admin API) on %s", self._http_url())
                if self._grpc_listeners:
                    # Imported here: a broker without the service (the default)
                    # does not pay for loading it (h2, the messages) at start-up.
                    from .heartbeat import serve_cluster_service

                    await services.start(partial(serve_cluster_service, self, self._grpc_listeners))
                    logger.info(
                        "gRPC cluster service (heartbeat_system.HeartBeat, for the C++ client) "
                        "on %s:%d",
                        self.host,
                        self.grpc_port,
                    )
                elif self.config.cluster.grpc_port:
                    logger.info(
                        "cluster.grpc_port: broker 0 serves the gRPC cluster service, not "
                        "broker %d",
                        self.broker_id,
                    )
                await services.start(
                    partial(
                        run_ordering,
                        self.order_waits,
                        self.ordering,
                        self.config.cxl.sequencer_interval_ms / 1000,
                    )
                )
                await services.start(
                    partial(
                        run_retention,
                        self.log,
                        self.settings_for,
                        self.durability,
                        self.config.cxl.reclaim_interval_ms / 1000,
                        room_made=self.space.room_made,
                        held=lambda: self.space.held,
                    )
                )
                async with trio.open_nursery() as durable:
                    if self.durability is not None:
                        await durable.start(self.durability.run)
                    await self._run_ingest(task_status)
                    if self.durability is not None:
                        self.durability.finish()  # sync what the drain committed, then stop
                services.cancel_scope.cancel()
        if self._service_scope.cancelled_caught:
            logger.warning("shutdown grace period over: remaining work cancelled")
        stats = self.statistics()
        logger.info("stats: %s", stats.summary(), extra={"stats": stats.report()})

    async def _run_ingest(self, task_status: trio.TaskStatus[None]) -> None:
        """Allocators, ack connections and connections; returns once drained."""
        net = self.config.network
        async with trio.open_nursery() as allocators:
            send, receive = trio.open_memory_channel[StagedBatch](net.allocation_queue_size)
            async with send, receive:
                workers = net.num_cxl_allocation_workers if net.use_nonblocking else 0
                for _ in range(workers):
                    await allocators.start(
                        partial(
                            run_allocator,
                            receive.clone(),
                            self.log,
                            self.commits,
                            self.backoff,
                            self.allocation,
                            make_room=self._make_room,
                            space=self.space,
                        )
                    )
                async with trio.open_nursery() as acks:
                    self._ingest = IngestPath(
                        network=net,
                        broker_id=self.broker_id,
                        log=self.log,
                        commits=self.commits,
                        pool=self.pool,
                        gate=self.gate,
                        receive_limiter=self.receive_limiter,
                        backoff=self.backoff,
                        allocation=self.allocation,
                        batches=send,
                        dial_backs=DialBackRegistry(
                            acks, self.broker_id, net.ack_connect_timeout_s
                        ),
                        durability=self.durability,
                        counters=self.counters,
                        make_room=self._make_room,
                        space=self.space,
                        sessions=self.sessions,
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
                        address = listener.socket.getsockname()
                        if is_ip_socket(listener.socket):
                            host, port, *_ = address
                            address = f"{host}:{port}"
                        logger.info("listening on %s", address)
                task_status.started()

    async def _handle(self, stream: trio.abc.Stream) -> None:
        """Serve one connection; nothing a peer does can raise out of here."""
        peer: tuple[str, int] | None = None
        # Only an IP peer has an address to check and count (a Unix socket
        # of an embedding application has none, as an in-memory stream).
        if isinstance(stream, trio.SocketStream) and is_ip_socket(stream.socket):
            try:
                host, port, *_ = stream.socket.getpeername()
            except OSError as exc:  # reset before we got to it: nothing to serve
                self.counters.connections_accepted += 1
                logger.info("a connection was gone before it was served: %s", exc)
                await trio.aclose_forcefully(stream)
                return
            peer = (host, port)
        address = _client_address(peer[0]) if peer is not None else None
        refusal = self._refusal(address)
        if refusal is not None:
            await self._refuse(stream, refusal)
            return
        self.counters.connections_accepted += 1
        if self._receive_buffer:
            set_receive_buffer(stream, self._receive_buffer)
        connection = Connection(stream, next(self._ids), peer)
        self.connections.add(connection)
        if address is not None:
            self._per_host[address] += 1
        assert self._ingest is not None  # set before the listener starts
        try:
            await serve_connection(connection, self._ingest)
        except LayoutError:
            # The log refused to commit: another process wrote this broker's
            # streams. Stop the broker, as an allocator that meets it does,
            # rather than go on acking into a log that is not ours alone.
            raise
        except Exception:
            # A bug, not a peer fault: keep serving everyone else, loudly.
            self.counters.internal_errors += 1
            logger.exception("conn %d %s: internal error", connection.id, connection.peer)
        finally:
            await trio.aclose_forcefully(stream)
            self.connections.discard(connection)
            if address is not None:
                self._per_host[address] -= 1
                if not self._per_host[address]:
                    del self._per_host[address]

    def _refusal(self, address: _Address | None) -> ProtocolError | None:
        net = self.config.network
        if self.shutting_down:
            return ProtocolError(ErrorCode.SHUTTING_DOWN, "broker is shutting down")
        if len(self.connections) >= net.max_connections:
            return ProtocolError(
                ErrorCode.NOT_ALLOWED, f"connection limit reached ({net.max_connections})"
            )
        if address is None:
            return None
        if self._allowed and not any(address in network for network in self._allowed):
            return ProtocolError(ErrorCode.NOT_ALLOWED, f"{address} is not an allowed network")
        # One host must not take every connection the broker has.
        if self._per_host[address] >= net.max_connections_per_host:
            limit = net.max_connections_per_host
            return ProtocolError(
                ErrorCode.NOT_ALLOWED, f"connection limit per host reached ({limit} from {address})"
            )
        return None

    async def _refuse(self, stream: trio.abc.Stream, error: ProtocolError) -> None:
        self.counters.connections_refused += 1
        self.counters.count_error(error.code)
        logger.log(error_frame_log_level(error.code), "refused a connection: %s", error.message)
        with trio.move_on_after(1):
            try:
                await stream.send_all(encode_error_frame(error.code, error.message))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        await trio.aclose_forcefully(stream)

    async def _report(self, *, task_status: trio.TaskStatus[None]) -> NoReturn:
        task_status.started()
        # Rates are over each interval, the first one's too.
        previous = self.statistics()
        moved_before = None
        since = trio.current_time()
        while True:
            await trio.sleep(self.config.network.stats_interval_s)
            stats = self.statistics()
            now = trio.current_time()
            moved = (stats.bytes_received, stats.batches_committed, stats.errors, stats.pauses)
            # While publishers are held by a full log nothing moves: say so anyway.
            if moved != moved_before or stats.log_full_held:
                seconds = now - since
                logger.info(
                    "stats: %s",
                    stats.summary(previous, seconds),
                    extra={"stats": stats.report(previous, seconds)},
                )
            previous, moved_before, since = stats, moved, now

    def _http_url(self) -> str:
        host = self.config.http.host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.http_port}"


def _receive_buffer_size(kib: int) -> int | None:
    """The ``SO_RCVBUF`` to give client connections (None: the kernel's autotuning)."""
    if not kib:
        return None
    cap = receive_buffer_cap()
    if cap is not None and cap < kib * 1024:
        # Capped, the buffer would be smaller than autotuning makes it.
        logger.info(
            "client receive buffers: autotuned by the kernel, as net.core.rmem_max (%d B) "
            "is below network.socket_receive_buffer_kb (%d KiB); raise net.core.rmem_max "
            "to give each connection that buffer",
            cap,
            kib,
        )
        return None
    return kib * 1024


def _bound_port(listeners: Sequence[trio.SocketListener]) -> int | None:
    """The port the first of ``listeners`` is bound to (None: there is none)."""
    return next((lst.socket.getsockname()[1] for lst in listeners), None)


def _open_logs(config: Config, reset: bool) -> tuple[CxlLog, DiskLog | None]:
    cxl, storage, broker_id = config.cxl, config.storage, config.broker.id
    # Both locks first: a broker that finds either taken must leave the
    # region and the disk log exactly as they are (no reset, no recovery).
    region_lock = claim_region(cxl.path, broker_id, mode=cxl.mode, reset=reset)
    # A region made anew has no topics: settings the admin API recorded for
    # the old one's must not meet a new topic of the same name and slot.
    fresh = reset or not os.path.exists(cxl.path)
    disk_lock: BrokerLock | None = None
    log: CxlLog | None = None
    try:
        if storage.dir:
            disk_lock = claim_disk_log(storage.dir, broker_id, mode=storage.mode)
        log = CxlLog.open(
            cxl.path,
            size=cxl.size_bytes,
            segment_size=cxl.segment_bytes,
            unit_size=cxl.unit_bytes,
            max_topics=cxl.max_topics,
            max_brokers=cxl.max_brokers,
            broker_id=broker_id,
            max_inflight_batches=cxl.max_inflight_batches,
            reset=reset,
            prefault=cxl.prefault,
            mode=cxl.mode,
            lock=region_lock,
            allow_weak_memory_ordering=cxl.allow_weak_memory_ordering,
        )
        # Before the disk log replays anything: a topic it creates anew
        # (the region was lost) gets the config's order too.
        log.topic_order = lambda topic: config.topics.settings_for(topic).order
        log.check_topic_orders()
        disk = None
        if disk_lock is not None:
            disk = DiskLog.open(
                storage.dir,
                log,
                sync_interval=storage.sync_interval_ms / 1000,
                sync_bytes=storage.sync_bytes,
                reset=reset,
                mode=storage.mode,
                lock=disk_lock,
                segment_bytes=storage.segment_bytes,
            )
    except BaseException:
        if disk_lock is not None:
            disk_lock.close()
        if log is not None:
            log.close()  # and its lock
        else:
            region_lock.close()
        raise
    if fresh:
        remove_settings(settings_path(cxl.path))
    if reset:
        logger.warning(
            "--reset: %s starts empty (every broker's streams in it discarded)%s",
            cxl.path,
            f"; broker {broker_id}'s disk log in {storage.dir} emptied too" if storage.dir else "",
        )
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
    """Bind the listeners, then open the logs: everything that can fail at start.

    The listeners come first: a broker that cannot listen (a port taken by a
    broker already running) fails before it opens, let alone recovers, the
    region and the disk log.
    """
    check_memory_ordering(config.cxl.allow_weak_memory_ordering)
    bound: list[trio.SocketListener] = []
    http: list[trio.SocketListener] = []
    grpc: list[trio.SocketListener] = []
    try:
        if listeners is None:
            host, port = config.broker.host, config.broker.data_port
            try:
                bound = await trio.open_tcp_listeners(port, host=host)
            except OSError as exc:
                raise ListenError(host, port, exc) from exc
            listeners = bound
        if config.http.enabled:
            host, port = config.http.host, config.http.port_for(config.broker)
            try:
                http = await trio.open_tcp_listeners(port, host=host)
            except OSError as exc:
                raise ListenError(
                    host, port, exc, "the HTTP endpoint: set http.port, or http.enabled = false"
                ) from exc
        grpc_port = config.cluster.grpc_port_for(config.broker)
        if grpc_port is not None:
            host = config.broker.host
            try:
                grpc = await trio.open_tcp_listeners(grpc_port, host=host)
            except OSError as exc:
                raise ListenError(
                    host,
                    grpc_port,
                    exc,
                    "the gRPC cluster service: set cluster.grpc_port, or 0 to turn it off",
                ) from exc
        log, disk = await _open_log(config, reset)
    except BaseException:
        for listener in [*bound, *http, *grpc]:  # only those bound here; a caller's stay open
            listener.socket.close()
        raise
    return Broker(config, log, listeners, disk, http, grpc)


def _close_logs(log: CxlLog, disk: DiskLog | None, ordering: SequencerRole) -> None:
    ordering.close()
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
                broker.membership.join(broker.port)  # it listens: other processes may see it
                broker.order_waits.wakeup.unpark_all()  # it may run the sequencer now
                task_status.started(broker)
                await broker._failed.wait()  # else runs until cancelled
            finally:
                broker.begin_shutdown()
    finally:
        broker.membership.leave()
        _close_logs(broker.log, broker.disk, broker.ordering)
        if broker.failure is not None:
            # Drained: the caller learns why the broker stopped, also when it
            # had asked it to stop meanwhile (this replaces the Cancelled).
            raise broker.failure
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
        reset: Start empty: discard the CXL file (every broker's streams in
            it) and this broker's files in the disk log, instead of
            re-attaching to them. Refused while any broker serves the region.
        listeners: Accept on these instead of binding ``broker.host`` and
            the data port (socket activation, in-memory tests).
        task_status: Receives the :class:`Broker` once it accepts connections.

    Raises:
        ListenError: A listener cannot be bound (checked first).
        AlreadyServedError: Another live process serves this broker id on
            the CXL file or the disk log (or, with ``reset``, any broker id
            on the CXL file); nothing was changed.
        UnsafeFileError: A file is a symbolic link or another user's.
        StartupError: The machine is not x86-64 (``cxl.allow_weak_memory_ordering``).
        LayoutError: The CXL file or disk log exists with another layout.
        OSError: The CXL file or disk log cannot be created or mapped.
        StorageError: The disk log could not be written or synced while
            running: the broker drained (see the module docstring) and
            stopped on its own.

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

    Leaving the block drains the broker gracefully (see :func:`serve`). If
    the broker stops on its own (its disk log failed), the block is cancelled
    once the broker has drained, and the failure is raised.

    Args:
        config: The broker's configuration.
        reset: As for :func:`serve`.
        listeners: As for :func:`serve`.

    Yields:
        The running :class:`Broker`.

    Raises:
        StartupError: As for :func:`serve` (its subclasses too), raised as
            is (not in a group).
        LayoutError: As for :func:`serve`, raised as is.
        OSError: As for :func:`serve`, raised as is.
        StorageError: As for :func:`serve`, raised as is, in place of
            whatever the block raised meanwhile (that is its ``__context__``).
    """
    # Start-up failures happen here, before the nursery, so they reach the
    # caller unwrapped.
    broker = await _start(config, reset, listeners)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(_serve_for_block, broker, nursery.cancel_scope))
            try:
                yield broker
            finally:
                nursery.cancel_scope.cancel()
    finally:
        if broker.failure is not None:
            raise broker.failure  # after the drain, outside the nursery: no group


async def _serve_for_block(
    broker: Broker, block: trio.CancelScope, *, task_status: trio.TaskStatus[Broker]
) -> None:
    try:
        await _serve(broker, task_status=task_status)
    except StorageError:
        block.cancel()  # the broker is gone: end the block; open_broker raises


__all__ = ["Broker", "open_broker", "serve"]
