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
"""

from __future__ import annotations

import fcntl
import mmap
import os
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import attrs

from ..errors import TopicBusyError
from .layout import (
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
    Geometry,
    parse_file_name,
    read_geometry,
    read_segment_header,
    read_topic_state,
    read_topics,
    unit_map,
)
from .ownership import open_private_file, served_brokers
from .segments import SegmentMap


@attrs.frozen
class Deleted:
    """What :func:`delete_topic_file` did.

    Attributes:
        segments: Segments freed.
        renamed: The topic's disk log files, renamed aside (new names).
    """

    segments: int
    renamed: list[Path]


def delete_topic_file(path: str, name: str, storage_dir: str | None = None) -> Deleted:
    """Delete topic ``name`` from the CXL file ``path``, also while brokers serve it.

    Under the region's file lock: the deletion (see :func:`delete_topic`),
    then every disk log file of the topic in ``storage_dir`` (every broker's,
    ``<name>@<broker>.<offset>.log``) is renamed to ``<that>.deleted-<ns>``
    (no broker recreates the topic, and so its files, before the lock is
    released).

    Raises:
        KeyError: No such topic.
        TopicBusyError: Publishers are attached to it; nothing changed.
        LayoutError: ``path`` is not a region.
        OSError: It cannot be opened.
    """
    fd = open_private_file(path, os.O_RDWR, 0o600, "CXL file")
    try:
        mapping = mmap.mmap(fd, os.fstat(fd).st_size, flags=mmap.MAP_SHARED)
        try:
            geometry = read_geometry(mapping)
            segment_map = SegmentMap(unit_map(mapping, geometry), geometry.max_order)
            fcntl.flock(fd, fcntl.LOCK_EX)
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
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
            del segment_map
        finally:
            mapping.close()
    finally:
        os.close(fd)
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
