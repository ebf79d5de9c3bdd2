"""The command line: serve until a signal, exit codes, config errors, check-config, flag overrides.

``serve`` runs as a real subprocess (``python -m trio_embarcadero``) on an
ephemeral port, found in its "listening on" log line; check-config also runs
in-process through ``main``.
"""

from __future__ import annotations

import gc
import os
import platform
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path

import pytest
import trio
from conftest import MakeConfig
from rawclient import ERROR_MARKER, batch, handshake, parse_ack_stream

import trio_embarcadero
from trio_embarcadero.cli import main
from trio_embarcadero.cli.serving import serve_until_signalled
from trio_embarcadero.client import DEFAULT_BATCH_BYTES
from trio_embarcadero.config import config_to_toml, load_config
from trio_embarcadero.log import open_log

TIMEOUT = 10.0
REPO = Path(__file__).resolve().parent.parent
LISTENING = re.compile(rb"listening on 127\.0\.0\.1:(\d+)")


def clean_env() -> dict[str, str]:
    """The environment without any variable that would change the config."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TRIO_EMBARCADERO_", "EMBARCADERO_"))
    }


def write_config(tmp_path: Path, cxl_path: str, extra: str = "") -> Path:
    path = tmp_path / "broker.toml"
    path.write_text(
        f"""
[broker]
port = 0

[network]
staging_pool_buffer_size_mb = 1
staging_pool_num_buffers = 4
shutdown_grace_s = 3.0
{extra}

[cxl]
path = "{cxl_path}"
size_mb = 16
segment_mb = 4
prefault = false
"""
    )
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trio_embarcadero", *args],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=TIMEOUT,
        check=False,
    )


class Served:
    """A ``serve`` subprocess whose "listening on" line has been seen."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, stderr: bytes) -> None:
        self.proc = proc
        self.port = port
        self.stderr_so_far = stderr

    def stop(self, signum: int) -> tuple[int, str]:
        """Send ``signum``; return the exit code and the whole stderr."""
        self.proc.send_signal(signum)
        return self.wait()

    def wait(self) -> tuple[int, str]:
        """Wait for the exit; return the exit code and the whole stderr."""
        _, rest = self.proc.communicate(timeout=TIMEOUT)
        return self.proc.returncode, (self.stderr_so_far + rest).decode()


@pytest.fixture
def serve_cli() -> Iterator[Callable[..., Served]]:
    started: list[subprocess.Popen[bytes]] = []

    def start(
        *args: str,
        launcher: Sequence[str] = ("-m", "trio_embarcadero"),
        env: dict[str, str] | None = None,
    ) -> Served:
        proc = subprocess.Popen(
            [sys.executable, *launcher, "serve", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=clean_env() if env is None else env,
        )
        started.append(proc)
        assert proc.stderr is not None
        fd = proc.stderr.fileno()
        seen = b""
        deadline = time.monotonic() + TIMEOUT
        while (match := LISTENING.search(seen)) is None:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no 'listening on' line in time; stderr so far: {seen!r}"
            ready, _, _ = select.select([fd], [], [], remaining)
            if ready:
                chunk = os.read(fd, 65536)
                assert chunk, f"serve exited before listening: {seen.decode()}"
                seen += chunk
        return Served(proc, int(match.group(1)), seen)

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=TIMEOUT)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, f"EOF after {len(data)} of {n} bytes"
        data += chunk
    return bytes(data)


def recv_all(sock: socket.socket) -> bytes:
    data = bytearray()
    while chunk := sock.recv(65536):
        data += chunk
    return bytes(data)


def committed_messages(cxl_path: str, topic: str) -> int:
    """Read the CXL file the CLI broker left behind; count ``topic``'s messages."""
    with open_log(cxl_path) as log:
        try:
            return log.topic(topic).messages
        except KeyError:
            return -1


# -- serve ----------------------------------------------------------------------------------------


