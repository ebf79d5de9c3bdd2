"""The benchmark tooling: argument handling, statistics, and one tiny real run.

Performance is never asserted here; the real run only checks that every
figure is present and sane.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import pytest

from trio_embarcadero.errors import ErrorCode
from trio_embarcadero.tools import bench, loadgen, reader, sink
from trio_embarcadero.tools.bench.report import _notes
from trio_embarcadero.tools.rawwire import recv_exactly, subscribe_handshake
from trio_embarcadero.wire import (
    ACK_BROKER_ID,
    ACK_COUNT,
    BATCH_HEADER,
    HANDSHAKE,
    HANDSHAKE_SIZE,
    MESSAGE_HEADER,
    MH_LOGICAL_OFFSET,
    MH_SIZE,
    encode_error_frame,
    scan_records,
    unpack_batch_header,
)

BATCH_PAYLOAD = 1928 * 1024


def _args(*argv: str) -> argparse.Namespace:
    return bench.build_parser().parse_args(list(argv))


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("2e9", 2 * 10**9),
        ("2G", 2 * 10**9),
        ("2GB", 2 * 10**9),
        ("2GiB", 2 * 2**30),
        ("512M", 512 * 10**6),
        ("64KiB", 64 * 1024),
        ("1000", 1000),
    ],
)
def test_parse_size(text: str, value: int) -> None:
    assert bench.parse_size(text) == value


@pytest.mark.parametrize("text", ["", "0", "-1G", "2X", "G"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        bench.parse_size(text)


def test_defaults_match_the_cxx_evaluation() -> None:
    plan = bench.make_plan(_args())
    assert {v.batch_messages for v in plan.variants} == {1928}
    assert {v.batch for v in plan.variants} == {""}  # one size: names as listed
    assert plan.message_size == 1024
    assert plan.batch_total_size(plan.variants[0]) == 2_097_664
    assert plan.connections == 4
    assert plan.rounds == 3
    assert [v.name for v in plan.variants] == list(bench.DEFAULT_VARIANTS)


def test_variants_parse() -> None:
    plan = bench.make_plan(_args("--variants", "trio-sink,raw-sink-ack0,direct-ack1"))
    assert [(v.name, v.kind, v.ack, v.is_broker) for v in plan.variants] == [
        ("trio-sink", "trio-sink", 1, False),
        ("raw-sink-ack0", "raw-sink", 0, False),
        ("direct-ack1", "direct", 1, True),
    ]


@pytest.mark.parametrize(
    "text", ["staged", "broker-ack1", "staged-ack3", "direct-ack", "trio-sink,trio-sink"]
)
def test_bad_variants_are_usage_errors(text: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        _args("--variants", text)
    assert info.value.code == 2
    assert "variant" in capsys.readouterr().err


def test_ack2_variants_parse_and_are_not_run_by_default() -> None:
    plan = bench.make_plan(_args("--variants", "staged-ack2,direct-ack2,staged-ack1"))
    assert [(v.name, v.kind, v.ack, v.is_broker, v.durable) for v in plan.variants] == [
        ("staged-ack2", "staged", 2, True, True),
        ("direct-ack2", "direct", 2, True, True),
        ("staged-ack1", "staged", 1, True, False),
    ]
    assert set(bench.ACK2_VARIANTS) == {"staged-ack2", "direct-ack2"}
    assert not set(bench.ACK2_VARIANTS) & set(bench.DEFAULT_VARIANTS)
    assert plan.storage_dir == tempfile.gettempdir()


@pytest.mark.parametrize("text", ["trio-sink-ack2", "raw-sink-ack2"])
def test_sinks_have_no_ack2(text: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        _args("--variants", text)
    assert info.value.code == 2
    assert "disk log" in capsys.readouterr().err


def test_only_ack2_runs_get_a_disk_log(tmp_path: Path) -> None:
    plan = bench.make_plan(
        _args(
            "--variants",
            "staged-ack1,direct-ack2",
            "--storage-dir",
            str(tmp_path),
            "--broker-option",
            "storage.sync_interval_ms=2.5",
            "--bytes",
            "100M",
        )
    )
    assert plan.storage_dir == str(tmp_path)
    b = bench.Bench(plan, live=None)
    try:
        ack1, ack2 = plan.variants
        cxl = str(tmp_path / "cxl")
        assert b.broker_settings(ack1, cxl)["storage.dir"] == ""
        assert b.broker_settings(ack2, cxl)["storage.dir"] == str(tmp_path)
        assert b.broker_settings(ack2, cxl, str(tmp_path / "run"))["storage.dir"] == str(
            tmp_path / "run"
        )
        assert b.broker_settings(ack2, cxl)["network.use_nonblocking"] is False
        b.check_broker_config()  # the broker would accept both
        assert b.check_storage_dir() is None
        storage = b.storage_setup()
        assert storage is not None
        assert storage["dir"] == str(tmp_path)
        assert storage["sync_interval_ms"] == 2.5
        assert storage["sync_bytes"] == 64 * 2**20  # the default
        assert storage["filesystem"] != "unknown"
    finally:
        b.close()


def test_storage_dir_is_the_bench_s_to_set(capsys: pytest.CaptureFixture[str]) -> None:
    args = _args("--variants", "staged-ack2", "--broker-option", "storage.dir=/tmp/x")
    with pytest.raises(ValueError, match="--storage-dir"):
        bench.make_plan(args)
    assert bench.run(args) == 2
    assert "storage.dir" in capsys.readouterr().err


def test_missing_storage_dir_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing"
    args = _args("--variants", "staged-ack2", "--storage-dir", str(missing), "--quiet")
    assert bench.run(args) == 2
    assert str(missing) in capsys.readouterr().err
    # Without ack-2 variants the option is not used at all.
    plan = bench.make_plan(_args("--variants", "staged-ack1", "--storage-dir", str(missing)))
    b = bench.Bench(plan, live=None)
    try:
        assert b.check_storage_dir() is None
        assert b.storage_setup() is None
    finally:
        b.close()


def test_filesystem_names_what_backs_a_path() -> None:
    assert bench.filesystem("/proc/self").startswith("proc ")
    assert bench.filesystem("/") != "unknown"


def test_loadgen_reports_a_refused_ack2_handshake(capsys: pytest.CaptureFixture[str]) -> None:
    """A broker without storage.dir answers ack 2 with error 6 where the broker id goes."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def refuse() -> None:
        conn, _ = listener.accept()
        with conn:
            got = b""
            while len(got) < HANDSHAKE_SIZE:
                got += conn.recv(HANDSHAKE_SIZE - len(got))
            assert got[4] == 2  # the handshake's ack field (little-endian u32 after client_id)
            conn.sendall(encode_error_frame(ErrorCode.NOT_ALLOWED, "ack level 2 needs a disk log"))

    thread = threading.Thread(target=refuse, daemon=True)
    thread.start()
    try:
        code = loadgen.main(["--port", str(port), "--ack", "2", "--connections", "1"])
    finally:
        thread.join(timeout=10)
        listener.close()
    assert code == 1
    err = capsys.readouterr().err
    assert "refused: error 6 (NOT_ALLOWED): ack level 2 needs a disk log" in err


def test_broker_options_reach_the_broker_config(tmp_path: Path) -> None:
    plan = bench.make_plan(
        _args("--broker-option", "network.staging_pool_num_buffers=64", "--bytes", "100M")
    )
    b = bench.Bench(plan, live=None)
    try:
        variant = plan.variants[2]  # staged-ack0
        settings = b.broker_settings(variant, str(tmp_path / "cxl"))
        assert settings["network.staging_pool_num_buffers"] == 64
        assert settings["network.use_nonblocking"] is True
        assert settings["broker.port"] == 0
        b.check_broker_config()  # the broker would accept it
        # The region holds every batch of a run: the log never wraps.
        assert settings["cxl.size_mb"] * 2**20 > plan.batches_per_run(
            variant
        ) * plan.batch_total_size(variant)
    finally:
        b.close()


