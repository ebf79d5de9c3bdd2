"""The publish side without I/O: batches, the send queue and the in-flight window.

:class:`PublishBatches` is what a publisher knows about its messages apart
from its connections: it packs each record into the open batch through
:class:`~trio_embarcadero.wire.BatchEncoder` (the one writer of the batch
format), seals batches with consecutive sequence numbers into a queue for the
senders, keeps every batch until it is acknowledged so that a failed
connection's batches can be sent again, and keeps the in-flight window: the
record bytes published but not yet acknowledged, given back batch by batch.
:class:`SentBatches` maps one connection's cumulative ack counts back to the
batches sent on it. Neither imports Trio; the publisher's tasks drive them and
turn what :meth:`PublishBatches.append` reports into wake-ups.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from typing import TypeAlias

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


class SealedBatch:
    """A sealed batch: its bytes, its place in the publish order, and where it is.

    A batch stays with the publisher until it is acknowledged (or, at ack
    level 0, written once), so that it can be sent again, byte for byte and
    with the same ``batch_seq``, when the connection it went out on fails.

    Attributes:
        seq: Its ``batch_seq``.
        count: Its number of messages.
        end_count: Messages published up to and including its last one.
        record_bytes: Bytes of its records (what it holds of the window).
        data: Its wire bytes (header and records); None once acknowledged.
        sends: How many times a sender took it.
        written: A write of it has finished.
        writing: A sender is writing it right now.
        acked: It reached the ack level.
    """

    __slots__ = (
        "acked",
        "buffer",
        "count",
        "data",
        "end_count",
        "record_bytes",
        "sends",
        "seq",
        "writing",
        "written",
    )

    def __init__(self, seq: int, buffer: bytearray, length: int, count: int, end_count: int):
        self.seq = seq
        self.count = count
        self.end_count = end_count
        self.record_bytes = length - BATCH_HEADER_SIZE
        # The packing buffer, while the batch's bytes still live in it.
        self.buffer: bytearray | None = buffer
        self.data: memoryview | bytes | None = memoryview(buffer)[:length]
        self.sends = 0
        self.written = False
        self.writing = False
        self.acked = False

    def __repr__(self) -> str:
        return f"<SealedBatch {self.seq}: {self.count} messages, sent {self.sends}x>"


class SentBatches:
    """The batches written on one connection and not acknowledged yet (sans-IO).

    A same-connection ack count covers the first ``count`` messages sent on
    that connection; this maps it back to the batches, which may be any of
    the publisher's (another connection may have the ones in between).

    Attributes:
        count: Messages handed to this connection so far.
    """

    __slots__ = ("_batches", "count")

    def __init__(self) -> None:
        self.count = 0
        self._batches: deque[tuple[int, SealedBatch]] = deque()

    def __len__(self) -> int:
        return len(self._batches)

    def add(self, batch: SealedBatch) -> None:
        """``batch`` goes out on this connection next (call it before writing:
        the ack may arrive before the write returns)."""
        self.count += batch.count
        self._batches.append((self.count, batch))

    def ack(self, count: int) -> list[SealedBatch]:
        """The batches a cumulative count of this connection acknowledges
        that an earlier count did not."""
        batches = self._batches
        out = []
        while batches and batches[0][0] <= count:
            out.append(batches.popleft()[1])
        return out

    def take_all(self) -> list[SealedBatch]:
        """Every batch not acknowledged, oldest first; none is left."""
        out = [batch for _, batch in self._batches]
        self._batches.clear()
        return out


class PublishBatches:
    """A publisher's batches and window accounting (sans-IO).

    Sealed batches wait in a queue for a sender to :meth:`take` them; a
    batch taken is kept until :meth:`acknowledge` (or, with
    ``release_on_send``, until :meth:`mark_sent`), and a connection that
    fails gives its unacknowledged batches back with :meth:`requeue`: they are
    taken again before any newer one, in ``batch_seq`` order.

    Args:
        client_id: Written into every record and batch header.
        batch_bytes: Largest batch payload; a batch is sealed before a record
            would overflow it. A record larger than that travels alone.
        max_inflight_bytes: Record bytes that may be published and not yet
            released; :meth:`append` refuses a record beyond that, except into
            an empty window. It bounds the batches kept for sending again too.
        release_on_send: Give window space back when a batch is written rather
            than when it is acknowledged (ack level 0: no acks come, and a
            batch written is not sent again).
        max_unacked_batches: If not 0, :meth:`take` hands out a batch only
            while it is fewer than this many ``batch_seq`` ahead of the oldest
            batch not acknowledged (a publish session's window).

    Attributes:
        published: Messages packed so far; the next record's client order.
        sent: Messages whose batch :meth:`mark_sent` confirmed (each batch
            counted once, however often it was sent).
        acked: Messages acknowledged without a gap from the first: every
            batch up to the ``acked``-th message was acknowledged (later ones
            may have been as well, on other connections).
        batch_seq: Sequence number the next sealed batch gets.
        resent: Batches taken again after a :meth:`requeue`.
        inflight_bytes: Record bytes holding window space.
        max_inflight_bytes: The window size.
    """

    __slots__ = (
        "_capacity",
        "_encoder",
        "_free",
        "_inflight",
        "_max_unacked",
        "_ready",
        "_release_on_send",
        "acked",
        "batch_seq",
        "inflight_bytes",
        "max_inflight_bytes",
        "published",
        "resent",
        "sent",
    )

    def __init__(
        self,
        client_id: int,
        *,
        batch_bytes: int,
        max_inflight_bytes: int,
        release_on_send: bool,
        max_unacked_batches: int = 0,
    ) -> None:
        self.published = self.sent = self.acked = 0
        self._max_unacked = max_unacked_batches
        self.batch_seq = 0
        self.resent = 0
        self.inflight_bytes = 0
        self.max_inflight_bytes = max_inflight_bytes
        self._release_on_send = release_on_send
        self._capacity = BATCH_HEADER_SIZE + batch_bytes
        self._encoder = BatchEncoder(client_id, self._capacity)
        # Packing buffers no batch uses any more, reused for new ones.
        self._free: list[bytearray] = []
        # Sealed batches waiting for a sender, oldest batch_seq first.
        self._ready: deque[SealedBatch] = deque()
        # Batches not acknowledged yet, in batch_seq order (not with
        # release_on_send): the acked count advances over its front.
        self._inflight: deque[SealedBatch] = deque()

    @property
    def open_count(self) -> int:
        """Messages in the open (not yet sealed) batch."""
        return self._encoder.count

    @property
    def unsent(self) -> int:
        """Sealed batches waiting for a sender (new ones and requeued ones)."""
        return len(self._ready)

    @property
    def unacked(self) -> int:
        """Sealed batches not acknowledged yet (0 with ``release_on_send``)."""
        return len(self._inflight)

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
        count = encoder.count
        buffer, length = encoder.seal(
            self.batch_seq, free.pop() if free else bytearray(self._capacity)
        )
        batch = SealedBatch(self.batch_seq, buffer, length, count, self.published)
        self._ready.append(batch)
        if not self._release_on_send:
            self._inflight.append(batch)
        self.batch_seq += 1
        return True

    def take(self) -> SealedBatch | None:
        """The next batch to write, oldest ``batch_seq`` first, or None.

        The caller writes ``batch.data`` and then calls :meth:`mark_sent`,
        whether the write succeeded or not. None too while the next batch is
        beyond the window of ``max_unacked_batches``.
        """
        ready = self._ready
        if not ready:
            return None
        limit = self._max_unacked
        if limit and ready[0].seq - self._inflight[0].seq >= limit:
            return None  # beyond the session's window: wait for acks
        batch = ready.popleft()
        if batch.sends:
            self.resent += 1
        batch.sends += 1
        batch.writing = True
        return batch

    def mark_sent(self, batch: SealedBatch, *, written: bool = True) -> None:
        """The write of a batch :meth:`take` returned is over.

        Args:
            batch: The batch.
            written: It was written whole (False: the connection broke).
        """
        batch.writing = False
        if not written:
            if self._release_on_send:
                self.requeue([batch])  # nothing else keeps it
            elif batch.acked:
                self._recycle(batch)
            return
        if not batch.written:
            batch.written = True
            self.sent += batch.count
        if self._release_on_send:
            self.inflight_bytes -= batch.record_bytes
            self._recycle(batch)
        elif batch.acked:
            self._recycle(batch)
        elif batch.buffer is not None and 2 * batch.record_bytes < self._capacity:
            # Kept for sending again: a batch that fills less than half its
            # buffer is kept as a copy of its own size and the buffer is reused
            # at once, so a window of small batches holds little more memory
            # than their bytes.
            assert batch.data is not None
            batch.data = bytes(batch.data)
            self._recycle(batch)

    def acknowledge(self, batch: SealedBatch) -> bool:
        """``batch`` reached the ack level; True if it had not before.

        Its window space is released at once; :attr:`acked` advances over
        every batch acknowledged without a gap from the first.
        """
        if batch.acked:
            return False
        batch.acked = True
        self.inflight_bytes -= batch.record_bytes
        if not batch.writing:
            self._recycle(batch)
        inflight = self._inflight
        while inflight and inflight[0].acked:
            self.acked = inflight.popleft().end_count
        return True

    def requeue(self, batches: Iterable[SealedBatch]) -> None:
        """Queue ``batches`` (taken, not acknowledged) for sending again,
        ahead of newer ones, everything waiting in ``batch_seq`` order."""
        again = [batch for batch in batches if not batch.acked]
        if again:
            self._ready = deque(sorted((*again, *self._ready), key=_seq))

    def _recycle(self, batch: SealedBatch) -> None:
        buffer = batch.buffer
        if batch.acked or self._release_on_send:
            batch.data = None
        batch.buffer = None
        if buffer is not None and len(buffer) == self._capacity:  # not a one-record buffer
            self._free.append(BatchEncoder.recycle(buffer, batch.record_bytes + BATCH_HEADER_SIZE))


def _seq(batch: SealedBatch) -> int:
    return batch.seq
