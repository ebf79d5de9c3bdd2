"""The subscribe session: stream a topic's committed records to one subscriber.

It is handed the log, the commit feed to wait on, its connection (whose
stop signal ends it at a batch boundary) and its send timeout; nothing else
of the broker. Each subscriber has its own task (the connection's) and sends
straight from the log mapping, one batch's records per write, so a slow
subscriber only ever waits on its own socket: publishers and other
subscribers never wait for it, and its buffering is the kernel's socket
buffer. A write (one batch's records) that does not finish within
``subscriber_send_timeout_s`` closes the subscriber, so one that stopped
reading cannot hold its connection, or a graceful shutdown, forever. It wakes on
commits of its stream (no polling) and never sends a record of a batch that
is not committed, because it only reads batches in the stream's committed
index.

With a disk log (``storage.dir``) the region is a cache of it: offsets the
region no longer holds are read from the disk log, one synced batch at a
time on a worker thread, and sent exactly as the region would have sent
them; once the wanted offset is back in the region the stream goes on from
there.

On an order-5 topic, the stream of this broker (``client_req = 1``) reads
the topic's ordered index in the region, this broker's entries: its
batches in total order, each with a ``BatchMetadata`` in front of its
records, and never a batch that is never ordered. A publish session's batch
the sequencer ordered after later batches of the stream so comes after
them, its offsets below theirs. The part only the disk tier holds comes in
stream order (the index entries of segments let go are gone; the disk log
holds each batch ordered). ``client_req = 3`` reads the same index (every
broker's batches) from the total order ``last_addr`` on. Both wake when
this process orders batches (the head) and every
``cxl.sequencer_interval_ms`` otherwise.
"""

from __future__ import annotations

import bisect
import logging

import numpy as np
import numpy.typing as npt
import trio

from ..errors import ConnectionLost, ErrorCode, ProtocolError, StorageError
from ..log import CxlLog, DiskLog, Stream
from ..log.disk import DiskBatch
from ..log.layout import (
    BH_ORDERED,
    NEVER_ORDERED,
    U32,
    IndexEntry,
    generation_holding,
    read_topic_order,
)
from ..log.ordered import OrderedIndex, cut_records
from ..log.region import CommittedBatch
from ..log.stamps import is_stamped, stamp_copy
from ..wire import (
    BATCH_METADATA,
    BATCH_METADATA_VERSION,
    ClientRequest,
    Handshake,
    encode_batch_metadata,
    scan_records,
)
from .commits import CommitFeed
from .connection import Connection

logger = logging.getLogger(__name__)


async def serve_subscriber(
    connection: Connection,
    handshake: Handshake,
    log: CxlLog,
    commits: CommitFeed,
    send_timeout: float,
    disk: DiskLog | None = None,
) -> None:
    """Send ``handshake.topic``'s records from logical offset ``last_addr`` on.

    Offsets below the region's start are read from ``disk`` while it holds them.

    Returns when the subscriber closes its side, or when one write to it
    did not finish within ``send_timeout`` seconds (logged; the stream is
    then cut inside a batch, so no error frame can follow); raises
    :class:`ProtocolError` (``SHUTTING_DOWN``) when the broker stops, and
    (``NOT_ALLOWED``) when the topic was deleted meanwhile.
    """
    ended: ProtocolError | None = None
    # Stays False when the watcher ends the nursery first (the subscriber
    # left): then there is nobody to send error 5 to.
    at_boundary = False
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_watch_for_close, connection, nursery.cancel_scope)
        try:
            if handshake.request == ClientRequest.SUBSCRIBE_ORDERED:
                at_boundary = await _send_ordered(connection, handshake, log, commits, send_timeout)
            else:
                at_boundary = await _send_records(
                    connection, handshake, log, commits, send_timeout, disk
                )
        except ProtocolError as exc:  # raised after the nursery: a plain exception
            ended = exc
        nursery.cancel_scope.cancel()
    if ended is not None:
        raise ended
    if connection.stopping and at_boundary:
        raise ProtocolError(ErrorCode.SHUTTING_DOWN, "broker is shutting down")


def _check_not_deleted(log: CxlLog, stream: Stream) -> None:
    """End a subscriber whose topic was deleted (``delete-topic``): its
    offsets are gone, and a topic of that name starts again from 0."""
    if log.existing_stream(stream.topic) is not stream:
        raise ProtocolError(ErrorCode.NOT_ALLOWED, f"topic {stream.topic!r} was deleted")


async def _watch_for_close(connection: Connection, scope: trio.CancelScope) -> None:
    # A subscriber sends nothing after its handshake; anything it sends is
    # ignored, and its EOF ends the subscription at once, even while idle.
    try:
        while await connection.stream.receive_some(65536):
            pass
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    logger.info("conn %d %s: subscriber left", connection.id, connection.peer)
    scope.cancel()