def test_a_given_region_size_and_retention_reach_the_broker(tmp_path: Path) -> None:
    """A run through more than its region holds: retention makes the room."""
    plan = bench.make_plan(
        _args(
            *("--broker-option", "cxl.size_mb=1024"),
            *("--broker-option", "topics.retention_bytes=268435456"),
            *("--bytes", "8G"),
        )
    )
    b = bench.Bench(plan, live=None)
    try:
        settings = b.broker_settings(plan.variants[3], str(tmp_path / "cxl"))  # staged-ack1
        assert settings["cxl.size_mb"] == 1024
        assert settings["topics.retention_bytes"] == 268435456
        b.check_broker_config()
    finally:
        b.close()


def test_loadgen_batch_is_valid_wire_format() -> None:
    batch = loadgen.build_batch(client_id=7, num_msg=5, message_size=1000)
    assert len(batch) == 128 + 5 * 1088
    starts = scan_records(np.frombuffer(bytes(batch[128:]), dtype=np.uint8), 5)
    assert list(starts) == [i * 1088 for i in range(5)]


def test_percentiles_with_and_without_hdrhistogram(monkeypatch: pytest.MonkeyPatch) -> None:
    values = list(range(1, 10_001))
    found = bench.percentiles(values, (50.0, 99.0))
    assert found[0] == pytest.approx(5000, rel=0.01)
    assert found[1] == pytest.approx(9900, rel=0.01)
    monkeypatch.setitem(sys.modules, "hdrh.histogram", None)  # import fails: numpy path
    assert bench.percentiles(values, (50.0, 99.0)) == pytest.approx(found, rel=0.01)
    assert all(v != v for v in bench.percentiles([], (50.0,)))  # nan when empty


def _run(variant: str, rnd: int, gbps: float) -> bench.RunResult:
    return bench.RunResult(
        variant,
        rnd,
        ok=True,
        payload_bytes=10**9,
        messages=10**6,
        elapsed_s=1 / gbps,
        latency_us=[1000, 2000],
    )


def test_summary_ratios_are_of_medians_and_paired() -> None:
    plan = bench.make_plan(_args("--variants", "trio-sink,raw-sink,staged-ack1", "--rounds", "3"))
    runs = [
        _run("trio-sink", 1, 2.0), _run("raw-sink", 1, 4.0), _run("staged-ack1", 1, 1.0),
        _run("trio-sink", 2, 4.0), _run("raw-sink", 2, 8.0), _run("staged-ack1", 2, 3.0),
        _run("trio-sink", 3, 3.0), _run("raw-sink", 3, 6.0), _run("staged-ack1", 3, 2.0),
    ]  # fmt: skip
    summary = bench.summarize(plan, runs)
    staged = summary["staged-ack1"]
    assert staged["gb_per_s"]["median"] == pytest.approx(2.0)
    assert (staged["gb_per_s"]["min"], staged["gb_per_s"]["max"]) == pytest.approx((1.0, 3.0))
    assert staged["ratio_to_trio_sink"] == pytest.approx(2.0 / 3.0)
    assert staged["ratio_to_raw_sink"] == pytest.approx(2.0 / 6.0)
    # Same-round ratios 0.5, 0.75, 0.667: median 0.667.
    assert staged["paired_ratio_to_trio_sink"] == pytest.approx(2.0 / 3.0)
    assert summary["trio-sink"]["ratio_to_trio_sink"] == pytest.approx(1.0)
    assert staged["latency_ms"]["count"] == 6
    assert staged["ratio_to_ack1"] is None  # that is the ack-1 variant itself


def test_summary_ack2_cost_is_against_the_same_path_at_ack1() -> None:
    plan = bench.make_plan(
        _args("--variants", "staged-ack1,staged-ack2,direct-ack2", "--rounds", "2")
    )
    runs = [
        _run("staged-ack1", 1, 2.0), _run("staged-ack2", 1, 1.0), _run("direct-ack2", 1, 1.5),
        _run("staged-ack1", 2, 4.0), _run("staged-ack2", 2, 1.0), _run("direct-ack2", 2, 1.5),
    ]  # fmt: skip
    for r in runs:
        if r.variant.endswith("ack2"):
            r.storage_bytes = 123
    summary = bench.summarize(plan, runs)
    staged = summary["staged-ack2"]
    assert staged["ack"] == 2
    assert staged["ratio_to_ack1"] == pytest.approx(1.0 / 3.0)
    assert staged["paired_ratio_to_ack1"] == pytest.approx((0.5 + 0.25) / 2)
    assert staged["latency_ms"]["count"] == 4
    assert staged["storage_bytes"]["median"] == 123
    assert summary["direct-ack2"]["ratio_to_ack1"] is None  # direct-ack1 was not run
    assert summary["staged-ack1"]["storage_bytes"]["median"] is None
    notes = _notes(plan, summary, None)
    assert any(n.startswith("Ack-2 cost (staged): staged-ack2 moves 33%") for n in notes)
    assert not any("(direct)" in n for n in notes)


def test_plot_without_matplotlib_is_a_clear_usage_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert bench.run(_args("--plot", "out.png")) == 2
    assert "matplotlib" in capsys.readouterr().err


@pytest.fixture
def cxl_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="trio-embarcadero-bench-test-") as d:
        yield Path(d)


