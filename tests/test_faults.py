"""Clients that stall, clients that vanish, and a log that fills up.

* Stalled clients (mid-handshake, mid-header, mid-payload) on the mock clock
  with in-memory connections: they cannot starve a healthy publisher, they
  get error 7 exactly when their timeout runs out, and their staging buffers
  come back. Receive slots are held only while a payload arrives, never
  across the broker's own waits, and those waits do not count against a
  client's batch clock.
* A publisher vanishes (both directions closed) in each phase of its
  connection, on both receive paths: nothing leaks, nothing partial becomes
  visible, the batches it had sent whole are committed whole, and a
  bystander publisher is served before and after.
* Log full seen from subscribers (package client): a subscriber connected
  while a publisher fills the log gets every committed message, the
  publisher gets error 4 with the right ``acked``, and the broker keeps
  serving.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable

import attrs
import pytest
import rawclient
import trio
from conftest import MakeConfig, wait_until
from memory import (
    CountingStream,
    MemoryClient,
    MemoryListener,
    header,
    memory_broker,
    open_client,
    settle,
    walk_file,
)
from tcpclient import publish
from trio.testing import MockClock

from trio_embarcadero import BrokerError, ErrorCode, open_broker
from trio_embarcadero.broker import Broker, ConnectionPhase
from trio_embarcadero.client import Message, open_publisher, open_subscriber
from trio_embarcadero.config import Config
from trio_embarcadero.log import open_log

QUIET = {"network.stats_interval_s": 1000.0}


def phase_of(broker: Broker, server: CountingStream) -> ConnectionPhase | None:
    """The phase of the connection on ``server``'s end, None once it is gone."""
    for connection in broker.connections:
        if connection.stream is server:
            return connection.phase
    return None


# -- stalled clients ------------------------------------------------------------------------------

POOL = 4
HANDSHAKE_TIMEOUT = 3.0
HEADER_TIMEOUT = 2.0
STALL_TIMEOUT = 1.0
BATCH_TIMEOUT = 5.0
STALL_CONFIG = {
    **QUIET,
    "network.staging_pool_num_buffers": POOL,
    "network.max_buffers_per_connection": 1,
    "network.handshake_timeout_s": HANDSHAKE_TIMEOUT,
    "network.header_timeout_s": HEADER_TIMEOUT,
    "network.payload_stall_timeout_s": STALL_TIMEOUT,
    "network.batch_timeout_s": BATCH_TIMEOUT,
}
HEADER_TIMED_OUT = (ErrorCode.TIMEOUT, f"batch header not received within {HEADER_TIMEOUT} s")
STALLED = (ErrorCode.TIMEOUT, f"batch payload made no progress for {STALL_TIMEOUT} s")
#: Room for every stalled connection plus one in the receive limiter, and a
#: monitor that resumes as soon as a healthy batch leaves the pool.
SERVED_CONFIG = {
    **STALL_CONFIG,
    "network.num_publish_receive_threads": 8,
    "network.pause_high_watermark": 1.0,
    "network.resume_low_watermark": (POOL - 1) / POOL,
}
HEALTHY_ID = 1
HEALTHY_BATCHES = 5


class Stalled:
    """Connections that stop sending: two mid-handshake, two mid-header and
    ``POOL - 1`` mid-payload (each holding a staging buffer)."""

    def __init__(self) -> None:
        self.handshakes: list[MemoryClient] = []
        self.headers: list[MemoryClient] = []
        self.payloads: list[MemoryClient] = []

    async def open(self, listener: MemoryListener, nursery: trio.Nursery) -> None:
        for k in range(2):
            client = await open_client(listener, nursery)
            await client.send(rawclient.handshake("t", client_id=20 + k)[:40])
            self.handshakes.append(client)
        for k in range(2):
            client = await open_client(listener, nursery)
            data, _ = rawclient.batch(0, 30 + k, 0, 10, 1000)
            await client.send(rawclient.handshake("t", client_id=30 + k) + data[:50])
            self.headers.append(client)
        for k in range(POOL - 1):
            client = await open_client(listener, nursery)
            data, _ = rawclient.batch(0, 40 + k, 0, 10, 1000)
            await client.send(rawclient.handshake("t", client_id=40 + k) + data[: 128 + 5000])
            self.payloads.append(client)


