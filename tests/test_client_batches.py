"""The publisher's sans-IO batch state, driven synchronously (no event loop)."""

from __future__ import annotations

import pytest

from trio_embarcadero.client.batches import (
    OPENED,
    PACKED,
    SEALED,
    PublishBatches,
    SealedBatch,
    SentBatches,
)
from trio_embarcadero.wire import (
    BATCH_HEADER_SIZE,
    BatchEncoder,
    encode_batch,
    padded_size,
    unpack_batch_header,
)

CLIENT = 4242
RECORD = padded_size(100)  # 192 bytes: a record of a 100-byte payload


def make(
    batch_bytes: int, window: int | None = None, *, release_on_send: bool = False
) -> PublishBatches:
    return PublishBatches(
        CLIENT,
        batch_bytes=batch_bytes,
        max_inflight_bytes=10 * batch_bytes if window is None else window,
        release_on_send=release_on_send,
    )


def send_all(batches: PublishBatches, sent: SentBatches | None = None) -> list[bytes]:
    """Every batch waiting, in order, as a sender would write it (on the
    connection ``sent`` keeps the books of)."""
    out: list[bytes] = []
    while (batch := batches.take()) is not None:
        if sent is not None:
            sent.add(batch)
        assert batch.data is not None
        out.append(bytes(batch.data))
        batches.mark_sent(batch)
    return out


def ack(batches: PublishBatches, sent: SentBatches, count: int) -> bool:
    """Take a connection's cumulative count; True if it acknowledged a batch."""
    return any([batches.acknowledge(batch) for batch in sent.ack(count)])


def payload(i: int, n: int) -> bytes:
    return bytes((i + k) % 251 for k in range(n))


def test_records_are_packed_as_encode_batch_packs_them() -> None:
    sizes = [0, 1, 63, 64, 65, 100, 1000]
    first = [payload(i, n) for i, n in enumerate(sizes)]
    second = [payload(50 + i, n) for i, n in enumerate(reversed(sizes))]
    batches = make(1 << 16)
    for p in first:
        batches.append(p)
    assert batches.seal()
    for p in second:
        batches.append(p)
    assert batches.seal()
    assert send_all(batches) == [
        encode_batch(first, client_id=CLIENT, batch_seq=0, first_order=0),
        encode_batch(second, client_id=CLIENT, batch_seq=1, first_order=len(first)),
    ]


