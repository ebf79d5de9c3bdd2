"""How connections end, on the mock clock: graceful drain, grace period, and the three timeouts."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import rawclient
import trio
from conftest import MakeConfig
from memory import MemoryClient, header, memory_broker, open_client, settle, walk_file
from trio.testing import MockClock

from trio_embarcadero.broker import Broker
from trio_embarcadero.config import Config
from trio_embarcadero.wire import BATCH_HEADER_SIZE

US = 1e-6
EPS = 10 * US


def approx(x: float) -> object:
    return pytest.approx(x, abs=1e-9)


def quiet_config(make_config: MakeConfig, **overrides: object) -> Config:
    values: dict[str, object] = {"network.stats_interval_s": 1000.0}
    values.update(overrides)
    return make_config(**values)


@asynccontextmanager
async def one_client(config: Config) -> AsyncIterator[tuple[Broker, MemoryClient]]:
    """A memory broker with one client connected at once (read in the background)."""
    async with trio.open_nursery() as nursery:
        async with memory_broker(config) as (broker, listener):
            yield broker, await open_client(listener, nursery)


# -- graceful shutdown -----------------------------------------------------------------------

DRAIN_CONFIG = {
    "cxl.max_inflight_batches": 1,
    "network.backoff_max_retries": 1000,
    "network.num_cxl_allocation_workers": 1,
}
#: The allocator's attempts are at 0, 0.1, 0.3, 0.7, 1.5, 3.1, 4.7 ms, then every 1.6 ms.
RELEASE_AT = 0.050 + EPS
COMMIT_AT = 0.0047 + 29 * 0.0016  # its first attempt after RELEASE_AT: 51.1 ms


async def drain_with_staged_batches(make_config: MakeConfig) -> tuple[MemoryClient, float]:
    """Three batches staged behind a full in-flight window when the broker is told to stop.

    Returns the client and the virtual time at which ``open_broker`` returned.
    """
    config = quiet_config(make_config, **DRAIN_CONFIG)
    async with trio.open_nursery() as nursery:
        async with memory_broker(config) as (broker, listener):
            client = await open_client(listener, nursery)
            await client.send(rawclient.handshake("t", client_id=5, ack=1))
            held = [broker.log.get_cxl_buffer("t", header(64))]
            for k in range(3):
                await client.send(rawclient.batch(k, 5, 10 * k, 10, 300)[0])
            await settle()
            stats = broker.statistics()
            assert (stats.pool.used, stats.queued_batches, stats.batches_committed) == (3, 2, 0)

            async def release() -> None:
                await trio.sleep_until(RELEASE_AT)
                broker.commits.abandon(held.pop())

            nursery.start_soon(release)
            await trio.sleep(0.020)
            # Leaving the block starts the drain at 20 ms.
        return client, trio.current_time()


async def test_shutdown_commits_staged_batches_and_acks_them(
    make_config: MakeConfig, autojump_clock: MockClock
) -> None:
    client, stopped_at = await drain_with_staged_batches(make_config)
    # The drain waited for the allocator: nothing staged was dropped.
    assert stopped_at == approx(COMMIT_AT)
    assert client.eof_at == approx(COMMIT_AT)
    headers = walk_file(make_config().cxl.path)
    assert [h.batch_complete for h in headers] == [2, 1, 1, 1]  # the held one was abandoned
    assert [h.start_logical_offset for h in headers[1:]] == [0, 10, 20]
    assert sum(h.num_msg for h in headers[1:]) == 30
    # Every message was acked, then error 5 said why the connection closed.
    broker_id, counts, error = client.acks()
    assert broker_id == 0
    assert counts[-1] == 30
    assert counts == sorted(set(counts))
    assert error == (5, "broker is shutting down")
    assert client.arrival_of(4) == approx(COMMIT_AT)
    assert client.arrival_of(len(client.data) - 1) == approx(COMMIT_AT)


async def test_error_5_at_shutdown_is_expected_not_an_error(
    make_config: MakeConfig, autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Telling each client "shutting down" is logged at INFO and counted apart
    from the errors, which stay for faults."""
    caplog.set_level(logging.INFO, logger="trio_embarcadero")
    async with trio.open_nursery() as nursery:
        async with memory_broker(quiet_config(make_config)) as (broker, listener):
            publisher = await open_client(listener, nursery)
            await publisher.send(rawclient.handshake("t", client_id=5, ack=1))
            await publisher.send(rawclient.batch(0, 5, 0, 10, 300)[0])
            subscriber = await open_client(listener, nursery)
            await subscriber.send(rawclient.handshake("t", req=1))
            await settle()
    for client in (publisher, subscriber):
        assert client.eof_at is not None
        assert client.data.endswith(b"broker is shutting down")
    assert broker.counters.errors == {}
    assert broker.counters.shutdown_notices == 2
    told = [r for r in caplog.records if "shutting down" in r.getMessage()]
    assert {r.levelno for r in told} == {logging.INFO}
    assert len([r for r in told if "closed" in r.getMessage()]) == 2
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


