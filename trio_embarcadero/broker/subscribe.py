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

On an order-5 topic, the stream of this broker (``client_req = 1``) sends a
batch only once it is ordered, with a ``BatchMetadata`` in front of its
records (from the disk tier too: the disk log holds it ordered), and never
a batch that is never ordered; ``client_req = 3`` reads the topic's ordered index in the region
(every broker's batches, in total order) from the total order ``last_addr``
on. Both wake when this process orders batches (the head) and every
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
from ..log.layout import BH_ORDERED, BH_TOTAL_ORDER, NEVER_ORDERED, U32, U64, read_topic_order
from ..log.ordered import OrderedIndex, cut_records
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
    region = log.region
    # Order 5: each batch once ordered, with its BatchMetadata in front.
    ordered_topic = read_topic_order(region, log.geometry, stream.topic_index) == 5
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
            batch_on_disk = disk.batch_holding(topic, wanted)
            if batch_on_disk is not None:
                ended = await _send_from_disk(
                    connection, disk, topic, batch_on_disk, wanted, send_timeout, ordered_topic
                )
                if ended is not None:
                    return ended
                wanted = batch_on_disk.first_offset + batch_on_disk.num_msg
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
            if ordered_topic:
                ended = await _send_when_ordered(
                    connection, commits, region, batch.header_offset, start, end, skip,
                    batch.num_msg, send_timeout,
                )  # fmt: skip
            else:
                ended = await _send(connection, region[start:end].data, send_timeout)
        if ended is not None:
            return ended
        wanted = batch.first_offset + batch.num_msg
        # A shutdown stops the stream at the next batch boundary, also while
        # the subscriber is catching up, so the error frame follows a record.
        if connection.stopping:
            return True


async def _send_when_ordered(
    connection: Connection,
    commits: CommitFeed,
    region: npt.NDArray[np.uint8],
    header_offset: int,
    start: int,
    end: int,
    skip: int,
    num_msg: int,
    send_timeout: float,
) -> bool | None:
    """Wait until the batch at ``header_offset`` is ordered, then send its
    records from ``start`` behind their ``BatchMetadata``; like :func:`_send`.
    A batch that is never ordered (a publish session's batch_seq the
    sequencer skipped) has no total order and is not sent."""
    while not (ordered := U32.unpack_from(region.data, header_offset + BH_ORDERED)[0]):
        with connection.at_boundary():
            await commits.wait_ordered()
        if connection.stopping:
            return True
    if ordered == NEVER_ORDERED:
        return None
    # Looked at before the copy: once set, the records copied are stamped.
    stamped = is_stamped(region.data, header_offset)
    (total_order,) = U64.unpack_from(region.data, header_offset + BH_TOTAL_ORDER)
    frame = bytearray(BATCH_METADATA.size + end - start)
    BATCH_METADATA.pack_into(
        frame, 0, total_order + skip, num_msg - skip, BATCH_METADATA_VERSION, 0
    )
    frame[BATCH_METADATA.size :] = region[start:end].data
    if not stamped:
        # The broker that stored it has not written its records' total
        # orders yet (or is down): the copy gets them, from the header.
        records = np.frombuffer(frame, dtype=np.uint8, offset=BATCH_METADATA.size)
        stamp_copy(records, num_msg - skip, total_order + skip)
    return await _send(connection, memoryview(frame), send_timeout)


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
            with connection.at_boundary():
                await commits.wait_ordered()
            if connection.stopping:
                return True
            continue
        entry = index.entry(k)
        k += 1
        if entry is None:
            k = max(k, index.first())  # its index segment is gone: go on from the first left
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
