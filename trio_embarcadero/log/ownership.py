"""Who may write a log: one broker process per (place, broker id), and only its user.

**One writer per broker id.** A broker's streams in a CXL region, and its
files in a disk log directory, must have exactly one writer: a second broker
process with the same id would run recovery over the first one's in-flight
batches, commit into the same stream, or (with ``--reset``) unlink the file
the first one is still acking into. So a broker holds an exclusive lock on
its (region, broker id), and one on its (disk log directory, broker id), for
its whole life, taken before it resets, recovers or replays anything.

The locks live in a lock file beside what they protect,
``<cxl.path>.lock`` and ``<storage.dir>/brokers.lock``, never in the region
file itself: ``--reset`` unlinks and recreates the region, and a lock on the
unlinked inode would protect nothing. Each broker id owns a 16-byte slot of
the lock file; the broker holds an open-file-description lock
(``F_OFD_SETLK``) on its slot and writes its pid there for the message a
second broker prints. Such a lock, unlike a classic ``lockf`` lock, conflicts
between two handles of one process too (two brokers embedded in one
program) and is not dropped when the process closes some other descriptor
of the file; the kernel releases it when the holder dies, so a ``kill -9``
leaves nothing to clean up. ``--reset`` discards every broker's streams in
the region, so it locks every slot until the region is recreated.

**Only its user.** Files are created with the configured mode (0600 unless
``cxl.mode`` / ``storage.mode`` say otherwise) and opened with ``O_NOFOLLOW``;
a symbolic link in their place, or a file that belongs to another user (say,
created in advance at the predictable default path under ``/dev/shm``), is
refused.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
from pathlib import Path

from ..errors import AlreadyServedError, UnsafeFileError
from ..wire import MAX_BROKER_ID

#: Bytes of the lock file per broker id: the locked range, holding the pid.
SLOT_SIZE = 16
SLOTS = MAX_BROKER_ID + 1
#: The byte of a region's lock file, past every broker's slot, whose lock
#: guards the region's session table (see :mod:`.sessions`).
SESSION_LOCK_OFFSET = SLOTS * SLOT_SIZE
#: Linux's ``struct flock`` on 64-bit: type, whence, (pad), start, len, pid, (pad).
_FLOCK = struct.Struct("@hhqqi4x")


def open_private_file(path: str, flags: int, mode: int, what: str) -> int:
    """Open ``path`` without following a symbolic link and check that it is ours.

    A file it creates gets ``mode`` exactly (the umask does not apply); an
    existing file of ours gets it too, so a tightened mode applies to files
    made before.

    Args:
        path: The file.
        flags: ``os.open`` flags (``O_NOFOLLOW`` and ``O_CLOEXEC`` are added).
        mode: Its permission bits.
        what: What the file is, for messages ("CXL file").

    Returns:
        The open descriptor.

    Raises:
        UnsafeFileError: ``path`` is a symbolic link, not a regular file, or
            belongs to another user.
        OSError: It cannot be opened.
    """
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeFileError(_symlink_message(path, what)) from None
        raise
    try:
        info = os.fstat(fd)
        _check_ours(path, what, info)
        if stat.S_IMODE(info.st_mode) != mode:
            os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_replaceable(path: str, what: str) -> None:
    """Refuse to unlink ``path`` (``--reset``) when it is not a file of ours.

    Raises:
        UnsafeFileError: As for :func:`open_private_file`.
    """
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(info.st_mode):
        raise UnsafeFileError(_symlink_message(path, what))
    _check_ours(path, what, info)


def _symlink_message(path: str, what: str) -> str:
    return (
        f"{path} ({what}) is a symbolic link; the broker does not follow links there "
        "(one in a shared directory could send its writes, or its log, elsewhere): "
        "remove the link or point the config at the real path"
    )


def _check_ours(path: str, what: str, info: os.stat_result) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise UnsafeFileError(
            f"{path} ({what}) is not a regular file; remove it or use another path"
        )
    me = os.geteuid()
    if info.st_uid != me:
        raise UnsafeFileError(
            f"{path} ({what}) belongs to uid {info.st_uid}, not to this user (uid {me}); "
            "another user may have created it to read or alter the log: remove it "
            "(as its owner or root) or use another path"
        )


class BrokerLock:
    """The lock a broker holds on its slot of a lock file; see the module docstring.

    Use :func:`claim_region` or :func:`claim_disk_log`.

    Attributes:
        served: What the lock protects (the CXL file or disk log directory).
        broker_id: The slot held.
        whole: Whether every slot is held (``--reset`` of a region).
    """

    def __init__(self, fd: int, served: str, broker_id: int) -> None:
        self._fd = fd
        self.served = served
        self.broker_id = broker_id
        self.whole = False

    @classmethod
    def acquire(
        cls, lock_path: str, served: str, broker_id: int, *, mode: int, whole: bool = False
    ) -> BrokerLock:
        """Take slot ``broker_id`` of ``lock_path`` (with ``whole``: every slot).

        Raises:
            AlreadyServedError: A live process holds the slot (or, with
                ``whole``, any slot).
            UnsafeFileError: The lock file is a link or another user's.
        """
        if not 0 <= broker_id < SLOTS:
            raise ValueError(f"broker id {broker_id} is not in 0..{SLOTS - 1}")
        fd = open_private_file(lock_path, os.O_RDWR | os.O_CREAT, mode, "lock file")
        lock = cls(fd, served, broker_id)
        try:
            own = broker_id * SLOT_SIZE
            if not _try_lock(fd, fcntl.F_WRLCK, own, SLOT_SIZE):
                raise lock._taken(
                    own, SLOT_SIZE, "stop that broker first, or use another broker id"
                )
            if whole:
                if not _try_lock(fd, fcntl.F_WRLCK, 0, SLOTS * SLOT_SIZE):
                    raise lock._taken(
                        0,
                        SLOTS * SLOT_SIZE,
                        "--reset would discard its streams too; stop it first",
                    )
                lock.whole = True
            os.pwrite(fd, f"{os.getpid():<{SLOT_SIZE - 1}}\n".encode(), own)
        except BaseException:
            os.close(fd)
            raise
        return lock

    def _taken(self, start: int, length: int, hint: str) -> AlreadyServedError:
        """The error for a conflict found in ``[start, start + length)``."""
        reply = fcntl.fcntl(
            self._fd, fcntl.F_OFD_GETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, start, length, 0)
        )
        kind, _, found, _, _ = _FLOCK.unpack(reply)
        # F_UNLCK: the holder is gone meanwhile; report the range asked for.
        slot = (found if kind != fcntl.F_UNLCK else start) // SLOT_SIZE
        return AlreadyServedError(self.served, slot, self._read_pid(slot), hint)

    def _read_pid(self, slot: int) -> int | None:
        return _slot_pid(self._fd, slot)

    def keep_own_slot(self) -> None:
        """After a reset: let other broker ids in again, keep this one's slot."""
        if not self.whole:
            return
        own = self.broker_id * SLOT_SIZE
        end = own + SLOT_SIZE
        # Never an empty range: to fcntl a length of 0 means "to the end of
        # the file", so broker 0's [0, 0) would let go of its own slot too.
        if own:
            _try_lock(self._fd, fcntl.F_UNLCK, 0, own)
        if end < SLOTS * SLOT_SIZE:
            _try_lock(self._fd, fcntl.F_UNLCK, end, SLOTS * SLOT_SIZE - end)
        self.whole = False

    def close(self) -> None:
        """Clear the pid and release the lock (closing the file does)."""
        try:
            os.pwrite(self._fd, b" " * (SLOT_SIZE - 1) + b"\n", self.broker_id * SLOT_SIZE)
        except OSError:  # pragma: no cover - the pid is only a hint
            pass
        finally:
            os.close(self._fd)


