"""Who may read the log.

* The CXL file, the disk log files and their lock files are created with ``cxl.mode`` /
  ``storage.mode`` (0600 by default, whatever the umask), and set to it when they exist.
* A symbolic link in their place is refused, so is a file of another user; nothing is
  followed, truncated or unlinked.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from conftest import MakeConfig
from memory import open_small_log

from trio_embarcadero import open_broker, open_publisher
from trio_embarcadero.errors import UnsafeFileError
from trio_embarcadero.log.disk import file_name
from trio_embarcadero.log.ownership import disk_lock_path, open_private_file, region_lock_path


def mode_of(path: str | Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def umask_0() -> Iterator[None]:
    """No umask: a mode that is right comes from the broker, not from the umask."""
    old = os.umask(0)
    yield
    os.umask(old)


async def publish_one(port: int) -> None:
    async with open_publisher("127.0.0.1", port, "t", ack=2) as pub:
        await pub.publish(b"secret")
        await pub.flush()
        assert pub.acked == 1


@pytest.mark.usefixtures("umask_0")
@pytest.mark.parametrize(
    ("modes", "cxl", "disk", "directory"),
    [({}, 0o600, 0o600, 0o700), ({"cxl.mode": 0o640, "storage.mode": 0o660}, 0o640, 0o660, 0o770)],
    ids=["default", "configured"],
)
async def test_files_get_the_configured_mode(
    make_config: MakeConfig,
    tmp_path: Path,
    modes: dict[str, int],
    cxl: int,
    disk: int,
    directory: int,
) -> None:
    storage = tmp_path / "disk"
    config = make_config(**{"storage.dir": str(storage), **modes})
    with trio.fail_after(10):
        async with open_broker(config) as broker:
            await publish_one(broker.port)
    assert mode_of(config.cxl.path) == cxl
    assert mode_of(region_lock_path(config.cxl.path)) == cxl
    assert mode_of(storage) == directory
    assert mode_of(disk_lock_path(str(storage))) == disk
    assert mode_of(storage / file_name("t", 0)) == disk

    # Files made before (or loosened since) are set to the configured mode again.
    for path in (config.cxl.path, storage / file_name("t", 0)):
        os.chmod(path, 0o644)
    with trio.fail_after(10):
        async with open_broker(config):
            pass
    assert mode_of(config.cxl.path) == cxl
    assert mode_of(storage / file_name("t", 0)) == disk


@pytest.mark.parametrize("reset", [False, True])
async def test_a_link_at_the_cxl_path_is_refused(
    make_config: MakeConfig, tmp_path: Path, cxl_path: str, reset: bool
) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"someone else's file")
    os.symlink(target, cxl_path)
    with pytest.raises(UnsafeFileError) as info:
        async with open_broker(make_config(), reset=reset):
            pass  # pragma: no cover - refused
    assert str(info.value).startswith(f"{cxl_path} (CXL file) is a symbolic link;")
    assert "remove the link or point the config at the real path" in str(info.value)
    # Neither the link nor what it points to was touched.
    assert os.readlink(cxl_path) == str(target)
    assert target.read_bytes() == b"someone else's file"


async def test_a_link_in_the_disk_log_is_refused(make_config: MakeConfig, tmp_path: Path) -> None:
    storage = tmp_path / "disk"
    storage.mkdir()
    target = tmp_path / "elsewhere"
    target.write_bytes(b"")
    os.symlink(target, storage / file_name("t", 0))
    with pytest.raises(UnsafeFileError, match=r"\(disk log\) is a symbolic link"):
        async with open_broker(make_config(**{"storage.dir": str(storage)})):
            pass  # pragma: no cover - refused
    assert target.read_bytes() == b""


def test_a_file_of_another_user_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "file"
    path.write_bytes(b"")
    me = os.geteuid()
    monkeypatch.setattr(os, "geteuid", lambda: me + 1)
    with pytest.raises(UnsafeFileError) as info:
        open_private_file(str(path), os.O_RDWR, 0o600, "CXL file")
    assert str(info.value) == (
        f"{path} (CXL file) belongs to uid {me}, not to this user (uid {me + 1}); another user "
        "may have created it to read or alter the log: remove it (as its owner or root) or "
        "use another path"
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can make a file of another user")
def test_a_cxl_file_planted_by_another_user_is_refused(cxl_path: str) -> None:
    # Another user created the file at the path first (say, at the default path).
    with open(cxl_path, "wb") as planted:
        planted.write(b"\0" * 4096)
    os.chmod(cxl_path, 0o666)
    os.chown(cxl_path, 4242, 4242)
    with pytest.raises(UnsafeFileError, match=f"{cxl_path} \\(CXL file\\) belongs to uid 4242"):
        open_small_log(cxl_path)
    with pytest.raises(UnsafeFileError, match="belongs to uid 4242"):
        open_small_log(cxl_path, reset=True)  # not unlinked either
    assert os.stat(cxl_path).st_uid == 4242
    assert mode_of(cxl_path) == 0o666
