"""The per-topic settings made by the admin API, kept beside the region.

A topic created over HTTP (``POST /v1/topics``) or with ``create-topic`` may
set its retention. The config file is the operator's to write, not the
broker's, and every broker of a region must apply the same settings to its
stream of the topic, so they live with the region's topic table: in
``<cxl.path>.topics.json``, next to the region's lock file, changed only
under the region's file lock (see :mod:`.topics`) and replaced whole by a
rename, so a reader never sees half of it. It is JSON so that an operator
can read it::

    {"format": 1, "region_inode": 4711,
     "topics": {"orders": {"slot": 3, "incarnation": 17,
                           "retention_bytes": 1073741824, "retention_ms": null}}}

(A topic's order level is not here: the region keeps it with the topic.)

A record holds only while the region has the same live topic: the same
file (``region_inode``), and the slot live with the same name and
incarnation. A topic deleted by any means (also a deletion cut short by a
kill), or a region made anew, leaves no record that could apply to a later
topic of the same name; the writers also drop such records. A creation
records the settings before it takes the slot, so one cut short by a kill
leaves a record that holds for no topic (unless a publisher then creates
that very topic in that slot, which is the creation finished). The settings
last as long as their topic in the region: a reboot that empties
``/dev/shm`` takes them with it (a region rebuilt from the disk log gives
its topics the config file's settings), so settings that must outlive the
region belong in the config file.

A record's keys win over the config file's ``[topics]`` defaults and its
``[topics.<name>]`` table: they were set later, for this topic.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from ..errors import LayoutError
from .layout import TOPIC_LIVE, Geometry, read_topic_name, read_topic_state
from .ownership import open_private_file, settings_path

#: The version of the file's JSON layout.
SETTINGS_FORMAT = 1

#: The retention keys a record may set.
RETENTION_KEYS = ("retention_bytes", "retention_ms")

__all__ = [
    "RETENTION_KEYS",
    "SETTINGS_FORMAT",
    "TopicRecord",
    "TopicSettingsFile",
    "live_records",
    "read_settings",
    "remove_settings",
    "settings_path",
    "write_settings",
]


@attrs.frozen
class TopicRecord:
    """The settings the admin API gave one topic.

    Attributes:
        slot: The topic's slot in the topic table when it was recorded.
        incarnation: The topic's incarnation in that slot.
        retention_bytes: ``retention_bytes`` for the topic, or None for the
            config file's.
        retention_ms: ``retention_ms`` for the topic, or None for the config
            file's.
    """

    slot: int
    incarnation: int
    retention_bytes: int | None = None
    retention_ms: int | None = None

    def holds(self, buf: Any, geometry: Geometry, name: str) -> bool:
        """Whether the region's slot is still this record's live topic ``name``."""
        if not 0 <= self.slot < geometry.max_topics:
            return False
        state = read_topic_state(buf, geometry, self.slot)
        return state == (TOPIC_LIVE, self.incarnation) and (
            read_topic_name(buf, geometry, self.slot) == name
        )

    @property
    def retention(self) -> dict[str, int]:
        """The retention keys it sets."""
        return {k: v for k in RETENTION_KEYS if (v := getattr(self, k)) is not None}


def read_settings(path: str, region_inode: int) -> dict[str, TopicRecord]:
    """The records of the settings file ``path`` for the region file whose
    inode is ``region_inode`` (none when the file is missing or of another
    region).

    Raises:
        LayoutError: The file is not a settings file.
        OSError: It cannot be read (``ELOOP``: it is a symbolic link).
    """
    # Read as the region is (open_log): whoever may read it, not only its owner.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return {}
    with os.fdopen(fd, "rb") as file:
        text = file.read()
    try:
        data = json.loads(text)
        if data.get("format") != SETTINGS_FORMAT:
            raise ValueError(f"format {data.get('format')!r}, not {SETTINGS_FORMAT}")
        if data.get("region_inode") != region_inode:
            return {}  # left over from a region made anew since
        return {str(name): TopicRecord(**fields) for name, fields in data["topics"].items()}
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise LayoutError(
            f"{path} is not a topic settings file ({exc}); remove it (the topics then "
            "take the config file's settings)"
        ) from None


def write_settings(
    path: str, region_inode: int, records: Mapping[str, TopicRecord], mode: int
) -> None:
    """Replace the settings file ``path`` with ``records`` (the caller holds
    the region's file lock); no file when there are none."""
    if not records:
        remove_settings(path)
        return
    data = {
        "format": SETTINGS_FORMAT,
        "region_inode": region_inode,
        "topics": {name: attrs.asdict(record) for name, record in sorted(records.items())},
    }
    temporary = f"{path}.{os.getpid()}.tmp"
    fd = open_private_file(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode, "topic settings")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(json.dumps(data, indent=1).encode() + b"\n")
            file.flush()
            os.fsync(file.fileno())
        # A rename: readers see the old file or the new one, never a mix.
        os.rename(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise


def remove_settings(path: str) -> None:
    """Remove the settings file ``path`` (missing is fine)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def live_records(
    records: Mapping[str, TopicRecord], buf: Any, geometry: Geometry
) -> dict[str, TopicRecord]:
    """The records whose topic the region still holds."""
    return {name: r for name, r in records.items() if r.holds(buf, geometry, name)}


class TopicSettingsFile:
    """A running broker's view of the settings file, read again when it changes.

    Args:
        cxl_path: The region file.
        region: Returns the region, mapped (called at each lookup: holding
            no view of the mapping lets its owner close it).
        geometry: Its geometry.
    """

    def __init__(self, cxl_path: str, region: Callable[[], Any], geometry: Geometry) -> None:
        self.path = settings_path(cxl_path)
        self._region = region
        self._geometry = geometry
        self._region_inode = os.stat(cxl_path).st_ino
        self._seen: tuple[int, int, int] | None = None
        self._records: dict[str, TopicRecord] = {}

    def records(self) -> dict[str, TopicRecord]:
        """Every record whose topic the region holds now."""
        self._refresh()
        return live_records(self._records, self._region(), self._geometry)

    def get(self, name: str) -> TopicRecord | None:
        """The record of topic ``name``, if it has one that holds."""
        self._refresh()
        record = self._records.get(name)
        return (
            record
            if record is not None and record.holds(self._region(), self._geometry, name)
            else None
        )

    def _refresh(self) -> None:
        """Read the file again if it changed (one ``stat``). A file that
        cannot be read keeps the records last read: the topics keep the
        settings they had."""
        try:
            info = os.stat(self.path)
            seen = (info.st_ino, info.st_mtime_ns, info.st_size)
        except FileNotFoundError:
            seen = None
        if seen != self._seen:
            try:
                self._records = read_settings(self.path, self._region_inode) if seen else {}
                self._seen = seen
            except (OSError, LayoutError):
                pass
