"""Record-level total orders of an order-5 topic's batches (no Trio).

The sequencer (:mod:`.sequencer`) gives a batch its place: the header's
``total_order`` (that of its first record), its index entry and its
``ordered`` word. The ``total_order`` field of each of its records (record
``i`` gets the header's ``total_order + i``) is written afterwards by the
broker that stored the batch, from the header, and then its header's
stamped word (``BH_STAMPED``) is set to 1 (:func:`stamp_batches`). That
spreads the per-record stores over the brokers instead of putting them all
on the one that runs the sequencer.

So a batch may be ordered and not stamped yet (or never, while the broker
that stored it is down): a reader that hands records out takes their total
orders from the header or index entry, and stamps its copy when the stamped
word is not set yet (:func:`stamp_copy`). Both write the same values, so a
copy taken while the broker stamps is right either way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from ..wire import BATCH_HEADER_SIZE, MH_NEXT_MSG_DIFF, MH_PADDED_SIZE, MH_TOTAL_ORDER
from .layout import BH_STAMPED, BH_TOTAL_ORDER, U32

#: Batches of this many records each on average get a strided column each,
#: not one gather of every record's place.
_MANY_RECORDS = 64


def _store(view: npt.NDArray[Any], at: npt.NDArray[np.int64] | slice, values: Any) -> None:
    """``view[at] = values``: every store of record total orders goes through
    here, element by element in the order of ``at``, so a test can stop it
    anywhere, as a ``kill -9`` would."""
    view[at] = values


def is_stamped(buf: Any, header_offset: int) -> bool:
    """Whether the records of the batch at ``header_offset`` carry their total orders."""
    return bool(U32.unpack_from(buf, header_offset + BH_STAMPED)[0])


def stamp_batches(buf: Any, words: npt.NDArray[np.uint64], headers: Sequence[int]) -> None:
    """Write every record's ``total_order`` of the ordered batches at
    ``headers`` (from their headers' ``total_order``), then set their stamped
    words: the records of all of them first, so a batch is never marked
    stamped before its records are (a ``kill -9`` in between leaves it for
    the broker to stamp again when it starts).

    Args:
        buf: The region, mapped read-write.
        words: The same region as little-endian u64 words.
        headers: Header offsets of ordered batches (``ordered`` word 1).
    """
    if not headers:
        return
    at = np.array(headers, dtype=np.int64)
    num_msgs = words[at // 8 + 1] >> np.uint64(32)  # num_msg: the high half of word 1
    sizes = words[(at + 32) // 8].astype(np.int64)  # total_size
    firsts = words[(at + BH_TOTAL_ORDER) // 8]
    stamp_many(
        words, at + BATCH_HEADER_SIZE, num_msgs.astype(np.int64), sizes.tolist(),
        firsts.tolist(),
    )  # fmt: skip
    for header in headers:
        U32.pack_into(buf, header + BH_STAMPED, 1)


def stamp_many(
    words: npt.NDArray[np.uint64],
    payloads: npt.NDArray[np.int64],
    num_msgs: npt.NDArray[np.int64],
    sizes: list[int],
    firsts: list[int],
) -> None:
    """Write ``firsts[k] + i`` into the ``total_order`` of record ``i`` of
    each batch ``k``, whose payload (``sizes[k]`` bytes, ``num_msgs[k]``
    records) starts at byte ``payloads[k]`` of ``words``."""
    bases = payloads // 8
    records = int(num_msgs.sum())
    if records == len(bases):  # one record a batch
        _store(words, bases + MH_TOTAL_ORDER, np.array(firsts, dtype=np.uint64))
        return
    if records >= _MANY_RECORDS * len(bases):
        # Large batches: a strided column each costs less than finding
        # every record's place.
        for k, base in enumerate(bases.tolist()):
            stamp_batch(words, base, int(num_msgs[k]), sizes[k], firsts[k])
        return
    # Many small batches: every record's place at once. A batch of one
    # record size (the common case) is a strided column: record i at
    # word base + i * padded / 8.
    ends = np.cumsum(num_msgs)
    padded = words[bases + MH_PADDED_SIZE].astype(np.int64)
    even = (padded * num_msgs == np.asarray(sizes)) & (padded % 8 == 0) & (padded > 0)
    strides = np.where(even, padded // 8, 0)
    batch_of = np.repeat(np.arange(len(bases)), num_msgs)
    within = np.arange(records) - np.repeat(ends - num_msgs, num_msgs)
    at = np.repeat(bases, num_msgs) + within * strides[batch_of]
    # Sizes that merely add up like one size are walked record by record.
    uneven = ~even
    uneven[batch_of[words[at + MH_PADDED_SIZE].astype(np.int64) != padded[batch_of]]] = True
    for k in np.flatnonzero(uneven).tolist():
        start = int(ends[k] - num_msgs[k])
        at[start : int(ends[k])] = record_words(words, int(bases[k]), int(num_msgs[k]))
    values = np.repeat(np.array(firsts, dtype=np.uint64), num_msgs) + within.astype(np.uint64)
    _store(words, at + MH_TOTAL_ORDER, values)


def stamp_batch(
    words: npt.NDArray[np.uint64], base: int, num_msg: int, total_size: int, first: int
) -> None:
    """Write ``first + i`` into the ``total_order`` of record ``i`` of the
    batch whose payload (``total_size`` bytes) starts at word ``base``."""
    if num_msg == 1:
        _store(words, slice(base + MH_TOTAL_ORDER, base + MH_TOTAL_ORDER + 1), np.uint64(first))
        return
    padded = int(words[base + MH_PADDED_SIZE])
    step = padded // 8
    stop = base + num_msg * step
    values = np.arange(first, first + num_msg, dtype=np.uint64)
    if (
        padded * num_msg == total_size
        and padded % 8 == 0
        and padded
        and bool((words[base:stop:step] == padded).all())
    ):
        # One record size (the common case): a strided column.
        _store(words, slice(base + MH_TOTAL_ORDER, stop, step), values)
    else:
        _store(words, record_words(words, base, num_msg) + MH_TOTAL_ORDER, values)


def record_words(words: npt.NDArray[np.uint64], base: int, num_msg: int) -> npt.NDArray[np.int64]:
    """The first words of the records of the batch whose payload starts at
    word ``base``, followed record by record."""
    at = np.empty(num_msg, dtype=np.int64)
    word = base
    for k in range(num_msg):
        at[k] = word
        word += int(words[word + MH_NEXT_MSG_DIFF]) // 8
    return at


def stamp_copy(records: npt.NDArray[np.uint8], num_msg: int, first: int) -> None:
    """Write ``first + i`` into the ``total_order`` of record ``i`` of
    ``records``, a copy of a batch's payload (a whole number of 64-byte
    units, as every payload is) that a reader hands out."""
    words = records.view("<u8")
    stamp_batch(words, 0, num_msg, len(records), first)
