"""A full region is backpressure, not failure, while retention can free room.

A region of three fixed 2 MiB segments holds six 900-message batches. The
seventh finds no free segment: with a retention limit it waits (its
publisher is not read meanwhile) until retention frees a segment, then
commits and is acked; past ``network.log_full_timeout_s``, or at once when
no topic has any retention, the publisher gets error 4 after the acks of
what was stored. All on Trio's mock clock.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
import rawclient
import trio
import trio.testing
from conftest import MakeConfig
from memory import MemoryClient, MemoryListener, memory_broker, open_client, settle

from trio_embarcadero.broker import Broker
from trio_embarcadero.config import Config
from trio_embarcadero.errors import ErrorCode

PER_BATCH = 900  # 1000-byte messages: 979,200 payload bytes, two batches per segment
FIT = 6  # batches the region holds


def full_region_config(make_config: MakeConfig, **overrides: object) -> Config:
    return make_config(
        **{
            "cxl.size_mb": 8,
            "cxl.segment_mb": 2,
            "cxl.segment_unit_kb": 2048,  # fixed 2 MiB segments: a known capacity
            "cxl.reclaim_interval_ms": 100.0,
            "network.staging_pool_buffer_size_mb": 1,
            "network.max_buffers_per_connection": 2,
            "network.idle_timeout_s": 0.0,
            **overrides,
        }
    )


def batches(count: int, client_id: int = 7) -> list[bytes]:
    return [
        rawclient.batch(seq, client_id, seq * PER_BATCH, PER_BATCH, 1000)[0] for seq in range(count)
    ]


async def publish(
    listener: MemoryListener, nursery: trio.Nursery, frames: list[bytes], topic: str = "full"
) -> MemoryClient:
    client = await open_client(listener, nursery)
    await client.send(rawclient.handshake(topic, client_id=7, ack=1))
    for frame in frames:
        await client.send(frame)
    return client


def mock_wall_clock() -> Callable[[], int]:
    """Commit stamps on the mock clock, so retention_ms runs on it too."""
    return lambda: int(trio.current_time() * 1e9)


@asynccontextmanager
async def publishing(
    make_config: MakeConfig, count: int, **overrides: object
) -> AsyncIterator[tuple[Broker, MemoryClient]]:
    """A broker on the full-region config whose log runs on the mock clock,
    and a publisher that has sent ``count`` batches."""
    config = full_region_config(make_config, **overrides)
    async with trio.open_nursery() as nursery, memory_broker(config) as (broker, listener):
        broker.log.clock = mock_wall_clock()
        yield broker, await publish(listener, nursery, batches(count))


@pytest.mark.parametrize("use_nonblocking", [True, False], ids=["staged", "direct"])
async def test_a_full_region_holds_the_publisher_until_retention_frees_room(
    make_config: MakeConfig, autojump_clock: trio.testing.MockClock, use_nonblocking: bool
) -> None:
    config = full_region_config(
        make_config,
        **{"topics.retention_ms": 5000, "network.use_nonblocking": use_nonblocking},
    )
    frames = batches(10)
    async with trio.open_nursery() as nursery, memory_broker(config) as (broker, listener):
        broker.log.clock = mock_wall_clock()
        assert broker.log.geometry.num_units == 3
        client = await publish(listener, nursery, frames)
        await trio.sleep(0.1)  # past the backoff (11.1 ms)
        # Six batches fit and are acked; the seventh waits for room: no error.
        stats = broker.statistics()
        assert stats.batches_committed == FIT
        assert stats.errors == {}
        assert stats.log_full_held >= 1
        assert stats.log_full_waits >= 1
        assert (stats.log.segments_free, stats.log.segments_used) == (0, 3)
        assert stats.segments_reclaimable == 0  # nothing is 5 s old yet
        assert "HELD" in stats.summary()
        assert client.acks()[1] == [PER_BATCH * (k + 1) for k in range(FIT)]
        # The publisher is not read meanwhile: its in-flight window (two
        # batches) is held, the rest stays in its socket.
        read = client.server.bytes_received
        sent = 64 + sum(len(f) for f in frames)
        assert read < sent
        await trio.sleep(4.5)
        assert client.server.bytes_received == read
        assert broker.statistics().batches_committed == FIT
        # At 5 s the two full segments are older than retention_ms: the
        # retention task frees them, which wakes the held batches at once.
        await trio.sleep(0.7)
        stats = broker.statistics()
        assert stats.batches_committed == 10
        assert stats.log_full_held == 0
        assert 5.0 <= stats.log_full_wait_seconds
        await client.close()
        await settle()
        _, counts, error = client.acks()
        assert error is None
        assert counts[-1] == 10 * PER_BATCH
        assert broker.statistics().errors == {}
        assert broker.statistics().allocation_failures == 0


async def test_past_log_full_timeout_the_publisher_gets_error_4(
    make_config: MakeConfig, autojump_clock: trio.testing.MockClock
) -> None:
    overrides = {"topics.retention_ms": 600_000, "network.log_full_timeout_s": 2.0}
    async with publishing(make_config, 8, **overrides) as (broker, client):
        await trio.sleep(1.9)
        assert client.eof_at is None  # held, not refused
        await trio.sleep(0.2)
        _, counts, error = client.acks()
        assert counts == [PER_BATCH * (k + 1) for k in range(FIT)]  # the acks first
        assert error is not None
        assert error[0] == ErrorCode.LOG_FULL
        assert error[1].startswith("no log space after retries: ")
        assert "retention freed none within 2.0 s" in error[1]
        assert client.eof_at is not None
        assert 2.0 <= client.eof_at < 2.1
        stats = broker.statistics()
        assert stats.log_full_timeouts == 1
        assert stats.errors == {"log_full": 1}
        assert stats.log_full_held == 0


async def test_without_any_retention_error_4_comes_right_after_the_backoff(
    make_config: MakeConfig, autojump_clock: trio.testing.MockClock
) -> None:
    config = full_region_config(make_config)
    async with trio.open_nursery() as nursery, memory_broker(config) as (broker, listener):
        client = await publish(listener, nursery, batches(8))
        await trio.sleep(0.1)
        _, counts, error = client.acks()
        assert counts == [PER_BATCH * (k + 1) for k in range(FIT)]
        assert error is not None
        assert error[0] == ErrorCode.LOG_FULL
        assert client.eof_at is not None
        assert client.eof_at < 0.05
        stats = broker.statistics()
        assert (stats.log_full_waits, stats.log_full_timeouts) == (0, 0)


async def test_a_shutdown_does_not_wait_for_held_batches(
    make_config: MakeConfig, autojump_clock: trio.testing.MockClock
) -> None:
    config = full_region_config(make_config, **{"topics.retention_ms": 600_000})
    async with trio.open_nursery() as nursery:
        async with memory_broker(config) as (broker, listener):
            client = await publish(listener, nursery, batches(8))
            await trio.sleep(0.1)
            assert broker.statistics().log_full_held >= 1
            start = trio.current_time()
        # The drain gave the held batch up (error 4) instead of letting the
        # grace period run out on it.
        assert trio.current_time() - start < 0.1
        assert not broker.space.held
        _, counts, error = client.acks()
        assert counts[-1] == FIT * PER_BATCH
        assert error is not None
        assert error[0] == ErrorCode.LOG_FULL


async def test_statistics_show_what_retention_would_free(
    make_config: MakeConfig, autojump_clock: trio.testing.MockClock
) -> None:
    # Retention checks rarely here, so what it would free stays to be seen.
    overrides = {"topics.retention_ms": 5000, "cxl.reclaim_interval_ms": 1e7}
    async with publishing(make_config, 5, **overrides) as (broker, client):
        await settle()
        stats = broker.statistics()
        assert (stats.log.segments_free, stats.log.segments_used) == (0, 3)
        assert stats.segments_reclaimable == 0
        await trio.sleep(6)
        # The two whole segments are past retention_ms; the one being written stays.
        assert broker.statistics().segments_reclaimable == 2
        await client.close()
