"""The sequencer in the log core: one total order over several brokers' streams.

Sans-IO: two broker handles commit into one region in this process, and the
sequencer is stepped by hand with a made-up clock. A crash is injected
between any two of the sequencer's stores to the region, and a new
sequencer goes on from the region alone.
"""

from __future__ import annotations

import json
import os
import random
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rawclient
from test_cxl import Region, body

from trio_embarcadero.cli import main
from trio_embarcadero.log import CxlLog, DiskLog, Reservation, open_log
from trio_embarcadero.log import sequencer as sequencer_module
from trio_embarcadero.log import stamps as stamps_module
from trio_embarcadero.log.disk import write_and_sync
from trio_embarcadero.log.layout import (
    BATCH_ABANDONED,
    BATCH_COMMITTED,
    BH_ORDERED,
    INDEX_OWNER,
    NEVER_ORDERED,
    index_chain,
    iter_batches,
    read_index_entry,
    read_ordered_count,
    read_segment_header,
)
from trio_embarcadero.log.ordered import OrderedIndex
from trio_embarcadero.log.sequencer import Sequencer
from trio_embarcadero.log.stamps import is_stamped, stamp_batches
from trio_embarcadero.log.topics import delete_topic
from trio_embarcadero.tools import seqbench
from trio_embarcadero.wire import (
    BATCH_HEADER,
    BATCH_HEADER_SIZE,
    BatchHeader,
    scan_records,
    stamp_records,
)

TOPIC = "seq"
HOLE_NS = 1_000_000_000


@pytest.fixture
def brokers(cxl_path: str) -> Iterator[tuple[CxlLog, CxlLog]]:
    region = Region(cxl_path)
    # Small allocation units: an ordered index segment holds 126 entries.
    logs = (region.open(broker_id=0, unit_size=4096), region.open(broker_id=1, unit_size=4096))
    for log in logs:
        log.topic_order = lambda _topic: 5
    yield logs
    for log in list(region.opened):
        region.close(log)


def reserve(log: CxlLog, sizes: list[int], client_id: int, first: int) -> Reservation:
    data = body(sizes, client_id, first)
    r = log.get_cxl_buffer(TOPIC, BatchHeader(first, client_id, len(sizes), len(data)))
    r.payload[:] = list(data)
    return r


def commit(log: CxlLog, sizes: list[int], client_id: int, first: int) -> None:
    r = reserve(log, sizes, client_id, first)
    log.complete(r, scan_records(r.payload, len(sizes)))
    assert r.state == BATCH_COMMITTED


def ordered_view(log: CxlLog) -> list[tuple[int, int, int, int]]:
    """(total order, client id, client order, broker) of every ordered message,
    read through the topic's ordered index, checked against the headers.

    The sequencer writes no record: a record's ``total_order`` in the region
    is the one the broker that stored it writes (stamped word set), else
    still 0 (or the one replayed from a disk log); a reader's copy
    (:meth:`OrderedIndex.records`) carries it either way."""
    buf, g = log.region, log.geometry
    index = log.topics()[TOPIC]
    chain = index_chain(buf, g, index)
    reader = OrderedIndex(buf, g, index)
    out = []
    for k in range(read_ordered_count(buf, g, index)):
        entry = read_index_entry(buf, g, chain, k)
        h = log.batch_at(entry.header_offset)
        raw = bytes(buf[entry.header_offset : entry.header_offset + 128])
        ordered, total = struct.unpack_from("<I", raw, 24)[0], struct.unpack_from("<Q", raw, 56)[0]
        assert (ordered, total, h.num_msg) == (1, entry.total_order, entry.num_msg)
        payload = bytes(buf[h.payload_offset : h.payload_offset + h.total_size])
        for _, cid, corder, data in rawclient.parse_records(payload):
            assert data == rawclient.payload_for(cid, corder, len(data))  # not overwritten
        for i, (pos, (_, cid, corder, _)) in enumerate(
            zip(
                scan_records(buf[h.payload_offset : h.payload_offset + h.total_size], h.num_msg),
                rawclient.parse_records(payload),
                strict=True,
            )
        ):
            (record_total,) = struct.unpack_from("<Q", payload, int(pos) + 32)
            if is_stamped(buf, entry.header_offset):
                assert record_total == entry.total_order + i
            else:
                assert record_total in (0, entry.total_order + i)
            copy = reader.records(entry)
            assert copy is not None
            (copy_total,) = struct.unpack_from("<Q", copy, int(pos) + 32)
            assert copy_total == entry.total_order + i
            out.append((entry.total_order + i, cid, corder, entry.broker_id))
    return out


def stamp(*logs: CxlLog, topic: str = TOPIC) -> int:
    """What each broker does once its batches are ordered (its ``OrderWaits``):
    write their records' total orders; returns how many batches it stamped."""
    done = 0
    for log in logs:
        stream = log.existing_stream(topic)
        if stream is None:
            continue
        due = [
            h for h in stream.index_header
            if ordered_word(log, h) == 1 and not is_stamped(log.region, h)
        ]  # fmt: skip
        stamp_batches(log.region, log.words, due)
        done += len(due)
    return done


def step_and_stamp(seq: Sequencer, logs: list[CxlLog], now_ns: int) -> None:
    seq.step(now_ns)
    stamp(*logs)


def check_order(log: CxlLog, expected: dict[int, int]) -> list[tuple[int, int, int, int]]:
    """Gap-free total orders from 0, every committed message exactly once, and
    each client's (one client per broker here) messages in the order it sent them."""
    view = ordered_view(log)
    assert [t for t, *_ in view] == list(range(len(view)))
    for cid, count in expected.items():
        assert [o for _, c, o, _ in view if c == cid] == list(range(count))
    assert len(view) == sum(expected.values())
    return view