async def stalled_and_healthy(config: Config) -> tuple[Stalled, MemoryClient, list[int]]:
    """Stall connections at t=0, then publish five batches on a healthy one.

    The ``POOL - 1`` stalled payloads each hold a receive slot and a buffer;
    the stalled headers hold neither.

    Returns the stalled clients, the healthy one and the committed batches'
    client ids in log order, once every stalled connection has timed out.
    """
    async with trio.open_nursery() as nursery:
        async with memory_broker(config) as (broker, listener):
            stalled = Stalled()
            await stalled.open(listener, nursery)
            await settle()
            stats = broker.statistics()
            assert stats.pool.used == POOL - 1
            assert stats.connections["wait_payload"] == POOL - 1
            assert broker.receive_limiter.borrowed_tokens == POOL - 1
            healthy = await open_client(listener, nursery)
            await healthy.send(rawclient.handshake("t", client_id=HEALTHY_ID))
            for k in range(HEALTHY_BATCHES):
                await healthy.send(rawclient.batch(k, HEALTHY_ID, 10 * k, 10, 1000)[0])
            await trio.sleep(BATCH_TIMEOUT + 1)
            stats = broker.statistics()
            assert stats.pool.used == 0, "a stalled connection's buffer did not come back"
            assert sum(stats.connections.values()) == 1  # the healthy one, idle
            assert stats.errors == {"timeout": 2 + 2 + POOL - 1}
            await healthy.close()
            await settle()
            assert healthy.eof_at is not None
    committed = [h.client_id for h in walk_file(config.cxl.path) if h.batch_complete == 1]
    return stalled, healthy, committed


async def test_stalled_clients_cannot_starve_a_healthy_publisher(
    make_config: MakeConfig, autojump_clock: MockClock
) -> None:
    stalled, healthy, committed = await stalled_and_healthy(make_config(**SERVED_CONFIG))
    # Every healthy batch was acked at once, long before any timeout.
    counts = [10 * (k + 1) for k in range(HEALTHY_BATCHES)]
    assert healthy.acks() == (0, counts, None)
    assert healthy.arrival_of(len(healthy.data) - 1) == 0.0
    # Each stalled connection got error 7 when its own clock ran out.
    for client in stalled.handshakes:
        assert client.acks(with_broker_id=False) == (
            None,
            [],
            (ErrorCode.TIMEOUT, f"no handshake within {HANDSHAKE_TIMEOUT} s"),
        )
        assert client.eof_at == HANDSHAKE_TIMEOUT
    for client in stalled.headers:
        assert client.acks() == (0, [], HEADER_TIMED_OUT)
        assert client.eof_at == HEADER_TIMEOUT
    for client in stalled.payloads:
        assert client.acks() == (0, [], STALLED)
        assert client.eof_at == STALL_TIMEOUT
    # Nothing of theirs reached the log.
    assert committed == [HEALTHY_ID] * HEALTHY_BATCHES


async def test_stalled_clients_with_default_watermarks(
    make_config: MakeConfig, autojump_clock: MockClock
) -> None:
    config = make_config(**{**STALL_CONFIG, "network.num_publish_receive_threads": 8})
    _, healthy, _ = await stalled_and_healthy(config)
    assert healthy.acks()[1][-1:] == [10 * HEALTHY_BATCHES]
    assert healthy.arrival_of(len(healthy.data) - 1) < BATCH_TIMEOUT