def test_serve_publish_then_sigint_drains(
    tmp_path: Path, cxl_path: str, serve_cli: Callable[..., Served]
) -> None:
    served = serve_cli("--config", str(write_config(tmp_path, cxl_path)))
    assert served.port > 0
    with socket.create_connection(("127.0.0.1", served.port), timeout=TIMEOUT) as sock:
        sock.sendall(
            handshake("cli", client_id=4) + batch(0, 4, 0, 30, 1000)[0] + batch(1, 4, 30, 20, 10)[0]
        )
        sock.shutdown(socket.SHUT_WR)
        broker_id, counts, error = parse_ack_stream(recv_all(sock))
    assert (broker_id, error) == (0, None)
    assert counts[-1] == 50
    assert set(counts) <= {30, 50}

    # An idle publisher is still connected when SIGINT comes: it gets its acks,
    # then error 5, then EOF; the process exits 0.
    with socket.create_connection(("127.0.0.1", served.port), timeout=TIMEOUT) as idle:
        idle.sendall(handshake("cli", client_id=5) + batch(0, 5, 0, 10, 64)[0])
        assert recv_exactly(idle, 12) == struct.pack("<iQ", 0, 10)
        code, stderr = served.stop(signal.SIGINT)
        rest = recv_all(idle)
    marker, error_code, length = struct.unpack_from("<QII", rest)
    assert (marker, error_code) == (ERROR_MARKER, 5)
    assert len(rest) == 16 + length
    assert code == 0, stderr
    assert "SIGINT: draining" in stderr
    assert "shutting down: draining 1 connection(s)" in stderr
    assert "Traceback" not in stderr
    # Everything acked is in the CXL file the broker left behind.
    assert committed_messages(cxl_path, "cli") == 60


async def test_serve_hides_what_start_up_made_from_the_collector(
    make_config: MakeConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A full collection walking start-up's objects stalled the event loop
    # for 20 ms and more under load; serve freezes them once it has started.
    frozen = trio.Event()
    calls: list[int] = []

    def freeze() -> None:
        calls.append(1)
        frozen.set()

    monkeypatch.setattr(gc, "freeze", freeze)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(serve_until_signalled, make_config(), reset=True))
            await frozen.wait()
            nursery.cancel_scope.cancel()
    assert calls == [1]


def test_sigterm_exits_0(tmp_path: Path, cxl_path: str, serve_cli: Callable[..., Served]) -> None:
    served = serve_cli("--config", str(write_config(tmp_path, cxl_path)), "--log-level", "info")
    code, stderr = served.stop(signal.SIGTERM)
    assert code == 0, stderr
    assert "SIGTERM: draining" in stderr
    assert "shutting down: draining 0 connection(s)" in stderr
    assert "Traceback" not in stderr


def test_serve_on_a_busy_port_exits_1_naming_the_address(tmp_path: Path, cxl_path: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli(
            "serve", "--config", str(write_config(tmp_path, cxl_path)), "--port", str(port)
        )
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].endswith(f": cannot listen on 127.0.0.1:{port}: address already in use")
    # The port is checked before the CXL file is opened: a broker that cannot
    # listen never recovers (let alone resets) a region another broker serves.
    assert not os.path.exists(cxl_path)