def unordered_committed(log: CxlLog, broker: int) -> int:
    index = log.topics()[TOPIC]
    return sum(
        1
        for _, h in iter_batches(log.region, log.geometry, index, broker)
        if h.batch_complete == BATCH_COMMITTED and not h.ordered
    )


def test_interleaved_commits_of_two_brokers_get_one_gap_free_order(
    brokers: tuple[CxlLog, CxlLog],
) -> None:
    rng = random.Random(12)
    seq = brokers[0].sequencer(HOLE_NS)
    sent = {1: 0, 2: 0}
    for _ in range(60):
        b = rng.randrange(2)
        sizes = [rng.choice([10, 100, 700])] * rng.randint(1, 4)
        if rng.random() < 0.3:
            sizes = [rng.randint(1, 300) for _ in sizes]  # mixed record sizes
        commit(brokers[b], sizes, b + 1, sent[b + 1])
        sent[b + 1] += len(sizes)
        if rng.random() < 0.4:
            seq.step(0)
    done = seq.step(0)
    assert all(d.topic == TOPIC for d in done)
    view = check_order(brokers[0], sent)
    assert {b for *_, b in view} == {0, 1}
    assert unordered_committed(brokers[0], 0) == unordered_committed(brokers[0], 1) == 0
    stats = seq.statistics()
    assert (stats.batches_ordered, stats.messages_ordered, stats.lag_batches) == (
        60,
        sum(sent.values()),
        0,
    )


def test_records_of_several_sizes_that_add_up_like_one_size_keep_their_bytes(
    brokers: tuple[CxlLog, CxlLog],
) -> None:
    # Padded sizes 128, 64 and 192: three times the first is the batch's size.
    commit(brokers[0], [64, 0, 128], 1, 0)
    brokers[0].sequencer(HOLE_NS).step(0)
    check_order(brokers[0], {1: 3})


def test_a_step_orders_at_most_its_budget_and_shows_the_lag(
    brokers: tuple[CxlLog, CxlLog],
) -> None:
    seq = brokers[0].sequencer(HOLE_NS)
    for i in range(5):
        commit(brokers[1], [50], 2, i)
    assert len(seq.step(10, budget=2)) == 2
    stats = seq.statistics()
    assert (stats.lag_batches, stats.lag_oldest_s) == (3, 0.0)
    seq.step(2_000_000_010, budget=1)
    assert seq.statistics().lag_batches == 2
    assert seq.statistics().lag_oldest_s == pytest.approx(2.0)
    seq.step(3_000_000_000)
    assert (seq.statistics().lag_batches, seq.statistics().lag_oldest_s) == (0, 0.0)
    check_order(brokers[0], {2: 5})


def test_order_0_topics_are_left_alone(brokers: tuple[CxlLog, CxlLog]) -> None:
    brokers[0].topic_order = lambda _topic: 0
    commit(brokers[0], [10], 1, 0)
    seq = brokers[0].sequencer(HOLE_NS)
    assert not seq.step(0)
    assert seq.statistics().topics == 0
    assert read_ordered_count(brokers[0].region, brokers[0].geometry, 0) == 0


def test_abandoned_batches_are_never_ordered_and_block_nothing(
    brokers: tuple[CxlLog, CxlLog],
) -> None:
    seq = brokers[0].sequencer(HOLE_NS)
    gone = reserve(brokers[1], [40], 2, 0)
    kept = reserve(brokers[1], [40], 2, 0)
    commit(brokers[0], [40], 1, 0)
    assert [b.broker_id for b in seq.step(0)] == [0]  # broker 1's batch is still held
    brokers[1].complete(kept, scan_records(kept.payload, 1))
    assert not seq.step(0)
    brokers[1].abandon(gone)
    assert [b.broker_id for b in seq.step(0)] == [1]
    check_order(brokers[0], {1: 1, 2: 1})


def test_a_committed_batch_behind_a_reserved_one_waits_at_most_the_hole_timeout(
    brokers: tuple[CxlLog, CxlLog], cxl_path: str
) -> None:
    log = brokers[1]
    seq = brokers[0].sequencer(HOLE_NS)
    hole = reserve(log, [40], 2, 0)
    after = reserve(log, [40], 2, 1)
    log.complete(after, scan_records(after.payload, 1))
    # A writer that commits out of log order (or died in between): commit
    # the later batch in the region by hand, its records stamped as ours are.
    stamp_records(log.words, after.payload_offset, scan_records(after.payload, 1), 0)
    log.region[after.header_offset + 16] = BATCH_COMMITTED
    commit(brokers[0], [40], 1, 0)
    assert [b.broker_id for b in seq.step(0)] == [0]
    assert not seq.step(HOLE_NS - 1)
    assert [b.header_offset for b in seq.step(HOLE_NS)] == [after.header_offset]
    assert seq.statistics().holes_skipped == 1
    # Marked never ordered at once, while still reserved.
    assert ordered_word(log, hole.header_offset) == NEVER_ORDERED
    assert seq.statistics().lag_batches == 0
    # The hole is committed late: never ordered, also by a sequencer that
    # starts again, and nothing waits for it (the lag).
    stamp_records(log.words, hole.payload_offset, scan_records(hole.payload, 1), 1)
    log.region[hole.header_offset + 16] = BATCH_COMMITTED
    assert not seq.step(2 * HOLE_NS)
    assert seq.statistics().lag_batches == 0
    assert ordered_word(log, hole.header_offset) == NEVER_ORDERED
    again = brokers[0].sequencer(HOLE_NS)
    assert not again.step(3 * HOLE_NS)
    assert again.statistics().lag_batches == 0
    del hole, after
    view = ordered_view(brokers[0])
    assert [(c, o) for _, c, o, _ in view] == [(1, 0), (2, 1)]