#: Two staging buffers: one queued for the log closes the gate until none is.
PAUSE_AT_ONE_BUFFER = {
    "network.staging_pool_num_buffers": 2,
    "network.pause_high_watermark": 0.5,
    "network.resume_low_watermark": 0.0,
}


async def test_a_paused_connection_stops_at_once(
    make_config: MakeConfig, autojump_clock: MockClock
) -> None:
    config = quiet_config(make_config, **PAUSE_AT_ONE_BUFFER)
    async with trio.open_nursery() as nursery:
        async with memory_broker(config) as (broker, listener):
            held = broker.pool.allocate()
            assert held is not None
            held.hand_off()  # a batch queued for the log: the monitor counts it
            client = await open_client(listener, nursery)
            await client.send(rawclient.handshake("t", client_id=5, ack=1))
            await client.send(rawclient.batch(0, 5, 0, 10, 300)[0])
            await settle()
            assert broker.statistics().connections["paused"] == 1
            await trio.sleep(0.5)
            # Leave while it is paused.
        assert trio.current_time() == 0.5
    assert held is not None
    held.release()
    assert client.eof_at == 0.5
    assert client.acks() == (0, [], (5, "broker is shutting down"))
    assert client.server.bytes_received == 64  # the batch at the gate was never read
    assert walk_file(config.cxl.path) == []


@pytest.mark.parametrize("use_nonblocking", [True, False], ids=["staged", "direct"])
async def test_an_idle_connection_without_an_idle_clock_stops_at_once(
    make_config: MakeConfig, autojump_clock: MockClock, use_nonblocking: bool
) -> None:
    """Its wait for the next header has no cancel scope of its own: a stop
    cancels the receive loop there, and the connection ends with error 5
    after its acks, at the moment of the stop."""
    config = quiet_config(make_config, **{"network.use_nonblocking": use_nonblocking})
    async with one_client(config) as (broker, client):
        await client.send(rawclient.handshake("t", client_id=5, ack=1))
        await client.send(rawclient.batch(0, 5, 0, 10, 300)[0])
        await trio.sleep(3.0)
        assert broker.statistics().connections["wait_header"] == 1
        # Leave while it waits.
    assert client.eof_at == 3.0
    assert client.acks() == (0, [10], (5, "broker is shutting down"))