async def test_stalled_clients_with_the_default_receive_limiter(
    make_config: MakeConfig, autojump_clock: MockClock
) -> None:
    config = make_config(
        **{
            **SERVED_CONFIG,
            "network.num_publish_receive_threads": 4,  # the default; 5 connections stall mid-batch
        }
    )
    # The three stalled payloads hold three of the 4 slots; the stalled
    # headers hold none, so the healthy publisher gets the fourth at once.
    _, healthy, _ = await stalled_and_healthy(config)
    assert healthy.acks() == (0, [10 * (k + 1) for k in range(HEALTHY_BATCHES)], None)
    assert healthy.arrival_of(len(healthy.data) - 1) == 0.0


async def test_stalled_headers_do_not_delay_an_honest_publisher(
    make_config: MakeConfig, autojump_clock: MockClock
) -> None:
    """Four connections that sent one header byte each used to hold all four
    receive slots until their batch timeout; a header now holds none."""
    config = make_config(**{**QUIET, "network.batch_timeout_s": 4.0})
    assert config.network.num_publish_receive_threads == 4
    async with trio.open_nursery() as nursery:
        async with memory_broker(config) as (broker, listener):
            stallers = []
            for k in range(4):
                client = await open_client(listener, nursery)
                await client.send(rawclient.handshake(f"s{k}", client_id=20 + k) + b"\x01")
                stallers.append(client)
            await trio.sleep(0.2)
            assert broker.statistics().connections["wait_header"] == 4
            honest = await open_client(listener, nursery)
            await honest.send(rawclient.handshake("t", client_id=HEALTHY_ID))
            for k in range(3):
                await honest.send(rawclient.batch(k, HEALTHY_ID, 10 * k, 10, 1000)[0])
            await settle()
            assert honest.acks() == (0, [10, 20, 30], None)
            assert honest.arrival_of(len(honest.data) - 1) == 0.2
            assert broker.receive_limiter.borrowed_tokens == 0
            await trio.sleep(config.network.header_timeout_s)
            # Each staller got error 7 header_timeout_s after its first byte.
            for client in stallers:
                assert client.acks()[2] == (
                    ErrorCode.TIMEOUT,
                    f"batch header not received within {config.network.header_timeout_s} s",
                )
                assert client.eof_at == config.network.header_timeout_s
            await honest.close()


# -- the broker's own waits: no slot held, no batch clock running --------------------------------

WAIT_CONFIG = {
    **QUIET,
    "network.num_publish_receive_threads": 1,
    "network.batch_timeout_s": 1.0,
    "network.backoff_max_retries": 1000,  # 1.6 s of backoff at most
    "cxl.max_inflight_batches": 1,
}


async def test_no_slot_or_batch_clock_across_a_staging_buffer_wait(
    make_config: MakeConfig, autojump_clock: MockClock
) -> None:
    config = make_config(
        **{
            **WAIT_CONFIG,
            "network.staging_pool_num_buffers": 2,
            "network.pause_high_watermark": 1.0,
        }
    )
    async with trio.open_nursery() as nursery:
        async with memory_broker(config) as (broker, listener):
            held = [broker.pool.allocate() for _ in range(2)]
            client = await open_client(listener, nursery)
            await client.send(
                rawclient.handshake("t", client_id=3) + rawclient.batch(0, 3, 0, 10, 300)[0]
            )
            await trio.sleep(3.0)  # three batch timeouts of the broker's waiting
            assert phase_of(broker, client.server) is ConnectionPhase.PAUSED
            assert broker.receive_limiter.borrowed_tokens == 0
            assert client.acks() == (0, [], None)
            for buffer in held:
                assert buffer is not None
                buffer.release()
            await settle()
            assert client.acks() == (0, [10], None)
            await client.close()


