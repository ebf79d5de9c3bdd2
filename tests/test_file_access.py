"""Who may read the log, and on which machines the broker writes it.

* The CXL file, the disk log files and their lock files are created with ``cxl.mode`` /
  ``storage.mode`` (0600 by default, whatever the umask), and set to it when they exist.
* A symbolic link in their place is refused, so is a file of another user; nothing is
  followed, truncated or unlinked.
* The broker refuses to start on a machine without x86-64 store ordering unless
  ``cxl.allow_weak_memory_ordering`` is set.
"""

from __future__ import annotations

import logging
import os
import platform
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from conftest import MakeConfig
from memory import open_small_log

from trio_embarcadero import open_broker, open_publisher
from trio_embarcadero.cli import main
from trio_embarcadero.errors import StartupError, UnsafeFileError
from trio_embarcadero.log.disk import file_name
from trio_embarcadero.log.ownership import disk_lock_path, open_private_file, region_lock_path


def exists(path: str) -> bool:
    return os.path.exists(path)


def mode_of(path: str | Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def umask_0() -> Iterator[None]:
    """No umask: a mode that is right comes from the broker, not from the umask."""
    old = os.umask(0)
    yield
    os.umask(old)


async def publish_one(port: int, *, ack: int = 2) -> None:
    async with open_publisher("127.0.0.1", port, "t", ack=ack) as pub:
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


# -- memory ordering ------------------------------------------------------------------------------


@pytest.fixture
def on_arm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")


@pytest.mark.usefixtures("on_arm")
async def test_a_weakly_ordered_machine_is_refused(make_config: MakeConfig, cxl_path: str) -> None:
    with pytest.raises(StartupError) as info:
        async with open_broker(make_config()):
            pass  # pragma: no cover - refused
    message = str(info.value)
    assert message.startswith("this machine is aarch64, not x86-64: ")
    assert "relies on x86-64 store ordering" in message
    assert "set cxl.allow_weak_memory_ordering = true" in message
    # Refused before anything was created.
    assert not exists(cxl_path)
    assert not exists(region_lock_path(cxl_path))
    with pytest.raises(StartupError, match="aarch64"):
        open_small_log(cxl_path)

    # The explicit override runs it.
    with trio.fail_after(10):
        async with open_broker(make_config(**{"cxl.allow_weak_memory_ordering": True})) as b:
            await publish_one(b.port, ack=1)


@pytest.mark.usefixtures("on_arm")
def test_serve_on_a_weakly_ordered_machine_exits_1(
    tmp_path: Path, cxl_path: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in list(os.environ):
        if var.startswith(("TRIO_EMBARCADERO_", "EMBARCADERO_")):
            monkeypatch.delenv(var)
    config = tmp_path / "broker.toml"
    config.write_text(
        f'[network]\nstaging_pool_buffer_size_mb = 1\n\n[cxl]\npath = "{cxl_path}"\n'
        "size_mb = 16\nsegment_mb = 4\nprefault = false\n"
    )
    # Its port is taken too: the machine is checked before anything else.
    with socket.socket() as busy, caplog.at_level(logging.ERROR):
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        assert main(["serve", "--config", str(config), "--port", port]) == 1
    [record] = caplog.records
    assert record.getMessage().startswith("this machine is aarch64, not x86-64")
    assert not exists(cxl_path)


@pytest.mark.parametrize("machine", ["x86_64", "AMD64"])
def test_x86_64_needs_no_override(
    monkeypatch: pytest.MonkeyPatch, cxl_path: str, machine: str
) -> None:
    monkeypatch.setattr(platform, "machine", lambda: machine)
    open_small_log(cxl_path).close()
