"""The session table in the log core: claims, commits, the window, reclaim, a crash at every store.

Sans-IO: two broker handles on one region in this process (each with its own
lock on its broker id and its own handle on the table), a made-up monotonic
clock, and a batch's way through a broker done by hand: admit (claim),
reserve, locate, commit, settle. A broker "dies" by losing its lock, as a
``kill -9`` would make it; a crash between any two stores to the table is a
:class:`Crash` raised instead of that store.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import rawclient
from memory import close_log, lose_lock, open_small_log
from test_cxl import body
from test_sequencer import CountingStore, CountingStruct, Crash, stamp, sync

from trio_embarcadero.log import CxlLog, DiskLog, open_log
from trio_embarcadero.log import sequencer as sequencer_module
from trio_embarcadero.log import sessions as sessions_module
from trio_embarcadero.log.layout import (
    BATCH_COMMITTED,
    BH_ORDERED,
    NEVER_ORDERED,
    SESSION_OWNER,
    SESSION_TABLE_OFFSET,
    U32,
    iter_batches,
    read_segment_header,
)
from trio_embarcadero.log.sequencer import Sequencer
from trio_embarcadero.log.sessions import (
    CLAIMS,
    WINDOW,
    Admission,
    Claim,
    SessionKey,
    Verdict,
)
from trio_embarcadero.log.topics import delete_topic
from trio_embarcadero.wire import BatchHeader, scan_records

TOPIC = "s"
TOKEN = 0x5EED
SECOND = 10**9
TIMEOUT = 60 * SECOND


class Clock:
    """The host's monotonic clock, by hand."""

    def __init__(self) -> None:
        self.now = 10 * SECOND

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def brokers(cxl_path: str, clock: Clock) -> Iterator[list[CxlLog]]:
    logs = [open_small_log(cxl_path, broker_id=b, unit_size=4096) for b in (0, 1)]
    for log in logs:
        log.sessions.clock = clock
        log.sessions.timeout_ns = TIMEOUT
    yield logs
    for log in logs:
        close_log(log)


def key(log: CxlLog, client_id: int = 7, token: int = TOKEN, topic: str = TOPIC) -> SessionKey:
    """The session key of ``client_id`` on ``topic`` (created if need be)."""
    stream = log.stream(topic)
    return SessionKey(client_id, topic, stream.topic_index, stream.incarnation, token)


def store(log: CxlLog, admission: Admission, *, commit: bool = True, settle: bool = True) -> Any:
    """What a broker does with a NEW batch: reserve it with its claim (which
    records where), commit it in the log (which settles the claim). Without
    ``settle`` the broker dies between its commit and the settle."""
    claim = admission.claim
    assert admission.verdict is Verdict.NEW
    assert claim is not None
    data = body([30], 7, claim.seq)
    header = BatchHeader(claim.seq, 7, 1, len(data))
    reservation = log.get_cxl_buffer(TOPIC, header, session=claim)
    reservation.payload[:] = list(data)
    if commit:
        if not settle:
            log.sessions.settle = lambda claims: None  # type: ignore[method-assign]
        try:
            log.complete(reservation, scan_records(reservation.payload, 1))
        finally:
            vars(log.sessions).pop("settle", None)
        assert reservation.state == BATCH_COMMITTED
    return reservation


def put(log: CxlLog, seq: int) -> Any:
    """Batch ``seq`` of the session, stored by ``log``'s broker."""
    return store(log, log.sessions.admit(key(log), seq))


def copies(log: CxlLog, seq: int, client_id: int = 7) -> int:
    """Committed batches of ``client_id`` with batch_seq ``seq``, in every stream."""
    index = log.topics()[TOPIC]
    return sum(
        1
        for broker in (0, 1)
        for _, h in iter_batches(log.region, log.geometry, index, broker)
        if h.batch_complete == BATCH_COMMITTED and (h.batch_seq, h.client_id) == (seq, client_id)
    )


def test_a_batch_stored_on_one_broker_is_a_duplicate_on_any(brokers: list[CxlLog]) -> None:
    zero, one = brokers
    first = zero.sessions.admit(key(zero), 0)
    assert first.verdict is Verdict.NEW
    reservation = store(zero, first)
    # Its header names the session: entry + 1 at +28, the token at +64.
    raw = bytes(zero.region[reservation.header_offset : reservation.header_offset + 128])
    assert struct.unpack_from("<IQ", raw, 28)[0] == first.entry + 1
    assert struct.unpack_from("<Q", raw, 64)[0] == TOKEN
    for log in (zero, one):
        again = log.sessions.admit(key(log), 0)
        assert (again.verdict, again.writer, again.entry) == (Verdict.DUPLICATE, 0, first.entry)
    state = one.sessions.state(first.entry, TOKEN, 0)
    assert (state.known, state.stored, state.writer, state.durable) == (True, True, 0, False)
    assert copies(zero, 0) == 1


