"""Byte layouts of the wire protocol (v1): encode, parse and validate.

Everything is little-endian with exact sizes, as in
``shared/reference/wire-protocol.md``:

* a 64-byte handshake opens every connection;
* a publish stream is ``[batch header 128 B][payload]`` repeated, the payload
  being ``num_msg`` message records (64-byte header, payload, padding to 64);
* the broker answers with an ack stream (``<i`` broker id, then ``<Q``
  cumulative counts) and, on failure, one error frame.

Single headers go through :mod:`struct` (0.2 us per unpack); whole batches of
message records are validated and stamped with numpy in a handful of vector
operations, because a per-message Python loop over a 2 MiB batch of 1 KiB
messages costs more CPU than receiving it.
"""

from __future__ import annotations

import enum
import re
import struct
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple

import attrs
import numpy as np
import numpy.typing as npt

from .errors import ErrorCode, ProtocolError

HANDSHAKE = struct.Struct("<IIQQII32s")
BATCH_HEADER = struct.Struct("<QIIIIIIQQQQQ56x")
MESSAGE_HEADER = struct.Struct("<QQQQQQQQ")
ACK_BROKER_ID = struct.Struct("<i")
ACK_COUNT = struct.Struct("<Q")
ERROR_FRAME_HEAD = struct.Struct("<QII")
#: In front of each batch's records on an ordered subscribe stream: the total
#: order of the first record that follows, their count, header version, flags.
BATCH_METADATA = struct.Struct("<QIHH")
BATCH_METADATA_VERSION = 1

HANDSHAKE_SIZE = HANDSHAKE.size
BATCH_HEADER_SIZE = BATCH_HEADER.size
MESSAGE_HEADER_SIZE = MESSAGE_HEADER.size
ALIGN = 64

#: Cumulative-count value that announces an error frame in an ack stream.
ERROR_MARKER = 2**64 - 1
#: ``logical_offset`` a client puts in a message header it has not published yet.
UNASSIGNED_OFFSET = 2**64 - 1
MAX_ACK_LEVEL = 2
#: Broker ids the C++ client accepts on an ack stream.
MAX_BROKER_ID = 31
MAX_TOPIC_BYTES = 31
MAX_ERROR_TEXT = 4096
#: The batch size a publisher fills by default, the C++ client's ``BATCH_SIZE``
#: (a batch is sealed once it holds this much, header included).
DEFAULT_BATCH_BYTES = 2 * 2**20

# Byte offsets of batch-header fields the broker writes in place in the log.
BH_BATCH_COMPLETE = 16
BH_START_LOGICAL_OFFSET = 40

# Word (u64) indexes of message-header fields, relative to a record's start.
MH_PADDED_SIZE = 0
MH_SEGMENT_HEADER = 1
MH_LOGICAL_OFFSET = 2
MH_NEXT_MSG_DIFF = 3
MH_TOTAL_ORDER = 4
MH_CLIENT_ORDER = 5
MH_CLIENT_ID = 6
MH_SIZE = 7

_TOPIC_RE = re.compile(rb"[A-Za-z0-9._-]{1,%d}" % MAX_TOPIC_BYTES)


class ClientRequest(enum.IntEnum):
    """The ``client_req`` field of a handshake."""

    PUBLISH = 0
    SUBSCRIBE = 1
    #: Publish in a session: batches deduplicated by batch_seq (the wire
    #: protocol, section 4.5); ``last_addr`` is the session token.
    PUBLISH_SESSION = 2
    #: The merged total order of an order-5 topic, from any broker.
    SUBSCRIBE_ORDERED = 3


