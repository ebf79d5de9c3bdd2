"""A cluster: several broker processes on one region, started and supervised.

``trio-embarcadero cluster --brokers N`` and :func:`open_cluster` run broker
ids ``0 .. N-1`` of one configuration as ``serve`` child processes. They
are processes, not brokers embedded in one: one Python process runs on one
core, so several brokers on a host are how the broker uses its cores. ::

    run_cluster() / open_cluster()
    └── cluster nursery: one supervisor task per broker id
        └── trio.run_process(python -m trio_embarcadero serve --broker-id i
                             --supervisor-fd F ...)

Each child gets the parent's effective configuration (written to a private
file) and one end of a socket pair (``--supervisor-fd``): it writes
``listening HOST PORT`` there once it listens, and drains and exits when the
other end closes, so children never outlive their supervisor, whatever
killed it. Children run in their own session, so a terminal's Ctrl-C reaches
the supervisor alone, which drains them all (one SIGTERM each); the logs of
the children go to the supervisor's stderr, each line naming its broker.

A broker that dies is started again, ``cluster.restart_backoff_initial_s``
later, the delay doubling with every death in a row up to
``cluster.restart_backoff_max_s`` (one that served that long starts from the
initial delay again). With ``broker.port = 0`` each broker keeps the
ephemeral ports it got at its first start, its data port and its HTTP
port (``--port`` and ``--http-port`` of the restart), as long as they can be
bound. A broker that exits
``cluster.max_start_failures`` times in a row before it listens, or exits 2
(its configuration is refused) before it ever listened, is given up: the
others drain and the cluster raises :class:`~trio_embarcadero.errors.ClusterError`.

Stopping is cancellation: each child gets SIGTERM and drains within its
``network.shutdown_grace_s``; one still running well after that is killed.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import NoReturn

import attrs
import trio

from ..config import Config, config_to_toml
from ..errors import ClusterError, ConfigError

logger = logging.getLogger(__name__)

#: A stopping broker gets this long beyond its own drain bound
#: (``network.shutdown_grace_s``) to exit before it is killed: closing its
#: logs and its interpreter take a moment too.
EXIT_MARGIN_S = 10.0

#: What a child writes on its supervisor socket once it listens.
READY_WORD = "listening"
#: A ready line is short; anything longer is not one.
_MAX_READY_LINE = 256

#: How a broker process is started.
_SERVE = (sys.executable, "-m", "trio_embarcadero", "serve")
#: Exit status of a broker whose configuration was refused: retrying is useless.
_CONFIG_ERROR_STATUS = 2


def restart_delay(deaths: int, initial: float, cap: float) -> float:
    """How long to wait before starting a broker again.

    Args:
        deaths: Its deaths in a row, counting the one just seen (>= 1).
        initial: The first delay (``cluster.restart_backoff_initial_s``).
        cap: The largest (``cluster.restart_backoff_max_s``).

    Returns:
        ``initial``, doubled for each earlier death in a row, at most ``cap``.
    """
    return min(cap, initial * 2.0 ** min(max(0, deaths - 1), 64))


def check_cluster_size(config: Config, brokers: int) -> None:
    """Refuse a cluster the configuration has no room for.

    Raises:
        ConfigError: ``brokers`` is not in ``1 .. cxl.max_brokers``, or the
            last broker's port would be past 65535.
    """
    problems = []
    if brokers < 1:
        problems.append(f"a cluster needs at least one broker, not {brokers} @ $.cluster")
    if brokers > config.cxl.max_brokers:
        problems.append(
            f"a cluster of {brokers} brokers needs 'max_brokers' >= {brokers}: "
            f"{config.cxl.max_brokers} (raise it; a region made for fewer brokers must then "
            "be recreated with --reset) @ $.cxl.max_brokers"
        )
    port = config.broker.port
    if port and port + brokers - 1 > 65535:
        problems.append(
            f"broker {brokers - 1} would listen on 'port' + {brokers - 1} = "
            f"{port + brokers - 1}, past 65535 (lower the port) @ $.broker.port"
        )
    if problems:
        raise ConfigError(problems)


@attrs.define
class ClusterBroker:
    """One broker process of a cluster, as its supervisor sees it.

    Attributes:
        broker_id: Its broker id.
        host: The address it listens on.
        port: Its port (0 until it first listens).
        http_port: Its HTTP endpoint's port (0: none, or not listened yet).
        pid: Its current process (None between processes).
        serving: Whether its current process listens.
        starts: Processes started for it so far.
        exit_statuses: How each of its processes ended, oldest first (a
            negative status is the signal that killed it).
    """

    broker_id: int
    host: str = ""
    port: int = 0
    http_port: int = 0
    pid: int | None = None
    serving: bool = False
    starts: int = 0
    exit_statuses: list[int] = attrs.Factory(list)

    @property
    def restarts(self) -> int:
        """Processes started for it after its first."""
        return max(0, self.starts - 1)


def describe_exit(status: int) -> str:
    """``exited with status 1`` or ``was killed by SIGKILL``."""
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = f"signal {-status}"
        return f"was killed by {name}"
    return f"exited with status {status}"


class Cluster:
    """A running cluster; handed out by :func:`run_cluster` and :func:`open_cluster`.

    Attributes:
        config: The configuration every broker runs with (its ``broker.id``
            aside).
        brokers: One entry per broker id, in id order.
        failure: Why the cluster stopped itself (a broker was given up), or None.
    """

    def __init__(self, config: Config, size: int) -> None:
        self.config = config
        self.brokers = [ClusterBroker(i, config.broker.host) for i in range(size)]
        self.failure: ClusterError | None = None
        self._processes: dict[int, trio.Process] = {}
        self._changed = trio.Event()

    @property
    def ports(self) -> list[int]:
        """Each broker's port, in id order (0 for one that never listened)."""
        return [broker.port for broker in self.brokers]

    async def wait_serving(self, broker_id: int, *, starts: int = 1) -> ClusterBroker:
        """Wait until broker ``broker_id`` listens with its ``starts``-th process
        or a later one (``starts=2``: after its first restart).

        Raises:
            ClusterError: The cluster gave a broker up meanwhile.
        """
        broker = self.brokers[broker_id]
        while not (broker.serving and broker.starts >= starts):
            if self.failure is not None:
                raise self.failure
            await self._changed.wait()
        return broker

    def abort(self) -> None:
        """Stop every broker at once, without waiting for its drain (a second
        SIGTERM to a broker that is draining)."""
        for process in self._processes.values():
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()


