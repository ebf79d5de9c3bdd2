"""What the tools read of ``/proc``: file locks, by kind and by holder."""

from __future__ import annotations

import fcntl
import os
import struct
from pathlib import Path

from trio_embarcadero.log.ownership import SESSION_LOCK_OFFSET, RangeLock
from trio_embarcadero.tools.procfs import holds_flock, range_locked


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