@attrs.frozen
class Handshake:
    """The 64-byte handshake every connection starts with.

    Attributes:
        client_id: Chosen by the client; names it in acks and message headers.
        ack: Ack level: 0 none, 1 stored in the log, 2 stored and durable.
        num_msg: Ignored by the broker.
        last_addr: Subscribe: logical offset of the first message wanted;
            publish in a session: the session token.
        port: Publish with ack >= 1: 0 = acks on this connection, else the
            client's port the broker dials for acks.
        request: Publish or subscribe.
        topic: Topic name, 1 to 31 characters of ``[A-Za-z0-9._-]``.
    """

    client_id: int
    ack: int
    num_msg: int
    last_addr: int
    port: int
    request: ClientRequest
    topic: str

    def encode(self) -> bytes:
        """Return the 64 wire bytes of this handshake."""
        return HANDSHAKE.pack(
            self.client_id,
            self.ack,
            self.num_msg,
            self.last_addr,
            self.port,
            int(self.request),
            encode_topic(self.topic),
        )


def encode_topic(topic: str) -> bytes:
    """Return ``topic`` as the 32-byte NUL-padded wire field.

    Raises:
        ValueError: If the name is not 1-31 characters of ``[A-Za-z0-9._-]``.
    """
    raw = topic.encode("ascii", "replace")
    if _TOPIC_RE.fullmatch(raw) is None:
        raise ValueError(f"invalid topic name {topic!r}: want 1-31 of [A-Za-z0-9._-]")
    return raw.ljust(32, b"\0")


def parse_handshake(data: bytes | bytearray | memoryview) -> Handshake:
    """Parse and validate a handshake.

    Raises:
        ProtocolError: ``BAD_HANDSHAKE`` with the reason, for a short buffer,
            an unknown request type, an ack level above 2, a bad topic, a
            dial-back port above 65535, or a session handshake without acks
            or without a token.
    """
    if len(data) != HANDSHAKE_SIZE:
        raise ProtocolError(
            ErrorCode.BAD_HANDSHAKE, f"handshake is {len(data)} bytes, want {HANDSHAKE_SIZE}"
        )
    client_id, ack, num_msg, last_addr, port, req, raw_topic = HANDSHAKE.unpack(data)
    try:
        request = ClientRequest(req)
    except ValueError:
        raise ProtocolError(ErrorCode.BAD_HANDSHAKE, f"unknown client_req {req}") from None
    if ack > MAX_ACK_LEVEL:
        raise ProtocolError(ErrorCode.BAD_HANDSHAKE, f"ack level {ack} is above {MAX_ACK_LEVEL}")
    if port > 0xFFFF:
        raise ProtocolError(ErrorCode.BAD_HANDSHAKE, f"ack port {port} is not a TCP port")
    name, _, padding = bytes(raw_topic).partition(b"\0")
    if _TOPIC_RE.fullmatch(name) is None or padding.strip(b"\0"):
        raise ProtocolError(
            ErrorCode.BAD_HANDSHAKE,
            f"invalid topic {bytes(raw_topic).rstrip(bytes(1))!r}: want 1-31 of [A-Za-z0-9._-]",
        )
    if request == ClientRequest.PUBLISH_SESSION:
        if ack == 0:
            raise ProtocolError(
                ErrorCode.BAD_HANDSHAKE,
                "a publish session (client_req 2) needs acks (ack 1 or 2) to know what to resend",
            )
        if last_addr == 0:
            raise ProtocolError(
                ErrorCode.BAD_HANDSHAKE,
                "a publish session (client_req 2) needs its token in last_addr: a random "
                "non-zero 64-bit number drawn when the session begins",
            )
    return Handshake(
        client_id=client_id,
        ack=ack,
        num_msg=num_msg,
        last_addr=last_addr,
        port=port,
        request=request,
        topic=name.decode("ascii"),
    )


@attrs.frozen
class BatchHeader:
    """The 128-byte header in front of every batch (on the wire and in the log).

    Only ``batch_seq``, ``client_id``, ``num_msg`` and ``total_size`` are
    trusted from a client; the broker fills the rest in the log.
    """

    batch_seq: int
    client_id: int
    num_msg: int
    total_size: int
    batch_complete: int = 0
    broker_id: int = 0
    ordered: int = 0
    start_logical_offset: int = 0
    log_idx: int = 0
    total_order: int = 0
    batch_off_to_export: int = 0

    def encode(self) -> bytes:
        """Return the 128 wire bytes of this header."""
        return BATCH_HEADER.pack(
            self.batch_seq,
            self.client_id,
            self.num_msg,
            self.batch_complete,
            self.broker_id,
            self.ordered,
            0,
            self.total_size,
            self.start_logical_offset,
            self.log_idx,
            self.total_order,
            self.batch_off_to_export,
        )