class _Supervisor:
    """Starts, watches and restarts the brokers of one cluster."""

    def __init__(
        self,
        cluster: Cluster,
        config_path: str,
        *,
        reset: bool,
        on_serving: Callable[[ClusterBroker], None] | None,
        stop: trio.CancelScope,
    ) -> None:
        self.cluster = cluster
        self.config_path = config_path
        self.reset = reset
        self.on_serving = on_serving
        self.stop = stop
        config = cluster.config
        self.settings = config.cluster
        self.exit_bound = config.network.shutdown_grace_s + EXIT_MARGIN_S
        # The configuration is in the file: variables that would change it
        # again (or differently) are not passed on.
        self.env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("TRIO_EMBARCADERO_", "EMBARCADERO_"))
        }
        self.ephemeral = config.broker.port == 0

    async def supervise(self, broker: ClusterBroker) -> None:
        """Keep ``broker`` running until cancelled, or give it up."""
        reset = self.reset and broker.broker_id == 0
        if self.reset and broker.broker_id:
            # A reset locks every broker id until the region is recreated.
            await self.cluster.wait_serving(0)
        # The ports an ephemeral broker keeps across restarts: its data port
        # and its HTTP port (with its data port pinned, a restart would
        # otherwise serve HTTP on the configured base port + id, which was
        # never its own and may be another process's).
        pinned = pinned_http = 0
        failures = deaths = 0
        while True:
            served_for = await self._run_once(
                broker, reset=reset, port=pinned, http_port=pinned_http
            )
            status = broker.exit_statuses[-1]
            if served_for is None:
                failures += 1
                if status == _CONFIG_ERROR_STATUS and broker.starts == failures:
                    return self._give_up(broker, "its configuration was refused")
                if failures >= self.settings.max_start_failures:
                    return self._give_up(
                        broker, f"it exited {failures} times in a row before it listened"
                    )
                if pinned:
                    logger.warning(
                        "broker %d could not start on its port %d; it takes a new one",
                        broker.broker_id,
                        pinned,
                    )
                    pinned = pinned_http = 0
            else:
                reset = False  # the region is recreated: never again
                failures = 0
                if self.ephemeral:
                    pinned, pinned_http = broker.port, broker.http_port
                if served_for >= self.settings.restart_backoff_max_s:
                    deaths = 0  # it served a good while: a fresh start
            deaths += 1
            delay = restart_delay(
                deaths, self.settings.restart_backoff_initial_s, self.settings.restart_backoff_max_s
            )
            logger.warning(
                "broker %d %s; starting it again in %.2f s",
                broker.broker_id,
                describe_exit(status),
                delay,
            )
            await trio.sleep(delay)

    def _give_up(self, broker: ClusterBroker, why: str) -> None:
        statuses = ", ".join(describe_exit(s).split(" ", 1)[1] for s in broker.exit_statuses[-5:])
        self.cluster.failure = ClusterError(
            broker.broker_id,
            broker.exit_statuses,
            f"broker {broker.broker_id} is given up: {why} (last: {statuses}; its log "
            "lines above say why); the other brokers were drained",
        )
        logger.error("%s", self.cluster.failure)
        self.cluster._notify()
        self.stop.cancel()

    def _command(
        self, broker: ClusterBroker, fd: int, *, reset: bool, port: int, http_port: int
    ) -> list[str]:
        command = [*_SERVE, "--config", self.config_path, "--broker-id", str(broker.broker_id)]
        command += ["--supervisor-fd", str(fd)]
        if port and port > broker.broker_id:
            command += ["--port", str(port - broker.broker_id)]  # listens on port + id
            if http_port > broker.broker_id:
                command += ["--http-port", str(http_port - broker.broker_id)]
        if reset:
            command.append("--reset")
        return command

    async def _run_once(
        self, broker: ClusterBroker, *, reset: bool, port: int, http_port: int
    ) -> float | None:
        """Run one process of ``broker`` until it exits.

        Returns:
            How long it served (None: it exited before it listened); its exit
            status is appended to ``broker.exit_statuses``.
        """
        ours, theirs = socket.socketpair()
        process: trio.Process | None = None
        try:
            async with trio.open_nursery() as nursery:
                process = await nursery.start(
                    partial(
                        trio.run_process,
                        self._command(
                            broker, theirs.fileno(), reset=reset, port=port, http_port=http_port
                        ),
                        check=False,
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL,
                        pass_fds=(theirs.fileno(),),
                        start_new_session=True,
                        env=self.env,
                        deliver_cancel=self._stop_process,
                    )
                )
                theirs.close()
                self.cluster._processes[broker.broker_id] = process
                broker.pid = process.pid
                broker.starts += 1
                self.cluster._notify()
                stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
                served_at = None
                address = await _read_ready(stream)
                if address is not None:
                    served_at = trio.current_time()
                    broker.host, broker.port, broker.http_port = address
                    broker.serving = True
                    self.cluster._notify()
                    if self.on_serving is not None:
                        self.on_serving(broker)
                await process.wait()
            return None if served_at is None else trio.current_time() - served_at
        finally:
            theirs.close()
            ours.close()  # a child that outlived this tells from the EOF to drain
            self.cluster._processes.pop(broker.broker_id, None)
            if process is not None and process.returncode is not None:
                broker.exit_statuses.append(process.returncode)
            broker.serving = False
            broker.pid = None
            self.cluster._notify()

    async def _stop_process(self, process: trio.Process) -> None:
        # run_process calls this, shielded, when the cluster stops.
        process.terminate()  # SIGTERM: the broker drains
        await trio.sleep(self.exit_bound)
        logger.warning(
            "broker pid %d did not exit within %.1f s of SIGTERM: killing it",
            process.pid,
            self.exit_bound,
        )
        process.kill()


