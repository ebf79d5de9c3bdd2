"""What the tools read of ``/proc``: file locks, by kind and by holder; CPU affinity."""

from __future__ import annotations

import fcntl
import os
import struct
import threading
from pathlib import Path

import pytest

from trio_embarcadero.log.ownership import SESSION_LOCK_OFFSET, RangeLock
from trio_embarcadero.tools.procfs import (
    cpu_list_text,
    holds_flock,
    parse_cpu_list,
    process_cpus,
    range_locked,
)


def test_a_range_lock_is_seen_on_its_bytes_only_and_a_flock_by_its_holder(tmp_path: Path) -> None:
    path = tmp_path / "region.lock"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDWR)
    try:
        assert not range_locked(str(path), SESSION_LOCK_OFFSET)
        with RangeLock(fd, SESSION_LOCK_OFFSET):
            assert range_locked(str(path), SESSION_LOCK_OFFSET)
            assert not range_locked(str(path), SESSION_LOCK_OFFSET + 1)
            assert not range_locked(str(path), SESSION_LOCK_OFFSET - 1)
        assert not range_locked(str(path), SESSION_LOCK_OFFSET)
        # A lock to the end of the file covers every byte after its start.
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hhqqi", fcntl.F_WRLCK, 0, 100, 0, 0))
        assert range_locked(str(path), SESSION_LOCK_OFFSET)
        assert not holds_flock(os.getpid(), str(path))  # a range lock is no flock
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert holds_flock(os.getpid(), str(path))
        assert not holds_flock(os.getpid() + 1, str(path))
    finally:
        os.close(fd)
    assert not range_locked(str(path), SESSION_LOCK_OFFSET)


def test_cpu_lists_read_and_write_as_the_kernel_does() -> None:
    assert parse_cpu_list("0-3,6") == [0, 1, 2, 3, 6]
    assert parse_cpu_list("2, 0") == [0, 2]
    assert cpu_list_text([5, 0, 1, 2]) == "0-2,5"
    assert cpu_list_text([0, 2, 3]) == "0,2-3"
    assert cpu_list_text([1]) == "1"
    for text in ("", "a", "1-", "3-1", "1,,2"):
        with pytest.raises(ValueError, match="CPU"):
            parse_cpu_list(text)


def test_process_cpus_covers_every_thread() -> None:
    mine = sorted(os.sched_getaffinity(0))
    assert process_cpus(os.getpid()) == mine
    if len(mine) < 2:
        pytest.skip("needs two CPUs to narrow one thread")
    started, done = threading.Event(), threading.Event()

    def narrowed() -> None:
        os.sched_setaffinity(0, {mine[0]})  # this thread only
        started.set()
        done.wait(10)

    thread = threading.Thread(target=narrowed)
    thread.start()
    try:
        started.wait(10)
        os.sched_setaffinity(0, {mine[-1]})  # and the main thread elsewhere
        assert process_cpus(os.getpid()) == [mine[0], mine[-1]]
    finally:
        os.sched_setaffinity(0, mine)
        done.set()
        thread.join()
    assert process_cpus(os.getpid()) == mine
    assert process_cpus(2**22 + 1) == []  # no such process
