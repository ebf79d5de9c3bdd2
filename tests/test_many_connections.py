"""1,000 concurrent publisher connections on loopback: all served, memory bounded.

The broker runs as its own process (``python -m trio_embarcadero serve``), so
its peak RSS (``VmHWM``) is its own and not the test runner's; the load runs
here. All 1,000 connections are opened and handshaken first (each has its
ack stream's broker id, so the broker holds 1,000 live connection tasks at
once), then every one publishes three batches and half-closes. Each must
end with a final cumulative count of exactly its 30 messages and no error
frame, and the log must hold every message once, byte for byte.

The peak RSS is printed and recorded as the junit properties
``broker_peak_rss_kib`` and ``broker_rss_per_connection_kib``.
"""

from __future__ import annotations

import resource
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from tcpclient import connect, recv_exactly

from trio_embarcadero.log import open_log
from trio_embarcadero.tools.noloss import (
    TOPIC,
    BrokerProcess,
    encode_batch,
    payload,
    write_broker_config,
)
from trio_embarcadero.wire import AckCount, AckDecoder, ClientRequest, ErrorFrame, Handshake

CONNECTIONS = 1000
BATCHES = 3
PER_BATCH = 10
MAX_SIZE = 100
#: Loose bounds, well above what this broker needs (about 75 MiB peak, some
#: 16 KiB per idle connection): they catch a per-connection buffer, not noise.
PEAK_RSS_LIMIT_KIB = 400 << 10
PER_CONNECTION_LIMIT_KIB = 200


def raise_open_file_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        # Not a skip: a machine that cannot hold 1,000 connections fails the requirement.
        pytest.fail(f"RLIMIT_NOFILE hard limit {hard} < {needed} needed for this test")
    if soft != resource.RLIM_INFINITY and soft < needed:
        # The broker subprocess inherits the raised limit.
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def test_1000_concurrent_publishers(
    tmp_path: Path, cxl_path: str, record_property: Callable[[str, object], None]
) -> None:
    raise_open_file_limit(CONNECTIONS + 200)
    config = tmp_path / "broker.toml"
    write_broker_config(
        config,
        cxl_path=cxl_path,
        cxl_mb=64,
        segment_mb=8,
        # Every connection comes from this one host.
        extra=f"max_connections = {CONNECTIONS + 100}\n"
        f"max_connections_per_host = {CONNECTIONS + 100}\n",
    )
    finals: dict[int, tuple[list[int], list[tuple[int, str]]]] = {}
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            broker = BrokerProcess(config)
            port = await broker.start(nursery)
            rss_start = broker.memory_kib("VmRSS")
            connected = 0
            everyone_in = trio.Event()
            opening = trio.CapacityLimiter(100)  # don't overrun the listen backlog

            async def publisher(client_id: int) -> None:
                nonlocal connected
                async with opening:
                    stream = await connect(port)
                    handshake = Handshake(
                        client_id=client_id,
                        ack=1,
                        num_msg=0,
                        last_addr=0,
                        port=0,
                        request=ClientRequest.PUBLISH,
                        topic=TOPIC,
                    )
                    await stream.send_all(handshake.encode())
                    # The broker id: the broker's connection task is publishing.
                    assert struct.unpack("<i", await recv_exactly(stream, 4)) == (0,)
                async with stream:
                    connected += 1
                    if connected == CONNECTIONS:
                        everyone_in.set()
                    await everyone_in.wait()
                    for seq in range(BATCHES):
                        await stream.send_all(
                            encode_batch(client_id, seq, seq * PER_BATCH, PER_BATCH, MAX_SIZE)
                        )
                    await stream.send_eof()
                    decoder = AckDecoder(expect_broker_id=False)
                    counts: list[int] = []
                    errors: list[tuple[int, str]] = []
                    async for chunk in stream:
                        for event in decoder.feed(chunk):
                            if isinstance(event, AckCount):
                                counts.append(event.count)
                            elif isinstance(event, ErrorFrame):
                                errors.append((event.code, event.text))
                    finals[client_id] = (counts, errors)

            async with trio.open_nursery() as load:
                for client_id in range(1, CONNECTIONS + 1):
                    load.start_soon(publisher, client_id)
                await everyone_in.wait()
                rss_connected = broker.memory_kib("VmRSS")
            peak = broker.memory_kib("VmHWM")
            assert await broker.stop() == 0

    per_connection = (rss_connected - rss_start) / CONNECTIONS
    print(
        f"\nbroker RSS: {rss_start} KiB at start, {rss_connected} KiB with {CONNECTIONS} "
        f"connections ({per_connection:.1f} KiB each), peak {peak} KiB"
    )
    record_property("broker_peak_rss_kib", peak)
    record_property("broker_rss_per_connection_kib", round(per_connection, 1))

    assert len(finals) == CONNECTIONS
    total = BATCHES * PER_BATCH
    for client_id, (counts, errors) in finals.items():
        assert errors == [], f"client {client_id}: {errors}"
        assert counts[-1:] == [total], f"client {client_id}: counts {counts}"
        assert counts == sorted(set(counts))
    assert "connection limit" not in broker.stderr
    assert broker.internal_errors == 0
    with open_log(cxl_path) as log:
        seen: dict[int, list[int]] = {}
        for m in log.messages(TOPIC):
            assert bytes(m.payload) == payload(m.client_id, m.client_order, MAX_SIZE)
            seen.setdefault(m.client_id, []).append(m.client_order)
    assert seen == {c: list(range(total)) for c in range(1, CONNECTIONS + 1)}
    assert peak < PEAK_RSS_LIMIT_KIB
    assert per_connection < PER_CONNECTION_LIMIT_KIB