@pytest.mark.parametrize("use_nonblocking", [True, False], ids=["staged", "direct"])
async def test_no_slot_or_batch_clock_while_the_log_is_held(
    make_config: MakeConfig, autojump_clock: MockClock, use_nonblocking: bool
) -> None:
    """A publisher whose topic's log window is full waits without the only
    receive slot (staged: for its in-flight window, as at ack 2 for the disk;
    direct: backing off for log space), so another topic's publisher is
    served at once; and the wait does not count against its batch clock."""
    config = make_config(
        **{
            **WAIT_CONFIG,
            "network.use_nonblocking": use_nonblocking,
            "network.max_buffers_per_connection": 1,
        }
    )
    async with trio.open_nursery() as nursery:
        async with memory_broker(config) as (broker, listener):
            held = broker.log.get_cxl_buffer("stuck", header(64))
            waiting = await open_client(listener, nursery)
            # Staged: B0 backs off in an allocator, B1 waits for the window.
            # Direct: B0 backs off for log space; B1 follows it.
            await waiting.send(
                rawclient.handshake("stuck", client_id=7)
                + b"".join(rawclient.batch(k, 7, 10 * k, 10, 300)[0] for k in range(2))
            )
            await settle()
            assert phase_of(broker, waiting.server) is ConnectionPhase.WAIT_CXL
            other = await open_client(listener, nursery)
            await other.send(
                rawclient.handshake("free", client_id=HEALTHY_ID)
                + rawclient.batch(0, HEALTHY_ID, 0, 10, 300)[0]
            )
            await settle()
            assert other.acks() == (0, [10], None)
            assert other.arrival_of(4) == 0.0
            assert broker.receive_limiter.borrowed_tokens == 0
            await trio.sleep(1.5)  # longer than the batch timeout, shorter than the backoff
            broker.commits.abandon(held)
            await trio.sleep(0.1)
            assert waiting.acks() == (0, [10, 20], None)
            for client in (waiting, other):
                await client.close()


async def test_the_per_connection_cap_keeps_buffers_for_others(
    make_config: MakeConfig, autojump_clock: MockClock
) -> None:
    """A publisher whose batches cannot be placed (its topic's log window is
    full) holds at most max_buffers_per_connection buffers; others go on.

    (Each of its batches in the allocators occupies a worker: one backing off,
    the next waiting for it. With no worker left for other topics they would
    wait for its backoff to end, so there is one worker more than its cap.)
    """
    config = make_config(
        **{
            **QUIET,
            "network.staging_pool_num_buffers": POOL,
            "network.max_buffers_per_connection": 2,
            "network.num_cxl_allocation_workers": 3,
            "network.pause_high_watermark": 1.0,
            "network.resume_low_watermark": 0.5,
            "cxl.max_inflight_batches": 1,
            "network.backoff_max_retries": 1000,
        }
    )
    greedy_batches = [rawclient.batch(k, 7, 10 * k, 10, 300)[0] for k in range(6)]
    async with trio.open_nursery() as nursery:
        async with memory_broker(config) as (broker, listener):
            held = broker.log.get_cxl_buffer("stuck", header(64))
            greedy = await open_client(listener, nursery)
            await greedy.send(rawclient.handshake("stuck", client_id=7) + b"".join(greedy_batches))
            await settle()
            stats = broker.statistics()
            assert stats.pool.used == 2  # not all four
            assert phase_of(broker, greedy.server) is ConnectionPhase.WAIT_CXL
            healthy = await open_client(listener, nursery)
            await healthy.send(rawclient.handshake("free", client_id=HEALTHY_ID))
            for k in range(HEALTHY_BATCHES):
                await healthy.send(rawclient.batch(k, HEALTHY_ID, 10 * k, 10, 300)[0])
            await settle()
            assert healthy.acks() == (0, [10 * (k + 1) for k in range(HEALTHY_BATCHES)], None)
            assert healthy.arrival_of(len(healthy.data) - 1) == 0.0
            assert broker.statistics().pool.peak_used == 3
            # Let the stuck topic go: every greedy batch commits, in order.
            broker.commits.abandon(held)
            await trio.sleep(0.1)
            assert greedy.acks()[1][-1:] == [60]
            assert broker.statistics().pool.used == 0
            await greedy.close()
            await healthy.close()


