"""The command line for operators: ``--log-format json``, the publish progress
line, and the topic commands that reach a broker's admin API (``--url``) in
another process, next to the same commands on the local CXL file.
"""

from __future__ import annotations

import io
import json
import logging
import signal
import socket
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
from test_cli import (
    TIMEOUT,
    Served,
    serve_cli,  # noqa: F401 (a fixture)
    write_config,
)

from trio_embarcadero.cli import JsonLogFormatter, main
from trio_embarcadero.cli.clients import ProgressLine

# -- --log-format json ------------------------------------------------------------------


def test_json_log_lines_carry_the_numbers() -> None:
    record = logging.LogRecord(
        "trio_embarcadero.broker.service", logging.INFO, __file__, 1, "stats: %s", ("x",), None
    )
    record.stats = {"received_messages_per_s": 12.5}
    line = json.loads(JsonLogFormatter().format(record))
    assert line["level"] == "INFO"
    assert line["logger"] == "trio_embarcadero.broker.service"
    assert line["message"] == "stats: x"
    assert line["stats"] == {"received_messages_per_s": 12.5}
    assert line["time"].endswith("+00:00")


# -- the publish progress line ------------------------------------------------------------


@attrs.define
class FakePublisher:
    published: int = 0
    sent: int = 0
    acked: int = 0


def test_the_progress_line_is_rewritten_at_most_every_interval() -> None:
    pub, out = FakePublisher(), io.StringIO()
    line = ProgressLine(pub, 1_000_000, 1000, 1, out, start=10.0)
    pub.published, pub.acked = 50_000, 40_000
    line.tick(10.5)
    assert out.getvalue() == ""  # not a second yet
    line.tick(11.0)
    assert out.getvalue() == (
        "\r50,000 of 1,000,000 messages published (5%), 40,000 acked; 50,000 msg/s, 50.0 MB/s "
    )
    pub.published = 250_000
    line.tick(13.0)
    assert (
        out.getvalue()
        .rsplit("\r", 1)[1]
        .startswith("250,000 of 1,000,000 messages published (25%), 40,000 acked; 100,000 msg/s")
    )
    line.close()
    assert out.getvalue().endswith("\n")
    quiet = io.StringIO()
    ProgressLine(pub, 10, 10, 0, quiet, start=0.0).close()
    assert quiet.getvalue() == ""  # a short run prints no progress at all


# -- commands against a broker in another process -------------------------------------------


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line of a ``--log-format json`` log, parsed (each must be JSON)."""
    return [json.loads(line) for line in text.splitlines()]


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


def test_topic_commands_reach_a_broker_over_http(
    serve_cli: Callable[..., Served],  # noqa: F811 (the fixture)
    tmp_path: Path,
    cxl_path: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cfg = str(write_config(tmp_path, cxl_path))
    broker = serve_cli("--config", cfg, "--log-format", "json")
    messages = [line["message"] for line in json_lines(broker.stderr_so_far.decode())]
    url = next(m for m in messages if m.startswith("HTTP (metrics, admin API) on ")).split()[-1]
    assert run(capsys, "create-topic", "orders.eu", "--retention-ms", "60000", "--url", url) == (
        0,
        f"created topic 'orders.eu' in {url} (order 0, retention_bytes -1, retention_ms 60000)\n",
        "",
    )
    status, _, err = run(capsys, "create-topic", "orders.eu", "--url", url)
    assert status == 1
    assert err == (
        "trio-embarcadero create-topic: HTTP 409: topic 'orders.eu' exists; "
        "delete it first to create it anew\n"
    )
    # Made in the file, by this process, while the broker serves it.
    assert run(
        capsys, "create-topic", "local.t", "--retention-bytes", "1048576", "--config", cfg
    ) == (
        0,
        f"created topic 'local.t' in {cxl_path} (order 0, retention_bytes 1048576, "
        "retention_ms -1)\n",
        "",
    )
    with urllib.request.urlopen(f"{url}/v1/topics/local.t", timeout=TIMEOUT) as answer:
        local = json.loads(answer.read())
    assert local["retention_bytes"] == 1048576
    assert local["retention_source"]["retention_bytes"] == "api"
    status, out, _ = run(
        capsys,
        "publish",
        "--topic",
        "orders.eu",
        "--count",
        "1000",
        "--size",
        "100",
        "--config",
        cfg,
        "--port",
        str(broker.port),
        "--no-progress",
    )
    assert status == 0
    assert out.startswith("published 1000 messages to 'orders.eu', acked 1000")
    # The same table from the file and from the broker.
    status, remote, _ = run(capsys, "topics", "--url", url)
    assert status == 0
    assert run(capsys, "topics", "--config", cfg) == (0, remote, "")
    rows = remote.splitlines()
    assert rows[0].split() == ["TOPIC", "ORDER", "BROKER", "MESSAGES", "BATCHES", "BYTES", "START"]
    # local.t has no stream yet: no row.
    assert [row.split()[:4] for row in rows[1:]] == [["orders.eu", "0", "0", "1000"]]
    status, inspected, _ = run(capsys, "inspect", "--url", url)
    assert status == 0
    first, *rest = inspected.splitlines()
    assert first.startswith(f"{url} (broker 0): 16777216 bytes, ")
    assert "allocation units" in first
    # The region's brokers (this one, live), then the same topic table.
    assert rest[0].split() == ["BROKER", "STATUS", "PID", "ADDRESS", "STARTED", "HEARTBEAT"]
    assert rest[1].split()[:2] == ["0", "live"]
    assert rest[2:] == rows
    status, _, err = run(capsys, "inspect", "--url", url, "--topic", "orders.eu")
    assert (status, "run inspect on the broker's host, without --url" in err) == (1, True)
    status, out, _ = run(capsys, "delete-topic", "orders.eu", "--url", url)
    assert status == 0
    assert out.startswith("deleted topic 'orders.eu': ")
    assert "orders.eu" not in run(capsys, "topics", "--url", url)[1]
    assert run(capsys, "delete-topic", "missing", "--config", cfg)[:2] == (1, "")
    code, log = broker.stop(signal.SIGTERM)
    assert code == 0
    lines = json_lines(log)
    created = "created topic 'orders.eu' over HTTP (order 0, retention_ms 60000)"
    assert created in [line["message"] for line in lines]
    stats = [line for line in lines if line["message"].startswith("stats: ")]
    assert stats[-1]["stats"]["messages_committed"] == 1000


def test_url_mistakes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["topics", "--url", "ftp://127.0.0.1:9214"])
    assert exit_.value.code == 2
    assert "must be a broker's HTTP endpoint, http://host:port" in capsys.readouterr().err
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    status, _, err = run(capsys, "topics", "--url", f"http://127.0.0.1:{port}")
    assert status == 1
    assert err.startswith(
        f"trio-embarcadero topics: cannot reach the broker at http://127.0.0.1:{port}: "
    )
