"""``serve`` and ``cluster``: run a broker, or supervise several, until a signal.

The first SIGINT/SIGTERM drains; a second one stops at once.
"""

from __future__ import annotations

import gc
import logging
import signal
import sys
from collections.abc import Callable
from functools import partial

import trio

from ..broker import Broker, serve
from ..broker.cluster import (
    Cluster,
    ClusterBroker,
    check_cluster_size,
    describe_exit,
    report_to_supervisor,
    run_cluster,
)
from ..config import Config
from ..errors import ClusterError, ConfigError, EmbarcaderoError, StartupError, StorageError
from .logs import set_up_logging

logger = logging.getLogger(__name__)


def run_serve_command(config: Config, *, reset: bool, supervisor_fd: int | None) -> int:
    """Serve until signalled; the exit status (1 if the broker failed)."""
    failures: list[BaseException] = []
    try:
        trio.run(partial(serve_until_signalled, config, reset=reset, supervisor_fd=supervisor_fd))
    except* (EmbarcaderoError, OSError) as group:
        failures.extend(_leaves(group))
    for failure in failures:
        if isinstance(failure, StorageError):
            pass  # logged by the broker when it happened
        elif isinstance(failure, StartupError):  # says what to do already
            logger.error("%s", failure)
        else:
            logger.error("cannot serve: %s", failure)
    return 1 if failures else 0


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        found.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found


async def _watch_signals(
    stop: trio.CancelScope,
    abort: Callable[[], None],
    *,
    what: str = "",
    task_status: trio.TaskStatus[None],
) -> None:
    """The first SIGINT/SIGTERM cancels ``stop`` (a graceful drain); a second
    one calls ``abort`` (stop at once)."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as received:
        task_status.started()
        async for signum in received:
            name = signal.Signals(signum).name
            if not stop.cancel_called:
                logger.info("%s: draining%s (send it again to stop at once)", name, what)
                stop.cancel()
            else:
                logger.warning("%s: stopping%s without finishing the drain", name, what)
                abort()


async def serve_until_signalled(
    config: Config, *, reset: bool, supervisor_fd: int | None = None
) -> None:
    """Serve until the first SIGINT/SIGTERM (or, with ``supervisor_fd``, until
    the supervisor is gone), then drain; a second signal aborts."""
    serve_scope = trio.CancelScope()
    brokers: list[Broker] = []

    def abort() -> None:
        for broker in brokers:
            broker.abort()

    async with trio.open_nursery() as nursery:

        async def run_broker(*, task_status: trio.TaskStatus[Broker]) -> None:
            with serve_scope:
                await serve(config, reset=reset, task_status=task_status)
            nursery.cancel_scope.cancel()  # drained: stop watching signals

        await nursery.start(partial(_watch_signals, serve_scope, abort))
        broker = await nursery.start(run_broker)
        brokers.append(broker)
        # What start-up made (modules, config, the region's tables) lives as
        # long as the process: out of the collector's sight, a full
        # collection no longer walks it. Unfrozen, one took 21-25 ms of the
        # event loop in each 2 GB run paced at 2 GB/s, holding up every
        # connection's acks (p99 17-20 ms against 7.6 ms frozen).
        gc.freeze()
        if supervisor_fd is not None:
            nursery.start_soon(
                report_to_supervisor,
                supervisor_fd,
                broker.host,
                broker.port,
                broker.http_port,
                serve_scope.cancel,
            )


# -- cluster ---------------------------------------------------------------------------------


def run_cluster_command(config: Config, brokers: int, *, reset: bool) -> int:
    """Run ``brokers`` brokers until signalled; the exit status (1 if one
    failed, or did not stop cleanly; 2 if the config cannot have that many)."""
    try:
        check_cluster_size(config, brokers)
    except ConfigError as exc:
        print(f"trio-embarcadero: {exc}", file=sys.stderr)
        return 2
    set_up_logging(config, "cluster ")
    clusters: list[Cluster] = []
    failures: list[BaseException] = []
    try:
        trio.run(partial(_cluster_until_signalled, config, brokers, reset, clusters))
    except* (EmbarcaderoError, OSError) as group:
        failures.extend(_leaves(group))
    for failure in failures:
        if not isinstance(failure, ClusterError):  # logged when it happened
            logger.error("cannot run the cluster: %s", failure)
    if failures:
        return 1
    # SIGTERM's default action ends a broker stopped before it listened: nothing lost.
    clean = (0, -signal.SIGTERM)
    unclean = [
        f"broker {b.broker_id} {describe_exit(b.exit_statuses[-1])}"
        for cluster in clusters
        for b in cluster.brokers
        if b.exit_statuses and b.exit_statuses[-1] not in clean
    ]
    if unclean:
        logger.error("not every broker stopped cleanly: %s", "; ".join(unclean))
        return 1
    return 0


def _print_serving(broker: ClusterBroker) -> None:
    again = f", restart {broker.restarts}" if broker.restarts else ""
    host = f"[{broker.host}]" if ":" in broker.host else broker.host
    print(
        f"broker {broker.broker_id} listening on {host}:{broker.port} (pid {broker.pid}{again})",
        flush=True,
    )


async def _cluster_until_signalled(
    config: Config, brokers: int, reset: bool, clusters: list[Cluster]
) -> None:
    """Run the cluster until the first SIGINT/SIGTERM, then drain every broker;
    a second signal stops them at once."""
    stop = trio.CancelScope()

    def abort() -> None:
        for cluster in clusters:
            cluster.abort()

    async with trio.open_nursery() as nursery:
        await nursery.start(partial(_watch_signals, stop, abort, what=" every broker"))
        with stop:
            async with trio.open_nursery() as running:
                clusters.append(
                    await running.start(
                        partial(
                            run_cluster, config, brokers, reset=reset, on_serving=_print_serving
                        )
                    )
                )
        nursery.cancel_scope.cancel()  # drained: stop watching signals
