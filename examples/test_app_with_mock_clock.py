"""How to test an application that uses the broker: no sockets, virtual time.

The application below sends heartbeats, and a watchdog raises an alarm when
they stop. Testing that with real time would take seconds per test and be
flaky; here the broker runs on in-memory streams (``open_broker(config,
listeners=[...])``) and Trio's ``autojump_clock`` skips ahead whenever every
task is waiting, so the test takes milliseconds and its timings are exact.

Run it with pytest and ``pytest-trio``, which runs the tests marked
``trio`` and provides the ``autojump_clock`` fixture. The file marks its own
tests (``pytestmark`` below), so it needs no ``trio_mode`` setting and runs
the same when copied into another project::

    pytest examples/test_app_with_mock_clock.py

Don't use the mock clock with real sockets: a loopback round trip looks idle
to Trio, so the clock can jump in the middle of I/O. Keep TCP tests on the
real clock.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing

from trio_embarcadero import (
    Config,
    Message,
    Publisher,
    Subscriber,
    load_config,
    open_broker,
    open_publisher_on_stream,
    open_subscriber_on_stream,
)

# Every test here runs under Trio (pytest-trio), whatever the project's pytest settings.
pytestmark = pytest.mark.trio

# -- the application under test -------------------------------------------------------


async def heartbeat(publisher: Publisher, *, interval: float, beats: int) -> None:
    """Publish ``beats`` heartbeats, one every ``interval`` seconds."""
    for n in range(beats):
        await publisher.publish(f"beat {n} at {trio.current_time():.3f}".encode())
        await trio.sleep(interval)


async def watchdog(subscriber: Subscriber, *, silence: float) -> list[str]:
    """Return the heartbeats seen once none has arrived for ``silence`` seconds."""
    seen: list[str] = []
    while True:
        message: Message | None = None
        with trio.move_on_after(silence):
            message = await anext(subscriber)
        if message is None:
            return seen  # the alarm
        seen.append(message.payload.decode())


# -- the test harness ----------------------------------------------------------------


class MemoryListener(trio.abc.Listener[trio.abc.Stream]):
    """A listener for the broker whose connections are in-memory stream pairs."""

    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[trio.abc.Stream](0)

    async def connect(self) -> trio.abc.Stream:
        """Open a connection to the broker; returns the client's end."""
        client, server = trio.testing.memory_stream_pair()
        await self._send.send(server)
        return client

    async def accept(self) -> trio.abc.Stream:
        return await self._receive.receive()

    async def aclose(self) -> None:
        await self._receive.aclose()


def broker_config(tmp_path: Path) -> Config:
    return load_config(
        None,
        env={},
        overrides={
            "broker.port": 0,
            "cxl.path": str(tmp_path / "cxl"),
            "cxl.size_mb": 16,
            "cxl.segment_mb": 4,
            "cxl.prefault": False,  # prefaulting runs in a thread: keep it off
            "network.staging_pool_buffer_size_mb": 1,
        },
    )


async def test_the_watchdog_fires_three_seconds_after_the_last_beat(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    listener = MemoryListener()
    config = broker_config(tmp_path)
    async with open_broker(config, listeners=[listener]) as broker:
        async with (
            open_subscriber_on_stream(await listener.connect(), "health") as subscriber,
            # linger=0: each heartbeat is sent at once, not 5 ms later.
            open_publisher_on_stream(await listener.connect(), "health", linger=0) as publisher,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(partial(heartbeat, publisher, interval=1.0, beats=10))
            seen = await watchdog(subscriber, silence=3.0)
        assert broker.statistics().messages_committed == 10
    # Ten beats at t = 0..9, the alarm exactly 3 s after the last one.
    assert seen == [f"beat {n} at {float(n):.3f}" for n in range(10)]
    assert trio.current_time() == pytest.approx(12.0)


async def test_a_late_subscriber_still_sees_every_beat(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    listener = MemoryListener()
    async with open_broker(broker_config(tmp_path), listeners=[listener]):
        async with open_publisher_on_stream(await listener.connect(), "health") as publisher:
            await heartbeat(publisher, interval=60.0, beats=5)  # five virtual minutes
        async with open_subscriber_on_stream(
            await listener.connect(), "health", start=2
        ) as subscriber:
            seen = await watchdog(subscriber, silence=1.0)
    assert [beat.split(" at ")[0] for beat in seen] == ["beat 2", "beat 3", "beat 4"]
