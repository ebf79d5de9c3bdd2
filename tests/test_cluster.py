"""A cluster of broker processes on one region: ``trio-embarcadero cluster`` and ``open_cluster``.

Multi-process throughout: brokers are ``serve`` child processes of a supervisor (the CLI
in a subprocess, or ``open_cluster`` in this process), killed with SIGKILL where a test
says so, and checked from the region they leave behind.

* The command: a line per broker as it listens; a child killed with ``kill -9`` is read
  as dead from the region, comes back (new pid, same id and port) and serves again while
  the other serves on; SIGINT drains all, exit 0, and the broker table is empty after.
* Two brokers publishing to one topic at the same time, the ``kill -9`` of one mid-load:
  the survivor's publishers never notice; every acked message is in the log, once per
  connection that sent it, in each connection's order.
* A broker that keeps failing at start-up is given up (the other drains); one whose
  supervisor is killed drains by itself; a cluster the config has no room for exits 2.
"""

from __future__ import annotations

import collections
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from test_cli import clean_env

from trio_embarcadero import BrokerError, ConnectionLost, open_publisher
from trio_embarcadero.broker.cluster import open_cluster, restart_delay
from trio_embarcadero.cli import main
from trio_embarcadero.config import Config, load_config
from trio_embarcadero.errors import ClusterError, ConfigError
from trio_embarcadero.log import open_log
from trio_embarcadero.log.members import MemberStatus
from trio_embarcadero.log.ownership import claim_region

TIMEOUT = 30.0
HOST = "127.0.0.1"
LINE = re.compile(r"broker (\d+) listening on 127\.0\.0\.1:(\d+) \(pid (\d+)(, restart \d+)?\)")


def write_config(
    tmp_path: Path, cxl_path: str, cluster: str = "restart_backoff_initial_s = 0.05"
) -> Path:
    path = tmp_path / "cluster.toml"
    path.write_text(
        f"""
[broker]
port = 0

[cluster]
{cluster}

[network]
staging_pool_buffer_size_mb = 1
staging_pool_num_buffers = 8
shutdown_grace_s = 3.0
stats_interval_s = 1000.0

[cxl]
path = "{cxl_path}"
size_mb = 64
segment_mb = 4
prefault = false
"""
    )
    return path


def config_of(tmp_path: Path, cxl_path: str, cluster: str = "") -> Config:
    return load_config(
        write_config(tmp_path, cxl_path, f"restart_backoff_initial_s = 0.05\n{cluster}"), env={}
    )


def payload(client: int, index: int) -> bytes:
    return f"{client}:{index}:".encode().ljust(40 + index % 50, b".")


def parse(message: bytes) -> tuple[int, int]:
    client, index, _ = message.split(b":", 2)
    return int(client), int(index)


async def publish(port: int, client: int, first: int, count: int, topic: str = "t") -> int:
    """Publish messages ``first .. first+count-1`` of ``client``; returns how many were acked."""
    async with open_publisher(HOST, port, topic, ack=1, batch_bytes=4096, linger=None) as pub:
        await pub.publish_many(payload(client, i) for i in range(first, first + count))
        await pub.flush()
        return pub.acked


def brokers(cxl_path: str) -> list[tuple[int, MemberStatus]]:
    with open_log(cxl_path) as log:
        return [(m.broker_id, m.status) for m in log.brokers()]


def stream_of(cxl_path: str, broker_id: int, topic: str = "t") -> list[tuple[int, int]]:
    """(client, index) of every message of one broker's stream, in log order (the reader
    raises on an offset gap)."""
    with open_log(cxl_path) as log:
        return [parse(bytes(m.payload)) for m in log.messages(topic, broker_id)]


# -- the command -------------------------------------------------------------------------------