def unpack_batch_header(data: bytes | bytearray | memoryview) -> BatchHeader:
    """Unpack 128 bytes into a :class:`BatchHeader`, without validation."""
    (seq, cid, num, complete, broker, ordered, _pad, total, start, log_idx, order, export) = (
        BATCH_HEADER.unpack(data)
    )
    return BatchHeader(
        batch_seq=seq,
        client_id=cid,
        num_msg=num,
        total_size=total,
        batch_complete=complete,
        broker_id=broker,
        ordered=ordered,
        start_logical_offset=start,
        log_idx=log_idx,
        total_order=order,
        batch_off_to_export=export,
    )


def parse_batch_header(
    data: bytes | bytearray | memoryview, max_batch_bytes: int, *, client_id: int | None = None
) -> BatchHeader:
    """Parse a batch header received from a publisher and validate it.

    Args:
        data: The 128 header bytes.
        max_batch_bytes: The largest ``total_size`` accepted.
        client_id: If given, the id the header must carry (the publisher's,
            from its handshake).

    Raises:
        ProtocolError: ``BAD_BATCH_HEADER`` when ``total_size`` is 0, above
            ``max_batch_bytes`` or not a whole number of 64-byte units, when
            ``num_msg`` is 0 or cannot fit in ``total_size``, or when
            ``client_id`` is not the one asked for.
    """
    header = unpack_batch_header(data)
    total, num = header.total_size, header.num_msg
    if not 0 < total <= max_batch_bytes:
        raise ProtocolError(
            ErrorCode.BAD_BATCH_HEADER,
            f"batch {header.batch_seq}: total_size {total} is not in 1..{max_batch_bytes}",
        )
    if total % ALIGN:
        raise ProtocolError(
            ErrorCode.BAD_BATCH_HEADER,
            f"batch {header.batch_seq}: total_size {total} is not a multiple of {ALIGN}",
        )
    if not 0 < num <= total // MESSAGE_HEADER_SIZE:
        raise ProtocolError(
            ErrorCode.BAD_BATCH_HEADER,
            f"batch {header.batch_seq}: num_msg {num} cannot fill total_size {total}",
        )
    if client_id is not None and header.client_id != client_id:
        raise ProtocolError(
            ErrorCode.BAD_BATCH_HEADER,
            f"batch {header.batch_seq}: client_id {header.client_id} is not this "
            f"publisher's ({client_id}, from its handshake)",
        )
    return header


