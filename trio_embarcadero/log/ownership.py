"""Who may read and write a log's files: only the broker's user.

Files are created with the configured mode (0600 unless ``cxl.mode`` /
``storage.mode`` say otherwise) and opened with ``O_NOFOLLOW``; a symbolic
link in their place, or a file that belongs to another user (say, created in
advance at the predictable default path under ``/dev/shm``), is refused.
"""

from __future__ import annotations

import errno
import os
import stat

from ..errors import UnsafeFileError


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


def make_private_dir(directory: str, mode: int) -> None:
    """Create ``directory`` (and its parents) if need be.

    A directory it creates gets ``mode`` plus x where ``mode`` has r (files
    0o600: directory 0o700), whatever the umask; an existing one is the
    user's and keeps its mode.
    """
    dir_mode = mode | (mode & 0o444) >> 2
    os.makedirs(os.path.dirname(os.path.abspath(directory)), exist_ok=True)
    try:
        os.mkdir(directory, dir_mode)
    except FileExistsError:
        return
    os.chmod(directory, dir_mode)


__all__ = ["check_replaceable", "make_private_dir", "open_private_file"]
