"""Several brokers on one region, in one process: the broker table and its heartbeats,
who is alive (entry and lock together), layouts 2 and 3, a topic's order level, and a restarted
broker that recovers its own streams only.

Two broker processes on one region: test_process_safety.py; a cluster of them (``cluster``,
``open_cluster``, ``kill -9``): test_cluster.py.
"""

from __future__ import annotations

import logging
import os
import struct

import attrs
import pytest
import trio
from conftest import MakeConfig
from memory import close_log, lose_lock, memory_broker, open_small_log, walk_file
from test_cxl import commit, complete, reserve

from trio_embarcadero.config import TopicOverride, TopicsConfig
from trio_embarcadero.errors import LayoutError
from trio_embarcadero.log import open_log
from trio_embarcadero.log.layout import (
    BATCH_ABANDONED,
    BATCH_COMMITTED,
    BATCH_RESERVED,
    MEMBER_ENTRY,
    SESSION_TABLE_OFFSET,
    SUPERBLOCK,
    U32,
    member_offset,
)
from trio_embarcadero.log.members import (
    ABSENT,
    DRAINING,
    LIVE,
    MemberEntry,
    MemberRecord,
    MemberStatus,
    member_status,
    read_members,
    read_record,
)

SECOND = 1_000_000_000


class Clock:
    """A heartbeat clock the test moves by hand (ns)."""

    def __init__(self) -> None:
        self.now = 50 * SECOND

    def __call__(self) -> int:
        return self.now


def joined(buf: bytearray, broker_id: int = 0, **changes: object) -> MemberEntry:
    entry = MemberEntry(buf, broker_id, clock=Clock())
    params: dict[str, object] = {"interval_s": 0.2, "timeout_s": 2.0, "pid": 4711}
    params.update(changes)
    entry.join("127.0.0.1", 1214 + broker_id, **params)  # type: ignore[arg-type]
    return entry


# -- the entry: written whole, read whole ---------------------------------------------------


def test_an_entry_goes_live_beats_drains_and_leaves() -> None:
    buf = bytearray(4096)
    entry = joined(buf, 3, started_ns=123)
    clock = entry.clock
    assert isinstance(clock, Clock)
    assert read_record(buf, 3) == MemberRecord(
        LIVE, 4711, 1217, 123, 50 * SECOND, 0, 2000, 200, "127.0.0.1"
    )
    clock.now += SECOND
    entry.beat()
    entry.beat()
    record = read_record(buf, 3)
    assert (record.state, record.heartbeat_ns, record.beats) == (LIVE, 51 * SECOND, 2)
    entry.drain()
    assert read_record(buf, 3).state == DRAINING
    entry.leave()
    assert read_record(buf, 3) == MemberRecord(ABSENT, 0, 0, 0, 0, 0, 0, 0, "")
    entry.beat()  # after leaving: nothing written, nor by a second leave
    entry.leave()
    assert read_record(buf, 3) == MemberRecord(ABSENT, 0, 0, 0, 0, 0, 0, 0, "")
    with pytest.raises(ValueError, match="has left the table"):
        entry.join("127.0.0.1", 1217, interval_s=0.2, timeout_s=2.0)
    # Other brokers' entries were never touched.
    assert not any(buf[member_offset(2) : member_offset(3)])
    assert not any(buf[member_offset(4) : member_offset(5)])


def test_every_write_is_bracketed_by_the_sequence_word() -> None:
    buf = bytearray(4096)
    entry = joined(buf)
    sequences = [U32.unpack_from(buf, member_offset(0))[0]]
    for write in (entry.beat, entry.drain, entry.leave):
        write()
        sequences.append(U32.unpack_from(buf, member_offset(0))[0])
    # Even after each write (a reader retries on odd), moved on by each.
    assert sequences == [2, 4, 6, 8]
    # A writer killed half-way leaves the word odd: a reader still gets the
    # entry (its heartbeat goes stale), and the next owner's write ends even.
    U32.pack_into(buf, member_offset(0), 9)
    assert read_record(buf, 0).state == ABSENT
    joined(buf)
    assert U32.unpack_from(buf, member_offset(0))[0] == 10


def test_a_host_too_long_for_the_table_is_refused() -> None:
    entry = MemberEntry(bytearray(4096), 0)
    with pytest.raises(ValueError, match="longer than 47 bytes"):
        entry.join("h" * 48, 1214, interval_s=0.2, timeout_s=2.0)
    entry.join("h" * 47, 1214, interval_s=0.2, timeout_s=2.0)
    assert entry.record is not None
    assert entry.record.host == "h" * 47
    with pytest.raises(ValueError, match=r"not in 0\.\.31"):
        MemberEntry(bytearray(4096), 32)