async def _send_records(
    connection: Connection,
    handshake: Handshake,
    log: CxlLog,
    commits: CommitFeed,
    send_timeout: float,
    disk: DiskLog | None,
) -> bool:
    """Send records until the broker stops or the subscriber goes.

    Returns whether the stream ended at a record boundary (False: a write
    was cut short after ``send_timeout``).
    """
    topic = handshake.topic
    stream: Stream | None = log.existing_stream(topic)
    while stream is None:
        with connection.at_boundary():
            await commits.wait_commit(topic)
        if connection.stopping:
            return True
        stream = log.existing_stream(topic)
    wanted = handshake.last_addr
    logger.debug(
        "conn %d %s subscribes to %r from %d", connection.id, connection.peer, topic, wanted
    )
    if read_topic_order(log.region, log.geometry, stream.topic_index) == 5:
        return await _send_own_ordered(connection, log, stream, wanted, commits, send_timeout, disk)
    region = log.region
    while True:
        while wanted >= stream.next_offset:
            _check_not_deleted(log, stream)
            with connection.at_boundary():
                await commits.wait_commit(topic)
            if connection.stopping:
                return True
        _check_not_deleted(log, stream)
        if disk is not None:
            on_disk_from = disk.first_offset(topic)
            if on_disk_from is not None and wanted < on_disk_from:
                # With a disk tier the stream begins where its disk log does:
                # retention trimmed it there (the region follows at its next
                # pass), or it began after retention trimmed the region.
                wanted = _skip_to(connection, topic, wanted, on_disk_from)
                continue
        if wanted < stream.start_offset and disk is not None:
            # The region let these go (they were durable): the disk tier has them.
            from_disk = await _send_disk_batch(connection, disk, topic, wanted, send_timeout, False)
            if from_disk is not None:
                ended, wanted = from_disk
                if ended is not None:
                    return ended
                if connection.stopping:
                    return True
                continue
        if wanted < stream.start_offset:
            # Retention reclaimed these: the stream goes on from its start
            # (the subscriber sees the offsets jump; they are not missing).
            wanted = _skip_to(connection, topic, wanted, stream.start_offset)
        i = bisect.bisect_right(stream.index_first, wanted) - 1
        batch = stream.committed_batch(stream.first_batch + i)
        start = batch.payload_offset
        end = start + batch.total_size
        skip = wanted - batch.first_offset
        if skip > 0:
            starts = scan_records(region[start:end], batch.num_msg)
            start += int(starts[skip])
        # Retention must not reuse the bytes while the socket still reads them.
        with stream.pinned(batch.header_offset):
            ended = await _send(connection, region[start:end].data, send_timeout)
        if ended is not None:
            return ended
        wanted = batch.first_offset + batch.num_msg
        # A shutdown stops the stream at the next batch boundary, also while
        # the subscriber is catching up, so the error frame follows a record.
        if connection.stopping:
            return True


