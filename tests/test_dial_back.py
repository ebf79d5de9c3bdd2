"""Dial-back ack connections: whose they are, how they end, and who may join them.

Over real loopback TCP (``tcpclient``): a client is its address, its id and
its topic, so the same id from two hosts gets two ack connections (the second
host is 127.0.0.2: Linux routes all of 127/8 to loopback) and the same id from
one host must use one ack port; an ack connection that died is never joined
again; and the end of an old publish connection never closes a newer one's
ack connection. The registry itself runs on the mock clock with in-memory
streams, to cancel attaches while the dial is pending.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import pytest
import trio
import trio.testing
from conftest import MakeConfig, wait_until
from rawclient import batch, handshake, parse_records, read_all
from tcpclient import ack_listener, connect, error_frame, recv_ack_item, recv_broker_id

from trio_embarcadero import ErrorCode, open_broker
from trio_embarcadero.broker import Broker
from trio_embarcadero.broker.acks import DialBackLease, DialBackRegistry

TOPIC = "dial"
CID = 4242
OTHER_HOST = "127.0.0.2"


def frame(seq: int, first: int, count: int) -> bytes:
    """A batch of ``count`` 100-byte messages of client CID."""
    return batch(seq, CID, first, count, 100)[0]


def log_orders(broker: Broker) -> list[int]:
    """``client_order`` of every committed record of TOPIC (all of client CID)."""
    stream = broker.log.existing_stream(TOPIC)
    assert stream is not None
    orders: list[int] = []
    for i in range(len(stream.index_header)):
        b = stream.committed_batch(i)
        data = bytes(broker.log.region[b.payload_offset : b.payload_offset + b.total_size])
        for _, client_id, order, _ in parse_records(data):
            assert client_id == CID
            orders.append(order)
    return orders


async def start_publisher(
    streams: AsyncExitStack,
    port: int,
    ack_port: int,
    first_frame: bytes,
    *,
    local_host: str | None = None,
) -> trio.SocketStream:
    """A dial-back publisher of client CID that sent its handshake and first batch."""
    stream = await streams.enter_async_context(await connect(port, local_host=local_host))
    await stream.send_all(handshake(TOPIC, client_id=CID, port=ack_port) + first_frame)
    return stream


async def finish_publisher(stream: trio.SocketStream) -> None:
    """Half-close and expect the broker to end the connection without a word."""
    await stream.send_eof()
    assert await read_all(stream) == b""


async def accept_acks(streams: AsyncExitStack, listener: trio.SocketListener) -> trio.SocketStream:
    """The next dial-back ack connection, its broker id already read."""
    ack = await streams.enter_async_context(await listener.accept())
    assert await recv_broker_id(ack) == 0
    return ack


@asynccontextmanager
async def broker_and_ack_listener(
    make_config: MakeConfig,
) -> AsyncIterator[tuple[AsyncExitStack, Broker, trio.SocketListener, int]]:
    """A broker, a loopback ack listener and its port, and a stack the test's streams go on."""
    async with (
        AsyncExitStack() as streams,
        open_broker(make_config()) as broker,
        ack_listener() as (listener, ack_port),
    ):
        yield streams, broker, listener, ack_port


async def first_publisher(
    streams: AsyncExitStack, broker: Broker, listener: trio.SocketListener, ack_port: int
) -> tuple[trio.SocketStream, trio.SocketStream]:
    """A publisher of CID with 10 messages acked on its ack connection: (publish, ack)."""
    pub = await start_publisher(streams, broker.port, ack_port, frame(0, 0, 10))
    ack = await accept_acks(streams, listener)
    assert await recv_ack_item(ack) == 10
    return pub, ack


