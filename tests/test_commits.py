"""The commit feed: committed batches reach every consumer, in log order, and a
consumer that fails costs nobody else anything."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import rawclient
import trio
import trio.testing
from memory import close_log, header, open_small_log

from trio_embarcadero.broker.commits import CommitFeed
from trio_embarcadero.log import CxlLog, Reservation
from trio_embarcadero.wire import scan_records


@pytest.fixture
def log(cxl_path: str) -> Iterator[CxlLog]:
    log = open_small_log(cxl_path)
    yield log
    close_log(log)


class Owner:
    def __init__(self, name: str, events: list[str], fail: bool = False) -> None:
        self.name = name
        self.events = events
        self.fail = fail

    def batch_committed(self, reservation: Reservation) -> None:
        self.events.append(f"{self.name}:{reservation.header.batch_seq}")
        if self.fail:
            raise RuntimeError(f"{self.name} is broken")


def reserve(log: CxlLog, topic: str, seq: int, owner: object) -> Reservation:
    data = rawclient.record(b"x" * 10, seq, 1)
    r = log.get_cxl_buffer(topic, header(len(data), 1, batch_seq=seq), owner)
    r.payload[:] = np.frombuffer(data, dtype=np.uint8)
    return r


def starts(r: Reservation) -> np.ndarray:  # type: ignore[type-arg]
    return scan_records(r.payload, r.header.num_msg)


def test_a_failing_consumer_does_not_stop_the_others(
    log: CxlLog, caplog: pytest.LogCaptureFixture
) -> None:
    events: list[str] = []
    feed = CommitFeed(log, on_disk=lambda r: events.append(f"disk:{r.header.batch_seq}"))
    broken = Owner("broken", events, fail=True)
    healthy = Owner("healthy", events)
    r1 = reserve(log, "t", 1, broken)
    r2 = reserve(log, "t", 2, healthy)
    r3 = reserve(log, "t", 3, None)  # no owner: only the disk hears of it
    feed.complete(r2, starts(r2))
    feed.complete(r3, starts(r3))
    assert events == []  # held back by r1
    feed.complete(r1, starts(r1))
    # Log order, disk first; the broken owner's exception did not stop r2 or r3.
    assert events == ["disk:1", "broken:1", "disk:2", "healthy:2", "disk:3"]
    assert feed.internal_errors == 1
    assert "broken is broken" in caplog.text
    assert log.stream("t").batches == 3
    caplog.clear()  # the logged traceback holds views of the region


def test_a_failing_disk_consumer_is_contained(
    log: CxlLog, caplog: pytest.LogCaptureFixture
) -> None:
    events: list[str] = []

    def broken_disk(r: Reservation) -> None:
        raise OSError("disk bookkeeping bug")

    feed = CommitFeed(log, on_disk=broken_disk)
    r = reserve(log, "t", 1, Owner("owner", events))
    feed.complete(r, starts(r))
    assert events == ["owner:1"]
    assert feed.internal_errors == 1
    assert "disk bookkeeping bug" in caplog.text
    caplog.clear()


def test_abandon_hands_out_the_batches_it_unblocked(log: CxlLog) -> None:
    events: list[str] = []
    feed = CommitFeed(log)
    r1 = reserve(log, "t", 1, Owner("a", events))
    r2 = reserve(log, "t", 2, Owner("b", events))
    feed.complete(r2, starts(r2))
    assert events == []
    feed.abandon(r1)
    assert events == ["b:2"]
    assert log.stream("t").next_offset == 1


async def test_wait_commit_wakes_only_that_topics_waiters(log: CxlLog) -> None:
    feed = CommitFeed(log)
    woken: list[str] = []

    async def wait(topic: str) -> None:
        await feed.wait_commit(topic)
        woken.append(topic)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait, "a")
        nursery.start_soon(wait, "b")
        await trio.testing.wait_all_tasks_blocked()
        r = reserve(log, "a", 1, None)
        feed.complete(r, starts(r))
        await trio.testing.wait_all_tasks_blocked()
        assert woken == ["a"]
        nursery.cancel_scope.cancel()
    # Parking lots exist only while someone waits.
    assert feed._waiters == {}
