"""Every example runs: in-process where it has a ``main``, as a separate
process where being one is the point."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import trio
from conftest import MakeConfig

from trio_embarcadero import open_broker, open_log

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reading(i: int) -> str:
    """What examples/publisher.py sends as message ``i``."""
    return f"sensor-{i % 8} reading {i} value {(i * 7919) % 1000}"


def test_embedded_broker(capsys: pytest.CaptureFixture[str]) -> None:
    assert load("embedded_broker").main(["--orders", "400"]) == 0
    out = capsys.readouterr().out
    assert "published 400 orders, 400 acked" in out
    assert "broker committed 400 messages" in out
    # Amounts cycle through 1.00, 1.25, ..., 25.75: four full cycles.
    assert "total amount: 5350.00" in out


async def test_publisher_and_subscriber_as_separate_processes(
    make_config: MakeConfig, cxl_path: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with trio.fail_after(30):
        async with open_broker(make_config()) as broker:
            port = str(broker.port)
            results: dict[str, subprocess.CompletedProcess[bytes]] = {}

            async def run(name: str, *args: str) -> None:
                results[name] = await trio.run_process(
                    [sys.executable, str(EXAMPLES / f"{name}.py"), "--port", port, *args],
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                )

            async with trio.open_nursery() as nursery:
                # The subscriber may well start first: it waits for the topic.
                nursery.start_soon(run, "subscriber", "--topic", "procs", "--count", "300")
                nursery.start_soon(
                    run, "publisher", "--topic", "procs", "--count", "300", "--dial-back"
                )
        for result in results.values():
            assert result.returncode == 0, result.stderr.decode()
        assert b"acked 300 of 300 messages" in results["publisher"].stdout
        lines = results["subscriber"].stdout.decode().splitlines()
        assert len(lines) == 300
        assert lines[0].startswith("0 (client ")
        assert lines[299].endswith(reading(299))
        # The same messages, read from the CXL file by another module.
        assert load("read_log").main([cxl_path, "--topic", "procs", "--start", "298"]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out == [f"298: {reading(298)}", f"299: {reading(299)}", "next offset: 300"]
        assert load("read_log").main([cxl_path]) == 0
        payload = sum(len(reading(i)) for i in range(300))
        with open_log(cxl_path) as log:
            records = log.topic("procs").payload_bytes
        assert payload < records  # records have 64-byte headers and padding
        assert capsys.readouterr().out == (
            f"procs: 300 messages, {payload} payload bytes ({records} bytes of records)\n"
        )


def run_pytest(path: Path, *options: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", str(path), "-q", "-p", "no:cacheprovider", *options],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_mock_clock_example_passes_under_pytest() -> None:
    # One process: the project's settings would start a worker per core for two tests.
    result = run_pytest(EXAMPLES / "test_app_with_mock_clock.py", "-n", "0", cwd=EXAMPLES.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout


def test_mock_clock_example_passes_copied_out_of_the_repository(tmp_path: Path) -> None:
    """Without this project's pytest settings (trio_mode) it marks its own tests."""
    copy = tmp_path / "test_app_with_mock_clock.py"
    copy.write_text((EXAMPLES / "test_app_with_mock_clock.py").read_text())
    result = run_pytest(copy, "-c", os.devnull, "--rootdir", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout
