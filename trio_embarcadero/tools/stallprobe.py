"""A probe for stalls of the machine itself: one process per CPU.

Run by ``trio-embarcadero bench --stall-probe`` (or by hand)::

    taskset -c 0 python -m trio_embarcadero.tools.stallprobe

It sleeps ``--period-ms`` (2 ms) in a loop and reports every wake-up that
came more than ``--threshold-ms`` (1 ms) late. It asks for real-time
priority (``SCHED_FIFO``, which takes root or ``CAP_SYS_NICE``), under which
it preempts any ordinary process the moment its timer fires: a late wake-up
then means that the CPU was not the guest's to give (a hypervisor ran
something else on it) or that the kernel could not be preempted, not that a
busy broker or load generator held it. Without that priority a wake-up also
waits behind ordinary processes, so its stalls include theirs; the ready
line says which it got.

A paced receiver has ``1 - busy`` of its CPU to catch up with after a stall,
so on a shared VM one stall of a few milliseconds can be a run's ack p99:
the bench puts each run's stalls beside its latencies to tell the two apart.
It costs a wake-up every period on each probed CPU: on a 2-core VM, 2-4 % of
each CPU for the probe itself, and a few percent of a paced broker's CPU a
batch (the wake-ups preempt it), so it is for runs that ask for it.

Output, on stdout, one JSON object per line: ``{"type": "ready", "realtime":
BOOL, "period_ms": P, "threshold_ms": T}``, then for each late wake-up
``{"type": "stall", "start": S, "end": E, "ms": LATE}``: the CPU was
unavailable for ``LATE`` ms somewhere between ``S`` and ``E`` (the
``time.monotonic()`` clock, which every process on the machine shares).
SIGTERM or SIGINT ends it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from types import FrameType

import attrs

DEFAULT_PERIOD_MS = 2.0
DEFAULT_THRESHOLD_MS = 1.0


@attrs.frozen
class Stall:
    """A wake-up due at ``start`` + the period that came at ``end``, ``late_s`` late."""

    start: float
    end: float
    late_s: float


def late_wakeups(
    period_s: float,
    threshold_s: float,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[Stall]:
    """Sleep ``period_s`` again and again; yield each wake-up more than ``threshold_s`` late."""
    last = clock()
    while True:
        sleep(period_s)
        now = clock()
        late = now - last - period_s
        if late > threshold_s:
            yield Stall(last, now, late)
        last = now


def take_realtime_priority() -> bool:
    """Run this process at the lowest ``SCHED_FIFO`` priority, if allowed:
    above every ordinary process, below the kernel's own real-time threads."""
    try:
        priority = os.sched_get_priority_min(os.SCHED_FIFO)
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
    except (PermissionError, AttributeError):  # no privilege; no such call here
        return False
    return True


def _positive_ms(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of milliseconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of milliseconds above 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trio_embarcadero.tools.stallprobe",
        description="Report the late wake-ups of a periodic sleep: stalls of this CPU "
        "(bind it to one with taskset).",
    )
    parser.add_argument(
        "--period-ms",
        type=_positive_ms,
        default=DEFAULT_PERIOD_MS,
        help=f"how long each sleep is (default: {DEFAULT_PERIOD_MS:g})",
    )
    parser.add_argument(
        "--threshold-ms",
        type=_positive_ms,
        default=DEFAULT_THRESHOLD_MS,
        help=f"report a wake-up later than this (default: {DEFAULT_THRESHOLD_MS:g})",
    )
    return parser


def _exit(_signum: int, _frame: FrameType | None) -> None:
    sys.exit(0)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _exit)
    signal.signal(signal.SIGINT, _exit)
    realtime = take_realtime_priority()

    def emit(record: dict[str, object]) -> None:
        print(json.dumps(record), flush=True)

    emit(
        {
            "type": "ready",
            "realtime": realtime,
            "period_ms": args.period_ms,
            "threshold_ms": args.threshold_ms,
        }
    )
    for stall in late_wakeups(args.period_ms / 1e3, args.threshold_ms / 1e3):
        emit(
            {
                "type": "stall",
                "start": stall.start,
                "end": stall.end,
                "ms": round(stall.late_s * 1e3, 3),
            }
        )
    return 0  # pragma: no cover - the loop ends only by a signal


if __name__ == "__main__":
    sys.exit(main())
