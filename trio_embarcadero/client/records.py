"""The subscribe side without I/O: message records out of received bytes.

A subscription stream is message records back to back, in logical-offset
order, possibly ended by one error frame. :class:`RecordDecoder` owns the
buffer the bytes are received into; each receive's whole records become one
:class:`MessageBatch`, the partial record at the end waits for the next
receive. It imports no Trio: the subscriber receives into
:meth:`RecordDecoder.receive_buffer` and reports how many bytes arrived.

Per-message Python work is what limits a subscriber, so a receive's records
are decoded together: the walk from record to record by ``paddedSize`` takes
one strided numpy comparison per run of equal-sized records (one per receive
when every message has the same size), the headers are copied as one array
whose columns are the fields, checked with a few vector operations. A
:class:`~trio_embarcadero.wire.Message` is a tuple built in C from fields
prepared for the whole batch (equal-sized payloads copied by numpy in one
loop, others sliced from one copy of the received bytes), so handing one out
takes a few bytecodes.

An ordered subscription (``client_req = 3``) has a 16-byte ``BatchMetadata``
in front of each batch's records; there the decoder follows total orders
(every record's ``total_order`` field) instead of logical offsets, and hands
them out as the messages' ``offset``.

One broker's stream of an order-5 topic (``client_req = 1``) has the same
framing, which the decoder tells from a bare record by the stream's first
bytes (the ``BatchMetadata``'s version word, where a record has the high
half of its ``segment_header``, 0). Its batches come in total order, so their
logical offsets rise but where the sequencer ordered a batch after later
ones of the stream (a publish session's batch that waited for its
predecessor); and after a reconnect the broker sends again what was handed
out above the point the subscriber resumed from. There :attr:`RecordDecoder.position`
is the lowest offset not handed out yet (every one below it was), and the
decoder keeps the spans handed out above it, to drop what comes again. A
batch that never comes (one the sequencer never ordered, or that retention
let go first) keeps the position at its first offset: a reconnect then gets
everything after it again, which is dropped, and its span of offsets stays
apart in the list.

"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Callable, Iterator
from functools import partial
from itertools import repeat
from typing import Any, cast

import attrs
import numpy as np
import numpy.typing as npt

from ..errors import BrokerError, ErrorCode, ProtocolError
from ..wire import (
    ALIGN,
    BATCH_METADATA,
    BATCH_METADATA_VERSION,
    ERROR_FRAME_HEAD,
    ERROR_MARKER,
    MESSAGE_HEADER_SIZE,
    MH_CLIENT_ID,
    MH_CLIENT_ORDER,
    MH_LOGICAL_OFFSET,
    MH_PADDED_SIZE,
    MH_SIZE,
    MH_TOTAL_ORDER,
    Message,
    MessageView,
)

#: Largest record a subscriber accepts; anything larger is a corrupt stream.
MAX_RECORD_BYTES = 1 << 30
#: Free space offered to each receive, at least.
RECEIVE_SIZE = 1 << 16
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
# The first run of a receive is compared in one go, as far as records fit (a
# receive of equal-sized records costs one comparison). After a record of
# another size, a run is compared this many records ahead at first, twice as
# many after each comparison that finds no other size: mixed sizes cost no
# comparisons far ahead, long runs a few comparisons.
_SHORT_WINDOW = 16
# The eight u64 words of a record header, as offsets from its first word.
_HEADER_WORDS = np.arange(MESSAGE_HEADER_SIZE // 8)
#: Builds a Message from its four fields in one tuple (as ``message_fields``
#: yields them): ``tuple.__new__`` in C, without the Python call of
#: ``Message.__new__``, which costs as much again.
make_message = cast(
    "Callable[[tuple[bytes, int, int, int]], Message]", partial(tuple.__new__, Message)
)
# ``tuple.__new__`` itself, for ``map`` with the class as its first argument:
# one C call per message, no ``partial`` in between.
_new_tuple = cast("Callable[[type[Message], tuple[bytes, int, int, int]], Message]", tuple.__new__)
_new_view = cast(
    "Callable[[tuple[memoryview, int, int, int]], MessageView]",
    partial(tuple.__new__, MessageView),
)

Int64Array = npt.NDArray[np.int64]


@attrs.frozen(eq=False, repr=False)
class MessageBatch:
    """The messages one receive completed, without copying them.

    What :meth:`Subscriber.batches <trio_embarcadero.client.Subscriber.batches>`
    and :meth:`Subscriber.receive_batch
    <trio_embarcadero.client.Subscriber.receive_batch>` hand out: at least one
    message, consecutive in the stream. ``data`` is a read-only view of the
    subscriber's receive buffer holding the records exactly as they arrived
    (64-byte headers, payloads, padding); message ``i``'s payload is
    ``data[starts[i] : starts[i] + sizes[i]]``. The per-message fields are
    numpy arrays, so a reader can work on a whole batch with vector
    operations, or hand ``data`` on as it is.

    ``data``, and the views :meth:`payload` and :meth:`views` return, are
    **valid only until the subscriber's next receive**: after that the buffer
    is reused and they show other messages' bytes. The arrays are the batch's
    own and stay valid; :meth:`messages` copies what is to be kept.

    Attributes:
        data: The records' bytes (read-only), valid until the next receive.
        starts: Where each message's payload begins in ``data`` (int64).
        sizes: Each payload's length in bytes (int64).
        offsets: Each message's logical offset (int64), ascending. They are
            consecutive except where the broker's retention had reclaimed
            messages (see :attr:`Subscriber.skipped
            <trio_embarcadero.client.Subscriber.skipped>`). On one broker's
            stream of an order-5 topic they rise within each of its batches,
            and the batches come in total order (see the module's docs).
        client_ids: The id of each message's publisher (int64).
        client_orders: Each message's index among its publisher's messages
            (int64).
    """

    data: memoryview
    starts: Int64Array
    sizes: Int64Array
    offsets: Int64Array
    client_ids: Int64Array
    client_orders: Int64Array

    def __len__(self) -> int:
        """The number of messages (at least 1)."""
        return len(self.offsets)

    def __repr__(self) -> str:
        return (
            f"<MessageBatch of {len(self)} messages, offsets {self.first_offset}"
            f"..{self.last_offset}, {self.payload_bytes} payload bytes>"
        )

    @property
    def first_offset(self) -> int:
        """The logical offset of the first message."""
        return int(self.offsets[0])

    @property
    def last_offset(self) -> int:
        """The logical offset of the last message."""
        return int(self.offsets[-1])

    @property
    def payload_bytes(self) -> int:
        """The payload bytes of all its messages (headers and padding excluded)."""
        return int(self.sizes.sum())

    def payload(self, index: int) -> memoryview:
        """Message ``index``'s payload: a view, valid until the next receive."""
        start = int(self.starts[index])
        return self.data[start : start + int(self.sizes[index])]

    def messages(self) -> list[Message]:
        """Every message as a :class:`~trio_embarcadero.wire.Message`, its
        payload a copy (``bytes``) that stays valid."""
        return list(self.iter_messages())

    def iter_messages(self) -> Iterator[Message]:
        """Every message as a :class:`~trio_embarcadero.wire.Message`, built
        as the iterator is advanced (its payload a copy, as for
        :meth:`messages`).

        For a reader that takes its messages one at a time: a Message is a
        tuple the garbage collector tracks, so building each only when it is
        wanted keeps few of them alive at once, which costs the collector
        less than a list of them all. Each is built in C (``tuple.__new__``
        called by ``map``), without a Python frame per message.
        """
        return map(_new_tuple, repeat(Message), self.message_fields())

    def message_fields(self) -> Iterator[tuple[bytes, int, int, int]]:
        """The fields of every message as a :class:`~trio_embarcadero.wire.Message`
        has them, its payload a copy; :func:`make_message` makes one of each."""
        return zip(self._payload_copies(), *self._fields(), strict=True)

    def _payload_copies(self) -> list[bytes]:
        """Every payload as ``bytes`` of its own."""
        starts, sizes = self.starts, self.sizes
        count = len(starts)
        if count > 1:
            size = int(sizes[0])
            step = int(starts[1] - starts[0])
            if (sizes == size).all() and (np.diff(starts) == step).all():
                # Equal payloads at equal distances (a run of one message
                # size, the usual stream): numpy makes them ``bytes`` in one C
                # loop, one copy each, as items of a strided array of
                # fixed-size raw values.
                strided = np.ndarray(
                    (count,), dtype=f"V{size}", buffer=self.data, offset=int(starts[0]),
                    strides=(step,),
                )  # fmt: skip
                payloads: list[bytes] = strided.tolist()
                return payloads
        starts_list = starts.tolist()
        ends = (starts + sizes).tolist()
        if count == 1:  # a large record is copied once, not twice
            return [self.data[starts_list[0] : ends[0]].tobytes()]
        # One copy of the received bytes; slicing bytes from it costs no
        # more than slicing views.
        chunk = self.data.tobytes()
        return [chunk[start:end] for start, end in zip(starts_list, ends, strict=True)]

    def views(self) -> list[MessageView]:
        """Every message as a :class:`~trio_embarcadero.wire.MessageView`,
        its payload a view valid until the next receive."""
        slices = map(slice, self.starts.tolist(), (self.starts + self.sizes).tolist())
        payloads = list(map(self.data.__getitem__, slices))
        return list(map(_new_view, zip(payloads, *self._fields(), strict=True)))

    def since(self, offset: int) -> MessageBatch:
        """The messages from the one with logical offset ``offset`` (one of
        the batch's offsets) on, as a batch."""
        # Found by value: one broker's stream of an order-5 topic has its
        # batches in total order, their offsets not ascending throughout.
        first = int(np.flatnonzero(self.offsets == offset)[0])
        cut = int(self.starts[first]) - MESSAGE_HEADER_SIZE
        return MessageBatch(
            self.data[cut:],
            self.starts[first:] - cut,
            self.sizes[first:],
            self.offsets[first:],
            self.client_ids[first:],
            self.client_orders[first:],
        )

    def _fields(self) -> tuple[list[int], list[int], list[int]]:
        return self.offsets.tolist(), self.client_ids.tolist(), self.client_orders.tolist()


class RecordDecoder:
    """Turns a subscription's byte stream into messages (sans-IO).

    Args:
        position: Logical offset (ordered: total order) of the first record expected.
        buffer_bytes: Initial buffer size; it grows for larger records.
        ordered: The stream has a ``BatchMetadata`` in front of each batch,
            and records follow total orders (``client_req = 3``).

    Attributes:
        position: Logical offset of the next record expected; on one
            broker's stream of an order-5 topic, the lowest one not handed
            out yet (see the module's docs).
        framed: Whether the stream has a ``BatchMetadata`` in front of each
            batch; None until its first bytes show it.
        skipped: Messages the stream jumped over: the broker's retention had
            reclaimed them before they could be sent (offsets only ever move
            forward; a jump is not corruption). Not counted on one broker's
            stream of an order-5 topic, whose offsets do not only move forward.
        error: Set once the stream holds an error frame or an invalid record;
            every message before it has been returned, and nothing after it
            is decoded.
    """

    def __init__(self, position: int, buffer_bytes: int, *, ordered: bool = False) -> None:
        self.position = position
        self.ordered = ordered
        self.framed: bool | None = True if ordered else None
        self._batch_left = 0  # framed: records of the batch still due
        # Framed, not ordered: the spans [first, end) of offsets handed out
        # above ``position``, in order and apart.
        self._handed_out: list[tuple[int, int]] = []
        self.skipped = 0
        self.error: BrokerError | ProtocolError | None = None
        self._start = 0  # first byte not decoded yet
        self._end = 0  # end of the received bytes
        self._new_buffer(max(buffer_bytes, 2 * RECEIVE_SIZE))

    def _new_buffer(self, size: int) -> None:
        # Whole u64 words, so the word view covers every byte of it.
        self._buffer = bytearray(-(-size // ALIGN) * ALIGN)
        self._view = memoryview(self._buffer)
        self._words: npt.NDArray[np.uint64] = np.frombuffer(self._buffer, dtype="<u8")

    def restart(self) -> None:
        """Forget what is left of a stream that ended (the start of a record, a
        batch's framing, an error): a new stream starts at :attr:`position`.

        Views handed out earlier stay valid until the next
        :meth:`receive_buffer` call, as they would without a restart.
        """
        self._start = self._end = 0
        self._batch_left = 0
        self.error = None

    @property
    def pending(self) -> int:
        """Bytes received that do not form a whole record yet."""
        return self._end - self._start

    def receive_buffer(self) -> memoryview:
        """Where to receive the next bytes: the free space after the bytes
        still pending.

        Pending bytes (the start of a record) are moved to the front first, so
        each receive gets all the room the buffer has: at least
        :data:`RECEIVE_SIZE` bytes and the rest of a partial record whose size
        is known (the buffer grows for that). Views handed out earlier stay
        valid until this call.
        """
        start, end = self._start, self._end
        pending = end - start
        need = RECEIVE_SIZE
        if pending >= _U64.size and self.error is None and self._at_record():
            # The rest of the record, if its paddedSize is valid (a record
            # that is not ends the stream, and no buffer is grown for it).
            (padded,) = _U64.unpack_from(self._buffer, start)
            if padded <= MAX_RECORD_BYTES:
                need = max(need, padded - pending)
        if pending + need > len(self._buffer):
            # A new buffer: views handed out earlier keep the old one alive.
            old = self._view
            self._new_buffer(max(2 * len(self._buffer), pending + need))
            self._buffer[:pending] = old[start:end]
        elif start:
            self._buffer[:pending] = self._view[start:end]
        self._start, self._end = 0, pending
        return self._view[pending:]

    def feed(self, nbytes: int) -> list[Message]:
        """Take ``nbytes`` received into :meth:`receive_buffer`; return the
        messages they complete, their payloads copied."""
        batch = self.feed_batch(nbytes)
        return [] if batch is None else batch.messages()

    def feed_views(self, nbytes: int) -> list[MessageView]:
        """As :meth:`feed`, but the payloads are views of the buffer, valid
        until the next :meth:`receive_buffer` call."""
        batch = self.feed_batch(nbytes)
        return [] if batch is None else batch.views()

    def feed_batch(self, nbytes: int) -> MessageBatch | None:
        """As :meth:`feed`, but the messages as one :class:`MessageBatch`
        (None if ``nbytes`` completed none), valid until the next
        :meth:`receive_buffer` call."""
        self._end += nbytes
        if self.error is not None:
            return None
        runs, stop, bad_size = self._walk()
        batch = None
        if runs:
            batch = self._check(runs, stop)
        else:
            self._start = stop
        if bad_size is not None and self.error is None:
            self.error = ProtocolError(
                ErrorCode.BAD_MESSAGE_RECORDS,
                f"record at offset {self.position} has paddedSize {bad_size}",
            )
        return batch

    def _walk(self) -> tuple[list[tuple[int, int, int]], int, int | None]:
        """The whole records from ``_start`` on, as runs ``(position, count,
        paddedSize)`` of equal-sized records; where the walk stopped (at a
        partial record, an invalid paddedSize or an error frame, which sets
        :attr:`error`); and the invalid paddedSize it stopped at, if any."""
        buf, words = self._buffer, self._words
        unpack = _U64.unpack_from
        pos, end = self._start, self._end
        runs: list[tuple[int, int, int]] = []
        bad_size = None
        window = end - pos  # no limit for the first run
        if self.framed is None:
            if end - pos < BATCH_METADATA.size:
                return runs, pos, bad_size
            if unpack(buf, pos)[0] != ERROR_MARKER:
                # A BatchMetadata's version (1) and flags (0), or the high
                # half of a record's segment_header (0).
                self.framed = _U32.unpack_from(buf, pos + 12)[0] == BATCH_METADATA_VERSION
        while end - pos >= _U64.size:
            if self._at_metadata():
                if unpack(buf, pos)[0] == ERROR_MARKER:
                    pos = self._error_frame(pos, end)
                    break
                if end - pos < BATCH_METADATA.size:
                    break
                if not self._metadata(pos):
                    break
                pos += BATCH_METADATA.size
                continue
            (padded,) = unpack(buf, pos)
            if padded < MESSAGE_HEADER_SIZE or padded % ALIGN or padded > MAX_RECORD_BYTES:
                if padded == ERROR_MARKER:
                    pos = self._error_frame(pos, end)
                else:
                    bad_size = padded
                break
            fit = (end - pos) // padded
            if self.framed:
                fit = min(fit, self._batch_left)  # a run never crosses into the next batch
            if not fit:
                break
            count = 1
            if fit > 1 and unpack(buf, pos + padded)[0] == padded:
                # A run: how far do records of this size go on back to back?
                count = min(fit, window)
                step = padded // _U64.size
                first = pos // _U64.size
                other = words[first : first + count * step : step] != padded
                if other.any():
                    count = int(other.argmax())
                    window = _SHORT_WINDOW
                else:
                    window *= 2
            runs.append((pos, count, padded))
            pos += count * padded
            if self.framed:
                self._batch_left -= count
        return runs, pos, bad_size

    def _check(self, runs: list[tuple[int, int, int]], stop: int) -> MessageBatch | None:
        """Check the records of ``runs`` (whole, with valid paddedSizes), up
        to ``stop``; the batch of those before the first bad one."""
        # Every header, copied in one go; fields are its columns. Values of
        # 2**63 and more are negative here, so they fail the checks below.
        words = self._words
        if len(runs) == 1:  # equal sizes: the headers are rows of a strided view
            pos, count, step = runs[0]
            starts = np.arange(pos, pos + count * step, step, dtype=np.int64)
            first = pos // _U64.size
            rows = words[first : first + count * step // _U64.size]
            heads = rows.reshape(count, -1)[:, : len(_HEADER_WORDS)].copy().view(np.int64)
        else:
            starts = _run_starts(runs)
            heads = words[(starts // _U64.size)[:, None] + _HEADER_WORDS].view(np.int64)
        padded = heads[:, MH_PADDED_SIZE]
        sizes = heads[:, MH_SIZE]
        # An ordered stream's messages are numbered by their total order.
        offsets = heads[:, MH_TOTAL_ORDER if self.ordered else MH_LOGICAL_OFFSET]
        bad = sizes > padded - MESSAGE_HEADER_SIZE
        bad |= sizes < 0
        if not self._any_order:
            # Offsets only move forward: each above the one before (retention
            # may have reclaimed some in between), the first at least the one due.
            bad[1:] |= offsets[1:] <= offsets[:-1]
            bad[0] |= int(offsets[0]) < self.position
        if bad.any():
            first_bad = int(bad.argmax())
            due = self.position if not first_bad else int(offsets[first_bad - 1]) + 1
            words = heads[first_bad].view(np.uint64)
            self.error = ProtocolError(
                ErrorCode.BAD_MESSAGE_RECORDS,
                f"record with {self._numbering} {int(offsets[first_bad])} and size "
                f"{int(words[MH_SIZE])} (paddedSize {int(padded[first_bad])}) where "
                f"offset {due} was due",
            )
            stop = int(starts[first_bad])
            if not first_bad:
                self._start = stop
                return None
            heads, starts = heads[:first_bad], starts[:first_bad]
        self._start = stop
        if self._any_order:
            fresh = self._not_handed_out(offsets[: len(heads)])
            if not fresh.all():  # sent again after a reconnect: handed out before
                heads, starts = heads[fresh], starts[fresh]
                if not len(heads):
                    return None
            self._hand_out(heads[:, MH_LOGICAL_OFFSET])
        else:
            count = len(heads)
            last = int(heads[-1, MH_TOTAL_ORDER if self.ordered else MH_LOGICAL_OFFSET])
            self.skipped += last - self.position - (count - 1)
            self.position = last + 1
        first = int(starts[0])
        return MessageBatch(
            self._view[first:stop].toreadonly(),
            starts - (first - MESSAGE_HEADER_SIZE),
            heads[:, MH_SIZE],
            heads[:, MH_TOTAL_ORDER if self.ordered else MH_LOGICAL_OFFSET],
            heads[:, MH_CLIENT_ID],
            heads[:, MH_CLIENT_ORDER],
        )

    @property
    def _any_order(self) -> bool:
        """One broker's stream of an order-5 topic: offsets in its batches'
        total order (see the module's docs)."""
        return bool(self.framed) and not self.ordered

    def _not_handed_out(self, offsets: Int64Array) -> npt.NDArray[np.bool_]:
        """Which of ``offsets`` were not handed out yet."""
        fresh: npt.NDArray[np.bool_] = offsets >= self.position
        if self._handed_out:
            spans = np.array(self._handed_out, dtype=np.int64)
            at = np.searchsorted(spans[:, 0], offsets, side="right") - 1
            fresh &= ~((at >= 0) & (offsets < spans[np.maximum(at, 0), 1]))
        return fresh

    def _hand_out(self, offsets: Int64Array) -> None:
        """Note ``offsets`` (runs of consecutive ones) as handed out, and move
        :attr:`position` up over what now is handed out below it."""
        breaks = np.flatnonzero(np.diff(offsets) != 1) + 1
        firsts = offsets[np.r_[0, breaks]].tolist()
        lasts = offsets[np.r_[breaks - 1, len(offsets) - 1]].tolist()
        spans = self._handed_out
        for first, last in zip(firsts, lasts, strict=True):
            end = last + 1
            i = bisect.bisect_left(spans, (first, end))
            if i and spans[i - 1][1] >= first:  # joins the span before
                i -= 1
                first, end = spans[i][0], max(end, spans[i][1])
                del spans[i]
            while i < len(spans) and spans[i][0] <= end:  # and those after
                end = max(end, spans[i][1])
                del spans[i]
            spans.insert(i, (first, end))
        while spans and spans[0][0] <= self.position:
            self.position = max(self.position, spans.pop(0)[1])

    @property
    def _numbering(self) -> str:
        return "total order" if self.ordered else "logical offset"

    def _metadata(self, pos: int) -> bool:
        """Take the ``BatchMetadata`` at ``pos``; False (and :attr:`error`)
        if it is not a valid one."""
        first, count, version, flags = BATCH_METADATA.unpack_from(self._buffer, pos)
        # Total orders rise on an ordered stream; not on one broker's stream
        # of an order-5 topic, whose disk tier part is in stream order.
        behind = self.ordered and first < self.position
        if (version, flags) != (BATCH_METADATA_VERSION, 0) or not count or behind:
            self.error = ProtocolError(
                ErrorCode.BAD_MESSAGE_RECORDS,
                f"BatchMetadata (total order {first}, {count} records, version {version}, "
                f"flags {flags}) where total order {self.position} was due",
            )
            return False
        self._batch_left = count
        return True

    def _at_metadata(self) -> bool:
        """Whether a ``BatchMetadata`` is due next (framed streams)."""
        return bool(self.framed) and not self._batch_left

    def _at_record(self) -> bool:
        """Whether a record is due next (not known before the stream's first bytes)."""
        return self.framed is False or (bool(self.framed) and self._batch_left > 0)

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


def _run_starts(runs: list[tuple[int, int, int]]) -> Int64Array:
    """The start of every record of ``runs`` (see ``RecordDecoder._walk``)."""
    table: Any = np.array(runs, dtype=np.int64)
    counts = table[:, 1]
    run_of = np.repeat(np.arange(len(runs)), counts)
    # Each record's index within its run, times the run's paddedSize.
    within = np.arange(len(run_of)) - (np.cumsum(counts) - counts)[run_of]
    starts: Int64Array = table[run_of, 0] + within * table[run_of, 2]
    return starts
