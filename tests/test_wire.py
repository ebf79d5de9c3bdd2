"""Byte layouts of the wire protocol: handshake, batch header, message records, acks."""

from __future__ import annotations

import struct

import numpy as np
import numpy.typing as npt
import pytest
import rawclient
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_embarcadero import wire
from trio_embarcadero.errors import ErrorCode, ProtocolError
from trio_embarcadero.wire import (
    ERROR_MARKER,
    MAX_ERROR_TEXT,
    AckCount,
    AckDecoder,
    BatchHeader,
    ClientRequest,
    ErrorFrame,
    Handshake,
    encode_ack,
    encode_ack_start,
    encode_error_frame,
    encode_message,
    encode_topic,
    padded_size,
    parse_batch_header,
    parse_handshake,
    scan_records,
    stamp_records,
    unpack_batch_header,
)

MAX_BATCH = 1 << 20


def raw_handshake(
    *,
    client_id: int = 1,
    ack: int = 1,
    num_msg: int = 0,
    last_addr: int = 0,
    port: int = 0,
    req: int = 0,
    topic: bytes = b"topic",
) -> bytes:
    return rawclient.HANDSHAKE.pack(
        client_id, ack, num_msg, last_addr, port, req, topic.ljust(32, b"\0")
    )


def rejection(data: bytes) -> str:
    with pytest.raises(ProtocolError) as info:
        parse_handshake(data)
    assert info.value.code is ErrorCode.BAD_HANDSHAKE
    return info.value.message


# -- handshake -----------------------------------------------------------------------


def test_handshake_round_trip() -> None:
    hs = Handshake(
        client_id=0xDEADBEEF,
        ack=2,
        num_msg=2**64 - 1,
        last_addr=123456789,
        port=65535,
        request=ClientRequest.SUBSCRIBE,
        topic="Ab.9_z-" + "x" * 24,
    )
    data = hs.encode()
    assert len(data) == 64
    assert parse_handshake(data) == hs
    assert parse_handshake(bytearray(data)) == hs
    assert parse_handshake(memoryview(data)) == hs


def test_handshake_matches_the_spec_layout() -> None:
    # rawclient packs from the spec, independently of the package.
    spec = rawclient.handshake("orders", client_id=9, ack=1, port=4242, req=0, last_addr=77)
    parsed = parse_handshake(spec)
    assert parsed == Handshake(
        client_id=9,
        ack=1,
        num_msg=0,
        last_addr=77,
        port=4242,
        request=ClientRequest.PUBLISH,
        topic="orders",
    )
    assert parsed.encode() == spec
    assert spec[:4] == (9).to_bytes(4, "little")
    assert spec[32:38] == b"orders"


@pytest.mark.parametrize("length", [0, 1, 63, 65, 128])
def test_handshake_of_wrong_length_is_rejected(length: int) -> None:
    data = (raw_handshake() * 3)[:length]
    assert rejection(data) == f"handshake is {length} bytes, want 64"


@pytest.mark.parametrize("req", [4, 5, 0xFFFFFFFF])
def test_unknown_request_is_rejected(req: int) -> None:
    assert rejection(raw_handshake(req=req)) == f"unknown client_req {req}"


def test_a_session_handshake_needs_acks_and_a_token() -> None:
    parsed = parse_handshake(raw_handshake(req=2, ack=2, last_addr=2**64 - 1))
    assert (parsed.request, parsed.last_addr) == (ClientRequest.PUBLISH_SESSION, 2**64 - 1)
    assert rejection(raw_handshake(req=2, ack=0, last_addr=5)) == (
        "a publish session (client_req 2) needs acks (ack 1 or 2) to know what to resend"
    )
    assert rejection(raw_handshake(req=2, ack=1, last_addr=0)) == (
        "a publish session (client_req 2) needs its token in last_addr: a random non-zero "
        "64-bit number drawn when the session begins"
    )
    # A plain publish keeps ignoring last_addr, acks or none.
    assert parse_handshake(raw_handshake(req=0, ack=0, last_addr=0)).ack == 0


