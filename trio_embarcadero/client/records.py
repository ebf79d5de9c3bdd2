"""The subscribe side without I/O: message records out of received bytes.

A subscription stream is message records back to back, in logical-offset
order, possibly ended by one error frame. :class:`RecordDecoder` owns the
buffer the bytes are received into, hands out each whole record as a
:class:`~trio_embarcadero.wire.Message` (payload copied) or a
:class:`~trio_embarcadero.wire.MessageView` (payload a view of that buffer),
and keeps a partial record for the next receive. It imports no Trio: the
subscriber receives into :meth:`RecordDecoder.receive_buffer` and reports how
many bytes arrived.

An ordered subscription (``client_req = 3``, or ``1`` on an order-5 topic)
has a 16-byte ``BatchMetadata`` in front of each batch's records; there the
decoder follows total orders (every record's ``total_order`` field) instead
of logical offsets, and hands them out as the messages' ``offset``.

Copies cost little: the records a receive completes are copied into one
``bytes`` object at once, and each payload is sliced out of it, which is no
slower per message than slicing a memoryview.
"""

from __future__ import annotations

import struct
from typing import Any

from ..errors import BrokerError, ErrorCode, ProtocolError
from ..wire import (
    ALIGN,
    BATCH_METADATA,
    BATCH_METADATA_VERSION,
    ERROR_FRAME_HEAD,
    ERROR_MARKER,
    MESSAGE_HEADER,
    MESSAGE_HEADER_SIZE,
    Message,
    MessageView,
)

#: Largest record a subscriber accepts; anything larger is a corrupt stream.
MAX_RECORD_BYTES = 1 << 30
#: Free space offered to each receive, at least.
RECEIVE_SIZE = 1 << 16
_U64 = struct.Struct("<Q")


