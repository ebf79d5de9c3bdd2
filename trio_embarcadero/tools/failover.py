"""Failover of the sequencer, measured: from a fault of its broker to the next ack.

``python -m trio_embarcadero.tools.failover [--brokers N] [--rounds R]
[--fault kill|stop] [--lease-s S] [--json]`` runs a cluster of N broker
processes (``open_cluster``, a fresh region under /dev/shm, removed
afterwards) with an order-5 topic, and R times: publishers on every broker
but the one that holds the sequencer lease get their batches acked (so the
sequencer runs), the holder is killed with SIGKILL (``--fault stop``:
stopped with SIGSTOP, continued once measured), each publisher sends one
more batch at once, and the round records the time from the fault to the
lease's next epoch in the region (the takeover) and to the first ack of
those batches (an order-5 ack waits for the batch's place in the total
order). A killed broker is restarted by the cluster; the next round's victim
is whoever holds the lease then. It prints a line per round and the median
and worst; ``--json`` prints the result as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import uuid
from collections.abc import Callable
from functools import partial

import attrs
import trio

from ..broker.cluster import Cluster, open_cluster
from ..client import open_publisher
from ..config import Config, load_config
from ..log import LogReader, open_log, remove_region
from ..log.ownership import SESSION_LOCK_OFFSET, region_lock_path
from .procfs import holds_flock, process_state, range_locked

TOPIC = "failover"
#: Polls of the region for the new epoch, seconds apart.
POLL_S = 0.001


@attrs.frozen
class Round:
    """One fault.

    Attributes:
        victim: The broker id that held the lease.
        takeover_s: From the fault to the lease's next epoch in the region.
        first_ack_s: From the fault to the first ack of a batch sent after it.
        new_holder: The broker id that took the sequencer over.
    """

    victim: int
    takeover_s: float
    first_ack_s: float
    new_holder: int


@attrs.frozen
class FailoverResult:
    """A run.

    Attributes:
        fault: ``kill`` or ``stop``.
        brokers: Brokers in the cluster.
        lease_s: ``cxl.sequencer_lease_s``.
        rounds: Each fault, in order.
    """

    fault: str
    brokers: int
    lease_s: float
    rounds: list[Round]

    def summary(self) -> dict[str, float]:
        """Median and worst of both times, in seconds."""
        takeover = [r.takeover_s for r in self.rounds]
        first_ack = [r.first_ack_s for r in self.rounds]
        return {
            "takeover_median_s": statistics.median(takeover),
            "takeover_max_s": max(takeover),
            "first_ack_median_s": statistics.median(first_ack),
            "first_ack_max_s": max(first_ack),
        }


def failover_config(path: str, lease_s: float) -> Config:
    """A small cluster config on the region ``path``: ephemeral ports, an
    order-5 topic, the lease given."""
    return load_config(
        None,
        env={},
        overrides={
            "broker.port": 0,
            "cxl.path": path,
            "cxl.size_mb": 64,
            "cxl.segment_mb": 8,
            "cxl.prefault": False,
            "cxl.sequencer_lease_s": lease_s,
            "network.staging_pool_buffer_size_mb": 1,
            "network.staging_pool_num_buffers": 8,
            "network.stats_interval_s": 1000.0,
            "topics.order": 5,
        },
    )


async def _acked_batch(port: int, payload: bytes, ready: trio.Event, fault: trio.Event) -> float:
    """Publish a batch (acked: the sequencer runs), say so, wait for the
    fault, publish one more batch at once; when its ack came, by Trio's clock."""
    async with open_publisher("127.0.0.1", port, TOPIC, ack=1, linger=None) as pub:
        await pub.publish_many([payload] * 4)
        await pub.flush()
        ready.set()
        await fault.wait()
        await pub.publish_many([payload] * 4)
        await pub.flush()
        return trio.current_time()


async def _until(predicate: Callable[[], bool]) -> None:
    """Until ``predicate()`` holds (what it reads is another process's)."""
    while True:
        if predicate():
            return
        await trio.sleep(POLL_S)


async def stop_outside_the_lock(pid: int, path: str) -> None:
    """SIGSTOP process ``pid`` at a moment it holds neither the region's file
    lock nor the session table's range lock (a broker stopped inside either
    keeps every other one waiting until it goes on: it is continued, and
    stopped again a little later). The range lock names no process, so one
    still held a while after the stop is taken to be the stopped broker's."""
    while True:
        os.kill(pid, signal.SIGSTOP)
        try:
            await _until(lambda: process_state(pid) in ("T", ""))
            if not holds_flock(pid, path) and not await _held_for(
                lambda: range_locked(region_lock_path(path), SESSION_LOCK_OFFSET), 0.05
            ):
                return
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)  # never left stopped by a cancelled stop
            raise
        os.kill(pid, signal.SIGCONT)
        await trio.sleep(0.01)