async def test_direct_path_a_stalled_payload_delays_its_topic_at_most_the_stall_timeout(
    make_config: MakeConfig, autojump_clock: MockClock
) -> None:
    """On the direct path a batch is received into log space reserved when its
    header arrived, and batches commit in reservation order: a publisher
    stalled mid-payload holds back the commits (and acks) of every publisher
    of its topic, but only until its payload has made no progress for
    payload_stall_timeout_s; then it is abandoned and the rest commit."""
    config = make_config(
        **{**STALL_CONFIG, "network.use_nonblocking": False, "network.backoff_max_retries": 1000}
    )
    async with trio.open_nursery() as nursery:
        async with memory_broker(config) as (broker, listener):
            healthy = await open_client(listener, nursery)
            await healthy.send(rawclient.handshake("t", client_id=HEALTHY_ID))
            await healthy.send(rawclient.batch(0, HEALTHY_ID, 0, 10, 1000)[0])  # creates "t"
            stalled = await open_client(listener, nursery)
            data, _ = rawclient.batch(0, 40, 0, 10, 1000)
            await stalled.send(rawclient.handshake("t", client_id=40) + data[: 128 + 5000])
            other = await open_client(listener, nursery)  # another topic: not held back
            await other.send(
                rawclient.handshake("u", client_id=2) + rawclient.batch(0, 2, 0, 5, 10)[0]
            )
            await trio.sleep(0.5)  # the healthy publisher goes on later: its batches queue behind
            subscriber = await open_client(listener, nursery)
            await subscriber.send(rawclient.handshake("t", client_id=3, req=1))
            for k in range(1, 4):
                await healthy.send(rawclient.batch(k, HEALTHY_ID, 10 * k, 10, 1000)[0])
            await settle()
            assert other.acks() == (0, [5], None)
            assert healthy.acks() == (0, [10], None)  # received, not committable yet
            assert len(subscriber.data) == 10 * (64 + 1024)
            await trio.sleep(STALL_TIMEOUT)
            # The stalled batch was given up at 1 s, long before its batch
            # timeout; everything behind it went through then.
            assert stalled.acks()[2] == STALLED
            assert stalled.eof_at == STALL_TIMEOUT
            _, counts, error = healthy.acks()
            assert (counts[-1:], error) == ([40], None)
            assert healthy.arrival_of(len(healthy.data) - 1) == STALL_TIMEOUT
            assert len(subscriber.data) == 40 * (64 + 1024)
            assert subscriber.arrival_of(len(subscriber.data) - 1) == STALL_TIMEOUT
            assert broker.receive_limiter.borrowed_tokens == 0
            for client in (other, healthy, subscriber):
                await client.close()
            await settle()
    states = [(h.client_id, h.batch_complete) for h in walk_file(config.cxl.path)]
    assert states == [(HEALTHY_ID, 1), (40, 2)] + [(HEALTHY_ID, 1)] * 3


async def test_a_slow_payload_that_keeps_moving_is_not_a_stall(
    make_config: MakeConfig, autojump_clock: MockClock
) -> None:
    """The stall timeout is about progress: bytes every 0.9 s keep a payload
    alive, and the batch clock still bounds the whole batch."""
    config = make_config(**{**STALL_CONFIG, "network.use_nonblocking": False})
    data, _ = rawclient.batch(0, 7, 0, 10, 100)
    async with trio.open_nursery() as nursery:
        async with memory_broker(config) as (broker, listener):
            client = await open_client(listener, nursery)
            await client.send(rawclient.handshake("t", client_id=7) + data[:200])
            for start in range(200, len(data), 600):
                await trio.sleep(0.9)
                await client.send(data[start : start + 600])
            await settle()
            assert trio.current_time() == pytest.approx(0.9 * 4)
            assert client.acks() == (0, [10], None)
            # The same pace for longer than the batch timeout is cut by the batch clock.
            started = trio.current_time()
            await client.send(data[:200])
            for start in range(200, 700, 100):
                await trio.sleep(0.9)
                await client.send(data[start : start + 100])
            await trio.sleep(1.0)
            assert client.acks()[2] == (
                ErrorCode.TIMEOUT,
                f"batch not received within {BATCH_TIMEOUT} s",
            )
            assert client.eof_at == pytest.approx(started + BATCH_TIMEOUT)
            assert broker.statistics().batches_committed == 1