async def _send_own_ordered(
    connection: Connection,
    log: CxlLog,
    stream: Stream,
    wanted: int,
    commits: CommitFeed,
    send_timeout: float,
    disk: DiskLog | None,
) -> bool:
    """``client_req = 1`` on an order-5 topic: this broker's batches that hold
    a logical offset ``wanted`` or later, each once ordered and behind its
    ``BatchMetadata``, in total order (the topic's ordered index, this
    broker's entries); like :func:`_send_records`.

    What the region let go is read from ``disk`` in stream order, as far as
    the region's start; then the index goes on with the batches from there.

    The offsets sent rise but where the sequencer ordered a publish
    session's batch after later ones of the stream, so where the stream
    stands is not one offset: ``floor`` is the lowest offset not sent yet
    (every one below it was sent, or is in a batch never ordered), and
    ``sent`` the batches sent above it (the first offset sent of each, and
    its end). The floor is what the disk tier and retention are checked
    against: it falls below the region's start only when the region let a
    batch go that was not sent yet, which the disk tier then sends (or the
    stream skips, without one), and the index skips once it gets there.
    """
    topic = stream.topic
    region = log.region
    index = OrderedIndex(region, log.geometry, stream.topic_index)
    floor = wanted
    sent: dict[int, int] = {}
    k = 0  # the next index entry to look at
    while True:
        _check_not_deleted(log, stream)
        floor = _raise_floor(stream, region, floor, sent)
        jump_to = floor
        if disk is not None:
            on_disk_from = disk.first_offset(topic)
            if on_disk_from is not None and floor < on_disk_from:
                jump_to = on_disk_from  # as for an order-0 topic, above
        if jump_to == floor and floor < stream.start_offset and disk is not None:
            from_disk = await _send_disk_batch(connection, disk, topic, floor, send_timeout, True)
            if from_disk is not None:
                ended, floor = from_disk
                if ended is not None:
                    return ended
                if connection.stopping:
                    return True
                continue
        if jump_to == floor and floor < stream.start_offset:
            jump_to = stream.start_offset
        if jump_to != floor:
            floor = _skip_to(connection, topic, floor, jump_to)
            for first in [first for first in sent if first < floor]:
                del sent[first]
            continue
        count = index.count()
        k = index.next_of_broker(stream.broker_id, k, count, floor)
        if k >= count:
            if await _wait_for_order(connection, commits):
                return True
            continue
        entry, k = _take_entry(index, k)
        if entry is None:
            continue
        header_offset = entry.header_offset
        if entry.broker_id != stream.broker_id or not any(
            segment.start <= header_offset < segment.end for segment in stream.segments
        ):
            continue  # another broker's, or gone (retention)
        # Retention must not reuse the bytes while they are copied and sent.
        with stream.pinned(header_offset):
            if generation_holding(region, log.geometry, header_offset) != entry.generation:
                continue  # gone: its segment was let go (and this stream took it again)
            batch = log.batch_at(header_offset)
            end = batch.first_offset + batch.num_msg
            if end <= floor:
                continue  # wanted no more: sent from the disk tier, or before ``wanted``
            skip = max(0, floor - batch.first_offset)
            frame = _framed_copy(region, batch, skip, entry.total_order)
            ended = await _send(connection, memoryview(frame), send_timeout)
        if ended is not None:
            return ended
        sent[batch.first_offset + skip] = end
        # A shutdown stops the stream at the next batch boundary.
        if connection.stopping:
            return True


def _raise_floor(
    stream: Stream, region: npt.NDArray[np.uint8], floor: int, sent: dict[int, int]
) -> int:
    """``floor`` moved up past the batches in ``sent`` (taken out of it) and
    the batches in the region never ordered (never sent)."""
    while True:
        end = sent.pop(floor, None)
        if end is not None:
            floor = end
            continue
        if not stream.start_offset <= floor < stream.next_offset:
            return floor
        i = bisect.bisect_right(stream.index_first, floor) - 1
        (ordered,) = U32.unpack_from(region.data, stream.index_header[i] + BH_ORDERED)
        if ordered != NEVER_ORDERED:
            return floor
        following = stream.index_first[i + 1 : i + 2]
        floor = following[0] if following else stream.next_offset


def _framed_copy(
    region: npt.NDArray[np.uint8], batch: CommittedBatch, skip: int, total_order: int
) -> bytearray:
    """An ordered batch's records from record ``skip`` on, behind their
    ``BatchMetadata``: a copy, its records' total orders written into it if
    the broker that stored the batch has not stamped them yet (or is down)."""
    start = batch.payload_offset
    end = start + batch.total_size
    if skip > 0:
        start += int(scan_records(region[start:end], batch.num_msg)[skip])
    # Looked at before the copy: once set, the records copied are stamped.
    stamped = is_stamped(region.data, batch.header_offset)
    frame = bytearray(BATCH_METADATA.size + end - start)
    BATCH_METADATA.pack_into(
        frame, 0, total_order + skip, batch.num_msg - skip, BATCH_METADATA_VERSION, 0
    )
    frame[BATCH_METADATA.size :] = region[start:end].data
    if not stamped:
        records = np.frombuffer(frame, dtype=np.uint8, offset=BATCH_METADATA.size)
        stamp_copy(records, batch.num_msg - skip, total_order + skip)
    return frame