async def test_a_header_read_while_paused_goes_with_a_stop(
    make_config: MakeConfig, autojump_clock: MockClock
) -> None:
    """A batch that arrives at an idle connection after the pool monitor
    paused receivers is read as far as its header; a stop meanwhile ends the
    connection at once, and the batch is neither acked nor in the log."""
    config = quiet_config(make_config, **PAUSE_AT_ONE_BUFFER)
    async with trio.open_nursery() as nursery:
        async with memory_broker(config) as (broker, listener):
            client = await open_client(listener, nursery)
            await client.send(rawclient.handshake("t", client_id=5, ack=1))
            await settle()
            held = broker.pool.allocate()
            assert held is not None
            held.hand_off()
            await settle()
            assert broker.gate.paused
            await client.send(rawclient.batch(0, 5, 0, 10, 300)[0])
            await settle()
            assert broker.statistics().connections["paused"] == 1
            await trio.sleep(0.5)
            # Leave while its header waits at the gate.
        assert trio.current_time() == 0.5
    held.release()
    assert client.eof_at == 0.5
    assert client.acks() == (0, [], (5, "broker is shutting down"))
    assert client.server.bytes_received == 64 + BATCH_HEADER_SIZE
    assert walk_file(config.cxl.path) == []


async def test_shutdown_grace_cuts_a_batch_that_never_finishes(
    make_config: MakeConfig, caplog: pytest.LogCaptureFixture, autojump_clock: MockClock
) -> None:
    config = quiet_config(
        make_config,
        **{"network.shutdown_grace_s": 2.0, "network.payload_stall_timeout_s": 10.0},
    )
    data, _ = rawclient.batch(0, 5, 0, 10, 300)
    async with trio.open_nursery() as nursery:
        async with memory_broker(config) as (broker, listener):
            client = await open_client(listener, nursery)
            await client.send(rawclient.handshake("t", client_id=5, ack=1))
            await client.send(data[: 128 + 1000])  # the header and part of the payload
            await trio.sleep(0.5)
            assert broker.statistics().connections["wait_payload"] == 1
        # The drain waited the whole grace period for the payload, then cancelled.
        assert trio.current_time() == 2.5
    assert client.eof_at == 2.5
    assert client.acks() == (0, [], None)
    assert "shutdown grace period over" in caplog.text
    assert walk_file(config.cxl.path) == []


# -- timeouts ------------------------------------------------------------------------------------


async def test_handshake_timeout(make_config: MakeConfig, autojump_clock: MockClock) -> None:
    config = quiet_config(make_config, **{"network.handshake_timeout_s": 3.0})
    async with one_client(config) as (broker, client):
        await trio.sleep(1.0)
        await client.send(rawclient.handshake("t")[:10])  # then nothing
        await settle()
        assert client.chunks == []
        await trio.sleep(2.5)
        # Error 7 at exactly 3 s after the connection began, as its first bytes.
        assert client.acks(with_broker_id=False) == (
            None,
            [],
            (7, "no handshake within 3.0 s"),
        )
        assert client.arrival_of(0) == 3.0
        assert client.eof_at == 3.0
        stats = broker.statistics()
        assert stats.errors == {"timeout": 1}
        assert sum(stats.connections.values()) == 0


async def test_slow_but_complete_handshake_is_accepted(
    make_config: MakeConfig, autojump_clock: MockClock
) -> None:
    config = quiet_config(make_config, **{"network.handshake_timeout_s": 3.0})
    async with one_client(config) as (broker, client):
        hs = rawclient.handshake("t")
        await client.send(hs[:63])
        await trio.sleep(3.0 - EPS)
        await client.send(hs[63:])
        await settle()
        assert broker.statistics().connections["wait_header"] == 1
        assert client.acks() == (0, [], None)
        await client.close()


IDLE_CONFIG = {"network.idle_timeout_s": 2.0}


