"""The subscriber's sans-IO record decoder, against a plain reading of the spec.

:func:`spec_decode` walks a subscription stream one record at a time, as
section 7 of the wire protocol describes it; the decoder, which walks runs of
equal-sized records with numpy, must hand out the same messages, stop at the
same error and count the same skips, however the bytes are split into
receives and whichever of its three forms (copies, views, batches) is used.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from rawclient import committed, payload_for

from trio_embarcadero.client.records import (
    MAX_RECORD_BYTES,
    MessageBatch,
    RecordDecoder,
    make_message,
)
from trio_embarcadero.errors import BrokerError, ErrorCode, ProtocolError
from trio_embarcadero.wire import (
    BATCH_METADATA,
    BATCH_METADATA_VERSION,
    ERROR_FRAME_HEAD,
    ERROR_MARKER,
    MESSAGE_HEADER,
    Message,
)

U64 = struct.Struct("<Q")
# (payload, logical offset, client id, client order)
Decoded = tuple[bytes, int, int, int]


def record(payload: bytes, offset: int, *, order: int = 0, padded: int | None = None) -> bytes:
    return committed(payload, offset, client_order=order, padded=padded)


def ordered_record(payload: bytes, total_order: int) -> bytes:
    """A record of an ordered stream: numbered by its total order."""
    pad = (64 - len(payload) % 64) % 64
    head = MESSAGE_HEADER.pack(64 + len(payload) + pad, 0, 0, 0, total_order, 0, 9, len(payload))
    return head + payload + b"\0" * pad


def error_frame(code: int, text: str) -> bytes:
    data = text.encode()
    return ERROR_FRAME_HEAD.pack(ERROR_MARKER, code, len(data)) + data


def spec_decode(stream: bytes, position: int) -> tuple[list[Decoded], str | None, int, int]:
    """Messages, the error (``"frame N"`` or ``"records"``), skipped, position."""
    out: list[Decoded] = []
    skipped = 0
    pos = 0
    while len(stream) - pos >= 8:
        (padded,) = U64.unpack_from(stream, pos)
        if padded == ERROR_MARKER:
            if len(stream) - pos >= 16:
                _, code, length = ERROR_FRAME_HEAD.unpack_from(stream, pos)
                if len(stream) - pos - 16 >= length:
                    return out, f"frame {code}", skipped, position
            break
        if padded < 64 or padded % 64 or padded > MAX_RECORD_BYTES:
            return out, "records", skipped, position
        if len(stream) - pos < padded:
            break
        _, _, offset, _, _, order, client, size = MESSAGE_HEADER.unpack_from(stream, pos)
        # Offsets never go back; the decoder keeps them as int64.
        if size > padded - 64 or offset < position or offset >= 2**63:
            return out, "records", skipped, position
        skipped += offset - position
        data = pos + 64
        out.append((stream[data : data + size], offset, client, order))
        position = offset + 1
        pos += padded
    return out, None, skipped, position


def decode(
    stream: bytes, position: int, pieces: list[int], form: str, buffer_bytes: int = 4096
) -> tuple[list[Decoded], str | None, int, int]:
    """Feed ``stream`` to a decoder in receives of ``pieces`` bytes (cycled)."""
    decoder = RecordDecoder(position, buffer_bytes)
    out: list[Decoded] = []
    at = 0
    turn = 0
    while at < len(stream):
        room = decoder.receive_buffer()
        n = min(len(room), pieces[turn % len(pieces)], len(stream) - at)
        turn += 1
        room[:n] = stream[at : at + n]
        at += n
        got: Any
        if form == "copies":
            got = decoder.feed(n)
            assert all(type(m) is Message and type(m.payload) is bytes for m in got)
        elif form == "views":
            got = decoder.feed_views(n)
        else:
            batch = decoder.feed_batch(n)
            got = [] if batch is None else batch_messages(batch)
        # Views are read before the next receive_buffer() call.
        out.extend((bytes(m[0]), m[1], m[2], m[3]) for m in got)
    error = decoder.error
    kind = None
    if isinstance(error, BrokerError):
        kind = f"frame {error.code}"
    elif error is not None:
        assert isinstance(error, ProtocolError)
        assert error.code is ErrorCode.BAD_MESSAGE_RECORDS
        kind = "records"
    return out, kind, decoder.skipped, decoder.position


def batch_messages(batch: MessageBatch) -> list[Decoded]:
    """A batch's messages read through its arrays and ``data``."""
    assert len(batch) >= 1
    assert batch.first_offset == batch.offsets[0]
    assert batch.last_offset == batch.offsets[-1]
    data = bytes(batch.data)
    return [
        (data[start : start + size], offset, client, order)
        for start, size, offset, client, order in zip(
            batch.starts.tolist(),
            batch.sizes.tolist(),
            batch.offsets.tolist(),
            batch.client_ids.tolist(),
            batch.client_orders.tolist(),
            strict=True,
        )
    ]


