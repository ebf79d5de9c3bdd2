"""What ``/proc`` says about the tools' child processes and the file systems they use.

The bench samples its receivers' CPU time, memory and the CPUs they may run
on; the no-loss checker
reads its broker's peak memory; the failover measurement stops a broker only
outside the region's file lock and the session table's range lock. Every
reader returns an empty or "unknown" answer rather than raising when a
process is gone or ``/proc`` is missing: a sample that cannot be taken must
not end a run.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from ``/proc/PID/stat`` (0.0 if unreadable)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # The command name may contain spaces and parentheses; fields follow the last ')'.
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def process_memory(pid: int) -> dict[str, int]:
    """The memory fields of ``/proc/PID/status`` (``VmHWM``, ``VmRSS``, ``RssAnon``...) in
    bytes; empty if unreadable."""
    found: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return found
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        value = rest.split()
        if len(value) == 2 and value[1] == "kB":
            found[key] = int(value[0]) * 1024
    return found


def parse_cpu_list(text: str) -> list[int]:
    """The CPUs of a kernel CPU list (``"0-3,6"``, as in ``Cpus_allowed_list``), sorted.

    Raises:
        ValueError: ``text`` is not such a list (or names no CPU).
    """
    cpus: set[int] = set()
    for part in text.replace(" ", "").split(","):
        first, dash, last = part.partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise ValueError(f"not a CPU list (like 0-3,6): {text!r}")
        low, high = int(first), int(last) if dash else int(first)
        if high < low:
            raise ValueError(f"a CPU range runs upwards (like 2-3): {part!r} in {text!r}")
        cpus.update(range(low, high + 1))
    return sorted(cpus)


def cpu_list_text(cpus: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` as the kernel writes it: ``"0-2,5"``."""
    parts: list[str] = []
    ordered = sorted(set(cpus))
    start = 0
    for i, cpu in enumerate(ordered):
        if i + 1 == len(ordered) or ordered[i + 1] != cpu + 1:
            first = ordered[start]
            parts.append(str(cpu) if first == cpu else f"{first}-{cpu}")
            start = i + 1
    return ",".join(parts)


def process_cpus(pid: int) -> list[int]:
    """The CPUs any thread of a process may run on (the union of their
    ``Cpus_allowed_list``), sorted; empty if unreadable."""
    cpus: set[int] = set()
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        try:
            text = status.read_text()
        except OSError:  # the thread ended meanwhile
            continue
        for line in text.splitlines():
            if line.startswith("Cpus_allowed_list:"):
                cpus.update(parse_cpu_list(line.partition(":")[2].strip()))
    return sorted(cpus)


def filesystem(path: str) -> str:
    """What backs ``path``: ``"ext4 on /dev/vda"`` (from ``/proc/self/mounts``), or "unknown"."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return "unknown"
    target = os.path.realpath(path)
    best: tuple[int, str] = (-1, "unknown")
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        # Spaces and the like are octal escapes (\040) in this file.
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= best[0]:  # the last of equal mounts is on top
            best = (len(point), f"{fields[2]} on {fields[0]}")
    return best[1]


def process_state(pid: int) -> str:
    """A process's state letter (``R``, ``S``, ``T`` when stopped...), from
    ``/proc/PID/stat`` ("" if unreadable)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return text[text.rindex(")") + 2 :].split()[0]


def holds_flock(pid: int, path: str) -> bool:
    """Whether process ``pid`` holds a ``flock`` on the file ``path`` now (from
    ``/proc/locks``; False if unreadable)."""
    # "1: FLOCK  ADVISORY  WRITE 4711 00:1a:123456 0 EOF" (blocked waiters: "->").
    return any(
        fields[1] == "FLOCK" and fields[4].isdigit() and int(fields[4]) == pid
        for fields in _locks_on(path)
    )


def _locks_on(path: str) -> list[list[str]]:
    """The fields of each line of ``/proc/locks`` about the file ``path``
    (none if either is unreadable)."""
    try:
        inode = str(os.stat(path).st_ino)
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return []
    # A waiter's line has "->" after the number: it holds nothing.
    rows = (line.split() for line in lines)
    return [f for f in rows if len(f) >= 8 and f[1] != "->" and f[5].rsplit(":", 1)[-1] == inode]


def range_locked(path: str, offset: int) -> bool:
    """Whether byte ``offset`` of the file ``path`` is under an open file
    description lock (``F_OFD_SETLK``) now, by any process: ``/proc/locks``
    names no process for those (False if unreadable)."""
    # "2: OFDLCK ADVISORY WRITE -1 00:1a:123456 4096 4096" (blocked waiters: "->").
    return any(
        fields[1] == "OFDLCK"
        and int(fields[6]) <= offset
        and (fields[7] == "EOF" or offset <= int(fields[7]))
        for fields in _locks_on(path)
    )
