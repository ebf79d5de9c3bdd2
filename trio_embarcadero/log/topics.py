"""Deleting a topic from a region, crash-safe at every step.

A deletion runs under the region's file lock and goes in four steps:

1. the topic's state word becomes ``TOPIC_DELETING``: from here on no broker
   creates, reserves in or recovers the topic, and readers no longer list it;
2. every broker's stream entry is emptied (no segment, counts 0, start 0);
3. every segment whose header names the topic's slot is freed in the
   segment map (a deleting slot has no live stream, so all of them are the
   topic's, linked or not);
4. the slot is cleared (state word ``TOPIC_FREE``, last).

Each step can be repeated, so a deletion cut short (a ``kill -9``) is
finished by whoever next finds the slot in the deleting state: a broker's
start (:meth:`~.region.CxlLog.open`) or the next deletion
(:func:`finish_deletions`). Segment headers are written under the same lock
as the allocation (see :meth:`~.region.CxlLog._take_segment`), so step 3
never mistakes another stream's new segment for one of the topic's.

A topic is refused while publishers are attached to it: each broker counts
its attached publish sessions in its stream entry (see
:meth:`~.region.CxlLog.attach_publisher`). The count of a broker that is no
longer running is stale; the caller says which brokers run.

A topic is normally created by its first batch; :func:`create_topic_file`
creates one ahead of it (the admin API, ``create-topic``), with settings of
its own kept beside the region (:mod:`.settings`). Deleting a topic drops
its settings too.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import time
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from ..config import ORDER_LEVELS
from ..errors import LogFullError, TopicBusyError, TopicExistsError
from ..wire import encode_topic
from .layout import (
    NEXT_GENERATION_OFFSET,
    NO_SEGMENT,
    STREAM_ATTACHED_OFFSET,
    STREAM_COUNTS,
    STREAM_COUNTS_OFFSET,
    STREAM_SEGMENTS,
    STREAM_START,
    STREAM_START_OFFSET,
    TOPIC_DELETING,
    TOPIC_FREE,
    TOPIC_STATE_OFFSET,
    U32,
    U64,
    Geometry,
    find_topic,
    parse_file_name,
    read_geometry,
    read_segment_header,
    read_topic_state,
    read_topics,
    topic_states,
    unit_map,
    write_topic,
)
from .ownership import open_private_file, served_brokers
from .segments import SegmentMap
from .settings import TopicRecord, live_records, read_settings, settings_path, write_settings


@attrs.frozen
class Deleted:
    """What :func:`delete_topic_file` did.

    Attributes:
        segments: Segments freed.
        renamed: The topic's disk log files, renamed aside (new names).
    """

    segments: int
    renamed: list[Path]


@attrs.frozen
class Created:
    """What :func:`create_topic_file` did.

    Attributes:
        slot: The topic's slot in the topic table.
        record: The settings recorded for it.
    """

    slot: int
    record: TopicRecord


def create_topic_file(
    path: str,
    name: str,
    *,
    order: int = 0,
    retention_bytes: int | None = None,
    retention_ms: int | None = None,
    mode: int = 0o600,
) -> Created:
    """Create topic ``name`` in the CXL file ``path`` (served or not) with its settings.

    Under the region's file lock: the topic takes a free slot of the topic
    table with its order level, as its first batch would, and the retention
    keys given are recorded beside the region (:mod:`.settings`); records of
    topics gone meanwhile are dropped. Running brokers see the topic at its
    first use.

    Args:
        path: The CXL file (a broker made it).
        name: The topic.
        order: Its order level (``config.ORDER_LEVELS``: 0, each broker's
            stream in its own order; 5, one total order across brokers),
            fixed in the region with the topic.
        retention_bytes: Its ``retention_bytes``, or None for the config
            file's (already checked: -1 or > 0).
        retention_ms: Its ``retention_ms``, or None for the config file's.
        mode: The region's permission bits (``cxl.mode``), which the
            settings file gets too.

    Raises:
        ValueError: ``name`` is not a topic name, or ``order`` not an order level.
        TopicExistsError: The topic exists; nothing changed.
        LogFullError: The topic table is full.
        LayoutError: ``path`` is not a region.
        OSError: It cannot be opened.
    """
    raw = encode_topic(name)
    if order not in ORDER_LEVELS:
        raise ValueError(
            f"order {order} is not an order level ({', '.join(map(str, ORDER_LEVELS))})"
        )
    with _locked_region(path, mode) as (fd, mapping, geometry):
        if find_topic(mapping, geometry, name) is not None:
            raise TopicExistsError(f"topic {name!r} exists")
        free = np.flatnonzero(topic_states(mapping, geometry) == TOPIC_FREE)
        if not len(free):
            raise LogFullError(
                f"topic table full ({geometry.max_topics} topics); cannot create {name!r}",
                transient=False,
            )
        slot = int(free[0])
        # The incarnation write_topic gives it (nobody else creates a topic
        # while the lock is held): the settings are recorded first, so a
        # kill in between leaves a record that holds for no topic, never a
        # topic without its settings.
        (incarnation,) = U64.unpack_from(mapping, NEXT_GENERATION_OFFSET)
        record = TopicRecord(slot, incarnation, retention_bytes, retention_ms)
        inode = os.fstat(fd).st_ino
        file = settings_path(path)
        records = live_records(read_settings(file, inode), mapping, geometry)
        if record.retention:  # a topic that keeps the config's needs none
            records[name] = record
        write_settings(file, inode, records, mode)
        write_topic(mapping, geometry, slot, raw, order)
    return Created(slot, record)


@contextlib.contextmanager
def _locked_region(path: str, mode: int) -> Iterator[tuple[int, mmap.mmap, Geometry]]:
    """The region file mapped read-write, under its file lock."""
    fd = open_private_file(path, os.O_RDWR, mode, "CXL file")
    try:
        mapping = mmap.mmap(fd, os.fstat(fd).st_size, flags=mmap.MAP_SHARED)
        try:
            geometry = read_geometry(mapping)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield fd, mapping, geometry
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            try:
                mapping.close()
            except BufferError:
                # A view is still referenced (by the traceback of an error on
                # its way out): the mapping goes with it.
                pass
    finally:
        os.close(fd)


def delete_topic_file(
    path: str, name: str, storage_dir: str | None = None, *, mode: int = 0o600
) -> Deleted:
    """Delete topic ``name`` from the CXL file ``path``, also while brokers serve it.

    Under the region's file lock: the deletion (see :func:`delete_topic`),
    then every disk log file of the topic in ``storage_dir`` (every broker's,
    ``<name>@<broker>.<offset>.log``) is renamed to ``<that>.deleted-<ns>``
    (no broker recreates the topic, and so its files, before the lock is
    released), and the topic's settings record (:mod:`.settings`) is dropped.

    Args:
        path: The CXL file.
        name: The topic.
        storage_dir: The disk log directory, if there is one.
        mode: The region's permission bits (``cxl.mode``): the file keeps them.

    Raises:
        KeyError: No such topic.
        TopicBusyError: Publishers are attached to it; nothing changed.
        LayoutError: ``path`` is not a region.
        OSError: It cannot be opened.
    """
    with _locked_region(path, mode) as (fd, mapping, geometry):
        segment_map = SegmentMap(unit_map(mapping, geometry), geometry.max_order)
        try:
            finish_deletions(mapping, geometry, segment_map)
            freed = delete_topic(mapping, geometry, segment_map, name, served_brokers(path))
            renamed = []
            if storage_dir is not None:
                stamp = time.time_ns()
                for file in sorted(os.listdir(storage_dir)):
                    parsed = parse_file_name(file)
                    if parsed is not None and parsed[0] == name:
                        old = Path(storage_dir) / file
                        new = old.with_name(f"{file}.deleted-{stamp}")
                        old.rename(new)
                        renamed.append(new)
            inode = os.fstat(fd).st_ino
            settings = settings_path(path)
            records = read_settings(settings, inode)
            if records:
                write_settings(settings, inode, live_records(records, mapping, geometry), mode)
        finally:
            del segment_map  # its views of the mapping, before the mapping closes
    return Deleted(freed, renamed)


def attached_publishers(buf: Any, geometry: Geometry, index: int, broker_id: int) -> int:
    """How many publish sessions broker ``broker_id`` has attached to slot ``index``."""
    (count,) = U32.unpack_from(
        buf, geometry.stream_offset(index, broker_id) + STREAM_ATTACHED_OFFSET
    )
    return int(count)


def delete_topic(
    buf: Any,
    geometry: Geometry,
    segment_map: SegmentMap,
    name: str,
    running: Collection[int],
) -> int:
    """Delete topic ``name`` (the caller holds the region's file lock).

    Args:
        buf: The region, mapped read-write.
        geometry: Its geometry.
        segment_map: Its segment map.
        name: The topic.
        running: The broker ids served by a live process now; the attached
            counts of the others are left over from a crash and ignored.

    Returns:
        The segments freed.

    Raises:
        KeyError: No live topic has that name.
        TopicBusyError: A running broker has publishers attached to it
            (nothing was changed).
    """
    index = read_topics(buf, geometry).get(name)
    if index is None:
        raise KeyError(name)
    busy = {
        b: n
        for b in running
        if b < geometry.max_brokers and (n := attached_publishers(buf, geometry, index, b))
    }
    if busy:
        detail = ", ".join(f"broker {b}: {n}" for b, n in sorted(busy.items()))
        raise TopicBusyError(
            f"topic {name!r} has publishers attached ({detail}); stop them and try again"
        )
    U32.pack_into(buf, geometry.topic_offset(index) + TOPIC_STATE_OFFSET, TOPIC_DELETING)
    return finish_deletion(buf, geometry, segment_map, index)


def finish_deletion(buf: Any, geometry: Geometry, segment_map: SegmentMap, index: int) -> int:
    """Steps 2 to 4 of deleting slot ``index`` (in the deleting state).

    Returns:
        The segments freed.
    """
    for broker in range(geometry.max_brokers):
        entry = geometry.stream_offset(index, broker)
        STREAM_SEGMENTS.pack_into(buf, entry, NO_SEGMENT, NO_SEGMENT, 0)
        STREAM_COUNTS.pack_into(buf, entry + STREAM_COUNTS_OFFSET, 0, 0, 0)
        STREAM_START.pack_into(buf, entry + STREAM_START_OFFSET, 0, 0)
        U32.pack_into(buf, entry + STREAM_ATTACHED_OFFSET, 0)
    freed = 0
    for segment in list(segment_map.segments()):
        header = read_segment_header(buf, geometry, segment.unit)
        if header is not None and header.topic == index:
            segment_map.free(segment.unit)
            freed += 1
    U32.pack_into(buf, geometry.topic_offset(index) + TOPIC_STATE_OFFSET, TOPIC_FREE)
    return freed


def finish_deletions(buf: Any, geometry: Geometry, segment_map: SegmentMap) -> list[int]:
    """Finish every deletion cut short (the caller holds the file lock).

    Returns:
        The slots freed.
    """
    done = []
    for index in range(geometry.max_topics):
        state, _ = read_topic_state(buf, geometry, index)
        if state == TOPIC_DELETING:
            finish_deletion(buf, geometry, segment_map, index)
            done.append(index)
    return done