@pytest.mark.parametrize("ack", [3, 4, 0xFFFFFFFF])
def test_ack_level_above_2_is_rejected(ack: int) -> None:
    assert rejection(raw_handshake(ack=ack)) == f"ack level {ack} is above 2"


@pytest.mark.parametrize("ack", [0, 1, 2])
def test_ack_levels_0_to_2_are_accepted(ack: int) -> None:
    assert parse_handshake(raw_handshake(ack=ack)).ack == ack


def test_port_above_65535_is_rejected() -> None:
    assert rejection(raw_handshake(port=65536)) == "ack port 65536 is not a TCP port"
    assert rejection(raw_handshake(port=0xFFFFFFFF)).startswith("ack port 4294967295")
    assert parse_handshake(raw_handshake(port=65535)).port == 65535


@pytest.mark.parametrize(
    "topic",
    [
        b"",  # empty
        b"\0abc",  # name starts with NUL
        b"a" * 32,  # 32 bytes, no terminating NUL
        b"with space",
        b"slash/name",
        b"caf\xc3\xa9",  # non-ASCII
        b"\xff",
        b"abc\0x",  # garbage after the NUL
        b"abc\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\x01",
    ],
)
def test_bad_topics_are_rejected(topic: bytes) -> None:
    assert rejection(raw_handshake(topic=topic)).startswith("invalid topic ")


@pytest.mark.parametrize("topic", ["a", "A-Z.a_z-0.9", "x" * 31])
def test_good_topics_are_accepted(topic: str) -> None:
    assert parse_handshake(raw_handshake(topic=topic.encode())).topic == topic
    assert encode_topic(topic) == topic.encode().ljust(32, b"\0")


@pytest.mark.parametrize("topic", ["", "x" * 32, "a b", "é", "a\0"])
def test_encode_topic_refuses_invalid_names(topic: str) -> None:
    with pytest.raises(ValueError, match="invalid topic name"):
        encode_topic(topic)


# -- batch header ----------------------------------------------------------------------


def raw_batch_header(num_msg: int, total_size: int, seq: int = 5, client_id: int = 3) -> bytes:
    return rawclient.BATCH_HEADER.pack(seq, client_id, num_msg, 0, 0, 0, 0, total_size, 0, 0, 0, 0)


def test_batch_header_round_trip_with_broker_fields() -> None:
    h = BatchHeader(
        batch_seq=2**64 - 2,
        client_id=7,
        num_msg=3,
        total_size=4096,
        batch_complete=1,
        broker_id=31,
        ordered=1,
        start_logical_offset=1000,
        log_idx=2**40,
        total_order=12,
        batch_off_to_export=13,
    )
    data = h.encode()
    assert len(data) == 128
    assert unpack_batch_header(data) == h
    # The spec's layout, field by field.
    fields = rawclient.BATCH_HEADER.unpack(data)
    assert fields == (2**64 - 2, 7, 3, 1, 31, 1, 0, 4096, 1000, 2**40, 12, 13)
    assert data[72:] == bytes(56)


def test_batch_header_from_the_spec_client_parses() -> None:
    data = raw_batch_header(num_msg=4, total_size=1024)
    h = parse_batch_header(data, MAX_BATCH)
    assert (h.batch_seq, h.client_id, h.num_msg, h.total_size) == (5, 3, 4, 1024)
    assert h.batch_complete == h.broker_id == h.start_logical_offset == 0


