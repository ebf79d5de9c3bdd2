"""``--stall-probe``: the machine's own stalls, put beside each run.

One :mod:`~trio_embarcadero.tools.stallprobe` process per CPU the bench's
processes use (``--pin``'s servers and clients, or every CPU this process
may run on), bound to that CPU for the whole invocation. Each run gets the
stalls that overlap its measured window, so a paced run whose p99 is a
stall of the machine can be told from one whose receiver fell behind by
itself.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import deque
from collections.abc import Sequence
from typing import Any

import attrs
import trio

from ..stallprobe import DEFAULT_PERIOD_MS, DEFAULT_THRESHOLD_MS
from .children import pump, stop_process

#: A run none of whose stalls is longer than this is *quiet*: its tail is its own.
QUIET_STALL_MS = 2.0

_START_TIMEOUT = 30.0
_DRAIN_TIMEOUT = 5.0


class StallProbeError(Exception):
    """A probe did not start."""


@attrs.frozen
class MachineStall:
    """The CPU ``cpu`` was unavailable for ``ms`` somewhere between ``start``
    and ``end`` (``time.monotonic()`` seconds)."""

    cpu: int
    start: float
    end: float
    ms: float


def stalls_during(stalls: Sequence[MachineStall], start: float, end: float) -> list[float]:
    """How long each stall that overlaps ``[start, end]`` was, in ms, in the order seen."""
    return [s.ms for s in stalls if s.end > start and s.start < end]


class _Probe:
    """One probe process's output."""

    def __init__(self, cpu: int, stalls: list[MachineStall]) -> None:
        self.cpu = cpu
        self.stalls = stalls
        self.ready = trio.Event()
        self.realtime = False
        self.errors: deque[str] = deque(maxlen=5)
        self.output_ended = trio.Event()
        #: Set once the probe is ready or has said all it ever will.
        self.settled = trio.Event()

    async def read(self, process: trio.Process) -> None:
        """Take the process's output to its end."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, process.stdout, self.on_line)
            nursery.start_soon(pump, process.stderr, self.errors.append)
        self.output_ended.set()
        self.settled.set()

    async def failure(self, what: str) -> StallProbeError:
        """``what`` happened to the probe, with the last it said (once it has said all)."""
        with trio.move_on_after(_DRAIN_TIMEOUT):
            await self.output_ended.wait()
        return StallProbeError(
            f"the stall probe on CPU {self.cpu} {what}: " + (" | ".join(self.errors) or "no output")
        )

    def on_line(self, line: str) -> None:
        try:
            record = json.loads(line)
        except ValueError:
            self.errors.append(line)
            return
        if not isinstance(record, dict):
            return
        if record.get("type") == "stall":
            self.stalls.append(MachineStall(self.cpu, record["start"], record["end"], record["ms"]))
        elif record.get("type") == "ready":
            self.realtime = bool(record["realtime"])
            self.ready.set()
            self.settled.set()


class StallProbes:
    """The probes of one bench, and every stall they reported.

    Args:
        cpus: One probe is bound to each.
    """

    #: The probe's command line.
    command: Sequence[str] = (sys.executable, "-m", "trio_embarcadero.tools.stallprobe")

    def __init__(self, cpus: Sequence[int]) -> None:
        self.cpus = tuple(cpus)
        self.stalls: list[MachineStall] = []
        #: Whether every probe got real-time priority (None: they have not started).
        self.realtime: bool | None = None

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run a probe on each CPU until cancelled; started once every one is ready.

        Raises:
            StallProbeError: A probe exited or said nothing in time.
        """
        async with trio.open_nursery() as nursery:
            probes = [await nursery.start(self._run_probe, cpu) for cpu in self.cpus]
            self.realtime = all(p.realtime for p in probes)
            task_status.started()

    async def _run_probe(
        self, cpu: int, *, task_status: trio.TaskStatus[_Probe] = trio.TASK_STATUS_IGNORED
    ) -> None:
        probe = _Probe(cpu, self.stalls)
        process = await trio.lowlevel.open_process(
            list(self.command), stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        try:
            # At once: its interpreter is still starting, far from its first sleep.
            try:
                os.sched_setaffinity(process.pid, {cpu})
            except OSError as exc:
                raise StallProbeError(f"cannot bind a stall probe to CPU {cpu}: {exc}") from None
            async with trio.open_nursery() as nursery:
                nursery.start_soon(probe.read, process)
                # Its output, not its exit, tells: a probe may say it is
                # ready and end before this task looks.
                with trio.move_on_after(_START_TIMEOUT):
                    await probe.settled.wait()
                if not probe.ready.is_set():
                    raise await probe.failure("did not start")
                task_status.started(probe)
                await process.wait()
                # A probe runs until it is stopped: one that ends has failed,
                # and the runs after it would look quieter than they were.
                raise await probe.failure(f"exited with {process.returncode}")
        finally:
            await stop_process(process, signal.SIGTERM)

    def during(self, start: float, end: float) -> list[float]:
        """The stalls (ms) of any probed CPU that overlap ``[start, end]``."""
        return stalls_during(self.stalls, start, end)

    def setup(self) -> dict[str, Any]:
        """The report's ``setup.stall_probe``."""
        return {
            "cpus": list(self.cpus),
            "realtime": self.realtime,
            "period_ms": DEFAULT_PERIOD_MS,
            "threshold_ms": DEFAULT_THRESHOLD_MS,
            "quiet_ms": QUIET_STALL_MS,
        }