def _bench(*argv: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """``trio-embarcadero bench ARGV --json`` in a process of its own (without the
    caller's broker environment); its output and report."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRIO_EMBARCADERO_")}
        proc = subprocess.run(
            [sys.executable, "-m", "trio_embarcadero", "bench", *argv, "--json", str(out)],
            capture_output=True,
            text=True,
            timeout=180,
            env=env,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc, json.loads(out.read_text())


def test_tiny_real_run(cxl_dir: Path) -> None:
    """Four variants (one publishing in sessions), one round, ten batches
    each, in real processes."""
    requested = 10 * BATCH_PAYLOAD
    proc, report = _bench(
        *("--variants", "trio-sink,staged-ack1,direct-ack0,staged-ack1-session", "--rounds", "1"),
        *("--connections", "2", "--bytes", str(requested), "--cxl-dir", str(cxl_dir)),
    )
    assert "x trio-sink" in proc.stdout  # the table
    assert "[1/4 r1] trio-sink:" in proc.stderr  # the per-run lines
    assert "Session cost: staged-ack1-session moves " in proc.stdout
    assert report["ok"] is True
    assert report["setup"]["bytes_per_run"] == requested
    names = {"trio-sink", "staged-ack1", "direct-ack0", "staged-ack1-session"}
    assert set(report["variants"]) == names
    assert report["variants"]["staged-ack1-session"]["session"] is True
    assert report["variants"]["staged-ack1-session"]["ratio_to_plain"] > 0
    assert len(report["runs"]) == 4
    for run in report["runs"]:
        assert run["ok"], run
        assert run["payload_bytes"] == requested
        assert run["messages"] == requested // 1024
        assert run["batches"] == 10
        assert run["elapsed_s"] > 0
        assert run["gb_per_s"] > 0
        assert run["server_cpu_s"] >= 0
        assert run["server_peak_rss_bytes"] > 0
    for name, variant in report["variants"].items():
        assert variant["runs"] == 1
        assert variant["gb_per_s"]["median"] > 0
        assert "ratio_to_trio_sink" in variant
        assert "paired_ratio_to_raw_sink" in variant
        assert variant["ratio_to_raw_sink"] is None  # raw-sink was not run
        latency = variant["latency_ms"]
        if variant["ack"]:
            assert latency["count"] == 10
            assert 0 < latency["p50"] <= latency["p99"] <= latency["p99.9"], name
        else:
            assert latency["count"] == 0
    assert report["variants"]["trio-sink"]["ratio_to_trio_sink"] == pytest.approx(1.0)
    assert report["setup"]["pin"] is None
    for run in report["runs"]:  # unpinned: where this process may run
        assert run["server_cpus"] == run["client_cpus"] == sorted(os.sched_getaffinity(0))
    staged = report["variants"]["staged-ack1"]
    assert staged["pool_size"] == 32
    assert staged["pool_peak"] >= 1
    assert list(cxl_dir.iterdir()) == []  # every CXL file was deleted


def _mapped_under(directory: Path) -> list[str]:
    """Processes that map a file under ``directory`` (``pid: path``)."""
    found = []
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:  # gone, or not ours to read
            continue
        found += [
            f"{maps.parent.name}: {line}" for line in text.splitlines() if str(directory) in line
        ]
    return found


def test_sigterm_stops_the_bench_with_its_brokers_and_their_regions(cxl_dir: Path) -> None:
    """SIGTERM (or SIGHUP) ends the bench as Ctrl-C does: the run under way is
    given up, its broker stopped and its region removed, the runs done reported."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRIO_EMBARCADERO_")}
        with subprocess.Popen(
            [
                *(sys.executable, "-m", "trio_embarcadero", "bench", "--variants", "staged-ack1"),
                *("--rounds", "50", "--connections", "1", "--bytes", str(4 * BATCH_PAYLOAD)),
                *("--cxl-dir", str(cxl_dir), "--json", str(out)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        ) as proc:
            try:
                assert proc.stderr is not None
                lines = []
                for line in proc.stderr:  # the first run is done: the second is under way
                    lines.append(line)
                    if line.startswith("[1/50 r1] staged-ack1:"):
                        break
                else:
                    raise AssertionError("".join(lines))
                proc.send_signal(signal.SIGTERM)
                rest = proc.stderr.read()
                assert proc.wait(timeout=60) == 0, rest
            finally:
                if proc.poll() is None:
                    proc.kill()
        assert "SIGTERM: stopped; reporting the runs done" in rest
        report = json.loads(out.read_text())
    assert 1 <= len(report["runs"]) < 50
    assert all(run["ok"] for run in report["runs"])
    assert list(cxl_dir.iterdir()) == []
    assert _mapped_under(cxl_dir) == []


def test_tiny_real_ack2_run(tmp_path: Path, cxl_dir: Path) -> None:
    """staged-ack2, two batches: acks come after the disk log's sync; its directory goes."""
    requested = 2 * BATCH_PAYLOAD
    storage_dir = tmp_path / "disk"
    storage_dir.mkdir()
    proc, report = _bench(
        *("--variants", "staged-ack2", "--rounds", "1", "--connections", "2"),
        *("--bytes", str(requested), "--cxl-dir", str(cxl_dir)),
        *("--storage-dir", str(storage_dir)),
    )
    assert "staged-ack2" in proc.stdout  # the table
    assert f"disk logs under {storage_dir}" in proc.stderr
    assert report["ok"] is True
    assert report["setup"]["storage"]["dir"] == str(storage_dir)
    assert report["setup"]["storage"]["sync_interval_ms"] == 5.0
    (run,) = report["runs"]
    assert run["ok"], run
    assert run["payload_bytes"] == requested
    assert run["batches"] == 2
    assert run["wire_bytes"] == 2 * (128 + 1928 * 1088)
    assert run["storage_bytes"] == run["wire_bytes"]  # every acked batch is on disk
    assert run["latency_ms"]["count"] == 2
    variant = report["variants"]["staged-ack2"]
    assert variant["ack"] == 2
    assert variant["gb_per_s"]["median"] > 0
    latency = variant["latency_ms"]
    assert latency["count"] == 2
    assert 0 < latency["p50"] <= latency["p99"] <= latency["p99.9"]
    assert variant["ratio_to_ack1"] is None  # staged-ack1 was not run
    assert list(storage_dir.iterdir()) == []  # the run's disk log was removed
    assert list(cxl_dir.iterdir()) == []


def test_tiny_real_read_run(cxl_dir: Path) -> None:
    """The read path, 2 readers, ten batches: the broker's subscribers and the minimal sender."""
    topic = 10 * BATCH_PAYLOAD
    proc, report = _bench(
        *("--variants", "read-sink2,read-sub2", "--rounds", "1", "--connections", "2"),
        *("--bytes", str(topic), "--cxl-dir", str(cxl_dir)),
    )
    assert "x read-sink" in proc.stdout
    assert "read-sub2: filling the topic (not timed)" in proc.stderr
    assert report["ok"] is True
    for run in report["runs"]:
        assert run["ok"], run
        assert run["payload_bytes"] == 2 * topic  # each reader reads it all
        assert run["wire_bytes"] == 2 * 10 * 1928 * 1088
        assert run["messages"] == 2 * 10 * 1928
        assert run["gb_per_s"] > 0
        assert run["server_cpu_s"] >= 0
        assert run["latency_ms"]["count"] == 0
    sink_run, sub_run = report["runs"]
    assert sink_run["fill_s"] is None
    assert sub_run["fill_s"] > 0
    sub = report["variants"]["read-sub2"]
    assert sub["readers"] == 2
    assert sub["ratio_to_read_sink"] == pytest.approx(
        sub["gb_per_s"]["median"] / report["variants"]["read-sink2"]["gb_per_s"]["median"]
    )
    assert sub["cxl_size_mb"] > 0
    assert list(cxl_dir.iterdir()) == []  # the region and the sender's file are gone


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="--pin needs two CPUs")
def test_tiny_real_pinned_run(cxl_dir: Path) -> None:
    """--pin: the sink, the broker and the read path's broker on the upper half
    of the CPUs, the load generator and the reader on the rest, paced too."""
    proc, report = _bench(
        *("--variants", "trio-sink,staged-ack1,read-sub1", "--rounds", "1", "--rate", "0.5"),
        *("--connections", "2", "--bytes", str(4 * BATCH_PAYLOAD), "--cxl-dir", str(cxl_dir)),
        "--pin",
    )
    pin = bench.pinning("auto", os.sched_getaffinity(0))
    assert report["setup"]["pin"] == {"servers": list(pin.servers), "clients": list(pin.clients)}
    assert pin.describe() in proc.stdout  # the table's head line
    assert pin.describe() in proc.stderr  # the start-up line
    assert "Not pinned" not in proc.stdout
    assert report["ok"] is True
    assert len(report["runs"]) == 5  # the sink and the broker paced once each
    for run in report["runs"]:
        assert run["ok"], run
        assert run["server_cpus"] == list(pin.servers), run["variant"]
        assert run["client_cpus"] == list(pin.clients), run["variant"]
    assert list(cxl_dir.iterdir()) == []


def test_tiny_real_paced_run_with_a_retention_variant(cxl_dir: Path) -> None:
    """trio-sink and staged-ack1+retention, each unpaced, then paced at half its peak."""
    requested = 4 * BATCH_PAYLOAD
    proc, report = _bench(
        *("--variants", "trio-sink,staged-ack1+retention", "--rounds", "1", "--rate", "0.5"),
        *("--connections", "2", "--bytes", str(requested), "--cxl-dir", str(cxl_dir)),
        # A smaller region than the preset's 1 GiB: faulted in faster.
        *("--variant-option", "staged-ack1+retention:cxl.size_mb=128"),
    )
    assert "Paced load" in proc.stdout
    assert "[2/4 r1] trio-sink at 50%:" in proc.stderr
    assert "staged-ack1+retention 128 MiB" in proc.stderr  # its own region
    assert report["ok"] is True
    assert report["setup"]["rates"] == [0.5]
    assert report["setup"]["variant_options"] == {
        "staged-ack1+retention": {"cxl.size_mb": 128, "topics.retention_bytes": 268435456}
    }
    assert [(r["variant"], r["rate"]) for r in report["runs"]] == [
        ("trio-sink", None),
        ("trio-sink", 0.5),
        ("staged-ack1+retention", None),
        ("staged-ack1+retention", 0.5),
    ]
    for peak, paced in (report["runs"][:2], report["runs"][2:]):
        assert paced["ok"], paced
        assert paced["offered_gb_per_s"] == pytest.approx(peak["gb_per_s"] / 2, rel=1e-6)
        assert paced["payload_bytes"] == requested
        assert paced["latency_ms"]["count"] == 4
        assert paced["send_lag_ms"]["count"] == 4
        assert peak["send_lag_ms"]["count"] == 0
    for variant in report["variants"].values():
        assert variant["runs"] == 1
        (half,) = variant["paced"]
        assert half["rate"] == 0.5
        assert half["runs"] == 1
        assert half["latency_ms"]["count"] == 4
        assert len(half["busy"]["values"]) == 1  # the receiver's CPU over the run's length
    assert report["variants"]["staged-ack1+retention"]["cxl_size_mb"] == 128
    assert list(cxl_dir.iterdir()) == []


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="needs matplotlib")
def test_plot(tmp_path: Path, cxl_dir: Path) -> None:  # pragma: no cover - optional extra
    png = tmp_path / "bench.png"
    code = bench.run(
        _args(
            "--variants",
            "trio-sink",
            "--rounds",
            "1",
            "--bytes",
            str(2 * BATCH_PAYLOAD),
            "--cxl-dir",
            str(cxl_dir),
            "--plot",
            str(png),
            "--rate",
            "0.5",
            "--quiet",
        )
    )
    assert code == 0
    assert png.stat().st_size > 0


