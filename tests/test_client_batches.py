"""The publisher's sans-IO batch state, driven synchronously (no event loop)."""

from __future__ import annotations

import pytest

from trio_embarcadero.client.batches import OPENED, PACKED, SEALED, PublishBatches
from trio_embarcadero.wire import (
    BATCH_HEADER_SIZE,
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


def send_all(batches: PublishBatches) -> list[bytes]:
    """Every sealed batch, in order, as the sender would write it."""
    out: list[bytes] = []
    while (data := batches.next_unsent()) is not None:
        out.append(bytes(data))
        batches.mark_sent()
    return out


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
    assert batches.next_unsent() is None
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
    msg = bytes(100)
    for _ in range(3):
        assert batches.append(msg) & PACKED
    assert batches.inflight_bytes == 3 * RECORD
    # Full: nothing is packed and nothing counted.
    assert batches.append(msg) == 0
    assert (batches.published, batches.open_count) == (3, 1)
    send_all(batches)  # sending frees no window space while acks are due
    assert batches.append(msg) == 0
    # Ack 1 covers no whole batch (the first ends at message 2).
    assert batches.ack(1)
    assert batches.acked == 1
    assert batches.inflight_bytes == 3 * RECORD
    assert batches.append(msg) == 0
    assert batches.ack(2)
    assert batches.inflight_bytes == RECORD
    assert batches.append(msg) == PACKED | SEALED
    assert batches.inflight_bytes == 2 * RECORD
    # Stale or repeated counts change nothing; counts past published are capped.
    assert not batches.ack(2)
    assert batches.ack(99)
    assert batches.acked == batches.published == 4
    assert batches.inflight_bytes == 0


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


def test_append_many_packs_runs_and_stops_where_append_has_news() -> None:
    batches = make(3 * RECORD, window=4 * RECORD)
    payloads = [payload(i, 100) for i in range(6)]
    remaining = iter(payloads)
    # The first record opens a batch: reported (packed) at once.
    assert batches.append_many(remaining) == (PACKED | OPENED, payloads[0])
    # Then a run up to the record that fills the batch and seals it.
    assert batches.append_many(remaining) == (PACKED | SEALED, payloads[2])
    assert batches.append_many(remaining) == (PACKED | OPENED, payloads[3])
    # The fifth does not fit the window: handed back, not packed.
    assert batches.append_many(remaining) == (0, payloads[4])
    assert batches.published == 4
    assert batches.ack(3)
    assert batches.append(payloads[4]) == PACKED
    assert batches.append_many(remaining) == (PACKED | SEALED, payloads[5])
    assert batches.append_many(remaining) is None
    assert send_all(batches) == [
        encode_batch(payloads[:3], client_id=CLIENT, batch_seq=0),
        encode_batch(payloads[3:], client_id=CLIENT, batch_seq=1, first_order=3),
    ]