async def _held_for(held: Callable[[], bool], seconds: float) -> bool:
    """Whether ``held()`` stays true for ``seconds`` (polled every millisecond)."""
    deadline = trio.current_time() + seconds
    while held():
        if trio.current_time() >= deadline:
            return True
        await trio.sleep(0.001)
    return False


async def _one_round(cluster: Cluster, path: str, fault: str) -> Round:
    with open_log(path) as region:
        return await fault_round(cluster, region, fault)


async def fault_round(cluster: Cluster, region: LogReader, fault: str) -> Round:
    """One round (see the module docstring) on a running cluster whose region
    ``region`` reads; returns once the victim serves again (after a kill) or
    was continued (after a stop).

    Raises:
        RuntimeError: The lease is not held by a broker of the cluster.
    """
    path = region.path
    lease = region.sequencer_lease()
    epoch, victim, pid = lease.epoch, lease.holder, lease.pid
    if epoch == 0 or cluster.brokers[victim].pid != pid:
        raise RuntimeError(f"the lease (epoch {epoch}) is not held by a broker of the cluster")
    others = [b for b in cluster.brokers if b.broker_id != victim]
    ready = [trio.Event() for _ in others]
    faulted = trio.Event()
    acks: list[float] = []
    took: list[float] = []

    async def publisher(port: int, event: trio.Event) -> None:
        acks.append(await _acked_batch(port, b"x" * 100, event, faulted))

    async def takeover(since: float) -> None:
        await _until(lambda: region.sequencer_lease().epoch != epoch)
        took.append(trio.current_time() - since)

    async with trio.open_nursery() as nursery:
        for broker, event in zip(others, ready, strict=True):
            nursery.start_soon(publisher, broker.port, event)
        for event in ready:
            await event.wait()
        starts = cluster.brokers[victim].starts
        if fault == "kill":
            os.kill(pid, signal.SIGKILL)
        else:
            await stop_outside_the_lock(pid, path)
        at = trio.current_time()
        faulted.set()
        nursery.start_soon(takeover, at)
    if fault == "stop":
        os.kill(pid, signal.SIGCONT)  # it finds its epoch stale and goes on without ordering
    else:
        await cluster.wait_serving(victim, starts=starts + 1)
    return Round(victim, took[0], min(acks) - at, region.sequencer_lease().holder)


async def measure(
    path: str, *, brokers: int = 3, rounds: int = 5, fault: str = "kill", lease_s: float = 1.0
) -> FailoverResult:
    """Run a cluster on the region ``path`` (made anew, then removed) and
    measure ``rounds`` faults of the broker that runs the sequencer.

    Raises:
        RuntimeError: The lease was not held by a broker of the cluster.
    """
    config = failover_config(path, lease_s)
    try:
        with trio.fail_after(60 + rounds * (10 + lease_s)):
            async with open_cluster(config, brokers, reset=True) as cluster:
                done = [await _one_round(cluster, path, fault) for _ in range(rounds)]
    finally:
        remove_region(path)
    return FailoverResult(fault, brokers, lease_s, done)


def main(argv: list[str] | None = None) -> int:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m trio_embarcadero.tools.failover")
    parser.add_argument("--brokers", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--fault", choices=("kill", "stop"), default="kill")
    parser.add_argument("--lease-s", type=float, default=1.0, help="cxl.sequencer_lease_s")
    parser.add_argument(
        "--path", default=f"/dev/shm/trio-embarcadero-failover-{uuid.uuid4().hex[:12]}"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.brokers < 2 or args.rounds < 1:
        parser.error("--brokers must be at least 2 and --rounds at least 1")
    result = trio.run(
        partial(
            measure,
            args.path,
            brokers=args.brokers,
            rounds=args.rounds,
            fault=args.fault,
            lease_s=args.lease_s,
        )
    )
    if args.json:
        print(json.dumps({**attrs.asdict(result), **result.summary()}))
        return 0
    for i, r in enumerate(result.rounds, 1):
        print(
            f"round {i}: {args.fault} broker {r.victim}: broker {r.new_holder} took the "
            f"sequencer over in {r.takeover_s * 1000:.1f} ms; first ack after "
            f"{r.first_ack_s * 1000:.1f} ms"
        )
    s = result.summary()
    print(
        f"{args.fault} of the sequencer's broker ({result.brokers} brokers, lease "
        f"{result.lease_s} s, {len(result.rounds)} rounds): takeover median "
        f"{s['takeover_median_s'] * 1000:.0f} ms (worst {s['takeover_max_s'] * 1000:.0f}), "
        f"first ack median {s['first_ack_median_s'] * 1000:.0f} ms "
        f"(worst {s['first_ack_max_s'] * 1000:.0f})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
