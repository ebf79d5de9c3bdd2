"""The head's gRPC cluster service for the stock C++ client: ``heartbeat_system.HeartBeat``.

The C++ Embarcadero client learns the brokers of a cluster from the head
broker's ``HeartBeat`` service (the original's ``heartbeat.proto``) and,
in its test harness, creates its topic there; it cannot start without it.
With ``cluster.grpc_port`` set, broker 0 serves it (:func:`serve_cluster_service`,
in the broker's nursery), answering from the region: the broker list is the
region's broker table (:mod:`~trio_embarcadero.log.members`), a topic is
created as ``POST /v1/topics`` creates it (:func:`.admin.create_topic`).

====================  =====================================================================
RPC                   answer
====================  =====================================================================
SubscribeToCluster    a stream: at once a ``ClusterStatus`` with the live brokers the
                      client did not list in its ``ClientInfo.nodes_info`` (``new_nodes``,
                      ``"host:port"``) and the ids it listed that are not live
                      (``removed_nodes``); then one more each time brokers come, go, or
                      move to another address. Ends when the client cancels it, at its
                      deadline, or with ``UNAVAILABLE`` when the broker shuts down.
GetClusterStatus      that first ``ClusterStatus``, once.
CreateNewTopic        creates the topic with its ``order`` (0 or 5) in the region;
                      ``success = true``, also when it exists with that order already.
                      ``INVALID_ARGUMENT``: a bad name, another order level, a sequencer
                      type other than EMBARCADERO; ``ALREADY_EXISTS``: it exists with
                      another order; ``RESOURCE_EXHAUSTED``: the topic table is full;
                      ``UNAVAILABLE``: the broker is draining. ``replication_factor``,
                      ``replicate_tinode`` and ``ack_level`` are not the topic's here
                      (durability is ``storage.dir`` and each publisher's ack level).
Heartbeat             ``alive``: ``node_id`` is the pid of a live broker of the region;
                      ``shutdown``: the head is draining; ``cluster_version`` counts the
                      changes of the broker list the service has seen, and
                      ``cluster_info`` lists every live broker when the caller's
                      version is older.
RegisterNode          ``success = false``, ``broker_id = -1``: brokers join by serving the
                      region (``trio-embarcadero serve --broker-id N``), not over gRPC.
KillBrokers,          ``PERMISSION_DENIED``: the service stops no process; signals do.
TerminateCluster
====================  =====================================================================

A request that is not a valid message of its method gets ``INVALID_ARGUMENT``;
a method not in the table ``UNIMPLEMENTED`` (:mod:`.grpc`).

Addresses: a broker is listed at the host and port of its broker table
entry, a broker bound to a wildcard address (``0.0.0.0``, ``::``) at the
address the client reached the head at. The C++ client takes a broker's id
from its port (the port less its own base port, ``EMBARCADERO_BROKER_PORT``,
1214) and connects to that base port plus the id, so the brokers' ``broker.port``
must be the client's base port (both 1214 by default); it speaks IPv4 only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from typing import NoReturn, TypeVar

import attrs
import trio

from ..errors import LogFullError, RpcError, RpcStatus, TopicExistsError
from ..log.layout import find_topic, read_topic_order
from ..log.members import BrokerMember, MemberStatus
from ..log.reader import region_brokers
from . import protobuf as pb
from .admin import Administered, check_topic, create_topic
from .grpc import Call, Handler, serve_grpc

logger = logging.getLogger(__name__)

#: The service's full name.
SERVICE = "heartbeat_system.HeartBeat"

_M = TypeVar("_M")
_WILDCARDS = frozenset({"", "0.0.0.0", "::"})


@attrs.frozen
class LiveBroker:
    """A broker the service lists: one that is live in the region's broker table.

    Attributes:
        broker_id: Its id.
        host: The address it listens on.
        port: Its data port.
        pid: Its process.
    """

    broker_id: int
    host: str
    port: int
    pid: int

    def host_for(self, local_host: str) -> str:
        """The host a client is told: ``local_host`` (where the client reached
        the head) for a broker bound to a wildcard address."""
        return local_host if self.host in _WILDCARDS and local_host else self.host

    def address(self, local_host: str) -> str:
        """``host:port`` as the C++ client reads it (see the module docstring)."""
        host = self.host_for(local_host)
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"


def live_brokers(members: Sequence[BrokerMember]) -> dict[int, LiveBroker]:
    """The live brokers among ``members`` (draining, starting or gone ones take
    no new clients), by id."""
    return {
        m.broker_id: LiveBroker(m.broker_id, m.host, m.port, m.pid or 0)
        for m in members
        if m.status is MemberStatus.LIVE
    }


@attrs.frozen
class ClusterView:
    """The live brokers at one time.

    Attributes:
        version: Counts the changes seen, from 0 (nothing read yet).
        brokers: The live brokers by id.
    """

    version: int
    brokers: Mapping[int, LiveBroker]


class ClusterWatch:
    """The region's live brokers, read again every ``interval_s`` while anyone
    watches (a ``SubscribeToCluster`` stream), on demand otherwise.

    Args:
        read: Reads the region's broker table (blocking: run on a worker thread).
        interval_s: How often watchers see a change at the latest.
    """

    def __init__(self, read: Callable[[], Sequence[BrokerMember]], interval_s: float) -> None:
        self._read = read
        self._interval = interval_s
        self.view = ClusterView(0, {})
        self._changed = trio.Event()
        self._watchers = 0
        self._wanted = trio.Event()

    async def refresh(self) -> ClusterView:
        """Read the table now; the view, a new version if it changed."""
        brokers = live_brokers(await trio.to_thread.run_sync(self._read))
        if brokers != self.view.brokers:
            self.view = ClusterView(self.view.version + 1, brokers)
            self._changed.set()
            self._changed = trio.Event()
        return self.view

    async def next_change(self, version: int) -> ClusterView:
        """The view once it is newer than ``version``."""
        while self.view.version == version:
            await self._changed.wait()
        return self.view

    @contextmanager
    def watching(self) -> Iterator[None]:
        """Keep the table read every interval while in the block."""
        self._watchers += 1
        self._wanted.set()
        try:
            yield
        finally:
            self._watchers -= 1

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Read the table every interval while anyone watches, until cancelled."""
        task_status.started()
        while True:
            if not self._watchers:
                self._wanted = trio.Event()
                await self._wanted.wait()
                continue
            await trio.sleep(self._interval)  # a new watcher read the table itself
            try:
                await self.refresh()
            except Exception:
                # A bug: the broker must not stop for its cluster list; say so each time.
                logger.exception("reading the broker table for the gRPC cluster service")