def ordered_word(log: CxlLog, header_offset: int) -> int:
    (word,) = struct.unpack_from("<I", log.region, header_offset + BH_ORDERED)
    return int(word)


def test_a_batch_gone_past_and_then_given_up_is_left_alone(
    brokers: tuple[CxlLog, CxlLog],
) -> None:
    log = brokers[1]
    seq = brokers[0].sequencer(HOLE_NS)
    hole = reserve(log, [40], 2, 0)
    after = reserve(log, [40], 2, 0)
    stamp_records(log.words, after.payload_offset, scan_records(after.payload, 1), 0)
    log.region[after.header_offset + 16] = BATCH_COMMITTED  # out of log order, by hand
    assert not seq.step(0)
    assert len(seq.step(HOLE_NS)) == 1
    log.region[hole.header_offset + 16] = BATCH_ABANDONED  # its writer gave it up
    assert ordered_word(log, hole.header_offset) == NEVER_ORDERED  # (harmless there)
    assert not seq.step(2 * HOLE_NS)
    assert seq.statistics().lag_batches == 0
    assert not brokers[0].sequencer(HOLE_NS).step(3 * HOLE_NS)
    del hole, after
    assert [(c, o) for _, c, o, _ in ordered_view(brokers[0])] == [(2, 0)]


def test_a_batch_given_up_behind_a_reserved_one_makes_no_hole(
    brokers: tuple[CxlLog, CxlLog],
) -> None:
    """The writer commits in log order: a batch behind a reserved one waits
    for it, and one given up meanwhile (abandoned) waits for nothing. So the
    reserved one is never gone past, however long it takes, and is ordered
    once it commits, before the batch that waited behind it."""
    log = brokers[1]
    seq = brokers[0].sequencer(HOLE_NS)
    slow = reserve(log, [40], 2, 0)
    log.abandon(reserve(log, [40], 2, 1))
    behind = reserve(log, [40], 2, 1)
    log.complete(behind, scan_records(behind.payload, 1))  # waits for the slow one
    assert not seq.step(0)
    assert not seq.step(10 * HOLE_NS)
    assert seq.statistics().holes_skipped == 0
    log.complete(slow, scan_records(slow.payload, 1))
    assert [b.header_offset for b in seq.step(11 * HOLE_NS)] == [
        slow.header_offset,
        behind.header_offset,
    ]
    assert seq.statistics().lag_batches == 0
    del slow, behind
    check_order(brokers[0], {2: 2})


class Crash(Exception):
    """Stands for a kill -9 between two stores to the region."""


class CountingStruct:
    """Wraps a struct of the sequencer module: raises :class:`Crash` instead of
    the ``limit``-th store, counting stores over every wrapped struct."""

    count = 0
    limit = -1

    def __init__(self, inner: struct.Struct) -> None:
        self.inner = inner
        self.size = inner.size

    def pack_into(self, buf: Any, offset: int, *values: int) -> None:
        if CountingStruct.count == CountingStruct.limit:
            raise Crash
        CountingStruct.count += 1
        self.inner.pack_into(buf, offset, *values)

    def unpack_from(self, buf: Any, offset: int = 0) -> tuple[Any, ...]:
        return self.inner.unpack_from(buf, offset)