async def _read_ready(stream: trio.SocketStream) -> tuple[str, int, int] | None:
    """Read a child's ``listening HOST PORT HTTP_PORT`` line: its address and
    HTTP port (0: none); None at EOF (it exited)."""
    line = b""
    while b"\n" not in line:
        chunk = await stream.receive_some(_MAX_READY_LINE)
        if not chunk:
            return None
        line += chunk
        if len(line) > _MAX_READY_LINE:
            break
    word, _, rest = line.split(b"\n", 1)[0].decode("utf-8", "replace").partition(" ")
    host, _, ports = rest.partition(" ")
    port, _, http_port = ports.partition(" ")
    if word != READY_WORD or not port.isdigit() or not http_port.isdigit():
        # Not a broker of this version: taken as one that never listened.
        logger.error("a broker wrote an unexpected ready line: %r", line[:80])
        return None
    return host, int(port), int(http_port)


async def run_cluster(
    config: Config,
    brokers: int,
    *,
    reset: bool = False,
    on_serving: Callable[[ClusterBroker], None] | None = None,
    task_status: trio.TaskStatus[Cluster] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Run broker ids ``0 .. brokers - 1`` of ``config`` as supervised processes
    until cancelled, then drain them all.

    Use with ``await nursery.start(run_cluster, config, 3)``, which returns
    the :class:`Cluster` once every broker listens.

    Args:
        config: The configuration of every broker (``broker.id`` is each
            one's own); ``broker.port + i`` is broker ``i``'s port.
        brokers: How many brokers.
        reset: Start with an empty region (broker 0 recreates it, the
            others start once it listens); a restart never resets.
        on_serving: Called each time a broker's process listens.
        task_status: Receives the :class:`Cluster` once every broker listens.

    Raises:
        ConfigError: The configuration has no room for that many brokers.
        ClusterError: A broker kept failing at start-up and was given up;
            the others were drained first.
    """
    check_cluster_size(config, brokers)
    cluster = Cluster(config, brokers)
    directory = tempfile.mkdtemp(prefix="trio-embarcadero-cluster-")  # mode 0700: ours alone
    try:
        config_path = os.path.join(directory, "config.toml")
        await trio.Path(config_path).write_text(config_to_toml(config), encoding="utf-8")
        async with trio.open_nursery() as nursery:
            supervisor = _Supervisor(
                cluster,
                config_path,
                reset=reset,
                on_serving=on_serving,
                stop=nursery.cancel_scope,
            )
            for broker in cluster.brokers:
                nursery.start_soon(supervisor.supervise, broker)
            for broker in cluster.brokers:
                await cluster.wait_serving(broker.broker_id)
            task_status.started(cluster)
            await trio.sleep_forever()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        if cluster.failure is not None:
            raise cluster.failure  # after the drain, replacing a cancellation
    raise AssertionError("unreachable")  # pragma: no cover


@asynccontextmanager
async def open_cluster(
    config: Config, brokers: int, *, reset: bool = False
) -> AsyncIterator[Cluster]:
    """Run a cluster of broker processes for the duration of an ``async with`` block.

    Leaving the block drains every broker (see :func:`run_cluster`). If the
    cluster gives a broker up, the block is cancelled once the others have
    drained, and the :class:`~trio_embarcadero.errors.ClusterError` raised.

    Args:
        config: As for :func:`run_cluster`.
        brokers: As for :func:`run_cluster`.
        reset: As for :func:`run_cluster`.

    Yields:
        The :class:`Cluster`, once every broker listens.

    Raises:
        ConfigError: As for :func:`run_cluster`, raised as is.
        ClusterError: As for :func:`run_cluster`, raised as is (not in a group).
    """
    check_cluster_size(config, brokers)  # before the nursery: unwrapped
    try:
        async with trio.open_nursery() as nursery:
            cluster = await nursery.start(partial(run_cluster, config, brokers, reset=reset))
            try:
                yield cluster
            finally:
                nursery.cancel_scope.cancel()
    except* ClusterError as failed:
        # Raised after the drain (a failing run_cluster cancels the block).
        raise failed.exceptions[0] from None


async def report_to_supervisor(
    fd: int, host: str, port: int, http_port: int | None, stop: Callable[[], None]
) -> None:
    """The broker's side of ``serve --supervisor-fd``: say it listens, then
    call ``stop`` (a graceful drain) when the supervisor's end closes.

    Args:
        fd: The broker's end of the supervisor's socket pair (taken over).
        host: The address the broker listens on.
        port: Its port.
        http_port: Its HTTP endpoint's port (None: it serves none).
        stop: Starts the broker's graceful drain.
    """
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(socket.socket(fileno=fd)))
    async with stream:
        try:
            await stream.send_all(f"{READY_WORD} {host} {port} {http_port or 0}\n".encode())
            while await stream.receive_some():
                pass  # the supervisor writes nothing: wait for its end to close
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
    logger.warning("the cluster supervisor is gone: draining")
    stop()


__all__ = [
    "Cluster",
    "ClusterBroker",
    "check_cluster_size",
    "open_cluster",
    "report_to_supervisor",
    "restart_delay",
    "run_cluster",
]