class RecordDecoder:
    """Turns a subscription's byte stream into messages (sans-IO).

    Args:
        position: Logical offset (ordered: total order) of the first record expected.
        buffer_bytes: Initial buffer size; it grows for larger records.
        ordered: The stream has a ``BatchMetadata`` in front of each batch,
            and records follow total orders.

    Attributes:
        position: Logical offset of the next record expected.
        skipped: Messages the stream jumped over: the broker's retention had
            reclaimed them before they could be sent (offsets only ever move
            forward; a jump is not corruption).
        error: Set once the stream holds an error frame or an invalid record;
            every message before it has been returned by :meth:`feed`, and
            nothing after it is decoded.
    """

    def __init__(self, position: int, buffer_bytes: int, *, ordered: bool = False) -> None:
        self.position = position
        self.ordered = ordered
        self._batch_left = 0  # ordered: records of the batch still due
        self.skipped = 0
        self.error: BrokerError | ProtocolError | None = None
        self._buffer = bytearray(max(buffer_bytes, 2 * RECEIVE_SIZE))
        self._view = memoryview(self._buffer)
        self._start = 0  # first byte not decoded yet
        self._end = 0  # end of the received bytes

    @property
    def pending(self) -> int:
        """Bytes received that do not form a whole record yet."""
        return self._end - self._start

    def receive_buffer(self) -> memoryview:
        """Where to receive the next bytes: free space at the buffer's end.

        It has room for at least :data:`RECEIVE_SIZE` bytes and for the rest
        of a partial record whose size is known. Views handed out earlier
        stay valid until the next call.
        """
        start, end = self._start, self._end
        pending = end - start
        if not pending:
            self._start = self._end = 0
            return self._view
        need = RECEIVE_SIZE
        if pending >= _U64.size and not self._at_metadata():
            (padded,) = _U64.unpack_from(self._buffer, start)
            if padded != ERROR_MARKER:
                need = max(need, padded - pending)
        if len(self._buffer) - end < need:
            if pending + need > len(self._buffer):
                # A new buffer: views handed out earlier keep the old one alive.
                self._buffer = bytearray(max(2 * len(self._buffer), pending + need))
                self._buffer[:pending] = self._view[start:end]
                self._view = memoryview(self._buffer)
            else:
                self._buffer[:pending] = self._buffer[start:end]
            self._start, self._end = 0, pending
        return self._view[self._end :]

    def feed(self, nbytes: int) -> list[Message]:
        """Take ``nbytes`` received into :meth:`receive_buffer`; return the
        messages they complete, their payloads copied."""
        messages: list[Message] = self._decode(nbytes, Message, copy=True)
        return messages

    def feed_views(self, nbytes: int) -> list[MessageView]:
        """As :meth:`feed`, but the payloads are views of the buffer, valid
        until the next :meth:`receive_buffer` call."""
        views: list[MessageView] = self._decode(nbytes, MessageView, copy=False)
        return views

    def _decode(self, nbytes: int, make: Any, *, copy: bool) -> list[Any]:
        """The records ``nbytes`` complete, each as ``make(payload, offset,
        client_id, client_order)``; payloads are copied or views."""
        self._end += nbytes
        if self.error is not None:
            return []
        buf, view = self._buffer, self._view
        pos, end = self._start, self._end
        # Payloads are sliced from ``source`` at ``index - base``: the buffer
        # itself, or one copy of what was received (only once a record is
        # whole, so a large record arriving in pieces is not copied each time).
        source: bytes | memoryview = view
        base = 0
        if copy and self._record_ends_by(pos, end):
            source, base = bytes(view[pos:end]), pos
        out: list[Any] = []
        expected = self.position
        unpack = MESSAGE_HEADER.unpack_from
        while end - pos >= _U64.size:
            (padded,) = _U64.unpack_from(buf, pos)
            if padded == ERROR_MARKER:
                pos = self._error_frame(pos, end)
                break
            if self._at_metadata():
                if end - pos < BATCH_METADATA.size:
                    break
                first, count, version, flags = BATCH_METADATA.unpack_from(buf, pos)
                if first > expected:
                    self.skipped += first - expected  # reclaimed by retention
                    expected = first
                if (version, flags) != (BATCH_METADATA_VERSION, 0) or not count or first < expected:
                    self.error = ProtocolError(
                        ErrorCode.BAD_MESSAGE_RECORDS,
                        f"BatchMetadata (total order {first}, {count} records, version "
                        f"{version}, flags {flags}) where total order {expected} was due",
                    )
                    break
                self._batch_left = count
                pos += BATCH_METADATA.size
                continue
            if padded < MESSAGE_HEADER_SIZE or padded % ALIGN or padded > MAX_RECORD_BYTES:
                self.error = ProtocolError(
                    ErrorCode.BAD_MESSAGE_RECORDS,
                    f"record at offset {expected} has paddedSize {padded}",
                )
                break
            if end - pos < padded:
                break
            _, _, offset, _, total_order, client_order, client_id, size = unpack(buf, pos)
            if self.ordered:
                offset = total_order
                self._batch_left -= 1
            elif offset > expected and size <= padded - MESSAGE_HEADER_SIZE:
                self.skipped += offset - expected  # reclaimed by retention
                expected = offset
            if offset != expected or size > padded - MESSAGE_HEADER_SIZE:
                self.error = ProtocolError(
                    ErrorCode.BAD_MESSAGE_RECORDS,
                    f"record with logical offset {offset} and size {size} (paddedSize {padded})"
                    f" where offset {expected} was due",
                )
                break
            data = pos + MESSAGE_HEADER_SIZE - base
            out.append(make(source[data : data + size], offset, client_id, client_order))
            expected += 1
            pos += padded
        self._start = pos
        self.position = expected
        return out

    def _at_metadata(self) -> bool:
        """Whether a ``BatchMetadata`` is due next (ordered streams)."""
        return self.ordered and not self._batch_left

    def _record_ends_by(self, pos: int, end: int) -> bool:
        """Whether the record at ``pos`` has arrived whole, by its paddedSize."""
        if self._at_metadata():
            pos += BATCH_METADATA.size
        if end - pos < _U64.size:
            return False
        padded: int = _U64.unpack_from(self._buffer, pos)[0]
        return padded != ERROR_MARKER and padded <= end - pos

    def _error_frame(self, pos: int, end: int) -> int:
        """Decode the error frame at ``pos`` if it is whole; where decoding stops."""
        head = ERROR_FRAME_HEAD.size
        if end - pos < head:
            return pos
        _, code, length = ERROR_FRAME_HEAD.unpack_from(self._buffer, pos)
        if end - pos < head + length:
            return pos
        text = bytes(self._buffer[pos + head : pos + head + length]).decode("utf-8", "replace")
        self.error = BrokerError(code, text)
        return end