def _slot_pid(fd: int, slot: int) -> int | None:
    # The holder writes its pid right after taking its lock; in the
    # microseconds between, this says "pid unknown" rather than making a
    # refused start (maybe on the event loop) wait for it.
    text = os.pread(fd, SLOT_SIZE, slot * SLOT_SIZE).strip(b"\0 \n")
    return int(text) if text.isdigit() else None


class RangeLock:
    """An exclusive OFD lock on one byte range of an open lock file, taken
    for a few stores at a time (a context manager; it waits for the lock).

    Like the broker locks it conflicts between two handles of one process
    too, and the kernel drops it when its holder dies, so a ``kill -9``
    inside never leaves it taken. The holder must never wait for another
    lock meanwhile (see :mod:`.sessions` for the order locks are taken in).
    """

    def __init__(self, fd: int, start: int, length: int = 1) -> None:
        self._fd = fd
        self._start = start
        self._length = length

    def __enter__(self) -> None:
        query = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, self._start, self._length, 0)
        fcntl.fcntl(self._fd, fcntl.F_OFD_SETLKW, query)

    def __exit__(self, *exc: object) -> None:
        _try_lock(self._fd, fcntl.F_UNLCK, self._start, self._length)


def slot_held(fd: int, slot: int) -> bool:
    """Whether a live process holds broker id ``slot``'s lock in the lock
    file open as ``fd`` (this process's own handles count, as for any
    other)."""
    query = _FLOCK.pack(fcntl.F_RDLCK, os.SEEK_SET, slot * SLOT_SIZE, SLOT_SIZE, 0)
    kind, *_ = _FLOCK.unpack(fcntl.fcntl(fd, fcntl.F_OFD_GETLK, query))
    return bool(kind != fcntl.F_UNLCK)


