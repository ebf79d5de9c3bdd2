"""What the no-loss checkers share: a broker as a child process, its
configuration, and the payloads whose bytes follow from (client, index).

:mod:`.noloss` (one broker, raw-wire publishers) and :mod:`.noloss_session`
(a cluster, the Python client in publish sessions) both use them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import attrs
import trio

from ..log import remove_region
from .procfs import process_memory

_LISTENING = re.compile(rb"listening on 127\.0\.0\.1:(\d+)")
_DISCARDED = re.compile(rb"discarded (\d+) uncommitted batch")
_REPLAYED = re.compile(rb"replayed (\d+) batch")
_START_TIMEOUT = 30.0
_STOP_TIMEOUT = 30.0


class RunError(Exception):
    """The checker could not do its run (not a verdict on the broker)."""


def payload(client_id: int, index: int, max_size: int) -> bytes:
    """The payload of message ``index`` of ``client_id``: its size and bytes
    follow from the pair alone, so the log can be checked byte for byte."""
    size = (index * 2_654_435_761 + client_id * 40_503) % (max_size + 1)
    seed = f"{client_id}:{index}|".encode()
    return (seed * (size // len(seed) + 1))[:size]


# -- the broker subprocess ----------------------------------------------------------------------


def clean_environment() -> dict[str, str]:
    """This process's environment without variables that change a broker's config."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TRIO_EMBARCADERO_", "EMBARCADERO_"))
    }


def proc_status_kib(pid: int, field: str) -> int:
    """A ``/proc/<pid>/status`` memory field (``VmHWM``, ``VmRSS``) in KiB.

    Raises:
        KeyError: The process has no such field (or is gone).
    """
    return process_memory(pid)[field] // 1024