class Supervisor:
    """``trio-embarcadero cluster`` as a subprocess, its stdout read line by line."""

    def __init__(self, config: Path, brokers: int) -> None:
        command = ["cluster", "--config", str(config), "--brokers", str(brokers)]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "trio_embarcadero", *command],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=clean_env(),
        )
        self._buffer = b""

    def next_line(self) -> tuple[int, int, int, str]:
        """The next "broker N listening on ..." line: (id, port, pid, the line)."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + TIMEOUT
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no line in time; stdout so far: {self._buffer!r}"
            if select.select([fd], [], [], remaining)[0]:
                chunk = os.read(fd, 4096)
                assert chunk, f"the cluster exited: {self.proc.communicate()[1].decode()}"
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        found = LINE.fullmatch(line.decode())
        assert found is not None, line
        return int(found[1]), int(found[2]), int(found[3]), line.decode()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=TIMEOUT)


@pytest.fixture
def supervisors() -> Iterator[list[Supervisor]]:
    started: list[Supervisor] = []
    yield started
    for supervisor in started:
        supervisor.kill()


def wait_for(predicate: object, what: str) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + TIMEOUT
    while not predicate():
        assert time.monotonic() < deadline, f"not in time: {what}"
        time.sleep(0.02)


def test_the_cluster_command_restarts_a_killed_broker_and_drains_on_sigint(
    tmp_path: Path, cxl_path: str, supervisors: list[Supervisor]
) -> None:
    # A pause between the kill and the restart: time to see the broker dead.
    config = write_config(tmp_path, cxl_path, "restart_backoff_initial_s = 0.3")
    cluster = Supervisor(config, 2)
    supervisors.append(cluster)
    first = {broker: (port, pid) for broker, port, pid, _ in (cluster.next_line() for _ in "ab")}
    assert sorted(first) == [0, 1]
    assert brokers(cxl_path) == [(0, MemberStatus.LIVE), (1, MemberStatus.LIVE)]
    for broker, (port, _) in first.items():
        assert trio.run(publish, port, broker, 0, 100) == 100

    port, pid = first[1]
    os.kill(pid, signal.SIGKILL)
    # Its entry still says live; its lock went with it: the region reads it as dead.
    wait_for(lambda: brokers(cxl_path)[1] != (1, MemberStatus.LIVE), "broker 1 not live")
    assert brokers(cxl_path) == [(0, MemberStatus.LIVE), (1, MemberStatus.DEAD)]
    assert trio.run(publish, first[0][0], 0, 100, 100) == 100  # the other serves on

    broker, again, new_pid, line = cluster.next_line()
    assert (broker, again) == (1, port)  # same id, same port...
    assert new_pid != pid  # ...another process
    assert line.endswith(", restart 1)")
    assert brokers(cxl_path) == [(0, MemberStatus.LIVE), (1, MemberStatus.LIVE)]
    assert trio.run(publish, port, 1, 100, 100) == 100

    cluster.proc.send_signal(signal.SIGINT)
    _, err = cluster.proc.communicate(timeout=TIMEOUT)
    stderr = err.decode()
    assert cluster.proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert "broker 1 was killed by SIGKILL; starting it again in 0.30 s" in stderr
    assert "SIGINT: draining every broker" in stderr
    for broker in (0, 1):  # each drained on its own SIGTERM, its lines named
        assert f" broker {broker} INFO trio_embarcadero.cli.serving: SIGTERM: draining" in stderr
    assert brokers(cxl_path) == []  # each left the table on its way out
    for broker in (0, 1):
        assert stream_of(cxl_path, broker) == [(broker, i) for i in range(200)]


def test_a_supervised_broker_drains_when_its_supervisor_is_gone(
    tmp_path: Path, cxl_path: str
) -> None:
    # What a cluster's child sees when its supervisor is killed: the other end of its
    # supervisor socket closes. (Children run in their own session: no signal reaches them.)
    ours, theirs = socket.socketpair()
    with ours:
        config = str(write_config(tmp_path, cxl_path))
        command = ["serve", "--config", config, "--broker-id", "1"]
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "trio_embarcadero",
                *command,
                "--supervisor-fd",
                str(theirs.fileno()),
            ],
            pass_fds=(theirs.fileno(),),
            stderr=subprocess.PIPE,
            env=clean_env(),
        )
        theirs.close()
        try:
            ours.settimeout(TIMEOUT)
            ready = ours.recv(256)
            # The data port, then the HTTP endpoint's (ephemeral too with broker.port = 0).
            found = re.fullmatch(rb"listening 127\.0\.0\.1 (\d+) (\d+)\n", ready)
            assert found is not None, ready
            assert int(found[2]) not in (0, 9214 + 1)
            assert trio.run(publish, int(found[1]), 1, 0, 50) == 50
        except BaseException:
            proc.kill()
            raise
    _, err = proc.communicate(timeout=TIMEOUT)
    stderr = err.decode()
    assert proc.returncode == 0, stderr
    assert " broker 1 WARNING trio_embarcadero.broker.cluster: the cluster supervisor is gone" in (
        stderr
    )
    assert brokers(cxl_path) == []  # drained and left the table
    assert stream_of(cxl_path, 1) == [(1, i) for i in range(50)]


def test_a_cluster_the_config_has_no_room_for_exits_2(
    tmp_path: Path, cxl_path: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, cxl_path)
    assert main(["cluster", "--config", str(config), "--brokers", "5"]) == 2
    assert capsys.readouterr().err == (
        "trio-embarcadero: invalid configuration:\n"
        "  - a cluster of 5 brokers needs 'max_brokers' >= 5: 4 (raise it; a region made for "
        "fewer brokers must then be recreated with --reset) @ $.cxl.max_brokers\n"
    )
    assert main(["cluster", "--config", str(config), "--brokers", "2", "--port", "65535"]) == 2
    assert "broker 1 would listen on 'port' + 1 = 65536" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["cluster", "--config", str(config), "--brokers", "0"])
    assert info.value.code == 2
    capsys.readouterr()
    # The supervisor's socket is the supervisor's to give.
    assert main(["serve", "--config", str(config), "--supervisor-fd", "999"]) == 2
    assert capsys.readouterr().err == (
        "trio-embarcadero: --supervisor-fd 999 is not an open socket (it is for a supervisor "
        "such as the cluster command, which passes one)\n"
    )
    assert not os.path.exists(cxl_path)


def test_restart_delay_doubles_up_to_its_cap() -> None:
    assert [restart_delay(n, 0.1, 1.0) for n in range(1, 7)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert restart_delay(10**6, 0.1, 5.0) == 5.0  # no overflow however many deaths


# -- embedded: open_cluster -------------------------------------------------------------------


async def test_two_brokers_share_a_topic_and_one_survives_the_others_kill(
    tmp_path: Path, cxl_path: str
) -> None:
    config = config_of(tmp_path, cxl_path)
    count = 3000  # per publisher of the broker that is killed
    acked: dict[int, int] = {}
    sent: dict[int, int] = collections.Counter()
    resumed: dict[int, int] = collections.Counter()  # connections lost, per victim
    # Something that is not a region: without the reset no broker would start on it.
    await trio.Path(cxl_path).write_bytes(b"left over".ljust(config.cxl.size_bytes, b"\0"))
    with trio.fail_after(TIMEOUT):
        async with open_cluster(config, 2, reset=True) as cluster:
            zero, one = (b.port for b in cluster.brokers)
            http_one = cluster.brokers[1].http_port
            assert http_one not in (0, 9214 + 1)  # ephemeral, like its data port
            victims_done = trio.Event()
            halfway = trio.Event()  # a publisher of broker 1 has 500 acks

            async def survivor(client: int) -> None:
                # One connection throughout (no failover): any error fails the test.
                async with open_publisher(
                    HOST, zero, "t", ack=1, batch_bytes=4096, linger=None, delivery_timeout_s=0
                ) as pub:
                    while not victims_done.is_set() or sent[client] < 500:
                        await pub.publish_many(payload(client, sent[client] + i) for i in range(50))
                        sent[client] += 50
                        await pub.flush()
                        await trio.sleep(0.005)  # a steady load, not a flood
                    acked[client] = pub.acked

            async def victim(client: int) -> None:
                done = 0  # acked so far, over every connection
                while done < count:
                    port = (await cluster.wait_serving(1)).port
                    try:
                        # Without the client's failover: the test resumes by itself.
                        async with open_publisher(
                            HOST, port, "t", ack=1, batch_bytes=4096, linger=None,
                            delivery_timeout_s=0,
                        ) as pub:  # fmt: skip
                            for first in range(done, count, 100):
                                await pub.publish_many(
                                    payload(client, i)
                                    for i in range(first, min(count, first + 100))
                                )
                                if pub.acked >= 500:
                                    halfway.set()
                                await trio.sleep(0.005)
                            await pub.flush()
                            done = count
                    except (BrokerError, ConnectionLost, OSError) as error:
                        resumed[client] += 1
                        # Resume from the last ack; what was stored unacked comes again.
                        done += (error.acked or 0) if isinstance(error, BrokerError) else 0
                        await cluster.wait_serving(1, starts=2)
                acked[client] = done

            async with trio.open_nursery() as nursery:
                for client in (0, 1):
                    nursery.start_soon(survivor, client)
                async with trio.open_nursery() as victims:
                    for client in (10, 11):
                        victims.start_soon(victim, client)
                    await halfway.wait()
                    pid = cluster.brokers[1].pid
                    assert pid is not None
                    os.kill(pid, signal.SIGKILL)  # mid-load, broker 0 still serving
                    at_kill = dict(sent)
                    restarted = await cluster.wait_serving(1, starts=2)
                    # Its own port again, unless another process (a test running beside
                    # this one) took the freed ephemeral port: then one failed start and a new one.
                    assert (restarted.port, restarted.exit_statuses) in (
                        (one, [-signal.SIGKILL]),
                        (restarted.port, [-signal.SIGKILL, 1]),
                    )
                    # Its HTTP port too (not the configured base + id, never its own).
                    if restarted.port == one:
                        assert restarted.http_port == http_one
                    # Broker 0 took (and acked: each chunk is flushed) more meanwhile.
                    assert all(sent[client] > at_kill[client] for client in (0, 1))
                victims_done.set()
    # The survivor was not harmed: every message it sent, once, in order.
    on_zero = stream_of(cxl_path, 0)
    for client in (0, 1):
        assert acked[client] == sent[client]
        assert [i for c, i in on_zero if c == client] == list(range(sent[client]))
    assert len(on_zero) == sent[0] + sent[1]
    # The broker killed lost nothing acked: each message is there, the resent ones at most
    # twice, and each connection's messages first appear in their order.
    on_one = stream_of(cxl_path, 1)
    assert sorted(resumed.values()) == [1, 1]  # the kill hit both mid-stream
    for client in (10, 11):
        assert acked[client] == count
        mine = [i for c, i in on_one if c == client]
        assert set(mine) == set(range(count))
        firsts = list(dict.fromkeys(mine))
        assert firsts == sorted(firsts)
        assert max(collections.Counter(mine).values()) <= 2
    assert brokers(cxl_path) == []


async def test_a_broker_that_keeps_failing_at_start_up_is_given_up(
    tmp_path: Path, cxl_path: str
) -> None:
    config = config_of(tmp_path, cxl_path, "max_start_failures = 2")
    # Broker id 1 is held here: each of its processes is refused and exits 1.
    held = claim_region(cxl_path, 1, mode=0o600)
    try:
        with trio.fail_after(TIMEOUT), pytest.raises(ClusterError) as info:
            async with open_cluster(config, 2):
                pass  # pragma: no cover - never every broker listens
        assert (info.value.broker_id, info.value.statuses) == (1, [1, 1])
        assert str(info.value) == (
            "broker 1 is given up: it exited 2 times in a row before it listened (last: "
            "with status 1, with status 1; its log lines above say why); the other brokers "
            "were drained"
        )
        # Broker 0 drained and left; only this test's hold on id 1 remains.
        assert brokers(cxl_path) == [(1, MemberStatus.ATTACHED)]
    finally:
        held.close()


async def test_open_cluster_refuses_more_brokers_than_the_region_has_room_for(
    tmp_path: Path, cxl_path: str
) -> None:
    with pytest.raises(ConfigError, match=r"a cluster of 5 brokers needs 'max_brokers' >= 5"):
        async with open_cluster(config_of(tmp_path, cxl_path), 5):
            pass  # pragma: no cover - refused