def test_a_batch_seq_claimed_by_a_live_broker_is_busy_until_it_settles(
    brokers: list[CxlLog],
) -> None:
    zero, one = brokers
    claimed = zero.sessions.admit(key(zero), 0)
    busy = one.sessions.admit(key(one), 0)
    assert (busy.verdict, busy.writer) == (Verdict.BUSY, 0)
    # Also for another connection of the claimant's own broker.
    assert zero.sessions.admit(key(zero), 0).verdict is Verdict.BUSY
    store(zero, claimed)
    assert one.sessions.admit(key(one), 0).verdict is Verdict.DUPLICATE


def test_a_claim_given_up_lets_the_next_copy_be_stored(brokers: list[CxlLog]) -> None:
    zero, one = brokers
    claimed = zero.sessions.admit(key(zero), 0)
    reservation = store(zero, claimed, commit=False)
    zero.abandon(reservation)  # gives its claim up
    store(one, one.sessions.admit(key(one), 0))
    assert copies(one, 0) == 1


def test_a_dead_brokers_claim_is_stored_if_it_committed_and_void_if_not(
    brokers: list[CxlLog],
) -> None:
    zero, one = brokers
    # Broker 1 commits batch 0 and dies before it settles; batch 1 it dies
    # with after reserving it, batch 2 after claiming it only.
    store(one, one.sessions.admit(key(one), 0), settle=False)
    store(one, one.sessions.admit(key(one), 1), commit=False)
    one.sessions.admit(key(one), 2)
    for seq in (0, 1, 2):
        assert zero.sessions.admit(key(zero), seq).verdict is Verdict.BUSY  # it lives
    lose_lock(one)
    assert (zero.sessions.admit(key(zero), 0).verdict, copies(zero, 0)) == (Verdict.DUPLICATE, 1)
    for seq in (1, 2):
        store(zero, zero.sessions.admit(key(zero), seq))
        assert copies(zero, seq) == 1


def test_a_broker_started_again_settles_its_own_claims_first(
    cxl_path: str, brokers: list[CxlLog], clock: Clock
) -> None:
    zero, one = brokers
    store(one, one.sessions.admit(key(one), 0), settle=False)
    store(one, one.sessions.admit(key(one), 1), commit=False)
    lose_lock(one)
    brokers[1] = again = open_small_log(cxl_path, broker_id=1, unit_size=4096)
    again.sessions.clock = clock
    close_log(one)
    # Until it settles them, its old claims look like a live broker's.
    assert zero.sessions.admit(key(zero), 1).verdict is Verdict.BUSY
    assert again.sessions.recover() == 2
    assert zero.sessions.admit(key(zero), 0).verdict is Verdict.DUPLICATE
    assert zero.sessions.admit(key(zero), 1).verdict is Verdict.NEW


def test_the_window_and_the_base(brokers: list[CxlLog]) -> None:
    zero, one = brokers
    k = key(zero)
    ahead = zero.sessions.admit(k, WINDOW)
    assert ahead.verdict is Verdict.OUTSIDE
    assert ahead.reason == (
        "batch_seq 256 of session (client 7, topic 's') is 256 ahead of its first batch_seq "
        "not yet stored (0); a session keeps at most 256 batches unacked, and one unused for "
        "cxl.session_timeout_s begins again at 0"
    )
    # Out of order within the window is fine; the base moves over what is settled.
    for seq in (WINDOW - 1, *range(WINDOW - 1)):
        store(zero, zero.sessions.admit(k, seq))
    store(one, one.sessions.admit(key(one), WINDOW))
    assert zero.sessions.admit(k, 2 * WINDOW).verdict is Verdict.NEW  # base is 257 now
    behind = zero.sessions.admit(k, 0)
    assert behind.verdict is Verdict.OUTSIDE
    assert "is 257 behind its first batch_seq not yet stored (257)" in behind.reason
    # The ring moved with the base: the last 256 are still known.
    assert zero.sessions.admit(k, 1).verdict is Verdict.DUPLICATE
    assert zero.sessions.admit(k, WINDOW).verdict is Verdict.DUPLICATE