class BrokerProcess:
    """``python -m trio_embarcadero serve`` as a child process.

    Its stderr is read continuously (a full pipe would block the broker's
    logging) and kept, up to ``keep_bytes``; a few lines are also counted.

    Attributes:
        config_path: The TOML file it serves with.
        port: The port it listens on, once started.
        process: The running (or last) process.
        starts: How many times it was started.
        pauses: "pausing receivers" lines seen, over every start.
        internal_errors: "internal error" lines seen, over every start.
        discarded: Uncommitted batches discarded at re-attach, over every start.
        replayed: Batches replayed from the disk log, over every start.
    """

    def __init__(
        self,
        config_path: str | os.PathLike[str],
        *,
        keep_bytes: int = 1 << 20,
        log_path: str | None = None,
    ) -> None:
        self.config_path = os.fspath(config_path)
        self._log_file = open(log_path, "ab") if log_path else None
        self.port = 0
        self.process: trio.Process | None = None
        self.starts = 0
        self.pauses = 0
        self.internal_errors = 0
        self.discarded = 0
        self.replayed = 0
        self._keep = keep_bytes
        self._stderr = bytearray()
        self._partial = b""
        # Per start: the "listening on" line was seen; its stderr reached EOF.
        self._listening = trio.Event()
        self._exited = trio.Event()

    @property
    def stderr(self) -> str:
        """What the broker wrote to stderr (the last ``keep_bytes`` of it)."""
        return self._stderr.decode("utf-8", "replace")

    @property
    def returncode(self) -> int | None:
        """The exit status of the last process, None while it runs."""
        return None if self.process is None else self.process.returncode

    @property
    def running(self) -> bool:
        """Whether the last process started is still running."""
        return self.process is not None and self.process.returncode is None

    async def start(self, nursery: trio.Nursery, *extra_args: str) -> int:
        """Start it (``extra_args`` such as ``--reset`` go to ``serve``) and
        return its port once it listens.

        Raises:
            RunError: It exited or did not listen within 30 s.
        """
        if self.process is not None:
            await self.kill()  # and its stderr read to the end
        self.port = 0
        self._partial = b""
        self._take(f"--- start {self.starts + 1} ---\n".encode())
        self._listening = listening = trio.Event()
        self._exited = exited = trio.Event()
        command = [
            sys.executable,
            "-m",
            "trio_embarcadero",
            "serve",
            "--config",
            self.config_path,
            *extra_args,
        ]
        process = await trio.lowlevel.open_process(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=clean_environment(),
        )
        self.process = process
        self.starts += 1
        nursery.start_soon(self._read_stderr, process, exited)
        with trio.move_on_after(_START_TIMEOUT):
            async with trio.open_nursery() as waiting:

                async def first_of(event: trio.Event) -> None:
                    await event.wait()
                    waiting.cancel_scope.cancel()

                waiting.start_soon(first_of, listening)
                waiting.start_soon(first_of, exited)
        if self.port == 0:
            await self.kill()
            raise RunError(f"the broker did not start; its stderr:\n{self.stderr[-4000:]}")
        return self.port

    async def _read_stderr(self, process: trio.Process, exited: trio.Event) -> None:
        assert process.stderr is not None
        try:
            async for chunk in process.stderr:
                self._take(bytes(chunk))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            exited.set()
            # Cancelled with the nursery (the run or a test failed): a process
            # from open_process outlives its parent unless it is killed here.
            if process.returncode is None:
                process.kill()

    def _take(self, chunk: bytes) -> None:
        if self._log_file is not None:
            self._log_file.write(chunk)
            self._log_file.flush()
        self._stderr += chunk
        if len(self._stderr) > self._keep:
            del self._stderr[: len(self._stderr) - self._keep]
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            if b"pausing receivers" in line:
                self.pauses += 1
            elif b"internal error" in line:
                self.internal_errors += 1
            elif (found := _DISCARDED.search(line)) is not None:
                self.discarded += int(found.group(1))
            elif (found := _REPLAYED.search(line)) is not None:
                self.replayed += int(found.group(1))
            elif self.port == 0 and (found := _LISTENING.search(line)) is not None:
                self.port = int(found.group(1))
                self._listening.set()

    def memory_kib(self, field: str = "VmHWM") -> int:
        """A memory figure of the running broker (peak RSS by default)."""
        assert self.process is not None
        return proc_status_kib(self.process.pid, field)

    async def kill(self) -> int:
        """SIGKILL it and wait; returns its exit status."""
        assert self.process is not None
        if self.process.returncode is None:
            self.process.kill()
        status = await self.process.wait()
        await self._exited.wait()
        return status

    async def stop(self) -> int:
        """SIGTERM it (a graceful drain) and wait; returns its exit status.

        Raises:
            RunError: It did not exit within 30 s (it is killed then).
        """
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        with trio.move_on_after(_STOP_TIMEOUT):
            status = await self.process.wait()
            await self._exited.wait()
            return status
        await self.kill()
        raise RunError(f"the broker did not stop within {_STOP_TIMEOUT} s of SIGTERM")


def write_broker_config(
    path: str | os.PathLike[str],
    *,
    cxl_path: str,
    cxl_mb: int,
    segment_mb: int = 4,
    storage_dir: str = "",
    pressure: bool = False,
    direct: bool = False,
    extra: str = "",
    order: int = 0,
    cxl_extra: str = "",
) -> None:
    """A broker config for checker runs: port 0, a private CXL file, INFO logs.

    ``order``: the topics' order level (5: the broker is the head, with its
    sequencer).

    ``pressure``: a two-buffer staging pool that pauses receivers at one buffer
    in use. ``direct``: the direct receive path (payloads go straight into
    reserved log space; no staging pool, so no pressure). ``extra`` goes
    into the ``[network]`` table, ``cxl_extra`` into the ``[cxl]`` one.
    """
    pool = (
        "staging_pool_num_buffers = 2\nnum_cxl_allocation_workers = 1\n"
        "max_buffers_per_connection = 1\npause_high_watermark = 0.5\n"
        "resume_low_watermark = 0.0\n"
        if pressure
        else "staging_pool_num_buffers = 8\n"
    )
    storage = f'[storage]\ndir = "{storage_dir}"\nsync_interval_ms = 2.0\n' if storage_dir else ""
    if direct:
        pool = "use_nonblocking = false\n"
    # Only when asked for: a caller's ``extra`` may hold a [topics] table of its own.
    topics = f"[topics]\norder = {order}\n" if order else ""
    Path(path).write_text(
        f"""[broker]
port = 0

[network]
staging_pool_buffer_size_mb = 1
{pool}shutdown_grace_s = 5.0
stats_interval_s = 1000.0
{extra}
[cxl]
path = "{cxl_path}"
size_mb = {cxl_mb}
segment_mb = {segment_mb}
prefault = false
{cxl_extra}
{storage}
{topics}
[logging]
level = "INFO"
"""
    )