def reset(stream: trio.SocketStream) -> None:
    """Make the next close a reset (SO_LINGER 0), not a FIN."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


# -- over TCP -------------------------------------------------------------------------------------


async def test_one_client_id_on_two_hosts_gets_two_ack_connections(
    make_config: MakeConfig,
) -> None:
    with trio.fail_after(10):
        async with (
            AsyncExitStack() as streams,
            open_broker(make_config()) as broker,
            ack_listener() as (listener_a, port_a),
            ack_listener(OTHER_HOST) as (listener_b, port_b),
        ):
            pub_a = await start_publisher(streams, broker.port, port_a, frame(0, 0, 10))
            ack_a = await accept_acks(streams, listener_a)
            assert await recv_ack_item(ack_a) == 10
            # Same client id and topic, another host: its own ack connection and counts.
            pub_b = await start_publisher(
                streams, broker.port, port_b, frame(0, 100, 20), local_host=OTHER_HOST
            )
            ack_b = await accept_acks(streams, listener_b)
            assert ack_b.socket.getpeername()[0] == "127.0.0.1"
            assert await recv_ack_item(ack_b) == 20
            await pub_a.send_all(frame(1, 10, 5))
            assert await recv_ack_item(ack_a) == 15
            await pub_b.send_all(frame(1, 120, 1))
            assert await recv_ack_item(ack_b) == 21
            await finish_publisher(pub_a)
            assert await read_all(ack_a) == b""
            await finish_publisher(pub_b)
            assert await read_all(ack_b) == b""
            stats = broker.statistics().dial_backs
            assert (stats.dialed, stats.failed, stats.lost, stats.active) == (2, 0, 0, 0)
            assert sorted(log_orders(broker)) == [*range(15), *range(100, 121)]


async def test_one_client_id_on_one_host_with_another_ack_port_is_refused(
    make_config: MakeConfig,
) -> None:
    with trio.fail_after(10):
        async with (
            broker_and_ack_listener(make_config) as (streams, broker, listener, ack_port),
            ack_listener() as (_, other_port),
        ):
            pub, ack = await first_publisher(streams, broker, listener, ack_port)
            async with await connect(broker.port) as intruder:
                await intruder.send_all(handshake(TOPIC, client_id=CID, port=other_port))
                code, text = error_frame(await read_all(intruder))
            assert code == ErrorCode.NOT_ALLOWED
            assert f"on port {ack_port}" in text
            assert f"asks for port {other_port}" in text
            assert "share one ack port" in text
            # The first client goes on as if nothing happened.
            await pub.send_all(frame(1, 10, 5))
            assert await recv_ack_item(ack) == 15
            await finish_publisher(pub)
            assert await read_all(ack) == b""
            stats = broker.statistics()
            assert stats.errors == {"not_allowed": 1}
            assert (stats.dial_backs.dialed, stats.dial_backs.active) == (1, 0)
            assert log_orders(broker) == list(range(15))


async def test_a_closed_ack_connection_is_never_joined_again(make_config: MakeConfig) -> None:
    with trio.fail_after(10):
        async with broker_and_ack_listener(make_config) as (streams, broker, listener, ack_port):
            pub_a, ack_1 = await first_publisher(streams, broker, listener, ack_port)
            await ack_1.aclose()
            # No count is due, yet the broker notices the close...
            await wait_until(lambda: broker.statistics().dial_backs.active == 0)
            assert broker.statistics().dial_backs.lost == 1
            # ...so the next publish connection of the client gets a new ack connection.
            pub_b = await start_publisher(streams, broker.port, ack_port, frame(1, 10, 20))
            ack_2 = await accept_acks(streams, listener)
            assert await recv_ack_item(ack_2) == 20
            await finish_publisher(pub_a)
            await finish_publisher(pub_b)
            assert await read_all(ack_2) == b""
            stats = broker.statistics().dial_backs
            assert (stats.dialed, stats.lost, stats.active) == (2, 1, 0)


async def test_an_old_connections_end_leaves_a_newer_ack_connection_open(
    make_config: MakeConfig,
) -> None:
    with trio.fail_after(10):
        async with broker_and_ack_listener(make_config) as (streams, broker, listener, ack_port):
            pub_a, ack_1 = await first_publisher(streams, broker, listener, ack_port)
            reset(ack_1)
            await ack_1.aclose()
            # A count for the reset connection fails to go out.
            await pub_a.send_all(frame(1, 10, 5))
            await wait_until(lambda: broker.statistics().dial_backs.active == 0)
            pub_b = await start_publisher(streams, broker.port, ack_port, frame(2, 15, 20))
            ack_2 = await accept_acks(streams, listener)
            assert await recv_ack_item(ack_2) == 20
            # The old publish connection ends: it held a share of the dead ack
            # connection only, so the new one stays open and counting.
            await finish_publisher(pub_a)
            await pub_b.send_all(frame(3, 35, 7))
            assert await recv_ack_item(ack_2) == 27
            await finish_publisher(pub_b)
            assert await read_all(ack_2) == b""
            stats = broker.statistics().dial_backs
            assert (stats.dialed, stats.lost, stats.active) == (2, 1, 0)
            assert log_orders(broker) == list(range(42))


# -- the registry on the mock clock ---------------------------------------------------------------


class Dialer:
    """Stands in for TCP: every dial waits for :attr:`gate`, then gets a memory stream."""

    def __init__(self) -> None:
        self.gate = trio.Event()
        self.dials: list[tuple[str, int]] = []
        self.cancelled = 0
        self.clients: list[trio.testing.MemoryReceiveStream] = []

    async def __call__(self, host: str, port: int) -> trio.abc.Stream:
        self.dials.append((host, port))
        try:
            await self.gate.wait()
        except trio.Cancelled:
            self.cancelled += 1
            raise
        client, server = trio.testing.memory_stream_pair()
        self.clients.append(client)
        return server


async def read_client(client: trio.abc.ReceiveStream, into: bytearray, eof: trio.Event) -> None:
    while data := await client.receive_some():
        into += data
    eof.set()


@asynccontextmanager
async def registry_with(dialer: Dialer) -> AsyncIterator[tuple[DialBackRegistry, trio.Nursery]]:
    async with trio.open_nursery() as nursery:
        yield DialBackRegistry(nursery, 3, 5.0, dialer), nursery


async def attach_in(
    nursery: trio.Nursery, registry: DialBackRegistry, leases: list[DialBackLease]
) -> trio.CancelScope:
    """Attach client 7 in a task of its own; returns the scope that cancels it."""
    scope = trio.CancelScope()

    async def attach() -> None:
        with scope:
            leases.append(await registry.attach(7, TOPIC, "10.0.0.1", 9000))

    nursery.start_soon(attach)
    await trio.testing.wait_all_tasks_blocked()
    return scope


@asynccontextmanager
async def dialed_leases(
    count: int,
) -> AsyncIterator[tuple[Dialer, trio.Nursery, list[DialBackLease]]]:
    """A registry whose dial succeeds at once, and ``count`` attaches of client 7
    (which share the one connection it dials)."""
    dialer = Dialer()
    dialer.gate.set()
    leases: list[DialBackLease] = []
    async with registry_with(dialer) as (registry, nursery):
        for _ in range(count):
            await attach_in(nursery, registry, leases)
        yield dialer, nursery, leases


@pytest.mark.parametrize("cancelled", ["first", "joiner"])
async def test_an_attach_cancelled_during_the_dial_holds_no_share(
    autojump_clock: trio.testing.MockClock, cancelled: str
) -> None:
    dialer = Dialer()
    leases: list[DialBackLease] = []
    with trio.fail_after(60):
        async with registry_with(dialer) as (registry, nursery):
            first = await attach_in(nursery, registry, leases)
            joiner = await attach_in(nursery, registry, leases)
            assert dialer.dials == [("10.0.0.1", 9000)]
            (first if cancelled == "first" else joiner).cancel()
            await trio.testing.wait_all_tasks_blocked()
            # The other attach still waits; the dial goes on for it.
            assert (leases, dialer.cancelled) == ([], 0)
            dialer.gate.set()
            await trio.testing.wait_all_tasks_blocked()
            (lease,) = leases
            received, eof = bytearray(), trio.Event()
            nursery.start_soon(read_client, dialer.clients[0], received, eof)
            lease.counter.advance(5)
            await trio.testing.wait_all_tasks_blocked()
            assert bytes(received) == struct.pack("<iQ", 3, 5)
            # The one share left is this lease's: its release closes the connection.
            lease.release()
            await eof.wait()
            assert registry.statistics().active == 0
    assert dialer.dials == [("10.0.0.1", 9000)]


async def test_a_dial_nobody_waits_for_is_abandoned(
    autojump_clock: trio.testing.MockClock,
) -> None:
    dialer = Dialer()
    leases: list[DialBackLease] = []
    with trio.fail_after(60):
        async with registry_with(dialer) as (registry, nursery):
            scopes = [await attach_in(nursery, registry, leases) for _ in range(2)]
            for scope in scopes:
                scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert (dialer.cancelled, registry.statistics().active) == (1, 0)
            # The next attach dials anew and gets a connection of its own.
            dialer.gate.set()
            await attach_in(nursery, registry, leases)
            (lease,) = leases
            assert (len(dialer.dials), len(dialer.clients)) == (2, 1)
            lease.release()
    assert registry.statistics().dialed == 1


async def test_a_lease_is_released_once(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(60):
        async with dialed_leases(2) as (dialer, nursery, leases):
            first, second = leases
            assert first.counter is second.counter
            with first:
                pass
            first.release()  # again: a no-op, not the second lease's share
            received, eof = bytearray(), trio.Event()
            nursery.start_soon(read_client, dialer.clients[0], received, eof)
            second.counter.advance(2)
            await trio.testing.wait_all_tasks_blocked()
            assert (bytes(received), eof.is_set()) == (struct.pack("<iQ", 3, 2), False)
            second.release()
            await eof.wait()
    assert len(dialer.dials) == 1


async def test_a_shared_ack_stream_is_never_held(autojump_clock: trio.testing.MockClock) -> None:
    """A publish connection holds its own counts while batches wait to be
    read; a dial-back counter counts for several, so holding it does nothing."""
    with trio.fail_after(60):
        async with dialed_leases(1) as (dialer, nursery, leases):
            (lease,) = leases
            received, eof = bytearray(), trio.Event()
            nursery.start_soon(read_client, dialer.clients[0], received, eof)
            lease.counter.hold()
            assert not lease.counter.held
            lease.counter.advance(5, 10**6)
            await trio.testing.wait_all_tasks_blocked()
            assert bytes(received) == struct.pack("<iQ", 3, 5)
            lease.release()
            await eof.wait()