# -- a publisher vanishes in each phase ------------------------------------------------------------

FAULT_ID = 5
BYSTANDER_ID = 6
B0, B0_PAYLOADS = rawclient.batch(0, FAULT_ID, 0, 10, 300)
B1, _ = rawclient.batch(1, FAULT_ID, 10, 10, 300)
HS = rawclient.handshake("t", client_id=FAULT_ID)
PART = 128 + 1000  # a batch header and part of its payload


class Held:
    """Log space or staging buffers a test holds to keep a connection waiting."""

    def __init__(self) -> None:
        self.release_actions: list[Callable[[], None]] = []

    def release(self) -> None:
        for action in self.release_actions:
            action()
        self.release_actions.clear()


def hold_log(broker: Broker, held: Held) -> None:
    reservation = broker.log.get_cxl_buffer("t", header(64))
    held.release_actions.append(lambda: broker.commits.abandon(reservation))


def hold_pool(broker: Broker, held: Held) -> None:
    buffer = broker.pool.allocate()
    assert buffer is not None
    buffer.hand_off()  # a whole batch queued for the log: what the monitor counts
    held.release_actions.append(buffer.release)


@attrs.frozen
class Phase:
    """How to bring a publisher to one phase, and what must be left of it.

    Attributes:
        phase: Where its connection must be when it vanishes.
        send: What it sends first, by path (staged, direct).
        config: Config overrides, by path.
        hold: Called first, to make the broker wait (log space, pool buffers).
        half_close: Send EOF before vanishing.
        committed: How many of its batches (B0, B1) end up committed, by path.
        abandoned: How many of its batches end up abandoned in the log, by path.
        paths: The receive paths the phase exists on.
    """

    phase: ConnectionPhase
    send: tuple[bytes, bytes]
    committed: tuple[int, int]
    config: tuple[dict[str, object], dict[str, object]] = ({}, {})
    hold: Callable[[Broker, Held], None] | None = None
    half_close: bool = False
    abandoned: tuple[int, int] = (0, 0)
    paths: tuple[bool, ...] = (True, False)


LOG_HELD = {"cxl.max_inflight_batches": 1, "network.max_buffers_per_connection": 1}
PHASES = {
    "init": Phase(ConnectionPhase.INIT, (HS[:10], HS[:10]), (0, 0)),
    "wait-header": Phase(ConnectionPhase.WAIT_HEADER, (HS + B0, HS + B0), (1, 1)),
    "mid-header": Phase(ConnectionPhase.WAIT_HEADER, (HS + B0 + B1[:60],) * 2, (1, 1)),
    "wait-payload": Phase(
        ConnectionPhase.WAIT_PAYLOAD, (HS + B0 + B1[:PART],) * 2, (1, 1), abandoned=(0, 1)
    ),
    # Staged: B0 waits for log space, B1's header waits for B0 (one buffer per
    # connection). Direct: B0's header waits for log space.
    "wait-cxl": Phase(
        ConnectionPhase.WAIT_CXL,
        (HS + B0 + B1[:PART], HS + B0[:PART]),
        (1, 0),
        config=(LOG_HELD, LOG_HELD),
        hold=hold_log,
        abandoned=(0, 1),
    ),
    "paused": Phase(
        ConnectionPhase.PAUSED,
        (HS + B0 + B1[:PART], b""),
        (1, 0),
        config=(
            {
                "network.staging_pool_num_buffers": 2,
                "network.pause_high_watermark": 0.5,
                "network.resume_low_watermark": 0.0,
            },
            {},
        ),
        hold=hold_pool,
        paths=(True,),  # the direct path has no staging pool, so no pause
    ),
    # B0 is whole but cannot be committed yet when the publisher sends EOF.
    "draining": Phase(
        ConnectionPhase.DRAINING,
        (HS + B0, HS + B0),
        (1, 1),
        config=(LOG_HELD, {"cxl.max_inflight_batches": 2}),
        hold=hold_log,
        half_close=True,
    ),
}
PHASE_CASES = [
    pytest.param(name, path, id=f"{name}-{'staged' if path else 'direct'}")
    for name, phase in PHASES.items()
    for path in (True, False)
    if path in phase.paths
]