# -- who is alive: the entry and the lock together ------------------------------------------


def record(state: int = LIVE, pid: int = 10, age_s: float = 0.1) -> MemberRecord:
    return MemberRecord(state, pid, 1214, 1, int(100 * SECOND - age_s * SECOND), 7, 2000, 200, "h")


NOW = 100 * SECOND


@pytest.mark.parametrize(
    ("entry", "holder", "held", "status"),
    [
        # The lock can be read: it decides who is there.
        (record(), 10, True, MemberStatus.LIVE),
        (record(DRAINING), 10, True, MemberStatus.DRAINING),
        (record(age_s=3.0), 10, True, MemberStatus.UNRESPONSIVE),  # stopped, or blocked
        (record(), 11, True, MemberStatus.ATTACHED),  # a predecessor's entry: starting
        (record(ABSENT), 11, True, MemberStatus.ATTACHED),
        (record(), None, False, MemberStatus.DEAD),  # fresh heartbeat, but the lock is free
        (record(DRAINING), None, False, MemberStatus.DEAD),
        (record(ABSENT), None, False, None),
        # No lock to ask: the heartbeat decides.
        (record(), None, None, MemberStatus.LIVE),
        (record(DRAINING, age_s=1.9), None, None, MemberStatus.DRAINING),
        (record(age_s=2.1), None, None, MemberStatus.DEAD),
        (record(ABSENT), None, None, None),
    ],
)
def test_member_status(
    entry: MemberRecord, holder: int | None, held: bool | None, status: MemberStatus | None
) -> None:
    assert member_status(entry, holder, held, NOW) is status