# -- the read path, paced load, per-variant broker options ---------------------------------


def test_read_variants_parse() -> None:
    plan = bench.make_plan(_args("--variants", "read-sink1,read-sub4"))
    assert [
        (v.name, v.kind, v.readers, v.is_broker, v.is_read, v.paced) for v in plan.variants
    ] == [
        ("read-sink1", "read-sink", 1, False, True, False),
        ("read-sub4", "read-sub", 4, True, True, False),
    ]
    assert set(bench.READ_VARIANTS) == {"read-sink1", "read-sub1", "read-sink4", "read-sub4"}
    assert not set(bench.READ_VARIANTS) & set(bench.DEFAULT_VARIANTS)


@pytest.mark.parametrize("text", ["read-sub", "read-sink0", "read-sub4-ack1", "staged-ack1+a+a"])
def test_bad_read_variants_are_usage_errors(text: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        _args("--variants", text)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "variant" in err or "readers" in err


def test_several_batch_sizes_run_every_variant_at_each(tmp_path: Path) -> None:
    plan = bench.make_plan(
        _args("--variants", "trio-sink,staged-ack1", "--batch-size", "64KiB,2MiB", "--bytes", "1G")
    )
    assert [(v.name, v.batch, v.batch_messages) for v in plan.variants] == [
        ("trio-sink@64KiB", "64KiB", 61),  # sealed once header + records reach 65,536 B
        ("trio-sink@2MiB", "2MiB", 1928),
        ("staged-ack1@64KiB", "64KiB", 61),
        ("staged-ack1@2MiB", "2MiB", 1928),
    ]
    sink64, sink2m, staged64, staged2m = plan.variants
    # Ratios compare variants of the same batch size.
    assert plan.counterpart(staged64, kind="trio-sink") is sink64
    assert plan.counterpart(staged2m, kind="trio-sink") is sink2m
    assert plan.counterpart(staged64, kind="raw-sink") is None
    b = bench.Bench(plan, live=None)
    try:
        command = b.loadgen_command([("127.0.0.1", 9)], staged64, 1)
        assert command[command.index("--batch-messages") + 1] == "61"
        assert "--rate" not in command
        command = b.loadgen_command([("127.0.0.1", 9)], staged2m, 1, 1.5e9)
        assert command[command.index("--batch-messages") + 1] == "1928"
        assert command[command.index("--rate") + 1] == "1500000000"
        # 64 KiB batches need no bigger staging buffer; the regions hold each run.
        small = b.broker_settings(staged64, str(tmp_path / "cxl"))
        assert small["cxl.segment_mb"] == 32
        assert "network.staging_pool_buffer_size_mb" not in small
        b.check_broker_config()
    finally:
        b.close()
    assert plan.batches_per_run(staged64) == -(-(10**9) // (61 * 1024))


@pytest.mark.parametrize(
    ("text", "rates"), [("0.25,0.5,0.8", (0.25, 0.5, 0.8)), ("25%,1", (0.25, 1.0))]
)
def test_rates_parse(text: str, rates: tuple[float, ...]) -> None:
    assert bench.make_plan(_args("--rate", text)).rates == rates
    assert bench.make_plan(_args()).rates == ()


def test_pin_splits_the_cpus_or_takes_two_lists() -> None:
    assert bench.pinning("auto", {0, 1}) == bench.Pinning(servers=(1,), clients=(0,))
    assert bench.pinning("auto", {3, 0, 1, 2}) == bench.Pinning(servers=(2, 3), clients=(0, 1))
    assert bench.pinning("auto", {4, 5, 6}) == bench.Pinning(servers=(5, 6), clients=(4,))
    assert bench.pinning("2-3/0,1", {0, 1, 2, 3}) == bench.Pinning(servers=(2, 3), clients=(0, 1))
    assert bench.pinning("0/1", {0, 1}).describe() == "servers on CPU 0, clients on CPU 1"
    assert bench.make_plan(_args()).pin is None
    mine = sorted(os.sched_getaffinity(0))
    if len(mine) >= 2:
        assert bench.make_plan(_args("--pin")).pin == bench.pinning("auto", mine)
        text = f"{mine[0]}/{mine[1]}"
        assert bench.make_plan(_args("--pin", text)).pin == bench.Pinning((mine[0],), (mine[1],))


@pytest.mark.parametrize(
    ("text", "cpus", "complaint"),
    [
        ("auto", {0}, "may use only CPU 0: run without --pin"),
        ("1/1", {0, 1}, "share CPU 1; give them separate CPUs"),
        ("1-2/0", {0, 1}, "CPU 2 not among the CPUs this process may use (0-1)"),
        ("1", {0, 1}, "not SERVERS/CLIENTS"),
        ("1/", {0, 1}, "not a CPU list"),
        ("b/0", {0, 1}, "give auto or SERVERS/CLIENTS, e.g. 1/0"),
    ],
)
def test_bad_pins_name_the_problem(text: str, cpus: set[int], complaint: str) -> None:
    with pytest.raises(ValueError, match=re.escape(complaint)):
        bench.pinning(text, cpus)


def test_a_run_whose_pinning_did_not_hold_fails(tmp_path: Path) -> None:
    plan = attrs.evolve(
        bench.make_plan(_args("--variants", "trio-sink")),
        pin=bench.Pinning(servers=(1,), clients=(0,)),
    )
    b = bench.Bench(plan, live=None)
    try:
        held = bench.RunResult("trio-sink", 1, ok=True, server_cpus=[1], client_cpus=[0])
        b.check_pinning(held)
        assert held.errors == []
        gone = bench.RunResult("trio-sink", 1, ok=True)  # nothing read: the run says why
        b.check_pinning(gone)
        assert gone.errors == []
        loose = bench.RunResult("trio-sink", 1, ok=True, server_cpus=[0, 1], client_cpus=[0])
        b.check_pinning(loose)
        assert loose.errors == ["--pin did not hold: the servers could run on CPUs 0-1, not only 1"]
    finally:
        b.close()


@pytest.mark.parametrize("text", ["0", "1.5", "-0.5", "x", "0.5,0.5", ""])
def test_bad_rates_are_usage_errors(text: str) -> None:
    with pytest.raises(SystemExit) as info:
        _args("--rate", text)
    assert info.value.code == 2


def test_only_ingest_variants_with_acks_are_paced(capsys: pytest.CaptureFixture[str]) -> None:
    plan = bench.make_plan(
        _args("--variants", "trio-sink,staged-ack0,direct-ack2,read-sub1", "--rate", "0.5")
    )
    assert [v.name for v in plan.variants if v.paced] == ["trio-sink", "direct-ack2"]
    args = _args("--variants", "staged-ack0,read-sink1", "--rate", "0.5")
    with pytest.raises(ValueError, match="--rate"):
        bench.make_plan(args)
    assert bench.run(args) == 2
    assert "--rate" in capsys.readouterr().err


def test_retention_variants_get_their_own_region(tmp_path: Path) -> None:
    """staged-ack1+retention: the shipped 1 GiB region keeping 256 MiB; the
    plain variants' regions still hold the whole run."""
    plan = bench.make_plan(
        _args(
            "--variants", "staged-ack1,staged-ack1+retention,staged-ack2+retention", "--bytes", "8G"
        )
    )
    plain, retained, durable = plan.variants
    assert retained.tags == ("retention",)
    assert retained.options == bench.PRESETS["retention"]
    b = bench.Bench(plan, live=None)
    try:
        cxl = str(tmp_path / "cxl")
        settings = b.broker_settings(plain, cxl)
        assert settings["cxl.size_mb"] * 2**20 > 8 * 10**9
        assert "topics.retention_bytes" not in settings
        settings = b.broker_settings(retained, cxl)
        assert settings["cxl.size_mb"] == 1024
        assert settings["topics.retention_bytes"] == 256 * 2**20
        assert b.broker_settings(durable, cxl)["cxl.size_mb"] == 1024
        b.check_broker_config()
    finally:
        b.close()
    # Ratios: against the same variant without the tag, and ack 2 against ack 1 with it.
    assert plan.counterpart(retained, tags=()) is plain
    assert plan.counterpart(durable, ack=1) is retained


def test_variant_options_reach_only_their_variant(tmp_path: Path) -> None:
    plan = bench.make_plan(
        _args(
            *("--variants", "staged-ack1,staged-ack1+pool,direct-ack1+retention"),
            *("--broker-option", "network.staging_pool_num_buffers=16"),
            *("--broker-option", "cxl.size_mb=4096"),
            *("--variant-option", "staged-ack1+pool:network.staging_pool_num_buffers=64"),
            *("--variant-option", "direct-ack1+retention:topics.retention_bytes=134217728"),
            "--bytes",
            "100M",
        )
    )
    plain, pool, retention = plan.variants
    b = bench.Bench(plan, live=None)
    try:
        cxl = str(tmp_path / "cxl")
        assert b.broker_settings(plain, cxl)["network.staging_pool_num_buffers"] == 16
        assert b.broker_settings(pool, cxl)["network.staging_pool_num_buffers"] == 64
        assert b.broker_settings(pool, cxl)["cxl.size_mb"] == 4096  # --broker-option
        # The preset over --broker-option, --variant-option over the preset.
        settings = b.broker_settings(retention, cxl)
        assert settings["cxl.size_mb"] == 1024
        assert settings["topics.retention_bytes"] == 134217728
        b.check_broker_config()
    finally:
        b.close()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--variants", "staged-ack1+fast"), "not a preset"),
        (("--variants", "trio-sink+retention"), "sink runs no broker"),
        (("--variants", "read-sub1+retention"), "would trim"),
        (
            ("--variants", "staged-ack1", "--variant-option", "direct-ack1:cxl.size_mb=64"),
            "not one",
        ),
        (("--variants", "raw-sink", "--variant-option", "raw-sink:cxl.size_mb=64"), "no broker"),
        (("--variants", "staged-ack1", "--variant-option", "staged-ack1=cxl.size_mb"), "VARIANT:"),
        (("--variants", "staged-ack1", "--variant-option", "staged-ack1:size_mb=1"), "SECTION.KEY"),
        (
            ("--variants", "staged-ack2", "--variant-option", "staged-ack2:storage.dir=/x"),
            "storage",
        ),
    ],
)
def test_bad_variant_options_are_usage_errors(
    argv: tuple[str, ...], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _args(*argv)
    with pytest.raises(ValueError, match=message):
        bench.make_plan(args)
    assert bench.run(args) == 2
    assert message in capsys.readouterr().err


def test_summary_of_read_paced_and_tagged_variants() -> None:
    plan = bench.make_plan(
        _args(
            *("--variants", "read-sink1,read-sink4,read-sub4,staged-ack1,staged-ack1+retention"),
            *("--rounds", "2", "--rate", "0.5,0.8"),
        )
    )
    runs = [
        _run("read-sink1", 1, 1.0), _run("read-sink4", 1, 2.0), _run("read-sub4", 1, 1.5),
        _run("staged-ack1", 1, 1.0), _run("staged-ack1+retention", 1, 0.9),
        _run("read-sink1", 2, 1.0), _run("read-sink4", 2, 2.0), _run("read-sub4", 2, 1.9),
        _run("staged-ack1", 2, 2.0), _run("staged-ack1+retention", 2, 1.9),
    ]  # fmt: skip
    for run in runs:
        run.server_cpu_s = 0.5  # for its 1 GB
    for rnd, peak in ((1, 1.0), (2, 2.0)):
        for rate in (0.5, 0.8):
            paced = _run("staged-ack1", rnd, peak * rate)
            paced.rate, paced.offered_bytes_per_s = rate, peak * rate * 1e9
            paced.latency_us = [int(10_000 * rate)] * 3
            paced.send_lag_us = [5, 7, 9]
            paced.server_cpu_s = 0.6  # a paced batch costs more
            runs.append(paced)
    runs.append(bench.RunResult("staged-ack1", 2, ok=False, rate=0.8, errors=["x"]))
    summary = bench.summarize(plan, runs)
    sub4 = summary["read-sub4"]
    # Against the sender with as many readers, never the one with another count.
    assert sub4["ratio_to_read_sink"] == pytest.approx(1.7 / 2.0)
    assert sub4["paired_ratio_to_read_sink"] == pytest.approx((0.75 + 0.95) / 2)
    assert sub4["ratio_to_trio_sink"] is None
    assert summary["staged-ack1"]["ratio_to_read_sink"] is None
    assert sub4["readers"] == 4
    assert sub4["paced"] == []
    staged = summary["staged-ack1"]
    # Paced runs stay out of the unpaced figures.
    assert staged["runs"] == 2
    assert staged["failed_runs"] == 0
    assert staged["gb_per_s"]["median"] == pytest.approx(1.5)
    assert [p["rate"] for p in staged["paced"]] == [0.5, 0.8]
    half, most = staged["paced"]
    assert half["runs"] == 2
    assert half["offered_gb_per_s"]["values"] == pytest.approx([0.5, 1.0])
    assert half["latency_ms"]["count"] == 6
    assert half["latency_ms"]["p50"] == pytest.approx(5.0, rel=0.01)
    assert most["latency_ms"]["p99"] == pytest.approx(8.0, rel=0.01)
    assert most["failed_runs"] == 1
    assert most["send_lag_ms"]["max"] == pytest.approx(0.009)
    # The receiver's cost against the unpaced runs', and how busy it was:
    # CPU seconds over each run's own length (1.25 s and 0.625 s at 80 %).
    assert most["server_cpu_s_per_gb"]["median"] == pytest.approx(0.6)
    assert most["cpu_vs_unpaced"] == pytest.approx(1.2)
    assert most["busy"]["values"] == pytest.approx([0.48, 0.96])
    assert half["busy"]["values"] == pytest.approx([0.3, 0.6])
    assert staged["busy"]["values"] == pytest.approx([0.5, 1.0])
    retained = summary["staged-ack1+retention"]
    assert retained["ratio_to_untagged"] == pytest.approx(1.4 / 1.5)
    assert retained["paired_ratio_to_untagged"] == pytest.approx((0.9 + 0.95) / 2)
    assert retained["broker_options"] == bench.PRESETS["retention"]
    assert retained["cxl_size_mb"] == 1024
    notes = _notes(plan, summary, None)
    assert any(n.startswith("Target (read-sub4): >= 80% of read-sink with 4") for n in notes)
    assert any(n.startswith("+retention cost: staged-ack1+retention moves 93%") for n in notes)
    assert any(
        n.startswith("Target (staged-ack1, 2,097,664 B batches): ack p99 < 5 ms at 80%")
        and "-> 8.00 ms pooled; a run's own p99 (median [min-max] of 2): 8.00 [8.00-8.00] ms; "
        "the broker was busy 0.72 [0.48-0.96] of each run (unpaced 0.75)."
        in n
        for n in notes
    )


def test_paced_runs_report_each_runs_p99_beside_the_pooled_one() -> None:
    """One run of three that fell behind its schedule is the pooled p99 of
    all; each run's own p99 shows the other two met the target."""
    plan = bench.make_plan(_args("--variants", "direct-ack1", "--rounds", "3", "--rate", "0.8"))
    runs = []
    for rnd, slow in ((1, False), (2, True), (3, False)):
        runs.append(_run("direct-ack1", rnd, 1.0))
        paced = _run("direct-ack1", rnd, 0.8)
        paced.rate, paced.offered_bytes_per_s = 0.8, 0.8e9
        paced.latency_us = [50_000 if slow else 1_000 + i for i in range(100)]
        runs.append(paced)
    summary = bench.summarize(plan, runs)
    (most,) = summary["direct-ack1"]["paced"]
    assert most["latency_ms"]["p99"] == pytest.approx(50.0, rel=0.01)
    per_run = most["p99_per_run_ms"]
    assert per_run["median"] == pytest.approx(1.099, rel=0.01)
    assert per_run["max"] == pytest.approx(50.0, rel=0.01)
    assert len(per_run["values"]) == 3
    (note,) = [n for n in _notes(plan, summary, None) if n.startswith("Target (direct-ack1")]
    assert "ms pooled; a run's own p99 (median [min-max] of 3): 1.10 [1.10-50.0" in note
    assert "Not pinned" in note  # unpinned, the note says how to keep the two apart
    pinned = attrs.evolve(plan, pin=bench.Pinning(servers=(1,), clients=(0,)))
    (note,) = [n for n in _notes(pinned, summary, None) if n.startswith("Target (direct-ack1")]
    assert "pinned" not in note


def test_table_shows_the_read_ratio_and_the_paced_latencies(tmp_path: Path) -> None:
    plan = bench.make_plan(
        _args("--variants", "read-sink1,read-sub1,staged-ack1", "--rounds", "1", "--rate", "0.8")
    )
    b = bench.Bench(plan, live=None)
    try:
        paced = _run("staged-ack1", 1, 0.8)
        paced.rate, paced.offered_bytes_per_s = 0.8, 0.8e9
        paced.latency_us = [3000, 4000]
        paced.server_cpu_s = 0.9
        b.runs = [
            _run("read-sink1", 1, 2.0),
            _run("read-sub1", 1, 1.0),
            _run("staged-ack1", 1, 1.0),
            paced,
        ]
        b.runs[2].server_cpu_s = 0.75
        for run in b.runs[:2]:
            run.latency_us = []
        report = bench.build_report(b)
    finally:
        b.close()
    assert report["setup"]["rates"] == [0.8]
    assert report["runs"][3]["rate"] == 0.8
    assert report["runs"][3]["offered_gb_per_s"] == pytest.approx(0.8)
    text = bench.render_table(report)
    head, _, rest = text.partition("Paced load")
    header = next(line for line in head.splitlines() if line.startswith("variant"))
    assert "x read-sink" in header
    row = next(line for line in head.splitlines() if line.startswith("read-sub1"))
    assert "0.50" in row.split()  # x read-sink
    paced_row = next(line for line in rest.splitlines() if line.startswith("staged-ack1"))
    assert paced_row.split()[1:3] == ["80%", "0.80"]
    assert "3.0/4.0/4.0" in paced_row
    assert "4.0 [4.0-4.0]" in paced_row  # the one run's own p99
    # The broker's CPU against its unpaced run (0.75 s for its GB), and how
    # busy that kept it over the paced run's 1.25 s.
    assert paced_row.split()[-3:] == ["0.90", "(1.20x)", "0.72"]
    # Without read or paced variants the table is as it was.
    plan = bench.make_plan(_args("--variants", "staged-ack1", "--rounds", "1"))
    b = bench.Bench(plan, live=None)
    try:
        b.runs = [_run("staged-ack1", 1, 1.0)]
        text = bench.render_table(bench.build_report(b))
    finally:
        b.close()
    assert "x read-sink" not in text
    assert "Paced load" not in text


def _acking_receiver(stall: float) -> tuple[int, threading.Thread, socket.socket]:
    """A one-connection publish receiver that reads nothing for ``stall``
    seconds after the handshake, then acks every batch; returns its port."""
    listener = socket.create_server(("127.0.0.1", 0))
    # A small window, so a stalled receiver blocks the sender's sendall soon.
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)

    def exactly(conn: socket.socket, n: int) -> bytes:
        data = bytearray()
        while len(data) < n:
            chunk = conn.recv(n - len(data))
            if not chunk:
                return b""
            data += chunk
        return bytes(data)

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            exactly(conn, HANDSHAKE_SIZE)
            conn.sendall(ACK_BROKER_ID.pack(0))
            stop = threading.Event()
            stop.wait(stall)
            count = 0
            while header := exactly(conn, BATCH_HEADER.size):
                fields = BATCH_HEADER.unpack(header)
                exactly(conn, fields[7])
                count += fields[2]
                conn.sendall(ACK_COUNT.pack(count))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener.getsockname()[1], thread, listener