def test_another_token_is_a_collision_until_the_session_expires(
    brokers: list[CxlLog], clock: Clock
) -> None:
    zero, one = brokers
    store(zero, zero.sessions.admit(key(zero), 0))
    intruder = key(one, token=TOKEN + 1)
    assert one.sessions.holder(intruder) == TOKEN
    assert (one.sessions.entry_of(intruder), one.sessions.entry_of(key(one))) == (None, 0)
    refused = one.sessions.admit(intruder, 0)
    assert refused.verdict is Verdict.COLLISION
    assert refused.reason == (
        "client id 7 on topic 's' is in use by another publish session (another token): "
        "two clients share the id; reconnect with another client_id"
    )
    # Other client ids and topics are other sessions.
    assert one.sessions.admit(key(one, client_id=8, token=9), 0).verdict is Verdict.NEW
    clock.now += TIMEOUT - 1
    zero.sessions.touch([(refused.entry, TOKEN)])  # an open connection keeps it
    clock.now += TIMEOUT
    assert one.sessions.admit(intruder, 0).verdict is Verdict.COLLISION
    clock.now += TIMEOUT + 1
    assert one.sessions.holder(intruder) is None
    taken = one.sessions.admit(intruder, 0)
    assert (taken.verdict, taken.entry) == (Verdict.NEW, refused.entry)  # its entry, anew
    # The old client is the stranger now; a forgotten session starts again at 0.
    assert zero.sessions.admit(key(zero), 0).verdict is Verdict.COLLISION


def test_entries_of_expired_sessions_and_deleted_topics_are_reused_and_the_table_grows(
    brokers: list[CxlLog], clock: Clock
) -> None:
    zero, _ = brokers
    table = zero.sessions
    assert U32.unpack_from(zero.region, SESSION_TABLE_OFFSET)[0] == 0  # none before the first
    per = table.per_segment
    assert per == 31  # 64 KiB segments of 4 KiB units
    entries = {zero.sessions.admit(key(zero, client_id=c), 0).entry for c in range(per + 1)}
    assert entries == set(range(per + 1))
    assert (table.entries, table.live_sessions()) == (2 * per, per + 1)
    (head,) = U32.unpack_from(zero.region, SESSION_TABLE_OFFSET)
    found = read_segment_header(zero.region, zero.geometry, head - 1)
    assert found is not None
    assert found.broker_id == SESSION_OWNER
    clock.now += TIMEOUT + 1
    for c in range(per, 2 * per):  # these take the expired entries, in order
        assert table.admit(key(zero, client_id=1000 + c), 0).entry == c - per
    assert table.entries == 2 * per
    # A deleted topic's sessions are gone at once.
    zero.sessions.admit(key(zero, topic="gone"), 0)
    live = table.live_sessions()
    delete_topic(zero.region, zero.geometry, zero.map, "gone", running=())
    made = table.admit(key(zero, client_id=5000), 0)
    assert made.verdict is Verdict.NEW
    assert table.live_sessions() == live


def test_claims_are_bounded_and_dead_brokers_claims_make_room(brokers: list[CxlLog]) -> None:
    zero, one = brokers
    for seq in range(CLAIMS):
        assert one.sessions.admit(key(one), seq).verdict is Verdict.NEW
    full = zero.sessions.admit(key(zero), CLAIMS)
    assert (full.verdict, full.writer) == (Verdict.BUSY, -1)
    assert "92 batches of session (client 7, topic 's') are being written at once" in full.reason
    lose_lock(one)
    assert zero.sessions.admit(key(zero), CLAIMS).verdict is Verdict.NEW


def test_durable_marks(brokers: list[CxlLog]) -> None:
    zero, one = brokers
    made = [zero.sessions.admit(key(zero), seq) for seq in range(3)]
    for admission in made:
        store(zero, admission)
    entry = made[0].entry
    zero.sessions.mark_durable([(entry, TOKEN, 0), (entry, TOKEN + 1, 1)])  # a stranger's: no
    one.sessions.mark_durable([(entry, TOKEN, 2)])  # not broker 1's batch: no
    assert [one.sessions.state(entry, TOKEN, s).durable for s in range(3)] == [True, False, False]
    # What a broker that starts again marks once its start-up backlog is synced.
    assert one.sessions.not_durable() == []
    assert zero.sessions.not_durable() == [(entry, TOKEN, 1), (entry, TOKEN, 2)]
    zero.sessions.mark_durable(zero.sessions.not_durable())
    assert all(one.sessions.state(entry, TOKEN, s).durable for s in range(3))
    assert not one.sessions.state(entry, TOKEN + 1, 0).known


# -- a crash at every store ------------------------------------------------------------------