async def _send_ordered(
    connection: Connection,
    handshake: Handshake,
    log: CxlLog,
    commits: CommitFeed,
    send_timeout: float,
) -> bool:
    """``client_req = 3``: an order-5 topic's batches of every broker, in
    total order from ``last_addr``; like :func:`_send_records`."""
    topic = handshake.topic
    slot = log.topics().get(topic)
    while slot is None:  # not created yet: wait, as client_req 1 does
        with connection.at_boundary():
            await commits.wait_ordered()
        if connection.stopping:
            return True
        slot = log.topics().get(topic)
    if read_topic_order(log.region, log.geometry, slot) != 5:
        raise ProtocolError(
            ErrorCode.BAD_HANDSHAKE,
            f"topic {topic!r} has order 0: client_req 3 reads the total order of an order-5 "
            "topic (subscribe with client_req 1)",
        )
    index = OrderedIndex(log.region, log.geometry, slot)
    wanted = handshake.last_addr
    k = -1
    while True:
        if index.deleted():
            raise ProtocolError(ErrorCode.NOT_ALLOWED, f"topic {topic!r} was deleted")
        count = index.count()
        if k < 0:
            k = index.find(wanted, count)
        if k >= count:
            if await _wait_for_order(connection, commits):
                return True
            continue
        entry, k = _take_entry(index, k)
        if entry is None:
            continue
        end = entry.total_order + entry.num_msg
        records = index.records(entry) if end > wanted else None
        if records is None:
            continue  # before what is wanted, or gone (retention): the next one
        skip = max(0, wanted - entry.total_order)
        frame = encode_batch_metadata(entry.total_order + skip, entry.num_msg - skip)
        data = cut_records(records, entry.num_msg, skip)
        ended = await _send(connection, memoryview(frame + data.tobytes()), send_timeout)
        if ended is not None:
            return ended
        wanted = end
        if connection.stopping:
            return True


async def _wait_for_order(connection: Connection, commits: CommitFeed) -> bool:
    """Wait, at a batch boundary, until more may be ordered; whether the
    stream is to stop (a graceful shutdown)."""
    with connection.at_boundary():
        await commits.wait_ordered()
    return connection.stopping


def _take_entry(index: OrderedIndex, k: int) -> tuple[IndexEntry | None, int]:
    """Index entry ``k`` (None if it is gone) and the next one to look at:
    the one after it, or the first left when its index segment is gone."""
    entry = index.entry(k)
    if entry is None:
        return None, max(k + 1, index.first())
    return entry, k + 1


def _skip_to(connection: Connection, topic: str, wanted: int, start: int) -> int:
    """Log that offsets ``wanted..start - 1`` of ``topic`` were reclaimed; returns ``start``."""
    logger.debug(
        "conn %d %s: offsets %d..%d of %r were reclaimed; sending from %d",
        connection.id,
        connection.peer,
        wanted,
        start - 1,
        topic,
        start,
    )
    return start


async def _send_disk_batch(
    connection: Connection,
    disk: DiskLog,
    topic: str,
    wanted: int,
    send_timeout: float,
    ordered_topic: bool,
) -> tuple[bool | None, int] | None:
    """Send the disk log's batch holding offset ``wanted`` (see
    :func:`_send_from_disk`): what that returns and the offset after the
    batch, or None when the disk log holds no such batch."""
    batch = disk.batch_holding(topic, wanted)
    if batch is None:
        return None
    ended = await _send_from_disk(
        connection, disk, topic, batch, wanted, send_timeout, ordered_topic
    )
    return ended, batch.first_offset + batch.num_msg


async def _send_from_disk(
    connection: Connection,
    disk: DiskLog,
    topic: str,
    batch: DiskBatch,
    wanted: int,
    send_timeout: float,
    ordered_topic: bool,
) -> bool | None:
    """Send ``batch``'s records from ``wanted`` on, read from the disk log;
    like :func:`_send`. A failed read costs this subscriber only. On an
    order-5 topic as from the region: behind its ``BatchMetadata`` (the disk
    holds it ordered and stamped), and not at all if it is never ordered."""
    try:
        # Retention may trim the file meanwhile: the pin keeps it readable.
        with disk.pinned(batch):
            header, records = await trio.to_thread.run_sync(disk.read_batch, batch)
    except StorageError as exc:
        logger.error("conn %d %s: %s; subscriber closed", connection.id, connection.peer, exc)
        return False
    skip = 0
    start = 0
    if wanted > batch.first_offset:
        skip = wanted - batch.first_offset
        start = int(scan_records(records, batch.num_msg)[skip])
    if not ordered_topic:
        return await _send(connection, records[start:].data, send_timeout)
    if header.ordered == NEVER_ORDERED:
        return None
    frame = encode_batch_metadata(header.total_order + skip, batch.num_msg - skip)
    return await _send(connection, memoryview(frame + records[start:].tobytes()), send_timeout)


async def _send(connection: Connection, records: memoryview, send_timeout: float) -> bool | None:
    """Send one batch's records; None when sent, else what
    :func:`_send_records` returns (the subscriber is gone or too slow)."""
    with trio.move_on_after(send_timeout) as sending:
        try:
            await connection.send_frame(records)
        except ConnectionLost as exc:
            logger.info("conn %d %s: subscriber gone: %s", connection.id, connection.peer, exc)
            return True
    if sending.cancelled_caught:
        logger.warning(
            "conn %d %s: subscriber did not take a batch's records within %s s; closed",
            connection.id,
            connection.peer,
            send_timeout,
        )
        return False
    return None