@attrs.define
class Verdict:
    """A checker's failed checks: the first ``limit`` of them, in the order found."""

    problems: list[str] = attrs.Factory(list)
    #: How many problems a report lists at most.
    limit: ClassVar[int] = 20

    @property
    def ok(self) -> bool:
        """Whether every check held."""
        return not self.problems

    def problem(self, text: str) -> None:
        """Record a failed check (only the first ``limit`` are kept)."""
        if len(self.problems) < self.limit:
            self.problems.append(text)
        elif len(self.problems) == self.limit:
            self.problems.append("(more problems not listed)")


def parse_faults(text: str, known: Sequence[str]) -> frozenset[str]:
    """An argparse type's body: the comma-separated fault names of ``text``
    (``none`` for none), each one of ``known``."""
    names = frozenset(f.strip() for f in text.split(",") if f.strip() and f.strip() != "none")
    unknown = names - set(known)
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown fault(s) {', '.join(sorted(unknown))}; choose from {', '.join(known)}"
        )
    return names


def verdict_lines(summary: Mapping[str, object]) -> list[str]:
    """A report's last lines: one per problem, then ``OK`` or ``FAILED``."""
    problems = summary["problems"]
    assert isinstance(problems, list)
    return [*(f"PROBLEM: {p}" for p in problems), "OK" if summary["ok"] else "FAILED"]


def check_and_print(
    run: Callable[[Any, Path, str], Awaitable[tuple[Any, Verdict]]],
    options: Any,
    *,
    kept: str,
    summary: Callable[[Any, Any, Any, float], dict[str, object]],
    format_summary: Callable[[dict[str, object]], str],
    as_json: bool,
) -> int:
    """Run a checker on a private work directory and CXL file, print its
    report, and clean both up (unless ``options.keep``).

    Args:
        run: The checker: ``run(options, workdir, cxl_path)`` in ``trio.run``.
        options: Its options (they have ``keep``).
        kept: What the work directory holds, for the line that says it is kept.
        summary: ``summary(options, run, report, seconds)``: the report's numbers.
        format_summary: The numbers as text.
        as_json: Print the numbers as JSON instead.

    Returns:
        0 when every check held, 1 when one failed, 2 when the run could not be done.
    """
    workdir = Path(tempfile.mkdtemp(prefix="trio-embarcadero-noloss-"))
    cxl_path = f"/dev/shm/trio-embarcadero-noloss-{uuid.uuid4().hex[:12]}"
    started = time.monotonic()
    try:
        books, report = trio.run(run, options, workdir, cxl_path)
    except RunError as exc:
        print(f"noloss: {exc}", file=sys.stderr)
        return 2
    finally:
        if options.keep:
            print(f"kept: {workdir} ({kept}) and {cxl_path}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
            remove_region(cxl_path)
    result = summary(options, books, report, time.monotonic() - started)
    print(json.dumps(result) if as_json else format_summary(result))
    return 0 if report.ok else 1


__all__ = [
    "check_and_print",
    "Verdict",
    "parse_faults",
    "verdict_lines",
    "BrokerProcess",
    "RunError",
    "clean_environment",
    "payload",
    "proc_status_kib",
    "write_broker_config",
]