def cluster_status(
    known: dict[int, str | None], view: ClusterView, local_host: str
) -> pb.ClusterStatus:
    """What a client that knows ``known`` is told of ``view``; ``known`` is
    brought up to date.

    Args:
        known: Broker id to the address the client was told (None: one it
            knew already, at an address of its own).
        view: The live brokers.
        local_host: The address the client reached the head at.
    """
    new = []
    for broker_id, broker in sorted(view.brokers.items()):
        address = broker.address(local_host)
        told = known.get(broker_id, "")
        if broker_id not in known or (told is not None and told != address):
            new.append(address)
            known[broker_id] = address
    removed = sorted(i for i in known if i not in view.brokers)
    for broker_id in removed:
        del known[broker_id]
    return pb.ClusterStatus(new_nodes=tuple(new), removed_nodes=tuple(removed))


def _request(call: Call, cls: type[_M]) -> _M:
    try:
        return pb.decode(cls, call.request)
    except ValueError as exc:
        raise RpcError(
            RpcStatus.INVALID_ARGUMENT,
            f"the request is not a heartbeat_system.{cls.__name__}: {exc}",
        ) from None


def _refused(request: type, message: str) -> Handler:
    """A method the service refuses (``PERMISSION_DENIED``) with ``message``."""

    async def refuse(call: Call) -> None:
        _request(call, request)  # a request that is not one is still INVALID_ARGUMENT
        await trio.lowlevel.checkpoint()
        raise RpcError(RpcStatus.PERMISSION_DENIED, message)

    return refuse