@pytest.mark.parametrize(("name", "use_nonblocking"), PHASE_CASES)
async def test_a_publisher_vanishes(
    make_config: MakeConfig, autojump_clock: MockClock, name: str, use_nonblocking: bool
) -> None:
    case = PHASES[name]
    path = 0 if use_nonblocking else 1
    config = make_config(
        **{
            **QUIET,
            "network.use_nonblocking": use_nonblocking,
            "network.backoff_max_retries": 1000,
            **case.config[path],
        }
    )
    async with trio.open_nursery() as nursery:
        async with memory_broker(config) as (broker, listener):
            bystander = await open_client(listener, nursery)
            await bystander.send(rawclient.handshake("other", client_id=BYSTANDER_ID))
            await bystander.send(rawclient.batch(0, BYSTANDER_ID, 0, 10, 100)[0])
            await settle()
            assert bystander.acks() == (0, [10], None)

            held = Held()
            if case.hold is not None:
                case.hold(broker, held)
            stream = await listener.connect()
            server = listener.accepted[-1]
            await stream.send_all(case.send[path])
            if case.half_close:
                await stream.send_eof()
            await settle()
            assert phase_of(broker, server) is case.phase
            # Gone: neither direction works any more.
            await stream.aclose()
            await settle()
            held.release()
            await trio.sleep(0.1)  # allocator retries, resumed receivers

            assert phase_of(broker, server) is None
            stats = broker.statistics()
            assert stats.pool.used == 0, "a staging buffer leaked"
            assert stats.queued_batches == 0
            assert not stats.paused
            assert stats.internal_errors == 0
            assert sum(stats.connections.values()) == 1  # the bystander
            # The bystander did not notice.
            await bystander.send(rawclient.batch(1, BYSTANDER_ID, 10, 10, 100)[0])
            await bystander.close()
            await settle()
            assert bystander.acks() == (0, [10, 20], None)
            assert bystander.eof_at is not None

    with open_log(config.cxl.path) as log:
        mine = [b for b in log.batches("t") if b.client_id == FAULT_ID]
        assert [b.state for b in mine if b.state != "abandoned"] == ["committed"] * case.committed[
            path
        ]
        assert sum(b.state == "abandoned" for b in mine) == case.abandoned[path]
        assert not any(b.state == "reserved" for b in log.batches("t"))
        messages = [bytes(m.payload) for m in log.messages("t")]
        assert messages == B0_PAYLOADS[: 10 * case.committed[path]]
        assert [bytes(m.payload) for m in log.messages("other")] == [
            rawclient.payload_for(BYSTANDER_ID, i, 100) for i in range(20)
        ]


# -- log full, seen by subscribers ----------------------------------------------------------------


async def publish_all(port: int, topic: str, payloads: list[bytes]) -> None:
    """Publish with the package client, 256 KiB batches, client id 9."""
    async with open_publisher(
        "127.0.0.1", port, topic, client_id=9, batch_bytes=256 * 1024, linger=None
    ) as pub:
        await pub.publish_many(payloads)


