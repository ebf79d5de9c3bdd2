"""With ``storage.dir`` the region is a cache of the disk log.

A region of four 1 MiB segments takes three times its size with no
retention key set: a full region drops its oldest segments once they are
durable on disk (a batch waits for the disk writer rather than failing), and
a subscriber from offset 0 gets every message once, in order, the old part
read from the disk log and the rest from the region. Real TCP.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from conftest import MakeConfig
from rawclient import payload_for

from trio_embarcadero import Message, open_broker, open_publisher, open_subscriber
from trio_embarcadero.config import Config

COUNT = 12_000  # 1000-byte messages: about three times the region


def tiered_config(make_config: MakeConfig, tmp_path: Path) -> Config:
    return make_config(
        **{
            "cxl.size_mb": 4,
            "cxl.segment_mb": 1,
            "network.staging_pool_buffer_size_mb": 1,
            "network.max_batch_bytes": 256 * 1024,
            "storage.dir": str(tmp_path / "disk"),
            "storage.sync_interval_ms": 5.0,
        }
    )


async def receive(sub: object, count: int) -> list[Message]:
    got: list[Message] = []
    while len(got) < count:
        got.extend(await sub.receive_messages())  # type: ignore[attr-defined]
    return got


@pytest.mark.parametrize("ack", [1, 2])
async def test_a_region_with_a_disk_tier_takes_three_times_its_size_and_serves_it_all(
    make_config: MakeConfig, tmp_path: Path, ack: int
) -> None:
    payloads = [payload_for(5, i, 1000) for i in range(COUNT)]
    with trio.fail_after(60):
        async with open_broker(tiered_config(make_config, tmp_path)) as broker:
            async with open_publisher(
                "127.0.0.1", broker.port, "tier", client_id=5, ack=ack, batch_bytes=256 * 1024
            ) as pub:
                await pub.publish_many(payloads)  # every one acked, no error 4
            stats = broker.statistics()
            assert stats.errors == {}
            stream = broker.log.stream("tier")
            assert stream.next_offset == COUNT
            # The region dropped what the disk holds: the old part is disk-only.
            assert stream.start_offset > COUNT // 2
            assert stream.retained_bytes <= 4 << 20
            async with open_subscriber("127.0.0.1", broker.port, "tier", start=0) as sub:
                got = await receive(sub, COUNT)
                assert sub.skipped == 0
    assert [m.offset for m in got] == list(range(COUNT))
    assert [m.payload for m in got] == payloads


async def test_a_subscriber_from_the_disk_only_range_follows_into_new_commits(
    make_config: MakeConfig, tmp_path: Path
) -> None:
    payloads = [payload_for(6, i, 1000) for i in range(COUNT + 2000)]
    with trio.fail_after(60):
        async with open_broker(tiered_config(make_config, tmp_path)) as broker:
            async with open_publisher(
                "127.0.0.1", broker.port, "tier", client_id=6, batch_bytes=256 * 1024
            ) as pub:
                await pub.publish_many(payloads[:COUNT])
                stream = broker.log.stream("tier")
                start = stream.start_offset // 2 + 7  # inside a batch the region dropped
                assert start < stream.start_offset
                async with open_subscriber("127.0.0.1", broker.port, "tier", start=start) as sub:
                    got = await receive(sub, COUNT - start)
                    await pub.publish_many(payloads[COUNT:])  # new commits, after the drop
                    got += await receive(sub, len(payloads) - COUNT)
                    assert sub.skipped == 0
    assert [m.offset for m in got] == list(range(start, len(payloads)))
    assert [m.payload for m in got] == payloads[start:]


async def test_after_a_restart_the_disk_tier_is_read_again(
    make_config: MakeConfig, tmp_path: Path
) -> None:
    """The disk log's index is rebuilt from its file at start-up, and a
    region whose oldest batches only the disk holds is accepted."""
    config = tiered_config(make_config, tmp_path)
    payloads = [payload_for(7, i, 1000) for i in range(COUNT)]
    with trio.fail_after(60):
        async with open_broker(config) as broker:
            async with open_publisher(
                "127.0.0.1", broker.port, "tier", client_id=7, batch_bytes=256 * 1024
            ) as pub:
                await pub.publish_many(payloads)
            dropped = broker.log.stream("tier").start_offset
        async with open_broker(config) as broker:
            assert broker.log.stream("tier").start_offset == dropped > 0
            async with open_subscriber("127.0.0.1", broker.port, "tier", start=0) as sub:
                got = await receive(sub, COUNT)
                assert sub.skipped == 0
    assert [m.payload for m in got] == payloads