class HeartBeatService:
    """The service's handlers, on one broker (the head).

    Args:
        broker: The broker (its region, config, and topic creation).
    """

    def __init__(self, broker: Administered) -> None:
        self._broker = broker
        log = broker.log
        self.watch = ClusterWatch(
            partial(region_brokers, log.region, log.path, log.geometry.max_brokers),
            broker.config.broker.heartbeat_interval_s,
        )
        #: Handler of each method, by path.
        self.methods: dict[str, Handler] = {
            f"/{SERVICE}/{name}": handler
            for name, handler in {
                "SubscribeToCluster": self._subscribe,
                "GetClusterStatus": self._get_cluster_status,
                "CreateNewTopic": self._create_topic,
                "Heartbeat": self._heartbeat,
                "RegisterNode": self._register_node,
                "KillBrokers": _refused(
                    pb.KillBrokersRequest,
                    "this broker stops no process over gRPC: kill one by its pid "
                    "(`trio-embarcadero inspect` lists them; under `trio-embarcadero cluster` "
                    "it is started again)",
                ),
                "TerminateCluster": _refused(
                    pb.Empty,
                    "this broker stops no process over gRPC: send SIGTERM to each broker (or "
                    "to `trio-embarcadero cluster`, which drains them all)",
                ),
            }.items()
        }

    async def _subscribe(self, call: Call) -> None:
        request = _request(call, pb.ClientInfo)
        known: dict[int, str | None] = dict.fromkeys(request.nodes_info)
        with self.watch.watching():
            view = await self.watch.refresh()
            # The first message goes out even when it is empty: the C++ client
            # starts its publishers on it.
            await call.send(pb.encode(cluster_status(known, view, call.local_host)))
            while True:
                view = await self.watch.next_change(view.version)
                status = cluster_status(known, view, call.local_host)
                if status.new_nodes or status.removed_nodes:
                    await call.send(pb.encode(status))

    async def _get_cluster_status(self, call: Call) -> None:
        request = _request(call, pb.ClientInfo)
        view = await self.watch.refresh()
        status = cluster_status(dict.fromkeys(request.nodes_info), view, call.local_host)
        await call.send(pb.encode(status))

    async def _create_topic(self, call: Call) -> None:
        request = _request(call, pb.CreateTopicRequest)
        broker = self._broker
        if broker.shutting_down:
            raise RpcError(RpcStatus.UNAVAILABLE, "the broker is draining for a shutdown")
        name, order = request.topic, request.order
        try:
            check_topic(name, order, {})
        except ValueError as exc:
            raise RpcError(RpcStatus.INVALID_ARGUMENT, str(exc)) from None
        if request.sequencer_type != pb.SequencerType.EMBARCADERO:
            raise RpcError(
                RpcStatus.INVALID_ARGUMENT,
                f"sequencer type {request.sequencer_type} is not EMBARCADERO (0), the only "
                "one this broker has (order 5 is its sequencer)",
            )
        try:
            await create_topic(broker, name, order, {}, via="gRPC")
        except TopicExistsError:
            log = broker.log
            index = find_topic(log.region, log.geometry, name)
            had = read_topic_order(log.region, log.geometry, index) if index is not None else None
            if had != order:
                raise RpcError(
                    RpcStatus.ALREADY_EXISTS,
                    f"topic {name!r} exists with order {had}, not {order}; delete it "
                    f"(trio-embarcadero delete-topic {name}) to create it anew",
                ) from None
            logger.debug("topic %r exists with order %d, as asked over gRPC", name, order)
        except LogFullError as exc:
            raise RpcError(RpcStatus.RESOURCE_EXHAUSTED, str(exc)) from None
        await call.send(pb.encode(pb.CreateTopicResponse(success=True)))

    async def _heartbeat(self, call: Call) -> None:
        request = _request(call, pb.HeartbeatRequest)
        view = await self.watch.refresh()
        pids = {str(b.pid) for b in view.brokers.values()}
        info: tuple[pb.BrokerInfo, ...] = ()
        if request.cluster_version < view.version:
            info = tuple(
                pb.BrokerInfo(
                    broker_id=b.broker_id,
                    address=b.host_for(call.local_host),
                    network_mgr_addr=b.address(call.local_host),
                )
                for _, b in sorted(view.brokers.items())
            )
        answer = pb.HeartbeatResponse(
            alive=request.node_id in pids,
            shutdown=self._broker.shutting_down,
            cluster_version=view.version,
            cluster_info=info,
        )
        await call.send(pb.encode(answer))

    async def _register_node(self, call: Call) -> None:
        _request(call, pb.NodeInfo)
        answer = pb.RegistrationStatus(
            success=False,
            broker_id=-1,
            message="brokers join this cluster by serving its region: start one with "
            "`trio-embarcadero serve --broker-id N` on the head's host",
        )
        await call.send(pb.encode(answer))


async def serve_cluster_service(
    broker: Administered,
    listeners: Sequence[trio.abc.Listener[trio.abc.Stream]],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve :data:`SERVICE` for ``broker`` on ``listeners`` until cancelled,
    then drain (open calls end with ``UNAVAILABLE``, see :mod:`.grpc`).

    Args:
        broker: The head broker.
        listeners: Where clients connect (bound by the caller).
        task_status: Told once the listeners accept.
    """
    service = HeartBeatService(broker)
    async with trio.open_nursery() as nursery:
        await nursery.start(service.watch.run)
        await nursery.start(partial(serve_grpc, service.methods, listeners))
        task_status.started()
    raise AssertionError("unreachable")  # pragma: no cover - serve_grpc never returns


__all__ = [
    "SERVICE",
    "ClusterView",
    "ClusterWatch",
    "HeartBeatService",
    "LiveBroker",
    "cluster_status",
    "live_brokers",
    "serve_cluster_service",
]