def _try_lock(fd: int, kind: int, start: int, length: int) -> bool:
    """Set (or, with ``F_UNLCK``, clear) an OFD lock; False when another holds it."""
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(kind, os.SEEK_SET, start, length, 0))
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EAGAIN):
            return False
        raise
    return True


def make_private_dir(directory: str, mode: int) -> None:
    """Create ``directory`` (and its parents) if need be, each new one durable.

    A directory it creates gets ``mode`` plus x where ``mode`` has r (files
    0o600: directory 0o700), whatever the umask; an existing one is the
    user's and keeps its mode. Every directory it creates is synced in its
    parent, so files made in it cannot vanish with it after a power loss.
    """
    dir_mode = mode | (mode & 0o444) >> 2
    target = Path(os.path.abspath(directory))
    missing = []
    path = target
    while not path.exists():
        missing.append(path)
        path = path.parent
    for new in reversed(missing):
        try:
            os.mkdir(new, dir_mode if new == target else 0o777)
        except FileExistsError:  # made meanwhile by someone else; it still needs the sync
            if not new.is_dir():
                raise
        else:
            if new == target:
                os.chmod(new, dir_mode)
        sync_directory(new.parent)


def sync_directory(path: str | os.PathLike[str]) -> None:
    """fsync a directory: the entries created or removed in it become durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def region_lock_path(path: str) -> str:
    """The lock file of the CXL file ``path``."""
    return f"{path}.lock"


def settings_path(path: str) -> str:
    """The per-topic settings file of the CXL file ``path`` (see :mod:`.settings`)."""
    return f"{path}.topics.json"


def disk_lock_path(directory: str) -> str:
    """The lock file of the disk log directory ``directory``."""
    return os.path.join(directory, "brokers.lock")


def remove_region(path: str) -> None:
    """Remove the CXL file ``path``, its lock file and its topic settings,
    once no broker serves it.

    For tools and tests that made a region of their own; missing files are fine.
    """
    for name in (path, region_lock_path(path), settings_path(path)):
        try:
            os.unlink(name)
        except FileNotFoundError:
            pass


def claim_region(path: str, broker_id: int, *, mode: int, reset: bool = False) -> BrokerLock:
    """Lock broker ``broker_id``'s streams in the CXL file ``path``.

    Args:
        path: The CXL file (it need not exist yet).
        broker_id: The broker.
        mode: Permission bits of the lock file, as of the region.
        reset: Lock every broker id, since a reset discards every stream.

    Raises:
        AlreadyServedError: Another live process serves that broker id (or,
            with ``reset``, any broker id) on ``path``.
        UnsafeFileError: The lock file is a link or another user's.
    """
    return BrokerLock.acquire(region_lock_path(path), path, broker_id, mode=mode, whole=reset)


def served_brokers(path: str) -> set[int]:
    """The broker ids a live process serves on the CXL file ``path`` now."""
    return set(lock_holders(path))


def lock_holders(path: str) -> dict[int, int | None]:
    """The broker ids a live process serves on the CXL file ``path`` now,
    each with that process's pid (None while it is not written yet).

    Raises:
        OSError: The lock file exists but cannot be read (another user's).
    """
    try:
        fd = os.open(region_lock_path(path), os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return {}
    try:
        return {slot: _slot_pid(fd, slot) for slot in range(SLOTS) if slot_held(fd, slot)}
    finally:
        os.close(fd)


def claim_disk_log(directory: str, broker_id: int, *, mode: int) -> BrokerLock:
    """Lock broker ``broker_id``'s files in the disk log ``directory`` (created if need be).

    Raises:
        AlreadyServedError: Another live process serves that broker id there.
        UnsafeFileError: The lock file is a link or another user's.
    """
    make_private_dir(directory, mode)
    return BrokerLock.acquire(disk_lock_path(directory), directory, broker_id, mode=mode)


__all__ = [
    "SESSION_LOCK_OFFSET",
    "BrokerLock",
    "RangeLock",
    "check_replaceable",
    "claim_disk_log",
    "claim_region",
    "disk_lock_path",
    "lock_holders",
    "make_private_dir",
    "open_private_file",
    "region_lock_path",
    "remove_region",
    "slot_held",
    "sync_directory",
]