def test_paced_loadgen_sends_on_schedule_and_times_from_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Five 4 MB batches at 20 MB/s: one every 0.2 s. The receiver stalls for
    0.5 s, so the second batch goes out late; its latency counts that wait."""
    port, thread, listener = _acking_receiver(stall=0.5)
    try:
        code = loadgen.main(
            [
                *("--port", str(port), "--connections", "1"),
                *("--batch-messages", "4000", "--bytes", str(5 * 4000 * 1024)),
                *("--rate", "20e6", "--interval", "10"),
            ]
        )
    finally:
        thread.join(timeout=10)
        listener.close()
    assert code == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    interval = 4000 * 1024 / 20e6
    assert result["ok"] is True
    assert result["batches"] == 5
    assert result["rate_bytes_per_s"] == 20_000_000
    assert result["latency_from"] == "scheduled send"
    # The last batch is due 4 intervals after the first send.
    assert result["elapsed_s"] >= 4 * interval
    lags, latencies = result["send_lag_us"], result["latency_us"]
    assert len(lags) == len(latencies) == 5
    late = max(range(5), key=lags.__getitem__)
    assert lags[late] > 100_000  # held up by the stalled receiver
    assert latencies[late] >= lags[late]  # no coordinated omission


def test_unpaced_loadgen_times_from_the_send(capsys: pytest.CaptureFixture[str]) -> None:
    port, thread, listener = _acking_receiver(stall=0.0)
    try:
        code = loadgen.main(
            ["--port", str(port), "--connections", "1", "--batch-messages", "10", "--bytes", "40K"]
        )
    finally:
        thread.join(timeout=10)
        listener.close()
    assert code == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert (result["batches"], result["rate_bytes_per_s"]) == (4, None)
    assert result["latency_from"] == "send start"
    assert result["send_lag_us"] == []
    assert len(result["latency_us"]) == 4


@pytest.fixture
def read_sink(cxl_dir: Path) -> Iterator[int]:
    """``tools.sink read`` serving 3 batches of 10 records of 100 B; yields its port."""
    command = [
        *(sys.executable, "-m", "trio_embarcadero.tools.sink", "read"),
        *("--batches", "3", "--batch-messages", "10", "--message-size", "100"),
        *("--dir", str(cxl_dir)),
    ]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line.startswith("listening on "), line
            assert list(cxl_dir.iterdir()) == []  # the mapping keeps the file, unlinked
            yield int(line.rsplit(":", 1)[1])
        finally:
            proc.terminate()
            assert proc.wait(timeout=10) == 0


def test_read_sink_sends_the_log_s_records_from_the_offset_asked(read_sink: int) -> None:
    with socket.create_connection(("127.0.0.1", read_sink)) as sock:
        sock.sendall(subscribe_handshake("bench", 15))
        records = bytearray(15 * 192)  # 64-byte header + 100 B padded to 128
        assert recv_exactly(sock, memoryview(records))
    for i in range(15):
        fields = MESSAGE_HEADER.unpack_from(records, i * 192)
        assert fields[MH_LOGICAL_OFFSET] == 15 + i
        assert fields[MH_SIZE] == 100
        assert records[i * 192 + 64 : i * 192 + 164] == bytes(range(100))


def test_reader_reads_the_whole_topic_on_every_connection(
    read_sink: int, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--port", str(read_sink), "--connections", "2", "--message-size", "100"]
    assert reader.main([*argv, "--records", "30"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert result["ok"] is True
    assert result["received_bytes"] == 2 * 30 * 192
    assert result["payload_bytes"] == 2 * 30 * 100
    assert result["messages"] == 60
    assert result["time_bounded"] is False


def test_reader_fails_a_stream_that_skips_records(tmp_path: Path) -> None:
    topic = sink.build_topic(str(tmp_path), 2, 5, 100)
    # Record 9's header says offset 10, as if one had been skipped.
    fields = list(MESSAGE_HEADER.unpack_from(topic, 9 * 192))
    fields[MH_LOGICAL_OFFSET] = 10
    MESSAGE_HEADER.pack_into(topic, 9 * 192, *fields)
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            recv_exactly(conn, memoryview(bytearray(HANDSHAKE_SIZE)))
            conn.sendall(topic)
            conn.recv(1)  # until the reader closes

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            code = reader.main(
                [
                    "--port",
                    str(listener.getsockname()[1]),
                    "--records",
                    "10",
                    "--message-size",
                    "100",
                ]
            )
    finally:
        thread.join(timeout=10)
        listener.close()
    assert code == 1
    result = json.loads(out.getvalue().splitlines()[-1])
    assert result["errors"] == ["connection 0: record 9 has (offset, size) (10, 100), not (9, 100)"]


# -- clusters: several brokers on one region, order 0 and 5 ---------------------------------


def test_cluster_variants_parse_and_get_their_own_broker_settings(tmp_path: Path) -> None:
    names = "cluster1-order0,cluster2-order5,cluster3-order5-ack0"
    plan = bench.make_plan(_args("--variants", names, "--connections", "1"))
    assert [(v.name, v.kind, v.ack, v.brokers, v.order, v.is_broker) for v in plan.variants] == [
        ("cluster1-order0", "cluster", 1, 1, 0, True),
        ("cluster2-order5", "cluster", 1, 2, 5, True),
        ("cluster3-order5-ack0", "cluster", 0, 3, 5, True),
    ]
    assert set(bench.CLUSTER_VARIANTS) >= {"cluster1-order0", "cluster2-order5"}
    assert not set(bench.CLUSTER_VARIANTS) & set(bench.DEFAULT_VARIANTS)
    # At least two connections a broker, whatever --connections says.
    assert [plan.connections_for(v) for v in plan.variants] == [2, 4, 6]
    runner = bench.Bench(plan, live=None)
    try:
        settings = runner.broker_settings(plan.variants[1], str(tmp_path / "cxl"))
        assert settings["topics.order"] == 5
        assert settings["cxl.max_brokers"] == 4
        assert settings["network.use_nonblocking"] is False
        runner.check_broker_config()  # the broker takes them
        assert "topics.order" not in runner.broker_settings(
            bench.make_plan(_args("--variants", "direct-ack1")).variants[0], "x"
        )
    finally:
        runner.close()
    # A bigger cluster's region has room for every broker's streams.
    assert plan.cxl_size_mb(plan.variants[2]) > plan.cxl_size_mb(plan.variants[0])


@pytest.mark.parametrize(
    "text", ["cluster0-order0", "cluster2-order3", "cluster2", "cluster33-order0"]
)
def test_bad_cluster_variants_are_usage_errors(
    text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        _args("--variants", text)
    assert info.value.code == 2
    assert "variant" in capsys.readouterr().err


def test_summary_of_cluster_variants_compares_order_5_with_order_0() -> None:
    plan = bench.make_plan(
        _args("--variants", "cluster1-order0,cluster2-order0,cluster2-order5", "--rounds", "2")
    )
    runs = [
        _run("cluster1-order0", 1, 1.0), _run("cluster2-order0", 1, 2.0),
        _run("cluster2-order5", 1, 1.5), _run("cluster1-order0", 2, 1.0),
        _run("cluster2-order0", 2, 2.0), _run("cluster2-order5", 2, 1.8),
    ]  # fmt: skip
    for r in runs:
        if r.variant.startswith("cluster2"):
            half = r.payload_bytes // 2
            r.broker_payload_bytes = [half, r.payload_bytes - half]
            r.broker_cpu_s = [1.0, 0.5]
    summary = bench.summarize(plan, runs)
    five = summary["cluster2-order5"]
    assert (five["brokers"], five["order"], five["connections"]) == (2, 5, 4)
    assert five["ratio_to_order0"] == pytest.approx(1.65 / 2.0)
    assert five["paired_ratio_to_order0"] == pytest.approx((0.75 + 0.9) / 2)
    assert five["ratio_to_one_broker"] is None  # cluster1-order5 was not run
    assert summary["cluster2-order0"]["ratio_to_one_broker"] == pytest.approx(2.0)
    assert summary["cluster2-order0"]["ratio_to_order0"] is None
    assert five["broker_gb_per_s"] == pytest.approx([1.65 / 2, 1.65 / 2])
    assert len(five["broker_cpu_s_per_gb"]) == 2
    assert summary["cluster1-order0"]["broker_gb_per_s"] == []
    assert summary["cluster2-order5"]["ratio_to_trio_sink"] is None
    notes = _notes(plan, summary, None)
    assert any(
        n.startswith("Order-5 cost (2 broker(s)): cluster2-order5 moves 82% of cluster2-order0's")
        and "target >= 85%" in n
        for n in notes
    )


def test_session_variants_parse_and_compare_with_the_plain_variant(tmp_path: Path) -> None:
    plan = bench.make_plan(
        _args(
            *("--variants", "trio-sink,staged-ack1,staged-ack1-session,cluster2-order5-session"),
            *("--rounds", "2"),
        )
    )
    session = plan.variants[2]
    assert (session.kind, session.ack, session.session) == ("staged", 1, True)
    cluster = plan.variants[3]
    assert (cluster.kind, cluster.brokers, cluster.order, cluster.session) == (
        "cluster",
        2,
        5,
        True,
    )
    b = bench.Bench(plan, live=None)
    try:
        assert "--session" in b.loadgen_command([("127.0.0.1", 9)], session, 1)
        assert "--session" not in b.loadgen_command([("127.0.0.1", 9)], plan.variants[1], 1)
    finally:
        b.close()
    runs = [
        _run("trio-sink", 1, 2.0), _run("staged-ack1", 1, 2.0), _run("staged-ack1-session", 1, 1.0),
        _run("trio-sink", 2, 2.0), _run("staged-ack1", 2, 4.0), _run("staged-ack1-session", 2, 3.0),
    ]  # fmt: skip
    summary = bench.summarize(plan, runs)
    mine = summary["staged-ack1-session"]
    assert mine["session"] is True
    assert mine["ratio_to_plain"] == pytest.approx(2.0 / 3.0)
    assert mine["paired_ratio_to_plain"] == pytest.approx((0.5 + 0.75) / 2)
    # The sinks stay the baselines of a session variant too.
    assert mine["ratio_to_trio_sink"] == pytest.approx(1.0)
    assert summary["staged-ack1"]["ratio_to_plain"] is None
    assert summary["cluster2-order5-session"]["ratio_to_plain"] is None  # not run plainly
    notes = _notes(plan, summary, None)
    assert any(
        n.startswith("Session cost: staged-ack1-session moves 67% of staged-ack1's GB/s")
        for n in notes
    )


@pytest.mark.parametrize(
    "text",
    [
        "trio-sink-session",
        "staged-ack0-session",
        "read-sub1-session",
        "cluster2-order5-ack0-session",
    ],
)
def test_bad_session_variants_are_usage_errors(
    text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        _args("--variants", text)
    assert info.value.code == 2
    assert "-session" in capsys.readouterr().err


def test_loadgen_sessions_number_their_batches_and_keep_the_window(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A session handshake with a token; batch_seq 0, 1, 2, ...; no batch
    256 or more past the oldest unacked one until that is acked."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    seen: dict[str, Any] = {"seqs": []}

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            hello = bytearray(HANDSHAKE_SIZE)
            assert recv_exactly(conn, memoryview(hello))
            seen["hello"] = HANDSHAKE.unpack(hello)
            conn.sendall(ACK_BROKER_ID.pack(0))
            head = bytearray(BATCH_HEADER.size)

            def batch() -> bool:
                if not recv_exactly(conn, memoryview(head)):
                    return False
                header = unpack_batch_header(head)
                body = bytearray(header.total_size)
                assert recv_exactly(conn, memoryview(body))
                seen["seqs"].append(header.batch_seq)
                return True

            for _ in range(256):
                assert batch()
            # The window is full: nothing comes until an ack.
            conn.settimeout(0.3)
            with pytest.raises(TimeoutError):
                conn.recv(1)
            conn.settimeout(None)
            conn.sendall(ACK_COUNT.pack(4))  # batch 0 (four messages) is acked
            while batch():
                conn.sendall(ACK_COUNT.pack(4 * len(seen["seqs"])))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        argv = ["--port", str(port), "--connections", "1", "--session", "--client-id", "9"]
        assert loadgen.main([*argv, "--batch-messages", "4", "--bytes", str(300 * 4 * 1024)]) == 0
    finally:
        thread.join(timeout=10)
        listener.close()
    client_id, ack, _, token, _, request, _ = seen["hello"]
    assert (client_id, ack, request) == (9, 1, 2)
    assert token != 0
    assert seen["seqs"] == list(range(300))
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert (result["ok"], result["session"], result["batches"]) == (True, True, 300)
    assert loadgen.main(["--port", str(port), "--ack", "0", "--session"]) == 2


def test_loadgen_runs_without_the_garbage_collector_and_restores_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A full collection stalled every sender for 10-20 ms (the paced runs'
    p99); the run goes without, and a caller's collector is left as it was."""
    seen: list[bool] = []

    def run(*args: object) -> int:
        seen.append(gc.isenabled())
        return 0

    monkeypatch.setattr(loadgen.clientproc, "main", run)
    assert gc.isenabled()
    assert loadgen.main(["--port", "1"]) == 0
    assert seen == [False]
    assert gc.isenabled()
    gc.disable()
    try:
        assert loadgen.main(["--port", "1"]) == 0
        assert not gc.isenabled()
    finally:
        gc.enable()


