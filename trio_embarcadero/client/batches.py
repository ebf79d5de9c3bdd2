"""The publish side without I/O: batches, the send queue and the in-flight window.

:class:`PublishBatches` is what a publisher knows about its messages apart
from the connection: it packs each record into the open batch through
:class:`~trio_embarcadero.wire.BatchEncoder` (the one writer of the batch
format), seals batches with consecutive sequence numbers into a queue for the
sender, and keeps the in-flight window: the record bytes published but not yet
acknowledged, given back batch by batch as the cumulative ack count passes
their last message. It imports no Trio; the publisher's tasks drive it and
turn what :meth:`PublishBatches.append` reports into wake-ups.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import NamedTuple, TypeAlias

from ..wire import ALIGN, BATCH_HEADER_SIZE, MESSAGE_HEADER_SIZE, BatchEncoder

#: A message payload: any bytes-like object of bytes.
Payload: TypeAlias = bytes | bytearray | memoryview

# Below this many records, append_run leaves them to append: the numpy calls
# of a run cost about as much as packing a dozen records one by one.
_MIN_RUN = 16

# Flags returned by PublishBatches.append. A bare PACKED is the common case,
# so callers test ``flags != PACKED`` once and only then look at the bits.
#: The record was packed into the open batch.
PACKED = 1
#: The record is the first of the open batch (its linger time starts now).
OPENED = 2
#: A batch was sealed and queued for sending.
SEALED = 4


class SealedBatch(NamedTuple):
    """A batch ready for the wire, and its place in the publish order.

    Attributes:
        buffer: The buffer the batch was packed into.
        length: Header plus record bytes: the batch is ``buffer[:length]``.
        end_count: Messages published up to and including its last one; a
            cumulative ack count of at least this acknowledges the batch.
    """

    buffer: bytearray
    length: int
    end_count: int


class PublishBatches:
    """A publisher's batches and window accounting (sans-IO).

    Args:
        client_id: Written into every record and batch header.
        batch_bytes: Largest batch payload; a batch is sealed before a record
            would overflow it. A record larger than that travels alone.
        max_inflight_bytes: Record bytes that may be published and not yet
            released; :meth:`append` refuses a record beyond that, except into
            an empty window.
        release_on_send: Give window space back when a batch is sent rather
            than when it is acknowledged (ack level 0: no acks come).

    Attributes:
        published: Messages packed so far; the next record's client order.
        sent: Messages whose batch :meth:`mark_sent` confirmed.
        acked: The cumulative ack count, capped at :attr:`published`.
        batch_seq: Sequence number the next sealed batch gets.
        inflight_bytes: Record bytes holding window space.
        max_inflight_bytes: The window size.
    """

    __slots__ = (
        "_capacity",
        "_encoder",
        "_free",
        "_inflight",
        "_release_on_send",
        "_unsent",
        "acked",
        "batch_seq",
        "inflight_bytes",
        "max_inflight_bytes",
        "published",
        "sent",
    )

    def __init__(
        self, client_id: int, *, batch_bytes: int, max_inflight_bytes: int, release_on_send: bool
    ) -> None:
        self.published = self.sent = self.acked = 0
        self.batch_seq = 0
        self.inflight_bytes = 0
        self.max_inflight_bytes = max_inflight_bytes
        self._release_on_send = release_on_send
        self._capacity = BATCH_HEADER_SIZE + batch_bytes
        self._encoder = BatchEncoder(client_id, self._capacity)
        # Buffers of sent batches, reused for new ones.
        self._free: list[bytearray] = []
        self._unsent: deque[SealedBatch] = deque()
        # Sealed batches whose bytes still hold window space, oldest first.
        self._inflight: deque[SealedBatch] = deque()

    @property
    def open_count(self) -> int:
        """Messages in the open (not yet sealed) batch."""
        return self._encoder.count

    @property
    def unsent(self) -> int:
        """Sealed batches waiting for :meth:`mark_sent`."""
        return len(self._unsent)

    def append(self, payload: Payload) -> int:
        """Pack one message, sealing the open batch first if it has no room.

        Returns:
            :data:`PACKED`, with :data:`OPENED` when the record starts a new
            open batch and :data:`SEALED` when a batch was sealed. Without
            :data:`PACKED` the window has no room and nothing was packed
            (:data:`SEALED` may still be set): release space and call again.
        """
        # Runs once per message, so padded_size() is inlined here; the encoder
        # works the size out again, but the record format stays in wire.py.
        size = len(payload)
        padded = MESSAGE_HEADER_SIZE + (size + ALIGN - 1) // ALIGN * ALIGN
        encoder = self._encoder
        flags = PACKED
        if not encoder.count:
            flags = PACKED | OPENED
        elif encoder.fill + padded > self._capacity:
            self.seal()
            flags = PACKED | OPENED | SEALED
        inflight = self.inflight_bytes
        if inflight and inflight + padded > self.max_inflight_bytes:
            return flags & SEALED
        if flags != PACKED and BATCH_HEADER_SIZE + padded > self._capacity:
            # The encoder replaces its buffer with one the size of this record;
            # keep the regular one for the next batch.
            self._free.append(encoder.buffer)
        encoder.append(payload, self.published)
        self.published += 1
        self.inflight_bytes = inflight + padded
        if encoder.fill >= self._capacity:
            self.seal()
            flags |= SEALED
        return flags

    def append_run(self, payloads: Sequence[Payload], first: int) -> int:
        """Pack ``payloads[first:]`` into the open batch for as long as each
        record fits the batch without filling it and fits the window; return
        the index of the first one not packed.

        The bulk path of ``publish_many``: the records are packed together
        (:meth:`BatchEncoder.append_run`). It packs nothing into an empty
        batch, or when fewer than a few records are left: such records go
        through :meth:`append`, which reports opening and sealing batches
        and the window being full.
        """
        encoder = self._encoder
        # Strictly below the capacity: a record that fills the batch exactly
        # goes through append, which seals it.
        room = min(self._capacity - 1 - encoder.fill, self.max_inflight_bytes - self.inflight_bytes)
        last = min(len(payloads), first + room // MESSAGE_HEADER_SIZE)
        if not encoder.count or last - first < _MIN_RUN:
            return first
        fill = encoder.fill
        count = encoder.append_run(payloads[first:last], self.published, room)
        self.published += count
        self.inflight_bytes += encoder.fill - fill
        return first + count

    def seal(self) -> bool:
        """Seal the open batch and queue it; False if it holds no message."""
        encoder = self._encoder
        if not encoder.count:
            return False
        free = self._free
        buffer, length = encoder.seal(
            self.batch_seq, free.pop() if free else bytearray(self._capacity)
        )
        batch = SealedBatch(buffer, length, self.published)
        self._unsent.append(batch)
        self._inflight.append(batch)
        self.batch_seq += 1
        return True

    def next_unsent(self) -> memoryview | None:
        """The bytes of the oldest sealed batch not yet sent, or None."""
        if not self._unsent:
            return None
        batch = self._unsent[0]
        return memoryview(batch.buffer)[: batch.length]

    def mark_sent(self) -> None:
        """Record that the batch :meth:`next_unsent` returned has been written."""
        batch = self._unsent.popleft()
        self.sent = batch.end_count
        if len(batch.buffer) == self._capacity:  # not a one-message oversized buffer
            self._free.append(BatchEncoder.recycle(batch.buffer, batch.length))
        if self._release_on_send:
            self._release(batch.end_count)

    def ack(self, count: int) -> bool:
        """Take a cumulative ack count; True if it acknowledged more messages.

        Counts beyond :attr:`published` are capped; window space of every batch
        the count covers is released.
        """
        if count <= self.acked:
            return False
        self.acked = min(count, self.published)
        self._release(self.acked)
        return True

    def _release(self, count: int) -> None:
        inflight = self._inflight
        while inflight and inflight[0].end_count <= count:
            self.inflight_bytes -= inflight.popleft().length - BATCH_HEADER_SIZE