async def test_subscribers_read_everything_committed_when_the_log_fills(
    make_config: MakeConfig,
) -> None:
    config = make_config(
        **{
            "cxl.size_mb": 8,
            "cxl.segment_mb": 2,
            "cxl.segment_unit_kb": 2048,  # fixed 2 MiB segments: a known capacity
            "network.backoff_max_retries": 2,
        }
    )
    size = 1000
    payloads = [rawclient.payload_for(9, i, size) for i in range(10_000)]
    with trio.fail_after(10):
        async with open_broker(config) as broker:
            received: list[Message] = []

            async def follow() -> None:
                async with open_subscriber("127.0.0.1", broker.port, "full") as sub:
                    while True:
                        received.extend(await sub.receive_messages())

            async with trio.open_nursery() as nursery:
                nursery.start_soon(follow)
                await wait_until(lambda: broker.statistics().connections["subscribed"] == 1)
                with pytest.raises(BrokerError) as info:
                    await publish_all(broker.port, "full", payloads)
                assert info.value.code == ErrorCode.LOG_FULL
                acked = info.value.acked
                stats = broker.statistics()
                assert acked == stats.messages_committed > 0
                await wait_until(lambda: len(received) >= acked)
                # The subscriber got every committed message, in order, and nothing else.
                assert [m.offset for m in received] == list(range(acked))
                assert [bytes(m.payload) for m in received] == payloads[:acked]
                assert {m.client_id for m in received} == {9}
                # It is still subscribed, and the broker still serves: a new subscriber
                # reads the tail, a new topic's publisher gets error 4 too.
                assert broker.statistics().connections["subscribed"] == 1
                start = acked - 7
                async with open_subscriber("127.0.0.1", broker.port, "full", start=start) as sub:
                    tail: list[bytes] = []
                    while len(tail) < 7:
                        tail.extend(bytes(m.payload) for m in await sub.receive_messages())
                assert tail == payloads[start:acked]
                assert len(received) == acked
                with pytest.raises(BrokerError) as info:
                    await publish_all(broker.port, "new", [b"x" * 100])
                assert info.value.code == ErrorCode.LOG_FULL
                assert info.value.acked == 0
                nursery.cancel_scope.cancel()
            stats = broker.statistics()
            assert stats.errors == {"log_full": 2}
            assert stats.internal_errors == 0
            assert stats.pool.used == 0


async def test_a_pause_that_ends_before_the_connection_wakes_is_not_a_timeout(
    make_config: MakeConfig, autojump_clock: MockClock
) -> None:
    async with trio.open_nursery() as nursery:
        async with memory_broker(make_config(**QUIET)) as (broker, listener):
            client = await open_client(listener, nursery)
            await client.send(rawclient.handshake("t", client_id=3))
            await settle()
            assert phase_of(broker, client.server) is ConnectionPhase.WAIT_HEADER
            # What the pool monitor does when a buffer is taken and given back
            # within one scheduling round of this connection's task.
            broker.gate.pause()
            broker.gate.resume()
            await settle()
            assert client.acks() == (0, [], None)  # no error frame...
            assert client.eof_at is None  # ...and still open
            await client.send(rawclient.batch(0, 3, 0, 10, 100)[0])
            await client.close()
            await settle()
            assert client.acks() == (0, [10], None)


# -- a client gone before the broker looks at its connection --------------------------------------


@pytest.mark.parametrize("allowed", ["", "127.0.0.0/8"], ids=["open", "allow-list"])
async def test_a_connection_reset_before_its_handler_runs(
    make_config: MakeConfig, allowed: str
) -> None:
    config = make_config(**{"network.allowed_networks": allowed})
    with trio.fail_after(10):
        async with open_broker(config) as broker:
            # Connected and reset by the kernel before the broker's accept loop
            # runs again: no checkpoint in between.
            sock = socket.create_connection(("127.0.0.1", broker.port))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
            await wait_until(lambda: broker.statistics().connections_accepted >= 1)
            received = await publish(
                broker.port, "t", [rawclient.batch(0, 3, 0, 10, 100)[0]], client_id=3
            )
            assert rawclient.parse_ack_stream(received) == (0, [10], None)
            assert broker.statistics().internal_errors == 0