def padded_size(payload_len: int) -> int:
    """Bytes a message record of ``payload_len`` payload bytes occupies."""
    return MESSAGE_HEADER_SIZE + -(-payload_len // ALIGN) * ALIGN


def encode_message(
    payload: bytes | bytearray | memoryview, client_order: int, client_id: int
) -> bytes:
    """Return one message record: header, payload and zero padding."""
    return bytes(
        encode_batch([payload], client_id=client_id, first_order=client_order)[BATCH_HEADER_SIZE:]
    )


class Message(NamedTuple):
    """One message as read from a topic; its payload is yours to keep.

    What :class:`~trio_embarcadero.client.Subscriber` and
    :meth:`LogReader.messages <trio_embarcadero.log.LogReader.messages>` hand
    out. For reading without a copy per message, see :class:`MessageView`.

    Attributes:
        payload: The message bytes (a copy of them).
        offset: The message's logical offset in its (topic, broker) stream.
        client_id: The id of the publisher that sent it.
        client_order: Its index among that publisher's messages.
    """

    payload: bytes
    offset: int
    client_id: int
    client_order: int


class MessageView(NamedTuple):
    """One message whose payload is a zero-copy view, for readers that opt in.

    :meth:`Subscriber.receive_views
    <trio_embarcadero.client.Subscriber.receive_views>` hands these out with
    views of the subscriber's receive buffer: **valid only until its next
    receive**, after which the buffer is reused and a kept view shows other
    messages' bytes. :meth:`LogReader.message_views
    <trio_embarcadero.log.LogReader.message_views>` hands out read-only views
    of the mapped log, valid until the reader is closed. Use the payload at
    once (write it, parse it, compare it), or keep :meth:`to_message`.

    Attributes:
        payload: A view of the message bytes (see above for how long it is valid).
        offset: As for :class:`Message`; so are ``client_id`` and ``client_order``.
    """

    payload: memoryview
    offset: int
    client_id: int
    client_order: int

    def to_message(self) -> Message:
        """A :class:`Message` with a copy of the payload, valid for good."""
        return Message(self.payload.tobytes(), self.offset, self.client_id, self.client_order)


class BatchEncoder:
    """Packs message records into one batch buffer, then seals it (sans-IO).

    The one place the batch format is written: the Python publisher fills an
    encoder message by message, the load generator and the no-loss checker
    through :func:`encode_batch`. Records go straight into a preallocated
    buffer (one ``pack_into`` and one slice assignment each), leaving the first
    128 bytes for the header that :meth:`seal` writes. The buffer is zero-filled
    when packing starts (a new one, or one cleared by :meth:`recycle`), so
    padding needs no writes of its own and holds no stale bytes.

    Args:
        client_id: Written into every record and the header.
        capacity: Bytes of the buffer, header included; a message whose record
            does not fit an empty encoder gets a buffer of its own size.
    """

    __slots__ = ("buffer", "client_id", "count", "fill")

    def __init__(self, client_id: int, capacity: int) -> None:
        self.client_id = client_id
        self.buffer = bytearray(max(capacity, BATCH_HEADER_SIZE))
        self.fill = BATCH_HEADER_SIZE
        self.count = 0

    def room_for(self, padded: int) -> bool:
        """Whether a record of ``padded`` bytes fits after what is packed."""
        return self.fill + padded <= len(self.buffer)

    def append(self, payload: bytes | bytearray | memoryview, client_order: int) -> int:
        """Pack one record; returns its padded size.

        The caller checks :meth:`room_for` first; an empty encoder grows its
        buffer for a record larger than it.
        """
        size = len(payload)
        # padded_size() inline: this runs once per message on the publish path.
        padded = MESSAGE_HEADER_SIZE + ((size + ALIGN - 1) & -ALIGN)
        buf = self.buffer
        pos = self.fill
        if pos + padded > len(buf):
            if self.count:
                raise ValueError(f"no room for a {padded}-byte record; seal the batch first")
            buf = self.buffer = bytearray(BATCH_HEADER_SIZE + padded)
        MESSAGE_HEADER.pack_into(
            buf, pos, padded, 0, UNASSIGNED_OFFSET, 0, 0, client_order, self.client_id, size
        )
        data = pos + MESSAGE_HEADER_SIZE
        buf[data : data + size] = payload  # the padding after it is zero already
        self.fill = pos + padded
        self.count += 1
        return padded

    def append_run(
        self,
        payloads: Sequence[bytes | bytearray | memoryview],
        first_order: int,
        max_bytes: int,
    ) -> int:
        """Pack the longest prefix of ``payloads`` whose records take at most
        ``max_bytes`` (and fit the buffer), as :meth:`append` would one by one.

        For a publisher's bulk path: the header fields are written as numpy
        columns and, when every payload has the same size, the payloads with
        one join and one strided copy, so no Python statement runs per record.

        Args:
            payloads: The payloads.
            first_order: The ``client_order`` of the first; the rest count up.
            max_bytes: The most record bytes to pack.

        Returns:
            How many were packed (from the first on; 0 if the first does not fit).
        """
        start = self.fill
        buf = self.buffer
        max_bytes = min(max_bytes, len(buf) - start)
        sizes = list(map(len, payloads))
        if not sizes:
            return 0
        size = sizes[0]
        if sizes.count(size) == len(sizes):  # the common case: no per-record sizes
            step = MESSAGE_HEADER_SIZE + ((size + ALIGN - 1) & -ALIGN)
            count = min(len(sizes), max_bytes // step)
            end = start + count * step
            starts = np.arange(0, count * step, step)
            lengths: npt.NDArray[np.int64] | int = size
        else:
            lengths = np.array(sizes, dtype=np.int64)
            padded = MESSAGE_HEADER_SIZE + ((lengths + (ALIGN - 1)) & -ALIGN)
            ends = np.cumsum(padded)
            count = int(np.searchsorted(ends, max_bytes, side="right"))
            lengths, padded = lengths[:count], padded[:count]
            end = start + (int(ends[count - 1]) if count else 0)
            starts = ends[:count] - padded
        if not count:
            return 0
        # Whole words only (a buffer's length need not be a multiple of 8);
        # records start at multiples of 64.
        region = np.frombuffer(buf, np.uint8, count=len(buf) // 8 * 8)[start:end]
        if isinstance(lengths, int):
            rows = region.reshape(count, step)
            data = rows[:, MESSAGE_HEADER_SIZE : MESSAGE_HEADER_SIZE + size]
            joined = b"".join(payloads[:count])
            data[:] = np.frombuffer(joined, np.uint8).reshape(count, size)
            padded_sizes: npt.NDArray[np.int64] | int = step
        else:
            at = start + MESSAGE_HEADER_SIZE
            for payload, offset, length in zip(
                payloads, starts.tolist(), lengths.tolist(), strict=False
            ):
                buf[at + offset : at + offset + length] = payload
            padded_sizes = padded
        # Each header field is a column: word ``field`` of every record (the
        # padding after each payload is zero already: see the class docs).
        index = starts // 8
        words = region.view("<u8")
        words[index + MH_PADDED_SIZE] = padded_sizes
        words[index + MH_LOGICAL_OFFSET] = UNASSIGNED_OFFSET
        words[index + MH_CLIENT_ORDER] = np.arange(first_order, first_order + count)
        words[index + MH_CLIENT_ID] = self.client_id
        words[index + MH_SIZE] = lengths
        for zero in (MH_SEGMENT_HEADER, MH_NEXT_MSG_DIFF, MH_TOTAL_ORDER):
            words[index + zero] = 0
        self.fill = end
        self.count += count
        return count

    def seal(self, batch_seq: int, buffer: bytearray | None = None) -> tuple[bytearray, int]:
        """Write the header and hand the batch over.

        Args:
            batch_seq: The batch's sequence number.
            buffer: A zero-filled buffer to pack the next batch into (one
                given back by :meth:`recycle`), or None for a new one of the
                same capacity.

        Returns:
            ``(buffer, length)``: the batch is ``buffer[:length]``.
        """
        buf, length = self.buffer, self.fill
        BATCH_HEADER.pack_into(
            buf, 0, batch_seq, self.client_id, self.count, 0, 0, 0, 0, length - BATCH_HEADER_SIZE,
            0, 0, 0, 0,
        )  # fmt: skip
        self.buffer = buffer if buffer is not None else bytearray(len(buf))
        self.fill = BATCH_HEADER_SIZE
        self.count = 0
        return buf, length

    @staticmethod
    def recycle(buffer: bytearray, length: int) -> bytearray:
        """Zero the first ``length`` bytes of a sealed batch's buffer (all its
        records were packed there), so it can be given to :meth:`seal` again."""
        np.frombuffer(buffer, np.uint8, count=length).fill(0)
        return buffer


def encode_batch(
    payloads: Iterable[bytes | bytearray | memoryview],
    *,
    client_id: int,
    batch_seq: int = 0,
    first_order: int = 0,
) -> bytearray:
    """Return one whole batch (header and records) of ``payloads``.

    Their ``client_order`` runs from ``first_order`` up.
    """
    items = list(payloads)
    encoder = BatchEncoder(client_id, BATCH_HEADER_SIZE + sum(padded_size(len(p)) for p in items))
    for i, payload in enumerate(items):
        encoder.append(payload, first_order + i)
    buf, length = encoder.seal(batch_seq, bytearray())
    del buf[length:]
    return buf


# A run of equal-size records is checked with one strided numpy comparison; this
# caps how far ahead one comparison looks, so mixed sizes cost O(n) in total.
_RUN_WINDOW = 256

#: The record offsets of batches of equal records, by (record count, record
#: size): one read-only array shared by every batch of that shape, as a stream's
#: batches nearly always are. A batch then costs no array of its own, and
#: :func:`stamp_records` knows such an array by identity, so it need not check
#: again that its records are evenly spaced. Emptied when it reaches
#: ``_UNIFORM_SHAPES`` (a publisher of ever-new shapes costs an array a batch,
#: as before); never pruned entry by entry, so threads may share it.
_UNIFORM: dict[tuple[int, int], npt.NDArray[np.int64]] = {}
_UNIFORM_SHAPES = 64


def _uniform_starts(count: int, size: int) -> npt.NDArray[np.int64]:
    starts = _UNIFORM.get((count, size))
    if starts is None:
        if len(_UNIFORM) >= _UNIFORM_SHAPES:
            _UNIFORM.clear()
        starts = np.arange(0, count * size, size, dtype=np.int64)
        starts.flags.writeable = False
        _UNIFORM[count, size] = starts
    return starts


def scan_records(
    payload: npt.NDArray[np.uint8], num_msg: int, *, client_id: int | None = None
) -> npt.NDArray[np.int64]:
    """Validate a batch payload and return the byte offset of every record.

    The payload must be exactly ``num_msg`` records whose ``paddedSize`` is
    ``64 + roundup64(size)`` and whose sizes sum to ``len(payload)``.

    Args:
        payload: The whole batch payload, its length a multiple of 64.
        num_msg: The record count the batch header announced.
        client_id: If given, the ``client_id`` every record must carry (the
            publisher's, from its handshake); readers of the log pass nothing.

    Returns:
        The start offsets, ascending, one per record (read-only: batches of
        one shape share them).

    Raises:
        ProtocolError: ``BAD_MESSAGE_RECORDS`` naming the first bad record.
    """
    total = len(payload)
    words = payload.view("<u8")
    first = int(words[0])
    if first >= MESSAGE_HEADER_SIZE and first % ALIGN == 0 and first * num_msg == total:
        # The common case (one message size per batch): one row per record, so
        # every header field is a strided column, compared without a gather.
        records = words.reshape(num_msg, first // 8)
        # Commoner still, the records are alike: every paddedSize, client_id
        # and size equal to the first record's, which is checked alone. Two
        # byte-string comparisons tell, a few us in all where the column
        # checks below take 20 (61 records of 1 KiB).
        head = records[0]
        size, owner = int(head[MH_SIZE]), int(head[MH_CLIENT_ID])
        if (
            first - MESSAGE_HEADER_SIZE - ALIGN < size <= first - MESSAGE_HEADER_SIZE
            and (client_id is None or owner == client_id)
            and records[:, MH_PADDED_SIZE].tobytes() == words[:1].tobytes() * num_msg
            and records[:, MH_CLIENT_ID : MH_SIZE + 1].tobytes()
            == head[MH_CLIENT_ID : MH_SIZE + 1].tobytes() * num_msg
        ):
            return _uniform_starts(num_msg, first)
        if bool((records[:, MH_PADDED_SIZE] == first).all()):
            starts = _uniform_starts(num_msg, first)
            _check_records(
                starts,
                records[:, MH_PADDED_SIZE],
                records[:, MH_SIZE],
                records[:, MH_CLIENT_ID],
                client_id,
            )
            return starts
    starts = _scan_mixed(words, num_msg, total)
    index = starts // 8
    _check_records(
        starts,
        words[index + MH_PADDED_SIZE],
        words[index + MH_SIZE],
        words[index + MH_CLIENT_ID] if client_id is not None else None,
        client_id,
    )
    return starts


def _record_error(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_MESSAGE_RECORDS, message)


def _scan_mixed(words: npt.NDArray[np.uint64], num_msg: int, total: int) -> npt.NDArray[np.int64]:
    runs: list[npt.NDArray[np.int64]] = []
    found = 0
    pos = 0
    while pos < total:
        size = int(words[pos // 8])
        if size < MESSAGE_HEADER_SIZE or size % ALIGN or size > total - pos:
            raise _record_error(
                f"record {found} at byte {pos}: paddedSize {size} is not a multiple of 64 "
                f"in 64..{total - pos}"
            )
        step = size // 8
        # Only starts whose whole record fits in the payload can extend the run.
        window = words[pos // 8 : (total - size) // 8 + 1 : step][:_RUN_WINDOW]
        mismatch = window != size
        run = int(mismatch.argmax()) if bool(mismatch.any()) else len(window)
        runs.append(np.arange(pos, pos + run * size, size, dtype=np.int64))
        found += run
        pos += run * size
        if found > num_msg:
            break
    if found != num_msg or pos != total:
        raise _record_error(
            f"payload holds {found}{'+' if found > num_msg else ''} records in {pos} bytes, "
            f"header says {num_msg} records in {total} bytes"
        )
    return np.concatenate(runs)


def _check_records(
    starts: npt.NDArray[np.int64],
    padded: npt.NDArray[np.uint64],
    sizes: npt.NDArray[np.uint64],
    owners: npt.NDArray[np.uint64] | None,
    client_id: int | None,
) -> None:
    """Check each record's ``size`` against its ``paddedSize`` and, if
    ``client_id`` is given, its ``client_id`` (``owners``) against that."""
    # paddedSize == 64 + roundup64(size), written without overflow for huge sizes.
    good = (sizes <= padded - MESSAGE_HEADER_SIZE) & (
        sizes + (MESSAGE_HEADER_SIZE + ALIGN) > padded
    )
    if client_id is not None and owners is not None:
        good &= owners == np.uint64(client_id)
    if bool(good.all()):
        return
    # The rare path: find the first bad record and say what is wrong with it.
    bad = int((~good).argmax())
    where = f"record {bad} at byte {int(starts[bad])}"
    size, padded_size = int(sizes[bad]), int(padded[bad])
    if padded_size - MESSAGE_HEADER_SIZE - ALIGN < size <= padded_size - MESSAGE_HEADER_SIZE:
        assert owners is not None
        raise _record_error(
            f"{where}: client_id {int(owners[bad])} is not this publisher's "
            f"({client_id}, from its handshake)"
        )
    raise _record_error(f"{where}: size {size} does not match paddedSize {padded_size}")


def stamp_records(
    log_words: npt.NDArray[np.uint64],
    payload_offset: int,
    starts: npt.NDArray[np.int64],
    first_logical_offset: int,
) -> None:
    """Write the broker-set fields of every record of a batch in the log.

    Args:
        log_words: The log region viewed as little-endian u64 words.
        payload_offset: Byte offset of the batch payload in the log (8-aligned).
        starts: Record offsets from :func:`scan_records`.
        first_logical_offset: Logical offset given to the batch's first record.
    """
    count = len(starts)
    if count <= 1:  # three words at most: no arrays (a batch of one large message)
        if count:
            at = (payload_offset + int(starts[0])) // 8
            log_words[at + MH_SEGMENT_HEADER] = 0
            log_words[at + MH_LOGICAL_OFFSET] = first_logical_offset
            log_words[at + MH_NEXT_MSG_DIFF] = log_words[at + MH_PADDED_SIZE]
        return
    offsets = np.arange(first_logical_offset, first_logical_offset + count, dtype=np.uint64)
    stride = int(starts[1])
    step = stride // 8
    # Offsets scan_records shared are evenly spaced by construction.
    if step and (
        _UNIFORM.get((count, stride)) is starts or bool((np.diff(starts) == stride).all())
    ):
        # Evenly spaced records (one message size: the common case): each
        # field is a strided column of the log, written without index
        # arrays, in half the time. Only header words are touched, so a last
        # record shorter than the rest is fine.
        first, span = payload_offset // 8, (count - 1) * step + 1

        def column(field: int) -> npt.NDArray[np.uint64]:
            return log_words[first + field : first + field + span : step]

        column(MH_SEGMENT_HEADER)[:] = 0
        column(MH_LOGICAL_OFFSET)[:] = offsets
        column(MH_NEXT_MSG_DIFF)[:] = column(MH_PADDED_SIZE)
        return
    index = (payload_offset + starts) // 8
    log_words[index + MH_SEGMENT_HEADER] = 0
    log_words[index + MH_LOGICAL_OFFSET] = offsets
    log_words[index + MH_NEXT_MSG_DIFF] = log_words[index + MH_PADDED_SIZE]


def encode_batch_metadata(total_order: int, num_msg: int) -> bytes:
    """The 16-byte ``BatchMetadata`` in front of ``num_msg`` records whose
    first has total order ``total_order`` (an order-5 subscribe stream)."""
    return BATCH_METADATA.pack(total_order, num_msg, BATCH_METADATA_VERSION, 0)


def encode_ack_start(broker_id: int) -> bytes:
    """The first four bytes of every ack stream."""
    return ACK_BROKER_ID.pack(broker_id)


def encode_ack(count: int) -> bytes:
    """One cumulative ack count."""
    return ACK_COUNT.pack(count)


def encode_error_frame(code: ErrorCode, text: str) -> bytes:
    """An error frame: the marker, ``<II`` code and length, and UTF-8 text."""
    # Cut at a character boundary: the spec promises UTF-8 text.
    raw = text.encode("utf-8", "replace")[:MAX_ERROR_TEXT].decode("utf-8", "ignore").encode()
    return ERROR_FRAME_HEAD.pack(ERROR_MARKER, int(code), len(raw)) + raw


@attrs.frozen
class AckCount:
    """A cumulative ack count read from an ack stream."""

    count: int


@attrs.frozen
class ErrorFrame:
    """An error frame read from a broker."""

    code: int
    text: str


class AckDecoder:
    """Incremental decoder of a broker's ack stream (for clients and tests).

    Feed it whatever bytes arrive; it yields the broker id once, then
    :class:`AckCount` and :class:`ErrorFrame` events as they become whole.

    Args:
        expect_broker_id: Whether the stream starts with the 4-byte broker id
            (True for an ack stream; False for a stream where only an error
            frame can come, such as a publish connection with ack 0).
    """

    def __init__(self, *, expect_broker_id: bool = True) -> None:
        self._buffer = bytearray()
        self._need_broker_id = expect_broker_id
        self.broker_id: int | None = None

    def feed(self, data: bytes | bytearray | memoryview) -> Iterator[AckCount | ErrorFrame]:
        """Add received bytes and yield the events they complete."""
        self._buffer += data
        buf = self._buffer
        while True:
            if self._need_broker_id:
                if len(buf) < ACK_BROKER_ID.size:
                    return
                self._need_broker_id = False
                # A refused handshake gets an error frame where the broker id
                # would be; broker ids are 0-31, so the marker's 0xFF bytes say so.
                if buf[: ACK_BROKER_ID.size] != b"\xff" * ACK_BROKER_ID.size:
                    (self.broker_id,) = ACK_BROKER_ID.unpack_from(buf)
                    del buf[: ACK_BROKER_ID.size]
                continue
            if len(buf) < ACK_COUNT.size:
                return
            (value,) = ACK_COUNT.unpack_from(buf)
            if value != ERROR_MARKER:
                del buf[: ACK_COUNT.size]
                yield AckCount(value)
                continue
            if len(buf) < ERROR_FRAME_HEAD.size:
                return
            _, code, length = ERROR_FRAME_HEAD.unpack_from(buf)
            end = ERROR_FRAME_HEAD.size + length
            if len(buf) < end:
                return
            text = bytes(buf[ERROR_FRAME_HEAD.size : end]).decode("utf-8", "replace")
            del buf[:end]
            yield ErrorFrame(code, text)

    @property
    def pending(self) -> int:
        """Bytes received that do not yet form a whole event."""
        return len(self._buffer)
