"""The machine-stall probe and how the bench puts its stalls beside each run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
import trio

from trio_embarcadero.tools import bench, stallprobe
from trio_embarcadero.tools.bench.report import _notes
from trio_embarcadero.tools.bench.stalls import (
    MachineStall,
    StallProbeError,
    StallProbes,
    stalls_during,
)

BATCH_PAYLOAD = 1928 * 1024


class _FakeTime:
    """A clock that a sleep moves: by the period, plus the delays queued up."""

    def __init__(self, delays: list[float]) -> None:
        self.now = 100.0
        self.delays = delays

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds + (self.delays.pop(0) if self.delays else 0.0)


def test_only_wake_ups_later_than_the_threshold_are_stalls() -> None:
    fake = _FakeTime([0.0, 0.0005, 0.0, 0.004, 0.0009, 0.0015])
    wakeups = stallprobe.late_wakeups(0.002, 0.001, clock=fake.clock, sleep=fake.sleep)
    first, second = next(wakeups), next(wakeups)
    # The fourth sleep came 4 ms late: due at 100.0085, woke at 100.0125.
    assert first.start == pytest.approx(100.0065)
    assert first.end == pytest.approx(100.0125)
    assert first.late_s == pytest.approx(0.004)
    # 0.9 ms late is not over the threshold; 1.5 ms is.
    assert second.late_s == pytest.approx(0.0015)
    assert second.start == pytest.approx(first.end + 0.002 + 0.0009)
    assert fake.delays == []


def test_the_probe_says_whether_it_got_real_time_priority_and_stops_on_sigterm() -> None:
    with subprocess.Popen(
        [sys.executable, "-m", "trio_embarcadero.tools.stallprobe", "--period-ms", "5"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            ready = json.loads(proc.stdout.readline())
            assert ready["type"] == "ready"
            assert ready["period_ms"] == 5.0
            assert ready["threshold_ms"] == stallprobe.DEFAULT_THRESHOLD_MS
            fifo = os.sched_getscheduler(proc.pid) == os.SCHED_FIFO
            assert ready["realtime"] is fifo
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
        finally:
            proc.kill()


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [
        (["--period-ms", "0"], "above 0"),
        (["--threshold-ms", "soon"], "not a number of milliseconds"),
    ],
)
def test_bad_probe_options_are_usage_errors(
    argv: list[str], complaint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        stallprobe.main(argv)
    assert exc.value.code == 2
    assert complaint in capsys.readouterr().err


def test_a_run_gets_the_stalls_that_overlap_its_window() -> None:
    stalls = [
        MachineStall(0, 1.0, 1.5, 3.0),  # ends before the window
        MachineStall(1, 1.9, 2.1, 4.0),  # straddles its start
        MachineStall(0, 2.5, 2.6, 1.2),  # inside
        MachineStall(1, 2.9, 3.4, 7.5),  # straddles its end
        MachineStall(0, 3.0, 3.2, 2.0),  # after it
    ]
    assert stalls_during(stalls, 2.0, 3.0) == [4.0, 1.2, 7.5]
    assert stalls_during(stalls, 5.0, 6.0) == []


def _paced_run(rnd: int, p99_ms: float, stalls: list[float] | None) -> bench.RunResult:
    run = bench.RunResult(
        "direct-ack1",
        rnd,
        ok=True,
        payload_bytes=10**9,
        messages=10**6,
        elapsed_s=1.0,
        rate=0.8,
        offered_bytes_per_s=0.8e9,
        latency_us=[int(p99_ms * 1000)] * 100,
        server_cpu_s=0.9,
    )
    run.machine_stalls_ms = stalls
    return run


def test_paced_runs_split_their_p99_by_whether_the_machine_was_quiet() -> None:
    args = bench.build_parser().parse_args(
        ["--variants", "direct-ack1", "--rounds", "3", "--rate", "0.8", "--stall-probe"]
    )
    plan = bench.make_plan(args)
    assert plan.stall_probe is True
    runs = []
    for rnd, p99, stalls in ((1, 3.0, []), (2, 40.0, [1.5, 12.0]), (3, 4.0, [1.9])):
        runs.append(
            bench.RunResult(
                "direct-ack1", rnd, ok=True, payload_bytes=10**9, messages=10**6, elapsed_s=1.0
            )
        )
        runs.append(_paced_run(rnd, p99, stalls))
    summary = bench.summarize(plan, runs)
    (paced,) = summary["direct-ack1"]["paced"]
    stalls = paced["machine_stalls"]
    assert stalls["longest_ms"]["values"] == [0.0, 12.0, 1.9]
    assert stalls["quiet_runs"] == 2
    # (hdrhistogram, when installed, keeps three significant digits)
    assert stalls["p99_quiet_runs_ms"]["values"] == pytest.approx([3.0, 4.0], rel=1e-3)
    assert stalls["p99_stalled_runs_ms"]["values"] == pytest.approx([40.0], rel=1e-3)
    setup = {"cpus": [0, 1], "realtime": True, "period_ms": 2.0, "threshold_ms": 1.0}
    notes = _notes(plan, summary, None, {**setup, "quiet_ms": 2.0})
    (probe,) = [n for n in notes if n.startswith("Machine stalls:")]
    assert "CPUs 0-1" in probe
    assert "at real-time priority" in probe
    (target,) = [n for n in notes if n.startswith("Target (direct-ack1")]
    assert re.search(
        r"Runs with no machine stall over 2 ms: 2 of 3, their p99 3\.50 \[3\.00-4\.00\] ms; "
        r"the others' 40\.0\d \[40\.0\d-40\.0\d\] ms\.$",
        target,
    )
    notes = _notes(plan, summary, None, {**setup, "realtime": False, "quiet_ms": 2.0})
    (probe,) = [n for n in notes if n.startswith("Machine stalls:")]
    assert "NOT at real-time priority" in probe
    # Without the probe: no split, no note, no column.
    for run in runs:
        run.machine_stalls_ms = None
    summary = bench.summarize(attrs.evolve(plan, stall_probe=False), runs)
    assert summary["direct-ack1"]["paced"][0]["machine_stalls"] is None
    assert not [n for n in _notes(plan, summary, None) if "machine stall" in n.lower()]


def test_the_table_shows_each_paced_rows_longest_stalls_and_quiet_runs() -> None:
    plan = bench.make_plan(
        bench.build_parser().parse_args(
            ["--variants", "direct-ack1", "--rounds", "2", "--rate", "0.8", "--stall-probe"]
        )
    )
    b = bench.Bench(plan, live=None)
    try:
        assert b.stall_probes is not None
        assert b.stall_probes.cpus == tuple(sorted(os.sched_getaffinity(0)))
        b.stall_probes.realtime = True
        for rnd, stalls in ((1, [3.25]), (2, [])):
            b.runs.append(
                bench.RunResult(
                    "direct-ack1", rnd, ok=True, payload_bytes=10**9, messages=10**6, elapsed_s=1.0
                )
            )
            b.runs.append(_paced_run(rnd, 2.0, stalls))
        report = bench.build_report(b)
    finally:
        b.close()
    assert report["setup"]["stall_probe"]["cpus"] == sorted(os.sched_getaffinity(0))
    assert report["runs"][1]["machine_stalls_ms"] == [3.25]
    assert report["runs"][1]["longest_stall_ms"] == 3.25
    assert report["runs"][0]["machine_stalls_ms"] is None  # no window: not a client's run
    text = bench.render_table(report)
    _, _, paced = text.partition("Paced load")
    assert "longest machine stall ms (quiet runs)" in paced
    row = next(line for line in paced.splitlines() if line.startswith("direct-ack1"))
    assert row.rstrip().endswith("1.6 [0.0-3.2] (1/2)")


def test_pinned_probes_watch_the_servers_and_the_clients_cpus() -> None:
    args = bench.build_parser().parse_args(["--variants", "trio-sink", "--stall-probe"])
    plan = attrs.evolve(bench.make_plan(args), pin=bench.Pinning(servers=(3,), clients=(0, 1)))
    assert plan.probe_cpus() == [0, 1, 3]


async def test_a_probe_that_cannot_be_bound_is_a_clear_error() -> None:
    probes = StallProbes([1 << 20])
    with (
        trio.fail_after(30),
        pytest.RaisesGroup(
            pytest.RaisesExc(StallProbeError, match=f"cannot bind a stall probe to CPU {1 << 20}"),
            flatten_subgroups=True,
        ),
    ):
        await probes.serve()


async def test_a_probe_that_never_gets_ready_or_ends_early_is_an_error() -> None:
    cpu = min(os.sched_getaffinity(0))
    silent = StallProbes([cpu])
    silent.command = (sys.executable, "-c", "import sys; sys.stderr.write('no probe here')")
    with (
        trio.fail_after(30),
        pytest.RaisesGroup(
            pytest.RaisesExc(StallProbeError, match="did not start: no probe here"),
            flatten_subgroups=True,
        ),
    ):
        await silent.serve()
    ready = json.dumps({"type": "ready", "realtime": False, "period_ms": 2, "threshold_ms": 1})
    quitter = StallProbes([cpu])
    quitter.command = (sys.executable, "-c", f"print({ready!r}, flush=True)")
    with (
        trio.fail_after(30),
        pytest.RaisesGroup(
            pytest.RaisesExc(StallProbeError, match=f"the stall probe on CPU {cpu} exited with 0"),
            flatten_subgroups=True,
        ),
    ):
        async with trio.open_nursery() as nursery:
            await nursery.start(quitter.serve)
            assert quitter.realtime is False
            await trio.sleep_forever()


@pytest.fixture
def cxl_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="trio-embarcadero-bench-test-") as d:
        yield Path(d)


def _probes_running() -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"trio_embarcadero.tools.stallprobe" in cmdline:
                found.append(entry.name)
    return found


def test_tiny_real_run_with_the_stall_probe(cxl_dir: Path) -> None:
    """A paced run with the probes on: every run has its stalls (maybe none),
    the report says how the probes ran, and none outlives the bench."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRIO_EMBARCADERO_")}
        proc = subprocess.run(
            [
                *(sys.executable, "-m", "trio_embarcadero", "bench"),
                *("--variants", "direct-ack1", "--rounds", "1", "--rate", "0.5"),
                *("--connections", "2", "--bytes", str(4 * BATCH_PAYLOAD)),
                *("--cxl-dir", str(cxl_dir), "--stall-probe", "--json", str(out)),
            ],
            capture_output=True,
            text=True,
            timeout=180,
            env=env,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        report = json.loads(out.read_text())
    probe = report["setup"]["stall_probe"]
    assert probe["cpus"] == sorted(os.sched_getaffinity(0))
    assert isinstance(probe["realtime"], bool)
    assert "Machine stalls: a probe on each of" in proc.stdout
    assert len(report["runs"]) == 2
    for run in report["runs"]:
        assert run["ok"], run
        assert isinstance(run["machine_stalls_ms"], list)
        assert run["longest_stall_ms"] == max(run["machine_stalls_ms"], default=0.0)
    (paced,) = report["variants"]["direct-ack1"]["paced"]
    assert len(paced["machine_stalls"]["longest_ms"]["values"]) == 1
    assert "machine stall" in proc.stderr  # the per-run lines
    assert _probes_running() == []
    assert list(cxl_dir.iterdir()) == []
