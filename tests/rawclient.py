"""A publisher and subscriber written straight from the wire spec, for tests.

Deliberately independent of the package's client code: it builds frames with
``struct`` only, so the broker is checked against the spec, not against
itself.
"""

from __future__ import annotations

import struct

import trio

HANDSHAKE = struct.Struct("<IIQQII32s")
BATCH_HEADER = struct.Struct("<QIIIIIIQQQQQ56x")
MESSAGE_HEADER = struct.Struct("<QQQQQQQQ")
ERROR_MARKER = 2**64 - 1


def handshake(
    topic: str,
    *,
    client_id: int = 1,
    ack: int = 1,
    port: int = 0,
    req: int = 0,
    last_addr: int = 0,
) -> bytes:
    return HANDSHAKE.pack(client_id, ack, 0, last_addr, port, req, topic.encode().ljust(32, b"\0"))


def record(payload: bytes, client_order: int, client_id: int) -> bytes:
    pad = (64 - len(payload) % 64) % 64
    padded = 64 + len(payload) + pad
    head = MESSAGE_HEADER.pack(padded, 0, 2**64 - 1, 0, 0, client_order, client_id, len(payload))
    return head + payload + b"\0" * pad


def committed(
    payload: bytes,
    offset: int,
    *,
    client_order: int = 0,
    client_id: int = 9,
    padded: int | None = None,
) -> bytes:
    """A record as a subscriber receives it: with its logical offset. A
    ``padded`` given replaces the true paddedSize (a corrupt record)."""
    pad = (64 - len(payload) % 64) % 64
    size = 64 + len(payload) + pad
    head = MESSAGE_HEADER.pack(
        size if padded is None else padded, 0, offset, 0, 0, client_order, client_id, len(payload)
    )
    return head + payload + b"\0" * pad


def payload_for(client_id: int, order: int, size: int) -> bytes:
    """Deterministic, distinct payload bytes for (client, message index)."""
    seed = f"{client_id}:{order}:".encode()
    return (seed * (size // len(seed) + 1))[:size]


def batch(
    seq: int, client_id: int, first_order: int, count: int, size: int
) -> tuple[bytes, list[bytes]]:
    """A whole batch (header + records) and the payloads in it."""
    payloads = [payload_for(client_id, first_order + i, size) for i in range(count)]
    body = b"".join(record(p, first_order + i, client_id) for i, p in enumerate(payloads))
    head = BATCH_HEADER.pack(seq, client_id, count, 0, 0, 0, 0, len(body), 0, 0, 0, 0)
    return head + body, payloads


async def read_all(stream: trio.abc.ReceiveStream) -> bytes:
    """Everything until EOF (or a reset)."""
    chunks = []
    try:
        while chunk := await stream.receive_some(1 << 16):
            chunks.append(chunk)
    except trio.BrokenResourceError:
        pass
    return b"".join(chunks)


def parse_ack_stream(
    data: bytes, *, with_broker_id: bool = True
) -> tuple[int | None, list[int], tuple[int, str] | None]:
    """Split an ack stream into (broker id, counts, error frame or None)."""
    broker_id = None
    pos = 0
    if with_broker_id:
        (broker_id,) = struct.unpack_from("<i", data, 0)
        pos = 4
    counts: list[int] = []
    error = None
    while pos + 8 <= len(data):
        (value,) = struct.unpack_from("<Q", data, pos)
        if value == ERROR_MARKER:
            code, length = struct.unpack_from("<II", data, pos + 8)
            error = (code, data[pos + 16 : pos + 16 + length].decode())
            pos += 16 + length
            break
        counts.append(value)
        pos += 8
    assert pos == len(data), f"{len(data) - pos} stray bytes after the ack stream"
    return broker_id, counts, error


def parse_records(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """(logical_offset, client_id, client_order, payload) of each record."""
    out = []
    pos = 0
    while pos < len(data):
        padded, _seg, logical, diff, _order, client_order, client_id, size = (
            MESSAGE_HEADER.unpack_from(data, pos)
        )
        assert diff == padded
        out.append((logical, client_id, client_order, data[pos + 64 : pos + 64 + size]))
        pos += padded
    assert pos == len(data)
    return out


#: A ``BatchMetadata`` frame: (total order of its first record, record
#: count, [(logical offset, total order, client id, client order) of each]).
Framed = tuple[int, int, list[tuple[int, int, int, int]]]


def parse_framed(data: bytes | bytearray) -> tuple[list[Framed], int]:
    """The whole ``BatchMetadata`` frames at the front of an ordered
    subscribe stream (``client_req`` 3, or 1 on an order-5 topic), and the
    bytes they take (a frame cut short at the end is left for later)."""
    frames: list[Framed] = []
    pos = 0
    while pos + 16 <= len(data):
        first, count, version, flags = struct.unpack_from("<QIHH", data, pos)
        assert (version, flags) == (1, 0)
        at = pos + 16
        records = []
        for _ in range(count):
            if at + 64 > len(data):
                return frames, pos
            padded, _, offset, _, total, corder, cid, _ = MESSAGE_HEADER.unpack_from(data, at)
            records.append((offset, total, cid, corder))
            at += padded
        if at > len(data):
            break
        frames.append((first, count, records))
        pos = at
    return frames, pos