@st.composite
def streams(draw: st.DrawFn) -> tuple[bytes, int]:
    """A subscription stream (runs of equal sizes, mixed sizes, offset jumps,
    now and then a corrupt record or an error frame) and its start offset."""
    start = draw(st.sampled_from([0, 7, 2**40]))
    offset = start
    out = bytearray()
    sizes = st.one_of(st.integers(0, 200), st.sampled_from([100, 100, 1024, 3000]))
    for i in range(draw(st.integers(0, 30))):
        count = draw(st.sampled_from([1, 1, 2, 5, 30]))
        size = draw(sizes)
        for _ in range(count):
            kind = draw(st.sampled_from(["ok"] * 30 + ["jump", "back", "padded", "size", "huge"]))
            if kind == "jump":
                offset += draw(st.integers(1, 1000))
            elif kind == "back":
                offset = max(0, offset - draw(st.integers(1, 3)))
            payload = payload_for(9, i, size)
            if kind == "padded":
                out += record(
                    payload, offset, order=i, padded=draw(st.sampled_from([0, 65, 2**40]))
                )
            elif kind == "size":  # larger than paddedSize allows, or beyond 2**63
                bad = draw(st.sampled_from([size + 64, 2**63 + size, 2**64 - 1]))
                out += record(payload, offset, order=i)[:56] + U64.pack(bad)
                out += payload.ljust(-(-size // 64) * 64, b"\0")
            elif kind == "huge":
                out += record(payload, 2**63 + offset, order=i)
            else:
                out += record(payload, offset, order=i)
            offset += 1
    if draw(st.booleans()):
        out += error_frame(5, "broker shutting down")
    return bytes(out), start


@settings(max_examples=200, deadline=None)
@given(
    case=streams(),
    # Receives cycle through these sizes: parts of a header, of a record, many records.
    pieces=st.lists(
        st.sampled_from([1, 7, 64, 200, 1000, 4096, 65536]), min_size=1, max_size=4
    ).filter(lambda pieces: max(pieces) > 7),
    form=st.sampled_from(["copies", "views", "batches"]),
)
@example(case=(record(b"x" * 100, 0) * 50, 0), pieces=[1 << 20], form="batches")
def test_the_decoder_reads_streams_as_the_spec_does(
    case: tuple[bytes, int], pieces: list[int], form: str
) -> None:
    stream, start = case
    assert decode(stream, start, pieces, form) == spec_decode(stream, start)


def test_a_batch_holds_one_receive_without_copying() -> None:
    payloads = [payload_for(3, i, 100) for i in range(10)] + [b"", b"y" * 700]
    stream = b"".join(record(p, 20 + i, order=i) for i, p in enumerate(payloads))
    decoder = RecordDecoder(20, 4096)
    room = decoder.receive_buffer()
    room[: len(stream)] = stream
    batch = decoder.feed_batch(len(stream))
    assert batch is not None
    assert len(batch) == len(payloads)
    assert (batch.first_offset, batch.last_offset) == (20, 31)
    assert batch.payload_bytes == sum(map(len, payloads))
    assert bytes(batch.data) == stream  # records exactly as they arrived
    assert batch.data.readonly
    assert np.shares_memory(np.frombuffer(batch.data, np.uint8), np.frombuffer(room, np.uint8))
    assert [bytes(batch.payload(i)) for i in range(len(batch))] == payloads
    assert [m.payload for m in batch.messages()] == payloads
    assert [bytes(v.payload) for v in batch.views()] == payloads
    assert batch.messages() == [m.to_message() for m in batch.views()]
    tail = batch.since(29)
    assert [m.payload for m in tail.messages()] == payloads[9:]
    assert tail.first_offset == 29
    assert list(map(make_message, batch.message_fields())) == batch.messages()
    assert "12 messages, offsets 20..31" in repr(batch)


def test_one_large_record_is_copied_once_into_its_message() -> None:
    payload = payload_for(1, 0, 300_000)
    decoder = RecordDecoder(0, 4096)
    stream = record(payload, 0)
    at = 0
    messages: list[Message] = []
    while at < len(stream):
        room = decoder.receive_buffer()
        n = min(len(room), len(stream) - at)
        room[:n] = stream[at : at + n]
        at += n
        messages += decoder.feed(n)
    assert [m.payload for m in messages] == [payload]


@pytest.mark.parametrize(
    ("stream", "message"),
    [
        (
            record(b"a", 5) + record(b"b", 5),
            "record with logical offset 5 and size 1 (paddedSize 128) where offset 6 was due",
        ),
        (
            record(b"a", 5) + record(b"b", 4),
            "record with logical offset 4 and size 1 (paddedSize 128) where offset 6 was due",
        ),
        (
            record(b"a", 5) + record(b"b", 6)[:56] + U64.pack(65) + bytes(64),
            "record with logical offset 6 and size 65 (paddedSize 128) where offset 6 was due",
        ),
        (
            record(b"a", 5) + record(b"b", 6, padded=96),
            "record at offset 6 has paddedSize 96",
        ),
    ],
)
def test_a_bad_record_ends_the_stream_after_the_messages_before_it(
    stream: bytes, message: str
) -> None:
    decoder = RecordDecoder(5, 4096)
    room = decoder.receive_buffer()
    room[: len(stream)] = stream
    assert [m.payload for m in decoder.feed(len(stream))] == [b"a"]
    assert isinstance(decoder.error, ProtocolError)
    assert decoder.error.code is ErrorCode.BAD_MESSAGE_RECORDS
    assert message in str(decoder.error)
    room = decoder.receive_buffer()
    room[:128] = record(b"c", 7)
    assert decoder.feed(128) == []  # nothing after the error is decoded


def test_a_jump_forward_counts_as_skipped() -> None:
    stream = record(b"a", 3) + record(b"b", 10) + record(b"c", 11) + record(b"d", 15)
    decoder = RecordDecoder(0, 4096)
    room = decoder.receive_buffer()
    room[: len(stream)] = stream
    assert [m.offset for m in decoder.feed(len(stream))] == [3, 10, 11, 15]
    assert decoder.skipped == 3 + 6 + 3
    assert decoder.position == 16
    assert decoder.error is None


@pytest.mark.parametrize("size", [0, 1, 63, 64, 100, 1024])
def test_equal_sized_messages_are_copied_whole_from_their_strided_records(size: int) -> None:
    # Equal sizes at equal distances take numpy's strided copy; trailing zero
    # bytes and empty payloads must come out exactly as sent.
    payloads = [(bytes([i % 256]) + b"\0" * size)[:size] for i in range(300)]
    stream = b"".join(record(p, 7 + i, order=i) for i, p in enumerate(payloads))
    decoder = RecordDecoder(7, len(stream))
    room = decoder.receive_buffer()
    room[: len(stream)] = stream
    batch = decoder.feed_batch(len(stream))
    assert batch is not None
    expected = spec_decode(stream, 7)[0]
    messages = batch.messages()
    assert [tuple(m) for m in messages] == expected
    assert all(type(m) is Message and type(m.payload) is bytes for m in messages)
    assert list(batch.iter_messages()) == messages
    assert [m.payload for m in batch.since(100).messages()] == payloads[93:]


def test_equal_sizes_at_unequal_distances_are_copied_one_by_one() -> None:
    # An ordered stream puts a BatchMetadata between batches: equal sizes, but
    # the records are not evenly spaced.
    payloads = [bytes([i]) * 40 for i in range(6)]
    stream = (
        BATCH_METADATA.pack(0, 3, BATCH_METADATA_VERSION, 0)
        + b"".join(ordered_record(p, i) for i, p in enumerate(payloads[:3]))
        + BATCH_METADATA.pack(3, 3, BATCH_METADATA_VERSION, 0)
        + b"".join(ordered_record(p, 3 + i) for i, p in enumerate(payloads[3:]))
    )
    decoder = RecordDecoder(0, len(stream), ordered=True)
    room = decoder.receive_buffer()
    room[: len(stream)] = stream
    batch = decoder.feed_batch(len(stream))
    assert batch is not None
    assert decoder.error is None
    assert [m.payload for m in batch.messages()] == payloads
    assert [m.offset for m in batch.iter_messages()] == list(range(6))


def own_frame(first_offset: int, total_order: int, count: int, size: int = 10) -> bytes:
    """One batch of an order-5 topic's client_req 1 stream: its
    BatchMetadata, then records with logical offsets and total orders."""
    records = b""
    for i in range(count):
        head = MESSAGE_HEADER.pack(128, 0, first_offset + i, 0, total_order + i, i, 9, size)
        records += head + bytes([first_offset + i]) * size + b"\0" * (64 - size)
    return BATCH_METADATA.pack(total_order, count, BATCH_METADATA_VERSION, 0) + records


def feed_all(
    decoder: RecordDecoder, stream: bytes, piece: int
) -> tuple[list[MessageBatch], list[bytes]]:
    """The batches fed ``stream`` in receives of ``piece`` bytes gives, and
    their payloads (read before the next receive reuses the buffer)."""
    batches = []
    payloads = []
    for at in range(0, len(stream), piece):
        chunk = stream[at : at + piece]
        decoder.receive_buffer()[: len(chunk)] = chunk
        batch = decoder.feed_batch(len(chunk))
        if batch is not None:
            batches.append(batch)
            payloads += [batch.payload(i).tobytes() for i in range(len(batch))]
    return batches, payloads


@pytest.mark.parametrize("piece", [1, 7, 100, 10_000])
def test_one_brokers_order_5_stream_is_told_by_its_framing_and_resumes_below_a_gap(
    piece: int,
) -> None:
    """Batches in total order: offsets 0-2, 6-8, 9-11, then 3-5 (ordered
    after the later ones). A break after 6-8: the position is 3, the lowest
    not received; the stream sent again from 3 repeats 6-8, which is dropped."""
    decoder = RecordDecoder(0, 4096)
    first = own_frame(0, 0, 3) + own_frame(6, 3, 3)
    got, _ = feed_all(decoder, first, piece)
    assert decoder.framed is True
    assert [int(o) for b in got for o in b.offsets] == [0, 1, 2, 6, 7, 8]
    assert decoder.position == 3
    decoder.restart()
    again = own_frame(6, 3, 3) + own_frame(9, 6, 3) + own_frame(3, 9, 3)
    got, payloads = feed_all(decoder, again, piece)
    offsets = [int(o) for b in got for o in b.offsets]
    assert offsets == [9, 10, 11, 3, 4, 5]
    assert payloads == [bytes([o]) * 10 for o in offsets]
    assert (decoder.position, decoder.skipped, decoder.error) == (12, 0, None)
    if piece == 10_000:  # one receive: both batches in one MessageBatch
        (whole,) = got
        assert [int(o) for o in whole.since(3).offsets] == [3, 4, 5]


def test_a_plain_stream_stays_unframed() -> None:
    decoder = RecordDecoder(0, 4096)
    got, _ = feed_all(decoder, record(b"x", 0) + record(b"y", 1), 1)
    assert decoder.framed is False
    assert [int(o) for b in got for o in b.offsets] == [0, 1]