def test_append_reports_opening_and_sealing_on_size() -> None:
    batches = make(3 * RECORD + RECORD // 2)  # room for three records and a half
    msg = bytes(100)
    assert batches.append(msg) == PACKED | OPENED
    assert batches.append(msg) == PACKED
    assert batches.append(msg) == PACKED
    assert batches.unsent == 0
    assert batches.open_count == 3
    # The fourth does not fit: the open batch is sealed and it opens the next.
    assert batches.append(msg) == PACKED | OPENED | SEALED
    assert batches.unsent == 1
    assert batches.open_count == 1
    sent = send_all(batches)
    assert len(sent) == 1
    header = unpack_batch_header(sent[0][:BATCH_HEADER_SIZE])
    assert (header.num_msg, header.total_size) == (3, 3 * RECORD)


def test_a_batch_filled_exactly_is_sealed_at_once() -> None:
    batches = make(2 * RECORD)
    assert batches.append(bytes(100)) == PACKED | OPENED
    assert batches.append(bytes(100)) == PACKED | SEALED
    assert batches.open_count == 0
    assert send_all(batches) == [encode_batch([bytes(100)] * 2, client_id=CLIENT)]


def test_seal_of_an_empty_batch_does_nothing() -> None:
    batches = make(1024)
    assert not batches.seal()
    assert batches.take() is None
    assert batches.batch_seq == 0


def test_a_message_larger_than_a_batch_travels_alone() -> None:
    small, big, after = b"small", payload(7, 5000), b"after"
    batches = make(4 * RECORD)
    assert batches.append(small) == PACKED | OPENED
    assert batches.append(big) == PACKED | OPENED | SEALED
    assert batches.unsent == 2  # the small one's batch, then the big one's
    assert batches.open_count == 0
    assert batches.append(after) == PACKED | OPENED
    batches.seal()
    assert send_all(batches) == [
        encode_batch([small], client_id=CLIENT, batch_seq=0, first_order=0),
        encode_batch([big], client_id=CLIENT, batch_seq=1, first_order=1),
        encode_batch([after], client_id=CLIENT, batch_seq=2, first_order=2),
    ]


def test_reused_buffers_carry_no_stale_bytes() -> None:
    batches = make(4 * RECORD)
    ones = [b"\xff" * 100] * 4
    for p in ones:
        batches.append(p)
    first = send_all(batches)  # sealed when full; its buffer is free again
    shorter = [b"\x01", b"\x02" * 3]
    for p in shorter:
        batches.append(p)
    batches.seal()
    assert first + send_all(batches) == [
        encode_batch(ones, client_id=CLIENT, batch_seq=0),
        encode_batch(shorter, client_id=CLIENT, batch_seq=1, first_order=4),
    ]


def test_batch_seq_counts_sealed_batches() -> None:
    batches = make(RECORD)  # one record per batch
    for i in range(5):
        assert batches.batch_seq == i
        assert batches.append(payload(i, 100)) == PACKED | OPENED | SEALED
    sent = send_all(batches)
    assert [unpack_batch_header(b[:BATCH_HEADER_SIZE]).batch_seq for b in sent] == list(range(5))
    assert batches.sent == batches.published == 5


def test_the_window_refuses_records_until_acks_release_whole_batches() -> None:
    batches = make(2 * RECORD, window=3 * RECORD)
    sent = SentBatches()
    msg = bytes(100)
    for _ in range(3):
        assert batches.append(msg) & PACKED
    assert batches.inflight_bytes == 3 * RECORD
    # Full: nothing is packed and nothing counted.
    assert batches.append(msg) == 0
    assert (batches.published, batches.open_count) == (3, 1)
    send_all(batches, sent)  # sending frees no window space while acks are due
    assert batches.append(msg) == 0
    # A count of 1 covers no whole batch (the first ends at message 2).
    assert not ack(batches, sent, 1)
    assert batches.acked == 0
    assert batches.inflight_bytes == 3 * RECORD
    assert batches.append(msg) == 0
    assert ack(batches, sent, 2)
    assert batches.acked == 2
    assert batches.inflight_bytes == RECORD
    assert batches.append(msg) == PACKED | SEALED
    assert batches.inflight_bytes == 2 * RECORD
    send_all(batches, sent)
    # Stale or repeated counts change nothing; counts past what was sent are
    # harmless.
    assert not ack(batches, sent, 2)
    assert ack(batches, sent, 99)
    assert batches.acked == batches.published == 4
    assert batches.inflight_bytes == 0
    assert batches.unacked == 0


def test_a_full_window_still_seals_the_batch_the_record_does_not_fit() -> None:
    # The sealed batch must reach the sender, or no ack would ever free room.
    batches = make(2 * RECORD + RECORD // 2, window=2 * RECORD + RECORD // 2)
    batches.append(bytes(100))
    batches.append(bytes(100))
    assert batches.append(bytes(100)) == SEALED
    assert batches.unsent == 1
    assert batches.open_count == 0
    assert batches.published == 2


def test_an_empty_window_takes_a_record_larger_than_it() -> None:
    batches = make(RECORD, window=RECORD)
    assert batches.append(bytes(1000)) == PACKED | OPENED | SEALED
    assert batches.inflight_bytes == padded_size(1000)
    assert batches.append(bytes(1)) == 0


@pytest.mark.parametrize("release_on_send", [False, True])
def test_ack_level_zero_releases_on_send(release_on_send: bool) -> None:
    batches = make(RECORD, window=2 * RECORD, release_on_send=release_on_send)
    batches.append(bytes(100))
    batches.append(bytes(100))
    send_all(batches)
    assert batches.sent == 2
    assert batches.inflight_bytes == (0 if release_on_send else 2 * RECORD)
    assert bool(batches.append(bytes(100)) & PACKED) is release_on_send


def pack(batches: PublishBatches, payloads: list[bytes]) -> None:
    """As ``publish_many`` packs: runs where it can, ``append`` for the rest."""
    index = 0
    while index < len(payloads):
        index = batches.append_run(payloads, index)
        if index < len(payloads):
            assert batches.append(payloads[index]) & PACKED
            index += 1


def test_append_run_packs_only_inside_an_open_batch_and_the_window() -> None:
    batches = make(40 * RECORD, window=30 * RECORD)
    payloads = [payload(i, 100) for i in range(60)]
    # An empty batch: its first record goes through append (it opens the batch).
    assert batches.append_run(payloads, 0) == 0
    assert batches.append(payloads[0]) == PACKED | OPENED
    # Then everything up to the window (30 records in all).
    assert batches.append_run(payloads, 1) == 30
    assert (batches.published, batches.inflight_bytes) == (30, 30 * RECORD)
    assert batches.append_run(payloads, 30) == 30
    assert batches.append(payloads[30]) == 0  # the window is full


def test_append_run_leaves_the_record_that_fills_a_batch_and_short_runs_to_append() -> None:
    batches = make(40 * RECORD)
    payloads = [payload(i, 100) for i in range(60)]
    assert batches.append(payloads[0]) == PACKED | OPENED
    assert batches.append_run(payloads, 1) == 39
    assert batches.open_count == 39
    assert batches.append(payloads[39]) == PACKED | SEALED
    assert batches.append(payloads[40]) == PACKED | OPENED
    assert batches.append_run(payloads[:50], 41) == 41  # 9 records: not worth a run
    pack(batches, payloads[41:])
    batches.seal()
    assert send_all(batches) == [
        encode_batch(payloads[:40], client_id=CLIENT, batch_seq=0),
        encode_batch(payloads[40:], client_id=CLIENT, batch_seq=1, first_order=40),
    ]


@pytest.mark.parametrize(
    "sizes",
    [[100] * 200, [0] * 50, [64] * 50, [1, 100, 63, 64, 65, 0, 1000] * 20, [5000, 100] * 20],
    ids=["100", "empty", "64", "mixed", "alternating"],
)
def test_runs_pack_the_bytes_append_packs_even_into_reused_buffers(sizes: list[int]) -> None:
    by_run = make(64 * RECORD, window=1 << 30)
    one_by_one = make(64 * RECORD, window=1 << 30)
    for batches in (by_run, one_by_one):
        # A first round of 0xff records leaves every buffer dirty, then free.
        pack(batches, [b"\xff" * 1000] * 20)
        batches.seal()
        send_all(batches)
    payloads = [payload(i, n) for i, n in enumerate(sizes)]
    pack(by_run, payloads)
    for p in payloads:
        one_by_one.append(p)
    by_run.seal()
    one_by_one.seal()
    runs = send_all(by_run)
    assert runs == send_all(one_by_one)
    assert b"".join(b[BATCH_HEADER_SIZE:] for b in runs) == b"".join(
        b[BATCH_HEADER_SIZE:] for b in [encode_batch(payloads, client_id=CLIENT, first_order=20)]
    )


@pytest.mark.parametrize("sizes", [[100] * 4, [100, 1, 100, 1]])
def test_the_encoder_packs_the_prefix_of_a_run_that_fits(sizes: list[int]) -> None:
    payloads = [payload(i, n) for i, n in enumerate(sizes)]
    # Room for three records after the first: max_bytes and the buffer both limit.
    for capacity, max_bytes in [(10 * RECORD, 3 * RECORD + 10), (4 * RECORD - 10, 1 << 20)]:
        encoder = BatchEncoder(CLIENT, BATCH_HEADER_SIZE + capacity)
        encoder.append(b"first", 0)
        assert encoder.append_run(payloads, 1, max_bytes) == 3
        assert encoder.append_run(payloads[3:], 4, 10) == 0
        assert encoder.append_run([], 4, 1 << 20) == 0
        buffer, length = encoder.seal(0)
        assert buffer[:length] == encode_batch([b"first", *payloads[:3]], client_id=CLIENT)


# -- keeping batches for a resend ------------------------------------------------------


def sealed(batches: PublishBatches, count: int, size: int = 100) -> None:
    """``count`` batches of one message each (the batch holds one record)."""
    for i in range(count):
        assert batches.append(payload(i, size)) & PACKED
        batches.seal()


def seqs(wire: list[bytes]) -> list[int]:
    return [unpack_batch_header(b[:BATCH_HEADER_SIZE]).batch_seq for b in wire]


def test_a_failed_connections_batches_go_again_first_with_their_batch_seq() -> None:
    batches = make(4 * RECORD)
    one, two = SentBatches(), SentBatches()
    sealed(batches, 6)
    # Batches 0, 2, 4 go out on one connection, 1, 3, 5 on the other.
    first: dict[int, bytes] = {}
    for n in range(6):
        batch = batches.take()
        assert batch is not None
        assert batch.seq == n
        (one if n % 2 == 0 else two).add(batch)
        assert batch.data is not None
        first[n] = bytes(batch.data)
        batches.mark_sent(batch)
    assert batches.sent == 6
    # The second connection's count covers its first batch; then it fails.
    assert ack(batches, two, 1)
    assert batches.acked == 0  # batch 0 (on the first connection) is not acked yet
    assert ack(batches, one, 1)
    assert batches.acked == 2  # 0 and 1, without a gap
    sealed(batches, 1)  # batch 6 waits
    batches.requeue(two.take_all())
    assert len(two) == 0
    assert batches.unsent == 3
    # Its unacked batches come again before the newer one, byte for byte.
    again = send_all(batches, one)
    assert seqs(again) == [3, 5, 6]
    assert again[:2] == [first[3], first[5]]
    assert batches.resent == 2
    assert batches.sent == 7  # a batch is counted once, however often it is sent
    # The first connection's counts now span its old and new batches.
    assert ack(batches, one, 2)  # batch 2
    assert batches.acked == 3
    assert ack(batches, one, 6)  # 4, 3, 5, 6
    assert batches.acked == batches.published == 7
    assert batches.inflight_bytes == 0


def test_requeue_merges_in_batch_seq_order_and_skips_acked_batches() -> None:
    batches = make(4 * RECORD)
    sealed(batches, 5)
    taken = [batches.take() for _ in range(4)]
    assert all(isinstance(b, SealedBatch) for b in taken)
    for batch in taken:
        assert batch is not None
        batches.mark_sent(batch)
    batches.requeue([t for t in taken[2:] if t is not None])  # 2, 3 ahead of 4
    assert taken[0] is not None
    assert batches.acknowledge(taken[0])
    batches.requeue([t for t in taken[:2] if t is not None])  # 1 merged before 2; 0 is acked
    assert [b.seq for b in iter(batches.take, None) if b is not None] == [1, 2, 3, 4]


def test_a_batch_kept_for_a_resend_small_as_a_copy_large_in_its_buffer() -> None:
    batches = make(8 * RECORD)
    for _ in range(2):
        batches.append(bytes(100))
    batches.seal()  # a quarter full
    for _ in range(8):
        batches.append(bytes(100))  # full: sealed
    small, big = batches.take(), batches.take()
    assert small is not None
    assert big is not None
    for batch in (small, big):
        batches.mark_sent(batch)
    # The small one is a copy of its own size; its buffer packs the next batch.
    assert isinstance(small.data, bytes)
    assert len(small.data) == BATCH_HEADER_SIZE + 2 * RECORD
    assert isinstance(big.data, memoryview)
    kept = bytes(big.data)
    batches.append(b"\xff" * 100)
    batches.seal()
    assert big.data == kept  # not reused while it may go again
    assert batches.acknowledge(big)
    assert big.data is None  # now it is


def test_an_ack_while_the_batch_is_written_keeps_its_bytes_until_the_write_is_over() -> None:
    batches = make(RECORD)
    sealed(batches, 1)
    sent = SentBatches()
    batch = batches.take()
    assert batch is not None
    assert batch.data is not None
    sent.add(batch)
    wire = bytes(batch.data)
    assert ack(batches, sent, 1)  # the count overtook the end of the write
    assert batches.acked == 1
    assert batch.data is not None
    assert bytes(batch.data) == wire
    batches.mark_sent(batch)
    assert batch.data is None


def test_ack_level_zero_sends_a_batch_again_only_if_its_write_failed() -> None:
    batches = make(RECORD, release_on_send=True)
    sealed(batches, 2)
    first = batches.take()
    assert first is not None
    batches.mark_sent(first, written=False)  # the connection broke mid-write
    assert batches.unacked == 0
    assert batches.sent == 0
    assert seqs(send_all(batches)) == [0, 1]
    assert batches.sent == 2
    assert batches.inflight_bytes == 0


def test_sent_batches_map_a_connections_counts_to_its_batches() -> None:
    batches = make(4 * RECORD)
    for n in (3, 1, 2):  # batches of 3, 1 and 2 messages
        for _ in range(n):
            batches.append(bytes(100))
        batches.seal()
    sent = SentBatches()
    for batch in iter(batches.take, None):
        assert batch is not None
        sent.add(batch)
    assert (len(sent), sent.count) == (3, 6)
    assert [b.seq for b in sent.ack(3)] == [0]
    assert sent.ack(3) == []
    assert [b.seq for b in sent.ack(5)] == [1]  # 5 ends inside the third
    assert [b.seq for b in sent.take_all()] == [2]
    assert len(sent) == 0


def test_a_sessions_window_holds_back_batches_too_far_ahead_of_the_oldest_unacked() -> None:
    batches = PublishBatches(
        CLIENT,
        batch_bytes=RECORD,
        max_inflight_bytes=1 << 20,
        release_on_send=False,
        max_unacked_batches=3,
    )
    sent = SentBatches()
    sealed(batches, 6)
    assert seqs(send_all(batches, sent)) == [0, 1, 2]  # 3 is 3 ahead of 0
    assert ack(batches, sent, 2)  # 0 and 1
    assert seqs(send_all(batches, sent)) == [3, 4]
    batches.requeue(sent.take_all())  # 2, 3, 4 again, and 5: the window is 2..4
    assert seqs(send_all(batches, sent)) == [2, 3, 4]