async def idle_connection(make_config: MakeConfig) -> MemoryClient:
    """Handshake at 0.5 s, a batch at 1 s, then silence: idle from 1 s on."""
    async with one_client(quiet_config(make_config, **IDLE_CONFIG)) as (broker, client):
        await trio.sleep(0.5)
        await client.send(rawclient.handshake("t", client_id=6, ack=1))
        await trio.sleep(0.5)
        await client.send(rawclient.batch(0, 6, 0, 10, 100)[0])
        await settle()
        assert client.acks() == (0, [10], None)
        await trio.sleep(2.0 - EPS)  # 2.99999 s: not yet
        await settle()
        assert client.eof_at is None
        assert broker.statistics().connections["wait_header"] == 1
        await trio.sleep(2 * EPS)
        assert client.eof_at == 3.0
        assert broker.statistics().batches_committed == 1
    return client


async def test_idle_timeout_counts_from_the_last_batch(
    make_config: MakeConfig, autojump_clock: MockClock
) -> None:
    client = await idle_connection(make_config)
    assert client.acks() == (0, [10], (7, "idle for 2.0 s between batches"))
    assert client.arrival_of(12) == 3.0


async def test_no_idle_timeout_by_default(
    make_config: MakeConfig, autojump_clock: MockClock
) -> None:
    async with one_client(quiet_config(make_config)) as (broker, client):
        await client.send(rawclient.handshake("t", client_id=6, ack=1))
        await trio.sleep(500.0)
        assert client.eof_at is None
        assert broker.statistics().connections["wait_header"] == 1
        await client.close()


BATCH_CONFIG = {"network.batch_timeout_s": 1.0}


async def stalled_header(make_config: MakeConfig) -> MemoryClient:
    """One byte of a batch header at 0.25 s, then nothing."""
    async with one_client(quiet_config(make_config, **BATCH_CONFIG)) as (broker, client):
        await client.send(rawclient.handshake("t", client_id=7, ack=1))
        await trio.sleep(0.25)
        await client.send(rawclient.batch(0, 7, 0, 10, 100)[0][:1])
        await trio.sleep(1.0 - EPS)
        await settle()
        assert client.eof_at is None
        await trio.sleep(2 * EPS)
        assert client.eof_at == 1.25
        assert broker.statistics().batches_received == 0
    return client


async def test_batch_timeout_counts_from_the_first_header_byte(
    make_config: MakeConfig, autojump_clock: MockClock
) -> None:
    client = await stalled_header(make_config)
    assert client.acks() == (0, [], (7, "batch not received within 1.0 s"))
    assert client.arrival_of(4) == 1.25


async def test_batch_timeout_covers_header_and_payload_together(
    make_config: MakeConfig, autojump_clock: MockClock
) -> None:
    data, _ = rawclient.batch(0, 7, 0, 10, 100)
    async with one_client(quiet_config(make_config, **BATCH_CONFIG)) as (broker, client):
        await client.send(rawclient.handshake("t", client_id=7, ack=1))
        await trio.sleep(0.25)
        await client.send(data[:1])
        await trio.sleep(0.9)
        await client.send(data[1:200])  # header whole at 1.15 s, payload started
        await trio.sleep(0.1 - EPS)
        await settle()
        assert client.eof_at is None
        await trio.sleep(2 * EPS)
        # 1 s after the first header byte, not 1 s after the header was whole.
        assert client.eof_at == 1.25
        assert client.acks() == (0, [], (7, "batch not received within 1.0 s"))
        assert broker.statistics().batches_received == 0


async def test_a_slow_batch_within_the_limit_is_accepted(
    make_config: MakeConfig, autojump_clock: MockClock
) -> None:
    data, _ = rawclient.batch(0, 7, 0, 10, 100)
    async with one_client(quiet_config(make_config, **BATCH_CONFIG)) as (broker, client):
        await client.send(rawclient.handshake("t", client_id=7, ack=1))
        await client.send(data[:100])
        await trio.sleep(0.5)
        await client.send(data[100:1000])
        await trio.sleep(0.5 - EPS)
        await client.send(data[1000:])
        await settle()
        assert client.acks() == (0, [10], None)
        assert client.arrival_of(4) == pytest.approx(1.0 - EPS)
        assert broker.statistics().batches_committed == 1
        await client.close()