def test_a_crash_between_any_two_stores_neither_repeats_nor_skips_an_order(
    brokers: tuple[CxlLog, CxlLog], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every store of a run of the sequencer, in turn, is where it dies; a new
    sequencer goes on from the region, and the order is the same as without
    a crash in all that matters: gap-free, each message once, client order."""
    for name in ("U32", "U64", "INDEX_ENTRY", "SEGMENT_HEADER"):
        monkeypatch.setattr(sequencer_module, name, CountingStruct(getattr(sequencer_module, name)))
    sent = {1: 0, 2: 0}
    for crash_at in range(30):
        for b in (0, 1):
            for _ in range(2):
                commit(brokers[b], [64], b + 1, sent[b + 1])
                sent[b + 1] += 1
        # A new sequencer's step redoes the last entries' "ordered" words
        # (numpy stores, not counted here), then takes seven stores a stream
        # for its run of two batches (header total orders, two entries, the
        # count, two "ordered" words; no record: their broker writes those):
        # 14 stores; each round dies at another of the first 12, more than
        # twice over. (Dying while adding an index segment: the next test.)
        CountingStruct.count, CountingStruct.limit = 0, crash_at % 12
        with pytest.raises(Crash):
            new_sequencer(brokers[0]).step(0)
        CountingStruct.limit = -1
        new_sequencer(brokers[0]).step(0)
        check_order(brokers[0], sent)


class CountingStore:
    """Stands for the sequencer's ``_store`` (its numpy stores): one element
    at a time, in order, counted with the :class:`CountingStruct` stores, so
    a crash can fall inside a store of a whole run."""

    def __call__(self, view: Any, at: Any, values: Any) -> None:
        slots = range(*at.indices(len(view))) if isinstance(at, slice) else at
        values = np.broadcast_to(values, (len(slots),))
        for slot, value in zip(slots, values, strict=True):
            if CountingStruct.count == CountingStruct.limit:
                raise Crash
            CountingStruct.count += 1
            view[slot] = value


def test_a_crash_at_any_store_of_a_run_of_batches_neither_repeats_nor_skips_an_order(
    brokers: tuple[CxlLog, CxlLog], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run of many batches is ordered with one store of each kind (and one
    commit point) for all of them; the ``ordered`` words written after the
    count are redone by the next sequencer. Every single store, in turn, is
    where it dies, from the same region each time."""
    for name in ("U32", "U64", "INDEX_ENTRY", "SEGMENT_HEADER"):
        monkeypatch.setattr(sequencer_module, name, CountingStruct(getattr(sequencer_module, name)))
    monkeypatch.setattr(sequencer_module, "_store", CountingStore())
    sent = {1: 0, 2: 0}
    for b in (0, 1):  # ordered before: the restart redoes their words too
        commit(brokers[b], [64], b + 1, 0)
        sent[b + 1] += 1
    CountingStruct.count, CountingStruct.limit = 0, -1
    new_sequencer(brokers[0]).step(0)
    # Runs longer than batch by batch takes, of one record, of several of
    # one size, and of several sizes (walked record by record).
    shapes = [[64], [16, 16, 16], [10, 300], [64], [40, 40], [8]]
    for b in (0, 1):
        for sizes in shapes:
            commit(brokers[b], sizes, b + 1, sent[b + 1])
            sent[b + 1] += len(sizes)
    assert len(shapes) > sequencer_module._FEW_BATCHES
    region = brokers[0].region
    before = np.array(region, copy=True)
    CountingStruct.count = 0
    new_sequencer(brokers[0]).step(0)
    stores = CountingStruct.count
    # Per stream: header total orders, entries, "ordered" words, the count;
    # no record (their broker writes those); and the two words redone.
    assert stores == 2 * (3 * len(shapes) + 1) + 2
    check_order(brokers[0], sent)
    for crash_at in range(stores):
        region[:] = before
        CountingStruct.count, CountingStruct.limit = 0, crash_at
        with pytest.raises(Crash):
            new_sequencer(brokers[0]).step(0)
        CountingStruct.limit = -1
        new_sequencer(brokers[0]).step(0)
        check_order(brokers[0], sent)


def test_a_crash_at_any_store_of_going_past_a_hole_orders_the_same(
    brokers: tuple[CxlLog, CxlLog], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Five batches, one left reserved, one committed behind it out of log
    order; with no hole timeout one step orders the five as a run, goes past
    the reserved one (its word 2, once the run is written) and orders the
    last. It dies at every store of that in turn, and the reserved one
    commits then: the stream's words are set in its order whatever the
    store, and a new sequencer orders every batch but one it went past."""
    for name in ("U32", "U64", "INDEX_ENTRY", "SEGMENT_HEADER"):
        monkeypatch.setattr(sequencer_module, name, CountingStruct(getattr(sequencer_module, name)))
    monkeypatch.setattr(sequencer_module, "_store", CountingStore())
    log = brokers[1]
    for i in range(5):
        commit(log, [40], 2, i)
    hole = reserve(log, [40], 2, 5)
    stamp_records(log.words, hole.payload_offset, scan_records(hole.payload, 1), 5)
    after = reserve(log, [40], 2, 6)
    stamp_records(log.words, after.payload_offset, scan_records(after.payload, 1), 6)
    log.region[after.header_offset + 16] = BATCH_COMMITTED  # out of log order, by hand
    region = brokers[0].region
    before = np.array(region, copy=True)
    crash_at = 0
    while True:
        region[:] = before
        CountingStruct.count, CountingStruct.limit = 0, crash_at
        try:
            hasty(brokers[0]).step(0)
        except Crash:
            crashed = True
        else:
            crashed = False
        CountingStruct.limit = -1
        stores = CountingStruct.count
        region[hole.header_offset + 16] = BATCH_COMMITTED  # its writer finishes it now
        words = [
            h.ordered for _, h in iter_batches(region, brokers[0].geometry, 0, 1)
            if h.batch_complete == BATCH_COMMITTED
        ]  # fmt: skip
        unset = words.index(0) if 0 in words else len(words)
        assert not any(words[unset:]), (crash_at, words)
        hasty(brokers[0]).step(0)
        # Gone past (if the dying one got that far) or ordered in its place.
        orders = [0, 1, 2, 3, 4, 6]
        if ordered_word(log, hole.header_offset) != NEVER_ORDERED:
            orders.insert(5, 5)
        assert [(c, o) for _, c, o, _ in ordered_view(brokers[0])] == [(2, o) for o in orders]
        if not crashed:
            break
        crash_at += 1
    assert ordered_word(log, hole.header_offset) == NEVER_ORDERED
    del hole, after
    # Every store: the index's first segment (3), the run of five (headers,
    # entries, the count, words), the reserved one's word, the last one (4).
    assert crash_at == stores == 3 + 3 * 5 + 1 + 1 + 4


def hasty(log: CxlLog) -> Sequencer:
    """A sequencer that goes past a hole as soon as it sees one."""
    return Sequencer(log.region, log.geometry, log.map, log._lock, hole_timeout_ns=0)


def new_sequencer(log: CxlLog) -> Sequencer:
    return Sequencer(log.region, log.geometry, log.map, log._lock, hole_timeout_ns=HOLE_NS)


def test_a_crash_while_adding_an_index_segment_leaks_nothing(
    brokers: tuple[CxlLog, CxlLog], monkeypatch: pytest.MonkeyPatch
) -> None:
    per_segment = (brokers[0].geometry.unit_size - 64) // 32
    seq = brokers[0].sequencer(HOLE_NS)
    for i in range(per_segment):
        commit(brokers[0], [10], 1, i)
    seq.step(0)
    free = brokers[0].map.statistics().free
    commit(brokers[0], [10], 1, per_segment)
    real = sequencer_module.SEGMENT_HEADER

    class Dies:
        size = real.size

        def pack_into(self, buf: Any, offset: int, *values: int) -> None:
            real.pack_into(buf, offset, *values)
            raise Crash  # allocated and written, never linked

    monkeypatch.setattr(sequencer_module, "SEGMENT_HEADER", Dies())
    with pytest.raises(Crash):
        seq.step(0)
    monkeypatch.setattr(sequencer_module, "SEGMENT_HEADER", real)
    assert brokers[0].map.statistics().free == free - 1
    again = brokers[0].sequencer(HOLE_NS)  # frees the unlinked one
    assert brokers[0].map.statistics().free == free
    again.step(0)
    units = index_chain(brokers[0].region, brokers[0].geometry, 0).units
    assert len(units) == 2
    header = read_segment_header(brokers[0].region, brokers[0].geometry, units[1])
    assert header is not None
    assert header.broker_id == INDEX_OWNER
    check_order(brokers[0], {1: per_segment + 1})


def test_a_deleted_topic_made_anew_orders_from_0_again(
    brokers: tuple[CxlLog, CxlLog],
) -> None:
    seq = brokers[0].sequencer(HOLE_NS)
    commit(brokers[1], [10, 10], 2, 0)
    seq.step(0)
    free = brokers[0].map.statistics().free
    with brokers[0]._lock():
        freed = delete_topic(brokers[0].region, brokers[0].geometry, brokers[0].map, TOPIC, [])
    assert freed == 2  # the stream's segment and the index's
    assert brokers[0].map.statistics().free == free + 2
    commit(brokers[1], [10], 3, 0)
    assert [b.total_order for b in seq.step(0)] == [0]
    check_order(brokers[0], {3: 1})


def test_the_entry_points_at_the_batch_header(brokers: tuple[CxlLog, CxlLog]) -> None:
    seq = brokers[0].sequencer(HOLE_NS)
    commit(brokers[1], [10, 20, 30], 2, 0)
    (batch,) = seq.step(0)
    entry = read_index_entry(
        brokers[0].region,
        brokers[0].geometry,
        index_chain(brokers[0].region, brokers[0].geometry, 0),
        0,
    )
    assert (entry.broker_id, entry.num_msg, entry.total_order) == (1, 3, 0)
    assert entry.header_offset == batch.header_offset
    assert brokers[1].batch_at(batch.header_offset).payload_offset == (
        batch.header_offset + BATCH_HEADER_SIZE
    )


def test_retention_keeps_a_segment_until_its_batches_are_ordered(
    brokers: tuple[CxlLog, CxlLog],
) -> None:
    log = brokers[1]
    for i in range(40):  # 1 KiB batches over several small segments
        commit(log, [900], 2, i)
    stream = log.stream(TOPIC)
    assert len(stream.segments) > 2

    def reclaimable() -> int:
        return log.reclaimable_segments(stream, retention_bytes=0, retention_ms=-1, now_ns=0)

    assert reclaimable() == 0  # nothing ordered yet: its acks wait
    seq = brokers[0].sequencer(HOLE_NS)
    seq.step(0, budget=stream.segments[0].batches)
    # Ordered, not stamped yet: the broker that stores them writes into them still.
    assert reclaimable() == 0
    assert stamp(log) == stream.segments[0].batches
    assert reclaimable() == 1
    seq.step(0)
    stamp(log)
    assert reclaimable() == len(stream.segments) - 1


def test_open_log_reads_the_total_order(brokers: tuple[CxlLog, CxlLog], cxl_path: str) -> None:
    seq = brokers[0].sequencer(HOLE_NS)
    commit(brokers[0], [10, 20], 1, 0)
    commit(brokers[1], [30, 40, 50], 2, 0)
    commit(brokers[0], [60], 1, 2)
    with open_log(cxl_path) as reader:
        assert list(reader.ordered_messages(TOPIC)) == []  # nothing ordered yet
        seq.step(0)
        assert reader.ordered_end(TOPIC) == 6
        got = [(m.offset, m.client_id, m.client_order) for m in reader.ordered_messages(TOPIC)]
        assert got == [(t, c, o) for t, c, o, _ in ordered_view(brokers[0])]
        # Broker 0's batches first (the step walks its stream first), then
        # broker 1's: from total order 4, its batch is cut after one record.
        from_4 = list(reader.ordered_messages(TOPIC, start=4))
        assert [(m.offset, len(m.payload)) for m in from_4] == [(4, 40), (5, 50)]
        assert from_4[0].payload == rawclient.payload_for(2, 1, 40)


def test_index_segments_whose_batches_are_all_gone_are_let_go(
    brokers: tuple[CxlLog, CxlLog], cxl_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = brokers[1]
    per = (log.geometry.unit_size - 64) // 32  # 126 entries an index segment
    seq = brokers[0].sequencer(HOLE_NS)
    for i in range(2 * per + 40):
        commit(log, [10], 2, i)
    step_and_stamp(seq, [log], 0)
    assert len(index_chain(log.region, log.geometry, 0).units) == 3
    stream = log.stream(TOPIC)
    while log.reclaimable_segments(stream, retention_bytes=0, retention_ms=-1, now_ns=0):
        log.reclaim_oldest(stream)  # retention: all but the last data segment
    kept = stream.start_offset
    assert kept > per  # the first index segment names only batches gone
    free = log.map.statistics().free
    seq.step(HOLE_NS // 2)  # it looks once a second
    assert seq.statistics().index_segments_freed == 0
    seq.step(HOLE_NS)
    assert seq.statistics().index_segments_freed == 1
    # The second index segment still names a batch in the region once it is
    # not all gone; the first one went, and its unit is free again.
    chain = index_chain(log.region, log.geometry, 0)
    assert chain.first == 1
    assert log.map.statistics().free == free + 1
    with open_log(cxl_path) as reader:
        got = [m.client_order for m in reader.ordered_messages(TOPIC)]
        assert got == list(range(kept, 2 * per + 40))  # the gone ones skipped
        assert next(iter(reader.ordered_messages(TOPIC, start=kept + 5))).client_order == kept + 5
    # A crash after the head moved, before the unit was freed: a new
    # sequencer frees it. (More batches gone first, so the next one can go.)
    for i in range(3 * per):  # past the last data segment of before
        commit(log, [10], 2, 2 * per + 40 + i)
    step_and_stamp(seq, [log], 2 * HOLE_NS)
    while log.reclaimable_segments(stream, retention_bytes=0, retention_ms=-1, now_ns=0):
        log.reclaim_oldest(stream)
    free = log.map.statistics().free

    def dies(unit: int) -> None:
        raise Crash

    monkeypatch.setattr(brokers[0].map, "free", dies)
    with pytest.raises(Crash):
        seq.step(4 * HOLE_NS)
    monkeypatch.undo()
    assert index_chain(log.region, log.geometry, 0).first == 2
    assert log.map.statistics().free == free
    brokers[0].sequencer(HOLE_NS)
    assert log.map.statistics().free == free + 1


def test_the_micro_benchmark_orders_every_batch_it_prepared(
    cxl_path: str, capsys: pytest.CaptureFixture[str]
) -> None:
    result = seqbench.run(cxl_path, batches=3000, brokers=3, messages=4)
    assert (result.batches, result.messages, result.brokers) == (3000, 12000, 3)
    assert result.seconds > 0
    assert seqbench.main(["--path", cxl_path, "--batches", "500", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["batches"] == 500
    assert printed["batches_per_second"] > 0


def test_subscribe_asks_for_ordered_on_an_order_5_topic(
    brokers: tuple[CxlLog, CxlLog], cxl_path: str, capsys: pytest.CaptureFixture[str]
) -> None:
    commit(brokers[0], [10], 1, 0)
    base = ["subscribe", "--cxl-path", cxl_path, "--port", "9", "--topic", TOPIC]
    assert main(base) == 1
    assert "has order 5: read its total order with --ordered" in capsys.readouterr().err


def sync(disk: DiskLog) -> None:
    """What the broker's disk writer does once."""
    result = write_and_sync(disk.take_jobs())
    assert result.failure is None
    disk.jobs_done(result.done, result.written, 0.0)


def open_brokers(cxl_path: str, first: int = 0) -> tuple[Region, list[CxlLog]]:
    """Both brokers on the region at ``cxl_path`` (created if need be),
    broker ``first`` first."""
    region = Region(cxl_path)
    logs: list[CxlLog] = [None, None]  # type: ignore[list-item]
    for broker in (first, 1 - first):
        logs[broker] = region.open(broker_id=broker, unit_size=4096)
        logs[broker].topic_order = lambda _topic: 5
    return region, logs


def close_all(region: Region, *closing: DiskLog | Sequencer) -> None:
    for each in closing:
        each.close()
    for log in list(region.opened):
        region.close(log)


def test_a_region_rebuilt_from_the_disk_logs_keeps_its_total_order(
    cxl_path: str, tmp_path: Path
) -> None:
    """Batches of an order-5 topic go to the disk log once ordered, their
    total orders in them; a region replayed from the disk logs (each broker
    its own) gets the same total order again, ordered index and all, and the
    sequencer goes on from there without a gap."""
    directory = str(tmp_path / "disk")
    region, brokers = open_brokers(cxl_path)
    disks = [DiskLog.open(directory, log, sync_interval=0.001, sync_bytes=1) for log in brokers]
    seq = brokers[0].sequencer(HOLE_NS)
    rng = random.Random(7)
    sent = {1: 0, 2: 0}
    for i in range(40):
        b = 0 if i == 0 else rng.randrange(2)  # broker 0 holds total order 0
        sizes = [rng.choice([10, 100])] * rng.randint(1, 3)
        commit(brokers[b], sizes, b + 1, sent[b + 1])
        sent[b + 1] += len(sizes)
        if rng.random() < 0.5:
            step_and_stamp(seq, brokers, 0)
        if rng.random() < 0.5:
            for disk in disks:
                sync(disk)
    step_and_stamp(seq, brokers, 0)
    # A batch committed and not ordered yet stays off the disk (its ack
    # waits for the order anyway).
    commit(brokers[1], [10], 2, sent[2])
    for disk in disks:
        sync(disk)
    stream = brokers[1].stream(TOPIC)
    assert disks[1].durable_batches(stream) == stream.batches - 1
    assert disks[1].waiting_batches == 1
    seq.step(0)
    sync(disks[1])
    # Ordered, and written to disk once its broker wrote its records' total orders.
    assert disks[1].durable_batches(stream) == stream.batches - 1
    stamp(brokers[1])
    sent[2] += 1
    sync(disks[1])
    assert disks[1].durable_batches(stream) == stream.batches
    before = check_order(brokers[0], sent)
    del stream
    close_all(region, seq, *disks)
    os.unlink(cxl_path)  # the reboot: /dev/shm is gone, the disk is not

    # Broker 1 starts (and replays) first: its batches wait for broker 0's,
    # which hold the total orders before theirs.
    region, brokers = open_brokers(cxl_path, first=1)
    disks = [DiskLog.open(directory, brokers[1], sync_interval=0.001, sync_bytes=1)]
    seq = brokers[0].sequencer(HOLE_NS)
    try:
        assert not seq.step(0)
        disks.append(DiskLog.open(directory, brokers[0], sync_interval=0.001, sync_bytes=1))
        assert len(seq.step(1)) == 41
        assert check_order(brokers[0], sent) == before
        # New batches go on from the last total order, on either broker.
        for b in (1, 0, 1):
            commit(brokers[b], [20, 20], b + 1, sent[b + 1])
            sent[b + 1] += 2
        seq.step(2)
        after = check_order(brokers[0], sent)
        assert after[: len(before)] == before
        assert len(after) == len(before) + 6
    finally:
        close_all(region, seq, *disks)


def test_replayed_batches_wait_once_for_a_broker_that_does_not_replay(
    cxl_path: str, tmp_path: Path
) -> None:
    """Broker 0 had no disk log: broker 1's replayed batches wait for its
    total orders for the hole timeout, then keep their own (the gaps are
    broker 0's lost batches), without waiting again at every gap."""
    directory = str(tmp_path / "disk")
    region, brokers = open_brokers(cxl_path)
    disk = DiskLog.open(directory, brokers[1], sync_interval=0.001, sync_bytes=1)
    seq = brokers[0].sequencer(HOLE_NS)
    for i in range(4):
        commit(brokers[0], [10], 1, i)
        commit(brokers[1], [10, 10], 2, 2 * i)
        step_and_stamp(seq, brokers, 0)
    sync(disk)
    close_all(region, seq, disk)
    os.unlink(cxl_path)
    region, brokers = open_brokers(cxl_path, first=1)
    disk = DiskLog.open(directory, brokers[1], sync_interval=0.001, sync_bytes=1)
    seq = brokers[0].sequencer(HOLE_NS)
    try:
        assert not seq.step(0)
        assert not seq.step(HOLE_NS - 1)
        assert [b.total_order for b in seq.step(HOLE_NS)] == [1, 4, 7, 10]
        commit(brokers[0], [10], 1, 4)
        assert [b.total_order for b in seq.step(HOLE_NS)] == [12]
    finally:
        close_all(region, seq, disk)


def test_the_broker_that_stored_a_batch_writes_its_records_total_orders(
    brokers: tuple[CxlLog, CxlLog],
) -> None:
    """The sequencer writes headers only; the broker's stamping writes every
    record's total order from its header: one record, one record size (a
    strided column), sizes that differ (walked), many small batches at once
    (one gather) and a few large ones."""
    log = brokers[1]
    seq = brokers[0].sequencer(HOLE_NS)
    shapes = [[64], [16, 16, 16], [10, 300], [40] * 70, [8], [24, 24]] + [[32, 32]] * 8
    client_order = 0
    for sizes in shapes:
        commit(log, sizes, 2, client_order)
        client_order += len(sizes)
    seq.step(0)
    stream = log.stream(TOPIC)
    assert not any(is_stamped(log.region, h) for h in stream.index_header)
    region_totals = [m for batch in record_orders(log) for m in batch]
    assert region_totals == [0] * client_order  # untouched so far
    # A few at a time (strided columns), then the rest at once (a gather).
    stamp_batches(log.region, log.words, stream.index_header[:5])
    stamp_batches(log.region, log.words, stream.index_header[5:])
    assert all(is_stamped(log.region, h) for h in stream.index_header)
    assert [m for batch in record_orders(log) for m in batch] == list(range(client_order))
    check_order(brokers[0], {2: client_order})


def record_orders(log: CxlLog) -> list[list[int]]:
    """Each record's total_order field in the region, batch by batch, of the log's stream."""
    out = []
    for header in log.stream(TOPIC).index_header:
        h = log.batch_at(header)
        payload = log.region[h.payload_offset : h.payload_offset + h.total_size]
        out.append(
            [
                int(log.words[(h.payload_offset + int(at)) // 8 + 4])
                for at in scan_records(payload, h.num_msg)
            ]
        )
    return out


def test_a_crash_at_any_store_of_stamping_leaves_no_batch_marked_before_its_records(
    brokers: tuple[CxlLog, CxlLog], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The broker dies at every store of stamping a run of batches in turn: a
    batch marked stamped has every record's total order, and stamping what
    is left unmarked (a restarted broker) finishes the job."""
    monkeypatch.setattr(stamps_module, "U32", CountingStruct(stamps_module.U32))
    monkeypatch.setattr(stamps_module, "_store", CountingStore())
    log = brokers[1]
    seq = brokers[0].sequencer(HOLE_NS)
    shapes = [[64], [16, 16, 16], [10, 300], [40, 40]]
    sent = 0
    for sizes in shapes:
        commit(log, sizes, 2, sent)
        sent += len(sizes)
    seq.step(0)
    headers = log.stream(TOPIC).index_header
    region = log.region
    before = np.array(region, copy=True)
    CountingStruct.count, CountingStruct.limit = 0, -1
    stamp_batches(region, log.words, headers)
    stores = CountingStruct.count
    assert stores == sent + len(shapes)  # every record, then every mark
    expected = record_orders(log)
    for crash_at in range(stores):
        region[:] = before
        CountingStruct.count, CountingStruct.limit = 0, crash_at
        with pytest.raises(Crash):
            stamp_batches(region, log.words, headers)
        CountingStruct.limit = -1
        for header, totals in zip(headers, record_orders(log), strict=True):
            if is_stamped(region, header):
                assert totals == expected[headers.index(header)]
        stamp(log)
        assert record_orders(log) == expected
        assert all(is_stamped(region, h) for h in headers)


def test_a_brokers_first_batch_from_an_offset_is_found_across_index_segments(
    brokers: tuple[CxlLog, CxlLog],
) -> None:
    """OrderedIndex.next_of_broker (one vectorised pass per index segment)
    finds what a walk of the entries, one at a time, finds: the first entry of
    the broker's batches that holds the offset, or a later one."""
    seq = brokers[0].sequencer(HOLE_NS)
    per_segment = (brokers[0].geometry.unit_size - 64) // 32
    for i in range(per_segment + 40):  # broker 1's batches: 2 messages each
        commit(brokers[0], [10], 1, i)
        if i % 3 == 0:
            commit(brokers[1], [10, 10], 2, i)
        seq.step(0)
    buf, g = brokers[0].region, brokers[0].geometry
    index = OrderedIndex(buf, g, brokers[0].topics()[TOPIC])
    count = index.count()
    assert len(index_chain(buf, g, index.topic_index).units) >= 2
    entries = [index.entry(k) for k in range(count)]

    def walk(broker_id: int, k: int, floor: int) -> int:
        for at in range(k, count):
            entry = entries[at]
            assert entry is not None
            batch = brokers[0].batch_at(entry.header_offset)
            if entry.broker_id == broker_id and batch.first_offset + batch.num_msg > floor:
                return at
        return count

    for broker_id, last in ((0, per_segment + 40), (1, 2 * ((per_segment + 40 + 2) // 3))):
        for floor in (0, 1, 5, last // 2, last // 2 + 1, last - 1, last, last + 10):
            for k in (0, per_segment - 1, per_segment + 3):
                found = index.next_of_broker(broker_id, k, count, floor)
                assert found == walk(broker_id, k, floor), (broker_id, floor, k)
    seq.close()


def test_a_header_read_while_another_process_writes_it_is_whole_once_committed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The sequencer reads a stream's headers while their broker, another
    process, reserves and commits batches. A reader preempted between two of
    its reads sees each of them at another moment of the writer's stores: a
    batch it finds committed must have the record count and size it was
    written with (one read in one go could take the count from before the
    header was written and the state from after the commit; a state read
    first could be a recycled segment's old one)."""
    offset = 128
    fields = (469, 2, 15, 0, 1, 0, 1, 3712, 0, offset + 128, 0, 77)
    for recycled in (bytes(256), _old_committed_header(offset)):
        moments = _header_writes(recycled, offset, fields)
        committed_at = len(moments) - 1  # the last store: the state word
        seen = 0
        # Every order of the reader's three reads over the writer's moments.
        for i, first in enumerate(moments):
            for j in range(i, len(moments)):
                for k in range(j, len(moments)):
                    reads = iter([first, moments[j], moments[k]])
                    for name in ("U64", "U32", "_HEAD"):
                        reading = _Reading(getattr(sequencer_module, name), reads)
                        monkeypatch.setattr(sequencer_module, name, reading)
                    head = sequencer_module._read_head(b"", offset)
                    monkeypatch.undo()
                    if head is not None and head[0] == 1:
                        seen += 1
                        assert k >= committed_at  # committed by the time it was read
                        assert (head[3], head[4]) == (15, 3712)  # records, size
        assert seen  # and a committed header is read as one


def _header_writes(before: bytes, offset: int, fields: tuple[int, ...]) -> list[bytes]:
    """The region after each store of a reservation and its commit, as
    CPython makes them: the end of the data marked (the size word 0) before;
    ``struct.pack_into`` zeroes its whole range, then writes field after
    field; the commit writes the logical offset, then the state."""
    region = bytearray(before)
    region[offset + 32 : offset + 40] = bytes(8)
    moments = [bytes(region)]
    region[offset : offset + 128] = bytes(128)
    moments.append(bytes(region))
    packed = BATCH_HEADER.pack(*fields)
    at = 0
    for count, code in re.findall(r"(\d*)([a-zA-Z])", BATCH_HEADER.format):
        size = struct.calcsize(f"<{count}{code}")
        if code != "x":
            region[offset + at : offset + at + size] = packed[at : at + size]
            moments.append(bytes(region))
        at += size
    for start, value in ((40, (32541).to_bytes(8, "little")), (16, (1).to_bytes(4, "little"))):
        region[offset + start : offset + start + len(value)] = bytes(len(value))
        moments.append(bytes(region))
        region[offset + start : offset + start + len(value)] = value
        moments.append(bytes(region))
    return moments


class _Reading:
    """A struct whose ``unpack_from`` reads the next of a series of snapshots."""

    def __init__(self, struct_: struct.Struct, snapshots: Iterator[bytes]) -> None:
        self._struct = struct_
        self._snapshots = snapshots

    def unpack_from(self, _buf: object, offset: int = 0) -> tuple[Any, ...]:
        return self._struct.unpack_from(next(self._snapshots), offset)


def _old_committed_header(offset: int) -> bytes:
    """A recycled segment's bytes: another batch's committed header at ``offset``."""
    region = bytearray(256)
    region[offset : offset + 128] = BATCH_HEADER.pack(9, 5, 40, 1, 1, 1, 0, 4096, 7, 0, 0, 0)
    return bytes(region)