def test_read_members_lists_who_serves_or_was_left_listed() -> None:
    buf = bytearray(4096)
    for broker_id in (0, 1, 2):
        joined(buf, broker_id, pid=100 + broker_id)
    clock = Clock()
    members = read_members(buf, 4, {0: 100, 3: 999}, now_ns=clock.now + SECOND // 2)
    assert [(m.broker_id, m.status, m.pid, m.address) for m in members] == [
        (0, MemberStatus.LIVE, 100, "127.0.0.1:1214"),
        (1, MemberStatus.DEAD, 101, "127.0.0.1:1215"),
        (2, MemberStatus.DEAD, 102, "127.0.0.1:1216"),
        (3, MemberStatus.ATTACHED, 999, ":0"),
    ]
    assert [m.alive for m in members] == [True, False, False, False]
    assert members[0].heartbeat_age_s == pytest.approx(0.5)
    assert members[3].heartbeat_age_s is None
    # Without the lock file the heartbeats decide; ids past max_brokers are not read.
    members = read_members(buf, 2, None, now_ns=clock.now + 3 * SECOND)
    assert [(m.broker_id, m.status) for m in members] == [
        (0, MemberStatus.DEAD),
        (1, MemberStatus.DEAD),
    ]


def test_a_reader_in_another_handle_sees_brokers_come_and_go(cxl_path: str) -> None:
    zero = open_small_log(cxl_path)
    one = open_small_log(cxl_path, broker_id=1)
    entries = [MemberEntry(zero.region, 0), MemberEntry(one.region, 1)]
    try:
        entries[0].join("127.0.0.1", 1214, interval_s=0.2, timeout_s=2.0)
        entries[1].join("::1", 1215, interval_s=0.2, timeout_s=2.0)
        with open_log(cxl_path) as log:
            members = log.brokers()
            assert [(m.broker_id, m.status, m.pid, m.address) for m in members] == [
                (0, MemberStatus.LIVE, os.getpid(), "127.0.0.1:1214"),
                (1, MemberStatus.LIVE, os.getpid(), "[::1]:1215"),
            ]
            # Broker 1's process dies (its lock goes with it); its entry stays "live".
            lose_lock(one)
            assert read_record(one.region, 1).state == LIVE
            assert [(m.broker_id, m.status) for m in log.brokers()] == [
                (0, MemberStatus.LIVE),
                (1, MemberStatus.DEAD),
            ]
            # Its successor holds the id but has not joined yet: the entry is not its own.
            entries[1] = MemberEntry(one.region, 1)  # (the dead one's; the pid tells)
            entries[1].join("::1", 1215, interval_s=0.2, timeout_s=2.0, pid=os.getpid() + 1)
            successor = open_small_log(cxl_path, broker_id=1)
            try:
                (_, attached) = log.brokers()
                assert (attached.status, attached.pid, attached.port) == (
                    MemberStatus.ATTACHED,
                    os.getpid(),
                    0,
                )
            finally:
                close_log(successor)
            # A graceful stop clears the entry; the process holds its id until it closes.
            entries[0].leave()
            assert [(m.broker_id, m.status) for m in log.brokers()] == [
                (0, MemberStatus.ATTACHED),
                (1, MemberStatus.DEAD),
            ]
    finally:
        for entry in entries:
            entry.leave()
        close_log(zero)
        close_log(one)


# -- layout 3 -------------------------------------------------------------------------------


def make_layout_2(cxl_path: str) -> None:
    """Turn a closed region into what the previous version wrote: layout 2's
    magic, nothing in the superblock's page past the superblock."""
    with open(cxl_path, "r+b") as f:
        f.write(struct.pack("<8sI", b"TEMBCXL2", 2))
        f.seek(SUPERBLOCK.size)
        f.write(bytes(4096 - SUPERBLOCK.size))


def test_a_region_of_layout_2_is_read_and_upgraded_in_place(
    cxl_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A region the previous version wrote keeps every batch: readers read
    it as it is, and the first broker that attaches makes it layout 4."""
    log = open_small_log(cxl_path)
    for k in range(3):
        commit(log, "kept", [100, 200], seq=k)
    close_log(log)
    make_layout_2(cxl_path)
    with open_log(cxl_path) as reader:
        assert reader.topic("kept").messages == 6
        assert reader.brokers() == []
    with caplog.at_level(logging.INFO, logger="trio_embarcadero.log.region"):
        log = open_small_log(cxl_path)
    assert "upgraded the region from layout 2 to 4 in place" in caplog.text
    try:
        stream = log.stream("kept")
        assert (stream.batches, stream.next_offset) == (3, 6)
        commit(log, "kept", [50], seq=3)
        assert stream.next_offset == 7
    finally:
        close_log(log)
    with open(cxl_path, "rb") as f:
        assert SUPERBLOCK.unpack(f.read(SUPERBLOCK.size))[:2] == (b"TEMBCXL4", 4)
    with open_log(cxl_path) as reader:
        assert [m.offset for m in reader.messages("kept")] == list(range(7))


def test_a_region_of_layout_3_is_read_and_upgraded_in_place(
    cxl_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Layout 4 only adds the session table, where layout 3 left zeros."""
    log = open_small_log(cxl_path)
    commit(log, "kept", [100])
    close_log(log)
    with open(cxl_path, "r+b") as f:
        f.write(struct.pack("<8sI", b"TEMBCXL3", 3))
    with open_log(cxl_path) as reader:
        assert reader.topic("kept").messages == 1
    with caplog.at_level(logging.INFO, logger="trio_embarcadero.log.region"):
        close_log(open_small_log(cxl_path))
    assert "upgraded the region from layout 3 to 4 in place" in caplog.text
    with open(cxl_path, "rb") as f:
        assert SUPERBLOCK.unpack(f.read(SUPERBLOCK.size))[:2] == (b"TEMBCXL4", 4)


@pytest.mark.parametrize(
    ("layout", "at", "where"),
    [
        (2, 1024, "past the superblock"),
        (3, SESSION_TABLE_OFFSET + 8, "where layout 4 keeps the session table"),
    ],
)
def test_an_old_region_with_data_where_the_new_layout_adds_is_refused(
    cxl_path: str, layout: int, at: int, where: str
) -> None:
    close_log(open_small_log(cxl_path))
    make_layout_2(cxl_path)
    with open(cxl_path, "r+b") as f:
        f.write(struct.pack("<8sI", f"TEMBCXL{layout}".encode(), layout))
        f.seek(at)
        f.write(b"x")
    with pytest.raises(LayoutError) as info:
        open_small_log(cxl_path)
    assert str(info.value) == (
        f"{cxl_path} says it is a CXL region of layout {layout}, but its superblock's page is "
        f"not empty {where}; start with --reset to discard it"
    )


def test_the_broker_table_fits_the_superblock_page() -> None:
    last = member_offset(31) + MEMBER_ENTRY.size
    assert (member_offset(0), last) == (1024, 4096)
    assert SUPERBLOCK.size <= 512  # the lease's room (512..1023) is untouched


# -- a broker in the table ------------------------------------------------------------------


async def test_a_broker_is_listed_while_it_serves_and_beats(
    make_config: MakeConfig, cxl_path: str, autojump_clock: trio.testing.MockClock
) -> None:
    config = make_config(**{"broker.heartbeat_interval_s": 0.25})
    async with memory_broker(config) as (broker, _listener):
        with open_log(cxl_path) as log:
            (member,) = log.brokers()
            assert (member.broker_id, member.status, member.pid) == (
                0,
                MemberStatus.LIVE,
                os.getpid(),
            )
            assert (member.host, member.timeout_s) == ("127.0.0.1", 2.0)
            await trio.sleep(1.1)  # virtual: four heartbeats
            assert log.brokers()[0].beats == 4
            broker.begin_shutdown()
            assert log.brokers()[0].status is MemberStatus.DRAINING
    with open_log(cxl_path) as log:
        assert log.brokers() == []  # a graceful stop clears the entry


# -- a topic's order level ------------------------------------------------------------------


def test_a_topic_keeps_the_order_it_was_created_with(
    cxl_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    zero = open_small_log(cxl_path)
    one = open_small_log(cxl_path, broker_id=1)
    try:
        zero.topic_order = lambda topic: 5 if topic == "total" else 0
        commit(zero, "total", [10])
        commit(zero, "plain", [10])
        assert (zero.order_of("total"), zero.order_of("plain"), zero.order_of("none")) == (
            5,
            0,
            None,
        )
        with open_log(cxl_path) as log:
            assert {t.name: t.order for t in log.topics()} == {"total": 5, "plain": 0}
        # Broker 1's config says otherwise: the topic keeps its order, and it is told.
        with caplog.at_level(logging.WARNING):
            commit(one, "total", [10])
        assert one.order_of("total") == 5
        assert (
            "topic 'total' has order 5, fixed when it was created; the config's order 0 does "
            "not apply to it (delete the topic to create it anew with another order)"
        ) in caplog.text
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            commit(one, "plain", [10])
            commit(one, "total", [10])  # once per topic, not per batch
            zero.check_topic_orders()  # its config agrees: nothing to say
        assert caplog.text == ""
    finally:
        close_log(zero)
        close_log(one)


async def test_a_restarted_broker_warns_about_a_changed_order(
    make_config: MakeConfig,
    cxl_path: str,
    caplog: pytest.LogCaptureFixture,
    autojump_clock: trio.testing.MockClock,
) -> None:
    plain = make_config()
    # [topics."orders.eu"] order = 5 (override tables come from a file; built directly here)
    first = attrs.evolve(
        plain, topics=TopicsConfig(overrides={"orders.eu": TopicOverride(order=5)})
    )
    async with memory_broker(first) as (broker, _):
        broker.log.stream("orders.eu")  # created with its override's order
        broker.log.stream("other")  # and with the default
        assert (broker.log.order_of("orders.eu"), broker.log.order_of("other")) == (5, 0)
    with caplog.at_level(logging.WARNING):
        async with memory_broker(make_config(**{"topics.order": 5})) as (broker, _):
            assert (broker.log.order_of("orders.eu"), broker.log.order_of("other")) == (5, 0)
            broker.log.stream("new")
            assert broker.log.order_of("new") == 5
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    # At start-up, about the one existing topic the config now gives another order.
    assert warned == [
        "topic 'other' has order 0, fixed when it was created; the config's order 5 does "
        "not apply to it (delete the topic to create it anew with another order)"
    ]


# -- a restarted broker recovers its own streams only ---------------------------------------


def test_a_restarted_broker_recovers_only_its_own_streams(cxl_path: str) -> None:
    zero = open_small_log(cxl_path)
    one = open_small_log(cxl_path, broker_id=1)
    try:
        commit(zero, "t", [10])
        commit(one, "t", [10])
        survivor = reserve(zero, "t", [20, 20], seq=1)  # in flight on the broker that lives on
        reserve(one, "t", [30], seq=1)  # in flight on the broker that dies
        units_before = zero.statistics().segments_used
        # Broker 1 is killed (its lock goes, the region stays as it was), then restarts.
        lose_lock(one)
        restarted = open_small_log(cxl_path, broker_id=1)
        try:
            index = zero.topics()["t"]
            assert [h.batch_complete for h in walk_file(cxl_path, index, 1)] == [
                BATCH_COMMITTED,
                BATCH_ABANDONED,
            ]
            # The survivor's batch in flight is still its own to commit, at the next offset.
            assert [h.batch_complete for h in walk_file(cxl_path, index, 0)] == [
                BATCH_COMMITTED,
                BATCH_RESERVED,
            ]
            assert complete(zero, survivor) == [survivor]
            assert survivor.first_offset == 1
            assert zero.statistics().segments_used == units_before
            assert commit(restarted, "t", [10], seq=2)[0] == 1
            with open_log(cxl_path) as log:
                assert [m.offset for m in log.messages("t", 0)] == [0, 1, 2]
                assert [m.offset for m in log.messages("t", 1)] == [0, 1]
        finally:
            close_log(restarted)
        del survivor
    finally:
        close_log(zero)
        one.close()