def test_a_crash_at_every_store_loses_and_doubles_nothing(
    cxl_path: str, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broker 1 takes batches 0..3 of a new session through the whole way
    (the session made, claims, records, commits, settles: the base and the
    ring move) and dies at the k-th store to the table, for every k; broker 0
    is then sent every batch again. Each batch ends up stored exactly once,
    and the session goes on."""
    for name in ("U8", "U32", "U64", "HEAD", "SEGMENT_HEADER"):
        monkeypatch.setattr(sessions_module, name, CountingStruct(getattr(sessions_module, name)))
    crash_at = 0
    topic = TOPIC
    while True:
        zero = open_small_log(cxl_path, broker_id=0, unit_size=4096, reset=True)
        one = open_small_log(cxl_path, broker_id=1, unit_size=4096)
        zero.sessions.clock = one.sessions.clock = clock
        keys = [
            SessionKey(7, topic, s.topic_index, s.incarnation, TOKEN)
            for s in (zero.stream(topic), one.stream(topic))
        ]
        CountingStruct.count, CountingStruct.limit = 0, crash_at
        try:
            for seq in range(4):
                admission = one.sessions.admit(keys[1], seq)
                run_batch(one, topic, admission)
        except Crash:
            pass
        else:
            break  # no store left to crash at
        finally:
            CountingStruct.limit = -1
        lose_lock(one)  # dead
        zero.sessions.recover()  # (what a broker does at its start; it has no claims)
        for seq in (3, 1, 0, 2, 4):  # a resend, in any order, and the next batch
            admission = zero.sessions.admit(keys[0], seq)
            assert admission.verdict in (Verdict.NEW, Verdict.DUPLICATE), (crash_at, seq)
            if admission.verdict is Verdict.NEW:
                run_batch(zero, topic, admission)
        index = zero.topics()[topic]
        stored = [
            h.batch_seq
            for b in (0, 1)
            for _, h in iter_batches(zero.region, zero.geometry, index, b)
            if h.batch_complete == BATCH_COMMITTED
        ]
        assert sorted(stored) == [0, 1, 2, 3, 4], crash_at
        quick_close(one)
        quick_close(zero)
        crash_at += 1
    quick_close(one)
    quick_close(zero)
    assert crash_at > 20  # it crashed at every store there is


def quick_close(log: CxlLog) -> None:
    """Close without a garbage collection per round: a view still held only
    keeps the mapping (not the file, nor the lock) until it goes."""
    try:
        log.close()
    except BufferError:
        pass


def run_batch(log: CxlLog, topic: str, admission: Admission) -> None:
    claim = admission.claim
    assert admission.verdict is Verdict.NEW
    assert claim is not None
    data = body([20], 7, claim.seq)
    reservation = log.get_cxl_buffer(topic, BatchHeader(claim.seq, 7, 1, len(data)), session=claim)
    reservation.payload[:] = list(data)
    log.complete(reservation, scan_records(reservation.payload, 1))


# -- the sequencer ---------------------------------------------------------------------------


@pytest.fixture
def ordered(brokers: list[CxlLog]) -> Iterator[tuple[CxlLog, CxlLog, Sequencer]]:
    """Both brokers' topics of order 5, and broker 0's sequencer."""
    for log in brokers:
        log.topic_order = lambda _topic: 5
    sequencer = brokers[0].sequencer(SECOND)
    yield brokers[0], brokers[1], sequencer
    sequencer.close()


def ordered_seqs(log: CxlLog) -> list[int]:
    with open_log(log.path) as reader:
        return [rawclient_seq(m.payload) for m in reader.ordered_messages(TOPIC)]


def rawclient_seq(payload: bytes) -> int:
    """The batch_seq a test batch's one message carries (its client order)."""
    for order in range(1000):
        if payload == rawclient.payload_for(7, order, len(payload)):
            return order
    raise AssertionError(payload)


def test_a_sessions_batches_are_ordered_by_batch_seq_across_brokers(
    ordered: tuple[CxlLog, CxlLog, Sequencer],
) -> None:
    zero, one, sequencer = ordered
    # Batch 1 reaches broker 0 first, batch 0 broker 1 later; then 2 on broker 0.
    put(zero, 1)
    assert sequencer.step(0) == []  # 1 waits for 0
    put(one, 0)
    put(zero, 2)
    assert [b.broker_id for b in sequencer.step(1)] == [1, 0, 0]
    assert ordered_seqs(zero) == [0, 1, 2]
    # A sequencer started again goes on from the region: 3 next, not 0.
    put(one, 3)
    assert len(zero.sequencer(SECOND).step(2)) == 1
    assert ordered_seqs(zero) == [0, 1, 2, 3]


def test_a_missing_batch_seq_is_skipped_after_the_hole_timeout_and_never_ordered(
    ordered: tuple[CxlLog, CxlLog, Sequencer],
) -> None:
    zero, one, sequencer = ordered
    put(zero, 0)
    late = one.sessions.admit(key(one), 1)  # claimed, still on its way
    put(zero, 2)
    assert len(sequencer.step(0)) == 1
    assert sequencer.step(SECOND - 1) == []
    assert len(sequencer.step(SECOND)) == 1
    assert sequencer.statistics().session_skips == 1
    assert ordered_seqs(zero) == [0, 2]
    # It arrives anew: refused; the copy that was on its way is stored but
    # never ordered (ordered word 2), also by a sequencer that starts again.
    refused = zero.sessions.admit(key(zero), 1)
    assert refused.verdict is Verdict.SKIPPED
    assert refused.reason.startswith(
        "batch_seq 1 of session (client 7, topic 's') was skipped by the sequencer"
    )
    reservation = store(one, late)
    assert sequencer.step(2 * SECOND) == []
    assert zero.sequencer(SECOND).step(3 * SECOND) == []
    assert U32.unpack_from(zero.region, reservation.header_offset + BH_ORDERED)[0] == (
        NEVER_ORDERED
    )
    state = zero.sessions.state(late.entry, TOKEN, 1)
    assert (state.stored, state.skipped, state.ordered) == (True, True, False)
    put(one, 3)
    assert len(sequencer.step(4 * SECOND)) == 1
    assert ordered_seqs(zero) == [0, 2, 3]


def test_batches_of_client_req_0_are_never_held(ordered: tuple[CxlLog, CxlLog, Sequencer]) -> None:
    zero, _, sequencer = ordered
    waits = store(zero, zero.sessions.admit(key(zero), 1))  # a session batch waits for 0...
    data = body([30], 7, 5)  # ...a plain batch of the same client id behind it does not:
    plain = zero.get_cxl_buffer(TOPIC, BatchHeader(5, 7, 1, len(data)))
    plain.payload[:] = list(data)
    zero.complete(plain, scan_records(plain.payload, 1))
    assert [b.header_offset for b in sequencer.step(0)] == [plain.header_offset]
    store(zero, zero.sessions.admit(key(zero, client_id=8, token=1), 0))
    # Another session's batch goes too; the first goes once 0 is skipped.
    got = [b.header_offset for b in sequencer.step(SECOND)]
    assert len(got) == 2
    assert waits.header_offset in got


def plain(log: CxlLog, client_id: int, seq: int) -> None:
    """A batch of ``client_req = 0`` (one message), committed by ``log``'s broker."""
    data = body([30], client_id, seq)
    reservation = log.get_cxl_buffer(TOPIC, BatchHeader(seq, client_id, 1, len(data)))
    reservation.payload[:] = list(data)
    log.complete(reservation, scan_records(reservation.payload, 1))


def test_a_batch_never_ordered_is_marked_only_after_the_run_before_it(
    cxl_path: str, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batch_seq 1 of a session is skipped while on its way; broker 1 stores
    it after five plain batches and before a sixth. The step that orders them
    dies at every store in turn: whatever the store, the stream's ``ordered``
    words are set in its order (a 2 only once the run before it is written
    whole, as a restart and the disk writer need), and a new sequencer
    orders the six plain batches after the session's, the skipped one never."""
    crash_at = 0
    while True:
        zero, one = ordered_pair(cxl_path, clock)
        put(zero, 0)
        late = one.sessions.admit(key(one), 1)
        put(zero, 2)
        first = zero.sequencer(SECOND)
        first.step(0)
        first.step(SECOND)  # 1 is skipped
        first.close()
        for i in range(5):
            plain(one, 9, i)
        skipped = store(one, late).header_offset
        plain(one, 9, 5)
        crashed = dies_at(monkeypatch, zero, crash_at, (2 * SECOND,))
        index = zero.topics()[TOPIC]
        words = [
            h.ordered
            for _, h in iter_batches(zero.region, zero.geometry, index, 1)
            if h.batch_complete == BATCH_COMMITTED
        ]
        unset = words.index(0) if 0 in words else len(words)
        assert not any(words[unset:]), (crash_at, words)
        again = zero.sequencer(SECOND)
        again.step(2 * SECOND)
        del again
        assert U32.unpack_from(zero.region, skipped + BH_ORDERED)[0] == NEVER_ORDERED
        with open_log(zero.path) as reader:
            payloads = [m.payload for m in reader.ordered_messages(TOPIC)]
        assert payloads == [rawclient.payload_for(7, s, 30) for s in (0, 2)] + [
            rawclient.payload_for(9, i, 30) for i in range(6)
        ], crash_at
        quick_close(one)
        quick_close(zero)
        if not crashed:
            break
        crash_at += 1
    # Every store: the new sequencer's redo of the two "ordered" words before,
    # the run of five (headers, entries, the count, "ordered" words), the
    # skipped one's word, then the sixth's four (no record: its broker's).
    assert crash_at == CountingStruct.count == 2 + 3 * 5 + 1 + 1 + 4


def test_a_batch_never_ordered_stays_so_in_a_region_rebuilt_from_the_disk_log(
    cxl_path: str, clock: Clock, tmp_path: Path
) -> None:
    """A session batch stored after its batch_seq was skipped goes to the disk
    log with its ``ordered`` word 2 (as the ordered ones with theirs); a
    region lost and replayed gives the others their total orders back and
    keeps it out of the order."""
    directory = str(tmp_path / "disk")

    def open_both() -> tuple[list[CxlLog], list[DiskLog]]:
        logs = [open_small_log(cxl_path, broker_id=b, unit_size=4096) for b in (0, 1)]
        for log in logs:
            log.topic_order = lambda _topic: 5
            log.sessions.clock = clock
        return logs, [
            DiskLog.open(directory, log, sync_interval=0.001, sync_bytes=1) for log in logs
        ]

    def close_both(logs: list[CxlLog], disks: list[DiskLog], *sequencers: Sequencer) -> None:
        for each in (*sequencers, *disks):
            each.close()
        for log in logs:
            quick_close(log)

    (zero, one), disks = open_both()
    sequencer = zero.sequencer(SECOND)
    put(zero, 0)
    late = one.sessions.admit(key(one), 1)
    put(zero, 2)
    sequencer.step(0)
    sequencer.step(SECOND)  # 1 is skipped
    store(one, late)
    plain(one, 9, 0)
    sequencer.step(2 * SECOND)
    stamp(zero, one, topic=TOPIC)  # each broker, once its batches are ordered
    for disk in disks:
        sync(disk)
        assert disk.waiting_batches == 0  # every batch is on disk
    with open_log(cxl_path) as reader:
        before = [(m.offset, m.payload) for m in reader.ordered_messages(TOPIC)]
    assert [p for _, p in before] == [
        rawclient.payload_for(7, 0, 30),
        rawclient.payload_for(7, 2, 30),
        rawclient.payload_for(9, 0, 30),
    ]
    close_both([zero, one], disks, sequencer)
    os.unlink(cxl_path)  # the reboot

    (zero, one), disks = open_both()  # each replays its disk log
    sequencer = zero.sequencer(SECOND)
    try:
        assert len(sequencer.step(3 * SECOND)) == 3
        with open_log(cxl_path) as reader:
            assert [(m.offset, m.payload) for m in reader.ordered_messages(TOPIC)] == before
        index = zero.topics()[TOPIC]
        words = {
            (h.client_id, h.batch_seq): h.ordered
            for _, h in iter_batches(zero.region, zero.geometry, index, 1)
        }
        assert words == {(7, 1): NEVER_ORDERED, (9, 0): 1}
    finally:
        close_both([zero, one], disks, sequencer)


def test_claim_words_name_the_claimant() -> None:
    claim = Claim(entry=4, record=0, seq=9, token=1)
    assert claim.word == 5


def ordered_pair(cxl_path: str, clock: Clock) -> tuple[CxlLog, CxlLog]:
    """Brokers 0 and 1 on a new region, their topics of order 5."""
    zero = open_small_log(cxl_path, broker_id=0, unit_size=4096, reset=True)
    one = open_small_log(cxl_path, broker_id=1, unit_size=4096)
    for log in (zero, one):
        log.topic_order = lambda _topic: 5
        log.sessions.clock = clock
    return zero, one


def dies_at(
    monkeypatch: pytest.MonkeyPatch, log: CxlLog, crash_at: int, times: tuple[int, ...]
) -> bool:
    """A new sequencer of ``log``'s region steps at each of ``times`` and dies
    instead of its ``crash_at``-th store (counting its own and the session
    table's, numpy stores element by element); whether it died. Afterwards
    :attr:`CountingStruct.count` says how many stores it made."""
    with monkeypatch.context() as patched:
        for module in (sequencer_module, sessions_module):
            for name in ("U8", "U32", "U64", "HEAD", "INDEX_ENTRY", "SEGMENT_HEADER"):
                if hasattr(module, name):
                    patched.setattr(module, name, CountingStruct(getattr(module, name)))
        patched.setattr(sequencer_module, "_store", CountingStore())
        CountingStruct.count, CountingStruct.limit = 0, crash_at
        try:
            dying = log.sequencer(SECOND)
            for now in times:
                dying.step(now)
        except Crash:
            return True
        finally:
            CountingStruct.limit = -1
    return False


def test_a_sequencer_that_dies_at_any_store_orders_a_session_by_batch_seq_all_the_same(
    cxl_path: str, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batches 1, 3 of a session on broker 1, then 0, 2, 4 on broker 0, and 6
    after a gap (5 never comes): a step orders 0..4 by batch_seq across the
    two streams, and once 6 waited the hole timeout, skips 5 and orders 6.
    The sequencer dies at every store of that (its own and the table's) in
    turn, and a new one goes on from the region: the same order each time."""
    crash_at = 0
    while True:
        zero, one = ordered_pair(cxl_path, clock)
        for seq, log in ((1, one), (3, one), (0, zero), (2, zero), (4, zero), (6, zero)):
            put(log, seq)
        crashed = dies_at(monkeypatch, zero, crash_at, (0, SECOND))
        again = zero.sequencer(SECOND)  # started again: each step anew
        for now in (0, SECOND):
            again.step(now)
        del again
        assert ordered_seqs(zero) == [0, 1, 2, 3, 4, 6], crash_at
        assert zero.sessions.admit(key(zero), 5).verdict is Verdict.SKIPPED, crash_at
        quick_close(one)
        quick_close(zero)
        if not crashed:
            break
        crash_at += 1
    assert crash_at > 15  # it died at every store there is


def test_a_sequencer_that_dies_at_any_store_of_a_run_of_session_batches_goes_on_all_the_same(
    cxl_path: str, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batches 0..7 of a session on broker 0 are ordered as one run (numpy
    stores, one commit point, then the session's next batch_seq), 8 on
    broker 1 after them in the same step. The sequencer dies at every store
    of that step in turn (the run's element by element, and the table's); a
    new one redoes the run's ``ordered`` words and the session's next
    batch_seq from the region, so 8, and 9 sent since, are ordered at once:
    nothing waits for a batch_seq that is ordered, nothing is skipped."""
    crash_at = 0
    while True:
        zero, one = ordered_pair(cxl_path, clock)
        for seq in range(8):
            put(zero, seq)
        put(one, 8)
        assert 8 > sequencer_module._FEW_BATCHES  # a run of numpy stores
        crashed = dies_at(monkeypatch, zero, crash_at, (0,))
        put(one, 9)
        again = zero.sequencer(SECOND)  # at time 0: a held batch would still wait
        again.step(0)
        assert again.statistics().session_skips == 0, crash_at
        del again
        assert ordered_seqs(zero) == list(range(10)), crash_at
        entry = zero.sessions.entry_of(key(zero))
        assert entry is not None
        assert all(zero.sessions.state(entry, TOKEN, s).ordered for s in range(10)), crash_at
        quick_close(one)
        quick_close(zero)
        if not crashed:
            break
        crash_at += 1
    # It died at every store there is: the index's first segment (3), 8
    # batches' headers, entries, "ordered" words, the count and the
    # session's next batch_seq; then 8's (no record: their broker's).
    assert crash_at == CountingStruct.count == 3 + 3 * 8 + 2 + 5


def session_put(log: CxlLog, client_id: int, seq: int, *, commit: bool = True) -> Any:
    """Batch ``seq`` of ``client_id``'s session (one message whose client
    order is ``seq``), stored by ``log``'s broker."""
    claim = log.sessions.admit(key(log, client_id=client_id, token=client_id), seq).claim
    assert claim is not None
    data = body([30], client_id, seq)
    reservation = log.get_cxl_buffer(
        TOPIC, BatchHeader(seq, client_id, 1, len(data)), session=claim
    )
    reservation.payload[:] = list(data)
    if commit:
        log.complete(reservation, scan_records(reservation.payload, 1))
    return reservation


def total_order(log: CxlLog) -> list[tuple[int, int]]:
    """(client id, client order) of every ordered message, in total order,
    with total orders gap-free from 0 and each batch once."""
    with open_log(log.path) as reader:
        messages = list(reader.ordered_messages(TOPIC))
    assert [m.offset for m in messages] == list(range(len(messages)))
    return [(m.client_id, m.client_order) for m in messages]


def check_sessions(log: CxlLog, expected: dict[int, int]) -> list[tuple[int, int]]:
    """Every message of each client exactly once, in its client order (FIFO)."""
    got = total_order(log)
    for client_id, count in expected.items():
        assert [o for c, o in got if c == client_id] == list(range(count)), got
    assert len(got) == sum(expected.values()), got
    return got


def crossed(zero: CxlLog, one: CxlLog) -> None:
    """Two sessions spread over two brokers, each stream holding the later
    batch of one session before the earlier one of the other: broker 0
    [X1, Y0], broker 1 [Y1, X0]. In stream order alone, each waits for the
    other: a deadlock until the hole timeout."""
    session_put(zero, 7, 1)
    session_put(zero, 8, 0)
    session_put(one, 8, 1)
    session_put(one, 7, 0)


def test_crossed_sessions_on_two_brokers_are_ordered_at_once_without_a_skip(
    ordered: tuple[CxlLog, CxlLog, Sequencer],
) -> None:
    zero, one, sequencer = ordered
    crossed(zero, one)
    assert len(sequencer.step(0)) == 4  # no wait for the hole timeout
    got = check_sessions(zero, {7: 2, 8: 2})
    # X1 waited behind Y0, which went first; each session in batch_seq order.
    assert got.index((8, 0)) < got.index((7, 1))
    assert sequencer.statistics().session_skips == 0
    assert sequencer.statistics().lag_batches == 0


def test_batches_behind_a_waiting_session_batch_go_on_and_plain_ones_keep_their_order(
    ordered: tuple[CxlLog, CxlLog, Sequencer],
) -> None:
    """Broker 0: X1 (its X0 not there yet), then plain P0, another session's
    Z0, plain P1, X2. The walk orders P0, Z0, P1 past X1 and X2 (which waits
    for X1); X0 on broker 1 frees both, in batch_seq order."""
    zero, one, sequencer = ordered
    session_put(zero, 7, 1)
    plain(zero, 9, 0)
    session_put(zero, 8, 0)
    plain(zero, 9, 1)
    session_put(zero, 7, 2)
    assert len(sequencer.step(0)) == 3
    assert total_order(zero) == [(9, 0), (8, 0), (9, 1)]
    assert sequencer.statistics().lag_batches == 2  # X1 and X2 wait
    plain(zero, 9, 2)
    assert len(sequencer.step(SECOND // 2)) == 1  # still waiting, within the timeout
    session_put(one, 7, 0)
    assert len(sequencer.step(SECOND // 2)) == 3
    assert total_order(zero)[4:] == [(7, 0), (7, 1), (7, 2)]
    check_sessions(zero, {7: 3, 8: 1, 9: 3})
    assert sequencer.statistics().session_skips == 0


def test_a_deferred_session_batch_still_waits_at_most_the_hole_timeout(
    ordered: tuple[CxlLog, CxlLog, Sequencer],
) -> None:
    zero, _, sequencer = ordered
    session_put(zero, 7, 1)
    plain(zero, 9, 0)
    assert len(sequencer.step(0)) == 1
    plain(zero, 9, 1)
    assert len(sequencer.step(SECOND - 1)) == 1
    assert [b.header_offset for b in sequencer.step(SECOND)] != []  # 0 skipped, 1 ordered
    assert sequencer.statistics().session_skips == 1
    assert total_order(zero) == [(9, 0), (9, 1), (7, 1)]


def test_a_sequencer_that_dies_at_any_store_orders_crossed_sessions_the_same(
    cxl_path: str, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The crossed sessions and a plain batch behind each waiting one, then a
    session batch behind them: the steps that order them die at every store
    in turn; a new sequencer, from the region alone, orders every batch
    exactly once, each session in batch_seq order, none skipped, plain
    batches in their stream's order."""
    crash_at = 0
    while True:
        zero, one = ordered_pair(cxl_path, clock)
        plain(zero, 9, 0)
        first = zero.sequencer(SECOND)
        first.step(0)  # a run before: the new sequencer redoes its words
        first.close()
        session_put(zero, 7, 1)
        plain(zero, 9, 1)
        session_put(zero, 8, 0)
        session_put(one, 8, 1)
        plain(one, 10, 0)
        crashed = dies_at(monkeypatch, zero, crash_at, (0,))
        stores = CountingStruct.count
        session_put(one, 7, 0)  # arrives after: X1 was deferred
        session_put(zero, 7, 2)
        if not crashed:  # then at every store of the steps that order the rest
            crashed = dies_at(monkeypatch, zero, crash_at - stores, (0, 1))
        again = zero.sequencer(SECOND)
        again.step(0)
        again.close()
        got = check_sessions(zero, {7: 3, 8: 2, 9: 2, 10: 1})
        assert [o for c, o in got if c == 9] == [0, 1]
        assert again.statistics().session_skips == 0, crash_at
        quick_close(one)
        quick_close(zero)
        if not crashed:
            break
        crash_at += 1
    assert crash_at > 20
