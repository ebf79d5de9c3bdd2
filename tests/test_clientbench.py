"""The client benchmark: a tiny real run against a broker process, and its command line."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from trio_embarcadero.tools import clientbench


@pytest.fixture
def cxl_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="trio-embarcadero-cb-test-") as d:
        yield Path(d)


def test_a_tiny_run_measures_every_mode(
    tmp_path: Path, cxl_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "clientbench.json"
    argv = ["--rounds", "1", "--publish-messages", "500", "--subscribe-messages", "300"]
    code = clientbench.main([*argv, "--cxl-dir", str(cxl_dir), "--json", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    results = json.loads(out.read_text())
    assert [r["mode"] for r in results] == list(clientbench.MODES)
    counts = {r["mode"]: r["messages"] for r in results}
    assert counts["publish"] == 500
    assert counts["publish_many"] == 1500
    assert counts["publish_many-idempotent"] == 1500
    assert counts["batches-1k"] == 300
    assert all(len(r["msgs_per_s"]) == 1 and r["msgs_per_s"][0] > 0 for r in results)
    assert "| iter-100 | 100 B |" in captured.out
    assert list(cxl_dir.iterdir()) == []  # the CXL file is removed


@pytest.mark.parametrize(
    "argv",
    [["--modes", "publish,nope"], ["--modes", ","], ["--rounds", "0"], ["--buffer-bytes", "1k"]],
)
def test_bad_options_are_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        clientbench.main(argv)
    assert exit_info.value.code == 2
    assert argv[0] in capsys.readouterr().err
