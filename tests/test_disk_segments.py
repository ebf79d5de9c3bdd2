"""A stream's disk log is a run of files that retention trims, oldest first.

Log-core tests (no broker, no Trio): a region and a disk log written through
the same calls the broker's writer makes (take_jobs, write_and_sync,
jobs_done), then rolled, trimmed, read while trimmed, reopened, and fed
files that a crash, a copy or an older version left behind.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from memory import close_log
from test_cxl import commit
from test_retention import open_units

from trio_embarcadero.errors import LayoutError
from trio_embarcadero.log import CxlLog, DiskLog
from trio_embarcadero.log.disk import remove_files, write_and_sync
from trio_embarcadero.log.layout import file_name, parse_file_name
from trio_embarcadero.wire import BATCH_HEADER_SIZE, unpack_batch_header

#: Each test batch: 8 records of 1 KiB (plus their headers) and the batch header.
BATCH_RECORDS = [1024] * 8
#: Files roll after about four batches.
SEGMENT_BYTES = 40 * 1024


@pytest.fixture
def log(cxl_path: str) -> Iterator[CxlLog]:
    log = open_units(cxl_path)
    yield log
    close_log(log)


def open_disk(log: CxlLog, directory: Path) -> DiskLog:
    return DiskLog.open(
        str(directory), log, sync_interval=0.001, sync_bytes=1, segment_bytes=SEGMENT_BYTES
    )


def sync(disk: DiskLog) -> None:
    """What the broker's writer task does once."""
    result = write_and_sync(disk.take_jobs())
    assert result.failure is None
    disk.jobs_done(result.done, result.written, 0.0)


def publish(log: CxlLog, disk: DiskLog, topic: str, batches: int) -> None:
    for _ in range(batches):
        commit(log, topic, BATCH_RECORDS)
    sync(disk)


def publish_and_close(log: CxlLog, directory: Path, batches: int) -> None:
    """Write ``batches`` batches of topic "t" to a fresh disk log and close it."""
    disk = open_disk(log, directory)
    try:
        publish(log, disk, "t", batches)
    finally:
        disk.close()


def files(directory: Path, topic: str = "t") -> list[tuple[int, int]]:
    """(first offset in the name, size) of each of the topic's files, in order."""
    found = []
    for name in sorted(os.listdir(directory)):
        parsed = parse_file_name(name)
        if parsed is not None and parsed[0] == topic:
            assert parsed[2] is not None
            found.append((parsed[2], (directory / name).stat().st_size))
    return found


def batch_offsets(path: Path) -> list[int]:
    data = path.read_bytes()
    at, found = 0, []
    while at < len(data):
        header = unpack_batch_header(data[at : at + BATCH_HEADER_SIZE])
        found.append(header.start_logical_offset)
        at += BATCH_HEADER_SIZE + header.total_size
    return found


def test_file_names_parse_back() -> None:
    assert file_name("a.b-c", 3, 42) == "a.b-c@3.00000000000000000042.log"
    assert parse_file_name("a.b-c@3.00000000000000000042.log") == ("a.b-c", 3, 42)
    assert parse_file_name("old@0.log") == ("old", 0, None)
    for other in ("t@0.log.deleted-5", "brokers.lock", "t@x.log", "t.log", "@0.log"):
        assert parse_file_name(other) is None


def test_a_stream_rolls_into_files_named_by_their_first_offset(log: CxlLog, tmp_path: Path) -> None:
    disk = open_disk(log, tmp_path)
    try:
        publish(log, disk, "t", 3)
        publish(log, disk, "t", 10)
        found = files(tmp_path)
        assert len(found) == 4
        # Each file holds whole batches, the next begins where it ends, and
        # none went past the size unless one batch alone did.
        offsets = [first for first, _ in found]
        assert offsets[0] == 0
        expected_first = 0
        for first, size in found:
            assert first == expected_first
            path = tmp_path / file_name("t", 0, first)
            inside = batch_offsets(path)
            assert inside[0] == first
            assert size <= SEGMENT_BYTES
            expected_first = inside[-1] + len(BATCH_RECORDS)
        assert expected_first == 13 * 8
        assert disk.statistics().files == 4
        assert disk.durable_batches(log.stream("t")) == 13
    finally:
        disk.close()


def test_a_reopened_disk_log_reads_every_file(log: CxlLog, tmp_path: Path) -> None:
    publish_and_close(log, tmp_path, 13)
    disk = open_disk(log, tmp_path)
    try:
        assert disk.durable_batches(log.stream("t")) == 13
        assert disk.first_offset("t") == 0
        for offset in (0, 33, 60, 103):
            batch = disk.batch_holding("t", offset)
            assert batch is not None
            assert batch.first_offset <= offset < batch.first_offset + batch.num_msg
            with disk.pinned(batch):
                assert len(disk.read_records(batch)) == batch.total_size
        # Appends go on in the newest file, then in new ones.
        publish(log, disk, "t", 6)
        assert sum(size for _, size in files(tmp_path)) == 19 * (
            BATCH_HEADER_SIZE + log.stream("t").committed_batch(0).total_size
        )
    finally:
        disk.close()


