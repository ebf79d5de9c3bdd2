"""Creating a topic ahead of its first batch, and the settings kept beside the region.

A record holds only while the region has the same live topic (file, slot,
name, incarnation), so a deleted topic, a deletion cut short or a region made
anew never hands its settings to a later topic of the same name.
"""

from __future__ import annotations

import json
import os
import stat

import pytest
from memory import close_log
from test_retention import fill, open_units

from trio_embarcadero.errors import LayoutError, LogFullError, TopicExistsError
from trio_embarcadero.log.layout import TOPIC_LIVE, read_topic_order, read_topic_state
from trio_embarcadero.log.ownership import remove_region, settings_path
from trio_embarcadero.log.settings import (
    TopicRecord,
    TopicSettingsFile,
    read_settings,
    write_settings,
)
from trio_embarcadero.log.topics import create_topic_file, delete_topic_file


def test_a_created_topic_takes_a_slot_and_records_its_settings(cxl_path: str) -> None:
    log = open_units(cxl_path, mode=0o640)
    try:
        created = create_topic_file(
            cxl_path, "orders.eu", order=5, retention_bytes=1 << 20, retention_ms=-1, mode=0o640
        )
        assert read_topic_order(log.region, log.geometry, created.slot) == 5
        # The running broker's handle sees the topic, empty.
        assert log.topics() == {"orders.eu": created.slot}
        assert log.stream("orders.eu").next_offset == 0
        state = read_topic_state(log.region, log.geometry, created.slot)
        assert state == (TOPIC_LIVE, created.record.incarnation)
        settings = TopicSettingsFile(cxl_path, lambda: log.region, log.geometry)
        assert settings.get("orders.eu") == created.record
        assert created.record.retention == {"retention_bytes": 1 << 20, "retention_ms": -1}
        assert settings.get("orders") is None
        # Readable JSON, with the region's permissions.
        path = settings_path(cxl_path)
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
        assert data["topics"]["orders.eu"]["retention_bytes"] == 1 << 20
        assert data["region_inode"] == os.stat(cxl_path).st_ino
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
        # The first batch goes to the topic made ahead.
        fill(log, "orders.eu", 2)
        assert log.stream("orders.eu").next_offset == 16
    finally:
        close_log(log)


def test_create_refuses_an_existing_topic_a_full_table_and_a_bad_name(cxl_path: str) -> None:
    log = open_units(cxl_path, max_topics=2)
    try:
        fill(log, "a", 1)
        with pytest.raises(TopicExistsError, match="topic 'a' exists"):
            create_topic_file(cxl_path, "a", retention_ms=5)
        create_topic_file(cxl_path, "b", retention_ms=5)
        with pytest.raises(LogFullError, match="topic table full"):
            create_topic_file(cxl_path, "c")
        with pytest.raises(ValueError, match="topic"):
            create_topic_file(cxl_path, "no/slash")
        with pytest.raises(ValueError, match="order 3 is not an order level"):
            create_topic_file(cxl_path, "c", order=3)
        settings = TopicSettingsFile(cxl_path, lambda: log.region, log.geometry)
        assert set(settings.records()) == {"b"}
        assert settings.get("a") is None
    finally:
        close_log(log)


def test_a_topic_with_the_config_s_retention_has_no_record(cxl_path: str) -> None:
    close_log(open_units(cxl_path))
    created = create_topic_file(cxl_path, "plain", order=5)
    assert created.record.retention == {}
    assert not os.path.exists(settings_path(cxl_path))


def test_deleting_a_topic_drops_its_settings(cxl_path: str) -> None:
    log = open_units(cxl_path)
    try:
        create_topic_file(cxl_path, "t", retention_ms=1000)
        create_topic_file(cxl_path, "u", retention_ms=2000)
        delete_topic_file(cxl_path, "t")
        settings = TopicSettingsFile(cxl_path, lambda: log.region, log.geometry)
        assert set(settings.records()) == {"u"}
        delete_topic_file(cxl_path, "u")
        assert not os.path.exists(settings_path(cxl_path))
        # A missing topic is a KeyError, not a mapping still in use.
        with pytest.raises(KeyError):
            delete_topic_file(cxl_path, "t")
    finally:
        close_log(log)


def test_records_of_topics_gone_hold_for_no_later_topic(cxl_path: str) -> None:
    log = open_units(cxl_path)
    try:
        created = create_topic_file(cxl_path, "t", retention_ms=1000)
        settings = TopicSettingsFile(cxl_path, lambda: log.region, log.geometry)
        path = settings_path(cxl_path)
        inode = os.stat(cxl_path).st_ino
        record = created.record
        for stale in (
            TopicRecord(record.slot, record.incarnation + 1, retention_ms=5),  # another creation
            TopicRecord(record.slot + 1, record.incarnation, retention_ms=5),  # another slot
        ):
            write_settings(path, inode, {"t": stale}, 0o600)
            assert settings.get("t") is None
        # A record of a topic of another name in the same slot holds not for it.
        write_settings(path, inode, {"x": record}, 0o600)
        assert settings.get("x") is None
        # The file of another region (one made anew) is not read at all.
        write_settings(path, inode + 1, {"t": record}, 0o600)
        assert read_settings(path, inode) == {}
        assert settings.get("t") is None
        write_settings(path, inode, {"t": record}, 0o600)
        assert settings.get("t") == record
    finally:
        close_log(log)


def test_a_record_written_before_a_kill_holds_for_nothing(cxl_path: str) -> None:
    # create_topic_file records the settings, then takes the slot: a kill in
    # between leaves a record of the next incarnation in a free slot.
    log = open_units(cxl_path)
    try:
        created = create_topic_file(cxl_path, "first")
        inode = os.stat(cxl_path).st_ino
        orphan = TopicRecord(created.slot + 1, created.record.incarnation + 1, retention_ms=7)
        write_settings(
            settings_path(cxl_path), inode, {"first": created.record, "lost": orphan}, 0o600
        )
        settings = TopicSettingsFile(cxl_path, lambda: log.region, log.geometry)
        assert settings.get("lost") is None
        # Another topic that takes the slot (a publisher's) gets nothing of it...
        fill(log, "other", 1)
        assert log.topics()["other"] == orphan.slot
        assert settings.get("other") is None
        assert settings.get("lost") is None
        # ...and the next creation drops the orphan.
        create_topic_file(cxl_path, "second", retention_bytes=1 << 20)
        assert read_settings(settings_path(cxl_path), inode).keys() == {"first", "second"}
    finally:
        close_log(log)


def test_a_damaged_file_is_named_and_the_last_good_records_stay(cxl_path: str) -> None:
    log = open_units(cxl_path)
    try:
        create_topic_file(cxl_path, "t", retention_bytes=1 << 30)
        settings = TopicSettingsFile(cxl_path, lambda: log.region, log.geometry)
        assert settings.get("t") is not None
        path = settings_path(cxl_path)
        with open(path, "w", encoding="utf-8") as file:
            file.write('{"format": 1, "topics": ')
        with pytest.raises(LayoutError, match=r"is not a topic settings file .*remove it"):
            read_settings(path, os.stat(cxl_path).st_ino)
        assert settings.get("t") is not None
    finally:
        close_log(log)


def test_removing_a_region_removes_its_settings(cxl_path: str) -> None:
    close_log(open_units(cxl_path))
    create_topic_file(cxl_path, "t", retention_ms=10)
    remove_region(cxl_path)
    assert not os.path.exists(settings_path(cxl_path))