#: Runs the command line with ``os.fdatasync`` failing (EIO) on the disk log of
#: topic "doomed": the hook lives in the test's child process, not the package.
FAILING_DISK = """
import errno, os, sys

real_fdatasync = os.fdatasync

def fdatasync(fd):
    if os.readlink(f"/proc/self/fd/{fd}").endswith("/doomed@0.00000000000000000000.log"):
        raise OSError(errno.EIO, os.strerror(errno.EIO))
    real_fdatasync(fd)

os.fdatasync = fdatasync
from trio_embarcadero.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_failing_disk_log_stops_serve_with_exit_1(
    tmp_path: Path, cxl_path: str, serve_cli: Callable[..., Served]
) -> None:
    storage = tmp_path / "disk"
    config = write_config(tmp_path, cxl_path)
    config.write_text(config.read_text() + f'\n[storage]\ndir = "{storage}"\n')
    served = serve_cli("--config", str(config), launcher=("-c", FAILING_DISK))
    # An ack-1 publisher on a disk that works, idle with its count.
    with socket.create_connection(("127.0.0.1", served.port), timeout=TIMEOUT) as idle:
        idle.sendall(handshake("fine", client_id=5) + batch(0, 5, 0, 10, 64)[0])
        assert recv_exactly(idle, 12) == struct.pack("<iQ", 0, 10)
        # Then an ack-2 batch whose sync fails: error 8 instead of a count.
        with socket.create_connection(("127.0.0.1", served.port), timeout=TIMEOUT) as sock:
            sock.sendall(handshake("doomed", client_id=6, ack=2) + batch(0, 6, 0, 10, 64)[0])
            broker_id, counts, error = parse_ack_stream(recv_all(sock))
        assert (broker_id, counts) == (0, [])
        assert error is not None
        assert error[0] == 8
        assert error[1].startswith("storage failure: ")
        _, counts, error = parse_ack_stream(recv_all(idle), with_broker_id=False)
    assert (counts, error) == ([], (5, "broker is shutting down"))
    code, stderr = served.wait()
    assert code == 1, stderr
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, stderr
    assert str(storage / "doomed@0.00000000000000000000.log") in errors[0]
    assert "EIO" in errors[0]
    # What was committed stays in the CXL file (acked at level 1 or not acked at all).
    assert committed_messages(cxl_path, "fine") == 10
    assert committed_messages(cxl_path, "doomed") == 10


# -- configuration errors -------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["serve", "check-config"])
def test_bad_config_exits_2_with_every_problem(tmp_path: Path, cxl_path: str, command: str) -> None:
    path = write_config(tmp_path, cxl_path, "staging_pool_num_buffers_typo = 3")
    path.write_text(
        path.read_text().replace("staging_pool_num_buffers = 4", "staging_pool_num_buffers = 0")
    )
    result = run_cli(command, "--config", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[0] == "trio-embarcadero: invalid configuration:"
    assert sorted(lines[1:]) == sorted(
        [
            "  - 'staging_pool_num_buffers' must be > 0: 0 @ $.network.staging_pool_num_buffers",
            "  - extra fields found (staging_pool_num_buffers_typo) @ $.network",
        ]
    )
    assert not os.path.exists(cxl_path), "a bad config must not create the CXL file"


def test_bad_flag_value_names_the_flag(tmp_path: Path, cxl_path: str) -> None:
    result = run_cli(
        "check-config", "--config", str(write_config(tmp_path, cxl_path)), "--broker-id", "40"
    )
    assert result.returncode == 2
    assert "@ $.broker.id (from override)" in result.stderr
    assert result.stdout == ""


def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    result = run_cli("check-config", "--config", str(tmp_path / "nope.toml"))
    assert result.returncode == 2
    assert "cannot read config file" in result.stderr
    assert "@ $" in result.stderr


# -- check-config ---------------------------------------------------------------------------------


def test_check_config_prints_the_effective_config(tmp_path: Path, cxl_path: str) -> None:
    path = write_config(tmp_path, cxl_path)
    result = run_cli("check-config", "--config", str(path))
    assert result.returncode == 0, result.stderr
    printed = tomllib.loads(result.stdout)
    # The file's values...
    assert printed["broker"]["port"] == 0
    assert printed["network"]["staging_pool_num_buffers"] == 4
    assert printed["network"]["shutdown_grace_s"] == 3.0
    assert printed["cxl"] == {
        "path": cxl_path,
        "size_mb": 16,
        "segment_mb": 4,
        "segment_unit_kb": 64,
        "max_topics": 1024,
        "max_brokers": 4,
        "max_inflight_batches": 1024,
        "prefault": False,
        "mode": 0o600,
        "allow_weak_memory_ordering": False,
        "reclaim_interval_ms": 1000.0,
        "streaming_copies": True,
        "sequencer_interval_ms": 5.0,
        "sequencer_hole_timeout_s": 5.0,
        "session_timeout_s": 300.0,
        "sequencer_lease_s": 1.0,
    }
    # ...and the defaults of everything else, every key spelled out.
    assert printed["network"]["num_cxl_allocation_workers"] == 2
    assert printed["logging"] == {"level": "INFO", "format": "text"}
    assert printed["http"] == {"enabled": True, "host": "127.0.0.1", "port": 9214}
    assert set(printed) == {
        *("broker", "cluster", "network", "cxl", "storage"),
        *("http", "logging", "topics"),
    }
    # The output is itself a valid config, equal to the file's.
    again = tmp_path / "again.toml"
    again.write_text(result.stdout)
    assert load_config(again, env={}) == load_config(path, env={})
    assert result.stdout == config_to_toml(load_config(path, env={}))
    assert not os.path.exists(cxl_path), "check-config must not create the CXL file"


def test_flags_override_the_file(tmp_path: Path, cxl_path: str) -> None:
    path = write_config(tmp_path, cxl_path).with_name("flags.toml")
    path.write_text(
        f'[broker]\nid = 1\nport = 1500\n\n[logging]\nlevel = "warning"\n\n'
        f'[cxl]\npath = "{cxl_path}"\n'
    )
    plain = tomllib.loads(run_cli("check-config", "--config", str(path)).stdout)
    assert (plain["broker"]["id"], plain["broker"]["port"]) == (1, 1500)
    assert plain["logging"]["level"] == "WARNING"
    result = run_cli(
        "check-config",
        "--config",
        str(path),
        "--port",
        "4000",
        "--broker-id",
        "2",
        "--log-level",
        "debug",
        "--host",
        "::1",
    )
    assert result.returncode == 0, result.stderr
    printed = tomllib.loads(result.stdout)
    assert printed["broker"] == {
        "id": 2,
        "host": "::1",
        "port": 4000,
        "heartbeat_interval_s": 0.2,
        "heartbeat_timeout_s": 2.0,
    }
    assert printed["logging"]["level"] == "DEBUG"


# -- main() in-process ----------------------------------------------------------------------------


def test_main_check_config_in_process(
    tmp_path: Path,
    cxl_path: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for var in list(os.environ):
        if var.startswith(("TRIO_EMBARCADERO_", "EMBARCADERO_")):
            monkeypatch.delenv(var)
    path = write_config(tmp_path, cxl_path)
    assert main(["check-config", "--config", str(path), "--port", "7", "--broker-id", "3"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    printed = tomllib.loads(out)
    assert (printed["broker"]["port"], printed["broker"]["id"]) == (7, 3)
    assert printed["network"]["staging_pool_num_buffers"] == 4

    # Precedence: file < environment < flags.
    monkeypatch.setenv("TRIO_EMBARCADERO_NETWORK__STAGING_POOL_NUM_BUFFERS", "6")
    monkeypatch.setenv("TRIO_EMBARCADERO_BROKER__PORT", "9000")
    assert main(["check-config", "--config", str(path), "--port", "7"]) == 0
    printed = tomllib.loads(capsys.readouterr().out)
    assert printed["network"]["staging_pool_num_buffers"] == 6
    assert printed["broker"]["port"] == 7

    monkeypatch.setenv("TRIO_EMBARCADERO_NETWORK__STAGING_POOL_NUM_BUFFERS", "0")
    assert main(["check-config", "--config", str(path), "--broker-id", "99"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert (
        "'staging_pool_num_buffers' must be > 0: 0 @ $.network.staging_pool_num_buffers "
        "(from TRIO_EMBARCADERO_NETWORK__STAGING_POOL_NUM_BUFFERS)" in err
    )
    assert "@ $.broker.id (from override)" in err


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (["publish", "--count", "-5"], "argument --count: must be a positive integer, not -5"),
        (["publish", "--count", "0"], "argument --count: must be a positive integer, not 0"),
        (["publish", "--size", "0"], "argument --size: must be a positive integer, not 0"),
        (["publish", "--size", "1k"], "argument --size: not an integer: '1k'"),
        (["publish", "--batch-bytes", "-1"], "argument --batch-bytes: must be a positive"),
        (["subscribe", "--count", "-2"], "argument --count: must be a positive integer, not -2"),
        (["subscribe", "--idle", "0"], "argument --idle: must be a positive number of seconds"),
        (["subscribe", "--idle", "nan"], "argument --idle: must be a positive number of seconds"),
        (["subscribe", "--from", "start"], "argument --from: must be an offset >= 0, 'end' or -N"),
    ],
)
def test_bad_counts_and_sizes_are_usage_errors(
    args: list[str], problem: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc_info:
        main([*args, "--topic", "t", "--port", "1"])
    assert exc_info.value.code == 2
    err = capsys.readouterr().err
    assert f"trio-embarcadero {args[0]}: error: {problem}" in err


def test_version_is_the_package_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"trio-embarcadero {trio_embarcadero.__version__}\n"
    # One source: the package metadata's version is read from __version__.
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" not in project["project"]
    assert project["project"]["dynamic"] == ["version"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "trio_embarcadero.__version__"
    }


def test_publish_help_shows_the_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc_info:
        main(["publish", "--help"])
    assert exc_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "ack level (default: 1)" in text
    assert "bytes per generated message (default: 1024)" in text
    assert f"batch size (default: {DEFAULT_BATCH_BYTES})" in text
    # No "(default: None)" or "(default: False)" noise.
    assert "default: None" not in text
    assert "default: False" not in text


def test_main_without_a_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc_info:
        main([])
    assert exc_info.value.code == 2
    assert "usage:" in capsys.readouterr().err


STREAMING = "glibc.cpu.x86_non_temporal_threshold=0x40000"


@pytest.mark.skipif(
    platform.machine() != "x86_64" or platform.libc_ver()[0] != "glibc",
    reason="streaming copies are set up on x86-64 with glibc only",
)
@pytest.mark.parametrize(
    ("given", "setting", "expected"),
    [
        (None, None, STREAMING),
        ("glibc.malloc.check=0", None, f"glibc.malloc.check=0:{STREAMING}"),
        (
            "glibc.cpu.x86_non_temporal_threshold=0x100000",
            None,
            "glibc.cpu.x86_non_temporal_threshold=0x100000",
        ),
        (None, "false", None),
    ],
)
def test_serve_runs_with_streaming_copies(
    serve_cli: Callable[..., Served],
    tmp_path: Path,
    cxl_path: str,
    given: str | None,
    setting: str | None,
    expected: str | None,
) -> None:
    """``serve`` starts itself again (same pid) with glibc's non-temporal copy
    threshold lowered, keeps other tunables and an operator's own threshold,
    and leaves the environment alone with ``cxl.streaming_copies = false``."""
    env = clean_env()
    env.pop("GLIBC_TUNABLES", None)
    env.pop("PYTEST_CURRENT_TEST", None)  # it names this test, and so the settings
    if given is not None:
        env["GLIBC_TUNABLES"] = given
    if setting is not None:
        env["TRIO_EMBARCADERO_CXL__STREAMING_COPIES"] = setting
    served = serve_cli("--config", str(write_config(tmp_path, cxl_path)), env=env)
    # The process's initial environment; glibc may have cut GLIBC_TUNABLES
    # at its colons in place while reading it, so look at the whole block.
    environ = Path(f"/proc/{served.proc.pid}/environ").read_bytes().replace(b"\0", b":")
    if expected is None:
        assert b"x86_non_temporal_threshold" not in environ
    else:
        assert f"GLIBC_TUNABLES={expected}:".encode() in environ
        assert environ.count(b"x86_non_temporal_threshold") == 1
    code, stderr = served.stop(signal.SIGINT)
    assert code == 0, stderr
    assert stderr.count("listening on") == 1