def _loadgen_against(
    capsys: pytest.CaptureFixture[str],
    servers: list[socket.socket],
    serve: Callable[[int], None],
    argv: list[str],
) -> dict[str, Any]:
    """Run the load generator in this process with ``argv`` while a thread a
    server runs ``serve(k)``; its result line."""
    threads = [threading.Thread(target=serve, args=(k,), daemon=True) for k in range(len(servers))]
    for thread in threads:
        thread.start()
    try:
        assert loadgen.main(argv) == 0
        for thread in threads:
            thread.join(timeout=10)
    finally:
        for server in servers:
            server.close()
    result: dict[str, Any] = json.loads(capsys.readouterr().out.splitlines()[-1])
    return result


def test_loadgen_spreads_its_connections_over_several_ports(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Two sinks stand for two brokers: connections 0 and 2 go to the first,
    1 to the second, and the result says what each received."""
    ports, servers = [], []
    for _ in range(2):
        server = socket.create_server(("127.0.0.1", 0))
        ports.append(server.getsockname()[1])
        servers.append(server)
    received = [0, 0]

    def serve(k: int) -> None:
        conns = [servers[k].accept()[0] for _ in range(2 - k)]
        for conn in conns:
            with conn:  # the handshake, then batches until the half-close
                while data := conn.recv(1 << 16):
                    received[k] += len(data)

    argv = ["--port", f"{ports[0]},{ports[1]}", "--connections", "3", "--ack", "0"]
    argv += ["--batch-messages", "4", "--bytes", str(12 * 4 * 1024)]
    result = _loadgen_against(capsys, servers, serve, argv)
    per_port = result["per_port"]
    assert [(p["port"], p["connections"]) for p in per_port] == [(ports[0], 2), (ports[1], 1)]
    assert sum(p["payload_bytes"] for p in per_port) == result["payload_bytes"] == 12 * 4 * 1024
    # (The connections share one budget: how it splits between them varies.)
    wire = [p["messages"] // 4 * (128 + 4 * 1088) for p in per_port]
    assert received == [2 * HANDSHAKE_SIZE + wire[0], HANDSHAKE_SIZE + wire[1]]


def test_loadgen_gives_every_connection_its_first_batch(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Connections 1 and 2 start only after connection 0 has finished: with a
    budget of three batches each still sends one (one sink per connection)."""
    servers = [socket.create_server(("127.0.0.1", 0)) for _ in range(3)]
    ports = [server.getsockname()[1] for server in servers]

    def drain(server: socket.socket) -> None:
        conn = server.accept()[0]
        with conn:
            while conn.recv(1 << 16):
                pass

    send_loop = loadgen._Connection.send_loop
    first_done = threading.Event()

    def late_send_loop(self: loadgen._Connection, start: threading.Event) -> None:
        if self.index:
            assert first_done.wait(10)
        send_loop(self, start)
        if not self.index:
            first_done.set()

    monkeypatch.setattr(loadgen._Connection, "send_loop", late_send_loop)
    argv = ["--port", ",".join(map(str, ports)), "--connections", "3", "--ack", "0"]
    argv += ["--batch-messages", "4", "--bytes", str(3 * 4 * 1024)]
    result = _loadgen_against(capsys, servers, lambda k: drain(servers[k]), argv)
    assert [p["messages"] for p in result["per_port"]] == [4, 4, 4]


def test_tiny_real_cluster_run(cxl_dir: Path) -> None:
    """Two brokers, order 5, one round of a few batches, in real processes:
    the aggregate, each broker's share, and the cluster table."""
    requested = 6 * BATCH_PAYLOAD
    proc, report = _bench(
        *("--variants", "cluster2-order5", "--rounds", "1", "--quiet"),
        *("--bytes", str(requested), "--cxl-dir", str(cxl_dir)),
    )
    assert "Clusters:" in proc.stdout
    assert "per broker GB/s" in proc.stdout
    assert report["ok"] is True
    two = report["variants"]["cluster2-order5"]
    assert len(two["broker_gb_per_s"]) == 2
    assert all(x > 0 for x in two["broker_gb_per_s"])  # the load reached both brokers
    assert sum(two["broker_gb_per_s"]) == pytest.approx(two["gb_per_s"]["median"])
    assert len(two["broker_cpu_s_per_gb"]) == 2
    assert two["latency_ms"]["count"] == 6  # every batch acked (after its order)
    (run,) = report["runs"]
    assert run["ok"], run
    assert run["payload_bytes"] == requested
    assert len(run["broker_cpu_s"]) == 2
    assert list(cxl_dir.iterdir()) == []  # every CXL file was deleted


def test_the_load_generators_send_buffer_is_set_reported_and_can_be_left_to_the_kernel() -> None:
    """512 KiB unless told otherwise; 0 is the kernel's autotuning, which the
    table says, since it changes what a receiver that falls behind pays."""
    plan = bench.make_plan(_args("--variants", "staged-ack1", "--rounds", "1"))
    autotuned = bench.make_plan(
        _args("--variants", "staged-ack1", "--rounds", "1", "--send-buffer", "0")
    )
    odd = bench.make_plan(
        _args("--variants", "staged-ack1", "--rounds", "1", "--send-buffer", "100000")
    )
    assert (plan.send_buffer, autotuned.send_buffer) == (512 * 1024, 0)
    for p, shown in (
        (plan, "publisher send buffer 512 KiB"),
        (autotuned, "autotuned"),
        (odd, "publisher send buffer 100,000 B"),
    ):
        b = bench.Bench(p, live=None)
        try:
            command = b.loadgen_command([("127.0.0.1", 9)], p.variants[0], 1)
            assert command[command.index("--send-buffer") + 1] == str(p.send_buffer)
            b.runs = [_run("staged-ack1", 1, 1.0)]
            report = bench.build_report(b)
        finally:
            b.close()
        assert report["setup"]["send_buffer"] == p.send_buffer
        assert shown in bench.render_table(report).splitlines()[0]
    with pytest.raises(SystemExit):
        _args("--send-buffer", "-1")


@pytest.mark.parametrize(("argument", "expected"), [("64KiB", 64 * 1024), ("0", 0)])
def test_loadgen_sets_its_send_buffer_before_the_first_byte(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    argument: str,
    expected: int,
) -> None:
    set_before_send: list[int] = []
    handshake = loadgen._Connection.handshake

    def checked_handshake(self: loadgen._Connection) -> None:
        set_before_send.append(self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF))
        handshake(self)

    monkeypatch.setattr(loadgen._Connection, "handshake", checked_handshake)
    port, thread, listener = _acking_receiver(stall=0.0)
    try:
        argv = ["--port", str(port), "--connections", "1", "--batch-messages", "10"]
        code = loadgen.main([*argv, "--bytes", "20K", "--send-buffer", argument])
    finally:
        thread.join(timeout=10)
        listener.close()
    assert code == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert result["send_buffer"] == expected
    assert result["send_buffer_actual"] == set_before_send[0]
    if expected:
        assert set_before_send[0] == 2 * expected  # Linux doubles what it is given
    else:  # left alone: what any new loopback connection starts with
        with (
            socket.create_server(("127.0.0.1", 0)) as server,
            socket.create_connection(server.getsockname()) as plain,
        ):
            assert set_before_send[0] == plain.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
