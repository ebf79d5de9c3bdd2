"""The broker's statistics as an operator reads them: the statistics line,
with rates over each interval and the free log space in words, and the
fixed-bucket histograms behind the metrics."""

from __future__ import annotations

import logging

import pytest
import rawclient
import trio
from conftest import MakeConfig
from memory import memory_broker, open_client, settle
from trio.testing import MockClock

from trio_embarcadero.broker.statistics import Histogram

# -- the statistics line ---------------------------------------------------------------


async def test_the_stats_line_says_rates_over_the_interval_and_free_space(
    make_config: MakeConfig, autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trio_embarcadero")
    config = make_config(**{"network.stats_interval_s": 2.0})
    async with trio.open_nursery() as nursery, memory_broker(config) as (broker, listener):
        client = await open_client(listener, nursery)
        await client.send(rawclient.handshake("t", client_id=5, ack=1))
        data, _ = rawclient.batch(0, 5, 0, 1000, 100)
        await client.send(data)
        await settle()
        await trio.sleep(2.5)  # one report: everything arrived in its 2 s
        await client.send(rawclient.batch(1, 5, 1000, 500, 100)[0])
        await settle()
        await trio.sleep(2.0)  # the next: half as much
        unit = broker.log.geometry.unit_size
    lines = [r for r in caplog.records if r.getMessage().startswith("stats: last ")]
    first, second = (r.__dict__["stats"] for r in lines[:2])
    assert first["interval_s"] == pytest.approx(2.0)
    assert first["received_messages_per_s"] == pytest.approx(500.0)
    assert first["committed_bytes_per_s"] == pytest.approx((len(data) - 128) / 2)
    assert second["received_messages_per_s"] == pytest.approx(250.0)
    assert first["log_free_bytes"] % unit == 0
    text = lines[0].getMessage()
    assert "last 2.0 s: received 96.0 kB/s (500 msg/s), committed 96.0 kB/s (500 msg/s)" in text
    assert "since start 1,000 messages" in text
    assert "1 connection (1 between batches)" in text
    assert " free of " in text
    assert "0 pauses, 0 allocation retries, 0 errors" in text
    # The last line, at the shutdown, has the totals (no interval).
    final = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stats: ")][-1]
    assert final.startswith("stats: since start 1,500 messages")


# -- histograms ----------------------------------------------------------------------------


def test_a_histogram_counts_each_value_in_the_first_bucket_that_holds_it() -> None:
    histogram = Histogram([1.0, 2.0, 4.0])
    for value in (0.5, 1.0, 1.5, 4.0, 9.0, 9.0):
        histogram.observe(value)
    snapshot = histogram.snapshot()
    assert snapshot.counts == (2, 1, 1, 2)  # le 1, le 2, le 4, above
    assert snapshot.count == 6
    assert snapshot.sum == 25.0
    assert snapshot.cumulative() == [(1.0, 2), (2.0, 3), (4.0, 4), (float("inf"), 6)]
    with pytest.raises(ValueError, match="ascending"):
        Histogram([2.0, 1.0])