@pytest.mark.parametrize(
    ("num_msg", "total_size", "why"),
    [
        (1, 0, "total_size 0 is not in 1..1048576"),
        (1, MAX_BATCH + 64, f"total_size {MAX_BATCH + 64} is not in 1..1048576"),
        (1, 2**64 - 64, f"total_size {2**64 - 64} is not in 1..1048576"),
        (1, 100, "total_size 100 is not a multiple of 64"),
        (1, 65, "total_size 65 is not a multiple of 64"),
        (0, 128, "num_msg 0 cannot fill total_size 128"),
        (3, 128, "num_msg 3 cannot fill total_size 128"),
        (2**32 - 1, 1024, f"num_msg {2**32 - 1} cannot fill total_size 1024"),
    ],
)
def test_bad_batch_headers_are_rejected(num_msg: int, total_size: int, why: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_batch_header(raw_batch_header(num_msg, total_size), MAX_BATCH)
    assert info.value.code is ErrorCode.BAD_BATCH_HEADER
    assert info.value.message == f"batch 5: {why}"


def test_a_batch_header_must_name_the_handshakes_client() -> None:
    data = raw_batch_header(num_msg=4, total_size=1024, client_id=3)
    assert parse_batch_header(data, MAX_BATCH, client_id=3).client_id == 3
    with pytest.raises(ProtocolError) as info:
        parse_batch_header(data, MAX_BATCH, client_id=4)
    assert info.value.code is ErrorCode.BAD_BATCH_HEADER
    assert info.value.message == (
        "batch 5: client_id 3 is not this publisher's (4, from its handshake)"
    )


@pytest.mark.parametrize(
    ("num_msg", "total_size"), [(1, 64), (1, MAX_BATCH), (MAX_BATCH // 64, MAX_BATCH), (2, 128)]
)
def test_batch_header_limits_are_inclusive(num_msg: int, total_size: int) -> None:
    h = parse_batch_header(raw_batch_header(num_msg, total_size), MAX_BATCH)
    assert (h.num_msg, h.total_size) == (num_msg, total_size)


# -- message records -----------------------------------------------------------------------


def build(sizes: list[int], client_id: int = 4) -> bytearray:
    """Records of these payload sizes, as the spec client writes them."""
    return bytearray(
        b"".join(
            rawclient.record(rawclient.payload_for(client_id, i, n), i, client_id)
            for i, n in enumerate(sizes)
        )
    )


def as_array(data: bytes | bytearray) -> npt.NDArray[np.uint8]:
    return np.frombuffer(bytearray(data), dtype=np.uint8)


def put_word(data: bytearray, offset: int, value: int) -> None:
    struct.pack_into("<Q", data, offset, value)


def reference_scan(
    data: bytes | bytearray, num_msg: int, client_id: int | None = None
) -> list[int] | None:
    """Plain-Python walk of a payload; None where the spec says it is invalid."""
    starts: list[int] = []
    pos = 0
    while pos < len(data):
        padded = struct.unpack_from("<Q", data, pos)[0]
        size = struct.unpack_from("<Q", data, pos + 56)[0]
        if padded < 64 or padded % 64 or pos + padded > len(data):
            return None
        if padded != 64 + -(-size // 64) * 64:
            return None
        if client_id is not None and struct.unpack_from("<Q", data, pos + 48)[0] != client_id:
            return None
        starts.append(pos)
        pos += padded
    return starts if len(starts) == num_msg else None


def scan(data: bytes | bytearray, num_msg: int) -> list[int]:
    return [int(s) for s in scan_records(as_array(data), num_msg)]


def bad_records(data: bytes | bytearray, num_msg: int) -> str:
    with pytest.raises(ProtocolError) as info:
        scan_records(as_array(data), num_msg)
    assert info.value.code is ErrorCode.BAD_MESSAGE_RECORDS
    return info.value.message


@pytest.mark.parametrize(
    ("payload", "padded"), [(0, 64), (1, 128), (63, 128), (64, 128), (65, 192)]
)
def test_padded_size(payload: int, padded: int) -> None:
    assert padded_size(payload) == padded
    assert len(rawclient.record(b"x" * payload, 0, 0)) == padded
    assert encode_message(b"x" * payload, 0, 0) == rawclient.record(b"x" * payload, 0, 0)


def test_a_1_kib_message_occupies_1088_bytes() -> None:
    assert padded_size(1024) == 1088


def test_uniform_batch() -> None:
    data = build([1024] * 50)
    assert scan(data, 50) == list(range(0, 50 * 1088, 1088))


def test_single_record_batch() -> None:
    assert scan(build([0]), 1) == [0]
    assert scan(build([5000]), 1) == [0]


def test_mixed_sizes_with_runs() -> None:
    sizes = [0, 1, 63, 64, 65, 65, 65, 0, 0, 1000, 1, 1, 64, 63, 0]
    data = build(sizes)
    expected = reference_scan(data, len(sizes))
    assert expected is not None
    assert scan(data, len(sizes)) == expected


def test_runs_longer_than_one_comparison_window() -> None:
    # 700 records of one size, then others: the run check looks ahead in windows.
    sizes = [10] * 700 + [200] + [10] * 300 + [0] * 257
    data = build(sizes)
    assert scan(data, len(sizes)) == reference_scan(data, len(sizes))


def test_uniform_padded_sizes_but_a_bad_size_field_in_the_middle() -> None:
    data = build([100] * 10)
    put_word(data, 5 * 192 + 56, 10)  # size 10 needs paddedSize 128, record says 192
    assert bad_records(data, 10) == "record 5 at byte 960: size 10 does not match paddedSize 192"


@pytest.mark.parametrize("record", [0, 3, 9])
def test_padded_size_zero(record: int) -> None:
    data = build([100] * 10)
    put_word(data, record * 192, 0)
    message = bad_records(data, 10)
    assert f"at byte {record * 192}: paddedSize 0 is not a multiple of 64" in message


@pytest.mark.parametrize("value", [1, 63, 130, 200, 65])
def test_padded_size_not_a_multiple_of_64(value: int) -> None:
    data = build([0, 100, 0])
    put_word(data, 64, value)
    assert f"record 1 at byte 64: paddedSize {value} is not a multiple of 64" in bad_records(
        data, 3
    )


@pytest.mark.parametrize("value", [320, 64 * 1024, 2**63])
def test_padded_size_beyond_the_end(value: int) -> None:
    data = build([0, 100, 0])  # 64 + 192 + 64 bytes; record 1 has 256 bytes left
    put_word(data, 64, value)
    assert bad_records(data, 3) == (
        f"record 1 at byte 64: paddedSize {value} is not a multiple of 64 in 64..256"
    )


def test_padded_size_swallowing_the_rest() -> None:
    data = build([0, 100, 0])
    put_word(data, 64, 256)  # record 1 now ends at the payload's end: one record short
    assert bad_records(data, 3) == (
        "payload holds 2 records in 320 bytes, header says 3 records in 320 bytes"
    )


def overrunning_batch() -> bytearray:
    data = build([100, 100, 0])  # 448 bytes; the last record claims 192, 64 remain
    put_word(data, 384, 192)
    put_word(data, 384 + 56, 100)
    return data


def test_last_record_overruns_the_payload() -> None:
    assert reference_scan(overrunning_batch(), 3) is None
    bad_records(overrunning_batch(), 3)


def test_overrunning_record_is_named() -> None:
    assert bad_records(overrunning_batch(), 3) == (
        "record 2 at byte 384: paddedSize 192 is not a multiple of 64 in 64..64"
    )


@pytest.mark.parametrize(
    ("size", "padded"),
    [(10, 192), (0, 128), (65, 128), (64, 64), (1, 64), (2**64 - 1, 128), (2**63, 192)],
)
def test_size_inconsistent_with_padded_size(size: int, padded: int) -> None:
    data = build([0, padded - 64, 0])  # record 1 is `padded` bytes
    put_word(data, 64 + 56, size)
    assert bad_records(data, 3) == (
        f"record 1 at byte 64: size {size} does not match paddedSize {padded}"
    )


MIXED_SIZES = [0, 100, 100, 100, 1000, 5, 5, 64]


@pytest.mark.parametrize("sizes", [[100] * 10, MIXED_SIZES], ids=["uniform", "mixed"])
def test_records_must_name_the_handshakes_client(sizes: list[int]) -> None:
    data = build(sizes, client_id=4)
    starts = reference_scan(data, len(sizes))
    assert starts is not None
    assert scan_records(as_array(data), len(sizes), client_id=4).tolist() == starts
    for record in (0, 3, len(sizes) - 1):
        for other in (5, 0, 4 + 2**32, 2**64 - 1):  # the field is 64 bits on the wire
            bad = bytearray(data)
            put_word(bad, starts[record] + 48, other)
            with pytest.raises(ProtocolError) as info:
                scan_records(as_array(bad), len(sizes), client_id=4)
            assert info.value.code is ErrorCode.BAD_MESSAGE_RECORDS
            assert info.value.message == (
                f"record {record} at byte {starts[record]}: client_id {other} is not this "
                "publisher's (4, from its handshake)"
            )
            # Readers of the log do not ask; the records are well-formed.
            assert scan(bad, len(sizes)) == starts


def test_the_first_bad_record_is_named_whatever_is_wrong_with_it() -> None:
    data = build([100] * 10, client_id=4)
    put_word(data, 2 * 192 + 48, 5)  # record 2: another client
    put_word(data, 6 * 192 + 56, 10)  # record 6: size 10 in 192 bytes
    with pytest.raises(ProtocolError) as info:
        scan_records(as_array(data), 10, client_id=4)
    assert info.value.message.startswith("record 2 at byte 384: client_id 5 ")
    put_word(data, 2 * 192 + 48, 4)
    with pytest.raises(ProtocolError) as info:
        scan_records(as_array(data), 10, client_id=4)
    assert info.value.message == "record 6 at byte 1152: size 10 does not match paddedSize 192"


def test_too_few_records() -> None:
    data = build([100, 0, 5])
    assert (
        bad_records(data, 4)
        == "payload holds 3 records in 384 bytes, header says 4 records in 384 bytes"
    )


def test_too_many_records() -> None:
    data = build([100, 0, 5, 7])  # 192 + 64 + 128 + 128 bytes
    assert bad_records(data, 3) == (
        "payload holds 4+ records in 512 bytes, header says 3 records in 512 bytes"
    )


def test_too_many_uniform_records() -> None:
    data = build([0] * 8)
    assert "header says 7 records" in bad_records(data, 7)
    assert "header says 9 records" in bad_records(data, 9)


def test_scan_does_not_modify_the_payload() -> None:
    data = build([3, 70, 0, 1000])
    array = as_array(data)
    before = array.copy()
    scan_records(array, 4)
    assert np.array_equal(array, before)


def test_batches_of_one_shape_share_read_only_offsets() -> None:
    one, two = build([100] * 5, client_id=4), build([90] * 5, client_id=4)
    starts = scan_records(as_array(one), 5, client_id=4)
    assert scan_records(as_array(two), 5, client_id=4) is starts  # 192-byte records both
    assert starts.tolist() == [0, 192, 384, 576, 768]
    assert not starts.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        starts[0] = 64
    # Equal paddedSizes but not equal sizes: the same offsets all the same.
    three = build([100, 90, 100, 80, 70], client_id=4)
    assert scan_records(as_array(three), 5, client_id=4) is starts
    mixed = scan_records(as_array(build([100, 0, 100, 100, 0])), 5)
    assert mixed.tolist() == [0, 192, 256, 448, 640]


def test_the_shared_offsets_are_bounded() -> None:
    for n in range(1, 2 * wire._UNIFORM_SHAPES):
        assert scan_records(as_array(build([0] * n)), n).tolist() == list(range(0, 64 * n, 64))
        assert 0 < len(wire._UNIFORM) <= wire._UNIFORM_SHAPES


def test_stamp_records_checks_spacing_it_was_not_given() -> None:
    """Offsets spaced unevenly, with the count and first stride of shared
    ones, are stamped record by record."""
    scan_records(as_array(build([100] * 3)), 3)  # shares (3 records, 192 B)
    data = build([100, 0, 200])  # 192 + 64 + 320 bytes
    starts = np.array([0, 192, 256], dtype=np.int64)
    region = np.frombuffer(bytearray(data), dtype=np.uint8)
    stamp_records(region.view("<u8"), 0, starts, 7)
    assert [p[0] for p in rawclient.parse_records(bytes(region))] == [7, 8, 9]


record_sizes = st.lists(
    st.one_of(st.integers(0, 130), st.sampled_from([0, 1, 63, 64, 65, 1024, 4000])),
    min_size=1,
    max_size=60,
)


@settings(database=None, max_examples=300, deadline=None)
@given(sizes=record_sizes)
def test_scan_matches_the_reference_walker_on_valid_batches(sizes: list[int]) -> None:
    data = build(sizes)
    expected = reference_scan(data, len(sizes))
    assert expected is not None
    assert scan(data, len(sizes)) == expected


@settings(database=None, max_examples=400, deadline=None)
@given(
    sizes=record_sizes,
    data=st.data(),
    value=st.one_of(
        st.integers(0, 512), st.sampled_from([2**64 - 1, 2**63, 2**32, 64 * 4001]), st.just(None)
    ),
    num_delta=st.sampled_from([0, 0, 0, -1, 1]),
)
def test_scan_agrees_with_the_reference_on_corrupted_batches(
    sizes: list[int], data: st.DataObject, value: int | None, num_delta: int
) -> None:
    payload = build(sizes)
    starts = reference_scan(payload, len(sizes))
    assert starts is not None
    if value is not None:
        record = data.draw(st.integers(0, len(sizes) - 1))
        field = data.draw(st.sampled_from([0, 48, 56]))  # paddedSize, client_id or size
        put_word(payload, starts[record] + field, value)
    num_msg = len(sizes) + num_delta
    expected = reference_scan(payload, num_msg, client_id=4)
    if expected is None:
        with pytest.raises(ProtocolError) as info:
            scan_records(as_array(payload), num_msg, client_id=4)
        assert info.value.code is ErrorCode.BAD_MESSAGE_RECORDS
    else:
        assert scan_records(as_array(payload), num_msg, client_id=4).tolist() == expected


# -- stamping ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sizes",
    [
        [0, 100, 100, 1, 64, 65],  # mixed: the indexed path
        [100] * 7,  # one size: the strided path
        [30],  # one record
        [64, 64, 64, 0],  # the same size but the last (a different padded size)
    ],
)
@pytest.mark.parametrize("slack", [0, 64])  # 0: the batch ends where the log does
def test_stamp_records_writes_the_broker_fields(sizes: list[int], slack: int) -> None:
    data = build(sizes)
    starts = scan_records(as_array(data), len(sizes))
    region = np.zeros(256 + len(data) + slack, dtype=np.uint8)
    region[256 : 256 + len(data)] = np.frombuffer(bytes(data), dtype=np.uint8)
    # Dirty the segment_header words so clearing them is visible.
    words = region.view("<u8")
    for s in starts:
        words[(256 + int(s)) // 8 + 1] = 0xAB
    stamp_records(words, 256, starts, 1000)
    stamped = bytes(region[256 : 256 + len(data)])
    parsed = rawclient.parse_records(stamped)  # checks next_msg_diff == paddedSize
    assert [p[0] for p in parsed] == list(range(1000, 1000 + len(sizes)))
    assert [p[1] for p in parsed] == [4] * len(sizes)
    assert [p[2] for p in parsed] == list(range(len(sizes)))
    assert [p[3] for p in parsed] == [rawclient.payload_for(4, i, n) for i, n in enumerate(sizes)]
    for s, n in zip(starts, sizes, strict=True):
        fields = rawclient.MESSAGE_HEADER.unpack_from(stamped, int(s))
        assert fields[0] == fields[3] == padded_size(n)
        assert fields[1] == 0  # segment_header
        assert fields[4] == 0  # total_order untouched
    # Nothing outside the batch was written.
    assert not region[:256].any()
    assert not region[256 + len(data) :].any()


# -- acks and error frames -----------------------------------------------------------------


def test_error_frame_layout() -> None:
    frame = encode_error_frame(ErrorCode.LOG_FULL, "no space: ünïcode")
    text = "no space: ünïcode".encode()
    assert frame[:8] == b"\xff" * 8
    assert struct.unpack_from("<II", frame, 8) == (4, len(text))
    assert frame[16:] == text
    assert len(frame) == 16 + len(text)
    assert encode_error_frame(ErrorCode.TIMEOUT, "") == struct.pack("<QII", ERROR_MARKER, 7, 0)


def test_error_frame_text_is_capped() -> None:
    frame = encode_error_frame(ErrorCode.BAD_HANDSHAKE, "x" * 10_000)
    assert struct.unpack_from("<II", frame, 8) == (1, MAX_ERROR_TEXT)
    assert len(frame) == 16 + MAX_ERROR_TEXT


def test_capped_error_text_is_still_utf8() -> None:
    frame = encode_error_frame(ErrorCode.BAD_HANDSHAKE, "a" + "é" * 3000)
    (length,) = struct.unpack_from("<I", frame, 12)
    assert length <= MAX_ERROR_TEXT
    frame[16 : 16 + length].decode("utf-8")  # the spec says UTF-8 text


def test_ack_encoding() -> None:
    assert encode_ack_start(3) == b"\x03\0\0\0"
    assert encode_ack_start(-1) == b"\xff\xff\xff\xff"
    assert encode_ack(2**40 + 5) == struct.pack("<Q", 2**40 + 5)


ACK_STREAM = (
    encode_ack_start(7)
    + encode_ack(10)
    + encode_ack(20)
    + encode_ack(2**63)
    + encode_error_frame(ErrorCode.SHUTTING_DOWN, "broker is shutting down ✓")
    + encode_ack(21)
)
ACK_EVENTS = [
    AckCount(10),
    AckCount(20),
    AckCount(2**63),
    ErrorFrame(5, "broker is shutting down ✓"),
    AckCount(21),
]


def test_ack_decoder_whole_stream() -> None:
    decoder = AckDecoder()
    assert list(decoder.feed(ACK_STREAM)) == ACK_EVENTS
    assert decoder.broker_id == 7
    assert decoder.pending == 0


def test_ack_decoder_byte_by_byte() -> None:
    decoder = AckDecoder()
    events = []
    boundaries = []
    for i in range(len(ACK_STREAM)):
        new = list(decoder.feed(ACK_STREAM[i : i + 1]))
        if i < 3:
            assert decoder.broker_id is None
        else:
            assert decoder.broker_id == 7
        if new:
            boundaries.append(i + 1)
        events += new
        consumed = boundaries[-1] if boundaries else (4 if i >= 3 else 0)
        assert decoder.pending == i + 1 - consumed
    assert events == ACK_EVENTS
    # Each event completes exactly at its last byte.
    frame = 16 + len("broker is shutting down ✓".encode())
    assert boundaries == [12, 20, 28, 28 + frame, 36 + frame]


@pytest.mark.parametrize("split", [1, 4, 5, 11, 12, 13, 19, 20, 27, 28, 36, 43, 44, 60])
def test_ack_decoder_split_anywhere(split: int) -> None:
    decoder = AckDecoder()
    events = list(decoder.feed(ACK_STREAM[:split])) + list(decoder.feed(ACK_STREAM[split:]))
    assert events == ACK_EVENTS


def test_ack_decoder_without_broker_id() -> None:
    decoder = AckDecoder(expect_broker_id=False)
    frame = encode_error_frame(ErrorCode.BAD_HANDSHAKE, "handshake is 3 bytes, want 64")
    assert list(decoder.feed(frame[:15])) == []
    assert decoder.pending == 15
    assert list(decoder.feed(frame[15:])) == [ErrorFrame(1, "handshake is 3 bytes, want 64")]
    assert decoder.broker_id is None
    assert decoder.pending == 0


def test_ack_decoder_reads_an_error_frame_where_the_broker_id_would_be() -> None:
    # A refused handshake: the error frame is the first thing the broker writes.
    frame = encode_error_frame(ErrorCode.BAD_HANDSHAKE, "unknown client_req 5")
    decoder = AckDecoder(expect_broker_id=True)
    events = [e for i in range(len(frame)) for e in decoder.feed(frame[i : i + 1])]
    assert events == [ErrorFrame(1, "unknown client_req 5")]
    assert decoder.broker_id is None
    assert decoder.pending == 0