def test_retention_by_bytes_trims_whole_files_while_the_rest_holds_the_limit(
    log: CxlLog, tmp_path: Path
) -> None:
    disk = open_disk(log, tmp_path)
    try:
        publish(log, disk, "t", 16)  # four full files
        sizes = [size for _, size in files(tmp_path)]
        assert len(sizes) == 4
        limit = sizes[2] + sizes[3]  # the newest two hold it exactly
        assert disk.trimmable("t", retention_bytes=limit, retention_ms=-1, now_ns=0) == 2
        assert disk.trimmable("t", retention_bytes=limit + 1, retention_ms=-1, now_ns=0) == 1
        assert disk.trimmable("t", retention_bytes=-1, retention_ms=-1, now_ns=0) == 0
        # Never the newest file, however small the limit.
        assert disk.trimmable("t", retention_bytes=1, retention_ms=-1, now_ns=0) == 3
        gone = disk.trim("t", 2)
        remove_files(gone)
        assert [first for first, _ in files(tmp_path)] == [64, 96]
        assert disk.first_offset("t") == 64
        assert disk.batch_holding("t", 63) is None
        assert disk.statistics().files_trimmed == 2
        assert disk.statistics().bytes_trimmed == sizes[0] + sizes[1]
    finally:
        disk.close()
    # The next start reads what is left and goes on from it.
    disk = open_disk(log, tmp_path)
    try:
        assert disk.first_offset("t") == 64
        assert disk.durable_batches(log.stream("t")) == 16
    finally:
        disk.close()


def test_retention_by_age_trims_files_whose_last_sync_is_older(log: CxlLog, tmp_path: Path) -> None:
    now = 10**12
    log.clock = lambda: now
    disk = open_disk(log, tmp_path)
    try:
        publish(log, disk, "t", 8)  # two files, synced at `now`
        now += 3_000_000_000
        publish(log, disk, "t", 8)  # two more, three seconds later
        assert disk.trimmable("t", retention_bytes=-1, retention_ms=3000, now_ns=now) == 0
        assert disk.trimmable("t", retention_bytes=-1, retention_ms=2999, now_ns=now) == 2
        # Once all are old, all but the newest go.
        assert disk.trimmable("t", retention_bytes=-1, retention_ms=1, now_ns=now + 10**9) == 3
    finally:
        disk.close()


def test_a_file_being_read_stays_readable_when_trimmed(log: CxlLog, tmp_path: Path) -> None:
    disk = open_disk(log, tmp_path)
    try:
        publish(log, disk, "t", 8)
        batch = disk.batch_holding("t", 3)
        assert batch is not None
        with disk.pinned(batch):
            remove_files(disk.trim("t", 1))
            assert not batch.segment.path.exists()
            # The reader, on its worker thread, still reads the whole batch.
            data = disk.read_records(batch)
            assert len(data) == batch.total_size
            assert batch.segment.fd >= 0
        assert batch.segment.fd == -1  # closed once the reader is done
        assert disk.batch_holding("t", 3) is None
    finally:
        disk.close()


def test_files_begun_after_a_crash_in_a_trim_or_a_roll_are_accepted(
    log: CxlLog, tmp_path: Path
) -> None:
    publish_and_close(log, tmp_path, 12)
    # A trim cut short removed the oldest file only; a roll cut short left
    # an empty newest file.
    (tmp_path / file_name("t", 0, 0)).unlink()
    empty = tmp_path / file_name("t", 0, 12 * 8)
    empty.touch(mode=0o600)
    disk = open_disk(log, tmp_path)
    try:
        assert disk.first_offset("t") == 32
        assert disk.durable_batches(log.stream("t")) == 12
        assert not empty.exists()
        publish(log, disk, "t", 1)
        assert files(tmp_path)[-1][0] == 12 * 8
    finally:
        disk.close()


def test_a_missing_file_between_two_is_refused(log: CxlLog, tmp_path: Path) -> None:
    publish_and_close(log, tmp_path, 12)
    (tmp_path / file_name("t", 0, 32)).unlink()
    with pytest.raises(LayoutError, match="jumps from logical offset 32 to 64"):
        open_disk(log, tmp_path)


def test_a_file_whose_name_does_not_match_its_batches_is_refused(
    log: CxlLog, tmp_path: Path
) -> None:
    publish_and_close(log, tmp_path, 2)
    (tmp_path / file_name("t", 0, 0)).rename(tmp_path / file_name("t", 0, 5))
    with pytest.raises(LayoutError, match="its name says it begins at logical offset 5"):
        open_disk(log, tmp_path)


def test_a_one_file_disk_log_of_the_earlier_form_is_renamed(log: CxlLog, tmp_path: Path) -> None:
    publish_and_close(log, tmp_path, 3)
    old = tmp_path / "t@0.log"
    (tmp_path / file_name("t", 0, 0)).rename(old)
    disk = open_disk(log, tmp_path)
    try:
        assert not old.exists()
        assert files(tmp_path)[0][0] == 0
        assert disk.durable_batches(log.stream("t")) == 3
    finally:
        disk.close()
